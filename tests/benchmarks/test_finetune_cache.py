"""The fine-tune run cache: resuming, keys, and one commit per published result."""

from __future__ import annotations

import os

import pytest

from benchmarks import finetune
from benchmarks.common import ROOT


def _compute(calls, tag, acc=1.0):
    def f():
        calls.append(tag)
        return {"acc": acc}

    return f


def test_runs_of_another_commit_are_refused_or_flagged(tmp_path):
    cfg = dict(finetune.SIZES["quick"], model="m")
    calls = []
    finetune.RunCache(tmp_path, cfg, sha="aaa").run("adamw", 0.1, 0, 1.0, _compute(calls, "a"))
    later = finetune.RunCache(tmp_path, cfg, sha="bbb")
    with pytest.raises(finetune.MixedCommitsError, match="made at commit aaa"):
        later.run("adamw", 0.1, 0, 1.0, _compute(calls, "again"))
    mixed = finetune.RunCache(tmp_path, cfg, allow_mixed=True, sha="bbb")
    assert mixed.run("adamw", 0.1, 0, 1.0, _compute(calls, "again")) == {"acc": 1.0} and calls == ["a"]
    mixed.run("adamw", 0.1, 1, 1.0, _compute(calls, "b"))
    summary = mixed.summary()
    assert summary["runs_by_commit"] == {"aaa": 1, "bbb": 1} and summary["single_clean_commit"] is False
    same = finetune.RunCache(tmp_path, cfg, sha="aaa")
    same.run("adamw", 0.1, 0, 1.0, _compute(calls, "never"))
    assert same.single_clean_commit and same.summary()["runs_by_commit"] == {"aaa": 1}


def test_an_uncommitted_tree_does_not_cache_runs_unless_allowed(tmp_path):
    cfg = dict(finetune.SIZES["quick"], model="m")
    calls = []
    with pytest.raises(finetune.MixedCommitsError, match="uncommitted changes"):
        finetune.RunCache(tmp_path, cfg, sha="aaa+dirty").run("adamw", 0.1, 0, 1.0, _compute(calls, "a"))
    assert calls == [] and not list(tmp_path.glob("*.json"))
    flagged = finetune.RunCache(tmp_path, cfg, allow_mixed=True, sha="aaa+dirty")
    flagged.run("adamw", 0.1, 0, 1.0, _compute(calls, "a"))
    assert calls == ["a"] and not flagged.single_clean_commit
    # without a cache directory nothing is kept, so nothing is refused
    assert finetune.RunCache(None, cfg, sha="aaa+dirty").run("adamw", 0.1, 0, 1.0, _compute(calls, "b"))


def test_summary_records_the_directory_relative_to_the_checkout(tmp_path):
    cache = finetune.RunCache(tmp_path / "runs", dict(finetune.SIZES["quick"], model="m"), sha="aaa")
    directory = cache.summary()["directory"]
    assert not os.path.isabs(directory) and os.path.samefile(ROOT / directory, tmp_path / "runs")
    assert finetune.RunCache(None, dict(finetune.SIZES["quick"], model="m"), sha="aaa").summary() is None


def test_a_run_asked_for_twice_is_computed_once_across_protocols(tmp_path):
    cfg = dict(finetune.SIZES["quick"], model="m")
    calls = []
    cache = finetune.RunCache(None, cfg, sha="aaa")
    short = cache.with_protocol(dict(cfg, steps=cfg["steps"] // 2))
    for c in (cache, cache, short, short):
        c.run("lora_rite", 0.1, 0, 10.0, _compute(calls, "x"))
    assert calls == ["x", "x"] and cache.new == short.new == 2  # one per protocol; the counts are shared
