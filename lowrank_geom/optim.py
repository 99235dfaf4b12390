"""``LowRankOptimizer``: one ``torch.optim.Optimizer`` that drives any strategy over LoRA pairs.

The driver owns what every strategy shares: param groups of pairs, argument validation, lazy
state, batching of same-shape pairs, dtype promotion for linear algebra, the non-finite gradient
policy and exact checkpoints. The math lives in :mod:`lowrank_geom.strategies`.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from lowrank_geom import distributed, fallback
from lowrank_geom.buckets import Active, Bucket, Gathered, PairRef, SkipReport, bucket_key, build_buckets
from lowrank_geom.geometry import PSDNumericsError
from lowrank_geom.pairs import LoRAPair
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
    raise TypeError(f"{where}: a pair must be an (A, B) tuple or a lowrank_geom.LoRAPair, got {type(item).__name__}")


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
        defaults = dict(
            strat.defaults,
            lr=lr,
            strategy=strategy,
            nonfinite=nonfinite,
            compile=compile,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
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
        self.__dict__.pop("_bucket_sets", None)  # group indices and pairs may have changed

    def _pair_group(self, g: dict[str, Any], index: int) -> dict[str, Any]:
        raw = g.pop("pairs")
        raw = [raw] if isinstance(raw, LoRAPair) else list(raw)
        if not raw:
            raise ValueError(f"param group {index} has no pairs")
        name = g.get("strategy", self.defaults["strategy"])
        strat = self._strategy(name)
        _check_keys(strat, {k: v for k, v in g.items() if k not in _DRIVER_KEYS}, f"param group {index}")
        base = (
            self.defaults
            if name == self.defaults["strategy"]
            else dict(
                strat.defaults, lr=self.defaults["lr"], **{k: self.defaults[k] for k in _DRIVER_KEYS if k != "strategy"}
            )
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
        coupled: dict[str, list[dict[str, Any]]] = {}
        for group in self.param_groups:
            if group["strategy"] == fallback.NAME:
                fallback.adamw_step(group["params"], self.state, group)
            elif self._strategy(group["strategy"]).couples_groups(group):
                coupled.setdefault(group["strategy"], []).append(group)
            else:
                self._step_pairs([group])
        for groups in coupled.values():  # after the others: groups never share a parameter
            self._step_pairs(groups)
        return loss

    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        """One step of every pair with gradients in ``groups`` (one, or those its strategy couples):
        per bucket (:mod:`lowrank_geom.buckets`) gather a batch, update all batches at once, apply each."""
        strat = self._strategy(groups[0]["strategy"])
        for group in groups:
            try:  # the group may have changed since construction (schedulers, user code): a few comparisons
                strat.validate(group)
                _check_driver_options(group, "")
            except ValueError as err:
                raise ValueError(f"param group {self._group_index(group)} (changed mid-run?): {err}") from None
        work = [(group, gathered) for group in groups if (gathered := self._gather(strat, group))]
        if not work:
            return
        for (group, gathered), updates in zip(work, self._update(strat, work)):
            report = SkipReport()
            for g, upd in zip(gathered, updates):
                g.bucket.apply(g, upd, self.state, report)
            if not self.__dict__.get("_warned_update_skips") and report.every_pair_skipped():
                self._warned_update_skips = True
                warnings.warn(self._all_skipped_message(group), UserWarning, stacklevel=3)

    def _gather(self, strat: Strategy, group: dict[str, Any]) -> list[Gathered]:
        """Each bucket's batch of the pairs that have gradients (buckets rebuilt once if the model
        was moved or cast since they were built)."""
        for _ in range(2):
            try:
                return [
                    bucket.gather(active, self.state, strat, group)
                    for bucket in self._buckets(group)
                    if (active := self._active(bucket, strat, group))
                ]
            except _Rebucket:
                continue
        raise RuntimeError("the pairs' shapes, dtypes or devices keep changing during the step")

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """The buckets of ``group``, built once; rebuilt when its pairs or ``foreach`` changed, and after
        :meth:`add_param_group` or :meth:`load_state_dict` (which drop them all)."""
        index = self._group_index(group)
        sets = self.__dict__.setdefault("_bucket_sets", {})
        alone = group.get("foreach") is False
        kept = sets.get(index)
        if kept is None or kept.params is not group["params"] or kept.alone != alone:
            refs = [PairRef(a, b, ad, bd, name) for a, b, ad, bd, name in self._pairs(group)]
            kept = sets[index] = _BucketSet(group["params"], alone, build_buckets(refs, alone))
        return kept.buckets

    def _active(self, bucket: Bucket, strat: Strategy, group: dict[str, Any]) -> list[Active]:
        """The pairs of ``bucket`` with gradients, as local tensors (DTensor shards under FSDP2)."""
        active = []
        for i, ref in enumerate(bucket.pairs):
            a, b = ref.a, ref.b
            if a.grad is None and b.grad is None:
                continue
            if a.grad is None or b.grad is None:
                raise RuntimeError(
                    f"{ref.name}: factor {'A' if a.grad is None else 'B'} has no gradient while the other "
                    "has one; a LoRA pair is optimized jointly (leave a frozen factor out of the optimizer)"
                )
            if a.grad.is_sparse or b.grad.is_sparse:
                raise RuntimeError(f"LowRankOptimizer does not support sparse gradients ({ref.name})")
            # plain tensors as they are; DTensors (FSDP2) as their local shards, see distributed.py
            layout, loc = distributed.localize(a, b, ref.a_rank_dim, ref.b_rank_dim, ref.name, strat, group)
            if bucket_key(ref, layout) != bucket.key:  # the model was moved or cast since the buckets were built
                self.__dict__.pop("_bucket_sets", None)
                raise _Rebucket
            if group.get("compile", False) and layout.kind == "row_sharded":
                raise NotImplementedError(
                    f"{ref.name}: compile=True is not supported for row-sharded (FSDP2) factors yet "
                    "(the all-reduces would be traced); use compile=False for this param group"
                )
            active.append(Active(i, loc))
        return active

    def _update(self, strat: Strategy, work: list[tuple[dict[str, Any], list[Gathered]]]) -> list[list[PairUpdate]]:
        """The strategy's updates of every batch of the groups in ``work``: :meth:`Strategy.update`
        for one uncoupled group, :meth:`Strategy.update_groups` for coupled ones (compiled with
        ``compile=True``, in every coupled group)."""
        groups = [group for group, _ in work]
        args = [([g.batch for g in gathered], group) for group, gathered in work]
        try:
            coupled = strat.couples_groups(groups[0])
            if all(group.get("compile", False) for group in groups):
                return self._compiled_update(strat, args, coupled)
            return strat.update_groups(args) if coupled else [strat.update(*args[0])]
        except PSDNumericsError as err:
            # psd.py only knows the matrix; what the driver checked belongs in the message
            gathered = [g for _, gs in work for g in gs]
            dtypes = {g.bucket.dtype for g in gathered}  # the factors' own dtypes (batches: compute)
            msg = self._psd_failure(groups, [g.batch for g in gathered], [g.finite for g in gathered], dtypes, err)
            raise PSDNumericsError(msg) from err

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
        self,
        groups: list[dict[str, Any]],
        batches: list[PairBatch],
        masks: list,
        dtypes: set,
        err: Exception,
    ) -> str:
        """The message of a :class:`PSDNumericsError` raised by a strategy: what the driver knows.

        Runs only on that error path, so its checks may synchronize with the device."""
        group = groups[0]  # coupled groups: one strategy; their eps and engine may differ
        name = group["strategy"]
        yes_no = lambda ok: "yes" if ok else "no"
        masked = sum(int((~m).sum()) for m in masks if m is not None)
        finite = lambda t: bool(torch.isfinite(t).all())
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
            f"param group{'s' if len(groups) > 1 else ''} {', '.join(str(self._group_index(g)) for g in groups)}, "
            f"strategy {name!r}"
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

    def _compiled_update(
        self, strat: Strategy, work: list[tuple[list[PairBatch], dict[str, Any]]], coupled: bool
    ) -> list[list[PairUpdate]]:
        """:meth:`Strategy.update` of one group, or :meth:`Strategy.update_groups` of coupled ones,
        through ``torch.compile`` (one compiled function per strategy, method and optimizer).

        The compiled function sees the hyperparameters only, with ``lr`` as a 0-dim float64 tensor:
        a float would be baked into the graph, and every new value from an lr scheduler would
        recompile it. Batches of new shapes or dtypes compile once each (``dynamic=False``).
        """
        method = "update_groups" if coupled else "update"
        fns = self.__dict__.setdefault("_compiled", {})
        fn = fns.get((strat.name, method))
        if fn is None:
            fn = fns[(strat.name, method)] = torch.compile(getattr(strat, method), dynamic=False)
        args = []
        for batches, group in work:
            hp = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}
            device = batches[0].a.device
            hp["lr"] = torch.as_tensor(group["lr"], dtype=torch.float64, device=device).detach().clone()
            args.append((batches, hp))
        return fn(args) if coupled else [fn(*args[0])]

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
        pair_params = {
            p: rd
            for g in self.param_groups
            if g["strategy"] != fallback.NAME
            for p, rd in zip(g["params"], (d for dims in g["rank_dims"] for d in dims))
        }
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
        self.__dict__.pop("_bucket_sets", None)  # new state tensors: the buckets' stacks are stale
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
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, torch.Tensor)
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


class _BucketSet(NamedTuple):
    """A param group's buckets and what they were built for (its params list, ``foreach=False``)."""

    params: list
    alone: bool
    buckets: list[Bucket]


