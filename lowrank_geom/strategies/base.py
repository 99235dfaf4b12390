"""The strategy interface: pure ``init`` / ``update`` over explicit per-factor state, and a registry.

A strategy sees a *batch* of same-shape pairs stacked along a leading dim: factors ``a``
``(P, m, r)`` and ``b`` ``(P, n, r)``, their gradients, and the state of every pair as dicts of
stacked tensors. It returns the additive updates of both factors and the new state; it never
touches parameters or ``torch.optim`` machinery (the driver in :mod:`lowrank_geom.optim` owns
groups, validation, batching, dtype promotion, the NaN policy and checkpoints). Several batches
of one param group are passed together so a strategy can reduce over all pairs of a group, and
the groups a strategy couples (:meth:`Strategy.couples_groups`) together, so it can reduce over
several groups (LoRA-RITE's clipping does, per group or over all groups).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pkgutil
import types
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

State = dict[str, torch.Tensor]


class PairBatch(NamedTuple):
    """Same-shape pairs stacked along dim 0, in the compute dtype ``promote_types(dtype, float32)``.

    ``step`` is ``(P,)``: how many steps each pair has taken before this one (0 on the first).
    ``row_reduce`` sums a tensor of per-shard partial row sums over the row shards of the
    factors: the identity on one process; an all-reduce when the factors are row-sharded
    (FSDP2). Every quantity a strategy sums over the rows of a factor (Grams ``XᵀY``, squared
    norms) must go through it, so the math stays correct on shards.
    """

    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    state_a: State
    state_b: State
    step: torch.Tensor
    row_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    workspace: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, like: torch.empty_like(like)


class PairUpdate(NamedTuple):
    """Updates ``A ← (1 − decay)·A + scale·delta_a`` (B alike) and the new state.

    ``scale = 1, decay = 0`` (the defaults): ``delta_a`` is the additive update with the learning
    rate applied. A strategy may instead return its unscaled direction with ``scale = −lr`` and
    the coupled weight decay as ``decay = lr·λ``, so the driver applies both in its in-place
    update of the parameters without materializing ``δA`` (one pass less over every factor).

    ``skipped`` (optional, a report that changes no update): ``(P,)``, how many of each pair's
    two factor updates (0, 1 or 2) the strategy skipped this step, e.g. LoRA-RITE's update
    skipping, which drops a factor's gradient when its unmagnified RMS exceeds a threshold. Any
    real dtype. The driver adds it, for pairs with finite gradients, to A's state
    ``update_skips`` (:meth:`~lowrank_geom.LowRankOptimizer.update_skips`) and warns once when
    every pair of a param group had both updates skipped. ``None`` (the default): not reported.
    """

    delta_a: torch.Tensor
    delta_b: torch.Tensor
    state_a: State
    state_b: State
    scale: float | torch.Tensor = 1.0
    decay: float | torch.Tensor = 0.0
    skipped: torch.Tensor | None = None

    def additive(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive updates ``(δA, δB)`` of factors ``a``, ``b`` (materialized)."""
        out = []
        for delta, x in ((self.delta_a, a), (self.delta_b, b)):
            if not (isinstance(self.scale, float) and self.scale == 1.0):
                delta = delta * (self.scale.to(delta) if isinstance(self.scale, torch.Tensor) else self.scale)
            if isinstance(self.decay, torch.Tensor) or self.decay != 0:
                delta = delta - (self.decay.to(x) if isinstance(self.decay, torch.Tensor) else self.decay) * x
            out.append(delta)
        return out[0], out[1]


