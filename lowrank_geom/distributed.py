"""Row-sharded (FSDP2) and replicated (DDP) LoRA factors: what the driver needs to step them.

Under DDP every rank holds whole factors and identical (all-reduced) gradients, and the optimizer
is deterministic, so it needs nothing from this module: each rank takes the same step.

Under FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) a parameter is a ``DTensor`` sharded
``Shard(d)`` over a 1-D device mesh. In the paper's orientation a factor is ``(rows, r)``; every
quantity a strategy computes is either row-wise (the update of a row depends on that row and on
``r×r`` matrices) or a sum over rows. So a factor sharded on any dim *other than its rank dim*
is stepped on its local shard (``.to_local()``), with every row sum completed by an all-reduce
(SUM) over the mesh's process group — ``r×r``, ``r`` or scalar tensors, never a factor. The
driver (:class:`~lowrank_geom.LowRankOptimizer`) passes that all-reduce to the strategy as
:attr:`PairBatch.row_reduce <lowrank_geom.strategies.PairBatch>`.

Supported: both factors of a pair sharded ``Shard(d)`` with ``d`` not the rank dim, on the same
1-D mesh (uneven shards included: FSDP2 pads, ``to_local()`` does not), or both ``Replicate()``
DTensors, or both plain tensors; and only with a strategy (and hyperparameters) that support row
sharding (:func:`row_sharding_requirements`). Anything else raises at construction, naming the
pair.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from lowrank_geom.pairs import LoRAPair
from lowrank_geom.strategies.base import Strategy

# the public interface; the rest serves the driver (lowrank_geom/optim.py) and may change
__all__ = [
    "AllReduce",
    "Layout",
    "pair_layout",
    "row_shard_placement",
    "row_shardable_strategies",
    "row_sharding_requirements",
]


def row_sharding_requirements(strategy: Any, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str] | None:
    """What must change for ``strategy`` with hyperparameters ``hp`` to run on row shards of ``dtype`` factors.

    ``[]``: it runs as is (``row_reduce`` completes every row sum); a list of hyperparameter
    settings it needs; ``None``: it cannot run on row shards at all (e.g. it factorizes each factor).
    ``dtype`` None: float32. The strategy declares this itself
    (:meth:`Strategy.row_sharding_requirements <lowrank_geom.strategies.Strategy.row_sharding_requirements>`).
    """
    return strategy.row_sharding_requirements(hp, dtype)


def row_shardable_strategies() -> list[str]:
    """The registered strategies that run on row shards with some hyperparameters (for messages)."""
    from lowrank_geom.strategies import available_strategies, get_strategy

    out = []
    for name in available_strategies():
        strategy = get_strategy(name)
        if type(strategy).row_sharding_requirements is not Strategy.row_sharding_requirements:
            out.append(name)
    return out


def identity(t: torch.Tensor) -> torch.Tensor:
    """``row_reduce`` of unsharded factors: the sum over this process's rows is the whole sum."""
    return t


