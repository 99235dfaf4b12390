"""What each of the 2 gloo processes runs for ``tests/distributed/test_distributed.py``.

The processes are started once per test module (``torch.multiprocessing.spawn``; start-up is
most of the cost). Each runs every scenario below in turn and writes a JSON-able result per
scenario and rank; the tests then only assert on those results. A scenario that raises is
recorded with its traceback, so one failure does not hide the others. Every reference
trajectory is computed in the same process on plain tensors (no collectives), in float64.

Set-up shared by the scenarios (``SPECS``): four pairs, ``r`` = 3 except the last (``r`` = 1),

- two same-shape pairs ``A: 7×3``, ``B: 5×3`` (stacked in one batch; 7 and 5 rows split 4/3 and
  3/2: uneven shards);
- a PEFT-style pair: ``A: 9×3`` initialised to zero, ``B`` stored ``3×6`` (rank dim 0, like
  ``lora_A.weight``), sharded ``Shard(1)`` by :func:`lowrank_geom.distributed.row_shard_placement`;
- ``A: 1×1``, ``B: 4×1``: rank 1's shard of ``A`` is empty.

The loss on rank ``k`` at step ``t`` is ``s Σ_i ‖W_i^{(k,t)} ⊙ (A_i B_iᵀ − T_i)‖²`` with random
positive weights ``W``; FSDP2 and DDP average the gradients over ranks, so the reference
minimises the mean over ranks of the same losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

DTYPE = torch.float64
STEPS = 20
# small enough that LoRA-RITE's update skipping (unmagnified gradient RMS > 1) never fires, so
# every pair moves every step
LOSS_SCALE = 0.02
# (m, n, r, zero A, B stored r×n (rank dim 0))
SPECS = [(7, 5, 3, False, False), (7, 5, 3, False, False), (9, 6, 3, True, True), (1, 4, 1, False, False)]
# the same pairs with every row dim 8× larger: the all-reduced bytes must not change
BIG_SPECS = [(8 * m, 8 * n, r, z, t) for m, n, r, z, t in SPECS]
# strategies whose sharded trajectories must equal single-process ones: (label, strategy, hp)
# row shards need LoRA-RITE's Gram engine (engine='auto' is the QR engine, which factorizes each factor)
RITE_GRAM = dict(engine="gram")
# the options with global row counts off, so the other options are checked on their own
RITE_SHARDABLE = dict(row_normalize=False, update_skipping=0.0, **RITE_GRAM)
STRATEGIES = [
    ("lora_rite", "lora_rite", dict(lr=2e-2, **RITE_GRAM)),  # the authors' defaults
    # the paper's Algorithm 1 (escaped mass, summed second moment, no clipping)
    (
        "lora_rite_alg1",
        "lora_rite",
        dict(
            lr=2e-2,
            escape=True,
            second_moment="sum",
            bias_correction=False,
            clip_unmagnified_grad=0.0,
            **RITE_SHARDABLE,
        ),
    ),
    # EMA moments, global clipping over the group, norm balancing
    ("lora_rite_ema", "lora_rite", dict(lr=2e-2, balance=True, **RITE_SHARDABLE)),
    ("scaled_gd", "scaled_gd", dict(lr=5e-2)),
    ("scaled_gd_momentum", "scaled_gd", dict(lr=5e-2, momentum=0.9, delta=1e-3, weight_decay=1e-2)),
    ("scaled_adam", "scaled_adam", dict(lr=1e-2, delta=1e-3)),
    # realigned momentum: the overlap Grams A_{t-1}ᵀA_t and B_tᵀB_{t+1} are row sums too
    ("altlora", "altlora", dict(lr=5e-2, weight_decay=1e-2)),
    ("altlora_simultaneous", "altlora", dict(lr=5e-2, weight_decay=1e-2, alternate=False)),
    ("gram_test", "_test_gram_scaled_gd", dict(lr=5e-2)),
]
PEFT_STRATEGIES = [
    ("_test_gram_scaled_gd", dict(lr=5e-2)),
    ("lora_rite", dict(lr=2e-2, **RITE_SHARDABLE)),
    ("scaled_gd", dict(lr=5e-2)),
]
DDP_STRATEGIES = [("lora_rite", "lora_rite", dict(lr=2e-2)), ("scaled_gd", "scaled_gd", dict(lr=5e-2))]


# ------------------------------------------------------------------------------ test strategy
def register_test_strategy() -> None:
    """A Gram-based ScaledGD with momentum and a group-wide gradient clip, declared row-shardable.

    It exercises every kind of row sum the driver must complete (``r×r`` Grams, per-pair
    scalars, a reduction over all batches of a group, the global row count) and row-indexed
    plus ``r×r`` state, independently of how the built-in strategies are written.
    """
    from lowrank_geom.strategies.base import PairUpdate, Strategy, register

    class GramScaledGD(Strategy):
        name = "_test_gram_scaled_gd"
        defaults = dict(delta=1e-3, momentum=0.5, clip=1.0)

        def row_sharding_requirements(self, hp, dtype=None):
            return []  # every row sum goes through row_reduce, for every hyperparameter

        def validate(self, hp: dict[str, Any]) -> None:
            pass

        def init(self, a, b, hp):
            r = a.shape[-1]
            return {"buf": torch.zeros_like(a), "gram": a.new_zeros(r, r)}, {"buf": torch.zeros_like(b)}

        def update(self, batches, hp):
            sq = None
            for batch in batches:
                part = batch.row_reduce(batch.grad_a.square().sum((1, 2)) + batch.grad_b.square().sum((1, 2))).sum()
                sq = part if sq is None else sq + part
            scale = torch.clamp(hp["clip"] / sq.sqrt(), max=1.0)
            out = []
            for batch in batches:
                r = batch.a.shape[-1]
                eye = torch.eye(r, dtype=batch.a.dtype)
                rows = batch.row_reduce(torch.tensor(float(batch.a.shape[-2]), dtype=batch.a.dtype))
                gram_a = batch.row_reduce(batch.a.mT @ batch.a)
                gram_b = batch.row_reduce(batch.b.mT @ batch.b)
                d_a = scale * batch.grad_a @ torch.linalg.inv(gram_b + hp["delta"] * eye)
                d_b = scale * batch.grad_b @ torch.linalg.inv(gram_a / rows * 7.0 + hp["delta"] * eye)
                d_a = hp["momentum"] * batch.state_a["buf"] + d_a
                d_b = hp["momentum"] * batch.state_b["buf"] + d_b
                new_a = {"buf": d_a, "gram": gram_a}
                out.append(PairUpdate(-hp["lr"] * d_a, -hp["lr"] * d_b, new_a, {"buf": d_b}))
            return out

    register(GramScaledGD)


# ------------------------------------------------------------------------------------ problem
def init_tensors(specs, seed: int = 0) -> list[torch.Tensor]:
    """Initial factors in stored layout: A (m, r), B (n, r) or (r, n)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n, r, zero_a, b_transposed in specs:
        a = torch.zeros(m, r, dtype=DTYPE) if zero_a else torch.randn(m, r, generator=g, dtype=DTYPE)
        b = torch.randn(n, r, generator=g, dtype=DTYPE)
        out += [a, b.T.contiguous() if b_transposed else b]
    return out


