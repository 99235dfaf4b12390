"""Buckets: the pairs of a param group that the driver steps as one batch, and what they keep.

A :class:`Bucket` holds the pairs of one param group with the same stored shapes, rank dims,
dtype, device and process layout. It is built once (:func:`build_buckets`) and owns what
persists between steps: the *stacked state* (each ``state[p][k]`` is a view ``stacked[i]`` of
one tensor per key, so the next step reuses it without a copy) and the *workspace* (buffers for
the stacked factors, gradients and the strategy's large outputs: a fresh multi-MB tensor every
step costs about as much in page faults as the arithmetic).

One step of a bucket is :meth:`Bucket.gather` (a :class:`~lowrank_geom.strategies.PairBatch`
of the pairs that have gradients, and their finite mask) → the strategy's update →
:meth:`Bucket.apply` (factors updated in place, new state installed as views).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from lowrank_geom import distributed
from lowrank_geom.geometry import compute_dtype
from lowrank_geom.pairs import LoRAPair, factor_view
from lowrank_geom.strategies import PairBatch, PairUpdate, Strategy

#: keys of A's state that belong to the driver (float32 scalars); strategies never see them
DRIVER_STATE = ("step", "nonfinite_skips", "update_skips")
_DRIVER_KEYS = frozenset(DRIVER_STATE)


class PairRef(NamedTuple):
    """A pair as a param group holds it: the two parameters, their rank dims and a label."""

    a: torch.Tensor
    b: torch.Tensor
    a_rank_dim: int
    b_rank_dim: int
    name: str


class Active(NamedTuple):
    """A pair with gradients in this step: its index in the bucket and its local tensors."""

    index: int
    local: distributed.LocalPair


class Gathered(NamedTuple):
    """One bucket's input to a step: the batch, the finite mask (None: all finite) and what
    :meth:`Bucket.apply` needs back."""

    bucket: Bucket
    members: tuple[int, ...]
    batch: PairBatch
    finite: torch.Tensor | None
    #: A's stacked state with the driver's counters
    full_a: dict[str, torch.Tensor]
    local_a: list[torch.Tensor]
    local_b: list[torch.Tensor]


class Bucket:
    """Same-shape pairs of one param group, stepped as one batch (see the module docstring).

    The stacked state and the workspace belong to one member list (the pairs that had
    gradients); a step with another member list rebuilds the stacks and drops the buffers, which
    the state views of the former members keep alive, so a buffer is only ever viewed by the
    state of its own members.
    """

    def __init__(self, pairs: list[PairRef], layout: distributed.Layout) -> None:
        first = pairs[0]
        self.pairs = pairs
        self.layout = layout
        self.a_rank_dim = first.a_rank_dim % first.a.ndim
        self.b_rank_dim = first.b_rank_dim % first.b.ndim
        self.dtype, self.device = first.a.dtype, first.a.device
        self.members: tuple[int, ...] | None = None
        self.stacks: dict[str, tuple[dict[str, torch.Tensor], dict[str, tuple]]] = {}
        self.buffers: dict[str, list[torch.Tensor]] = {}
        #: what makes pairs batchable: stored shapes, rank dims, dtype, device, layout
        self.key = bucket_key(first, layout)

    # ------------------------------------------------------------------------------ gather
    def gather(self, active: list[Active], state: Any, strat: Strategy, group: dict[str, Any]) -> Gathered:
        """The :class:`PairBatch` of the ``active`` pairs (state created or fitted first) and their finite mask."""
        members = tuple(act.index for act in active)
        if members != self.members:
            self.members, self.stacks, self.buffers = members, {}, {}
        cdt = compute_dtype(self.dtype)
        ensure_state(
            state,
            strat,
            group,
            [self.pairs[i] for i in members],
            [act.local for act in active],
            self.a_rank_dim,
            self.b_rank_dim,
            cdt,
        )
        pa, pb = [self.pairs[i].a for i in members], [self.pairs[i].b for i in members]
        full_a, hit_a = self._stacked(state, pa, "a")
        state_b, hit_b = self._stacked(state, pb, "b")
        # storages the members' state views: on a hit exactly the stacks
        views = (
            [v for st in (full_a, state_b) for v in st.values()]
            if hit_a and hit_b
            else [v for p in pa + pb for v in state[p].values() if isinstance(v, torch.Tensor)]
        )
        ws = Workspace(self.buffers, views)
        locals_ = [act.local for act in active]
        la, lb = [lp.a for lp in locals_], [lp.b for lp in locals_]
        a_s = stack_into(ws, "a", la, self.a_rank_dim).to(cdt)
        b_s = stack_into(ws, "b", lb, self.b_rank_dim).to(cdt)
        ga = stack_into(ws, "grad_a", [lp.grad_a for lp in locals_], self.a_rank_dim).to(cdt)
        gb = stack_into(ws, "grad_b", [lp.grad_b for lp in locals_], self.b_rank_dim).to(cdt)
        if group.get("maximize", False):  # the strategies minimize: they step along −∇ (our copies)
            ga, gb = ga.neg_(), gb.neg_()
        row_reduce = locals_[0].row_reduce
        finite = self._finite_mask(ga, gb, row_reduce, group)
        if finite is not None:
            keep = finite.view(-1, 1, 1)
            ga = torch.where(keep, ga, torch.zeros((), dtype=cdt, device=self.device))
            gb = torch.where(keep, gb, torch.zeros((), dtype=cdt, device=self.device))
        state_a = {k: v for k, v in full_a.items() if k not in DRIVER_STATE}
        # compiled: the strategy's large outputs are the compiler's to allocate (no out= buffers)
        extra = () if group.get("compile", False) else (ws,)
        batch = PairBatch(a_s, b_s, ga, gb, state_a, state_b, full_a["step"], row_reduce, *extra)
        return Gathered(self, members, batch, finite, full_a, la, lb)

    def _finite_mask(
        self, ga: torch.Tensor, gb: torch.Tensor, row_reduce: Callable, group: dict[str, Any]
    ) -> torch.Tensor | None:
        """``(P,)`` mask of pairs with finite gradients, or None when all are (one host sync)."""
        # a sum is non-finite iff some entry is (or, for |entries| ~ 1e38, overflows): one pass
        finite = torch.isfinite(ga.sum(dim=(1, 2)) + gb.sum(dim=(1, 2)))
        if row_reduce is not distributed.identity:
            # row shards: a pair is skipped on every rank if any rank's shard is non-finite
            finite = row_reduce((~finite).to(ga.dtype)) == 0
        if bool(finite.all()):
            return None
        if group["nonfinite"] == "raise":
            bad = [self.pairs[i].name for i, ok in zip(self.members, finite.tolist()) if not ok]
            raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}")
        return finite

    def _stacked(self, state: Any, params: list[torch.Tensor], side: str) -> tuple[dict[str, torch.Tensor], bool]:
        """The stacked state of ``params``: the kept stacks while every ``state[p][k]`` is their view, else rebuilt."""
        kept = self.stacks.get(side)
        if kept is not None and _still_views(state, params, *kept):
            return dict(kept[0]), True
        keys = list(state[params[0]])
        return {k: stack_like([state[p][k] for p in params]) for k in keys}, False

    # ------------------------------------------------------------------------------- apply
    def apply(self, g: Gathered, upd: PairUpdate, state: Any, report: SkipReport) -> None:
        """Update the factors in place and install the new state (pairs with a non-finite
        gradient keep their factors and state; their step count does not advance)."""
        batch, finite, full_a = g.batch, g.finite, g.full_a
        new_a, new_b = upd.state_a, upd.state_b
        if finite is None:
            step, skips = batch.step + 1.0, full_a["nonfinite_skips"]
            apply_update(g.local_a, upd.delta_a, self.a_rank_dim, upd.scale, upd.decay)
            apply_update(g.local_b, upd.delta_b, self.b_rank_dim, upd.scale, upd.decay)
        else:
            delta_a, delta_b = upd.additive(batch.a, batch.b)
            keep = finite.view(-1, 1, 1)
            zero = torch.zeros((), dtype=delta_a.dtype, device=keep.device)
            new_a = select_state(finite, new_a, batch.state_a)
            new_b = select_state(finite, new_b, batch.state_b)
            fin = finite.to(torch.float32)
            step, skips = batch.step + fin, full_a["nonfinite_skips"] + (1.0 - fin)
            apply_update(g.local_a, torch.where(keep, delta_a, zero), self.a_rank_dim, 1.0, 0.0)
            apply_update(g.local_b, torch.where(keep, delta_b, zero), self.b_rank_dim, 1.0, 0.0)
        update_skips = report.count(upd.skipped, finite, full_a["update_skips"])
        # keys a strategy does not return keep their stacked value
        counters = {"step": step, "nonfinite_skips": skips, "update_skips": update_skips}
        self._install(state, "a", [self.pairs[i].a for i in g.members], {**full_a, **new_a, **counters})
        self._install(state, "b", [self.pairs[i].b for i in g.members], {**batch.state_b, **new_b})

    def _install(self, state: Any, side: str, params: list[torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """Make ``state[p_i][k]`` the view ``new[k][i]`` for every key, and keep the stacks for the next step."""
        views = {k: v.unbind(0) for k, v in new.items()}
        for i, p in enumerate(params):
            sp = state[p]
            for k, vs in views.items():
                sp[k] = vs[i]
        self.stacks[side] = (dict(new), views)


def _still_views(state: Any, params: list[torch.Tensor], stacked: dict, views: dict) -> bool:
    """Whether every ``state[p][k]`` is still the view ``views[k][i]`` (nothing replaced or added)."""
    columns = [(k, views[k]) for k in stacked]
    for i, p in enumerate(params):
        sp = state[p]  # hashing a tensor key costs: once per pair
        if len(sp) != len(columns) or not all(sp.get(k) is col[i] for k, col in columns):
            return False
    return True


def bucket_key(ref: PairRef, layout: distributed.Layout) -> tuple:
    a, b = ref.a, ref.b
    return (tuple(a.shape), ref.a_rank_dim % a.ndim, tuple(b.shape), ref.b_rank_dim % b.ndim, a.dtype, a.device, layout)


def build_buckets(refs: list[PairRef], alone: bool) -> list[Bucket]:
    """The buckets of a param group's pairs, in first-appearance order; ``alone``: one pair each (``foreach=False``)."""
    by_key: dict[tuple, list[PairRef]] = {}
    layouts = {}
    for i, ref in enumerate(refs):
        layout = distributed.pair_layout(LoRAPair(ref.a, ref.b, ref.a_rank_dim, ref.b_rank_dim), ref.name)
        key = bucket_key(ref, layout) + ((i,) if alone else ())
        by_key.setdefault(key, []).append(ref)
        layouts[key] = layout
    return [Bucket(pairs, layouts[key]) for key, pairs in by_key.items()]


