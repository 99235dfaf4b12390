r"""Suite ``invariance``: does an optimizer give the same ``Z`` trajectory from every factorization?

For every optimizer of :data:`benchmarks.optimizers.OPTIMIZERS` (built by
:func:`~benchmarks.optimizers.make_optimizer` on a :class:`~benchmarks.optimizers.PairModel`, several
LoRA pairs of different shapes), two runs of ``k`` steps on the same loss of ``Z``: one from
``(A, B)``, one from the gauged ``(A G, B G⁻ᵀ)`` (same ``Z₀``; :func:`lowrank_geom.geometry.gauge_act`,
one ``G`` per pair). The gap is :func:`lowrank_geom.geometry.invariance_gap`'s definition over all
pairs at once,

.. math::  \text{gap} = \max_t \|Z_t - Z'_t\|_F \,/\, \max_t \|Z_t\|_F
           \qquad (\|\cdot\|_F \text{ over the concatenation of every pair's } Z),

for scalar gauges ``G = sI`` (:func:`~lowrank_geom.geometry.scale_gauge`, ``s ∈ {1e-3, 0.1, 10,
1e3}``) and random gauges with ``cond(G) ∈ {1, 1e2, 1e4}``
(:func:`~lowrank_geom.geometry.random_gauge`; ``cond = 1`` is a random orthogonal ``G``), in float64
and float32. Gauges are applied in float64 and the gauged factors cast to the run's dtype, so in
float32 the two runs start from ``Z₀`` that already differ by round-off amplified by ``cond(G)``.

Besides every optimizer, :data:`VARIANTS` adds LoRA-RITE with each of its two engines forced
(``lora_rite[engine=gram]``, ``lora_rite[engine=qr]``; the ``lora_rite`` row is the default
``engine="auto"``).

The loss (fixed, seeded; the same for every optimizer) is, per pair ``p``,
``½·mean(((Z_p − T_p) C_p)²) + 0.1·mean(log cosh Z_p)`` with a random target ``T_p`` and a random
right-conditioner ``C_p`` (singular values log-spaced in [1/3, 3]): a smooth, non-quadratic function
of ``Z`` only, so every gap comes from the optimizer.

The **invariance class** is read off the float64 gaps with threshold :data:`THRESHOLD`:
``GL(r)`` (every gauge), ``scalar+O(r)`` (scalar and orthogonal gauges), ``scalar``, ``O(r)`` or
``none``. An optimizer whose ``Z`` barely moved (relative movement < :data:`MIN_MOVEMENT`) gets
``n/a``: a small gap would then mean nothing. Learning rates come from the configs' ``"invariance"``
entry (``python -m benchmarks invariance --tune`` re-runs the sweep: final loss after ``k`` steps,
float64, ungauged start).

Sizes (one torch thread — see :func:`run`): ``quick`` 2 pairs, 5 steps; ``default`` 3 pairs (up to
64×32, r ≤ 8), 20 steps; ``full`` 3 pairs (up to 512×128, r ≤ 16), 50 steps. ``--tune`` adds a
13-point sweep per optimizer on the default problem. Each result records its wall time
(``run.seconds`` in the JSON, the command line of the Markdown).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, config_lr, markdown_table, progress, savefig
from benchmarks.common import color as _color

SUITE = "invariance"
SCALES = [1e-3, 1e-1, 1e1, 1e3]
CONDS = [1.0, 1e2, 1e4]
DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: float64 gaps below this count as invariant. Round-off of an invariant optimizer that works with
#: Grams (LoRA-RITE's and ScaledGD's Gram engines) is about u·cond(G)²·(growth over k steps)
#: ≈ 1.1e-16 · 1e8 · O(10) ≈ 1e-7 for the largest gauge here (QR-based ones: u·cond(G), ~1e-12),
#: while a non-invariant optimizer that moves Z by ≥ MIN_MOVEMENT differs by O(lr) per step
#: (≥ 1e-4 in practice): 1e-6 sits above the first and two decades below the second.
THRESHOLD = 1e-6
#: below this relative movement max_t‖Z_t − Z_0‖/‖Z_0‖ the class is "n/a" (nothing to compare)
MIN_MOVEMENT = 1e-3
#: LoRA-RITE with each engine forced (the ``lora_rite`` row is the default ``engine="auto"``: QR for
#: float64, Gram for float32), so both engines' round-off is on the table: row key -> (optimizer, overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_rite[engine=gram]": ("lora_rite", {"engine": "gram"}),
    "lora_rite[engine=qr]": ("lora_rite", {"engine": "qr"}),
}
#: the float32 plot draws exact zeros at this floor
PLOT_FLOOR = 1e-17

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(shapes=[(12, 10, 3), (8, 14, 2)], steps=5),
    "default": dict(shapes=[(64, 32, 4), (32, 48, 8), (24, 24, 2)], steps=20),
    "full": dict(shapes=[(512, 128, 16), (128, 256, 8), (200, 200, 4)], steps=50),
}
#: learning-rate sweep used by ``--tune`` (log grid, 2 points per decade)
TUNE_GRID = (1e-4, 1e2)


def entries() -> list[str]:
    """Row keys of the suite: every optimizer of ``OPTIMIZERS``, then :data:`VARIANTS`."""
    from benchmarks.optimizers import OPTIMIZERS

    return list(OPTIMIZERS) + list(VARIANTS)


def _entry(key: str) -> tuple[str, dict[str, Any]]:
    return VARIANTS.get(key, (key, {}))


def gauge_labels() -> list[str]:
    return [f"s={s:g}" for s in SCALES] + [f"cond={c:g}" for c in CONDS]


# ------------------------------------------------------------------------------------- problem
class Problem:
    """The fixed loss of ``Z`` (one term per pair), the float64 starting factors and the gauges."""

    def __init__(self, shapes: list[tuple[int, int, int]], seed: int) -> None:
        from benchmarks.optimizers import _random_factors
        from lowrank_geom.geometry import random_gauge, scale_gauge

        self.shapes = shapes
        g = torch.Generator().manual_seed(10_000 + seed)
        self.targets, self.conds = [], []
        for m, n, _r in shapes:
            self.targets.append(torch.randn(m, n, generator=g, dtype=torch.float64))
            q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            sv = torch.logspace(math.log10(3.0), math.log10(1 / 3), n, dtype=torch.float64)
            self.conds.append((q1 * sv) @ q2.T)
        self.factors0 = _random_factors(shapes, torch.float64, seed)
        self.gauges: dict[str, list[torch.Tensor]] = {}
        for s in SCALES:
            self.gauges[f"s={s:g}"] = [scale_gauge(s, r, dtype=torch.float64) for _m, _n, r in shapes]
        for c in CONDS:
            gg = torch.Generator().manual_seed(20_000 + seed + int(math.log10(c)))
            self.gauges[f"cond={c:g}"] = [random_gauge(r, c, gg, dtype=torch.float64) for _m, _n, r in shapes]

    def start(self, gauge: str | None, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Starting factors in ``dtype``: ungauged, or gauged in float64 and then cast."""
        from lowrank_geom.geometry import gauge_act

        out = []
        for i, (a, b) in enumerate(self.factors0):
            if gauge is not None:
                a, b = gauge_act(a, b, self.gauges[gauge][i])
            out.append((a.to(dtype), b.to(dtype)))
        return out

    def loss_fn(self, dtype: torch.dtype):
        targets = [t.to(dtype) for t in self.targets]
        conds = [c.to(dtype) for c in self.conds]
        log2 = math.log(2.0)

        def loss(zs: list[torch.Tensor]) -> torch.Tensor:
            total = zs[0].new_zeros(())
            for z, t, c in zip(zs, targets, conds):
                logcosh = z + torch.nn.functional.softplus(-2.0 * z) - log2
                total = total + 0.5 * ((z - t) @ c).pow(2).mean() + 0.1 * logcosh.mean()
            return total

        return loss


