"""The ``convex`` suite at ``--quick`` size: keys, the ScaledGD claim, imbalance, repeatability."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import convex
from benchmarks import lowrank_problems as lp
from benchmarks.common import RunContext, write_result


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("convex"), progress=False)
    return ctx, convex.run(ctx)


def test_quick_run_has_the_promised_keys_and_files(quick):
    ctx, res = quick
    assert res.suite == "convex"
    m = res.metrics
    assert set(m) >= {"claims", "kappa_sweep", "all_optimizers", "imbalance", "imbalance_checks", "target"}
    for kind in ("sensing", "completion"):
        c = m["claims"][kind]
        assert set(c) >= {
            "scaled_gd_iterations",
            "scaled_gd_max_over_min",
            "scaled_gd_flat",
            "gd_iterations",
            "gd_extrapolated",
            "gd_slope",
            "gd_slope_incl_extrapolated",
        }
        for k in convex.KAPPAS:
            for name in convex.CLAIM:
                r = m["kappa_sweep"][kind][name][str(k)]
                assert set(r) >= {"iterations", "seconds_to_target", "best_error", "stop", "curve", "lr"}
    from benchmarks.optimizers import OPTIMIZERS

    for name in OPTIMIZERS:
        assert name in m["all_optimizers"]["sensing"]
        assert "error" not in m["all_optimizers"]["sensing"][name][str(convex.SIZES["quick"]["kappas_all"][0])]
    assert "| problem |" in res.table
    assert len(res.figures) == 3
    path = write_result(res, ctx, 1.0)
    payload = json.loads(path.read_text())
    assert payload["run"]["config"]["lr"]["scaled_gd"].startswith("0.5")
    for f in res.figures:
        assert (ctx.out / f.split("/")[-1]).exists()


def test_scaled_gd_reaches_the_target_and_is_flat_in_kappa(quick):
    _, res = quick
    c = res.metrics["claims"]["sensing"]
    assert all(v is not None for v in c["scaled_gd_iterations"])
    assert c["scaled_gd_max_over_min"] <= 1.3 and c["scaled_gd_flat"]
    # completion at the quick size: reached for every κ ≤ 100
    comp = res.metrics["claims"]["completion"]["scaled_gd_iterations"]
    assert all(v is not None for v in comp[:3])
    # GD: ∝ κ (slope well above 0), at κ = 1000 not reached within the quick cap
    s = c["gd_slope_incl_extrapolated"]
    assert s is not None and s["slope"] > 0.5
    assert res.metrics["kappa_sweep"]["sensing"]["sgd"]["1000"]["iterations"] is None


def test_imbalance_leaves_scaled_gd_unchanged_and_breaks_gd(quick):
    _, res = quick
    imb = res.metrics["imbalance"]["sensing"]
    assert imb["scaled_gd"]["1"]["iterations"] == imb["scaled_gd"]["10"]["iterations"] is not None
    chk = res.metrics["imbalance_checks"]["sensing/scaled_gd"]
    assert chk["same_iterations"] and chk["max_rel_curve_deviation"] < 1e-6
    assert res.metrics["imbalance_checks"]["sensing/lora_rite"]["max_rel_curve_deviation"] < 1e-6
    gd10 = imb["sgd"]["10"]
    assert gd10["stop"] == "diverged" or gd10["iterations"] is None
    assert imb["sgd_lr/s²"]["10"]["iterations"] is None


def test_same_seed_same_numbers():
    prob = convex.make_problem("sensing", dict(n=12, r=2), 10, seed=3)
    runs = [convex.run_one(prob, name, 0.5, 30, seed=3) for name in ("scaled_gd", "scaled_gd")]
    assert runs[0]["errors"] == runs[1]["errors"]
    again = convex.make_problem("sensing", dict(n=12, r=2), 10, seed=3)
    assert (
        convex.run_one(again, "sgd", 0.5, 30, overrides={"momentum": 0.0}, seed=3)["errors"]
        == convex.run_one(prob, "sgd", 0.5, 30, overrides={"momentum": 0.0}, seed=3)["errors"]
    )


def test_run_one_matches_the_papers_scaled_gd_iteration():
    """One ScaledGD step through the optimizer equals the authors' update L − η ∇_L f (RᵀR)⁻¹."""
    import torch

    prob = convex.make_problem("sensing", dict(n=10, r=2), 10, seed=0)
    a0, b0 = prob.spectral_init()
    g = prob.grad(a0 @ b0.T)
    a1 = a0 - 0.5 * g @ b0 @ torch.linalg.inv(b0.T @ b0)
    b1 = b0 - 0.5 * g.T @ a0 @ torch.linalg.inv(a0.T @ a0)
    r = convex.run_one(prob, "scaled_gd", 0.5, 1, seed=0)
    assert math.isclose(r["errors"][1], prob.rel_error(a1 @ b1.T), rel_tol=1e-9)


def test_extrapolated_counts_are_flagged():
    e = [0.9**t for t in range(100)]
    assert lp.extrapolate_iterations(e, 1e-10, window=50) > 99


def test_scaled_gd_over_draws_counts_every_run(quick):
    """Part 1 over draws: the first draw is the κ sweep's run, every run is counted once."""
    _, res = quick
    m = res.metrics
    n = convex.SIZES["quick"]["claim_seeds"]
    for kind, per in m["scaled_gd_seeds"].items():
        for k in convex.KAPPAS:
            row = per["per_kappa"][str(k)]
            assert row["seeds"] == len(row["runs"]) == n
            assert row["reached"] + row["diverged"] + row["capped"] == n
            assert row["runs"][0]["iterations"] == m["kappa_sweep"][kind]["scaled_gd"][str(k)]["iterations"]
            assert [r["seed"] for r in row["runs"]] == list(range(n))
            if row["median"] is not None:
                assert row["min"] <= row["median"] <= row["max"]
            # the start's distance to X⋆ grows with κ in units of σ_r = 1/κ
            assert row["init_error_over_sigma_r_median"] > 0
    sens = m["scaled_gd_seeds"]["sensing"]["per_kappa"]
    assert sens["1000"]["init_error_over_sigma_r_median"] > sens["1"]["init_error_over_sigma_r_median"]
    assert "over problem draws" in res.table


def test_seed_summary_counts_divergences_and_uses_reached_draws_only():
    def rec(it, stop):
        return dict(seed=0, iterations=it, stop=stop, best_error=0.0, init_error_over_sigma_r=1.0)

    per = {"1": [rec(100, "target"), rec(120, "target"), rec(None, "diverged")], "10": [rec(None, "cap")] * 2}
    s = convex._seed_summary(per, [1, 10])
    row = s["per_kappa"]["1"]
    assert (row["median"], row["min"], row["max"], row["diverged"], row["capped"]) == (110.0, 100, 120, 1, 0)
    assert s["per_kappa"]["10"]["median"] is None and s["per_kappa"]["10"]["capped"] == 2
    assert s["median_max_over_min"] == math.inf and not s["all_reached"]
    ok = convex._seed_summary({"1": [rec(100, "target")], "10": [rec(150, "target")]}, [1, 10])
    assert ok["median_max_over_min"] == 1.5 and ok["all_reached"]


def test_full_size_is_tong_ma_chi_completion_over_draws():
    full = convex.SIZES["full"]
    assert full["problems"]["completion"] == dict(n=1000, r=10, p=0.2)
    assert full["kappas"] == [1, 5, 10, 20, 100, 1000]
    assert full["claim_seeds"]["completion"] >= 5
    assert convex._claim_seeds(full, "completion", 7)[0] == 7
