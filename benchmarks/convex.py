r"""Suite ``convex``: ill-conditioned low-rank matrix estimation (Tong, Ma & Chi, JMLR 2021).

The published claim reproduced here: from spectral initialization, **ScaledGD's iteration count to
a fixed accuracy does not depend on the condition number κ of the target**, while plain gradient
descent on the factors needs ``∝ κ`` iterations. Set-up as in the authors' scripts (see
:mod:`benchmarks.lowrank_problems`): planted ``X⋆`` with singular values linearly spaced from 1 to
``1/κ``, ``κ ∈ {1, 10, 100, 1000}`` (``full``: ``{1, 5, 10, 20, 100, 1000}``; the paper shows
``κ ≤ 20``); matrix sensing with ``5nr``
Gaussian measurements, ``f = ½‖𝒜(X) − y‖²``; matrix completion with ``p = 0.2``,
``f = (1/2p)‖P_Ω(X − X⋆)‖_F²``; spectral initialization ``A₀ = U₀Σ₀^{1/2}``, ``B₀ = V₀Σ₀^{1/2}``;
float64; accuracy target ``‖A Bᵀ − X⋆‖_F/‖X⋆‖_F ≤ 1e-10``.

Every optimizer runs through :func:`benchmarks.optimizers.make_optimizer` on a
:class:`benchmarks.optimizers.PairModel` (one PEFT LoRA pair, float64); the loss is a function of
``model.zs()[0]`` and gradients come from autograd.

1. **κ sweep** (the claim): ScaledGD at the paper's step ``η = 0.5`` and GD (``torch.optim.SGD``,
   momentum 0) at the paper's ``η = 0.5/σ_max(X⋆)``; iterations and seconds to the target. A GD run
   stopped by the iteration cap gets an *extrapolated* count (its last linear rate, see
   :func:`~benchmarks.lowrank_problems.extrapolate_iterations`) in the JSON only, flagged as such
   and left out of the table and of the claim's slope: such extrapolations are rough (the rate at
   the cap is not yet the asymptotic one, so they can be far from what an uncapped run takes).
   Checks: ScaledGD's max/min iterations over κ (target ≤ 1.3; also over κ ≤ 100, the paper's range being
   κ ≤ 20) and GD's log-log slope of measured iterations against κ (target ≈ 1; least squares
   with a 95 % OLS interval) and between the two largest measured κ. These checks are on one
   problem draw (``--seed``); one draw's max/min says little on its own, so:

   **ScaledGD over draws**: the κ sweep of ScaledGD repeated on several problem draws (seeds
   ``seed, seed+1, …``; the first is the run above): per κ the median and [min, max] iterations
   of the draws that reached the target, the draws that diverged or hit the cap counted, and the
   spectral start's distance ``‖A₀B₀ᵀ − X⋆‖_F`` in units of ``σ_r(X⋆) = 1/κ``. Tong, Ma & Chi's
   guarantee is local: a start within a small constant times ``σ_r(X⋆)`` of ``X⋆``, which the
   spectral start meets only with a sample size that grows with ``κ`` (their theorems ask for
   ``κ²`` times more samples than the information-theoretic ``(n₁ + n₂)r``; the factor comes
   from the spectral initialization). At a fixed sample size the spectral error does not
   shrink with ``κ`` while ``σ_r`` does, so at large ``κ`` the start lies far outside that region
   ("init" column, ∝ ``κ``); what happens then is outside the theory and varies with the draw.
   Sensing (Gaussian measurements, near-isometric on all low-rank matrices) is usually robust to
   it; completion at the default ``n = 400, r = 5`` is where draws at ``κ = 1000`` can take several
   times longer or diverge — a sample-size effect reported as measured, not averaged away. The
   ``full`` size runs the authors' ``n = 1000, r = 10, p = 0.2`` over the same κ grid as their
   figure (plus 100 and 1000) on six draws.
2. **all optimizers** of :data:`benchmarks.optimizers.OPTIMIZERS` at their ``"convex"`` learning
   rate on the same problems (subset of κ, lower cap): iterations to the target, or the best
   error reached. Adaptive methods with a constant step plateau at an lr-limited error — that is
   the result, not a failure. A run stops early when its best error has not improved by 1 % for
   ``patience`` iterations, when it diverges (error > 1e3 or non-finite) or after
   ``max_seconds_all`` seconds (Shampoo's 400×400 preconditioner roots make its steps the slowest;
   each run's ``seconds`` are in the JSON).
3. **factor imbalance**: the start ``(s·A₀, B₀/s)`` (same ``Z₀``) for ``s ∈ {10, 100}``: ScaledGD
   (and LoRA-RITE) are unchanged, GD at the paper's step diverges, GD at ``η/s²`` (the step
   rescaled to the ``s²``-larger curvature in ``B``) is stable but slow.

Sizes: ``quick`` sensing ``n = 30, r = 2`` and completion ``n = 150, r = 2, p = 0.3`` (two draws);
``default`` sensing ``n = 40, r = 4`` (three draws) and completion ``n = 400, r = 5`` (six draws;
GD capped at 14 000 /
8 000 iterations, enough for κ ≤ 100, and at 1 000 for κ = 1000, whose ~10⁵ no affordable cap
reaches: that row reports "not reached" either way; parts 2 and 3 on sensing only, part 2 capped
at 600 iterations); ``full`` Tong, Ma & Chi's completion ``n = 1000, r = 10, p = 0.2`` (six
draws) and sensing ``n = 100, r = 5, m = 5nr`` (three draws; the paper's ``n = 200`` needs a dense
3.2 GB operator per draw), with GD capped at 2·10⁴ iterations for ``κ ≤ 20`` (the paper's range,
where its slope is fitted) and at 10³ for ``κ ≥ 100`` (reported as not reached, the extrapolated
count in the JSON), part 2 on the default-size problems at ``κ ∈ {10, 100}``, part 3 on both
problems with ``GD η/s²`` capped at 3 000 iterations. See :data:`SIZES`; each result records its
run time.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks import lowrank_problems as lp
from benchmarks.common import RunContext, SuiteResult, config_lr, markdown_table, progress, savefig
from benchmarks.common import color as _color

SUITE = "convex"
TARGET = 1e-10
KAPPAS = [1, 10, 100, 1000]
#: the κ of Tong, Ma & Chi's figures and 1000 (``full``)
FULL_KAPPAS = [1, 5, 10, 20, 100, 1000]
#: paper step sizes (Tong et al. scripts: eta = 0.5; GD eta/sigma_max)
SCALED_GD_LR = 0.5
GD_LR = 0.5  # divided by σ_max(X⋆) (= 1 here)
CLAIM = ("scaled_gd", "sgd")
CLAIM_OVERRIDES: dict[str, dict[str, Any]] = {"scaled_gd": {}, "sgd": {"momentum": 0.0}}

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(
        problems={"sensing": dict(n=30, r=2), "completion": dict(n=150, r=2, p=0.3)},
        kappas=KAPPAS,
        claim_seeds=2,
        cap_scaled=800,
        cap_gd=2500,
        cap_all=200,
        patience=100,
        max_seconds_all=1.0,
        kappas_all=[10],
        imbalance_scales=[10.0],
        imbalance_kappa=10,
        imbalance_problems=["sensing"],
        all_problems={"sensing": dict(n=30, r=2)},
    ),
    "default": dict(
        problems={"sensing": dict(n=40, r=4), "completion": dict(n=400, r=5, p=0.2)},
        kappas=KAPPAS,
        # ScaledGD's κ sweep over draws: completion at this size has draws whose spectral start
        # lies outside the local basin at κ = 1000 (see the module docstring)
        claim_seeds={"sensing": 3, "completion": 6},
        cap_scaled=2000,
        cap_gd={"sensing": 14000, "completion": 8000},
        cap_all=600,
        patience=200,
        # GD at κ = 1000 needs ~10⁵ iterations (10× κ = 100's), beyond any affordable cap: a short
        # cap reports the same "not reached" (the caps above are sized for κ = 100)
        cap_gd_kappa={1000: 1000},
        max_seconds_all=6.0,
        kappas_all=[10],
        imbalance_scales=[100.0],
        imbalance_kappa=10,
        # parts 2 and 3 on sensing only: it shows what completion shows at a third of the cost
        imbalance_problems=["sensing"],
        all_problems={"sensing": dict(n=40, r=4)},
    ),
    # sized to finish in about half an hour on 2 cores (one intra-op thread): Tong, Ma & Chi's
    # completion size over six draws; sensing at n = 100 (the paper's n = 200 is a dense 3.2 GB
    # operator per draw and 0.3 s per iteration); GD capped short at κ ≥ 100 (≳ 7·10⁴ iterations:
    # its slope is fitted over the paper's κ ≤ 20)
    "full": dict(
        problems={"sensing": dict(n=100, r=5), "completion": dict(n=1000, r=10, p=0.2)},
        kappas=FULL_KAPPAS,
        claim_seeds={"sensing": 3, "completion": 6},
        cap_scaled=2000,
        cap_gd={"sensing": 20000, "completion": 20000},
        cap_gd_kappa={100: 1000, 1000: 1000},
        cap_all=2000,
        patience=500,
        # a guard only: the cap and the patience end these runs, not the machine's load
        max_seconds_all=60.0,
        kappas_all=[10, 100],
        imbalance_scales=[10.0, 100.0],
        imbalance_kappa=10,
        imbalance_problems=["sensing", "completion"],
        # GD at η/s² needs s² times GD's iterations: capped, its rate is what the table shows
        cap_imbalance_gd=3000,
        # part 2 on the default-size problems: every optimizer, two κ
        all_problems={"sensing": dict(n=40, r=4), "completion": dict(n=400, r=5, p=0.2)},
    ),
}

#: intra-op threads while the suite runs (see lowrank_problems.torch_threads)
THREADS = 1
#: curves are stored at most at this many (log-spaced) iterations
CURVE_POINTS = 200


def _opt():
    from benchmarks import optimizers

    return optimizers


def claim_lr(name: str, problem: lp.LowRankEstimation) -> float:
    """The paper's step: ScaledGD ``0.5``; GD ``0.5/σ_max(X⋆)``."""
    return SCALED_GD_LR if name == "scaled_gd" else GD_LR / problem.sigma_max


