"""LowRankOptimizer under FSDP2 (row-sharded DTensor factors) and DDP, with 2 CPU gloo processes.

The two processes are spawned once for this module (``_results``; under pytest-xdist the first
worker that needs them spawns them, the other waits for the same results) and run every scenario
of :mod:`tests.distributed.workers`; each test asserts on one scenario's results from both
ranks. Run the scenarios by hand, with a summary of the communication volume, with
``python -m tests.distributed.workers``.
"""

from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

from tests.distributed import workers

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
TOL = 1e-6


@pytest.fixture(scope="module")
def _results(tmp_path_factory) -> list[dict]:
    # under xdist, the base temp dir's parent is shared by all workers of one run (and only them)
    base = tmp_path_factory.getbasetemp()
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = (base.parent / f"lowrank_geom_distributed_{run}") if run else (base / "lowrank_geom_distributed")
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = root / "done"
            if not done.exists():
                import torch.multiprocessing as mp

                init = root / "init"
                if init.exists():
                    init.unlink()
                mp.spawn(workers.run_all, args=(WORLD, str(init), str(root)), nprocs=WORLD, join=True)
                done.write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return [json.loads((root / f"rank{k}.json").read_text()) for k in range(WORLD)]


def scenario(results: list[dict], name: str) -> list[dict]:
    """One scenario's value on every rank; fails with the rank's traceback if it raised."""
    values = []
    for rank, res in enumerate(results):
        entry = res[name]
        if not entry["ok"]:
            pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{entry['error']}")
        values.append(entry["value"])
    return values


FSDP = [label for label, *_ in workers.STRATEGIES]


@pytest.mark.parametrize("label", FSDP)
def test_fsdp_row_sharded_trajectory_equals_single_process(_results, label):
    values = scenario(_results, f"fsdp_{label}")
    for rank, v in enumerate(values):
        err = v["max_rel_err"]
        assert err <= TOL, f"rank {rank}: max relative error {err:.3g} over {workers.STEPS} steps"
        assert v["every_factor_moved"]
    # the set-up really has uneven shards, an empty shard and a Shard(1) (lora_A-style) factor
    shapes = [v["local_shapes"] for v in values]
    assert shapes[0] != shapes[1] and [0, 1] in shapes[1]
    assert "(Shard(dim=1),)" in values[0]["placements"]


@pytest.mark.parametrize("label", FSDP)
def test_fsdp_step_all_reduces_only_r_by_r_tensors(_results, label):
    for v in scenario(_results, f"fsdp_{label}"):
        assert v["other_collectives"] == [], "the optimizer step must use no collective but small all-reduces"
        # four byte counts at most, over both sizes: in the steps where they act (data-dependent)
        # LoRA-RITE's relative-change cap reduces one more r×r Gram per capped factor and its
        # rebalancing two float64 r×r Grams per batch; independent of the row counts m, n: the
        # same pairs with 8× the rows all-reduce as much
        per_step = set(v["bytes_per_step"]) | set(v["bytes_per_step_big"])
        assert len(per_step) <= 4, "the same bytes every step, up to the safeguards' extra Grams"
        # O(pairs · r²): at most 16 r×r (or smaller) float64 reductions per pair and step
        for nbytes in per_step:
            assert 0 < nbytes <= 16 * (v["sum_r2"] + v["pairs"]) * 8
            assert nbytes < v["param_bytes_big"]


@pytest.mark.parametrize("label", [label for label, *_ in workers.DDP_STRATEGIES])
def test_ddp_ranks_stay_bit_identical(_results, label):
    for v in scenario(_results, f"ddp_{label}"):
        assert v["bit_identical"], "DDP ranks diverged: the optimizer step is not deterministic"
        assert v["max_rel_err"] <= TOL


def test_unsupported_layouts_raise_clear_errors(_results):
    for v in scenario(_results, "errors"):
        rank_dim = v["rank_dim"]
        assert rank_dim["type"] == "ValueError"
        for needle in ("pair2", "factor B", "rank dim 0", "shard_placement_fn", "Shard(1)", "row_shard_placement"):
            assert needle in rank_dim["message"], (needle, rank_dim["message"])
        assert v["hsdp_placements"] == "(Replicate(), Shard(dim=0))"
        assert v["hsdp"]["type"] == "ValueError" and "2-D device mesh" in v["hsdp"]["message"]
        assert v["mixed"]["type"] == "ValueError" and "laid out alike" in v["mixed"]["message"]
        strat = v["strategy"]
        assert strat["type"] == "NotImplementedError"
        assert "'one_sided_adagrad' does not support row sharding" in strat["message"]


