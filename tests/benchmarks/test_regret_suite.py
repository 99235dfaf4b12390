"""The ``regret`` suite at ``--quick`` size: keys, slopes, imbalance invariance, repeatability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import lowrank_problems as lp
from benchmarks import regret
from benchmarks.common import RunContext, write_result


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("regret"), progress=False)
    return ctx, regret.run(ctx)


def test_quick_run_has_the_promised_keys_and_files(quick):
    ctx, res = quick
    m = res.metrics
    assert set(m) == {"online", "imbalance", "radii", "checks", "seconds_per_method"}
    assert set(m["online"]) == set(regret.ONLINE)
    for problem in regret.ONLINE:
        assert set(m["online"][problem]) == set(regret.METHODS)
        for s in m["online"][problem].values():
            assert set(s) >= {
                "T",
                "regret_over_T_mean",
                "final_regret_over_T",
                "regret_slope",
                "first_order_slope",
                "G_observed",
                "bound_lora_rite_final",
                "bound_one_sided_final",
            }
            assert len(s["T"]) == len(s["regret_over_T_mean"])
            assert s["T"][-1] == regret.SIZES["quick"]["t_max"]
    assert set(m["imbalance"]) == set(regret.METHODS) | {"sgd_rescaled"}
    assert len(res.figures) == 2
    path = write_result(res, ctx, 1.0)
    payload = json.loads(path.read_text())
    assert payload["run"]["config"]["lr"].keys() == regret.METHODS.keys()


def test_regret_decays_like_the_bound(quick):
    _, res = quick
    for problem in regret.ONLINE:
        for name in ("one_sided_adagrad", "sgd"):
            s = res.metrics["online"][problem][name]["regret_slope"]
            assert s is not None and s["slope"] < -0.3, (problem, name, s)
    s = res.metrics["online"]["quadratic"]["lora_rite"]["regret_slope"]
    assert s["slope"] < -0.3


def test_imbalance_invariant_methods_are_flat_and_others_are_not(quick):
    _, res = quick
    imb = res.metrics["imbalance"]
    for name in regret.INVARIANT:
        assert imb[name]["spread"] <= regret.INVARIANCE_TOL, (name, imb[name]["spread"])
        assert res.metrics["checks"][f"{name}_invariant"]
    # the check can fail: GD, Adam and one-sided Adagrad change a lot with s
    for name in ("sgd", "adam", "one_sided_adagrad", "sgd_rescaled"):
        spread = math.inf if imb[name]["spread"] is None else imb[name]["spread"]  # None: diverged (inf)
        assert spread > 0.1, (name, spread)
    assert 10.0 in imb["sgd"]["diverged_scales"]
    assert imb["one_sided_adagrad"]["regret_ratio_to_s1"][-1] > 5


def test_fed_gradients_are_the_autograd_gradients():
    """The closed-form ∇A = ∇_Z B, ∇B = ∇_Zᵀ A the suite feeds equals autograd of f_t(A Bᵀ)."""
    g = lp.generator(0)
    a = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (0.5 * (a @ b.T - c).pow(2).sum()).backward()
    with torch.no_grad():
        gz = a @ b.T - c
        torch.testing.assert_close(a.grad, gz @ b)
        torch.testing.assert_close(b.grad, gz.T @ a)


def test_same_seed_same_numbers():
    def seg(seeds):
        return [
            regret.Segment("q", "quadratic", True, seeds),
            regret.Segment("c", "quadratic", False, seeds[:1], scales=[1.0, 10.0]),
        ]

    runs = [regret.online_run("lora_rite", seg([0, 1]), 200, 0.03) for _ in range(2)]
    for key in ("q", "c"):
        np.testing.assert_array_equal(runs[0][key]["regret_over_T"], runs[1][key]["regret_over_T"])
    other = regret.online_run("lora_rite", seg([2, 3]), 200, 0.03)
    assert not np.array_equal(runs[0]["q"]["regret_over_T"], other["q"]["regret_over_T"])


def test_batched_pairs_equal_separate_runs():
    """Running problems together in one optimizer gives each the numbers it gets alone."""
    a = regret.Segment("a", "linear", True, [0, 1], bias=0.25)
    b = regret.Segment("b", "quadratic", True, [0])
    together = regret.online_run("one_sided_adagrad", [a, b], 100, 0.1)
    alone = regret.online_run("one_sided_adagrad", [b], 100, 0.1)
    np.testing.assert_allclose(together["b"]["regret_over_T"], alone["b"]["regret_over_T"], rtol=1e-12)


def test_projection_keeps_the_factors_in_the_balls():
    p = regret.PROBLEM
    for name in ("sgd", "lora_rite"):
        r = regret.online_run(name, [regret.Segment("a", "linear", True, [0], bias=0.25)], 50, 100.0)["a"]
        # a huge step: the projection must hold the factors in the balls
        assert np.all(np.isfinite(r["regret_over_T"]))
        assert float(r["max_norm_a"].max()) <= p["d_a"] * (1 + 1e-12)
        assert float(r["max_norm_b"].max()) <= p["d_b"] * (1 + 1e-12)
        # in the set, the per-step loss is at most G·D_A·D_B and the comparator's at least −G·D_A·D_B
        assert abs(r["regret_over_T"][0, -1]) <= 2 * p["g"] * p["d_a"] * p["d_b"] + 1e-12


def test_lora_rite_runs_theorem_4s_configuration():
    """Summed second moment, escape, no first moment and none of clipping, skipping, capping,
    row normalization or the library's safeguards: the optimizer's hyperparameters say so."""
    a = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    name, overrides, _ = regret.METHODS["lora_rite"]
    hp = regret.build_optimizer(name, [(a, b)], 0.1, overrides).param_groups[0]
    assert hp["second_moment"] == "sum" and hp["escape"] and hp["betas"][0] == 0.0
    assert not hp["bias_correction"] and not hp["row_normalize"]
    for key in ("clip_unmagnified_grad", "update_skipping", "update_capping", "relative_step_cap", "rebalance"):
        assert hp[key] == 0.0, key


def test_radii_sweep_keeps_the_product_and_reuses_the_problems_own_segment(quick):
    _, res = quick
    p = regret.PROBLEM
    for q in regret.RADII_RATIOS:
        d_a, d_b = regret.radii_of(q)
        assert math.isclose(d_a * d_b, p["d_a"] * p["d_b"]) and math.isclose(d_a / d_b, q)
    names = {sg.name for sg in regret.segments_for(regret.SIZES["quick"])}
    n = regret.SIZES["quick"]["seeds_radii"]
    for method, per in res.metrics["radii"].items():
        for problem in regret.RADII_PROBLEMS:
            s = per[problem]
            assert s["seeds"] == n and s["relative_to_balanced"][0] == 1.0
            assert s["bound_one_sided_factor"][0] == 1.0 and s["bound_one_sided_factor"][-1] > 8
            # D_A/D_B = 4 is the problem's own radii: its run is (a)/(b)'s, first n seeds
            i = regret.RADII_RATIOS.index(p["d_a"] / p["d_b"])
            own = np.mean([row[-1] for row in res.metrics["online"][problem][method]["regret_over_T_seeds"][:n]])
            assert math.isclose(s["final_regret_over_T"][i], own, rel_tol=1e-12)
            assert f"{problem}@{regret.RADII_RATIOS[0]:g}" in names
    assert "(d) D_A·D_B fixed" in res.table


def test_radii_sweep_is_a_gauge_change_for_the_invariant_methods_only(quick):
    """At a fixed D_A·D_B the radii ratios differ by a scalar gauge: the invariant methods' regret
    is the same at every ratio; one-sided Adagrad's is not (the check can fail)."""
    _, res = quick
    radii = res.metrics["radii"]
    for name in regret.INVARIANT:
        assert res.metrics["checks"][f"{name}_radii_invariant"]
        for problem in regret.RADII_PROBLEMS:
            assert radii[name][problem]["spread"] <= regret.INVARIANCE_TOL
    assert radii["one_sided_adagrad"]["linear_biased"]["spread"] > 0.1


def test_methods_come_from_the_registry():
    """A new strategy enters the suite (runs, labels, tuning grid, invariance checks) by registering."""
    from lowrank_geom.strategies import discovered_strategies, get_strategy

    for name in discovered_strategies():
        assert name in regret.METHODS and name in regret.LABELS and name in regret.TUNE_GRID
        assert (name in regret.INVARIANT) == (get_strategy(name).invariance == "GL(r)")
    assert set(regret.METHODS) == set(discovered_strategies()) | set(regret.EXTERNAL)
    assert set(regret.SETTINGS) <= set(regret.METHODS)  # no stale entries