class Strategy:
    """Base class of a strategy. Subclasses set ``name`` and ``defaults`` and define ``init``,
    ``update_batch`` (or ``update`` for group-wide reductions) and ``validate``."""

    #: the registry name, ``strategy="<name>"`` in the optimizer and its param groups
    name: ClassVar[str] = ""
    #: hyperparameters (besides ``lr``) and their defaults; they live in param groups.
    defaults: ClassVar[dict[str, Any]] = {}
    #: the values a hyperparameter taking one of a few strings may take (validated; the contract
    #: tests switch each hyperparameter mid-run among them)
    choices: ClassVar[dict[str, tuple]] = {}
    #: the invariance class, ``"GL(r)"``, ``"O(r)"`` or ``"none"``, for docs and benchmarks (the invariance
    #: tests check every registered strategy for the class it declares here).
    invariance: ClassVar[str] = "none"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "supports_row_sharding" in vars(cls):  # the attribute of earlier versions: never read now
            raise TypeError(
                f"{cls.__name__}: supports_row_sharding is no longer read; define "
                "row_sharding_requirements(self, hp, dtype) returning [] instead"
            )

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str] | None:
        """Whether this strategy with hyperparameters ``hp`` runs on row shards (FSDP2) of factors of ``dtype``.

        ``None`` (the default): it cannot (it may factorize a factor, or sum over rows without
        ``PairBatch.row_reduce``); ``[]``: it runs as is; else the hyperparameter settings it needs,
        as readable strings (``"engine='gram' (why)"``). ``dtype`` None: float32. Declare ``[]``
        only when every row sum goes through ``row_reduce`` and no factor is factorized
        (docs/distributed.rst)."""
        return None

    def moves(self, hp: dict[str, Any], step: Any) -> tuple[Any, Any]:
        """Which factors, ``(A, B)``, the step taken after ``step`` steps may move under ``hp``.

        ``step``: an ``int``, or a ``(P,)`` tensor of per-pair step counts (``PairBatch.step``),
        for which an entry may be a ``(P,)`` bool mask. A factor declared not to move keeps its
        value exactly on that step (its state may change); one declared to move does unless its
        update is zero (a zero gradient or partner). Default: both, every step. Strategies that
        alternate the factors (LoFT, AltLoRA's Algorithm 1) override it and read it back through
        :func:`~lowrank_geom.strategies.base.moving_masks`; the generic tests check each step's
        factors against it."""
        return True, True

    def validate(self, hp: dict[str, Any]) -> None:
        """Raise ``ValueError`` (torch's wording) for an invalid hyperparameter in ``hp``."""
        _check_lr(hp["lr"])

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        """Fresh state of one pair, ``a`` ``(m, r)`` and ``b`` ``(n, r)`` in the compute dtype."""
        raise NotImplementedError

    def state_keys(
        self, hp: dict[str, Any], dtype: torch.dtype = torch.float32
    ) -> tuple[frozenset[str], frozenset[str]]:
        """The keys of the state ``init`` creates under ``hp`` for factors of compute ``dtype`` (A's, B's).

        Read from an ``init`` on tiny tensors, once per distinct setting of the strategy's own
        hyperparameters (the keys of ``defaults``, which are all that ``init`` may depend on):
        the driver asks every step."""
        try:
            setting = tuple((k, hp[k]) for k in sorted(self.defaults))
            hash(setting)
        except TypeError:  # an unhashable value: no memo
            return _init_keys(type(self), hp, dtype)
        return _memo_init_keys(type(self), setting, dtype)

    def reconcile_state(
        self, a: torch.Tensor, b: torch.Tensor, state_a: State, state_b: State, hp: dict[str, Any]
    ) -> tuple[State, State]:
        """A pair's state fitted to hyperparameters changed mid-run (the driver calls this only
        when the state's keys differ from :meth:`state_keys`).

        Keys ``init`` would not create are dropped; keys it would create and the state lacks are
        made as ``init`` makes them, so an option switched on mid-run starts its state afresh
        (like ``torch.optim.SGD``'s momentum buffer). Override to refuse a switch that existing
        state cannot follow, with a ``ValueError`` naming the option."""
        fresh_a, fresh_b = self.init(a, b, hp)
        return ({k: state_a.get(k, v) for k, v in fresh_a.items()}, {k: state_b.get(k, v) for k, v in fresh_b.items()})

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        """Updates of one batch of pairs."""
        raise NotImplementedError

    def update(self, batches: list[PairBatch], hp: dict[str, Any]) -> list[PairUpdate]:
        """Updates of every batch of a param group (override to reduce across the group)."""
        return [self.update_batch(batch, hp) for batch in batches]

    def couples_groups(self, hp: dict[str, Any]) -> bool:
        """Whether a param group with hyperparameters ``hp`` steps together with the other param
        groups of its optimizer that use this strategy and are coupled too (:meth:`update_groups`).
        Default: never; each group steps alone through :meth:`update`."""
        return False

    def update_groups(self, groups: list[tuple[list[PairBatch], dict[str, Any]]]) -> list[list[PairUpdate]]:
        """Updates of several param groups at once, ``[(batches, hp), ...]`` → one list per group.

        The driver calls it, once per step, with every param group of an optimizer that uses this
        strategy and for which :meth:`couples_groups` is true (override to reduce across groups,
        as LoRA-RITE's ``clip_scope="global"`` does). Default: :meth:`update` per group."""
        return [self.update(batches, hp) for batches, hp in groups]


