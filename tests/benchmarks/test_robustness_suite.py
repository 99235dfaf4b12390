"""The ``robustness`` suite: verdicts, the ``--quick`` run end to end, the CLI, conditioning."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import robustness
from benchmarks.__main__ import ALL, SUITES, main
from benchmarks.common import RunContext

pytest.importorskip("peft")
pytest.importorskip("pytorch_optimizer")

CELL_KEYS = {
    "optimizer",
    "init",
    "setup",
    "dtype",
    "lr",
    "seed",
    "initial_loss",
    "final_loss",
    "adamw_final_loss",
    "adamw_trains",
    "verdict",
    "error",
    "steps_done",
    "seconds",
    "warnings",
    "run_lr",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("robustness"), progress=False)
    return robustness.run(ctx)


def test_verdicts_on_constructed_inputs():
    v = robustness.verdict
    assert v(0.14, 0.1, 1.0) == "trains"  # 1.4x AdamW
    assert v(0.15, 0.1, 1.0) == "trains"  # exactly the ratio
    assert v(0.2, 0.1, 1.0) == "lags"  # 2x AdamW, with real progress from the initial loss
    assert v(0.995, 0.1, 1.0) == "diverges"  # 10x AdamW, no real progress (> 0.99 x initial)
    assert v(1.5, 0.1, 1.0) == "diverges"  # worse than the start, though below BLOWUP x
    assert v(math.nan, 0.1, 1.0) == "diverges"
    assert v(math.inf, 0.1, 1.0) == "diverges"
    assert v(None, 0.1, 1.0) == "diverges"  # the JSON's non-finite
    assert v(None, 0.1, 1.0, error="PSDNumericsError: eigh failed") == "raises"
    assert v(0.05, 0.1, 1.0, error="RuntimeError: x") == "raises"  # an exception wins
    # AdamW did not train (no progress, or non-finite): no target, unless the run itself failed
    assert v(0.5, 0.995, 1.0) == "n/a"
    assert v(0.5, None, 1.0) == "n/a"
    assert v(math.nan, None, 1.0) == "diverges"
    assert v(2.5, 0.995, 1.0) == "diverges"  # blew up past BLOWUP x the initial loss
    assert robustness.adamw_trains(0.98, 1.0) and not robustness.adamw_trains(0.995, 1.0)


def test_summary_counts_only_target_cells_for_the_claim():
    def rec(name, verdict, adamw_trains, **kw):
        return dict(
            optimizer=name,
            init="peft_default",
            setup="2class",
            dtype="float32",
            lr=1e-3,
            seed=0,
            verdict=verdict,
            adamw_trains=adamw_trains,
            error=kw.get("error"),
            final_loss=kw.get("final"),
            initial_loss=1.0,
            adamw_final_loss=0.2,
        )

    records = [
        rec("a", "trains", True),
        rec("a", "raises", False, error="E: x"),
        rec("b", "trains", True),
        rec("b", "diverges", True, final=0.5),
        rec("c", "trains", True),
        rec("c", "lags", True, final=0.4),
    ]
    s = robustness.summarize(records, ["a", "b", "c"])
    assert s["a"]["trains_where_adamw_trains"] and s["a"]["raises"] == 1
    assert s["a"]["failing"] == ["peft_default/2class/float32/lr=0.001 (raises E: x) †"]
    assert not s["b"]["trains_where_adamw_trains"] and s["b"]["diverges"] == 1
    assert s["b"]["failing"] == ["peft_default/2class/float32/lr=0.001 (diverges: 2.5× AdamW)"]
    # lagging misses the target as diverging does
    assert not s["c"]["trains_where_adamw_trains"] and s["c"]["lags"] == 1
    assert s["c"]["failing"] == ["peft_default/2class/float32/lr=0.001 (lags: 2× AdamW)"]


def test_each_optimizer_runs_the_decades_around_its_recommended_lr():
    from benchmarks.common import config_lr

    assert robustness.optimizer_lr("adamw", 1e-3) == 1e-3
    # ScaledGD's recommended rate is in gradient units: the grid's 1e-3 column runs it at 1e-2
    assert robustness.optimizer_lr("scaled_gd", 1e-3) == pytest.approx(
        1e-3 * config_lr("scaled_gd") / config_lr("adamw"), rel=1e-15
    )
    assert config_lr("scaled_gd") != config_lr("adamw")  # else the check above is vacuous
    assert robustness.optimizer_lr("lora_rite", 1e-2) == pytest.approx(1e-2, rel=1e-15)
    assert robustness.optimizer_lr("no_such_config", 3e-4) == 3e-4  # registered, no config


def test_sizes_cover_the_grid():
    full = robustness.SIZES["full"]
    assert full["inits"] == list(robustness.INITS) and full["setups"] == list(robustness.SETUPS)
    assert full["dtypes"] == ["float32", "bfloat16", "float64"]
    assert full["lrs"] == [1e-4, 1e-3, 1e-2]
    assert full["seeds"] >= 2 and full["optimizers"] is None  # None: every optimizer
    default = robustness.SIZES["default"]
    assert default["inits"] == ["peft_default"] and default["setups"] == ["2class"]
    assert default["dtypes"] == full["dtypes"] and default["lrs"] == full["lrs"]
    # the invariant strategies of the known failure (every GL(r) one), and the baselines
    from lowrank_geom.strategies import available_strategies, get_strategy

    invariant = {n for n in available_strategies() if get_strategy(n).invariance == "GL(r)"}
    assert invariant | set(robustness.BASELINES) <= set(default["optimizers"])


def test_full_size_report_on_constructed_records(tmp_path):
    # the >30-cell path (failures by axis, a wide heatmap) without running the full grid
    size = dict(robustness.SIZES["full"], seeds=1)
    records = []
    for init in size["inits"]:
        for setup in size["setups"]:
            for lr in size["lrs"]:
                for name in ("adamw", "lora_rite"):
                    bad = name == "lora_rite" and setup == "2class"
                    records.append(
                        dict(
                            optimizer=name,
                            init=init,
                            setup=setup,
                            dtype="float32",
                            lr=lr,
                            seed=0,
                            verdict="raises" if bad else "trains",
                            adamw_trains=True,
                            error="PSDNumericsError: x" if bad else None,
                            final_loss=None if bad else 0.3,
                            initial_loss=1.0,
                            adamw_final_loss=0.3,
                        )
                    )
    names = ["lora_rite", "adamw"]
    summary = robustness.summarize(records, names)
    table = robustness._table(records, summary, names, dict(size, dtypes=["float32"]))
    assert "### Failing runs by axis" in table and "### Final losses" not in table
    n = len(size["inits"]) * len(size["lrs"])  # runs per set-up
    trains = n * (len(size["setups"]) - 1)
    assert f"| lora_rite | {trains} | 0 | 0 | {n} | 0 | no |" in table
    assert "… " in table  # the failing list is cut, the JSON keeps it whole
    per_init = len(size["setups"]) * len(size["lrs"])
    row = f"| lora_rite | {' | '.join([f'3/{per_init}'] * len(size['inits']))} | {n}/{n} | 0/{n} |"
    assert row in table  # by init: the 3 lrs of 2class fail; by set-up: all of 2class
    ctx = RunContext(size="full", out=tmp_path, progress=False)
    assert (tmp_path / "robustness_verdicts.png").samefile(robustness._heatmap(records, names, ctx))


def test_quick_covers_every_strategy_and_baseline(quick):
    from lowrank_geom.strategies import available_strategies

    m = quick.metrics
    json.dumps(m, allow_nan=False)  # strictly JSON-able (no inf/NaN)
    names = set(m["optimizers"])
    assert set(available_strategies()) <= names
    assert set(robustness.BASELINES) <= names
    assert {r["optimizer"] for r in m["cells"]} == names
    size = robustness.SIZES["quick"]
    n_cells = len(size["inits"]) * len(size["setups"]) * len(size["dtypes"]) * len(size["lrs"])
    assert len(m["cells"]) == n_cells * len(names)
    for r in m["cells"]:
        assert set(r) == CELL_KEYS, set(r) ^ CELL_KEYS
        assert r["verdict"] in robustness.VERDICTS
        assert r["verdict"] == robustness.verdict(r["final_loss"], r["adamw_final_loss"], r["initial_loss"], r["error"])
        assert (r["error"] is None) == (r["verdict"] != "raises")
        assert r["run_lr"] == robustness.optimizer_lr(r["optimizer"], r["lr"])
    for name in names:
        s = m["summary"][name]
        assert sum(s[v] for v in robustness.VERDICTS) == n_cells
        assert m["trains_where_adamw_trains"][name] == s["trains_where_adamw_trains"]


def test_quick_adamw_trains_its_own_cell(quick):
    # the harness itself works: the reference learns, and every run starts from the same model
    (adamw,) = [r for r in quick.metrics["cells"] if r["optimizer"] == "adamw"]
    assert adamw["verdict"] == "trains" and adamw["adamw_trains"]
    assert adamw["final_loss"] < 0.8 * adamw["initial_loss"]
    assert len({r["initial_loss"] for r in quick.metrics["cells"]}) == 1


def test_quick_outputs(quick):
    assert len(quick.figures) == 2 and quick.figures[0].endswith("robustness_verdicts.png")
    assert quick.figures[1].endswith("robustness_conditioning.png")
    assert "trains wherever AdamW trains" in quick.table
    for name in quick.metrics["optimizers"]:
        assert f"| {name} |" in quick.table


def test_train_is_repeatable():
    cell = dict(init="peft_default", setup="2class", dtype="float32", lr=1e-2, seed=0)
    a, b = robustness.train("adamw", cell, 5), robustness.train("adamw", cell, 5)
    assert a["final_loss"] == b["final_loss"] and a["steps_done"] == 5


def test_registered_in_the_cli(tmp_path, monkeypatch):
    assert SUITES.index("robustness") == SUITES.index("invariance") + 1
    assert ALL.index("robustness") == ALL.index("invariance") + 1
    # the CLI path only: fewer optimizers and steps than the quick fixture's
    monkeypatch.setitem(robustness.SIZES, "quick", dict(robustness.SIZES["quick"], steps=3, optimizers=["adamw"]))
    monkeypatch.setitem(robustness.COND_SIZES, "quick", dict(robustness.COND_SIZES["quick"], steps=3))
    assert main(["robustness", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "robustness.json").read_text())
    assert payload["suite"] == "robustness" and payload["run"]["size"] == "quick"
    assert [r["optimizer"] for r in payload["metrics"]["cells"]] == ["adamw"]
    assert (tmp_path / "robustness.md").exists()
    assert (tmp_path / "robustness_verdicts.png").exists()
    assert (tmp_path / "robustness_conditioning.png").exists()
    assert payload["metrics"]["conditioning"]["cells"][0]["steps_done"] == 3
    assert payload["run"]["config"]["conditioning"]["steps"] == 3
    assert "### Conditioning sweep" in (tmp_path / "robustness.md").read_text()


# ------------------------------------------------------------------------- conditioning sweep
COND_CELL_KEYS = {
    "kappa",
    "seed",
    "dtype",
    "engine",
    "steps",
    "final_error",
    "exception",
    "steps_done",
    "update_skips",
    "nonfinite_skips",
    "batch_size",
    "batch_seconds",
    "warnings",
    "float64_error",
    "reference_error",
    "ratio",
    "verdict",
    "targeted",
}
COND_ROW_KEYS = {
    "kappa",
    "dtype",
    "engine",
    "seeds",
    "float64_error_median",
    "error_median",
    "error_max",
    "ratio_median",
    "ratio_max",
    *robustness.COND_VERDICTS,
    "targeted",
    "not_following",
}


def test_conditioning_verdict_on_constructed_inputs():
    v, ratio = robustness.conditioning_verdict, robustness.conditioning_ratio
    # errors above the float32 floor (9.5e-7): the reference is float64's own error
    assert v(1.9e-3, 1e-3, "float32") == "follows"
    assert ratio(1.9e-3, 1e-3, "float32") == pytest.approx(1.9)
    assert v(2e-3, 1e-3, "float32") == "follows"  # exactly the ratio
    assert v(2.1e-3, 1e-3, "float32") == "lags"
    assert ratio(2.1e-3, 1e-3, "float32") == pytest.approx(2.1)
    assert v(math.nan, 1e-3, "float32") == "diverges" and ratio(math.nan, 1e-3, "float32") is None
    assert v(math.inf, 1e-3, "float32") == "diverges"
    assert v(None, 1e-3, "float32") == "diverges"  # the JSON's non-finite
    assert v(1.5, 1e-3, "float32") == "diverges"  # finite, but worse than the A = 0 start (1)
    assert v(0.9, 1e-3, "float32") == "lags"
    assert v(1e-3, 1e-3, "float32", exception="PSDNumericsError: x") == "raises"
    assert v(None, None, "float32", exception="RuntimeError: x") == "raises"
    # the reference did not train: no target, unless the run itself failed
    assert v(1e-3, None, "float32") == "n/a" and v(1e-3, 1.0, "float32") == "n/a"
    assert ratio(1e-3, None, "float32") is None
    assert v(math.nan, None, "float32") == "diverges"
    # float64 at its own rounding level: the reference is floored at FLOOR_ULPS u of the dtype
    floor32 = robustness.error_floor("float32")
    assert floor32 == robustness.FLOOR_ULPS * 2.0**-24
    assert robustness.conditioning_reference(3e-16, "float32") == floor32
    assert v(1.9 * floor32, 3e-16, "float32") == "follows"
    assert v(2.1 * floor32, 3e-16, "float32") == "lags"
    assert ratio(floor32, 3e-16, "float32") == 1.0
    assert robustness.error_floor("bfloat16") == robustness.FLOOR_ULPS * 2.0**-8
    assert robustness.error_floor("float64") == robustness.FLOOR_ULPS * 2.0**-53
    assert v(1.9e-15, 1e-15, "float64") == "follows"  # 1.9 x 16 u64


def _cond_record(kappa, seed, dtype, engine, final_error, exception=None):
    return dict(
        kappa=kappa,
        seed=seed,
        dtype=dtype,
        engine=engine,
        steps=10,
        final_error=final_error,
        exception=exception,
        steps_done=10,
        update_skips=0,
        nonfinite_skips=0,
        batch_size=1,
        batch_seconds=0.1,
        warnings=[],
    )


def test_conditioning_section_on_constructed_records(tmp_path):
    size = robustness.COND_SIZES["full"]
    records = []
    for kappa in size["kappas"]:
        for seed in range(size["seeds"]):
            records.append(_cond_record(kappa, seed, "float64", "qr", 1e-3))
            records.append(_cond_record(kappa, seed, "float64", "gram", 1e-3))
            records.append(_cond_record(kappa, seed, "float32", "qr", 1.5e-3))
            bad = kappa == 1e4 and seed == 1
            records.append(
                _cond_record(
                    kappa, seed, "float32", "gram", None if bad else 1e-3, "PSDNumericsError: eigh" if bad else None
                )
            )
            records.append(
                _cond_record(kappa, seed, "bfloat16", "qr", 0.5 if kappa == 1e4 else 0.05)
            )  # 0.05 < 2 x the bf16 floor (0.0625)
            records.append(_cond_record(kappa, seed, "bfloat16", "gram", math.nan if kappa == 1e4 else 0.3))
    section = robustness.conditioning_section(records, size)
    json.dumps(section, allow_nan=False)  # the NaN became None
    assert section["float32_follows_float64_by_engine"] == {"qr": True, "gram": False}
    assert section["float32_follows_float64"] is False
    rows = {(r["kappa"], r["dtype"], r["engine"]): r for r in section["rows"]}
    assert len(rows) == len(size["kappas"]) * 6 and set(section["rows"][0]) == COND_ROW_KEYS
    assert [(r["dtype"], r["engine"]) for r in section["rows"][:6]] == [
        (d, e) for d in robustness.COND_DTYPES for e in robustness.COND_ENGINES
    ]
    gram = rows[1e4, "float32", "gram"]
    assert gram["follows"] == 2 and gram["raises"] == 1 and gram["ratio_max"] == 1.0
    assert gram["not_following"] == ["seed 1: raises PSDNumericsError (step 11)"]
    assert rows[1e4, "bfloat16", "qr"]["lags"] == 3
    assert not rows[1e4, "bfloat16", "qr"]["targeted"]
    bf16_floor = robustness.error_floor("bfloat16")
    assert rows[1e4, "bfloat16", "qr"]["ratio_median"] == pytest.approx(0.5 / bf16_floor)
    assert rows[1e4, "bfloat16", "gram"]["diverges"] == 3
    assert rows[1e4, "bfloat16", "gram"]["not_following"][0] == "seed 0: diverges (non-finite)"
    assert rows[1e1, "bfloat16", "qr"]["follows"] == 3
    assert rows[1e1, "float32", "qr"]["ratio_median"] == 1.5
    table = robustness._conditioning_table(section)
    assert "float32 follows float64 (≤ 2×) in every cell: no** (qr: yes, gram: no)" in table
    assert "| 1e+04 | float32 | gram |" in table and "reported only" in table
    assert "seed 1: lags 5×" not in table and "seed 0: lags 8×" in table  # 0.5 / 0.0625
    ctx = RunContext(size="full", out=tmp_path, progress=False)
    path = robustness._conditioning_figure(section, ctx)
    assert (tmp_path / "robustness_conditioning.png").samefile(path)


def test_conditioning_sizes():
    full, default = robustness.COND_SIZES["full"], robustness.COND_SIZES["default"]
    assert full["kappas"] == [1e1, 1e2, 1e3, 1e4] and full["seeds"] >= 3
    assert full["steps"] >= 1000 and default["steps"] >= 1000
    assert full["dtypes"] == ["float64", "float32", "bfloat16"]
    assert full["engines"] == ["qr", "gram"]
    assert default["engines"] == ["qr"] and {"float64", "float32"} == set(default["dtypes"])
    assert max(default["kappas"]) == 1e4 and default["seeds"] >= 2
    quick = robustness.COND_SIZES["quick"]
    assert len(quick["kappas"]) == 1 and quick["seeds"] == 1 and quick["steps"] == 200
    assert quick["engines"] == ["qr"] and set(quick["dtypes"]) == {"float64", "float32"}


def test_conditioning_batch_equals_single_runs():
    # one optimizer over several cells is the same arithmetic as each cell alone
    cells = [(1e2, 0), (1e4, 1)]
    batch = robustness.fit_conditioning(cells, "float32", "qr", 15)
    singles = [robustness.fit_conditioning([c], "float32", "qr", 15) for c in cells]
    assert batch["errors"] == [s["errors"][0] for s in singles]
    assert batch["exception"] is None and batch["steps_done"] == 15
    assert 0 < batch["errors"][0] < 1  # it trains from the A = 0 start (error 1)


def test_conditioning_exception_is_charged_to_its_cell(monkeypatch):
    def fake(cells, dtype, engine, steps):
        bad = (1e4, 1) in cells
        return dict(
            errors=[None if bad else 0.1] * len(cells),
            update_skips=[0] * len(cells),
            nonfinite_skips=[0] * len(cells),
            steps_done=3 if bad else steps,
            exception="PSDNumericsError: x" if bad else None,
            seconds=0.0,
            warnings=[],
        )

    monkeypatch.setattr(robustness, "fit_conditioning", fake)
    recs = robustness.run_conditioning_batch([(1e2, 0), (1e4, 1), (1e4, 0)], "float32", "gram", 10)
    assert [(r["kappa"], r["seed"], r["exception"]) for r in recs] == [
        (1e2, 0, None),
        (1e4, 1, "PSDNumericsError: x"),
        (1e4, 0, None),
    ]
    assert [r["final_error"] for r in recs] == [0.1, None, 0.1]
    assert all(r["batch_size"] == 1 for r in recs)


def test_quick_conditioning(quick):
    section = quick.metrics["conditioning"]
    json.dumps(section, allow_nan=False)
    size = robustness.COND_SIZES["quick"]
    n = len(size["kappas"]) * size["seeds"] * len(size["dtypes"]) * len(size["engines"])
    assert len(section["cells"]) == n and len(section["rows"]) == n // size["seeds"]
    for r in section["cells"]:
        assert set(r) == COND_CELL_KEYS, set(r) ^ COND_CELL_KEYS
        assert r["steps_done"] == size["steps"] and r["exception"] is None
        assert r["verdict"] == robustness.conditioning_verdict(
            r["final_error"], r["float64_error"], r["dtype"], r["exception"]
        )
    for row in section["rows"]:
        assert set(row) == COND_ROW_KEYS
    (ref,) = [r for r in section["cells"] if (r["dtype"], r["engine"]) == ("float64", "qr")]
    assert ref["final_error"] < 0.1 and ref["verdict"] == "follows"  # the reference trains
    (f32,) = [r for r in section["cells"] if r["dtype"] == "float32"]
    assert f32["float64_error"] == ref["final_error"] and f32["targeted"]
    assert section["float32_follows_float64"] == (f32["verdict"] == "follows")
    assert section["float32_follows_float64_by_engine"] == {"qr": f32["verdict"] == "follows"}
    assert quick.config["conditioning"]["lr"] == robustness.COND_LR
    assert "### Conditioning sweep" in quick.table
    assert "float32 follows float64 (≤ 2×) in every cell" in quick.table