class AllReduce:
    """``row_reduce`` of a row-sharded batch: SUM all-reduce of a (small) tensor over ``group``.

    Returns a new tensor; the argument is left unchanged. ``torch.distributed.all_reduce`` is looked
    up at each call, so a wrapper installed on it (to count bytes) sees every reduction.
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"AllReduce(group={self.group!r})"


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``.

    Never imports ``torch.distributed.tensor`` (≈ 1.5 s): a DTensor exists only once it is imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class Layout(NamedTuple):
    """How a pair is laid out over processes (hashable: part of the driver's bucket key)."""

    #: ``"local"`` (plain tensors, e.g. DDP), ``"replicated"`` (``Replicate()`` DTensors) or
    #: ``"row_sharded"`` (``Shard(d)`` DTensors, ``d`` not the rank dim).
    kind: str
    mesh: Any = None
    placements: tuple = ()
    #: the global stored shapes of A and B. Same-layout pairs with these shapes have same-shape
    #: local shards on every rank, so each rank forms the same buckets (same collectives).
    shapes: tuple = ()


LOCAL = Layout("local")


def _fix(name: str, which: str, t: torch.Tensor, rank_dim: int) -> str:
    rows = [d for d in range(t.ndim) if d != rank_dim % t.ndim]
    return (
        f"shard it on a row dim instead: pass fully_shard(..., shard_placement_fn=...) returning "
        f"Shard({rows[0]}) for factor {which} (shape {tuple(t.shape)}, rank dim {rank_dim % t.ndim}); "
        "lowrank_geom.distributed.row_shard_placement(pairs) builds that function"
    )


def _factor_layout(t: torch.Tensor, rank_dim: int, label: str, which: str) -> Layout:
    if not is_dtensor(t):
        return LOCAL
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1:
        raise ValueError(
            f"{label}: factor {which} is a DTensor on a {mesh.ndim}-D device mesh with placements "
            f"{placements}; only 1-D meshes are supported (FSDP2 over one mesh dim; HSDP's "
            "Replicate + Shard meshes are not supported yet)"
        )
    (pl,) = placements
    if isinstance(pl, Replicate):
        return Layout("replicated", mesh, placements)
    if type(pl) is not Shard:
        raise ValueError(
            f"{label}: factor {which} has placement {pl}; only Shard(d) (FSDP2) and Replicate() "
            "DTensors are supported (not Partial or strided shards)"
        )
    if pl.dim == rank_dim % t.ndim:
        raise ValueError(
            f"{label}: factor {which} (shape {tuple(t.shape)}) is sharded on its rank dim {pl.dim} "
            f"({pl}); lowrank_geom steps row shards with r×r all-reduces and cannot split the rank "
            f"dim. This is FSDP2's default Shard(0) for PEFT's lora_A.weight (r×in); " + _fix(label, which, t, rank_dim)
        )
    return Layout("row_sharded", mesh, placements)


def pair_layout(pair: LoRAPair, label: str) -> Layout:
    """The layout of ``pair`` (validated at construction); raises ``ValueError`` naming the pair
    for any layout the driver cannot step with ``r×r`` collectives only."""
    la = _factor_layout(pair.a, pair.a_rank_dim, label, "A")
    lb = _factor_layout(pair.b, pair.b_rank_dim, label, "B")
    if la.kind != lb.kind or la.mesh != lb.mesh:
        raise ValueError(
            f"{label}: factor A is {_describe(pair.a, la)} but factor B is {_describe(pair.b, lb)}; "
            "both factors of a pair must be laid out alike (both plain tensors, both Replicate() "
            "or both row-sharded on the same 1-D mesh), e.g. both inside the same fully_shard"
        )
    if la.kind == "local":
        return LOCAL
    return Layout(
        la.kind,
        la.mesh,
        (la.placements, lb.placements, pair.a_rank_dim % pair.a.ndim, pair.b_rank_dim % pair.b.ndim),
        (tuple(pair.a.shape), tuple(pair.b.shape)),
    )


def _describe(t: torch.Tensor, layout: Layout) -> str:
    if layout.kind == "local":
        return f"a plain {type(t).__name__}"
    return f"a DTensor with placements {layout.placements} on {layout.mesh}"


def check_strategy(
    layout: Layout, strategy: Any, hp: dict[str, Any], label: str, dtype: torch.dtype | None = None
) -> None:
    """``NotImplementedError`` if ``strategy`` with ``hp`` cannot run on the row shards of a pair
    laid out so, with factors of ``dtype`` (a no-op for unsharded layouts)."""
    if layout.kind != "row_sharded":
        return
    need = row_sharding_requirements(strategy, hp, dtype)
    if need is None:
        raise NotImplementedError(
            f"{label}: its factors are row-sharded DTensors (FSDP2), but strategy {strategy.name!r} "
            "does not support row sharding (it may need whole factors, e.g. a QR of each factor); "
            f"use one that does ({', '.join(row_shardable_strategies())}, or a strategy whose "
            "row_sharding_requirements returns []), or keep these factors unsharded (DDP, or "
            "fully_shard(..., ignored_params=...))"
        )
    if need:
        raise NotImplementedError(
            f"{label}: its factors are row-sharded DTensors (FSDP2); strategy {strategy.name!r} runs on "
            f"row shards only with {'; '.join(need)}. Set these in the optimizer or the param group, "
            "or keep these factors unsharded (DDP)"
        )


class LocalPair(NamedTuple):
    """A pair as the strategy sees it on this rank: local factors and gradients, and the row sum."""

    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    row_reduce: Callable[[torch.Tensor], torch.Tensor]


def local_pair(a: torch.Tensor, b: torch.Tensor, layout: Layout, label: str) -> LocalPair:
    """The local tensors of a pair of the given layout (views of the parameters, written in place)."""
    if layout.kind == "local":
        return LocalPair(a, b, a.grad, b.grad, identity)
    grads = []
    for t, which in ((a, "A"), (b, "B")):
        g = t.grad
        if not is_dtensor(g) or tuple(g.placements) != tuple(t.placements):
            got = f"placements {tuple(g.placements)}" if is_dtensor(g) else f"a plain {type(g).__name__}"
            raise RuntimeError(
                f"{label}: the gradient of factor {which} is {got}, but the factor has placements "
                f"{tuple(t.placements)}; the optimizer needs gradients sharded like their parameters"
            )
        grads.append(g.to_local())
    reduce = identity if layout.kind == "replicated" else AllReduce(layout.mesh.get_group(0))
    return LocalPair(a.to_local(), b.to_local(), grads[0], grads[1], reduce)


def localize(
    a: torch.Tensor, b: torch.Tensor, a_rank_dim: int, b_rank_dim: int, label: str, strategy: Any, hp: dict[str, Any]
) -> tuple[Layout, LocalPair]:
    """The driver's per-step hook: the pair's layout (validated, with the strategy's support for
    it) and its local tensors. Plain tensors take a fast path."""
    if not (is_dtensor(a) or is_dtensor(b)):
        return LOCAL, LocalPair(a, b, a.grad, b.grad, identity)
    layout = pair_layout(LoRAPair(a, b, a_rank_dim, b_rank_dim), label)
    check_strategy(layout, strategy, hp, label, a.dtype)  # parameters or hyperparameters may change after init
    return layout, local_pair(a, b, layout, label)


def row_shard_placement(pairs: Iterable[LoRAPair]) -> Callable[[torch.nn.Parameter], Any]:
    """A ``shard_placement_fn`` for :func:`~torch.distributed.fsdp.fully_shard` that shards every
    factor of ``pairs`` on its first non-rank dim (its rows) and leaves other parameters to
    FSDP2's default ``Shard(0)``.

    Call it on the pairs of the unsharded model (e.g. ``lora_pairs(model)``) and pass the result
    to every ``fully_shard`` call. For PEFT's ``lora_A.weight`` (``r×in``, rank dim 0) it returns
    ``Shard(1)``; FSDP2 requires ``in`` to be divisible by the mesh size for a dim other than 0.
    """
    from torch.distributed.tensor import Shard

    dims: dict[int, int] = {}
    for pair in pairs:
        for t, rd in ((pair.a, pair.a_rank_dim), (pair.b, pair.b_rank_dim)):
            rd %= t.ndim
            dims[id(t)] = 1 if rd == 0 else 0

    def placement(param: torch.nn.Parameter) -> Any:
        d = dims.get(id(param))
        return None if d is None else Shard(d)

    return placement


# ---------------------------------------------------------------------- distributed checkpoints
# torch.distributed.checkpoint (DCP) saves a DTensor shard by shard and a plain tensor once, as
# replicated. So in ``state_dict()`` the row-wise state of a row-sharded pair is a DTensor laid
# out and sharded like its parameter (as torch's Adam state is under FSDP2), and everything else
# (r×r, r, scalars: identical on every rank) stays plain; loading turns such a DTensor back into
# the local (rows, r) tensor the driver keeps. Resharding (another world size) then is DCP's job.


def row_wise_keys(strategy: Any, hp: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The state keys of A and of B that ``strategy.init`` makes ``(rows, r)`` under ``hp``.

    Read from two ``init`` calls on meta tensors with different row counts, so a new strategy
    needs no declaration. ``NotImplementedError`` for state whose shape depends on the rows in
    another way (a checkpoint could not shard it like the factor)."""
    r, rows = 2, ((4, 3), (5, 7))  # row counts never equal to r: no ambiguity with r×r state
    inits = [strategy.init(torch.empty(m, r, device="meta"), torch.empty(n, r, device="meta"), hp) for m, n in rows]
    out = []
    for side, which in enumerate("AB"):
        first, second = inits[0][side], inits[1][side]
        keys = set()
        for key, value in first.items():
            other = second.get(key)
            if not isinstance(value, torch.Tensor) or (other is not None and value.shape == other.shape):
                continue  # independent of the rows: identical on every rank
            if value.shape != (rows[0][side], r) or other is None or other.shape != (rows[1][side], r):
                raise NotImplementedError(
                    f"strategy {getattr(strategy, 'name', strategy)!r}: state {key!r} of factor {which} "
                    f"has shape {tuple(value.shape)} for a {rows[0][side]}×{r} factor; a distributed "
                    "checkpoint shards state shaped (rows, r) like its factor, or keeps state "
                    "independent of the rows whole"
                )
            keys.add(key)
        out.append(frozenset(keys))
    return out[0], out[1]


def is_row_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor with a ``Shard`` placement (a row-sharded factor, once validated)."""
    if not is_dtensor(t):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(pl, Shard) for pl in t.placements)


def sharded_state(value: torch.Tensor, param: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """A row-wise state tensor ``(local rows, r)`` of row-sharded factor ``param`` as a DTensor
    in ``param``'s stored layout, global shape and sharding (a view of the state where torch.save
    allows it).

    ``from_local`` with the parameter's global shape and stride: uneven shards (FSDP2 chunks
    like ``torch.chunk``), empty shards and factors of any rank dim are described exactly."""
    from torch.distributed.tensor import DTensor

    from lowrank_geom.pairs import factor_unview, factor_view

    local = param.to_local()
    if tuple(value.shape) != tuple(factor_view(local, rank_dim).shape):
        raise ValueError(
            f"row-wise state of shape {tuple(value.shape)} does not match the local shard "
            f"{tuple(local.shape)} (rank dim {rank_dim}) of its factor"
        )
    stored = factor_unview(value, local, rank_dim)
    if stored.storage_offset():
        # torch.save cannot pickle a DTensor whose local tensor starts inside its storage (torch
        # 2.13: "invalid python storage"), as the driver's views of stacked state do: a copy
        stored = stored.clone(memory_format=torch.preserve_format)
    return DTensor.from_local(
        stored, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def local_state(value: Any, param: torch.Tensor, rank_dim: int, key: str) -> Any:
    """Inverse of :func:`sharded_state` for loading: a DTensor value of pair state as the local
    ``(rows, r)`` tensor of ``param``'s shard (redistributed to its placements if they differ);
    anything else as it is."""
    if not is_dtensor(value):
        return value
    from lowrank_geom.pairs import factor_view

    if not is_dtensor(param):
        raise ValueError(
            f"state {key!r}: the checkpoint holds it as a DTensor (row-sharded, from an FSDP2 run), "
            f"but its factor (shape {tuple(param.shape)}) is a plain tensor here; load it into an "
            "optimizer over the FSDP2 (fully_shard) model, with any mesh size"
        )
    if tuple(value.shape) != tuple(param.shape) or value.device_mesh != param.device_mesh:
        raise ValueError(
            f"state {key!r}: the checkpoint's DTensor has global shape {tuple(value.shape)} on "
            f"{value.device_mesh}, but its factor has {tuple(param.shape)} on {param.device_mesh}; "
            "load with torch.distributed.checkpoint into the state dict of the fresh optimizer "
            "(get_state_dict), which lays the state out like the factors"
        )
    if tuple(value.placements) != tuple(param.placements):
        value = value.redistribute(param.device_mesh, param.placements)
    return factor_view(value.to_local(), rank_dim)


def shard_pair_state(
    state_dict: dict[str, Any], param_groups: list[dict[str, Any]], strategy_of: Callable[[str], Any]
) -> dict[str, Any]:
    """``Optimizer.state_dict()`` with the row-wise state of every row-sharded pair as DTensors
    (:func:`sharded_state`); returned as is when no pair is row-sharded.

    ``param_groups``: the optimizer's (``rank_dims`` marks a pair group); ``strategy_of``: a
    strategy by name. Only the ``state`` dict and the DTensors are new (see :func:`sharded_state`)."""
    state, index = None, 0
    for group in param_groups:
        params = group["params"]
        pairs = group.get("rank_dims") or []
        kinds = None
        for i, (ad, bd) in enumerate(pairs):
            for p, rd, side in ((params[2 * i], ad, 0), (params[2 * i + 1], bd, 1)):
                saved = state_dict["state"].get(index + 2 * i + side)
                if saved is None or not is_row_sharded(p):
                    continue
                if kinds is None:  # once per group, and only for a group with sharded state
                    strategy = strategy_of(group["strategy"])
                    kinds = row_wise_keys(strategy, group), strategy.state_keys(group)
                if state is None:
                    state = dict(state_dict["state"])
                label = group["pair_names"][i]
                state[index + 2 * i + side] = _sharded_entry(saved, p, rd, kinds[0][side], kinds[1][side], label)
        index += len(params)
    return state_dict if state is None else {**state_dict, "state": state}


def _sharded_entry(
    saved: dict[str, Any], p: torch.Tensor, rank_dim: int, row_wise: frozenset[str], known: frozenset[str], label: str
) -> dict[str, Any]:
    """One factor's saved state with its row-wise tensors as DTensors; the driver's counters
    (0-dim) and the strategy's other keys stay plain."""
    out = {}
    for key, value in saved.items():
        if key in row_wise:
            value = sharded_state(value, p, rank_dim)
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and not is_dtensor(value):
            # e.g. state of an option switched off since the last step: its kind is unknown
            if key not in known:
                raise ValueError(
                    f"{label}: state {key!r} (shape {tuple(value.shape)}) is not created by the "
                    "strategy under the current hyperparameters, so a distributed checkpoint cannot "
                    "tell whether to shard it; take a step (which fits the state to the "
                    "hyperparameters) before saving"
                )
        out[key] = value
    return out
