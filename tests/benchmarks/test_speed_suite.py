"""The ``speed`` suite at ``--quick`` size: positive timings, exact state bytes, targets from
interleaved repeats (median, min–max, per-repeat values, rotated order, the floor)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

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


def _ratio_rows(metrics):
    return [t for t in metrics["targets"] if "per_repeat" in t]


def test_targets_are_the_issues_ratios_at_their_ranks(quick):
    tcfg = speed.SIZES["quick"]["targets"]
    got = {(t["numerator"], t["denominator"], t["r"]) for t in _ratio_rows(quick.metrics)}
    at16 = {
        ("lora_rite", "adam"),
        ("scaled_gd", "adam"),
        ("scaled_adam", "adam"),
        ("scaled_adam", "peft_riemannian"),
        ("lora_rite", "peft_riemannian"),
    }
    want = {(n, d, 16) for n, d in at16} | {("pyopt_lora_rite", "lora_rite", r) for r in tcfg["ranks"]}
    want.add(("lora_rite", speed.FLOOR, tcfg["floor_rank"]))
    assert got == want
    # no ratio target left "not measured" and the state rows are still there
    assert all(t["value"] is not None for t in quick.metrics["targets"])
    assert any(t["target"].startswith("LoRA-RITE state bytes") for t in quick.metrics["targets"])


def test_target_rows_carry_median_spread_and_per_repeat_values(quick):
    tcfg = speed.SIZES["quick"]["targets"]
    assert tcfg["repeats"] >= 5
    by_rank = quick.metrics["interleaved"]["by_rank"]
    for t in _ratio_rows(quick.metrics):
        rec = by_rank[str(t["r"])]
        per = t["per_repeat"]
        assert len(per) == t["repeats"] == tcfg["repeats"], t["target"]
        # each ratio divides two times of the same repeat
        assert t["numerator_ms"] == rec["ms"][t["numerator"]] and t["denominator_ms"] == rec["ms"][t["denominator"]]
        assert per == pytest.approx([a / b for a, b in zip(rec["ms"][t["numerator"]], rec["ms"][t["denominator"]])])
        assert t["median"] == t["value"] == statistics.median(per)
        assert (t["min"], t["max"]) == (min(per), max(per)) and t["spread"] == "min–max"
        assert f"{t['median']:.4g}" in quick.table and f"{t['min']:.3g}–{t['max']:.3g}" in quick.table
    json.dumps(quick.metrics["interleaved"], allow_nan=False)


def test_repeats_are_interleaved_in_rotating_order(quick):
    by_rank = quick.metrics["interleaved"]["by_rank"]
    assert set(by_rank) == {str(r) for r in speed.SIZES["quick"]["targets"]["ranks"]}
    for r, rec in by_rank.items():
        names, n = rec["names"], rec["repeats"]
        assert names == speed.timed_at(int(r), speed.SIZES["quick"]["targets"]) and len(names) >= 3
        assert rec["order"] == [names[k % len(names) :] + names[: k % len(names)] for k in range(n)]
        assert len({tuple(o) for o in rec["order"]}) == min(n, len(names))  # orders really change
        for name in names:
            assert len(rec["ms"][name]) == n and all(v > 0 for v in rec["ms"][name]), (r, name)
            assert all(k >= 1 for k in rec["steps"][name])
        assert len(rec["contended"]) == len(rec["others_cpu"]) == n
        for name, copies in rec["grad_restore_ms"].items():
            assert name in speed.MUTATES_GRAD and len(copies) == n


def test_floor_row_at_the_floor_rank(quick):
    tcfg = speed.SIZES["quick"]["targets"]
    floors = [t for t in _ratio_rows(quick.metrics) if t["denominator"] == speed.FLOOR]
    assert len(floors) == 1
    f = floors[0]
    assert f["r"] == tcfg["floor_rank"] and f["bound"] == "<= 1.3"
    assert f["floor_ms"] > 0 and f["step_ms"] > 0
    assert f["floor_ms"] == statistics.median(f["denominator_ms"])
    assert f["step_ms"] == statistics.median(f["numerator_ms"])
    assert "### Floor" in quick.table and f"{f['floor_ms']:.3g}" in quick.table


def test_statuses_follow_the_medians(quick):
    for t in _ratio_rows(quick.metrics):
        op, bound = t["bound"].split()
        ok = t["median"] <= float(bound) if op == "<=" else t["median"] >= float(bound)
        assert t["status"].split()[0] == ("met" if ok else "missed"), t


def _record(num_ms, den_ms, contended):
    return {"ms": {"x": num_ms, "y": den_ms}, "order": [["x", "y"]] * len(num_ms), "contended": contended}


def test_status_is_the_medians_not_an_extreme_repeats():
    # ratios 1, 1, 3, 1, 1: the median meets <= 1.5 though one repeat does not
    row = speed._ratio_target("x / y", "x", "y", 16, "<=", 1.5, _record([1, 1, 3, 1, 1], [1] * 5, [False] * 5))
    assert (row["median"], row["min"], row["max"], row["status"]) == (1, 1, 3, "met")
    # ratios 9, 2, 2, 9, 2 against >= 8: the median (2) misses although the max meets
    row = speed._ratio_target("x / y", "x", "y", 8, ">=", 8.0, _record([9, 4, 2, 18, 6], [1, 2, 1, 2, 3], [False] * 5))
    assert row["per_repeat"] == [9, 2, 2, 9, 2] and row["status"] == "missed"
    # contended in 3 of 5 repeats: flagged, the met/missed part unchanged
    contended = [True, True, True, False, False]
    row = speed._ratio_target("x / y", "x", "y", 16, "<=", 1.5, _record([1] * 5, [1] * 5, contended))
    assert row["status"].startswith("met (unreliable: 3/5")
    row = speed._ratio_target("x / y", "x", "y", 16, "<=", 1.5, _record([1] * 5, [1] * 5, [True] + [False] * 4))
    assert row["status"] == "met"


def test_interleaved_turns_keep_each_optimizers_own_trajectory():
    # SGD (momentum 0, lr 0.01 here) with fixed gradients after N steps sits at x0 - N·lr·g, whatever
    # Adam did to the shared model during its turns
    ps = speed.ParamSet([(6, 5, 2), (4, 7, 3)], 0, torch.device("cpu"))
    x0 = [p.detach().clone() for p in ps.model.trainable_parameters()]
    rec = speed.interleaved_repeats(ps, ["adam", "sgd"], 1, 0.001)
    assert rec["order"] == [["adam", "sgd"]]  # sgd's turn was last: the model holds its factors
    n = 1 + rec["steps"]["sgd"][0]  # warm-up + timed steps
    for p, x, g in zip(ps.model.trainable_parameters(), x0, ps.grads):
        assert torch.allclose(p.detach(), x - n * 0.01 * g, atol=1e-6)


def test_floor_fn_handles_buckets_of_several_ranks():
    ps = speed.ParamSet([(6, 5, 2), (4, 7, 3), (6, 5, 2)], 0, torch.device("cpu"))
    before = [p.detach().clone() for p in ps.model.trainable_parameters()]
    speed.floor_fn(ps)()
    assert all(torch.equal(p, b) for p, b in zip(ps.model.trainable_parameters(), before))  # reads only


def test_profile_of_each_configured_optimizer_with_families_summing_to_its_total(quick):
    """The profile section says where a step's time goes: every (rank, optimizer) of the size's
    ``profile`` config, its operator families adding up to the profiled total, and a table."""
    prof = quick.metrics["profile"]
    want = speed.SIZES["quick"]["profile"]["optimizers"]
    assert {r: list(v) for r, v in prof["by_rank"].items()} == {str(r): names for r, names in want.items()}
    for by_name in prof["by_rank"].values():
        for name, res in by_name.items():
            assert res["profiled_ms"] > 0 and res["top_ops"], name
            # the families cover every operator, not only the listed top ones (relative round-off of a sum)
            assert sum(res["families_ms"].values()) == pytest.approx(res["profiled_ms"], rel=1e-9), name
    assert "### Profile: tiny, r=8" in quick.table


def test_heavy_optimizers_are_skipped_above_the_size_budget_with_the_estimate():
    gemma64 = speed.layer_shapes(18, 2048, 256, 64)
    skip = speed._heavy_skip(speed.SIZES["default"], "loft", gemma64)
    assert skip and "multiply-adds" in skip["skipped"]
    # within the budget, and any optimizer not listed as heavy, is timed
    assert speed._heavy_skip(speed.SIZES["default"], "loft", speed.layer_shapes(18, 2048, 256, 8)) is None
    assert speed._heavy_skip(speed.SIZES["default"], "lora_rite", gemma64) is None
    assert speed._heavy_skip(speed.SIZES["full"], "loft", gemma64) is None