def targets(specs, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g, dtype=DTYPE) for m, n, *_ in specs]


def weights(specs, rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank + 7)
    return [0.5 + torch.rand(m, n, generator=g, dtype=DTYPE) for m, n, *_ in specs]


def loss_of(specs, params, tgts, wts) -> torch.Tensor:
    loss = 0.0
    for i, (_m, _n, _r, _z, b_transposed) in enumerate(specs):
        a, b = params[2 * i], params[2 * i + 1]
        b = b.T if b_transposed else b
        loss = loss + (wts[i] * (a @ b.T - tgts[i])).square().sum()
    return LOSS_SCALE * loss


class PairModel(torch.nn.Module):
    """The factors as parameters ``a0, b0, a1, ...``; ``forward`` returns one rank's loss."""

    def __init__(self, specs, tensors):
        super().__init__()
        self.specs = specs
        self.factors = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tensors])

    def forward(self, tgts, wts):
        return loss_of(self.specs, list(self.factors), tgts, wts)


def lora_pairs_of(specs, params) -> list:
    from lowrank_geom import LoRAPair

    return [
        LoRAPair(params[2 * i], params[2 * i + 1], -1, 0 if s[4] else -1, name=f"pair{i}") for i, s in enumerate(specs)
    ]


def reference(specs, strategy: str, hp: dict, world: int, steps: int = STEPS) -> list[list[torch.Tensor]]:
    """Single-process trajectory (factors after every step) on the mean of the ranks' losses."""
    from lowrank_geom import LowRankOptimizer

    params = [torch.nn.Parameter(t.clone()) for t in init_tensors(specs)]
    opt = LowRankOptimizer(lora_pairs_of(specs, params), strategy=strategy, **hp)
    tgts, out = targets(specs), []
    for step in range(steps):
        opt.zero_grad()
        loss = sum(loss_of(specs, params, tgts, weights(specs, k, step)) for k in range(world)) / world
        loss.backward()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖``; ``inf`` if either is non-finite (``max`` would drop a NaN)."""
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


# ------------------------------------------------------------------------------ communication
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
)


@contextlib.contextmanager
def count_collectives():
    """Counts the bytes passed to ``torch.distributed.all_reduce`` and the calls of every other
    collective while active (the optimizer must use all-reduces of small tensors only)."""
    import torch.distributed as dist

    log: dict[str, Any] = {"all_reduce_bytes": [], "other": []}
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, fn):
        def counted(tensor, *args, **kwargs):
            if name == "all_reduce":
                log["all_reduce_bytes"].append(tensor.numel() * tensor.element_size())
            else:
                log["other"].append(name)
            return fn(tensor, *args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------------------------- scenarios
def _fsdp_model(specs, placement_fn=None, mesh=None):
    from torch.distributed.fsdp import fully_shard

    model = PairModel(specs, init_tensors(specs))
    if placement_fn is None:
        from lowrank_geom.distributed import row_shard_placement

        placement_fn = row_shard_placement(lora_pairs_of(specs, list(model.factors)))
    fully_shard(model, shard_placement_fn=placement_fn, mesh=mesh)
    return model


def sharded_run(specs, strategy: str, hp: dict, rank: int, steps: int, after_step=None) -> list[dict]:
    """``steps`` FSDP2 steps; the collectives of each ``opt.step()`` (``count_collectives`` logs).

    ``after_step(step, params)`` is called after each step with the (DTensor) factors.
    """
    from lowrank_geom import LowRankOptimizer

    model = _fsdp_model(specs)
    params = list(model.factors)
    opt = LowRankOptimizer(lora_pairs_of(specs, params), strategy=strategy, **hp)
    tgts, logs = targets(specs), []
    for step in range(steps):
        opt.zero_grad()
        model(tgts, weights(specs, rank, step)).backward()
        with count_collectives() as log:
            opt.step()
        logs.append(log)
        if after_step is not None:
            after_step(step, params)
    return logs


def fsdp_trajectory(rank: int, world: int, strategy: str, hp: dict) -> dict:
    """FSDP2 row-sharded run vs the single-process reference; bytes all-reduced per step."""
    ref = reference(SPECS, strategy, hp, world)
    worst, shards = [0.0], {}

    def compare(step, params):
        full = [p.full_tensor().detach() for p in params]
        worst[0] = max(worst[0], max(rel_err(x, y) for x, y in zip(full, ref[step])))
        shards.update(
            local_shapes=[tuple(p.to_local().shape) for p in params],
            placements=[str(tuple(p.placements)) for p in params],
        )

    comm = sharded_run(SPECS, strategy, hp, rank, STEPS, compare)
    moved = all(not torch.equal(x, y) for x, y in zip(ref[-1], init_tensors(SPECS)))
    # the same pairs with 8× the rows: a few steps, to compare the all-reduced bytes
    comm_big = sharded_run(BIG_SPECS, strategy, hp, rank, 3)

    def nbytes(specs):
        return sum((m + n) * r for m, n, r, *_ in specs) * torch.finfo(DTYPE).bits // 8

    return dict(
        max_rel_err=worst[0],
        every_factor_moved=moved,
        bytes_per_step=[sum(c["all_reduce_bytes"]) for c in comm],
        calls_per_step=[len(c["all_reduce_bytes"]) for c in comm],
        other_collectives=sorted({o for c in comm + comm_big for o in c["other"]}),
        bytes_per_step_big=[sum(c["all_reduce_bytes"]) for c in comm_big],
        param_bytes=nbytes(SPECS),
        param_bytes_big=nbytes(BIG_SPECS),
        pairs=len(SPECS),
        sum_r2=sum(s[2] ** 2 for s in SPECS),
        **shards,
    )


def ddp_trajectory(rank: int, world: int, strategy: str, hp: dict) -> dict:
    """DDP (replicated factors, different data per rank): ranks must stay bit-identical."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_geom import LowRankOptimizer

    model = PairModel(SPECS, init_tensors(SPECS))
    ddp = DistributedDataParallel(model)
    params = list(model.factors)
    opt = LowRankOptimizer(lora_pairs_of(SPECS, params), strategy=strategy, **hp)
    ref = reference(SPECS, strategy, hp, world)
    tgts = targets(SPECS)
    worst, identical = 0.0, True
    for step in range(STEPS):
        opt.zero_grad()
        ddp(tgts, weights(SPECS, rank, step)).backward()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = identical and all(torch.equal(gathered[0], g) for g in gathered)
        worst = max(worst, max(rel_err(p.detach(), y) for p, y in zip(params, ref[step])))
    return dict(bit_identical=identical, max_rel_err=worst, steps=STEPS)


