"""Row-sharded (FSDP2) and replicated (DDP) LoRA factors: what the driver needs to step them.

Under DDP every rank holds whole factors and identical (all-reduced) gradients, and the optimizer
is deterministic, so it needs nothing from this module: each rank takes the same step.

Under FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) a parameter is a ``DTensor`` sharded
``Shard(d)`` over a 1-D device mesh. In the paper's orientation a factor is ``(rows, r)``; every
quantity a strategy computes is either row-wise (the update of a row depends on that row and on
``r×r`` matrices) or a sum over rows. So a factor sharded on any dim *other than its rank dim*
is stepped on its local shard (``.to_local()``), with every row sum completed by an all-reduce
(SUM) over the mesh's process group — ``r×r``, ``r`` or scalar tensors, never a factor. The
driver (:mod:`lowrank_geom.optim`) passes that all-reduce to the strategy as
:attr:`PairBatch.row_reduce <lowrank_geom.strategies.PairBatch>`.

Supported: both factors of a pair sharded ``Shard(d)`` with ``d`` not the rank dim, on the same
1-D mesh (uneven shards included: FSDP2 pads, ``to_local()`` does not), or both ``Replicate()``
DTensors, or both plain tensors; and only with a strategy (and hyperparameters) that support row
sharding (:func:`row_sharding_requirements`). Anything else raises at construction, naming the
pair.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, NamedTuple

import torch

from lowrank_geom.pairs import LoRAPair


def _lora_rite_on_shards(hp: dict[str, Any], dtype: torch.dtype | None) -> list[str]:
    # LoRA-RITE's Gram engine routes every Gram, norm and row count through row_reduce; the QR
    # engine factorizes each factor, which a shard cannot do alone
    from lowrank_geom.strategies.lora_rite import resolve_engine

    engine = hp.get("engine", "auto")
    if resolve_engine(engine, dtype if dtype is not None else torch.float32) != "gram":
        why = "engine='auto' runs the QR engine" if engine == "auto" else "engine='qr'"
        why += ", which factorizes each factor: a shard cannot do that alone"
        return [f"engine='gram' ({why})"]
    return []


#: built-in strategies that run on row shards, each with a function of the param group's
#: hyperparameters and the factors' dtype that returns what must change for that (an empty list:
#: nothing). A strategy that is correct on row shards for every hyperparameter declares it with a
#: class attribute ``supports_row_sharding = True`` instead, which takes precedence.
ROW_SHARDED_STRATEGIES: dict[str, Callable[[dict[str, Any], torch.dtype | None], list[str]]] = {
    "lora_rite": _lora_rite_on_shards,
    # Gram-based (r×r Grams through row_reduce), element-wise otherwise: every hyperparameter
    "scaled_gd": lambda hp, dtype: [],
    "scaled_adam": lambda hp, dtype: [],
}


def row_sharding_requirements(strategy: Any, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str] | None:
    """What must change for ``strategy`` with hyperparameters ``hp`` to run on row shards of ``dtype`` factors.

    ``[]``: it runs as is (``row_reduce`` completes every row sum); a list of hyperparameter
    settings it needs; ``None``: it cannot run on row shards at all (e.g. it factorizes each factor).
    ``dtype`` None: float32.
    """
    if getattr(strategy, "supports_row_sharding", False):
        return []
    rule = ROW_SHARDED_STRATEGIES.get(getattr(strategy, "name", None))
    return None if rule is None else rule(hp, dtype)


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
    #: global stored shapes of A and B: same-layout pairs with these shapes have same-shape
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
            f"dim. This is FSDP2's default Shard(0) for PEFT's lora_A.weight (r×in); "
            + _fix(label, which, t, rank_dim)
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


def check_strategy(layout: Layout, strategy: Any, hp: dict[str, Any], label: str, dtype: torch.dtype | None = None) -> None:
    """``NotImplementedError`` if ``strategy`` with ``hp`` cannot run on the row shards of a pair
    laid out so, with factors of ``dtype`` (a no-op for unsharded layouts)."""
    if layout.kind != "row_sharded":
        return
    need = row_sharding_requirements(strategy, hp, dtype)
    if need is None:
        raise NotImplementedError(
            f"{label}: its factors are row-sharded DTensors (FSDP2), but strategy {strategy.name!r} "
            "does not support row sharding (it may need whole factors, e.g. a QR of each factor); "
            f"use one that does ({', '.join(sorted(ROW_SHARDED_STRATEGIES))}, or a strategy with "
            "supports_row_sharding = True), or keep these factors unsharded (DDP, or "
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