def ensure_state(
    state: Any,
    strat: Strategy,
    group: dict[str, Any],
    refs: list[PairRef],
    locals_: list[distributed.LocalPair],
    ad: int,
    bd: int,
    cdt: torch.dtype,
) -> None:
    """Create the state of new pairs, and fit existing state to the current hyperparameters.

    A hyperparameter switched mid-run (a scheduler's momentum, an option turned on) may need
    state keys that the pair's state lacks, or leave some unused:
    :meth:`~lowrank_geom.strategies.Strategy.reconcile_state` adds (as ``init`` makes them)
    or drops those, or refuses the switch naming the option."""
    keys_a, keys_b = strat.state_keys(group, cdt)
    for ref, loc in zip(refs, locals_):
        sa, sb = state[ref.a], state[ref.b]
        if len(sa) == len(keys_a) + len(DRIVER_STATE) and sa.keys() - _DRIVER_KEYS == keys_a and sb.keys() == keys_b:
            continue  # the common case: state as the current hyperparameters make it
        x, y = factor_view(loc.a, ad).to(cdt), factor_view(loc.b, bd).to(cdt)
        if not sa:
            new_a, new_b = strat.init(x, y, group)
            sa.update({k: scalar(ref.a.device) for k in DRIVER_STATE}, **new_a)
            sb.update(new_b)
            continue
        for k in DRIVER_STATE:  # a checkpoint that predates a driver counter: it counts from here on
            if k not in sa:
                sa[k] = scalar(ref.a.device)
        own_a = {k: v for k, v in sa.items() if k not in DRIVER_STATE}
        if own_a.keys() == keys_a and sb.keys() == keys_b:
            continue
        new_a, new_b = strat.reconcile_state(x, y, own_a, dict(sb), group)
        for k in own_a.keys() - new_a.keys():
            del sa[k]
        sa.update(new_a)
        sb.clear()
        sb.update(new_b)