def _error_of(fn: Callable[[], Any]) -> dict:
    try:
        fn()
    except Exception as err:
        return dict(type=type(err).__name__, message=str(err))
    return dict(type=None, message="no error")


def layout_errors(rank: int, world: int) -> dict:
    """Unsupported layouts raise at construction (on every rank, before any collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_geom import LowRankOptimizer

    out = {}
    # FSDP2's default Shard(0) on a PEFT-style B stored r×n shards the rank dim (with any strategy)
    default = _fsdp_model(SPECS, placement_fn=lambda p: None)
    out["rank_dim"] = _error_of(
        lambda: LowRankOptimizer(lora_pairs_of(SPECS, list(default.factors)), strategy="_test_gram_scaled_gd", lr=1e-2)
    )
    # HSDP: a 2-D (replicate × shard) mesh
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    hsdp = _fsdp_model(SPECS[:1], mesh=mesh2d)
    out["hsdp"] = _error_of(
        lambda: LowRankOptimizer(lora_pairs_of(SPECS[:1], list(hsdp.factors)), strategy="_test_gram_scaled_gd", lr=1e-2)
    )
    out["hsdp_placements"] = str(tuple(hsdp.factors[0].placements))
    # A sharded, B a plain tensor
    mesh = init_device_mesh("cpu", (world,))
    a = torch.nn.Parameter(distribute_tensor(torch.randn(7, 3, dtype=DTYPE), mesh, [Shard(0)]))
    b = torch.nn.Parameter(torch.randn(5, 3, dtype=DTYPE))
    out["mixed"] = _error_of(lambda: LowRankOptimizer([(a, b)], strategy="_test_gram_scaled_gd", lr=1e-2))
    # a strategy that does not declare row-sharding support
    model = _fsdp_model(SPECS)
    out["strategy"] = _error_of(
        lambda: LowRankOptimizer(lora_pairs_of(SPECS, list(model.factors)), strategy="one_sided_adagrad", lr=1e-2)
    )
    return out


def replicated_dtensors(rank: int, world: int) -> dict:
    """``Replicate()`` DTensor factors (with Replicate gradients) step exactly like plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from lowrank_geom import LowRankOptimizer

    mesh = init_device_mesh("cpu", (world,))
    init = init_tensors(SPECS[:1])
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(t.shape, generator=g, dtype=DTYPE) for t in init] for _ in range(3)]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    dts = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Replicate()])) for t in init]
    opts = [LowRankOptimizer([tuple(ps)], strategy="lora_rite", lr=1e-2) for ps in (plain, dts)]
    for step_grads in grads:
        for p, q, gr in zip(plain, dts, step_grads):
            p.grad = gr.clone()
            q.grad = distribute_tensor(gr.clone(), mesh, [Replicate()])
        for opt in opts:
            opt.step()
    return dict(bit_identical=all(torch.equal(p.detach(), q.to_local().detach()) for p, q in zip(plain, dts)))