def trajectory(
    name: str, model, factors, loss, steps: int, lr: float | None = None, overrides: dict[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """``k`` steps of optimizer ``name`` from ``factors``; returns (``Z_t`` stacked as ``(k, Σ m·n)``
    float64, the final loss). A run that raises inside the optimizer (e.g. Shampoo's SVD of a
    non-finite preconditioner) or goes non-finite is *diverged*: its remaining rows are NaN and the
    final loss is ``inf``."""
    from benchmarks.optimizers import make_optimizer

    model.set_factors(factors)
    opt = make_optimizer(name, model, suite=SUITE, lr=lr, **(overrides or {}))
    total = sum(m * n for m, n, _r in model.shapes)
    traj = torch.full((steps, total), math.nan, dtype=torch.float64)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        try:
            loss(model.zs()).backward()
            opt.step()
        except (RuntimeError, ValueError, FloatingPointError):  # torch.linalg errors are RuntimeErrors
            return traj, math.inf
        with torch.no_grad():
            traj[t] = torch.cat([z.detach().reshape(-1).to(torch.float64) for z in model.zs()])
        if not torch.isfinite(traj[t]).all():
            return traj, math.inf
    with torch.no_grad():
        final = float(loss(model.zs()))
    return traj, final if math.isfinite(final) else math.inf


def gap(zs: torch.Tensor, zs2: torch.Tensor) -> float:
    """``max_t ‖Z_t − Z'_t‖_F / max_t ‖Z_t‖_F`` (non-finite runs give ``inf``)."""
    if not (torch.isfinite(zs).all() and torch.isfinite(zs2).all()):
        return math.inf
    diff = torch.linalg.vector_norm(zs - zs2, dim=1).max().item()
    scale = torch.linalg.vector_norm(zs, dim=1).max().item()
    return diff / max(scale, torch.finfo(torch.float64).tiny)


def classify(gaps64: dict[str, float], movement: float) -> str:
    """Invariance class from the float64 gaps (see :data:`THRESHOLD`)."""
    if movement is None or not movement >= MIN_MOVEMENT:
        return "n/a"
    ok = {k: v is not None and v < THRESHOLD for k, v in gaps64.items()}
    scalar = all(ok[f"s={s:g}"] for s in SCALES)
    orth = ok["cond=1"]
    gl = scalar and all(ok[f"cond={c:g}"] for c in CONDS)
    if gl:
        return "GL(r)"
    if scalar and orth:
        return "scalar+O(r)"
    if scalar:
        return "scalar"
    if orth:
        return "O(r)"
    return "none"


def claimed(name: str) -> str:
    """What the optimizer's documentation claims (package strategies: their ``invariance`` attribute)."""
    from benchmarks.optimizers import INVARIANT, PACKAGE_OPTIMIZERS

    if name in PACKAGE_OPTIMIZERS:
        from lowrank_geom.strategies import get_strategy

        return get_strategy(name).invariance
    return "GL(r)" if name in INVARIANT else "—"


# ---------------------------------------------------------------------------------------- tuning
def tune_lrs(ctx: RunContext, names: list[str] | None = None) -> dict[str, Any]:
    """The ``--tune`` path: best final loss after ``k`` steps (float64, ungauged) over a log grid,
    always on the ``default``-size problem (the configs hold one ``"invariance"`` rate for every size)."""
    from benchmarks import optimizers as O

    tune_size = SIZES["default"]
    problem = Problem(tune_size["shapes"], ctx.seed)
    loss = problem.loss_fn(torch.float64)
    model = O.PairModel(tune_size["shapes"], dtype=torch.float64, seed=ctx.seed)
    start = problem.start(None, torch.float64)

    def score(name: str, lr: float) -> float:
        _traj, final = trajectory(name, model, start, loss, tune_size["steps"], lr=lr)
        return final

    grid = O.log_grid(*TUNE_GRID, per_decade=2)
    return O.tune(
        score,
        names or O.OPTIMIZERS,
        grid,
        suite=SUITE,
        metric=f"final loss after {tune_size['steps']} steps (float64, ungauged, seed {ctx.seed}, "
        f"shapes {tune_size['shapes']})",
        progress=(lambda it, desc: progress(it, ctx, desc)) if ctx.progress else None,
    )


# ------------------------------------------------------------------------------------------- run
def run(ctx: RunContext) -> SuiteResult:
    # Tiny matrices: one thread. With two, every small LAPACK/OpenMP call pays a thread hand-off,
    # which costs up to ~25x the whole suite on a 2-core machine that is also running anything else.
    from benchmarks.common import torch_threads

    with torch_threads(1):
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    from benchmarks import optimizers as O

    torch.manual_seed(ctx.seed)
    tuned = tune_lrs(ctx) if ctx.options.get("tune") else None
    size = SIZES[ctx.size]
    problem = Problem(size["shapes"], ctx.seed)
    labels = gauge_labels()
    keys = entries()
    jobs = [(key, dt) for key in keys for dt in DTYPES]
    results: dict[str, dict[str, Any]] = {key: {"gaps": {}, "lr": config_lr(_entry(key)[0], SUITE)} for key in keys}
    models = {dt: O.PairModel(size["shapes"], dtype=DTYPES[dt], seed=ctx.seed) for dt in DTYPES}
    for key, dt in progress(jobs, ctx, "invariance", total=len(jobs)):
        name, overrides = _entry(key)
        gaps, diverged, movement, final = _gauge_gaps(name, overrides, models[dt], problem, DTYPES[dt], size, labels)
        results[key]["gaps"][dt] = gaps
        results[key].setdefault("diverged", {})[dt] = diverged
        results[key].setdefault("movement", {})[dt] = movement if math.isfinite(movement) else None
        results[key].setdefault("final_loss", {})[dt] = final if math.isfinite(final) else None
        if overrides:
            results[key]["overrides"] = overrides
    with torch.no_grad():
        loss0 = float(problem.loss_fn(torch.float64)([a @ b.T for a, b in problem.factors0]))
    for key in keys:
        _classify_entry(key, results[key])

    metrics = {
        "optimizers": results,
        "initial_loss": loss0,
        "threshold": THRESHOLD,
        "min_movement": MIN_MOVEMENT,
        "gauges": labels,
        "checks": {f"{n}_gl_invariant_float64": bool(results[n]["class"] == "GL(r)") for n in O.INVARIANT},
    }
    if tuned is not None:
        metrics["tuning"] = {
            k: {"best_lr": v["best_lr"], "scores": {str(lr): s for lr, s in v["scores"].items()}}
            for k, v in tuned.items()
        }
    config = {
        "size": ctx.size,
        **{k: v for k, v in size.items()},
        "scales": SCALES,
        "conds": CONDS,
        "dtypes": list(DTYPES),
        "torch_threads": torch.get_num_threads(),
        "lrs": {n: results[n]["lr"] for n in keys},
        "loss": "sum_p 0.5*mean(((Z_p - T_p) C_p)^2) + 0.1*mean(logcosh(Z_p))",
    }
    table = _table(results, labels, size)
    figures = [_plot(results, ctx)]
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table, figures=figures)


def _gauge_gaps(name: str, overrides, model, problem: Problem, dtype: torch.dtype, size, labels: list[str]):
    """One optimizer in one dtype: the reference trajectory and one per gauge. Returns the gap per
    gauge (None where a run diverged), the runs that diverged, the reference's largest relative
    movement of ``Z`` and its final loss."""
    loss = problem.loss_fn(dtype)
    ref, final = trajectory(name, model, problem.start(None, dtype), loss, size["steps"], overrides=overrides)
    z0 = torch.cat(
        [z.reshape(-1) for z in (a.to(torch.float64) @ b.to(torch.float64).T for a, b in problem.start(None, dtype))]
    )
    movement = torch.linalg.vector_norm(ref - z0, dim=1).max().item() / torch.linalg.vector_norm(z0).item()
    gaps, diverged = {}, []
    if not math.isfinite(final):
        diverged.append("reference")
    for label in labels:
        traj, final2 = trajectory(name, model, problem.start(label, dtype), loss, size["steps"], overrides=overrides)
        g = gap(ref, traj)
        if not (math.isfinite(final2) and math.isfinite(g)):
            diverged.append(label)
        # a diverged run has no meaningful gap: None in the JSON, "diverged" in the table
        gaps[label] = g if math.isfinite(g) else None
    return gaps, diverged, movement, final


def _classify_entry(key: str, r: dict[str, Any]) -> None:
    """The measured class (float64), the claimed one and whether they match, into ``r``."""
    r["class"] = classify(r["gaps"]["float64"], r["movement"]["float64"])
    r["claimed"] = claimed(_entry(key)[0])
    r["matches_claim"] = (
        None
        if r["claimed"] == "—"
        else (r["claimed"] == r["class"] or (r["claimed"] == "none" and r["class"] != "GL(r)"))
    )


def _table(results: dict[str, Any], labels: list[str], size: dict[str, Any]) -> str:
    names = entries()
    head64 = ["optimizer", "lr"] + [f"f64 {l}" for l in labels] + ["moved", "class (measured)", "claimed"]
    rows64 = []
    for name in names:
        r = results[name]
        mark = "" if r["matches_claim"] in (None, True) else " ⚠"
        rows64.append(
            [name, r["lr"]]
            + [_cell(r["gaps"]["float64"][l]) for l in labels]
            + [_cell(r["movement"]["float64"]), r["class"] + mark, r["claimed"]]
        )
    head32 = ["optimizer"] + [f"f32 {l}" for l in labels] + ["moved"]
    rows32 = [
        [name]
        + [_cell(results[name]["gaps"]["float32"][l]) for l in labels]
        + [_cell(results[name]["movement"]["float32"])]
        for name in names
    ]
    note = (
        f"Relative Z-trajectory gap max_t‖Z_t − Z'_t‖_F / max_t‖Z_t‖_F after {size['steps']} steps between "
        f"(A, B) and (A G, B G⁻ᵀ), pairs (m, n, r) = {size['shapes']}; s = scalar gauge sI, cond = random "
        f"gauge with that condition number (cond=1: orthogonal). 'moved' = max_t‖Z_t − Z_0‖/‖Z_0‖. Class from "
        f"the float64 gaps with threshold {THRESHOLD:g} ('n/a' if moved < {MIN_MOVEMENT:g}); ⚠ = differs from "
        "the documented claim; 'diverged' = a run raised or went non-finite (no gap). lora_rite runs its "
        "default engine='auto' (QR for float64, Gram for float32); the lora_rite[engine=…] rows force one "
        "engine: the Gram engine's float64 gap grows like cond(G)²·u (it works with BᵀB), which is why "
        "'auto' takes QR for float64."
    )
    return (
        "### float64\n\n"
        + markdown_table(head64, rows64)
        + "\n\n### float32\n\n"
        + markdown_table(head32, rows32)
        + "\n\n"
        + note
    )


def _cell(v: float | None) -> Any:
    return "diverged" if v is None else v


def _plot(results: dict[str, Any], ctx: RunContext) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = entries()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = "os^vD<>pPX*hd"
    for ax, dt in zip(axes, ["float32", "float64"]):
        for i, name in enumerate(names):
            ys = [results[name]["gaps"][dt][f"cond={c:g}"] for c in CONDS]
            ys = [float("nan") if y is None else max(y, PLOT_FLOOR) for y in ys]
            ax.loglog(
                CONDS,
                ys,
                marker=markers[i % len(markers)],
                color=_color(i),
                linestyle="-" if i < 4 else (":" if name in VARIANTS else "--"),
                label=name,
            )
        ax.axhline(THRESHOLD, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("cond(G)")
        ax.set_title(f"{dt}: Z-trajectory gap vs cond(G)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"relative gap (exact 0 drawn at {PLOT_FLOOR:g})")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return savefig(fig, ctx, "invariance_gap_vs_cond")