class _Rebucket(Exception):
    """Raised inside a step when a pair no longer fits its bucket: rebuild the buckets and gather again."""


class LoRARITE(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="lora_rite"``; hyperparameters as in
    :class:`~lowrank_geom.strategies.LoRARITEStrategy` (``betas``, ``eps``, ``weight_decay``,
    ``escape``, ``second_moment``, ``bias_correction``, ``row_normalize``,
    ``clip_unmagnified_grad``, ``update_skipping``, ``update_capping``, ``relative_step_cap``,
    ``rebalance``, ``balance``, ``basis``, ``engine``, ``clip_scope``)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-3, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="lora_rite", lr=lr, **hyperparameters)


class ScaledGD(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="scaled_gd"``; hyperparameters ``delta``,
    ``momentum``, ``weight_decay``, ``relative_step_cap`` (see :class:`~lowrank_geom.strategies.ScaledGDStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-2, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="scaled_gd", lr=lr, **hyperparameters)


class ScaledAdam(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="scaled_adam"``; hyperparameters ``betas``,
    ``eps``, ``delta``, ``weight_decay``, ``bias_correction``, ``reference`` (see
    :class:`~lowrank_geom.strategies.ScaledAdamStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-3, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="scaled_adam", lr=lr, **hyperparameters)


class OneSidedAdagrad(LowRankOptimizer):
    """:class:`LowRankOptimizer` with ``strategy="one_sided_adagrad"``; hyperparameters ``eps``,
    ``weight_decay`` (see :class:`~lowrank_geom.strategies.OneSidedAdagradStrategy`)."""

    def __init__(self, pairs: Iterable[Any], lr: float | torch.Tensor = 1e-2, **hyperparameters: Any) -> None:
        super().__init__(pairs, strategy="one_sided_adagrad", lr=lr, **hyperparameters)