def make_problem(kind: str, spec: dict[str, Any], kappa: float, seed: int) -> lp.LowRankEstimation:
    kw = {"p": spec["p"]} if kind == "completion" else {}
    return lp.make_estimation_problem(kind, spec["n"], spec["r"], kappa, seed=seed, **kw)


def run_one(
    problem: lp.LowRankEstimation,
    name: str,
    lr: float,
    cap: int,
    *,
    scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
    patience: int | None = None,
    seed: int = 0,
    target: float = TARGET,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """One optimizer from spectral initialization ``(s·A₀, B₀/s)``; the error is recorded before
    each step (``errors[t]`` at ``Z_t``), as in the authors' loop.

    Returns the error curve, iterations/seconds to ``target`` (None if not reached), the best
    error, how it stopped (``"target"``, ``"cap"``, ``"plateau"``, ``"diverged"``, ``"time"`` —
    past ``max_seconds``) and the extrapolated count for a capped run. Runs with
    :data:`THREADS` intra-op threads.
    """
    with lp.torch_threads(THREADS):
        return _run_one(
            problem,
            name,
            lr,
            cap,
            scale=scale,
            overrides=overrides,
            patience=patience,
            seed=seed,
            target=target,
            max_seconds=max_seconds,
        )


def _run_one(
    problem: lp.LowRankEstimation,
    name: str,
    lr: float,
    cap: int,
    *,
    scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
    patience: int | None = None,
    seed: int = 0,
    target: float = TARGET,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    opt = _opt()
    a0, b0 = problem.spectral_init()
    n1, n2 = problem.x_star.shape
    model = opt.PairModel(shapes=[(n1, n2, problem.r)], dtype=torch.float64, seed=seed)
    model.set_factors([(a0 * scale, b0 / scale)])
    optimizer = opt.make_optimizer(name, model, suite=SUITE, lr=lr, **(overrides or {}))
    errors: list[float] = []
    best, best_at, ref = math.inf, 0, math.inf
    stop, hit_s = None, None
    t0 = time.perf_counter()
    for t in range(cap + 1):
        z = model.zs()[0]
        e = problem.rel_error(z)
        errors.append(e)
        if not math.isfinite(e) or e > 1e3:
            stop = "diverged"
            break
        if e < best:
            best = e
            if e < 0.99 * ref:
                ref, best_at = e, t
        stop = _stop_reason(e, t - best_at, target, patience, time.perf_counter() - t0, max_seconds)
        if stop == "target":
            hit_s = time.perf_counter() - t0
        if stop is not None or t == cap:
            break
        optimizer.zero_grad(set_to_none=True)
        problem.loss(z).backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    return _outcome(name, lr, scale, errors, best, stop or "cap", hit_s, seconds, target)


def _stop_reason(
    error: float, since_best: int, target: float, patience: int | None, elapsed: float, max_seconds: float | None
) -> str | None:
    """Why a finite run stops at this iteration (``None``: it goes on): target, plateau or time."""
    if error <= target:
        return "target"
    if patience is not None and since_best > patience:
        return "plateau"
    if max_seconds is not None and elapsed > max_seconds:
        return "time"
    return None


def _outcome(
    name: str,
    lr: float,
    scale: float,
    errors: list[float],
    best: float,
    stop: str,
    hit_s: float | None,
    seconds: float,
    target: float,
) -> dict[str, Any]:
    """The record of one run (see :func:`run_one`); a capped run gets its extrapolated count."""
    extrap = (
        lp.extrapolate_iterations(errors, target, window=max(50, min(1000, len(errors) // 5)))
        if stop == "cap"
        else None
    )
    return dict(
        optimizer=name,
        lr=lr,
        scale=scale,
        iterations=len(errors) - 1 if stop == "target" else None,
        seconds_to_target=hit_s,
        best_error=best,
        final_error=errors[-1],
        stop=stop,
        steps=len(errors) - 1,
        seconds=seconds,
        extrapolated_iterations=extrap,
        errors=errors,
    )


def _curve(errors: list[float]) -> dict[str, list]:
    """Log-spaced subsample of an error curve (always keeps the first and last point)."""
    n = len(errors)
    idx = sorted({0, n - 1, *np.unique(np.logspace(0, math.log10(max(n - 1, 1)), CURVE_POINTS).astype(int)).tolist()})
    idx = [i for i in idx if i < n]
    return {"t": idx, "error": [errors[i] for i in idx]}


def _public(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k != "errors"}
    out["curve"] = _curve(r["errors"])
    return out


def _iters_for_fit(r: dict[str, Any]) -> tuple[float | None, bool]:
    if r["iterations"] is not None:
        return float(r["iterations"]), False
    return r["extrapolated_iterations"], True


# ------------------------------------------------------------------------------------------ run
def run(ctx: RunContext) -> SuiteResult:
    # one intra-op thread (see lowrank_problems.torch_threads): at every size here it is faster
    # (a 1000×1000 float64 SVD: 0.36 s with 1 thread, 6.8 s with 2 on a busy 2-core machine)
    with lp.torch_threads(THREADS):
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    size = SIZES[ctx.size]
    if ctx.options.get("tune"):
        tune(ctx)
    seed = int(ctx.seed)
    # warm-up (lazy linalg/autograd initialization would otherwise land in the first timing)
    warm = make_problem("sensing", dict(n=8, r=2), 10, seed)
    for name in CLAIM:
        run_one(warm, name, claim_lr(name, warm), 5, overrides=CLAIM_OVERRIDES[name], seed=seed)
    sweep, curves = _kappa_sweep(ctx, size, seed)
    claims = {kind: _claim(sweep[kind], size, kind) for kind in size["problems"]}
    lrs, everyone, all_curves, runs2 = _all_optimizers(ctx, size, seed, sweep, curves)
    imbalance, imb_curves = _imbalance(ctx, size, seed, sweep, curves, runs2)
    seeds = _seed_sweep(ctx, size, seed, sweep)
    metrics = dict(
        claims=claims,
        kappa_sweep=sweep,
        all_optimizers=everyone,
        imbalance=imbalance,
        imbalance_checks=_imbalance_checks(imb_curves, [1.0, *size["imbalance_scales"]]),
        target=TARGET,
        scaled_gd_seeds=seeds,
    )
    figures = [
        _plot_kappa(ctx, claims, everyone, size, seeds),
        _plot_curves(ctx, curves, all_curves, size),
        _plot_imbalance(ctx, imb_curves),
    ]
    table = _table(claims, sweep, everyone, imbalance, size, seeds)
    # strict JSON: non-finite errors of diverged runs (and inf ratios) are written as null
    config = _config(ctx, size, seed, lrs)
    return SuiteResult(suite=SUITE, metrics=lp.json_safe(metrics), config=config, table=table, figures=figures)


def _cap_gd(size: dict[str, Any], kind: str, kappa: int | None = None) -> int:
    """GD's iteration cap for problem ``kind`` (and ``κ``, see ``cap_gd_kappa``)."""
    c = size["cap_gd"]
    cap = c[kind] if isinstance(c, dict) else c
    return min(cap, size.get("cap_gd_kappa", {}).get(kappa, cap))


def _claim_run(prob: lp.LowRankEstimation, name: str, size: dict[str, Any], kind: str, kappa: int, seed: int):
    """ScaledGD or GD at the paper's step from the spectral start, capped for the size."""
    cap = size["cap_scaled"] if name == "scaled_gd" else _cap_gd(size, kind, kappa)
    return run_one(prob, name, claim_lr(name, prob), cap, overrides=CLAIM_OVERRIDES[name], seed=seed)


def _kappa_sweep(ctx: RunContext, size: dict[str, Any], seed: int):
    """Part 1: ScaledGD and GD at the paper's steps for every problem and ``κ`` (one draw,
    ``seed``). Returns the public records ``[kind][name][str(κ)]`` and the full error curves
    ``[kind][name][κ]``."""
    problems = size["problems"]
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    jobs = [(kind, k, name) for kind in problems for k in size["kappas"] for name in CLAIM]
    cache: dict[tuple[str, int], lp.LowRankEstimation] = {}
    for kind, kappa, name in progress(jobs, ctx, "convex κ sweep"):
        prob = cache.setdefault((kind, kappa), make_problem(kind, problems[kind], kappa, seed))
        r = _claim_run(prob, name, size, kind, kappa, seed)
        r["spectral_init_error"] = r["errors"][0]
        r["init_error_over_sigma_r"] = r["errors"][0] * _sigma_r_units(prob)
        sweep.setdefault(kind, {}).setdefault(name, {})[str(kappa)] = _public(r)
        curves.setdefault(kind, {}).setdefault(name, {})[kappa] = r["errors"]
    return sweep, curves


def _claim(per: dict[str, dict[str, Any]], size: dict[str, Any], kind: str) -> dict[str, Any]:
    """The checks of part 1 on one problem (one draw): ScaledGD's max/min iterations over ``κ``
    and GD's log-log slope of iterations against ``κ``."""
    kappas = size["kappas"]
    sg = [per["scaled_gd"][str(k)]["iterations"] for k in kappas]
    pts = [_iters_for_fit(per["sgd"][str(k)]) for k in kappas]
    ks = [k for k, (v, _) in zip(kappas, pts) if v is not None]
    vs = [v for v, _ in pts if v is not None]
    slope = lp.fit_loglog_slope(ks, vs) if len(vs) >= 3 else None
    measured = [(k, v) for k, (v, ex) in zip(kappas, pts) if v is not None and not ex]
    slope_measured = (
        lp.fit_loglog_slope([k for k, _ in measured], [v for _, v in measured]) if len(measured) >= 3 else None
    )
    ratio = _max_over_min(sg)
    return dict(
        scaled_gd_iterations=sg,
        scaled_gd_max_over_min=ratio,
        scaled_gd_flat=bool(ratio <= 1.3),
        scaled_gd_max_over_min_kappa_le_100=_max_over_min([v for k, v in zip(kappas, sg) if k <= 100]),
        gd_iterations=[v for v, _ in pts],
        gd_extrapolated=[ex for _, ex in pts],
        # the claim's slope: measured counts only (extrapolations past the cap are rough)
        gd_slope=None
        if slope_measured is None
        else dict(
            slope=slope_measured[0],
            ci_low=slope_measured[1],
            ci_high=slope_measured[2],
            kappas=[k for k, _ in measured],
        ),
        # rough: extrapolations from the rate at the cap can be off by 10× (see module docstring)
        gd_slope_incl_extrapolated=None if slope is None else dict(slope=slope[0], ci_low=slope[1], ci_high=slope[2]),
        gd_cap=_cap_gd(size, kind),
        gd_caps=[_cap_gd(size, kind, k) for k in kappas],
        # between the two largest measured κ: the asymptotic regime
        gd_slope_last_pair=None
        if len(measured) < 2
        else math.log(measured[-1][1] / measured[-2][1]) / math.log(measured[-1][0] / measured[-2][0]),
    )


def _max_over_min(values: list[int | None]) -> float:
    """``max/min`` of iteration counts; ``inf`` if any run did not reach the target."""
    return max(values) / min(values) if all(v is not None for v in values) else math.inf


def _all_optimizers(ctx: RunContext, size: dict[str, Any], seed: int, sweep, curves):
    """Part 2: every optimizer at its ``"convex"`` lr (ScaledGD and GD at the paper's steps, their
    κ-sweep runs reused where the problem is the same). Returns the lrs, the public records
    ``[kind][name][str(κ)]``, the curves at the last ``κ`` and the full runs (for part 3)."""
    problems = size["problems"]
    all_problems = size["all_problems"] or problems
    names = list(_opt().OPTIMIZERS)
    lrs = {name: (None if name in CLAIM else config_lr(name, SUITE)) for name in names}
    everyone: dict[str, dict[str, dict[str, Any]]] = {}
    all_curves: dict[str, dict[str, list[float]]] = {}
    runs2: dict[tuple[str, int, str], dict[str, Any]] = {}  # for reuse in part 3
    last = size["kappas_all"][-1]
    jobs2 = [(kind, k, name) for kind in all_problems for k in size["kappas_all"] for name in names]
    cache: dict[tuple[str, int], lp.LowRankEstimation] = {}
    for kind, kappa, name in progress(jobs2, ctx, "convex all optimizers"):
        per = everyone.setdefault(kind, {}).setdefault(name, {})
        if name in CLAIM and all_problems.get(kind) == problems.get(kind):
            # the same run as in the κ sweep (larger cap): reuse it
            per[str(kappa)] = dict(sweep[kind][name][str(kappa)], note="from the κ sweep")
            if kappa == last:
                all_curves.setdefault(kind, {})[name] = curves[kind][name][kappa]
            continue
        prob = cache.setdefault((kind, kappa), make_problem(kind, all_problems[kind], kappa, seed))
        lr, ov = (claim_lr(name, prob), CLAIM_OVERRIDES[name]) if name in CLAIM else (lrs[name], {})
        try:
            r = run_one(
                prob,
                name,
                lr,
                size["cap_all"],
                overrides=ov,
                patience=size["patience"],
                seed=seed,
                max_seconds=size["max_seconds_all"],
            )
        except Exception as exc:
            per[str(kappa)] = dict(error=f"{type(exc).__name__}: {exc}")
            continue
        per[str(kappa)] = _public(r)
        if all_problems.get(kind) == problems.get(kind):
            runs2[(kind, kappa, name)] = r
        if kappa == last:
            all_curves.setdefault(kind, {})[name] = r["errors"]
    return lrs, everyone, all_curves, runs2


#: part 3's methods: label -> (optimizer, power k of the step η/s^k)
IMBALANCE_METHODS = {
    "scaled_gd": ("scaled_gd", 0),
    "lora_rite": ("lora_rite", 0),
    "sgd": ("sgd", 0),
    "sgd_lr/s²": ("sgd", 2),
}


def _imbalance(ctx: RunContext, size: dict[str, Any], seed: int, sweep, curves, runs2):
    """Part 3: the start ``(s·A₀, B₀/s)``; the unscaled start reuses a part-1 or part-2 run where
    it is the same run. Returns the public records ``[kind][label][f"{s:g}"]`` and the curves
    ``[kind][label][s]``."""
    imbalance: dict[str, dict[str, dict[str, Any]]] = {}
    imb_curves: dict[str, dict[str, dict[float, list[float]]]] = {}
    kappa = size["imbalance_kappa"]
    scales = [1.0, *size["imbalance_scales"]]
    jobs3 = [(kind, label, s) for kind in size["imbalance_problems"] for label in IMBALANCE_METHODS for s in scales]
    cache: dict[str, lp.LowRankEstimation] = {}
    for kind, label, s in progress(jobs3, ctx, "convex imbalance"):
        name, power = IMBALANCE_METHODS[label]
        reused = _imbalance_reuse(size, name, kind, s, sweep, curves, runs2)
        if reused is not None:
            imbalance.setdefault(kind, {}).setdefault(label, {})["1"] = reused[0]
            imb_curves.setdefault(kind, {}).setdefault(label, {})[s] = reused[1]
            continue
        prob = cache.setdefault(kind, make_problem(kind, size["problems"][kind], kappa, seed))
        if name in CLAIM:
            lr, ov = claim_lr(name, prob), CLAIM_OVERRIDES[name]
            cap = size["cap_scaled"] if name == "scaled_gd" else _cap_gd(size, kind, kappa)
            if power and "cap_imbalance_gd" in size:
                cap = min(cap, size["cap_imbalance_gd"])
        else:
            lr, ov, cap = config_lr(name, SUITE), {}, size["cap_scaled"]
        r = run_one(prob, name, lr / s**power, cap, scale=s, overrides=ov, patience=size["patience"], seed=seed)
        imbalance.setdefault(kind, {}).setdefault(label, {})[f"{s:g}"] = _public(r)
        imb_curves.setdefault(kind, {}).setdefault(label, {})[s] = r["errors"]
    return imbalance, imb_curves


def _imbalance_reuse(size: dict[str, Any], name: str, kind: str, s: float, sweep, curves, runs2):
    """The unscaled start of part 3 when an earlier part ran exactly it: (record, curve), else None."""
    kappa = size["imbalance_kappa"]
    if s != 1.0:
        return None
    if name in CLAIM and kappa in size["kappas"]:
        # the unscaled start is the κ-sweep run: reuse it
        return dict(sweep[kind][name][str(kappa)], note="from the κ sweep"), curves[kind][name][kappa]
    prev = runs2.get((kind, kappa, name))
    if (
        name not in CLAIM
        and prev is not None
        and prev["stop"] == "target"
        and prev["lr"] == config_lr(name, SUITE)
        and prev["iterations"] <= size["cap_scaled"]
    ):
        # part 2 ran this start (same problem, lr, patience) to the target: the same run
        return dict(_public(prev), note="from the all-optimizer runs"), prev["errors"]
    return None


def _imbalance_checks(imb_curves, scales: list[float]) -> dict[str, dict[str, Any]]:
    """Invariant methods: the largest relative deviation of the curves over ``s`` from ``s = 1``."""
    checks = {}
    for kind in imb_curves:
        for label in ("scaled_gd", "lora_rite"):
            curves_s = [imb_curves[kind][label][s] for s in scales]
            n = min(len(c) for c in curves_s)
            dev = max(max(abs(a - b) / max(b, 1e-300) for a, b in zip(c[:n], curves_s[0][:n])) for c in curves_s[1:])
            checks[f"{kind}/{label}"] = dict(
                max_rel_curve_deviation=dev, same_iterations=len({len(c) for c in curves_s}) == 1
            )
    return checks


def _config(ctx: RunContext, size: dict[str, Any], seed: int, lrs: dict[str, float | None]) -> dict[str, Any]:
    problems = size["problems"]
    all_problems = size["all_problems"] or problems
    return dict(
        size=ctx.size,
        seed=seed,
        kappas=size["kappas"],
        target=TARGET,
        dtype="float64",
        problems={k: dict(v, m=5 * v["n"] * v["r"]) if k == "sensing" else v for k, v in problems.items()},
        all_optimizers_problems={k: dict(v) for k, v in all_problems.items()},
        singular_values="linspace(1, 1/kappa, r) (Tong et al. scripts)",
        caps=dict(
            scaled_gd=size["cap_scaled"],
            gd=size["cap_gd"],
            gd_kappa=size.get("cap_gd_kappa", {}),
            all=size["cap_all"],
            imbalance_gd_rescaled=size.get("cap_imbalance_gd"),
        ),
        patience=size["patience"],
        kappas_all=size["kappas_all"],
        imbalance=dict(
            scales=[1.0, *size["imbalance_scales"]], kappa=size["imbalance_kappa"], problems=size["imbalance_problems"]
        ),
        claim_seeds={kind: _claim_seeds(size, kind, seed) for kind in problems},
        lr=dict(
            scaled_gd=f"{SCALED_GD_LR} (paper)",
            sgd=f"{GD_LR}/sigma_max (paper), momentum 0",
            **{k: v for k, v in lrs.items() if v is not None},
        ),
    )


def _claim_seeds(size: dict[str, Any], kind: str, seed: int) -> list[int]:
    """The problem draws ScaledGD's κ sweep is repeated on (the first is part 1's)."""
    n = size["claim_seeds"]
    return [seed + i for i in range(n[kind] if isinstance(n, dict) else n)]


def _seed_sweep(ctx: RunContext, size: dict[str, Any], seed: int, sweep) -> dict[str, Any]:
    """Part 1 over problem draws: ScaledGD at the paper's step for every ``κ`` and seed of
    :func:`_claim_seeds` (the first seed's runs are part 1's). Per run: iterations, how it
    stopped and the spectral start's distance to ``X⋆`` in units of ``σ_r(X⋆)`` (the local
    basin's scale); summarized by :func:`_seed_summary`."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    jobs = [(kind, k, s) for kind in size["problems"] for k in size["kappas"] for s in _claim_seeds(size, kind, seed)]
    for kind, kappa, s in progress(jobs, ctx, "convex ScaledGD seeds"):
        if s == seed:
            r = sweep[kind]["scaled_gd"][str(kappa)]
        else:
            prob = make_problem(kind, size["problems"][kind], kappa, s)
            r = _claim_run(prob, "scaled_gd", size, kind, kappa, s)
            r["init_error_over_sigma_r"] = r["errors"][0] * _sigma_r_units(prob)
        runs.setdefault(kind, {}).setdefault(str(kappa), []).append(
            dict(
                seed=s,
                iterations=r["iterations"],
                stop=r["stop"],
                best_error=r["best_error"],
                init_error_over_sigma_r=r["init_error_over_sigma_r"],
                seconds=r["seconds"],
            )
        )
    return {kind: _seed_summary(per, size["kappas"]) for kind, per in runs.items()}


def _sigma_r_units(prob: lp.LowRankEstimation) -> float:
    """``‖X⋆‖_F / σ_r(X⋆)``: turns an error relative to ``‖X⋆‖_F`` into units of ``σ_r``."""
    sv = torch.linalg.svdvals(prob.x_star)
    return float(sv.norm() / sv[prob.r - 1])


def _seed_summary(per_kappa: dict[str, list[dict[str, Any]]], kappas: list[int]) -> dict[str, Any]:
    """Median and range of the iterations over the draws that reached the target; diverged and
    capped runs counted; the median of the medians' max/min over ``κ`` (all, and ``κ ≤ 100``)."""
    rows = {}
    for k in kappas:
        recs = per_kappa[str(k)]
        its = [r["iterations"] for r in recs if r["iterations"] is not None]
        init = [r["init_error_over_sigma_r"] for r in recs]
        rows[str(k)] = dict(
            runs=recs,
            seeds=len(recs),
            reached=len(its),
            diverged=sum(r["stop"] == "diverged" for r in recs),
            capped=sum(r["stop"] == "cap" for r in recs),
            median=float(np.median(its)) if its else None,
            min=min(its) if its else None,
            max=max(its) if its else None,
            init_error_over_sigma_r_median=float(np.median(init)),
            init_error_over_sigma_r_max=max(init),
        )
    medians = [rows[str(k)]["median"] for k in kappas]
    return dict(
        per_kappa=rows,
        median_max_over_min=_max_over_min(medians),
        median_max_over_min_kappa_le_100=_max_over_min([v for k, v in zip(kappas, medians) if k <= 100]),
        all_reached=all(rows[str(k)]["reached"] == rows[str(k)]["seeds"] for k in kappas),
    )


# ------------------------------------------------------------------------------------- report
def _cell(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error"
    if r["iterations"] is not None:
        return f"{r['iterations']} ({r['seconds_to_target']:.2f} s)"
    if r["stop"] == "diverged":
        return "diverged"
    return f"best {r['best_error']:.1e} ({r['stop']} @ {r['steps']})"


def _fmt_slope(s: dict[str, float] | None) -> str:
    return "n/a" if s is None else f"{s['slope']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def _table(claims, sweep, everyone, imbalance, size, seeds) -> str:
    return (
        f"Iterations (seconds) to relative error ≤ {TARGET:g}, or the best error reached.\n\n"
        + _claim_tables(claims, sweep, size)
        + "\n\n"
        + _seeds_table(seeds, size)
        + f'\n\nAll optimizers ("convex" lr; cap {size["cap_all"]:d}, plateau patience {size["patience"]:d}):\n\n'
        + _everyone_table(everyone, size)
        + "\n\nFactor-imbalance start (s·A₀, B₀/s):\n\n"
        + _imbalance_table(imbalance, size)
    )


def _claim_tables(claims, sweep, size) -> str:
    rows = []
    for kind in claims:
        for name in CLAIM:
            label = "ScaledGD η=0.5" if name == "scaled_gd" else "GD η=0.5/σ_max"
            rows.append([kind, label, *[_cell(sweep[kind][name][str(k)]) for k in size["kappas"]]])
    t1 = markdown_table(["problem", "method", *[f"κ={k}" for k in size["kappas"]]], rows)
    rows_c = [
        [
            kind,
            f"{c['scaled_gd_max_over_min']:.3g}",
            "yes" if c["scaled_gd_flat"] else "no",
            f"{c['scaled_gd_max_over_min_kappa_le_100']:.3g}",
            _fmt_slope(c["gd_slope"]) + ("" if c["gd_slope"] is None else f" (κ ∈ {c['gd_slope']['kappas']})"),
            "n/a" if c["gd_slope_last_pair"] is None else f"{c['gd_slope_last_pair']:.3f}",
        ]
        for kind, c in claims.items()
    ]
    t2 = markdown_table(
        [
            "problem",
            "ScaledGD max/min iters over κ",
            "≤ 1.3",
            "same, κ ≤ 100",
            "GD slope of log iters vs log κ, measured [95% CI]",
            "GD slope, two largest measured κ",
        ],
        rows_c,
    )
    return t1 + "\n\n" + t2


def _seed_cell(row: dict[str, Any]) -> str:
    """``median [min, max]`` over the draws that reached the target, then what the others did."""
    cell = "not reached" if row["median"] is None else f"{row['median']:g} [{row['min']}, {row['max']}]"
    missed = [f"{row[k]} {k}" for k in ("diverged", "capped") if row[k]]
    cell += f" ({', '.join(missed)})" if missed else ""
    return cell + f"; init {row['init_error_over_sigma_r_median']:.2g} [≤ {row['init_error_over_sigma_r_max']:.2g}]"


def _seeds_table(seeds, size) -> str:
    kappas = size["kappas"]
    rows = [
        [
            kind,
            per["per_kappa"][str(kappas[0])]["seeds"],
            *[_seed_cell(per["per_kappa"][str(k)]) for k in kappas],
            f"{per['median_max_over_min']:.3g}",
            f"{per['median_max_over_min_kappa_le_100']:.3g}",
        ]
        for kind, per in seeds.items()
    ]
    head = ["problem", "draws", *[f"κ={k}" for k in kappas], "max/min of medians", "same, κ ≤ 100"]
    return (
        "ScaledGD η=0.5 over problem draws (seeds): median [min, max] iterations of the draws that reached "
        "the target (diverged / capped draws counted); init: the spectral start's ‖A₀B₀ᵀ − X⋆‖_F / σ_r(X⋆), "
        "median [max] over draws:\n\n" + markdown_table(head, rows)
    )


def _everyone_table(everyone, size) -> str:
    rows3 = []
    for kind, per in everyone.items():
        for name, per_k in per.items():
            lr = next((r["lr"] for r in per_k.values() if "lr" in r), None)
            rows3.append(
                [kind, name, "n/a" if lr is None else f"{lr:.3g}", *[_cell(per_k[str(k)]) for k in size["kappas_all"]]]
            )
    return markdown_table(["problem", "optimizer", "lr", *[f"κ={k}" for k in size["kappas_all"]]], rows3)


def _imbalance_table(imbalance, size) -> str:
    rows4 = []
    for kind, per in imbalance.items():
        for label, per_s in per.items():
            rows4.append([kind, label, *[_cell(per_s[s]) for s in per_s]])
    scales = [f"s={s}" for s in next(iter(next(iter(imbalance.values())).values()))]
    return markdown_table([f"problem (κ={size['imbalance_kappa']:d})", "method", *scales], rows4)


# ---------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_seed_range(ax, per: dict[str, Any] | None, kappas: list[int]) -> None:
    """ScaledGD's median and [min, max] over the draws that reached the target, per ``κ``."""
    if per is None or per["per_kappa"][str(kappas[0])]["seeds"] < 2:
        return
    rows = [per["per_kappa"][str(k)] for k in kappas]
    pts = [(k, r["median"], r["min"], r["max"]) for k, r in zip(kappas, rows) if r["median"] is not None]
    if not pts:
        return
    k, med, lo, hi = (np.asarray(v, dtype=float) for v in zip(*pts))
    label = f"ScaledGD η=0.5: median [range] over {rows[0]['seeds']} draws (reached)"
    ax.errorbar(k * 1.1, med, yerr=[med - lo, hi - med], fmt="D", ms=4, color="C2", capsize=3, label=label)


def _plot_kappa(ctx, claims, everyone, size, seeds) -> str:
    plt = _plt()
    kinds = list(claims)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        c = claims[kind]
        ks = np.asarray(size["kappas"], dtype=float)
        sg = np.asarray([np.nan if v is None else v for v in c["scaled_gd_iterations"]], dtype=float)
        ax.loglog(ks, sg, "o-", color="C0", label="ScaledGD η=0.5")
        _plot_seed_range(ax, seeds.get(kind), size["kappas"])
        gd = np.asarray([np.nan if v is None else v for v in c["gd_iterations"]], dtype=float)
        ex = np.asarray(c["gd_extrapolated"])
        gd[ex] = np.nan
        ax.loglog(ks[~ex], gd[~ex], "s-", color="C3", label="GD η=0.5/σ_max")
        if ex.any():
            caps = np.asarray(c.get("gd_caps", [c["gd_cap"]] * len(ks)), dtype=float)[ex]
            ax.loglog(
                ks[ex],
                caps,
                "^",
                mfc="none",
                ms=9,
                color="C3",
                label=f"GD: not reached within the cap ({', '.join(f'{x:g}' for x in caps)}), count > cap",
            )
        if np.isfinite(gd[0]):
            ax.loglog(ks, gd[0] * ks, "k:", lw=1, label="∝ κ")
        for i, (name, per_k) in enumerate(everyone.get(kind, {}).items()):
            if name in CLAIM:
                continue
            pts = [(k, per_k[str(k)].get("iterations")) for k in size["kappas_all"]]
            pts = [(k, v) for k, v in pts if v is not None]
            if pts:
                ax.loglog(*zip(*pts), "^--", color=_color(i), alpha=0.8, label=f"{name} (config lr)")
        s = c["gd_slope"]
        ax.set_title(f"{kind}: GD slope {s['slope']:.2f} over κ ∈ {s['kappas']}" if s else kind)
        ax.set_xlabel("condition number κ")
        ax.set_ylabel(f"iterations to rel. error ≤ {TARGET:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2)
    return savefig(fig, ctx, "convex_iterations_vs_kappa")


def _plot_curves(ctx, curves, all_curves, size) -> str:
    plt = _plt()
    kinds = list(curves)
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 9), squeeze=False)
    for j, kind in enumerate(kinds):
        ax = axes[0, j]
        for i, k in enumerate(size["kappas"]):
            for name, color, ls, lab in (("scaled_gd", "C0", "-", "ScaledGD"), ("sgd", "C3", "--", "GD")):
                e = curves[kind][name][k]
                ax.loglog(
                    np.arange(1, len(e) + 1),
                    e,
                    color=color,
                    alpha=0.4 + 0.6 * i / max(1, len(size["kappas"]) - 1),
                    ls=ls,
                    label=f"{lab} κ={k}",
                )
        ax.axhline(TARGET, color="k", lw=0.8)
        ax.set_title(f"{kind}: ScaledGD vs GD")
        ax.set_xlabel("iteration + 1")
        ax.set_ylabel("‖ABᵀ − X⋆‖_F / ‖X⋆‖_F")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax = axes[1, j]
        if not all_curves.get(kind):
            ax.text(
                0.5,
                0.5,
                f"{kind}: all-optimizer runs not done at this size",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        for i, (name, e) in enumerate(all_curves[kind].items()):
            ax.semilogy(e, color=_color(i), lw=1.2, label=name)
        ax.axhline(TARGET, color="k", lw=0.8)
        ax.set_title(f"{kind}: all optimizers, κ={size['kappas_all'][-1]}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return savefig(fig, ctx, "convex_error_curves")


def _plot_imbalance(ctx, imb_curves) -> str:
    plt = _plt()
    kinds = list(imb_curves)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.8), squeeze=False)
    styles = {1.0: "-", 10.0: "--", 100.0: ":"}
    for ax, kind in zip(axes[0], kinds):
        for i, (label, per_s) in enumerate(imb_curves[kind].items()):
            for s, e in per_s.items():
                e = np.asarray(e, dtype=float)
                e = np.where(np.isfinite(e), e, np.nan)
                ax.loglog(
                    np.arange(1, len(e) + 1),
                    e,
                    color=f"C{i}",
                    ls=styles.get(s, "-."),
                    lw=2.5 if s == 1.0 else 1.2,
                    label=f"{label} s={s:g}",
                )
        ax.axhline(TARGET, color="k", lw=0.8)
        ax.set_title(f"{kind}: start (s·A₀, B₀/s); invariant methods: s=10, 100 on top of s=1", fontsize=9)
        ax.set_xlabel("iteration + 1")
        ax.set_ylabel("relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return savefig(fig, ctx, "convex_imbalance")


# --------------------------------------------------------------------------------------- tuning
TUNE_GRID = (1e-4, 1.0)  # log grid, 2 points per decade
TUNE_KAPPA = 10
TUNE_CAP = 500
TUNE_SEED = 101


def tune_score(name: str, lr: float) -> float:
    """Mean over the default-size sensing and completion problems (``κ = 10``, seed 101 — disjoint
    from the reported seed) of ``log10`` of the best relative error reached in ``TUNE_CAP``
    iterations (plateau patience 200); a diverged run scores ``inf``."""
    with lp.torch_threads(1):
        logs = []
        for kind, spec in SIZES["default"]["problems"].items():
            prob = make_problem(kind, spec, TUNE_KAPPA, TUNE_SEED)
            r = run_one(prob, name, lr, TUNE_CAP, patience=200, seed=TUNE_SEED, max_seconds=20.0)
            if r["stop"] == "diverged" or not math.isfinite(r["best_error"]):
                return math.inf
            logs.append(math.log10(max(r["best_error"], 1e-300)))
        return float(np.mean(logs))


tune_score.suite = SUITE  # type: ignore[attr-defined]


def tune(ctx: RunContext | None = None, write: bool = True) -> dict[str, Any]:
    """Sweep every optimizer but the two paper-step ones (ScaledGD, GD) on a log grid
    ``1e-4 … 1`` with :func:`tune_score` through :func:`benchmarks.optimizers.tune`, which writes
    the best step into ``configs/<name>.json`` (``lr["convex"]``) and records the sweep in its
    ``"tuned"`` field."""
    opt = _opt()
    names = [n for n in opt.OPTIMIZERS if n not in CLAIM]
    wrap = (lambda it, desc: progress(it, ctx, desc)) if ctx is not None else None
    results = opt.tune(
        tune_score,
        names,
        opt.log_grid(*TUNE_GRID, 2),
        suite=SUITE,
        write=write,
        progress=wrap,
        metric=f"mean log10 best rel. error over sensing n=40 r=4 and completion n=400 r=5 p=0.2, "
        f"kappa={TUNE_KAPPA}, {TUNE_CAP} iterations, seed {TUNE_SEED}",
    )
    for name, r in results.items():
        print(
            f"[convex tune] {name}: best lr {r['best_lr']}; "
            + ", ".join(f"{k:g}:{v:.2f}" for k, v in r["scores"].items())
        )
    return results
