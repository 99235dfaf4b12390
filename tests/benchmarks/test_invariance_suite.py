"""The ``invariance`` suite at ``--quick`` size: invariant optimizers stay at round-off, others do not."""

from __future__ import annotations

import json

import pytest

from benchmarks import invariance
from benchmarks.__main__ import main
from benchmarks.common import RunContext
from benchmarks.optimizers import OPTIMIZERS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("invariance"), progress=False)
    return invariance.run(ctx)


def test_metrics_cover_every_optimizer_dtype_and_gauge(quick):
    m = quick.metrics
    json.dumps(m, allow_nan=False)  # strictly JSON-able (no inf/NaN)
    assert set(m["optimizers"]) == set(OPTIMIZERS) | set(invariance.VARIANTS)
    for _name, r in m["optimizers"].items():
        assert set(r["gaps"]) == {"float64", "float32"}
        for gaps in r["gaps"].values():
            assert list(gaps) == invariance.gauge_labels()
        assert r["class"] in {"GL(r)", "scalar+O(r)", "scalar", "O(r)", "none", "n/a"}
    assert len(quick.figures) == 1 and quick.figures[0].endswith(".png")
    assert "class (measured)" in quick.table


def test_invariant_optimizers_at_roundoff_and_adam_is_not(quick):
    opt = quick.metrics["optimizers"]
    for name in ("lora_rite", "lora_rite[engine=qr]", "lora_rite[engine=gram]", "scaled_gd"):
        gaps = opt[name]["gaps"]["float64"]
        if name in ("lora_rite", "lora_rite[engine=qr]"):
            # QR engine (the default for float64): round-off ~cond(G)·eps per step, measured ≤ 2e-12
            bound = dict.fromkeys(gaps, 1e-9)
        else:
            # Gram engines work with BᵀB, so float64 round-off grows like cond(G)²·eps: ≤ 1e-8 up to
            # cond(G) = 100; at cond(G) = 1e4 the gap measured ~2e-7 at this size (cond² eps ≈ 2e-8,
            # amplified over the steps), still four orders below Adam's ≥ 1e-3.
            bound = {k: 1e-5 if k == "cond=10000" else 1e-8 for k in gaps}
        assert all(g is not None and g < bound[k] for k, g in gaps.items()), (name, gaps)
        assert opt[name]["movement"]["float64"] > invariance.MIN_MOVEMENT  # Z really moved
    for name in ("lora_rite", "lora_rite[engine=qr]", "scaled_gd"):
        assert opt[name]["class"] == "GL(r)"
    adam = opt["adam"]["gaps"]["float64"]
    assert all(g is None or g > 1e-3 for g in adam.values()), adam
    assert opt["adam"]["class"] == "none"
    assert opt["sgd"]["class"] == "O(r)"  # orthogonal gauges only: the classifier separates subgroups


def test_classify_thresholds():
    labels = invariance.gauge_labels()
    ok = dict.fromkeys(labels, 1e-14)
    assert invariance.classify(ok, 0.1) == "GL(r)"
    assert invariance.classify(ok, 1e-6) == "n/a"
    assert invariance.classify({**ok, "cond=100": 1e-2}, 0.1) == "scalar+O(r)"
    assert invariance.classify({**ok, "cond=100": 1e-2, "cond=1": 1e-2}, 0.1) == "scalar"
    assert invariance.classify({**ok, "s=10": None}, 0.1) == "O(r)"


def test_cli_quick_writes_json(tmp_path, monkeypatch):
    # the CLI path only: a smaller problem than the quick fixture's
    monkeypatch.setitem(invariance.SIZES, "quick", dict(shapes=[(6, 5, 2)], steps=2))
    assert main(["invariance", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "invariance.json").read_text())
    assert {"run", "meta", "metrics"} <= set(payload)
    assert payload["run"]["size"] == "quick"
    assert (tmp_path / "invariance.md").exists()
    assert (tmp_path / "invariance_gap_vs_cond.png").exists()


def test_trajectories_are_repeatable():
    import torch

    from benchmarks.optimizers import PairModel

    size = invariance.SIZES["quick"]
    problem = invariance.Problem(size["shapes"], seed=0)
    model = PairModel(size["shapes"], dtype=torch.float64)
    loss = problem.loss_fn(torch.float64)
    for name in ("lora_rite", "adam"):
        z1, f1 = invariance.trajectory(name, model, problem.start("cond=100", torch.float64), loss, 3)
        z2, f2 = invariance.trajectory(name, model, problem.start("cond=100", torch.float64), loss, 3)
        assert torch.equal(z1, z2) and f1 == f2