def _init_keys(cls: type[Strategy], hp: dict[str, Any], dtype: torch.dtype) -> tuple[frozenset[str], frozenset[str]]:
    # tiny CPU tensors: an init on them costs microseconds (the first one on meta tensors ~1 s)
    a, b = torch.zeros(4, 2, dtype=dtype), torch.zeros(3, 2, dtype=dtype)
    state_a, state_b = cls().init(a, b, hp)
    return frozenset(state_a), frozenset(state_b)


@functools.lru_cache(maxsize=256)
def _memo_init_keys(cls: type[Strategy], setting: tuple, dtype: torch.dtype) -> tuple[frozenset[str], frozenset[str]]:
    return _init_keys(cls, dict(setting), dtype)


_REGISTRY: dict[str, type[Strategy]] = {}
#: name -> where discovery found it (a module of this package, or an entry point); strategies
#: registered at run time by other code (tests) are not in it
_DISCOVERED: dict[str, str] = {}
#: the entry-point group other packages add strategies under (``name = "module"`` or ``"module:Class"``)
ENTRY_POINT_GROUP = "lowrank_geom.strategies"
_entry_points_loaded = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by ``cls.name``.

    Raises ``ValueError`` when another class already has that name (registering the same class
    again, e.g. when its module is reloaded, is allowed)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute name = '...'")
    old = _REGISTRY.get(cls.name)
    # a reloaded module defines a new class object with the same qualified name
    if old is not None and _qualname(old) != _qualname(cls):
        raise ValueError(
            f"strategy name {cls.name!r} is taken by {_qualname(old)}; {_qualname(cls)} needs another "
            "name (names are global: those of this package, of installed plugins and of your code)"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``."""
    _load_entry_points()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"Unknown strategy: {name!r} (available: {', '.join(sorted(_REGISTRY))})") from None


def available_strategies() -> list[str]:
    """Names of all registered strategies (this package's, installed plugins' and any registered at run time)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def discovered_strategies() -> dict[str, str]:
    """``{name: origin}`` of the strategies found by discovery: every module of
    ``lowrank_geom/strategies/`` and every entry point of the group ``lowrank_geom.strategies``
    (origin: the module, or ``"entry point <name> = <value> (<distribution>)"``). Strategies
    registered at run time by other code are not in it."""
    _load_entry_points()
    return {name: _DISCOVERED[name] for name in sorted(_DISCOVERED) if name in _REGISTRY}


def import_package_modules(package: str, path: list[str]) -> None:
    """Import every module of the package ``package`` (its ``__path__`` ``path``), so each
    ``@register``-ed class in them is registered; record them as discovered."""
    for info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, cls in _REGISTRY.items():
            if cls.__module__ == module.__name__:
                _DISCOVERED.setdefault(name, module.__name__)


def _load_entry_points() -> None:
    # on first use, not at import: a plugin may import lowrank_geom (the driver) itself
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        origin = f"entry point {ep.name} = {ep.value} ({dist})"
        try:
            _load_entry_point(ep, origin)
        except Exception as err:
            warnings.warn(
                f"lowrank_geom: strategy {origin} was not loaded: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )


def _load_entry_point(ep: importlib.metadata.EntryPoint, origin: str) -> None:
    before = dict(_REGISTRY)
    obj = ep.load()
    if isinstance(obj, type) and issubclass(obj, Strategy):
        register(obj)  # an entry point may name an undecorated class
    elif isinstance(obj, type) or not isinstance(obj, types.ModuleType):
        raise TypeError(f"it names {obj!r}: name a Strategy subclass ('module:Class') or a module")
    for name, cls in _REGISTRY.items():
        if before.get(name) is not cls:
            _DISCOVERED.setdefault(name, origin)


def moving_masks(
    strategy: Strategy, hp: dict[str, Any], step: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:meth:`~lowrank_geom.strategies.Strategy.moves` over a batch's ``(P,)`` step counts: ``(P,)``
    bool masks of the pairs whose A, resp. B, moves; ``None`` where no pair's does, so that side
    need not be computed at all (one host read for both sides)."""
    sides = [torch.as_tensor(side, device=step.device).expand(step.shape) for side in strategy.moves(hp, step)]
    any_a, any_b = torch.stack(sides).any(dim=1).tolist() if step.numel() else (False, False)
    return (sides[0] if any_a else None), (sides[1] if any_b else None)


def bias_corrected_decay(beta: float, step: torch.Tensor) -> torch.Tensor:
    """``β (1 − β^k) / (1 − β^{k+1})`` for ``k`` steps taken: an EMA with this decay is bias-corrected.

    Equals Adam's ``v_t / (1 − β^t)`` folded into the decay (Adafactor §7.1); 0 on the first step.
    """
    k = step.to(torch.float64)
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1.0))


def expand(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(P,)`` per-pair tensor reshaped to broadcast against ``like`` ``(P, ...)`` (its dtype; masks stay bool)."""
    if x.dtype != torch.bool:
        x = x.to(like.dtype)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def workspace_like(
    workspace: Callable[[str, torch.Tensor], torch.Tensor], name: str, like: torch.Tensor
) -> torch.Tensor:
    """An output buffer for a ``(P, rows, r)`` result laid out as ``like``: a transposed view of a
    contiguous ``(P, r, rows)`` buffer when ``like`` is one (factors stored r×rows, PEFT's
    ``lora_A``), else contiguous; so elementwise work and the driver's per-pair update stay on
    contiguous memory."""
    if like.mT.is_contiguous() and not like.is_contiguous():
        return workspace(name, like.mT).mT
    return workspace(name, like)


def right_multiply(x: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X K`` for ``(P, rows, r)`` ``X`` and ``(P, r, r)`` ``K``, into ``out``; computed as
    ``(Kᵀ Xᵀ)ᵀ`` on contiguous data when ``out`` is a transposed view (:func:`workspace_like`)."""
    k = k.to(x.dtype)
    if out is not None and out.mT.is_contiguous() and not out.is_contiguous():
        torch.bmm(k.mT, x.mT, out=out.mT)
        return out
    return torch.bmm(x, k, out=out)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last two dims: ``(P, m, r)`` → ``(P,)``."""
    return torch.linalg.vector_norm(x, dim=(-2, -1)) / (x.shape[-2] * x.shape[-1]) ** 0.5


def _check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps: float) -> None:
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_betas(betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_weight_decay(weight_decay: float) -> None:
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_non_negative(name: str, value: float) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name} value: {value}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise unless ``value`` is one of ``choices`` and of its type: ``1 in (True, False)`` holds
    in Python, and a 1 for a flag would be stored and checkpointed as an int."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")