def nonfinite_skip(rank: int, world: int) -> dict:
    """A non-finite gradient on one rank's shard only: every rank skips that pair."""
    from lowrank_geom import LowRankOptimizer

    model = _fsdp_model(SPECS)
    params = list(model.factors)
    opt = LowRankOptimizer(lora_pairs_of(SPECS, params), strategy="_test_gram_scaled_gd", lr=5e-2)
    tgts = targets(SPECS)
    for step in range(2):
        opt.zero_grad()
        model(tgts, weights(SPECS, rank, step)).backward()
        if step == 1 and rank == 1:
            params[0].grad.to_local()[0, 0] = float("inf")
        before = [p.full_tensor().detach() for p in params]
        opt.step()
    after = [p.full_tensor().detach() for p in params]
    # nonfinite="raise": every rank raises, naming the pair, though only rank 1's shard is bad
    raised = None
    opt_raise = LowRankOptimizer(
        lora_pairs_of(SPECS, params), strategy="_test_gram_scaled_gd", lr=5e-2, nonfinite="raise"
    )
    opt_raise.zero_grad()
    model(tgts, weights(SPECS, rank, 2)).backward()
    if rank == 1:
        params[0].grad.to_local()[0, 0] = float("nan")
    try:
        opt_raise.step()
    except FloatingPointError as err:
        raised = str(err)
    return dict(
        raised=raised,
        skips=opt.nonfinite_skips(),
        pair0_unchanged=bool(torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])),
        others_moved=all(not torch.equal(x, y) for x, y in zip(before[2:], after[2:]) if y.abs().sum() > 0),
    )


