"""``benchmarks.runner``: suites two at a time in processes, each result saying what ran beside it."""

from __future__ import annotations

import json

import pytest

from benchmarks import runner
from benchmarks.__main__ import ALL, POOL_ORDER
from benchmarks.common import RunContext


def test_the_pool_runs_every_suite_but_the_timed_ones(tmp_path, monkeypatch):
    seen = []

    def fake_pool(names, ctx):
        seen.extend(names)
        for n in names:
            yield runner.SuiteRun(n, 0.0, str(tmp_path / f"{n}.json"), "")

    monkeypatch.setattr(runner, "_pool", fake_pool)
    monkeypatch.setattr(runner, "workers", lambda names: 2)  # as on a machine of two cores or more
    monkeypatch.setattr(runner, "run_suite", lambda n, ctx, threads=None: runner.SuiteRun(n, 0.0, "", ""))
    ctx = RunContext(size="quick", out=tmp_path)
    order = sorted(ALL, key=lambda n: POOL_ORDER.index(n) if n in POOL_ORDER else len(POOL_ORDER))
    done = [r.name for r in runner.run_suites(order, ctx, parallel=True)]
    assert sorted(done) == sorted(ALL)
    assert seen == [n for n in order if n not in runner.ALONE] and set(POOL_ORDER) == set(ALL) - set(runner.ALONE)
    assert done[-len(runner.ALONE) :] == list(runner.ALONE)  # timed alone, after the pool


def test_two_pooled_suites_run_in_processes_and_record_each_other(tmp_path):
    ctx = RunContext(size="quick", out=tmp_path, command="python -m benchmarks all --quick", progress=False)
    names = ["invariance", "regret"]
    runs = list(runner._pool(names, ctx))
    assert {r.name for r in runs} == set(names)
    for name in names:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["run"]["alongside"] == [n for n in names if n != name]
        assert payload["meta"]["torch_threads"] == 1
        assert "one process each" in (tmp_path / f"{name}.md").read_text()


def test_one_core_runs_every_suite_in_order_with_nothing_alongside(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "workers", lambda names: 1)
    monkeypatch.setattr(runner, "_pool", lambda names, ctx: pytest.fail("no pool on one core"))
    monkeypatch.setattr(runner, "run_suite", lambda n, ctx, threads=None: runner.SuiteRun(n, 0.0, "", ""))
    done = [r.name for r in runner.run_suites(list(ALL), RunContext(size="quick", out=tmp_path), parallel=True)]
    assert done == list(ALL)
