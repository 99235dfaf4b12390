"""``LowRankOptimizer``: one ``torch.optim.Optimizer`` that drives any strategy over LoRA pairs.

The driver owns what every strategy shares: param groups of pairs, argument validation, lazy
state, batching of same-shape pairs, dtype promotion for linear algebra, the non-finite gradient
policy and exact checkpoints. The math lives in :mod:`lowrank_geom.strategies`.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from lowrank_geom import distributed, fallback
from lowrank_geom.geometry import PSDNumericsError, compute_dtype
from lowrank_geom.pairs import LoRAPair, factor_view
from lowrank_geom.strategies import PairBatch, PairUpdate, Strategy, get_strategy

#: keys that torch's lr schedulers add to param groups; accepted in any group.
_SCHEDULER_KEYS = {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr"}
_NONFINITE = ("skip", "raise")
#: torch.optim's keyword arguments and the values the driver takes (the first is torch's default)
_TORCH_OPTIONS: dict[str, tuple] = {
    "maximize": (False, True),
    "foreach": (None, True, False),
    "fused": (None, False),
    "capturable": (False,),
    "differentiable": (False,),
}
#: why a torch option's other values are refused
_UNSUPPORTED = {
    "fused": "there is no fused kernel; the step already batches same-shape pairs (foreach=None or True)",
    "capturable": "a step reads a few scalars on the host (the non-finite gradient check and the "
    "strategies' safeguards), which CUDA-graph capture forbids",
    "differentiable": "steps run under torch.no_grad; differentiating through them is not supported",
}
#: param-group keys of the driver itself (not a strategy's hyperparameters)
_DRIVER_KEYS = ("strategy", "nonfinite", "compile", *_TORCH_OPTIONS)
#: param-group keys a compiled strategy update never reads (guarding on them would recompile)
_NOT_HYPERPARAMETERS = ("params", "rank_dims", "pair_names", "compile", *_TORCH_OPTIONS, *_SCHEDULER_KEYS)
#: keys of A's state that belong to the driver (float32 scalars); strategies never see them
_DRIVER_STATE = ("step", "nonfinite_skips", "update_skips")


def _check_driver_options(group: dict[str, Any], where: str) -> None:
    """``ValueError`` naming the option for an invalid driver key or torch keyword argument."""
    at = f"{where}: " if where else ""
    if group["nonfinite"] not in _NONFINITE:
        raise ValueError(f"{at}Invalid nonfinite policy: {group['nonfinite']!r} (expected 'skip' or 'raise')")
    if not any(group["compile"] is v for v in (True, False)):
        raise ValueError(f"{at}Invalid compile: {group['compile']!r} (expected True or False)")
    _check_torch_options(group, where)


def _check_torch_options(group: dict[str, Any], where: str) -> None:
    at = f"{where}: " if where else ""
    for key, allowed in _TORCH_OPTIONS.items():
        value = group.get(key, allowed[0])
        if any(value is v for v in allowed):  # by identity: 0 is not False, 1 is not True
            continue
        if key in _UNSUPPORTED and isinstance(value, bool):
            raise ValueError(
                f"{at}{key}={value!r} is not supported: {_UNSUPPORTED[key]}; pass {key}="
                f"{allowed[0]!r} (torch's default) or leave it out"
            )
        raise ValueError(f"{at}Invalid {key}: {value!r} (expected one of {', '.join(map(repr, allowed))})")


def _as_pair(item: Any, where: str) -> LoRAPair:
    if isinstance(item, LoRAPair):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return LoRAPair(item[0], item[1])
    raise TypeError(
        f"{where}: a pair must be an (A, B) tuple or a lowrank_geom.LoRAPair, got {type(item).__name__}"
    )


class LowRankOptimizer(Optimizer):
    r"""Optimizes LoRA pairs ``(A, B)`` (paper orientation ``Z = A Bᵀ``) with a named strategy.

    Args:
        pairs: an iterable of pairs — ``(A, B)`` tuples of leaf tensors (``A: m×r``, ``B: n×r``) or
            :class:`~lowrank_geom.LoRAPair` (for factors stored with the rank dim elsewhere, e.g.
            PEFT's ``lora_A.weight`` of shape ``r×n``) — or an iterable of param-group dicts:
            ``{"pairs": [...], **hyperparameters}`` for pairs, and ``{"params": [...], ...}`` for
            parameters outside any pair, which are updated by AdamW (the *fallback group*; its
            keys ``lr``, ``betas`` = (0.9, 0.999), ``eps`` = 1e-8, ``weight_decay`` = 0).
        strategy: ``"lora_rite"``, ``"scaled_gd"``, ``"scaled_adam"``, ``"one_sided_adagrad"``
            (or any registered name); a pair group may override it with its own ``"strategy"``.
        lr: learning rate.
        maximize: maximize the objective instead of minimizing it (the strategies step along
            ``−∇``), as in torch's optimizers.
        foreach: ``None`` or ``True`` (default): same-shape pairs of a param group are stepped
            as one batch; ``False``: each pair alone (less peak memory, one kernel per pair).
            Either way the step is the same, bit for bit.
        fused, capturable, differentiable: torch's keyword arguments, taken at torch's defaults
            (``None``/``False``, ``False``, ``False``) so code that passes them through works;
            other values raise ``ValueError`` saying why.
        nonfinite: what a non-finite gradient does. ``"skip"`` (default): that pair's step is
            skipped — its factors and state stay exactly as before and its step count does not
            advance — and :meth:`nonfinite_skips` counts it; ``"raise"``: ``FloatingPointError``
            naming the pair (synchronizes with the device every step).
        compile: run the strategy's update through ``torch.compile`` (see :ref:`compiled-step`);
            ``lr`` enters the compiled graph as a tensor, so lr schedulers do not recompile it.
        **hyperparameters: the strategy's hyperparameters (see its class), stored in param groups.

    Skipped updates: a strategy may report factor updates it skipped
    (:class:`~lowrank_geom.strategies.PairUpdate` ``skipped``; LoRA-RITE's ``update_skipping``).
    :meth:`update_skips` counts them (pairs with finite gradients only), and the first step in
    which every pair of a param group had both factor updates skipped raises a ``UserWarning``
    (once per optimizer): the loss then does not move, which a summed loss can cause silently.

    :meth:`step` raises :class:`~lowrank_geom.PSDNumericsError` when an
    eigendecomposition fails even in float64; its message says what the driver checked
    (gradients, factors and state finite), the likely cause and what to try.

    Example:
        >>> import torch
        >>> from lowrank_geom import LowRankOptimizer
        >>> A = torch.zeros(8, 2, requires_grad=True)   # PEFT-style zero init
        >>> B = torch.randn(6, 2, requires_grad=True)
        >>> opt = LowRankOptimizer([(A, B)], strategy="lora_rite", lr=1e-2)
        >>> target = 0.1 * torch.randn(8, 6)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = (A @ B.T - target).pow(2).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> bool(A.abs().sum() > 0)
        True
    """

    def __init__(
        self,
        pairs: Iterable[Any],
        strategy: str = "lora_rite",
        lr: float | torch.Tensor = 1e-3,
        *,
        nonfinite: str = "skip",
        compile: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        **hyperparameters: Any,
    ) -> None:
        if isinstance(pairs, torch.Tensor):
            raise TypeError("pairs must be an iterable of (A, B) pairs or param-group dicts, got a Tensor")
        strat = get_strategy(strategy)
        _check_keys(strat, hyperparameters, f"{type(self).__name__}")
        defaults = dict(strat.defaults, lr=lr, strategy=strategy, nonfinite=nonfinite, compile=compile,
                        maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                        differentiable=differentiable)
        _check_driver_options(defaults, type(self).__name__)
        defaults.update(hyperparameters)
        strat.validate(defaults)
        items = list(pairs)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(items[0], dict):
            items = [{"pairs": items}]
        super().__init__(items, defaults)

    # ----------------------------------------------------------------------------------- groups
    @staticmethod
    def _strategy(name: str) -> Strategy:
        # strategies are stateless; looked up by name so pickling/deepcopy keep only plain data
        return get_strategy(name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: ``{"pairs": [...], **overrides}`` or a fallback ``{"params": [...], ...}``."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        g = dict(param_group)
        index = len(self.param_groups)
        if "pairs" in g and "params" in g:
            raise ValueError(f"param group {index}: give either 'pairs' or 'params', not both")
        if "pairs" in g:
            group = self._pair_group(g, index)
        elif "params" in g:
            group = self._fallback_group(g, index)
        else:
            raise ValueError(f"param group {index} has neither 'pairs' nor 'params'")
        seen = {id(p) for existing in self.param_groups for p in existing["params"]}
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"param group {index}: a tensor already belongs to another pair or group "
                    f"(shape {tuple(p.shape)}); each tensor may appear once"
                )
        self.param_groups.append(group)

    def _pair_group(self, g: dict[str, Any], index: int) -> dict[str, Any]:
        raw = g.pop("pairs")
        raw = [raw] if isinstance(raw, LoRAPair) else list(raw)
        if not raw:
            raise ValueError(f"param group {index} has no pairs")
        name = g.get("strategy", self.defaults["strategy"])
        strat = self._strategy(name)
        _check_keys(strat, {k: v for k, v in g.items() if k not in _DRIVER_KEYS}, f"param group {index}")
        base = self.defaults if name == self.defaults["strategy"] else dict(
            strat.defaults, lr=self.defaults["lr"], **{k: self.defaults[k] for k in _DRIVER_KEYS if k != "strategy"}
        )
        group = {k: v for k, v in base.items()}
        group.update(g)
        group["strategy"] = name
        strat.validate(group)
        _check_driver_options(group, f"param group {index}")
        params, rank_dims, names, layouts = [], [], [], []
        seen: dict[int, str] = {}
        for i, item in enumerate(raw):
            pair = _as_pair(item, f"param group {index}, pair {i}")
            label = pair.name or f"pair {i} of param group {index}"
            _validate_pair(pair, label)
            layouts.append((distributed.pair_layout(pair, label), label, pair.a.dtype))
            for t, which in ((pair.a, "A"), (pair.b, "B")):
                if id(t) in seen:
                    raise ValueError(f"{label}: factor {which} already appears in {seen[id(t)]}")
                seen[id(t)] = label
            params += [pair.a, pair.b]
            rank_dims.append([pair.a_rank_dim, pair.b_rank_dim])
            names.append(label)
        for layout, label, dtype in layouts:  # after every pair's layout is known to be valid
            distributed.check_strategy(layout, strat, group, label, dtype)
        group.update(params=params, rank_dims=rank_dims, pair_names=names)
        return group

    def _fallback_group(self, g: dict[str, Any], index: int) -> dict[str, Any]:
        params = g.pop("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        unknown = set(g) - set(fallback.DEFAULTS) - {"lr", "strategy"} - set(_TORCH_OPTIONS) - _SCHEDULER_KEYS
        if unknown:
            raise TypeError(f"param group {index} (fallback AdamW) got unexpected key(s): {sorted(unknown)}")
        if g.get("strategy", fallback.NAME) != fallback.NAME:
            raise ValueError(f"param group {index}: a 'params' group is the AdamW fallback group")
        group = dict(fallback.DEFAULTS, lr=self.defaults["lr"], **{k: self.defaults[k] for k in _TORCH_OPTIONS})
        group.update(g)
        _check_torch_options(group, f"param group {index} (fallback AdamW)")
        group.update(strategy=fallback.NAME, params=params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {index}: params must be Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        return group

    @staticmethod
    def _pairs(group: dict[str, Any]):
        ps = group["params"]
        for i, (rd, name) in enumerate(zip(group["rank_dims"], group["pair_names"])):
            yield ps[2 * i], ps[2 * i + 1], rd[0], rd[1], name

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step for every pair whose factors have gradients (pairs without are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["strategy"] == fallback.NAME:
                fallback.adamw_step(group["params"], self.state, group)
            else:
                self._step_pairs(group)
        return loss

    def _step_pairs(self, group: dict[str, Any]) -> None:
        """One step of every pair with gradients in ``group``, batched by (shapes, layout, dtype, device).

        Per bucket the factors and gradients are stacked in their stored layout (one contiguous
        copy each) and viewed as ``(P, rows, r)``; the state stays stacked between steps: each
        pair's ``self.state[p][k]`` is a view ``stacked[i]`` of the bucket's tensor, so the next
        step reuses the stacked tensor as long as every view is still in place (a checkpoint load
        or any replacement of a state tensor rebuilds the stack from the per-parameter tensors).
        """
        strat = self._strategy(group["strategy"])
        try:  # the group may have changed since construction (schedulers, user code): a few comparisons
            strat.validate(group)
            _check_driver_options(group, "")
        except ValueError as err:
            raise ValueError(f"param group {self._group_index(group)} (changed mid-run?): {err}") from None
        buckets: dict[tuple, list] = defaultdict(list)
        alone = group.get("foreach") is False  # one pair per batch
        for i, (a, b, ad, bd, name) in enumerate(self._pairs(group)):
            if a.grad is None and b.grad is None:
                continue
            if a.grad is None or b.grad is None:
                missing = "A" if a.grad is None else "B"
                raise RuntimeError(
                    f"{name}: factor {missing} has no gradient while the other has one; a LoRA "
                    "pair is optimized jointly (leave a frozen factor out of the optimizer)"
                )
            if a.grad.is_sparse or b.grad.is_sparse:
                raise RuntimeError(f"LowRankOptimizer does not support sparse gradients ({name})")
            # plain tensors as they are; DTensors (FSDP2) as their local shards, see distributed.py.
            # The key has the global shapes: same-layout pairs then have same-shape local shards
            # on every rank, and every rank forms the same buckets (so the same collectives).
            layout, loc = distributed.localize(a, b, ad, bd, name, strat, group)
            key = (tuple(a.shape), ad % a.ndim, tuple(b.shape), bd % b.ndim, a.dtype, a.device, layout) + ((i,) if alone else ())
            buckets[key].append((a, b, name, loc))
        if not buckets:
            return

        compiled = group.get("compile", False)
        cache = self.__dict__.setdefault("_stacked_state", {})
        batches, members, masks = [], [], []
        for (_, ad, _, bd, dtype, device, _layout, *_), items in buckets.items():
            cdt = compute_dtype(dtype)
            # the parameters key the state; their local tensors (the parameters themselves unless
            # DTensors) are read and written
            pa = [it[0] for it in items]
            pb = [it[1] for it in items]
            la = [it[3].a for it in items]
            lb = [it[3].b for it in items]
            row_reduce = items[0][3].row_reduce
            self._ensure_state(strat, group, items, ad, bd, cdt, device)
            full_a, hit_a = _cached_stack(cache, self.state, pa, "a")
            state_b, hit_b = _cached_stack(cache, self.state, pb, "b")
            # storages the members' state views: on a cache hit exactly the cached stacks
            views = [v for st in (full_a, state_b) for v in st.values()] if hit_a and hit_b else \
                [v for p in pa + pb for v in self.state[p].values() if isinstance(v, torch.Tensor)]
            ws = _Workspace(self.__dict__.setdefault("_workspaces", {}), tuple(map(id, pa)), views)
            a_s = _stacked_view(torch.stack(la, out=ws.empty("a", (len(la),) + la[0].shape, dtype, device)), ad).to(cdt)
            b_s = _stacked_view(torch.stack(lb, out=ws.empty("b", (len(lb),) + lb[0].shape, dtype, device)), bd).to(cdt)
            ga = [it[3].grad_a for it in items]
            gb = [it[3].grad_b for it in items]
            ga = _stacked_view(torch.stack(ga, out=ws.empty("grad_a", (len(ga),) + ga[0].shape, ga[0].dtype, device)), ad).to(cdt)
            gb = _stacked_view(torch.stack(gb, out=ws.empty("grad_b", (len(gb),) + gb[0].shape, gb[0].dtype, device)), bd).to(cdt)
            if group.get("maximize", False):  # the strategies minimize: they step along −∇ (our copies)
                ga, gb = ga.neg_(), gb.neg_()
            # a sum is non-finite iff some entry is (or, for |entries| ~ 1e38, overflows): one pass
            finite = torch.isfinite(ga.sum(dim=(1, 2)) + gb.sum(dim=(1, 2)))
            if row_reduce is not distributed.identity:
                # row shards: a pair is skipped on every rank if any rank's shard is non-finite
                finite = row_reduce((~finite).to(cdt)) == 0
            # one host sync per bucket buys the common all-finite case every masking pass below
            all_finite = bool(finite.all())
            if group["nonfinite"] == "raise" and not all_finite:
                bad = [it[2] for it, ok in zip(items, finite.tolist()) if not ok]
                raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}")
            if not all_finite:
                keep = finite.view(-1, 1, 1)
                ga = torch.where(keep, ga, torch.zeros((), dtype=cdt, device=device))
                gb = torch.where(keep, gb, torch.zeros((), dtype=cdt, device=device))
            state_a = {k: v for k, v in full_a.items() if k not in _DRIVER_STATE}
            if compiled and row_reduce is not distributed.identity:
                raise NotImplementedError(
                    f"{items[0][2]}: compile=True is not supported for row-sharded (FSDP2) factors "
                    "yet (the all-reduces would be traced); use compile=False for this param group"
                )
            # compiled: the strategy's large outputs are the compiler's to allocate (no out= buffers)
            batches.append(PairBatch(a_s, b_s, ga, gb, state_a, state_b, full_a["step"], row_reduce,
                                     *(() if compiled else (ws,))))
            members.append((pa, pb, la, lb, ad, bd, full_a))
            masks.append(None if all_finite else finite)

        try:
            if compiled:
                updates = self._compiled_update(strat, group, batches)
            else:
                updates = strat.update(batches, group)
        except PSDNumericsError as err:
            # psd.py only knows the matrix; what the driver checked belongs in the message
            dtypes = {m[2][0].dtype for m in members}  # the factors' own dtypes (batches: compute)
            msg = self._psd_failure(group, batches, masks, dtypes, err)
            raise PSDNumericsError(msg) from err
        report = _SkipReport()
        for batch, upd, (pa, pb, la, lb, ad, bd, full_a), finite in zip(batches, updates, members, masks):
            delta_a, delta_b, new_a, new_b = upd[:4]
            if finite is None:
                step, skips = batch.step + 1.0, full_a["nonfinite_skips"]
                _apply(la, delta_a, ad, upd.scale, upd.decay)
                _apply(lb, delta_b, bd, upd.scale, upd.decay)
            else:
                delta_a, delta_b = upd.additive(batch.a, batch.b)
                keep = finite.view(-1, 1, 1)
                delta_a = torch.where(keep, delta_a, torch.zeros((), dtype=delta_a.dtype, device=keep.device))
                delta_b = torch.where(keep, delta_b, torch.zeros((), dtype=delta_b.dtype, device=keep.device))
                new_a = _select_state(finite, new_a, batch.state_a)
                new_b = _select_state(finite, new_b, batch.state_b)
                fin = finite.to(torch.float32)
                step, skips = batch.step + fin, full_a["nonfinite_skips"] + (1.0 - fin)
                _apply(la, delta_a, ad, 1.0, 0.0)
                _apply(lb, delta_b, bd, 1.0, 0.0)
            update_skips = report.count(upd.skipped, finite, full_a["update_skips"])
            # keys a strategy does not return keep their stacked value
            counters = {"step": step, "nonfinite_skips": skips, "update_skips": update_skips}
            _install(cache, self.state, pa, "a", {**full_a, **new_a, **counters})
            _install(cache, self.state, pb, "b", {**batch.state_b, **new_b})
        if not self.__dict__.get("_warned_update_skips") and report.every_pair_skipped():
            self._warned_update_skips = True
            warnings.warn(self._all_skipped_message(group), UserWarning, stacklevel=2)

    def _ensure_state(self, strat: Strategy, group: dict[str, Any], items: list, ad: int, bd: int,
                      cdt: torch.dtype, device: torch.device) -> None:
        """Create the state of new pairs, and fit existing state to the current hyperparameters.

        A hyperparameter switched mid-run (a scheduler's momentum, an option turned on) may need
        state keys that the pair's state lacks, or leave some unused:
        :meth:`~lowrank_geom.strategies.Strategy.reconcile_state` adds (as ``init`` makes them)
        or drops those, or refuses the switch naming the option."""
        keys_a, keys_b = strat.state_keys(group, cdt)
        for a, b, _, loc in items:
            sa, sb = self.state[a], self.state[b]
            if not sa:
                new_a, new_b = strat.init(factor_view(loc.a, ad).to(cdt), factor_view(loc.b, bd).to(cdt), group)
                sa.update({k: _scalar(device) for k in _DRIVER_STATE}, **new_a)
                sb.update(new_b)
                continue
            # state from a checkpoint that predates a driver counter: it counts from here on
            for k in _DRIVER_STATE:
                if k not in sa:
                    sa[k] = _scalar(device)
            own_a = {k: v for k, v in sa.items() if k not in _DRIVER_STATE}
            if own_a.keys() == keys_a and sb.keys() == keys_b:
                continue
            new_a, new_b = strat.reconcile_state(
                factor_view(loc.a, ad).to(cdt), factor_view(loc.b, bd).to(cdt), own_a, dict(sb), group)
            for k in own_a.keys() - new_a.keys():
                del sa[k]
            sa.update(new_a)
            sb.clear()
            sb.update(new_b)

    def _group_index(self, group: dict[str, Any]) -> int:
        # by identity: == on param groups would compare their tensors
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _all_skipped_message(self, group: dict[str, Any]) -> str:
        name, threshold = group["strategy"], group.get("update_skipping")
        by = f"by update_skipping={threshold}" if threshold is not None else f"by strategy {name!r}"
        msg = (
            f"param group {self._group_index(group)} ({name}): every pair's update was skipped "
            f"this step {by} (both factors of every pair), so the loss will not move while this "
            "lasts, apart from momentum and weight decay carried over from earlier steps. "
        )
        if threshold is not None:
            msg += (
                "The factors' gradients exceed the threshold: use a mean-reduced loss (a summed "
                "loss grows with the batch), raise update_skipping, or set update_skipping=0 to "
                "turn skipping off. "
            )
        return msg + "update_skips() counts skipped factor updates; this warns once per optimizer."

    def _psd_failure(
        self, group: dict[str, Any], batches: list[PairBatch], masks: list, dtypes: set,
        err: Exception,
    ) -> str:
        """The message of a :class:`PSDNumericsError` raised by a strategy: what the driver knows.

        Runs only on that error path, so its checks may synchronize with the device."""
        name = group["strategy"]
        yes_no = lambda ok: "yes" if ok else "no"  # noqa: E731
        masked = sum(int((~m).sum()) for m in masks if m is not None)
        finite = lambda t: bool(torch.isfinite(t).all())  # noqa: E731
        factors_ok = all(finite(b.a) and finite(b.b) for b in batches)
        states = [v for b in batches for st in (b.state_a, b.state_b) for v in st.values()]
        state_ok = all(finite(v) for v in states if v.is_floating_point())
        hps = ", ".join(f"{k}={group[k]!r}" for k in ("eps", "engine") if k in group)
        if masked:
            grads = (
                "The gradients the strategy received were finite: the driver checks them before "
                f"the update and passed the {masked} pair(s) with a non-finite gradient as zeros "
                "(their step is skipped)"
            )
        else:
            grads = "The gradients of this param group were finite (the driver checks them first)"
        msg = (
            f"param group {self._group_index(group)}, strategy {name!r}"
            + (f" ({hps})" if hps else "")
            + f": {err}. {grads}. Every factor finite: {yes_no(factors_ok)}; every state tensor "
            f"finite: {yes_no(state_ok)}. "
        )
        if factors_ok and state_ok:
            msg += (
                "Likely cause: a rank-deficient or ill-conditioned factor (e.g. a zero-initialized "
                "one) or a second moment whose scale underflows or overflows the compute dtype. "
            )
        else:
            msg += "The non-finite values predate this step's update (an earlier step diverged?). "
        tries = [f"a larger eps (now {group['eps']!r})"] if "eps" in group else []
        if group.get("engine") == "gram":  # LoRA-RITE's opt-in engine ("auto" is the QR engine)
            tries.append("engine='qr'")
        half = dtypes & {torch.bfloat16, torch.float16}
        if half:
            names = "/".join(sorted(str(d).removeprefix("torch.") for d in half))
            tries.append(f"float32 factors instead of {names}")
        tries.append(
            "nonfinite='raise' to stop at the first non-finite gradient, if earlier steps had any "
            f"(nonfinite_skips() = {self.nonfinite_skips()} so far)"
        )
        return msg + "Try: " + "; ".join(tries) + "."

    def _compiled_update(self, strat: Strategy, group: dict[str, Any], batches: list[PairBatch]) -> list[PairUpdate]:
        """``strat.update`` through ``torch.compile`` (one compiled function per strategy and optimizer).

        The compiled function sees the hyperparameters only, with ``lr`` as a 0-dim float64 tensor:
        a float would be baked into the graph, and every new value from an lr scheduler would
        recompile it. Batches of new shapes or dtypes compile once each (``dynamic=False``).
        """
        fns = self.__dict__.setdefault("_compiled", {})
        fn = fns.get(strat.name)
        if fn is None:
            fn = fns[strat.name] = torch.compile(strat.update, dynamic=False)
        hp = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}
        device = batches[0].a.device
        hp["lr"] = torch.as_tensor(group["lr"], dtype=torch.float64, device=device).detach().clone()
        return fn(batches, hp)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, except that the row-wise state of row-sharded
        (FSDP2) pairs is a ``DTensor`` laid out and sharded like its factor, so that
        ``torch.distributed.checkpoint`` saves it shard by shard (see :doc:`/distributed`)."""
        return distributed.shard_pair_state(super().state_dict(), self.param_groups, self._strategy)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; pair layout and strategies must match, state dtypes are kept exactly.

        Follows ``torch.optim.Optimizer.load_state_dict`` (pre-hooks may edit or replace the
        state dict, post-hooks run last; saved hyperparameters replace the current ones) with
        two differences: tensors of pair state keep their dtype exactly (torch casts floating
        state to each parameter's dtype, which would round the float32 state of bf16 factors)
        and are copied, not aliased; and group keys a checkpoint lacks (hyperparameters added
        since it was written) keep their current values. The fallback AdamW group follows
        torch's rules.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        self._check_checkpoint_groups(saved_groups)
        params = [p for g in self.param_groups for p in g["params"]]
        index = dict(zip((i for g in saved_groups for i in g["params"]), params))
        # pair parameters and their rank dims (DCP hands back row-wise state as DTensors)
        pair_params = {p: rd for g in self.param_groups if g["strategy"] != fallback.NAME
                       for p, rd in zip(g["params"], (d for dims in g["rank_dims"] for d in dims))}
        state: defaultdict[Any, dict] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            p = index.get(key)
            if p is None:  # state of no parameter is kept as is (torch does too)
                state[key] = saved
                continue
            state[p] = {k: _loaded(v, p, k, pair_params.get(p)) for k, v in saved.items()}
        groups = []
        for cur, old in zip(self.param_groups, saved_groups):
            group = {k: v for k, v in cur.items() if k != "params"}
            group.update(old)
            group["params"] = cur["params"]
            groups.append(group)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_checkpoint_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        """``ValueError`` unless the checkpoint's groups are this optimizer's (pairs, layouts, strategies)."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for i, (cur, old) in enumerate(zip(self.param_groups, saved_groups)):
            if len(cur["params"]) != len(old["params"]):
                raise ValueError(
                    f"param group {i}: the checkpoint has {len(old['params'])} tensors, this optimizer "
                    f"{len(cur['params'])}; load into an optimizer built over the same pairs"
                )
            for key in ("strategy", "rank_dims"):
                if cur.get(key) != old.get(key):
                    raise ValueError(
                        f"param group {i}: checkpoint has {key}={old.get(key)!r}, this optimizer "
                        f"has {cur.get(key)!r}; load into an optimizer built over the same pairs"
                    )

    # --------------------------------------------------------------------------------- reports
    def nonfinite_skips(self) -> int:
        """How many pair steps were skipped for a non-finite gradient since the state was created."""
        return self._driver_count("nonfinite_skips")

    def update_skips(self) -> int:
        """How many factor updates the strategies skipped since the state was created.

        Counted from :class:`~lowrank_geom.strategies.PairUpdate` ``skipped`` (LoRA-RITE's
        update skipping) for pairs with finite gradients; a pair skipped for a non-finite
        gradient is counted by :meth:`nonfinite_skips` only. Up to 2 per pair and step (one per
        factor)."""
        return self._driver_count("update_skips")

    def _driver_count(self, key: str) -> int:
        total = 0.0
        for group in self.param_groups:
            if group["strategy"] == fallback.NAME:
                continue
            for a, *_ in self._pairs(group):
                if key in self.state.get(a, {}):
                    total += float(self.state[a][key])
        return int(total)

    def state_bytes(self) -> int:
        """Exact bytes held in optimizer state (Σ numel · element_size over every state tensor)."""
        return sum(
            v.numel() * v.element_size()
            for s in self.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            if g["strategy"] == fallback.NAME:
                head = f"Parameter Group {i}: fallback AdamW over {len(g['params'])} tensors"
            else:
                head = f"Parameter Group {i}: {g['strategy']} over {len(g['rank_dims'])} pairs"
            lines.append(head)
            for k in sorted(g):
                if k not in ("params", "rank_dims", "pair_names", "strategy"):
                    lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


def _check_keys(strat: Strategy, hp: dict[str, Any], where: str) -> None:
    unknown = set(hp) - set(strat.defaults) - {"lr"} - _SCHEDULER_KEYS
    if unknown:
        raise TypeError(
            f"{where}: strategy {strat.name!r} got unexpected hyperparameter(s) {sorted(unknown)}; "
            f"it takes lr and {sorted(strat.defaults)}"
        )


def _validate_pair(pair: LoRAPair, label: str) -> None:
    a, b = pair.a, pair.b
    for t, which in ((a, "A"), (b, "B")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: factor {which} must be a Tensor, got {type(t).__name__}")
        if not t.is_leaf:
            raise ValueError(f"{label}: can't optimize a non-leaf Tensor (factor {which})")
        if t.is_complex() or not t.is_floating_point():
            raise ValueError(f"{label}: factor {which} must be a real floating-point tensor, got {t.dtype}")
        if t.is_sparse:
            raise ValueError(f"{label}: factor {which} is sparse; sparse factors are not supported")
        if t.ndim < 2:
            raise ValueError(f"{label}: factor {which} must have >= 2 dims, got shape {tuple(t.shape)}")
    if a is b:
        raise ValueError(f"{label}: A and B are the same tensor")
    if a.dtype != b.dtype:
        raise ValueError(f"{label}: dtype mismatch, A is {a.dtype} and B is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{label}: device mismatch, A is on {a.device} and B on {b.device}")
    try:
        ra, rb = a.shape[pair.a_rank_dim], b.shape[pair.b_rank_dim]
    except IndexError:
        raise ValueError(f"{label}: rank dim out of range for shapes {tuple(a.shape)}, {tuple(b.shape)}") from None
    if ra != rb:
        raise ValueError(
            f"{label}: rank mismatch, A {tuple(a.shape)} has r={ra} (dim {pair.a_rank_dim}) but "
            f"B {tuple(b.shape)} has r={rb} (dim {pair.b_rank_dim})"
        )
    m, n = a.numel() // ra, b.numel() // rb
    if ra > min(m, n):
        raise ValueError(f"{label}: rank r={ra} exceeds min(m, n) = min({m}, {n})")


def _stacked_view(x: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``(P, *stored)`` stacked factors as ``(P, rows, r)``: :func:`factor_view` of each, a view for 2-D factors."""
    moved = x.movedim(rank_dim + 1, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


def _unstacked(y: torch.Tensor, like: torch.Tensor, rank_dim: int) -> list[torch.Tensor]:
    """Inverse of :func:`_stacked_view`: per-pair views of ``(P, rows, r)`` in the stored layout of ``like``."""
    moved_shape = like.movedim(rank_dim, -1).shape
    return list(y.reshape((y.shape[0],) + tuple(moved_shape)).movedim(-1, rank_dim + 1).unbind(0))


def _apply(params: list[torch.Tensor], delta: torch.Tensor, rank_dim: int, scale, decay) -> None:
    """``p ← (1 − decay)·p + scale·δ_p`` in place for every parameter, with foreach kernels."""
    # 0-dim CPU tensors (a compiled update's lr) as numbers: no extra pass over δ, no device sync
    scale, decay = (float(x) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x for x in (scale, decay))
    if isinstance(decay, torch.Tensor) or decay != 0:
        torch._foreach_mul_(params, 1.0 - decay)
    if isinstance(scale, torch.Tensor):
        delta = delta * scale.to(delta)
        scale = 1.0
    torch._foreach_add_(params, _unstacked(delta, params[0], rank_dim), alpha=scale)


class _Workspace:
    """Buffers of one bucket kept between steps, for its stacked factors and gradients and for the
    strategy's large outputs (``PairBatch.workspace``): fresh multi-MB tensors every step cost a
    page fault per 4 KiB here, about as much as the arithmetic.

    ``empty(name, shape)`` returns one of two rotating buffers of that name, never one whose
    storage a state tensor of the bucket's pairs still views. Buffers belong to one member list;
    a new member list drops the buffers of overlapping ones (state views keep those alive), so a
    buffer can only be viewed by the state of its own members, which is what is checked.
    """

    def __init__(self, store: dict, members: tuple, views: list[torch.Tensor]) -> None:
        self.store, self.members = store, members
        if not any(k[0] == members for k in store):
            for k in [k for k in store if set(k[0]) & set(members)]:
                del store[k]
        self.in_use = {v.untyped_storage().data_ptr() for v in views}

    def empty(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        shape = tuple(shape)
        bufs = self.store.get((self.members, name))
        if bufs is None or bufs[0].shape != shape or bufs[0].dtype != dtype or bufs[0].device != device:
            bufs = self.store[(self.members, name)] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        for buf in bufs:
            ptr = buf.untyped_storage().data_ptr()
            if ptr not in self.in_use:
                self.in_use.add(ptr)  # one live tensor per name and step
                return buf
        return torch.empty(shape, dtype=dtype, device=device)

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.empty(name, like.shape, like.dtype, like.device)


def _cached_stack(cache: dict, state: dict, params: list[torch.Tensor], side: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The stacked state of ``params`` and whether it is the cached stack (every ``state[p][k]`` still its view) or a fresh ``torch.stack``."""
    key = (side, tuple(id(p) for p in params))
    hit = cache.get(key)
    if hit is not None:
        stacked, views = hit
        if all(
            len(state[p]) == len(stacked) and all(state[p].get(k) is views[k][i] for k in stacked)
            for i, p in enumerate(params)
        ):
            return dict(stacked), True
    keys = list(state[params[0]])
    return {k: _stack_like([state[p][k] for p in params]) for k in keys}, False


def _stack_like(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps the members' memory layout (their dim order by stride).

    A strategy's outputs may be transposed views (:func:`~lowrank_geom.strategies.base.workspace_like`),
    so an uninterrupted run keeps such state; matrix products round differently on another layout,
    so a resumed run must rebuild the same one to continue bit for bit."""
    first = tensors[0]
    if first.ndim < 2 or first.is_contiguous():
        return torch.stack(tensors)
    order = sorted(range(first.ndim), key=lambda d: -first.stride(d))  # outermost dim first
    stacked = torch.stack([t.permute(order) for t in tensors])
    inverse = sorted(range(first.ndim), key=order.__getitem__)
    return stacked.permute([0] + [1 + d for d in inverse])


def _install(cache: dict, state: dict, params: list[torch.Tensor], side: str, new: dict[str, torch.Tensor]) -> None:
    """Make ``state[p_i][k]`` the view ``new[k][i]`` for every key and remember the stack for the next step."""
    views = {k: v.unbind(0) for k, v in new.items()}
    for i, p in enumerate(params):
        sp = state[p]
        for k, vs in views.items():
            sp[k] = vs[i]
    key = (side, tuple(id(p) for p in params))
    # one cached stack per side and member list; drop stacks of other member lists of these params
    for other in [k for k in cache if k[0] == side and k != key and set(k[1]) & set(key[1])]:
        del cache[other]
    cache[key] = (dict(new), views)


class _SkipReport:
    """One step of one param group: each batch's :attr:`PairUpdate.skipped`, counted for pairs
    with finite gradients, and whether every pair that stepped had both factor updates skipped."""

    def __init__(self) -> None:
        self.complete = True  # every batch reported ``skipped``
        self.all_both: list[torch.Tensor] = []
        self.stepped: list[torch.Tensor] = []

    def count(
        self, skipped: torch.Tensor | None, finite: torch.Tensor | None, total: torch.Tensor
    ) -> torch.Tensor:
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


def _loaded(value: Any, p: torch.Tensor, key: str, rank_dim: int | None) -> Any:
    """A checkpoint's state value for parameter ``p`` (``rank_dim``: ``p``'s in its pair, None
    outside pairs): pair state keeps its dtype and moves to ``p``'s device as a copy, a DTensor
    (row-wise state of a distributed checkpoint) as its local ``(rows, r)`` shard; fallback AdamW
    state follows torch (``step`` as is, floating state cast to ``p``'s dtype)."""
    if not isinstance(value, torch.Tensor):
        return value
    if rank_dim is not None:
        value = distributed.local_state(value, p, rank_dim, key)
        return value.detach().to(device=p.device, copy=True)
    if key == "step":
        return value
    if p.is_floating_point() and value.is_floating_point():
        return value.to(dtype=p.dtype, device=p.device)
    return value.to(device=p.device)


def _scalar(device: torch.device) -> torch.Tensor:
    """A driver counter: a 0-dim float32 zero."""
    return torch.zeros((), dtype=torch.float32, device=device)


def _select_state(finite: torch.Tensor, new: dict, old: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in new.items():
        if k in old:
            keep = finite.view((-1,) + (1,) * (v.ndim - 1))
            v = torch.where(keep, v, old[k].to(v.dtype))
        out[k] = v
    return out


class LoRARITE(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="lora_rite"``; hyperparameters as in
    :class:`~lowrank_geom.strategies.LoRARITEStrategy` (``betas``, ``eps``, ``weight_decay``,
    ``escape``, ``second_moment``, ``bias_correction``, ``row_normalize``,
    ``clip_unmagnified_grad``, ``update_skipping``, ``update_capping``, ``balance``, ``basis``)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-3, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="lora_rite", lr=lr, **hyperparameters)


class ScaledGD(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="scaled_gd"``; hyperparameters ``delta``,
    ``momentum``, ``weight_decay`` (see :class:`~lowrank_geom.strategies.ScaledGDStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-2, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="scaled_gd", lr=lr, **hyperparameters)


class ScaledAdam(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="scaled_adam"``; hyperparameters ``betas``,
    ``eps``, ``delta``, ``weight_decay`` (see :class:`~lowrank_geom.strategies.ScaledAdamStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-3, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="scaled_adam", lr=lr, **hyperparameters)


class OneSidedAdagrad(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="one_sided_adagrad"``; hyperparameters ``eps``,
    ``weight_decay`` (see :class:`~lowrank_geom.strategies.OneSidedAdagradStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-2, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="one_sided_adagrad", lr=lr, **hyperparameters)