def checkpoint_resume(rank: int, world: int) -> dict:
    """Per-rank ``state_dict`` (local shards) saved mid-run and loaded: the run continues exactly."""
    import io

    from lowrank_geom import LowRankOptimizer

    def make():
        model = _fsdp_model(SPECS)
        opt = LowRankOptimizer(lora_pairs_of(SPECS, list(model.factors)), strategy="_test_gram_scaled_gd", lr=5e-2)
        return model, opt

    def steps(model, opt, start, stop):
        tgts = targets(SPECS)
        for step in range(start, stop):
            opt.zero_grad()
            model(tgts, weights(SPECS, rank, step)).backward()
            opt.step()

    model, opt = make()
    steps(model, opt, 0, 10)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.to_local().clone() for p in model.factors]
    state_kinds = sorted({type(v).__name__ for s in opt.state_dict()["state"].values() for v in s.values()})
    steps(model, opt, 10, 20)
    model2, opt2 = make()
    with torch.no_grad():
        for p, v in zip(model2.factors, saved_params):
            p.to_local().copy_(v)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    steps(model2, opt2, 10, 20)
    same = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.factors, model2.factors))
    return dict(bit_identical=same, state_kinds=state_kinds)


# strategies whose DCP round trip must continue the run (float64, relative error <= 1e-12)
DCP_STRATEGIES = [
    ("lora_rite", dict(lr=2e-2, **RITE_GRAM)),
    ("scaled_gd", dict(lr=5e-2, momentum=0.9, weight_decay=1e-2)),
    ("scaled_adam", dict(lr=1e-2, delta=1e-3)),
]
DCP_STEPS, DCP_SAVE_AT = 8, 4


