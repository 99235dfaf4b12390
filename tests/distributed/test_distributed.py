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
        # row-wise state as DTensors (what DCP needs), the rest plain; torch.load(weights_only=True) loads both
        assert v["state_kinds"] == ["DTensor", "Tensor"]


DCP_TOL = 1e-12


@pytest.mark.parametrize("strategy", [name for name, _ in workers.DCP_STRATEGIES])
def test_dcp_checkpoint_resumes_into_a_fresh_fsdp2_model_at_any_world_size(_results, strategy):
    values = scenario(_results, "dcp")
    for rank, v in enumerate(values):
        res = v[strategy]
        # dcp.save of get_state_dict, dcp.load + set_state_dict into a fresh model and optimizer
        assert res["same_world"] <= DCP_TOL, f"rank {rank}: resumed run differs by {res['same_world']:.3g}"
        # row-wise state of the Shard(1) r×n factor is a DTensor; r×r state and counters stay plain
        kinds = res["kinds_pair2_b"]
        assert kinds["step"] == "Tensor" and "DTensor" in kinds.values()
        if strategy == "lora_rite":
            assert kinds["magnified_second_moment"] == "Tensor" and kinds["previous_factor"] == "DTensor"
    # the 2-rank checkpoint resharded onto one process (a mesh of size 1) continues the same way
    assert values[0][strategy]["world_1"] <= DCP_TOL


@pytest.mark.parametrize(
    "strategy, hp",
    [
        ("lora_rite", dict(engine="gram")),
        ("lora_rite", dict(balance=True)),
        ("lora_rite", dict(engine="gram", balance=True, escape=True, weight_decay=0.1)),
        ("scaled_gd", dict(momentum=0.9, weight_decay=0.1)),
        ("scaled_adam", dict(weight_decay=0.1)),
        ("one_sided_adagrad", {}),
    ],
)
def test_dcp_state_initializing_step_leaves_the_parameters_unchanged(strategy, hp):
    # get_state_dict / set_state_dict on a fresh optimizer take one step with zero gradients at lr=0
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    from lowrank_geom import LoRAPair, LowRankOptimizer

    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(10 * torch.randn(7, 3, generator=g, dtype=torch.float64))  # unbalanced pair
    b = torch.nn.Parameter(0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    before = [t.detach().clone() for t in (a, b, bias)]
    opt = LowRankOptimizer(
        [{"pairs": [LoRAPair(a, b, -1, 0)]}, {"params": [bias], "weight_decay": 0.1}], strategy=strategy, lr=1e-2, **hp
    )
    _init_optim_state(opt)
    assert opt.state[a] and opt.state[bias]
    assert all(torch.equal(x, y.detach()) for x, y in zip(before, (a, b, bias)))
    assert opt.param_groups[0]["lr"] == 1e-2


def test_row_wise_state_keys_are_read_from_the_strategy():
    from lowrank_geom import get_strategy
    from lowrank_geom.distributed import row_wise_keys
    from lowrank_geom.strategies.base import Strategy

    rite = get_strategy("lora_rite")
    hp = dict(rite.defaults, lr=1e-3, engine="gram", escape=True)
    both = frozenset({"magnified_exp_avg", "previous_factor"})
    assert row_wise_keys(rite, hp) == (both, both)  # not the r×r moment, r eigenvalues, ρ
    sgd = get_strategy("scaled_gd")
    assert row_wise_keys(sgd, dict(sgd.defaults, lr=1e-2, momentum=0.9)) == ({"momentum_buffer"},) * 2
    assert row_wise_keys(sgd, dict(sgd.defaults, lr=1e-2)) == (frozenset(), frozenset())

    class RowVector(Strategy):  # state indexed by rows but not (rows, r): cannot be sharded like A
        name = "_row_vector"

        def init(self, a, b, hp):
            return {"norms": a.new_zeros(a.shape[0])}, {}

    with pytest.raises(NotImplementedError, match="'norms' of factor A has shape \\(4,\\)"):
        row_wise_keys(RowVector(), {})


def test_sharded_state_into_an_unsharded_optimizer_raises_naming_the_fix(_results):
    for v in scenario(_results, "dcp"):
        err = v["into_plain"]
        assert err["type"] == "ValueError"
        for needle in ("as a DTensor", "plain tensor here", "fully_shard"):
            assert needle in err["message"], (needle, err["message"])


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

    a = torch.nn.Parameter(torch.zeros(8, 2))  # lora_B.weight: out×r, rank dim 1
    b = torch.nn.Parameter(torch.zeros(2, 6))  # lora_A.weight: r×in, rank dim 0
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
