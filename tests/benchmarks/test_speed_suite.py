"""The ``speed`` suite at ``--quick`` size: positive timings, exact state bytes."""

from __future__ import annotations

import json

import pytest

from benchmarks import speed
from benchmarks.common import RunContext
from benchmarks.optimizers import OPTIMIZERS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("speed"), progress=False)
    return speed.run(ctx)


def test_every_optimizer_timed_with_positive_times(quick):
    m = quick.metrics
    json.dumps(m, allow_nan=False)
    tiny = m["sets"]["tiny"]["8"]
    assert set(tiny) == set(OPTIMIZERS)
    for name, res in tiny.items():
        assert res["ms"] > 0 and res["runs"] >= 1, name
        assert res["ratio_to_adam"] > 0
    assert tiny["adam"]["ratio_to_adam"] == 1.0
    for name in OPTIMIZERS:
        for r in m["m_sweep"]["results"][name].values():
            assert r["ms"] > 0
    assert len(quick.figures) == 2
    assert "### Targets" in quick.table


def test_state_bytes_are_exact(quick):
    tiny = quick.metrics["sets"]["tiny"]["8"]
    shapes = speed.layer_shapes(4, 128, 32, 8)
    numel = sum((m + n) * r for m, n, r in shapes)
    n_tensors = 2 * len(shapes)
    # torch Adam: exp_avg + exp_avg_sq (float32) per parameter, and a float32 scalar step per tensor
    assert tiny["adam"]["state_bytes"] == 2 * numel * 4 + n_tensors * 4
    assert tiny["adamw"]["state_bytes"] == tiny["adam"]["state_bytes"]
    assert tiny["sgd"]["state_bytes"] == 0  # momentum 0: no buffers
    # LoRA-RITE: exp_avg + basis per factor, an r×r second moment per factor, and per pair the
    # driver's three float32 scalars (step, nonfinite_skips, update_skips)
    r = 8
    assert tiny["lora_rite"]["state_bytes"] == 2 * numel * 4 + len(shapes) * (2 * r * r * 4 + 3 * 4)
    target = [t for t in quick.metrics["targets"] if t["target"].startswith("LoRA-RITE state bytes")]
    assert target and target[0]["status"] == "met"


def test_measure_state_bytes_independent_of_suite():
    import torch

    ps = speed.ParamSet([(6, 5, 2), (4, 7, 3)], 0, torch.device("cpu"))
    res = speed.measure("adam", ps, 0.001)
    params = ps.model.trainable_parameters()
    assert res["state_bytes"] == sum(2 * p.numel() * p.element_size() + 4 for p in params)


def test_compile_option_times_the_compiled_step_against_eager(tmp_path, monkeypatch):
    # quick's only rank is 8; one strategy keeps it to one compilation
    monkeypatch.setattr(speed, "COMPILE_RANK", 8)
    monkeypatch.setattr(speed, "COMPILED", ["scaled_gd"])
    ctx = RunContext(size="quick", out=tmp_path, progress=False, options={"extra": ["--compile"]})
    m = speed.run(ctx).metrics
    res = m["compiled"]["results"]["scaled_gd"]
    eager = m["sets"]["tiny"]["8"]
    assert res["ms"] > 0
    assert res["ratio_to_eager"] == pytest.approx(res["ms"] / eager["scaled_gd"]["ms"])
    assert res["ratio_to_adam"] == pytest.approx(res["ms"] / eager["adam"]["ms"])
    assert res["state_bytes"] == eager["scaled_gd"]["state_bytes"]  # compiling changes no state


def test_without_the_option_nothing_is_compiled(quick):
    assert quick.metrics["compiled"] is None and "compile=True" not in quick.table