class BiasedPairModel(PairModel):
    """``PairModel`` plus a parameter outside the pairs (the AdamW fallback group; 5 entries:
    an uneven shard on 2 ranks)."""

    def __init__(self, specs, tensors):
        super().__init__(specs, tensors)
        self.bias = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=DTYPE))

    def forward(self, tgts, wts):
        return super().forward(tgts, wts) + LOSS_SCALE * (wts[0][0] * (self.bias - 0.5)).square().sum()


def _dcp_setup(strategy: str, hp: dict, mesh=None):
    """A fresh FSDP2 ``BiasedPairModel`` and its optimizer (pairs + fallback AdamW group)."""
    from torch.distributed.fsdp import fully_shard

    from lowrank_geom import LowRankOptimizer
    from lowrank_geom.distributed import row_shard_placement

    model = BiasedPairModel(SPECS, init_tensors(SPECS))
    fully_shard(model, shard_placement_fn=row_shard_placement(lora_pairs_of(SPECS, list(model.factors))), mesh=mesh)
    groups = [{"pairs": lora_pairs_of(SPECS, list(model.factors))}, {"params": [model.bias], "lr": 1e-2}]
    return model, LowRankOptimizer(groups, strategy=strategy, **hp)


def _dcp_steps(model, opt, ranks: list[int], start: int, stop: int) -> None:
    """Steps ``start..stop`` on the mean loss of ``ranks`` (one process standing in for every
    rank averages their losses, as FSDP2 averages their gradients)."""
    tgts = targets(SPECS)
    for step in range(start, stop):
        opt.zero_grad()
        (sum(model(tgts, weights(SPECS, k, step)) for k in ranks) / len(ranks)).backward()
        opt.step()


def _dcp_load(model, opt, path: str, group=None) -> None:
    """The documented resume: DCP loads into the fresh model's and optimizer's state dicts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path, process_group=group)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def dcp_resume(rank: int, world: int, out_dir: str) -> dict:
    """``torch.distributed.checkpoint`` mid-run, resumed into a fresh FSDP2 model and optimizer
    at the same world size and at world size 1 (resharding); each continuation vs the
    uninterrupted run. Also the per-rank ``torch.save`` path with ``weights_only=True``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import DeviceMesh

    from lowrank_geom import LowRankOptimizer

    solo = dist.new_group([0])  # every rank takes part in creating it; rank 0 alone uses it
    out = {}
    for strategy, hp in DCP_STRATEGIES:
        path = os.path.join(out_dir, f"dcp_{strategy}")
        model, opt = _dcp_setup(strategy, hp)
        _dcp_steps(model, opt, [rank], 0, DCP_SAVE_AT)
        msd, osd = get_state_dict(model, opt)
        kinds = {k: type(v).__name__ for k, v in osd["state"]["factors.2"].items()}
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        _dcp_steps(model, opt, [rank], DCP_SAVE_AT, DCP_STEPS)
        final = [p.full_tensor().detach() for p in model.parameters()]

        model2, opt2 = _dcp_setup(strategy, hp)
        _dcp_load(model2, opt2, path)
        _dcp_steps(model2, opt2, [rank], DCP_SAVE_AT, DCP_STEPS)
        same = max(rel_err(p.full_tensor().detach(), q) for p, q in zip(model2.parameters(), final))
        res = dict(same_world=same, kinds_pair2_b=kinds)
        dist.barrier()
        if rank == 0:  # resharded: one process on a mesh of size 1 over the 2-rank checkpoint
            model1, opt1 = _dcp_setup(strategy, hp, mesh=DeviceMesh.from_group(solo, "cpu"))
            _dcp_load(model1, opt1, path, group=solo)
            _dcp_steps(model1, opt1, list(range(world)), DCP_SAVE_AT, DCP_STEPS)
            res["world_1"] = max(rel_err(p.full_tensor().detach(), q) for p, q in zip(model1.parameters(), final))
        dist.barrier()
        out[strategy] = res
    # a sharded state dict into an optimizer over plain (unsharded) factors: a clear error
    plain = [torch.nn.Parameter(t.clone()) for t in init_tensors(SPECS)]
    bias = torch.nn.Parameter(torch.zeros(5, dtype=DTYPE))
    into_plain = LowRankOptimizer(
        [{"pairs": lora_pairs_of(SPECS, plain)}, {"params": [bias], "lr": 1e-2}], strategy=strategy, **hp
    )
    out["into_plain"] = _error_of(lambda: into_plain.load_state_dict(opt.state_dict()))
    return out


