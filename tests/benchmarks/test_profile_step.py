"""``benchmarks.profile_step``: per-operator self times of one optimizer step."""

from __future__ import annotations

import pytest

from benchmarks import profile_step


def test_profile_lists_the_operators_of_a_lora_rite_step():
    total, rows = profile_step.profile("lora_rite", r=4, steps=2, warmup=1, layers=1, top=50)
    assert total > 0 and rows
    assert all(calls >= 1 for _, calls, _ in rows)
    # the listed rows are the top of the per-operator self times, which sum to the total
    assert sum(ms for _, _, ms in rows) <= total * (1 + 1e-9)
    names = {key for key, _, _ in rows}
    # the Gram engine's GEMMs and its one batched eigendecomposition are there
    assert any("bmm" in k or "matmul" in k or "baddbmm" in k for k in names), names
    assert any("eigh" in k for k in names), names


def test_cli_prints_adam_first(capsys):
    assert (
        profile_step.main(["--optimizers", "scaled_gd", "--r", "4", "--steps", "1", "--layers", "1", "--top", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert out.index("adam:") < out.index("scaled_gd:")


def test_operator_families():
    cases = {
        "aten::bmm": "GEMM",
        "aten::baddbmm": "GEMM",
        "aten::linalg_qr": "factorization",
        "aten::_linalg_eigh": "factorization",
        "aten::linalg_vector_norm": "reduction",
        "aten::_foreach_addcdiv_": "elementwise",
        "aten::mul_": "elementwise",
        "aten::cat": "copy",
        "Optimizer.step#LoRARITE.step": "driver Python",
        "aten::as_strided": "other",
    }
    for op, family in cases.items():
        assert profile_step.category(op).startswith(family), op


def test_families_cover_every_operator_of_the_step():
    total, _rows, families = profile_step.profile(
        "scaled_gd", r=4, steps=1, warmup=1, layers=1, top=2, hidden=32, kv=16, categories=True
    )
    # by_category sums over all operators, not the top 2 listed (relative round-off of a sum)
    assert sum(families.values()) == pytest.approx(total, rel=1e-9)
    assert families.get("GEMM", 0.0) > 0