def test_nonfinite_gradient_on_one_shard_skips_the_pair_on_every_rank(_results):
    for v in scenario(_results, "nonfinite"):
        assert v["skips"] == 1 and v["pair0_unchanged"] and v["others_moved"]
        assert v["raised"] == "non-finite gradient in pair0"  # nonfinite="raise": on every rank


def test_replicated_dtensor_factors_step_like_plain_tensors(_results):
    for v in scenario(_results, "replicated"):
        assert v["bit_identical"]


def test_per_rank_state_dict_resumes_bit_identically(_results):
    for v in scenario(_results, "checkpoint"):
        assert v["bit_identical"]
        assert v["state_kinds"] == ["Tensor"]  # local shards as plain tensors (weights_only loads)


def test_distributed_module_keeps_working_without_a_process_group():
    # a plain single-process optimizer never touches torch.distributed
    from lowrank_geom import LowRankOptimizer
    from lowrank_geom.distributed import LOCAL, pair_layout
    from lowrank_geom.pairs import LoRAPair

    a = torch.randn(5, 2, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    assert pair_layout(LoRAPair(a, b), "p") == LOCAL
    assert not torch.distributed.is_initialized()
    opt = LowRankOptimizer([(a, b)], strategy="scaled_gd", lr=1e-2)
    (a @ b.T).square().sum().backward()
    opt.step()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("strategy", [name for name, _ in workers.PEFT_STRATEGIES])
def test_peft_recipe_with_fully_shard(_results, strategy):
    for v in scenario(_results, "peft"):
        if "skipped" in v:
            pytest.skip(v["skipped"])
        res = v[strategy]
        assert "error" not in res, res.get("error")
        # lora_B.weight (out×r) keeps Shard(0); lora_A.weight (r×in) is sharded Shard(1)
        assert res["placements"][:2] == ["(Shard(dim=0),)", "(Shard(dim=1),)"]
        assert len(res["fallback"]) == 2  # the two biases, as DTensors in the AdamW fallback group
        assert res["max_rel_err"] <= TOL


def test_row_shard_placement_shards_each_factor_on_its_first_row_dim():
    from torch.distributed.tensor import Shard

    from lowrank_geom import LoRAPair
    from lowrank_geom.distributed import row_shard_placement

    a = torch.nn.Parameter(torch.zeros(8, 2))        # lora_B.weight: out×r, rank dim 1
    b = torch.nn.Parameter(torch.zeros(2, 6))        # lora_A.weight: r×in, rank dim 0
    conv = torch.nn.Parameter(torch.zeros(2, 3, 3, 3))  # conv lora_A: r×in×kh×kw
    other = torch.nn.Parameter(torch.zeros(4, 4))
    placement = row_shard_placement([LoRAPair(a, b, 1, 0), LoRAPair(torch.zeros(5, 2), conv, -1, 0)])
    assert placement(a) == Shard(0) and placement(b) == Shard(1) and placement(conv) == Shard(1)
    assert placement(other) is None  # FSDP2's default


def test_row_sharding_requirements_name_the_hyperparameters():
    from lowrank_geom import get_strategy
    from lowrank_geom.distributed import row_sharding_requirements

    rite = get_strategy("lora_rite")
    defaults = dict(rite.defaults, lr=1e-3)
    # engine='auto' is the QR engine in every dtype: on shards LoRA-RITE must ask for the Gram one
    for dtype in (None, torch.float32, torch.bfloat16, torch.float64):
        assert "engine='gram'" in " ".join(row_sharding_requirements(rite, defaults, dtype))
        # the authors' other defaults run on shards
        assert row_sharding_requirements(rite, dict(defaults, engine="gram"), dtype) == []
    assert row_sharding_requirements(rite, dict(defaults, **workers.RITE_SHARDABLE)) == []
    assert "engine='gram'" in " ".join(row_sharding_requirements(rite, dict(defaults, engine="qr")))
    assert row_sharding_requirements(get_strategy("one_sided_adagrad"), {}) is None