class Workspace:
    """One step's view of a bucket's buffers: ``empty(name, shape)`` returns one of two rotating
    buffers of that name, never one whose storage a state tensor of the members still views."""

    def __init__(self, buffers: dict[str, list[torch.Tensor]], views: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.in_use = {v.untyped_storage().data_ptr() for v in views}

    def empty(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        shape, device = tuple(shape), torch.device(device)
        bufs = self.buffers.get(name)
        if bufs is None or bufs[0].shape != shape or bufs[0].dtype != dtype or bufs[0].device != device:
            bufs = self.buffers[name] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        for buf in bufs:
            ptr = buf.untyped_storage().data_ptr()
            if ptr not in self.in_use:
                self.in_use.add(ptr)  # one live tensor per name and step
                return buf
        return torch.empty(shape, dtype=dtype, device=device)

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.empty(name, like.shape, like.dtype, like.device)


def stack_into(ws: Workspace, name: str, tensors: list[torch.Tensor], rank_dim: int) -> torch.Tensor:
    """``tensors`` (stored layout) stacked into the workspace buffer ``name``, viewed as ``(P, rows, r)``."""
    first = tensors[0]
    out = ws.empty(name, (len(tensors),) + tuple(first.shape), first.dtype, first.device)
    return stacked_view(torch.stack(tensors, out=out), rank_dim)


def stack_like(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps the members' memory layout (their dim order by stride).

    A strategy's outputs may be transposed views (:func:`~lowrank_geom.strategies.base.workspace_like`,
    a Householder basis), so an uninterrupted run keeps such state; matrix products round
    differently on another layout, so a resumed run must rebuild the same one to continue bit for bit."""
    first = tensors[0]
    if first.ndim < 2 or first.is_contiguous():
        return torch.stack(tensors)
    order = sorted(range(first.ndim), key=lambda d: -first.stride(d))  # outermost dim first
    stacked = torch.stack([t.permute(order) for t in tensors])
    inverse = sorted(range(first.ndim), key=order.__getitem__)
    return stacked.permute([0] + [1 + d for d in inverse])


def stacked_view(x: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``(P, *stored)`` stacked factors as ``(P, rows, r)``: :func:`factor_view` of each, a view for 2-D factors."""
    moved = x.movedim(rank_dim + 1, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


def unstacked(y: torch.Tensor, like: torch.Tensor, rank_dim: int) -> list[torch.Tensor]:
    """Inverse of :func:`stacked_view`: per-pair views of ``(P, rows, r)`` in the stored layout of ``like``."""
    moved_shape = like.movedim(rank_dim, -1).shape
    return list(y.reshape((y.shape[0],) + tuple(moved_shape)).movedim(-1, rank_dim + 1).unbind(0))


def apply_update(params: list[torch.Tensor], delta: torch.Tensor, rank_dim: int, scale, decay) -> None:
    """``p ← (1 − decay)·p + scale·δ_p`` in place for every parameter, with foreach kernels."""
    # 0-dim CPU tensors (a compiled update's lr) as numbers: no extra pass over δ, no device sync
    scale, decay = (float(x) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x for x in (scale, decay))
    if isinstance(decay, torch.Tensor) or decay != 0:
        torch._foreach_mul_(params, 1.0 - decay)
    if isinstance(scale, torch.Tensor):
        delta = delta * scale.to(delta)
        scale = 1.0
    torch._foreach_add_(params, unstacked(delta, params[0], rank_dim), alpha=scale)


def select_state(finite: torch.Tensor, new: dict, old: dict) -> dict[str, torch.Tensor]:
    """``new`` state where the gradient was finite, ``old`` elsewhere (keys only in ``new`` as they are)."""
    out = {}
    for k, v in new.items():
        if k in old:
            keep = finite.view((-1,) + (1,) * (v.ndim - 1))
            v = torch.where(keep, v, old[k].to(v.dtype))
        out[k] = v
    return out


def scalar(device: torch.device) -> torch.Tensor:
    """A driver counter: a 0-dim float32 zero."""
    return torch.zeros((), dtype=torch.float32, device=device)


class SkipReport:
    """One step of one param group: each batch's :attr:`PairUpdate.skipped`, counted for pairs
    with finite gradients, and whether every pair that stepped had both factor updates skipped."""

    def __init__(self) -> None:
        self.complete = True  # every batch reported ``skipped``
        self.all_both: list[torch.Tensor] = []
        self.stepped: list[torch.Tensor] = []

    def count(self, skipped: torch.Tensor | None, finite: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor:
        """``total`` ``(P,)`` plus this batch's counted skips (on the device: no sync)."""
        if skipped is None:
            self.complete = False
            return total
        counted = skipped.to(device=total.device, dtype=torch.float32).reshape(total.shape)
        both = counted >= 2
        if finite is not None:
            # a pair the driver skipped (non-finite gradient) is counted by nonfinite_skips only
            counted = counted * finite.to(torch.float32)
            both = (counted >= 2) | ~finite
            self.stepped.append(finite.any())
        else:
            self.stepped.append(torch.ones((), dtype=torch.bool, device=total.device))
        self.all_both.append(both.all())
        return total + counted

    def every_pair_skipped(self) -> bool:
        """One host sync, and only when every batch reported ``skipped``."""
        if not self.complete or not self.all_both:
            return False
        dev = self.all_both[0].device
        both = torch.stack([t.to(dev) for t in self.all_both]).all()
        return bool(both & torch.stack([t.to(dev) for t in self.stepped]).any())
