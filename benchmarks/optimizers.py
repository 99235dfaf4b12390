"""Every optimizer the suites compare, built from real libraries with settings from ``configs/*.json``.

* :data:`OPTIMIZERS` — the names, in report order: this package's strategies, from the registry
  (``lora_rite``, ``scaled_gd``, ``scaled_adam``, ``one_sided_adagrad``, then any other
  discovered strategy by name: :data:`PACKAGE_OPTIMIZERS`), ``torch.optim`` (``adam``, ``adamw``,
  ``adagrad``, ``sgd``), PEFT's optimizer factories (``loraplus`` = LoRA+ over ``torch.optim.AdamW``,
  ``peft_riemannian`` = PEFT's Riemannian preconditioner wrapping ``torch.optim.AdamW``) and
  ``pytorch_optimizer`` (``lamb``, ``shampoo``, ``pyopt_lora_rite``). None is re-implemented here:
  each config names the constructor it calls.
* :func:`load_config` — ``configs/<name>.json`` validated against the schema below; a package
  strategy without a file gets :func:`default_config` (its defaults, ``lr`` 1e-2).
* :class:`PairModel` — a real PEFT LoRA model over bias-free ``nn.Linear`` layers of given shapes,
  so LoRA+ and PEFT's Riemannian optimizer find their parameters by name; :class:`LeafPairs` — the
  same interface over plain leaf ``(A, B)`` tensors (for suites that batch many pairs by hand).
* :func:`make_optimizer` — the optimizer ``name`` over exactly the LoRA factors of a model.
* :func:`tune` — a log-grid learning-rate sweep that writes the best rate back into the configs.

Config schema (``benchmarks/configs/<name>.json``)::

    {"name": "<name>",                  # = file stem
     "label": "human-readable label",
     "library": "module.Constructor",   # e.g. "torch.optim.Adam", "peft.optimizers.create_loraplus_optimizer"
     "kwargs": {...},                   # constructor keyword arguments (JSON lists become tuples;
                                        #  "optimizer_cls" for the PEFT factories is a dotted path)
     "lr": {"default": 1e-3, "<suite>": 1e-2, ...},
     "tuned": "how the learning rates were chosen (grid, suite, metric, date)"}

Orientation: the paper's ``Z = A Bᵀ`` with ``A: m×r`` and ``B: n×r``; in PEFT ``A = lora_B.weight``
(``m×r``, rank dim 1) and ``B = lora_A.weight`` (``r×n``, rank dim 0).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

#: report order of the built-in strategies; other discovered strategies follow, by name
_STRATEGY_ORDER = ("lora_rite", "scaled_gd", "scaled_adam", "one_sided_adagrad")
#: the optimizers of other libraries, in report order
EXTERNAL_OPTIMIZERS: list[str] = [
    "adam",
    "adamw",
    "adagrad",
    "sgd",
    "loraplus",
    "peft_riemannian",
    "lamb",
    "shampoo",
    "pyopt_lora_rite",
]


def package_optimizers() -> list[str]:
    """The discovered strategies (this package's and installed plugins'), in report order."""
    from lowrank_geom.strategies import discovered_strategies

    rank = {name: i for i, name in enumerate(_STRATEGY_ORDER)}
    return sorted(discovered_strategies(), key=lambda name: (rank.get(name, len(rank)), name))


def _package_invariant() -> list[str]:
    from lowrank_geom.strategies import get_strategy

    return [name for name in PACKAGE_OPTIMIZERS if get_strategy(name).invariance == "GL(r)"]


#: the strategies of this package, from the registry (built as :class:`lowrank_geom.LowRankOptimizer`)
PACKAGE_OPTIMIZERS: list[str] = package_optimizers()
#: every optimizer, in report order
OPTIMIZERS: list[str] = PACKAGE_OPTIMIZERS + EXTERNAL_OPTIMIZERS
#: optimizers whose documentation claims invariance to every gauge ``G ∈ GL(r)`` (package
#: strategies: their declared ``invariance``)
INVARIANT: list[str] = _package_invariant() + ["pyopt_lora_rite"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_REQUIRED = {"name": str, "label": str, "library": str, "kwargs": dict, "lr": dict, "tuned": str}
_OPTIONAL = {"notes": str}


class ConfigError(ValueError):
    """A config file that does not follow the schema (the message names the file and the key)."""


# ------------------------------------------------------------------------------------- configs
def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.json"


def validate_config(cfg: Any, where: str = "config", name: str | None = None) -> dict[str, Any]:
    """Check ``cfg`` against the schema; returns it unchanged or raises :class:`ConfigError`."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a config must be a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}; required: {sorted(_REQUIRED)}")
    unknown = sorted(set(cfg) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted({**_REQUIRED, **_OPTIONAL})}")
    for key, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if key in cfg and not isinstance(cfg[key], typ):
            raise ConfigError(f"{where}: {key!r} must be a {typ.__name__}, got {type(cfg[key]).__name__}")
    if name is not None and cfg["name"] != name:
        raise ConfigError(f"{where}: 'name' is {cfg['name']!r} but the file is for {name!r}")
    if "." not in cfg["library"]:
        raise ConfigError(
            f"{where}: 'library' must be a dotted path such as 'torch.optim.Adam', got {cfg['library']!r}"
        )
    if "default" not in cfg["lr"]:
        raise ConfigError(f"{where}: 'lr' needs a 'default' entry, got keys {sorted(cfg['lr'])}")
    for suite, value in cfg["lr"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: lr[{suite!r}] must be a positive finite number, got {value!r}")
    for key in cfg["kwargs"]:
        if key == "lr":
            raise ConfigError(f"{where}: put the learning rate in 'lr', not in 'kwargs'")
    return cfg


def default_config(name: str) -> dict[str, Any]:
    """The config of a package strategy without a config file: the strategy's defaults, lr 1e-2."""
    return {
        "name": name,
        "label": f"{name} (lowrank_geom)",
        "library": "lowrank_geom.LowRankOptimizer",
        "kwargs": {"strategy": name},
        "lr": {"default": 1e-2},
        "tuned": f"default: no configs/{name}.json, so the strategy's defaults and lr 1e-2, not swept "
        "(a suite's --tune writes the file)",
    }


def load_config(name: str) -> dict[str, Any]:
    """``benchmarks/configs/<name>.json``, validated (:class:`ConfigError` with the file and key);
    :func:`default_config` for a package strategy without one."""
    path = config_path(name)
    if not path.exists() and name in PACKAGE_OPTIMIZERS:
        return validate_config(default_config(name), f"default config of {name}", name)
    if not path.exists():
        raise ConfigError(f"no config for optimizer {name!r}: {path} does not exist (known: {OPTIMIZERS})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return validate_config(cfg, str(path), name)


def _resolve(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot resolve {path!r}: {e}") from None


def _json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


# --------------------------------------------------------------------------------------- models
def _random_factors(shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype, seed: int):
    """Gaussian ``A: m×r``, ``B: n×r`` with entries ``N(0, r^{-1/2})`` (so ``Z`` has unit-variance entries)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n, r in shapes:
        a = torch.randn(m, r, generator=g, dtype=torch.float64) * r**-0.25
        b = torch.randn(n, r, generator=g, dtype=torch.float64) * r**-0.25
        out.append((a.to(dtype), b.to(dtype)))
    return out


class PairModel(torch.nn.Module):
    """A PEFT LoRA model over bias-free ``nn.Linear(n, m)`` layers ``layer0, layer1, ...``.

    Args:
        shapes: ``(m, n, r)`` per pair: ``layer{i}`` maps ``n → m`` and gets a rank-``r`` adapter
            with ``lora_alpha = r`` (scaling 1, so ``ΔW = Z = A Bᵀ`` exactly).
        dtype: dtype of the adapters (PEFT's autocast of adapters to float32 is turned off).
        seed: seeds the factor initialization (global RNG state is left untouched).
        init: ``"random"`` (default): both factors Gaussian with entries ``N(0, r^{-1/2})``, so every
            optimizer starts from a full-rank pair; ``"peft"``: PEFT's default (``lora_B = 0``,
            ``lora_A`` Kaiming-uniform).
        materialize_base: the frozen base weights are never read by the suites (they optimize
            functions of ``Z`` only), so by default each is a broadcast zero (stride 0, no memory —
            what makes 7B-shaped sets fit); ``True`` gives dense random base weights.

    ``peft_model`` is the :class:`peft.PeftModel`; ``factors()``/``pairs()`` list the pairs in
    ``shapes`` order.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int, int]],
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        *,
        init: str = "random",
        materialize_base: bool = False,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        shapes = [tuple(int(v) for v in s) for s in shapes]
        if not shapes:
            raise ValueError("PairModel needs at least one (m, n, r) shape")
        for s in shapes:
            if len(s) != 3 or min(s) < 1 or s[2] > min(s[0], s[1]):
                raise ValueError(f"invalid pair shape (m, n, r) = {s}: need 1 <= r <= min(m, n)")
        if init not in ("random", "peft"):
            raise ValueError(f"init must be 'random' or 'peft', got {init!r}")
        self.shapes = shapes
        self.dtype = dtype
        names = [f"layer{i}" for i in range(len(shapes))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inner = torch.nn.Module()
            for name, (m, n, _r) in zip(names, shapes):
                lin = torch.nn.Linear(n, m, bias=False, device="meta")
                if materialize_base:
                    w = torch.randn(m, n, dtype=dtype) / math.sqrt(n)
                else:
                    w = torch.zeros((), dtype=dtype).expand(m, n)
                lin.weight = torch.nn.Parameter(w, requires_grad=False)
                inner.add_module(name, lin)
            ranks = [s[2] for s in shapes]
            if len(set(ranks)) == 1:
                cfg = LoraConfig(
                    r=ranks[0],
                    lora_alpha=ranks[0],
                    target_modules=names,
                    lora_dropout=0.0,
                    bias="none",
                    init_lora_weights=True,
                )
            else:
                cfg = LoraConfig(
                    r=ranks[0],
                    lora_alpha=ranks[0],
                    target_modules=names,
                    lora_dropout=0.0,
                    bias="none",
                    init_lora_weights=True,
                    rank_pattern={n: r for n, r in zip(names, ranks)},
                    alpha_pattern={n: r for n, r in zip(names, ranks)},
                )
            self.peft_model = get_peft_model(inner, cfg, autocast_adapter_dtype=False)
        self._layers = [self.peft_model.base_model.model.get_submodule(n) for n in names]
        for layer, (m, n, r) in zip(self._layers, shapes):
            wa, wb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if wa.dtype != dtype:
                wa.data, wb.data = wa.data.to(dtype), wb.data.to(dtype)
            assert tuple(wb.shape) == (m, r) and tuple(wa.shape) == (r, n), (wa.shape, wb.shape)
            assert layer.scaling["default"] == 1.0, layer.scaling
        if init == "random":
            self.set_factors(_random_factors(shapes, dtype, seed))

    def pairs(self):
        """``list[LoRAPair]`` from :func:`lowrank_geom.peft.lora_pairs`.

        A = ``lora_B.weight``, B = ``lora_A.weight``."""
        from lowrank_geom.peft import lora_pairs

        return lora_pairs(self.peft_model)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Paper-orientation views ``(A: m×r, B: n×r)`` of the parameters (``B`` is a transpose view)."""
        return [(l.lora_B["default"].weight, l.lora_A["default"].weight.T) for l in self._layers]

    @torch.no_grad()
    def set_factors(self, factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy paper-orientation ``(A, B)`` into the parameters (values cast to the adapter dtype)."""
        factors = list(factors)
        if len(factors) != len(self._layers):
            raise ValueError(f"got {len(factors)} pairs for a model with {len(self._layers)}")
        for (a, b), (a_p, b_p) in zip(factors, self.factors()):
            if a.shape != a_p.shape or b.shape != b_p.shape:
                raise ValueError(
                    f"shape mismatch: got A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"expected A {tuple(a_p.shape)}, B {tuple(b_p.shape)}"
                )
            a_p.copy_(a)
            b_p.copy_(b)

    def zs(self) -> list[torch.Tensor]:
        """``Z = scaling · A Bᵀ`` per pair, differentiable in the parameters (scaling is 1)."""
        return [l.scaling["default"] * (l.lora_B["default"].weight @ l.lora_A["default"].weight) for l in self._layers]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA factors (PEFT's order: ``lora_A``, ``lora_B`` per layer); base weights are frozen."""
        return [p for p in self.peft_model.parameters() if p.requires_grad]


class LeafPairs:
    """The :class:`PairModel` interface over plain leaf tensors ``(A: m×r, B: n×r)`` (paper orientation).

    Every optimizer that takes tensors works on it; the PEFT factories (``loraplus``,
    ``peft_riemannian``) need module names and raise ``TypeError`` here.
    """

    peft_model = None

    def __init__(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._pairs = [(a, b) for a, b in pairs]
        if not self._pairs:
            raise ValueError("LeafPairs needs at least one (A, B) pair")
        for i, (a, b) in enumerate(self._pairs):
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
                raise ValueError(f"pair {i}: need A (m, r) and B (n, r), got {tuple(a.shape)}, {tuple(b.shape)}")
        self.shapes = [(a.shape[0], b.shape[0], a.shape[1]) for a, b in self._pairs]

    def pairs(self):
        from lowrank_geom import LoRAPair

        return [LoRAPair(a, b, -1, -1, f"pair{i}") for i, (a, b) in enumerate(self._pairs)]

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(self._pairs)

    @torch.no_grad()
    def set_factors(self, factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        factors = list(factors)
        if len(factors) != len(self._pairs):
            raise ValueError(f"got {len(factors)} pairs for {len(self._pairs)}")
        for (a, b), (a_p, b_p) in zip(factors, self._pairs):
            a_p.copy_(a)
            b_p.copy_(b)

    def zs(self) -> list[torch.Tensor]:
        return [a @ b.T for a, b in self._pairs]

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [t for pair in self._pairs for t in pair]


# ----------------------------------------------------------------------------------- optimizers
def make_optimizer(
    name: str,
    model: PairModel | LeafPairs,
    suite: str = "default",
    lr: float | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over exactly the LoRA factors of ``model``.

    The learning rate is ``lr`` if given, else the config's ``lr[suite]`` (falling back to
    ``lr["default"]``); ``overrides`` replace config ``kwargs``.

    * package strategies: ``lowrank_geom.<Class>(model.pairs(), lr=..., **kwargs)``;
    * ``torch.optim`` and ``pytorch_optimizer`` (Lamb, Shampoo): ``cls(model.trainable_parameters(), ...)``;
    * ``pyopt_lora_rite``: ``pytorch_optimizer.LoRARite`` over ``[A₁, B₁, A₂, B₂, ...]`` (its
      alternating pairing) with ``lora_l_dim``/``lora_r_dim`` set to A's and B's rank dims, so its
      pairs are exactly ours;
    * ``loraplus`` / ``peft_riemannian``: ``peft.optimizers.create_*_optimizer(model.peft_model,
      optimizer_cls, lr=..., **kwargs)`` (``optimizer_cls`` from the config, a dotted path).
    """
    cfg = load_config(name)
    if lr is None:
        lr = float(cfg["lr"].get(suite, cfg["lr"]["default"]))
    kwargs = _json_kwargs(cfg["kwargs"])
    kwargs.update(overrides)
    library = cfg["library"]
    ctor = _resolve(library)
    if library.startswith("lowrank_geom."):
        return ctor(model.pairs(), lr=lr, **kwargs)
    if library.startswith("peft."):
        if getattr(model, "peft_model", None) is None:
            raise TypeError(f"{name} ({library}) finds LoRA parameters by PEFT module names: it needs a PairModel")
        opt_cls = kwargs.pop("optimizer_cls", "torch.optim.AdamW")
        if isinstance(opt_cls, str):
            opt_cls = _resolve(opt_cls)
        return ctor(model.peft_model, opt_cls, lr=lr, **kwargs)
    if library == "pytorch_optimizer.LoRARite":
        pairs = model.pairs()
        a_dims = {p.a_rank_dim % p.a.ndim for p in pairs}
        b_dims = {p.b_rank_dim % p.b.ndim for p in pairs}
        if len(a_dims) != 1 or len(b_dims) != 1:
            raise ValueError("pytorch_optimizer.LoRARite needs one rank dim for every A and one for every B")
        for key in ("lora_l_dim", "lora_r_dim"):
            if key in kwargs:
                raise TypeError(f"{key} is set from the pairs' rank dims; do not override it")
        params = [t for p in pairs for t in (p.a, p.b)]
        return ctor(params, lr=lr, lora_l_dim=a_dims.pop(), lora_r_dim=b_dims.pop(), **kwargs)
    return ctor(model.trainable_parameters(), lr=lr, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of optimizer state: ``Σ numel · element_size`` over every tensor in ``optimizer.state``
    (nested dicts/lists/tuples included; Python scalars such as pytorch_optimizer's int steps count 0)."""

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


# ------------------------------------------------------------------------------------- tuning
def log_grid(lo: float, hi: float, per_decade: int = 2) -> list[float]:
    """``lo … hi`` log-spaced with ``per_decade`` points per decade (rounded to 3 significant digits)."""
    n = round(math.log10(hi / lo) * per_decade)
    return [float(f"{lo * (hi / lo) ** (i / n):.3g}") for i in range(n + 1)] if n > 0 else [lo]


def tune(
    suite_fn: Callable[[str, float], float],
    names: Iterable[str],
    grid: Sequence[float],
    *,
    suite: str | None = None,
    metric: str = "",
    write: bool = True,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> dict[str, dict[str, Any]]:
    """Log-grid learning-rate sweep: ``suite_fn(name, lr) -> score`` (lower is better; NaN/inf or
    an exception counts as diverged). The best ``lr`` of each name is written into
    ``configs/<name>.json`` under ``lr[suite]`` (with ``write``) and its ``"tuned"`` entry for
    ``suite`` is replaced by the grid, metric and date.

    ``suite`` defaults to ``suite_fn.suite`` or the last part of ``suite_fn.__module__``.
    Returns ``{name: {"best_lr", "best_score", "scores": {lr: score}}}``.
    """
    suite = suite or getattr(suite_fn, "suite", None) or suite_fn.__module__.rsplit(".", 1)[-1]
    grid = [float(g) for g in grid]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        scores: dict[float, float] = {}
        it = progress(grid, f"tune {name}") if progress else grid
        for lr in it:
            try:
                s = float(suite_fn(name, lr))
            except (RuntimeError, ValueError, FloatingPointError):  # a diverged / failed run
                s = math.inf
            scores[lr] = s if math.isfinite(s) else math.inf
        finite = {k: v for k, v in scores.items() if math.isfinite(v)}
        if not finite:
            results[name] = {"best_lr": None, "best_score": math.inf, "scores": scores}
            continue
        best = min(finite, key=lambda k: (finite[k], k))
        results[name] = {"best_lr": best, "best_score": finite[best], "scores": scores}
        if write:
            _write_tuned(name, suite, best, grid, metric)
    return results


def _write_tuned(name: str, suite: str, lr: float, grid: Sequence[float], metric: str) -> None:
    path = config_path(name)
    cfg = load_config(name)
    cfg["lr"][suite] = lr
    date = _dt.date.today().isoformat()
    entry = (
        f"{suite}: best of log grid [{grid[0]:g} ... {grid[-1]:g}] ({len(grid)} points) by "
        f"{metric or 'the suite score'}, {date}"
    )
    parts = [p.strip() for p in cfg["tuned"].split(" | ") if p.strip() and not p.strip().startswith(f"{suite}:")]
    cfg["tuned"] = " | ".join(parts + [entry])
    validate_config(cfg, str(path), name)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