def peft_recipe(rank: int, world: int) -> dict:
    """The documented recipe: a PEFT model, ``row_shard_placement`` for ``fully_shard``, then
    ``lora_pairs`` of the sharded model; 20 steps vs the same model in one process."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return dict(skipped="peft is not installed")
    from torch.distributed.fsdp import fully_shard

    from lowrank_geom import LowRankOptimizer
    from lowrank_geom.distributed import row_shard_placement
    from lowrank_geom.peft import lora_pairs, non_pair_parameters

    def build():
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).to(DTYPE)
        # bias="lora_only": the LoRA layers' biases train too, in the AdamW fallback group
        return get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], bias="lora_only"))

    def optimizer(model, strategy, hp):
        pairs = lora_pairs(model)
        rest = non_pair_parameters(model, pairs)
        return LowRankOptimizer([{"pairs": pairs}, {"params": rest, "lr": 1e-2}], strategy=strategy, **hp), rest

    def data(k, step):
        g = torch.Generator().manual_seed(100 * step + k)
        return torch.randn(4, 6, generator=g, dtype=DTYPE), torch.randn(4, 5, generator=g, dtype=DTYPE)

    def loss(model, k, step):
        x, y = data(k, step)
        return (model(x) - y).square().mean()

    out = {}
    for strategy, hp in PEFT_STRATEGIES:
        try:
            ref_model = build()
            ref_opt, ref_rest = optimizer(ref_model, strategy, hp)
            model = build()
            fully_shard(model, shard_placement_fn=row_shard_placement(lora_pairs(model)))
            opt, rest = optimizer(model, strategy, hp)  # after fully_shard: the DTensor parameters
            pairs = lora_pairs(model)
            worst = 0.0
            for step in range(STEPS):
                ref_opt.zero_grad()
                (sum(loss(ref_model, k, step) for k in range(world)) / world).backward()
                ref_opt.step()
                opt.zero_grad()
                loss(model, rank, step).backward()
                opt.step()
                for p, q in zip(lora_pairs(model), lora_pairs(ref_model)):
                    worst = max(worst, rel_err(p.a.full_tensor().detach(), q.a.detach()))
                    worst = max(worst, rel_err(p.b.full_tensor().detach(), q.b.detach()))
                for p, q in zip(rest, ref_rest):
                    worst = max(worst, rel_err(p.full_tensor().detach(), q.detach()))
            out[strategy] = dict(
                fallback=[str(tuple(p.placements)) for p in rest],
                max_rel_err=worst,
                placements=[str(tuple(t.placements)) for p in pairs for t in (p.a, p.b)],
            )
        except Exception as err:
            out[strategy] = dict(error=f"{type(err).__name__}: {err}")
    return out


def scenarios() -> list[tuple[str, Callable[[int, int], dict]]]:
    out = []
    for label, strategy, hp in STRATEGIES:
        out.append((f"fsdp_{label}", lambda rank, world, s=strategy, h=hp: fsdp_trajectory(rank, world, s, h)))
    for label, strategy, hp in DDP_STRATEGIES:
        out.append((f"ddp_{label}", lambda rank, world, s=strategy, h=hp: ddp_trajectory(rank, world, s, h)))
    out += [
        ("errors", layout_errors),
        ("nonfinite", nonfinite_skip),
        ("replicated", replicated_dtensors),
        ("checkpoint", checkpoint_resume),
        ("dcp", lambda rank, world: dcp_resume(rank, world, SCRATCH[0])),
        ("peft", peft_recipe),
    ]
    return out


# -------------------------------------------------------------------------------------- entry
#: a directory shared by the processes (the scenarios' checkpoints); set by ``run_all``
SCRATCH: list[str] = [""]


def run_all(rank: int, world: int, init_file: str, out_dir: str, only: tuple = ()) -> None:
    """``torch.multiprocessing.spawn`` target: every scenario (or those named in ``only``) on this
    rank, results as JSON."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    register_test_strategy()
    SCRATCH[0] = out_dir
    results = {}
    try:
        for name, fn in scenarios():
            if only and name not in only:
                continue
            try:
                results[name] = dict(ok=True, value=fn(rank, world))
            except Exception:
                results[name] = dict(ok=False, error=traceback.format_exc())
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
        dist.destroy_process_group()


