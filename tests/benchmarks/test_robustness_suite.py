"""The ``robustness`` suite: verdict logic, the ``--quick`` cell end to end, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import robustness
from benchmarks.__main__ import ALL, SUITES, main
from benchmarks.common import RunContext

pytest.importorskip("peft")
pytest.importorskip("pytorch_optimizer")

CELL_KEYS = {"optimizer", "init", "setup", "dtype", "lr", "seed", "initial_loss", "final_loss",
             "adamw_final_loss", "adamw_trains", "verdict", "error", "steps_done", "seconds",
             "warnings"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ctx = RunContext(size="quick", out=tmp_path_factory.mktemp("robustness"), progress=False)
    return robustness.run(ctx)


def test_verdicts_on_constructed_inputs():
    v = robustness.verdict
    assert v(0.14, 0.1, 1.0) == "trains"  # 1.4x AdamW
    assert v(0.15, 0.1, 1.0) == "trains"  # exactly the ratio
    assert v(0.2, 0.1, 1.0) == "diverges"  # 2x AdamW, though below the initial loss
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
        return dict(optimizer=name, init="peft_default", setup="2class", dtype="float32", lr=1e-3,
                    seed=0, verdict=verdict, adamw_trains=adamw_trains, error=kw.get("error"),
                    final_loss=kw.get("final"), initial_loss=1.0, adamw_final_loss=0.2)

    records = [rec("a", "trains", True), rec("a", "raises", False, error="E: x"),
               rec("b", "trains", True), rec("b", "diverges", True, final=0.5)]
    s = robustness.summarize(records, ["a", "b"])
    assert s["a"]["trains_where_adamw_trains"] and s["a"]["raises"] == 1
    assert s["a"]["failing"] == ["peft_default/2class/float32/lr=0.001 (raises E: x) †"]
    assert not s["b"]["trains_where_adamw_trains"] and s["b"]["diverges"] == 1
    assert s["b"]["failing"] == ["peft_default/2class/float32/lr=0.001 (diverges: 2.5× AdamW)"]


def test_sizes_cover_the_grid():
    full = robustness.SIZES["full"]
    assert full["inits"] == list(robustness.INITS) and full["setups"] == list(robustness.SETUPS)
    assert full["dtypes"] == ["float32", "bfloat16", "float64"]
    assert full["lrs"] == [1e-4, 1e-3, 1e-2]
    assert full["seeds"] >= 2 and full["optimizers"] is None  # None: every optimizer
    default = robustness.SIZES["default"]
    assert default["inits"] == ["peft_default"] and default["setups"] == ["2class"]
    assert default["dtypes"] == full["dtypes"] and default["lrs"] == full["lrs"]
    assert {"lora_rite", "scaled_gd", *robustness.BASELINES} == set(default["optimizers"])


def test_full_size_report_on_constructed_records(tmp_path):
    # the >30-cell path (failures by axis, a wide heatmap) without running the full grid
    size = dict(robustness.SIZES["full"], seeds=1)
    records = []
    for init in size["inits"]:
        for setup in size["setups"]:
            for lr in size["lrs"]:
                for name in ("adamw", "lora_rite"):
                    bad = name == "lora_rite" and setup == "2class"
                    records.append(dict(
                        optimizer=name, init=init, setup=setup, dtype="float32", lr=lr, seed=0,
                        verdict="raises" if bad else "trains", adamw_trains=True,
                        error="PSDNumericsError: x" if bad else None,
                        final_loss=None if bad else 0.3, initial_loss=1.0, adamw_final_loss=0.3))
    names = ["lora_rite", "adamw"]
    summary = robustness.summarize(records, names)
    table = robustness._table(records, summary, names, dict(size, dtypes=["float32"]))
    assert "### Failing runs by axis" in table and "### Final losses" not in table
    n = len(size["inits"]) * len(size["lrs"])  # runs per set-up
    trains = n * (len(size["setups"]) - 1)
    assert f"| lora_rite | {trains} | 0 | {n} | 0 | no |" in table
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
        assert r["verdict"] == robustness.verdict(r["final_loss"], r["adamw_final_loss"],
                                                  r["initial_loss"], r["error"])
        assert (r["error"] is None) == (r["verdict"] != "raises")
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
    assert len(quick.figures) == 1 and quick.figures[0].endswith("robustness_verdicts.png")
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
    monkeypatch.setitem(robustness.SIZES, "quick",
                        dict(robustness.SIZES["quick"], steps=3, optimizers=["adamw"]))
    assert main(["robustness", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "robustness.json").read_text())
    assert payload["suite"] == "robustness" and payload["run"]["size"] == "quick"
    assert [r["optimizer"] for r in payload["metrics"]["cells"]] == ["adamw"]
    assert (tmp_path / "robustness.md").exists()
    assert (tmp_path / "robustness_verdicts.png").exists()