def comm_volume(
    rank: int, world: int, strategy: str, hp: dict, layers: int, hidden: int, r: int, steps: int = 3
) -> dict:
    """All-reduced bytes per optimizer step for ``4·layers`` pairs ``hidden×r``, ``hidden×r`` (FSDP2)."""
    specs = [(hidden, hidden, r, True, True)] * (4 * layers)
    logs = sharded_run(specs, strategy, dict(hp, lr=1e-3), rank, steps)
    nbytes = sum(logs[-1]["all_reduce_bytes"])
    return dict(
        strategy=strategy + ("+escape" if hp.get("escape") else ""),
        pairs=len(specs),
        rows=hidden,
        r=r,
        bytes_per_step=nbytes,
        calls_per_step=len(logs[-1]["all_reduce_bytes"]),
        other=sorted({o for c in logs for o in c["other"]}),
        param_bytes=sum((m + n) * rr for m, n, rr, *_ in specs) * 8,
    )


def _summary(rank: int, world: int, init_file: str, out_dir: str, strategies: list[tuple[str, dict]]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    register_test_strategy()
    rows = []
    for strategy, hp in strategies:
        try:
            rows.append(comm_volume(rank, world, strategy, hp, layers=8, hidden=1024, r=16))
        except Exception as err:
            rows.append(dict(strategy=strategy, error=f"{type(err).__name__} (not run on shards)"))
    if rank == 0:
        Path(out_dir, "summary.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


if __name__ == "__main__":  # python -m tests.distributed.workers [OUT_DIR]: all-reduce volume per step
    import sys
    import tempfile

    import torch.multiprocessing as mp

    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    names = [
        ("lora_rite", RITE_SHARDABLE),
        ("lora_rite", dict(escape=True, **RITE_SHARDABLE)),
        ("scaled_gd", {}),
        ("_test_gram_scaled_gd", {}),
    ]
    mp.spawn(_summary, args=(2, os.path.join(out, "init"), out, names), nprocs=2)
    print("FSDP2, 2 gloo processes, float64; each pair A: rows×r (Shard(0)), B stored r×rows (Shard(1))")
    print(
        f"{'strategy':22} {'pairs':>5} {'rows':>5} {'r':>3} {'all-reduced B/step':>18} {'calls':>5} "
        f"{'param B':>10} {'ratio':>8}"
    )
    for row in json.loads(Path(out, "summary.json").read_text()):
        if "error" in row:
            print(f"{row['strategy']:22} {row['error']}")
            continue
        print(
            f"{row['strategy']:22} {row['pairs']:>5} {row['rows']:>5} {row['r']:>3} {row['bytes_per_step']:>18,} "
            f"{row['calls_per_step']:>5} {row['param_bytes']:>10,} {row['bytes_per_step'] / row['param_bytes']:>8.2e}"
            + (f"  other collectives: {row['other']}" if row["other"] else "")
        )
