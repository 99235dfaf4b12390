r"""Suite ``regret``: online convex sanity checks in the setting of the LoRA-RITE regret analysis.

LoRA-RITE paper §3.3 (Theorems 3–4) bounds, for convex losses ``f_t`` of ``Z = A Bᵀ`` with
``‖A‖_F ≤ D_A``, ``‖B‖_F ≤ D_B`` and ``‖∇_Z f_t‖_F ≤ G``, the first-order term
``(1/T) Σ_t ∇θ_tᵀ(θ_t − θ⋆) = O(G D_A D_B T^{-1/2})`` for LoRA-RITE (summed second moment, no first
moment), against ``O(G (D_A² + D_B²) T^{-1/2})`` for one-sided matrix Adagrad. Three checks, each
over several seeds, every method through its real optimizer class (``LowRankOptimizer`` strategies,
``torch.optim``) built by :func:`benchmarks.optimizers.make_optimizer`, plus (d) the comparison the
two bounds differ on:

(a) **online linear losses** ``f_t(Z) = ⟨G_t, Z⟩``, ``G_t`` random ±1 entries scaled to
    ``‖G_t‖_F = G``, twice: fair coins (every method's own loss then has mean zero and the regret
    is essentially the comparator's ``D_A D_B σ₁(Σ G_t) ~ √T`` — the classic lower-bound
    construction, identical for all methods) and with a planted rank-one sign bias ``β`` (the
    learner has a direction to find; see :class:`~benchmarks.lowrank_problems.LinearStream`). The
    best fixed comparator over the constraint set is ``−D_A D_B σ₁(Σ_t G_t)`` (closed form), so the
    regret is exact. **What the fair-coin case shows**: the regret bookkeeping, the projection and
    the comparator are consistent (every method lands on the same ``√T`` curve, the
    comparator's). **What it does not show**: anything about the methods — Adam, which has no
    regret guarantee, lands on it too, and the ``−1/2`` slope is the comparator's. The biased
    case is the one where the methods differ.
(b) **stochastic quadratic tracking** ``f_t(Z) = ½‖Z − Z⋆ − ξ_t‖_F²``; the best fixed ``Z`` over
    the constraint set ``{rank ≤ r, ‖Z‖_* ≤ D_A D_B}`` is computed exactly (singular values of the
    running mean projected onto the ℓ₁ ball), so the regret is exact too.

    In (a) and (b) every method's factors are **projected onto the Frobenius balls**
    ``‖A‖_F ≤ D_A``, ``‖B‖_F ≤ D_B`` after each step (done here, the same for all methods — the
    theorems assume the iterates stay in the set). The suite reports ``Regret_T / T`` and the
    first-order term ``(1/T) Σ ∇θ_tᵀ(θ_t − θ⋆)`` at the worst ``θ⋆`` of the ball product (the bound
    holds for every ``θ⋆``; the worst one has the closed form
    ``Σ∇θ_tᵀθ_t + D_A‖Σ∇A_t‖_F + D_B‖Σ∇B_t‖_F``, the linearized regret in factor space, see
    :func:`~benchmarks.lowrank_problems.worst_case_first_order`) at log-spaced horizons, the
    fitted log-log slope with a 95 % CI over seeds
    (:func:`~benchmarks.lowrank_problems.fit_loglog_slope`, fitted on ``T ≥ fit_from``), and the
    reference lines ``G D_A D_B T^{-1/2}`` and ``G (D_A² + D_B²) T^{-1/2}`` (the theorems' rates
    with constant 1 — the constants are not given — and ``G`` the largest observed ``‖∇_Z f_t‖_F``).
(c) **imbalance sweep** on (b) with **unconstrained** factors (no projection: separate Frobenius
    projections of ``A`` and ``B`` are not gauge invariant): start from ``(s A₀, B₀/s)``,
    ``s ∈ {1, 3, 10, 30, 100}`` — the same ``Z₀`` and the same loss stream for every ``s``. The
    comparator is the best fixed rank-``r`` matrix (truncated SVD of the running mean). Invariant
    methods (LoRA-RITE, ScaledGD) must give the same regret for every ``s`` (relative spread
    ``≤ 1e-6`` in float64 is checked and reported); one-sided matrix Adagrad, Adam and GD are shown
    with ``Regret(s)/Regret(1)`` next to the bound ratio ``(D_A² + D_B²)/(2 D_A D_B)`` at
    ``D_A = ‖sA₀‖_F``, ``D_B = ‖B₀/s‖_F`` (relative to ``s = 1``). GD at its tuned step diverges for
    large ``s`` (reported as ``inf``); ``GD (lr/s²)`` — the step rescaled to the larger curvature —
    is shown as well.

(d) **radii sweep** (the comparison the bounds are about): the biased linear losses of (a) and the
    quadratic tracking of (b) with the Frobenius radii ``D_A/D_B ∈ {1, 4, 16}`` at the problem's
    product ``D_A D_B`` — the same set of ``Z`` (``rank ≤ r``, ``‖Z‖_* ≤ D_A D_B``), so the same
    comparator and the same LoRA-RITE bound ``G D_A D_B``, while one-sided Adagrad's
    ``G (D_A² + D_B²)`` grows by the factor ``(D_A² + D_B²)/(2 D_A D_B)``. Reported:
    ``Regret_T/T`` at each ratio and relative to ``D_A = D_B``, every method at its one step
    (``D_A/D_B = 4`` is (a)/(b) itself, its first seeds reused; the starts scale with the radii).
    At a fixed product the radii, the starts and the projections of two ratios differ by a scalar
    gauge ``(cA, B/c)``, so an invariant method runs the same ``Z`` trajectory at every ratio:
    its regret does not depend on the ratio at all (checked: relative spread ``≤ 1e-6``), which is
    the dependence on ``D_A D_B`` alone that Theorem 4 states; a bound is only an upper limit, so
    how much the other methods' regret grows with the ratio is what the table measures.

**The biased-coin result.** With a rank-one comparator on the boundary of 𝒦, a method does well
when its ``Z`` concentrates on that direction with ``‖A‖_F = D_A``, ``‖B‖_F = D_B``. Two effects
keep the invariant methods (LoRA-RITE, ScaledGD) from it, both visible in the table's tail-mass
and ``σ₁(Z_T)/(D_A D_B)`` columns:

* *additive vs multiplicative dynamics*: an invariant update takes the same step in ``Z``
  whatever the factorization, so the zero-mean noise of ``G_t`` keeps driving ``Z``'s other
  directions, damped only by the step's ``1/√t`` decay (summed second moment, or schedule) — ``√T`` regret, what
  Theorem 4 promises and no better. OGD's step on ``A`` is ``∇_Z f·B``, one-sided Adagrad's is
  that times a preconditioner summed over the whole past: a direction in which ``B`` has become
  small gets small steps (the past dominates the sum) and dies out, ``Z`` becomes rank one and
  the margin of the biased stream gives faster than ``√T`` regret (Adam concentrates too).
  LoRA-RITE sums the second moment of the *unmagnified* gradient ``∇A R_B⁻¹`` and restores the
  magnitude afterwards, which is what makes it invariant — and what keeps such directions alive;
* *the projection*: the step of an invariant method on ``A`` in a direction where ``B`` is small
  is large in Frobenius norm (``∝ 1/σ_min(B)``), and the projection onto the Frobenius ball —
  not a GL(r)-invariant operation — shrinks all of ``A``, useful direction included. At a larger
  step this traps LoRA-RITE and ScaledGD alike at ``Z ≈ 0``: each factor's mass sits where the
  other factor is near zero, its amplified steps there cut back by the projection every step.
  Projecting instead through the balanced factorization of ``Z`` (a change of factorization,
  then the same balls: a GL(r)-invariant projection) removes the trap; the first effect remains.

Neither is an implementation defect of LoRA-RITE: ScaledGD, which keeps no state, does the same,
and the theorem's extra Assumption 1 constrains the transports along the trajectory.

Methods: every registered strategy and two of torch's optimizers (:func:`_methods`; a strategy
runs with its defaults and a constant step unless :data:`SETTINGS` says otherwise). LoRA-RITE in
the configuration of the paper's Theorem 4 (``second_moment="sum"``, ``escape=True``, no first
moment ``betas=(0, ·)``, ``bias_correction=False``, ``row_normalize=False``, no clipping, update
skipping or capping, and the library's safeguards off: ``relative_step_cap=0``,
``rebalance=0``), the iterates projected onto the Frobenius balls by the suite, and one-sided
matrix Adagrad with constant step; online gradient descent (``torch.optim.SGD``, no momentum) and
the preconditioned gradient methods without a second moment (ScaledGD, AltLoRA, LoRA-One) with
``η_t = η/√t`` (``LambdaLR``); Adam, ScaledAdam and LoFT with constant step (no regret guarantee;
for reference; LoFT, AdamW on ``Z`` projected onto the factors' subspaces, is GL(r)-invariant and
so checked flat in (c)). The GL(r)-invariant strategies (declared ``invariance``) are the ones
checked flat in (c) and (d).
Learning rates: the ``"regret"`` entry of each optimizer's config (tuned by ``--tune``: log-grid
sweep on (a, biased) and (b), see :func:`tune`).

Gradients ``∇_Z f_t`` are computed in closed form (``G_t`` and ``Z_t − Z⋆ − ξ_t``) and chained to
the factors (``∇A = ∇_Z B``, ``∇B = ∇_Zᵀ A``); updates are always the optimizers' own. The factors
are plain leaf tensors (views of one batched tensor), not a PEFT model: at these sizes a step is
pure Python overhead, and PEFT's would dominate. All problems and seeds of one method run as
separate pairs of **one** optimizer, stepped together (pairs are independent — no global
clipping here; a test checks that batched and separate runs agree), which keeps 10⁴–10⁵ steps
affordable. Every method therefore uses one step size for (a), (b) and (c).

Sizes: ``quick`` T = 10³, 3 seeds (1 for the sweep, 2 for the radii); ``default`` T = 10³ (a third of
the horizon the steps are tuned at, :data:`TUNE_T`), 5 seeds (2, 3); ``full`` T = 10⁵, 10 seeds (3, 5). Each result
records its wall time (``run.seconds``) and each method's (``seconds_per_method`` in the JSON).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks import lowrank_problems as lp
from benchmarks import optimizers
from benchmarks.common import RunContext, SuiteResult, config_lr, markdown_table, progress, savefig

SUITE = "regret"

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(t_max=1_000, seeds=3, seeds_imbalance=1, seeds_radii=2, fit_from=30),
    # T = 1000 (a third of the horizon the steps were tuned at, TUNE_T): 1.3 decades from T = 50
    # to fit the slope over, in the time `make bench` allows; --full runs T = 1e5
    "default": dict(t_max=1_000, seeds=5, seeds_imbalance=2, seeds_radii=3, fit_from=50),
    "full": dict(t_max=100_000, seeds=10, seeds_imbalance=3, seeds_radii=5, fit_from=300),
}

#: problem constants (all sizes)
PROBLEM: dict[str, Any] = dict(
    m=20,
    n=15,
    r=3,
    d_a=2.0,
    d_b=0.5,  # Frobenius radii of the constraint set (imbalanced on purpose)
    g=1.0,
    bias=0.25,  # (a): ‖G_t‖_F and the sign bias β
    z_star_sigma=(0.25, 0.15, 0.1),  # (b): singular values of the planted Z⋆ (‖Z⋆‖_* = D_A D_B / 2)
    noise_fro=1.0,  # (b): E‖ξ_t‖_F² = noise_fro² (entries N(0, noise_fro²/(mn)))
    init_frac=0.5,  # (a), (b): ‖A₀‖_F = init_frac·D_A, ‖B₀‖_F = init_frac·D_B
    imbalance_norm=0.7,  # (c): ‖A₀‖_F = ‖B₀‖_F before the (s A₀, B₀/s) rescaling
)
SCALES = [1.0, 3.0, 10.0, 30.0, 100.0]
#: (d): radii ratios D_A/D_B at the problem's D_A·D_B, on these problems of (a) and (b)
RADII_RATIOS = [1.0, 4.0, 16.0]
RADII_PROBLEMS = ("linear_biased", "quadratic")
#: intra-op threads while the suite runs (tiny matrices: see lowrank_problems.torch_threads)
THREADS = 1

#: LoRA-RITE in the configuration of the paper's Theorem 4: summed second moment, escaped mass,
#: no first moment, no bias correction, no row normalization, no clipping or update skipping, and
#: none of the library's safeguards (relative-step cap, rebalancing); the suite projects the
#: iterates onto the Frobenius balls (``β₂`` is unused with the summed second moment)
LORA_RITE_PAPER = dict(
    second_moment="sum",
    escape=True,
    bias_correction=False,
    row_normalize=False,
    betas=(0.0, 0.999),
    clip_unmagnified_grad=0.0,
    update_skipping=0.0,
    update_capping=0.0,
    relative_step_cap=0.0,
    rebalance=0.0,
)

#: how the suite runs a method where it differs from the default (the optimizer's own defaults, a
#: constant step, its config label): ``overrides``, ``schedule`` ``"constant"`` or ``"inv_sqrt"``
#: (``η_t = η/√t``, the step the regret analyses of gradient descent take), ``label``
SETTINGS: dict[str, dict[str, Any]] = {
    "lora_rite": dict(overrides=LORA_RITE_PAPER, label="LoRA-RITE (Thm 4)"),
    "sgd": dict(overrides={"momentum": 0.0}, schedule="inv_sqrt", label="OGD"),
    # the preconditioned gradient methods without a second moment: η/√t like OGD (AltLoRA: a
    # momentum of ScaledGD steps, one factor per round in its Algorithm 1)
    "scaled_gd": dict(schedule="inv_sqrt"),
    "altlora": dict(schedule="inv_sqrt"),
    "lora_one": dict(schedule="inv_sqrt"),
}
#: the other libraries' optimizers run here (OGD, the theory's baseline, and Adam for reference)
EXTERNAL = ("sgd", "adam")


def _methods() -> dict[str, tuple[str, dict[str, Any], str]]:
    """label -> (optimizer name, overrides, schedule): every registered strategy, then :data:`EXTERNAL`."""
    out = {}
    for name in [*optimizers.PACKAGE_OPTIMIZERS, *EXTERNAL]:
        spec = SETTINGS.get(name, {})
        out[name] = (name, dict(spec.get("overrides", {})), spec.get("schedule", "constant"))
    return out


def _labels() -> dict[str, str]:
    labels = {}
    for name, (opt_name, _, schedule) in METHODS.items():
        base = SETTINGS.get(name, {}).get("label") or optimizers.load_config(opt_name)["label"].split(" (")[0]
        labels[name] = base + (" η/√t" if schedule == "inv_sqrt" else "")
    return {**labels, "sgd_rescaled": "OGD η/(s²√t)"}


METHODS: dict[str, tuple[str, dict[str, Any], str]] = _methods()
#: the methods whose strategy declares GL(r) invariance: checked flat in (c) and (d)
INVARIANT = tuple(name for name in METHODS if name in optimizers.INVARIANT)
#: spread tolerance of the invariant methods in the imbalance sweep
INVARIANCE_TOL = 1e-6
#: a pair whose ‖Z‖_F exceeds this (or goes non-finite) counts as diverged
DIVERGED = 1e8
LABELS = _labels()


# ------------------------------------------------------------------------------ the online loop
class _Bank:
    """``P`` independent pairs as leaf tensors that are views of one ``(P, m, r)`` / ``(P, n, r)`` base.

    The optimizer sees ``P`` separate pairs (``[(A_p, B_p)]``); the suite reads and writes all of
    them at once through the bases (no stacking per step).
    """

    def __init__(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        self.a = a0.detach().clone()
        self.b = b0.detach().clone()
        self.a_views = [self.a[i].requires_grad_(True) for i in range(self.a.shape[0])]
        self.b_views = [self.b[i].requires_grad_(True) for i in range(self.b.shape[0])]

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.a_views, self.b_views))

    def set_grads(self, ga: torch.Tensor, gb: torch.Tensor, alive: list[bool]) -> None:
        """Gradients of the live pairs; a diverged pair gets none, so every optimizer skips it."""
        for i, (a, b) in enumerate(zip(self.a_views, self.b_views)):
            if alive[i]:
                a.grad = ga[i]
                b.grad = gb[i]
            else:
                a.grad = b.grad = None


def build_optimizer(name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], lr: float, overrides: dict[str, Any]):
    """The optimizer ``name`` over leaf pairs, through :func:`benchmarks.optimizers.make_optimizer`."""
    return optimizers.make_optimizer(name, optimizers.LeafPairs(pairs), suite=SUITE, lr=lr, **overrides)


def _initial_factors(
    seeds: list[int], m: int, n: int, r: int, norm_a: float, norm_b: float
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = [], []
    for s in seeds:
        g = lp.generator(40_000 + s)
        x = torch.randn(m, r, generator=g, dtype=lp.DTYPE)
        y = torch.randn(n, r, generator=g, dtype=lp.DTYPE)
        a.append(x / lp.frob(x) * norm_a)
        b.append(y / lp.frob(y) * norm_b)
    return torch.stack(a), torch.stack(b)


def z_star(p: dict[str, Any] = PROBLEM) -> torch.Tensor:
    """The planted ``Z⋆`` of (b): random sign bases, singular values ``z_star_sigma``."""
    g = lp.generator(7)
    r = len(p["z_star_sigma"])
    u = lp.random_sign_basis(p["m"], r, g)
    v = lp.random_sign_basis(p["n"], r, g)
    return (u * torch.tensor(p["z_star_sigma"], dtype=lp.DTYPE)) @ v.T


@dataclass
class Segment:
    """One problem instance inside a batched run: its pairs are ``seeds × scales`` (seed-major).

    ``kind`` ``"linear"`` (a) or ``"quadratic"`` (b, c); ``constrained``: projected onto the
    Frobenius balls and compared over 𝒦 (else over all rank-``r`` matrices); ``scales``: the
    imbalance start ``(s A₀, B₀/s)`` with balanced ``‖A₀‖_F = ‖B₀‖_F`` (unconstrained only);
    ``bias``: the sign bias β of (a); ``radii``: ``(D_A, D_B)`` if not the problem's. Every
    scale of a seed sees the same loss stream.
    """

    name: str
    kind: str
    constrained: bool
    seeds: list[int]
    scales: list[float] = field(default_factory=lambda: [1.0])
    bias: float = 0.0
    radii: tuple[float, float] | None = None

    def ball(self, p: dict[str, Any] = PROBLEM) -> tuple[float, float]:
        """``(D_A, D_B)`` of the constraint set: ``radii``, else the problem's."""
        return self.radii if self.radii is not None else (p["d_a"], p["d_b"])

    @property
    def pair_seeds(self) -> list[int]:
        return [s for s in self.seeds for _ in self.scales]

    @property
    def pair_scales(self) -> list[float]:
        return [c for _ in self.seeds for c in self.scales]


def segments_for(size: dict[str, Any], base_seed: int = 0, p: dict[str, Any] = PROBLEM) -> list[Segment]:
    """(a) fair and biased linear losses, (b) quadratic tracking, (c) the imbalance sweep, (d) the
    radii sweep."""
    seeds = [base_seed + i for i in range(size["seeds"])]
    seeds_c = [base_seed + i for i in range(size["seeds_imbalance"])]
    return [
        Segment("linear_fair", "linear", True, seeds, bias=0.0),
        Segment("linear_biased", "linear", True, seeds, bias=p["bias"]),
        Segment("quadratic", "quadratic", True, seeds),
        Segment("imbalance", "quadratic", False, seeds_c, scales=list(SCALES)),
        *radii_segments(seeds[: size["seeds_radii"]], p),
    ]


def radii_of(ratio: float, p: dict[str, Any] = PROBLEM) -> tuple[float, float]:
    """``(D_A, D_B)`` with ``D_A/D_B = ratio`` and the problem's product ``D_A D_B`` (the same set
    of ``Z``, ``{rank ≤ r, ‖Z‖_* ≤ D_A D_B}``, so the same comparator, for every ratio)."""
    prod = p["d_a"] * p["d_b"]
    return math.sqrt(prod * ratio), math.sqrt(prod / ratio)


def radii_segment_name(problem: str, ratio: float, p: dict[str, Any] = PROBLEM) -> str:
    """Segment of (d) at ``ratio``: the problem's own segment where the radii are the problem's."""
    return problem if radii_of(ratio, p) == (p["d_a"], p["d_b"]) else f"{problem}@{ratio:g}"


def radii_segments(seeds: list[int], p: dict[str, Any] = PROBLEM) -> list[Segment]:
    """(d): the problems of :data:`RADII_PROBLEMS` at every ratio of :data:`RADII_RATIOS` (but the
    problem's own, whose segment is reused)."""
    out = []
    for problem in RADII_PROBLEMS:
        for ratio in RADII_RATIOS:
            name = radii_segment_name(problem, ratio, p)
            if name != problem:
                kind, bias = ("linear", p["bias"]) if problem == "linear_biased" else ("quadratic", 0.0)
                out.append(Segment(name, kind, True, seeds, bias=bias, radii=radii_of(ratio, p)))
    return out


def online_run(
    method: str,
    segments: list[Segment],
    t_max: int,
    lr: float,
    *,
    lr_scale_power: float = 0.0,
    p: dict[str, Any] = PROBLEM,
    ctx: RunContext | None = None,
    desc: str = "",
) -> dict[str, dict[str, Any]]:
    """See :func:`_online_run`; runs with :data:`THREADS` intra-op threads."""
    with lp.torch_threads(THREADS):
        return _online_run(method, segments, t_max, lr, lr_scale_power=lr_scale_power, p=p, ctx=ctx, desc=desc)


def _online_run(
    method: str,
    segments: list[Segment],
    t_max: int,
    lr: float,
    *,
    lr_scale_power: float = 0.0,
    p: dict[str, Any] = PROBLEM,
    ctx: RunContext | None = None,
    desc: str = "",
) -> dict[str, dict[str, Any]]:
    """Run one method on all ``segments`` at once: every pair of every segment is a pair of the
    same optimizer (pairs are independent), stepped together.

    ``lr_scale_power = k`` divides the step of a pair started at scale ``s`` by ``s^k`` (one
    optimizer per scale then). Returns, per segment name: horizons ``T``, ``Regret_T/T`` and the
    first-order term ``/T`` of every pair (``(P, K)``), the max gradient and factor norms per pair,
    the divergence step per pair (None if it did not), pair seeds and scales, the segment's
    radii, the final factors' shape (:func:`_final_shape`) and the run's seconds.
    """
    bank, slices = _start(segments, p)
    all_scales = [c for seg in segments for c in seg.pair_scales]
    opts, scheds = _optimizers(method, bank, all_scales, lr, lr_scale_power)
    streams, books = _losses(segments, p)
    guard = _Guard(segments, p)
    cps = lp.checkpoints(t_max)
    reg: list[list[torch.Tensor]] = [[] for _ in segments]
    fo: list[list[torch.Tensor]] = [[] for _ in segments]
    ga_all, gb_all = torch.zeros_like(bank.a), torch.zeros_like(bank.b)
    k = 0
    t0 = time.perf_counter()
    steps = range(1, t_max + 1)
    if ctx is not None:
        steps = progress(steps, ctx, desc or f"regret {method}", total=t_max)
    for t in steps:
        _feed(segments, slices, streams, books, bank, ga_all, gb_all)
        bank.set_grads(ga_all, gb_all, guard.alive_list)
        for o in opts:
            o.step()
        for sch in scheds:
            sch.step()
        guard.after_step(bank, t)
        if t == cps[k]:
            for j, (sl, book) in enumerate(zip(slices, books)):
                inf = torch.full((sl.stop - sl.start,), math.inf, dtype=lp.DTYPE)
                ok = guard.alive[sl]
                reg[j].append(torch.where(ok, book.regret() / t, inf))
                fo[j].append(torch.where(ok, book.first_order() / t, inf))
            k += 1
    seconds = time.perf_counter() - t0
    out = {}
    for j, (seg, sl, book) in enumerate(zip(segments, slices, books)):
        out[seg.name] = dict(
            T=cps,
            regret_over_T=torch.stack(reg[j], 1).numpy(),
            first_order_over_T=torch.stack(fo[j], 1).numpy(),
            max_grad=book.max_grad.numpy(),
            max_norm_a=guard.max_norm_a[sl].numpy(),
            max_norm_b=guard.max_norm_b[sl].numpy(),
            diverged_at=guard.diverged_at[sl],
            pair_seeds=seg.pair_seeds,
            pair_scales=seg.pair_scales,
            radii=seg.ball(p),
            final_shape=_final_shape(bank.a[sl], bank.b[sl], *seg.ball(p)),
            seconds=seconds,
        )
    return out


def _start(segments: list[Segment], p: dict[str, Any]) -> tuple[_Bank, list[slice]]:
    """The pairs of all segments in one :class:`_Bank`, and each segment's slice of it."""
    m, n, r = p["m"], p["n"], p["r"]
    a_parts, b_parts, slices = [], [], []
    start = 0
    for seg in segments:
        if seg.constrained:
            if seg.scales != [1.0]:
                raise ValueError("the imbalance start is for unconstrained segments only")
            d_a, d_b = seg.ball(p)
            a0, b0 = _initial_factors(seg.pair_seeds, m, n, r, p["init_frac"] * d_a, p["init_frac"] * d_b)
        else:
            a0, b0 = _initial_factors(seg.pair_seeds, m, n, r, p["imbalance_norm"], p["imbalance_norm"])
            sc = torch.tensor(seg.pair_scales, dtype=lp.DTYPE).view(-1, 1, 1)
            a0, b0 = a0 * sc, b0 / sc
        a_parts.append(a0)
        b_parts.append(b0)
        slices.append(slice(start, start + a0.shape[0]))
        start += a0.shape[0]
    return _Bank(torch.cat(a_parts), torch.cat(b_parts)), slices


def _optimizers(method: str, bank: _Bank, scales: list[float], lr: float, lr_scale_power: float):
    """The optimizer(s) of ``method`` over the bank's pairs (one per scale with ``lr_scale_power``)
    and their ``η/√t`` schedulers where the method has that schedule."""
    opt_name, overrides, schedule = METHODS[method]
    if lr_scale_power:
        groups: dict[float, list[int]] = {}
        for i, c in enumerate(scales):
            groups.setdefault(c, []).append(i)
        opts = [
            build_optimizer(opt_name, [bank.pairs[i] for i in idx], lr / c**lr_scale_power, overrides)
            for c, idx in groups.items()
        ]
    else:
        opts = [build_optimizer(opt_name, bank.pairs, lr, overrides)]
    scheds = []
    if schedule == "inv_sqrt":
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / math.sqrt(t + 1.0)) for o in opts]
    return opts, scheds


def _losses(segments: list[Segment], p: dict[str, Any]) -> tuple[list, list]:
    """Each segment's loss stream and its exact-regret book."""
    m, n, r = p["m"], p["n"], p["r"]
    zs = z_star(p)
    streams, books = [], []
    for seg in segments:
        k = len(seg.pair_seeds)
        d_a, d_b = seg.ball(p)
        if seg.kind == "linear":
            if not seg.constrained:
                raise ValueError("linear losses need the constraint set (they are unbounded below otherwise)")
            streams.append(lp.LinearStream(seg.pair_seeds, m, n, p["g"], bias=seg.bias))
            books.append(lp.LinearRegret(k, m, n, r, d_a, d_b))
        else:
            streams.append(lp.QuadraticStream(seg.pair_seeds, zs, p["noise_fro"] / math.sqrt(m * n)))
            books.append(lp.QuadraticRegret(k, m, n, r, *((d_a, d_b) if seg.constrained else (None, None))))
    return streams, books


def _feed(segments, slices, streams, books, bank: _Bank, ga_all: torch.Tensor, gb_all: torch.Tensor) -> None:
    """Reveal every segment's loss at the current factors: book it, write the factor gradients."""
    with torch.no_grad():
        for seg, sl, stream, book in zip(segments, slices, streams, books):
            a, b = bank.a[sl], bank.b[sl]
            c = stream.next()
            gz = c if seg.kind == "linear" else a @ b.mT - c
            ga, gb = gz @ b, gz.mT @ a
            if seg.kind == "linear":
                book.observe(c, a, b, ga, gb)
            else:
                book.observe(c, a, b, ga, gb, gz)
            ga_all[sl] = ga
            gb_all[sl] = gb


class _Guard:
    """After each step: the projection onto the Frobenius balls (constrained pairs) and the
    divergence test; records the largest factor norms and the step a pair diverged at."""

    def __init__(self, segments: list[Segment], p: dict[str, Any]) -> None:
        self.constrained = torch.tensor([seg.constrained for seg in segments for _ in seg.pair_seeds])
        balls = [seg.ball(p) if seg.constrained else (math.inf, math.inf) for seg in segments for _ in seg.pair_seeds]
        self.radius_a = torch.tensor([d for d, _ in balls], dtype=lp.DTYPE)
        self.radius_b = torch.tensor([d for _, d in balls], dtype=lp.DTYPE)
        self.any_constrained = bool(self.constrained.any())
        npairs = len(balls)
        self.alive = torch.ones(npairs, dtype=torch.bool)
        self.alive_list = self.alive.tolist()
        self.max_norm_a = torch.zeros(npairs, dtype=lp.DTYPE)
        self.max_norm_b = torch.zeros(npairs, dtype=lp.DTYPE)
        self.diverged_at: list[int | None] = [None] * npairs

    @torch.no_grad()
    def after_step(self, bank: _Bank, t: int) -> None:
        na, nb = lp.frob(bank.a), lp.frob(bank.b)
        if self.any_constrained:
            fa = torch.clamp(self.radius_a / torch.clamp(na, min=1e-300), max=1.0)
            fb = torch.clamp(self.radius_b / torch.clamp(nb, min=1e-300), max=1.0)
            bank.a.mul_(fa.view(-1, 1, 1))
            bank.b.mul_(fb.view(-1, 1, 1))
            na, nb = na * fa, nb * fb
            self.max_norm_a = torch.maximum(self.max_norm_a, torch.where(self.constrained, na, 0.0))
            self.max_norm_b = torch.maximum(self.max_norm_b, torch.where(self.constrained, nb, 0.0))
        # ‖A Bᵀ‖_F ≤ ‖A‖_F‖B‖_F: a cheap divergence test
        bound = na * nb
        bad = self.alive & ~(torch.isfinite(bound) & (bound < DIVERGED))
        if bool(bad.any()):
            # freeze a diverged pair at zero (finite bookkeeping); its regret is reported as inf
            for i in torch.nonzero(bad).flatten().tolist():
                self.diverged_at[i] = t
            self.alive &= ~bad
            self.alive_list = self.alive.tolist()
            bank.a[~self.alive] = 0.0
            bank.b[~self.alive] = 0.0


@torch.no_grad()
def _final_shape(a: torch.Tensor, b: torch.Tensor, d_a: float, d_b: float) -> dict[str, np.ndarray]:
    """Per pair at ``T``: ``σ₁(Z)/(D_A D_B)`` (1 for the linear comparator's rank-one ``Z``) and
    each factor's mass outside its top singular direction, ``1 − σ₁(X)²/‖X‖_F²``."""
    sz = torch.linalg.svdvals(a @ b.mT)[:, 0]
    sa, sb = torch.linalg.svdvals(a), torch.linalg.svdvals(b)
    return dict(
        top_sv_z=(sz / (d_a * d_b)).numpy(), tail_mass_a=_tail_mass(sa).numpy(), tail_mass_b=_tail_mass(sb).numpy()
    )


def _tail_mass(s: torch.Tensor) -> torch.Tensor:
    return 1.0 - s[:, 0] ** 2 / torch.clamp((s**2).sum(-1), min=1e-300)


# ------------------------------------------------------------------------------------ analysis
def _slope(t: np.ndarray, y: np.ndarray, t_from: int) -> tuple[float, float, float] | None:
    sel = t >= t_from
    try:
        return lp.fit_loglog_slope(t[sel], y[:, sel])
    except ValueError:
        return None


def summarize_online(run: dict[str, Any], fit_from: int) -> dict[str, Any]:
    """Regret and first-order term over seeds, their slopes, the bound lines at ``T`` and the final
    factors' shape (mean over seeds, see :func:`_final_shape`)."""
    t = np.asarray(run["T"], dtype=float)
    reg, fo = run["regret_over_T"], run["first_order_over_T"]
    g = float(np.max(run["max_grad"]))
    d_a, d_b = run["radii"]
    out = dict(
        T=run["T"],
        regret_over_T_mean=reg.mean(0).tolist(),
        regret_over_T_seeds=reg.tolist(),
        first_order_over_T_mean=fo.mean(0).tolist(),
        final_regret_over_T=float(reg[:, -1].mean()),
        final_regret_over_T_sd=float(reg[:, -1].std(ddof=1)) if reg.shape[0] > 1 else 0.0,
        final_first_order_over_T=float(fo[:, -1].mean()),
        G_observed=g,
        bound_lora_rite_final=g * d_a * d_b / math.sqrt(t[-1]),
        bound_one_sided_final=g * (d_a**2 + d_b**2) / math.sqrt(t[-1]),
        seconds=run["seconds"],
        diverged=int(sum(d is not None for d in run["diverged_at"])),
        **{f"final_{k}": float(np.mean(v)) for k, v in run["final_shape"].items()},
    )
    for key, y in (("regret_slope", reg), ("first_order_slope", fo)):
        s = _slope(t, y, fit_from)
        out[key] = None if s is None else dict(slope=s[0], ci_low=s[1], ci_high=s[2])
    # first-order term can be negative (the bound then holds trivially): report how often it is
    out["first_order_negative_fraction"] = float(np.mean(fo[:, t >= fit_from] <= 0))
    return out


def summarize_radii(res: dict[str, dict[str, Any]], seeds: int, p: dict[str, Any] = PROBLEM) -> dict[str, Any]:
    """(d) for one method: per problem, ``Regret_T/T`` (mean and sd over the first ``seeds``
    seeds) at every radii ratio, relative to the balanced ``D_A = D_B``, next to the one-sided
    bound's factor ``(D_A² + D_B²)/(2 D_A D_B)`` (LoRA-RITE's ``D_A D_B`` is the same for all)."""
    out = {}
    for problem in RADII_PROBLEMS:
        finals = [res[radii_segment_name(problem, q, p)]["regret_over_T"][:seeds, -1] for q in RADII_RATIOS]
        means = [float(f.mean()) for f in finals]
        radii = [radii_of(q, p) for q in RADII_RATIOS]
        out[problem] = dict(
            ratios=list(RADII_RATIOS),
            radii=[list(x) for x in radii],
            seeds=seeds,
            final_regret_over_T=means,
            final_regret_over_T_sd=[float(f.std(ddof=1)) if len(f) > 1 else 0.0 for f in finals],
            relative_to_balanced=[m / means[0] for m in means],
            # (max − min)/|mean| over the ratios, per seed: 0 for a method whose run is the same in Z
            spread=max(_rel_spread(np.array([f[i] for f in finals])) for i in range(seeds)),
            bound_one_sided_factor=[(a * a + b * b) / (2 * a * b) for a, b in radii],
        )
    return out


def _rel_spread(row: np.ndarray) -> float:
    return float((row.max() - row.min()) / abs(row.mean())) if np.all(np.isfinite(row)) else math.inf


def summarize_imbalance(run: dict[str, Any], p: dict[str, Any] = PROBLEM) -> dict[str, Any]:
    scales = sorted(set(run["pair_scales"]))
    seeds = sorted(set(run["pair_seeds"]))
    t_final = run["T"][-1]
    final = run["regret_over_T"][:, -1] * t_final  # total regret at T
    table = np.array([[final[i * len(scales) + j] for j in range(len(scales))] for i in range(len(seeds))])
    # relative spread over s, per seed: (max - min) / |mean|
    with np.errstate(invalid="ignore"):
        spread = [
            float((row.max() - row.min()) / abs(row.mean())) if np.all(np.isfinite(row)) else math.inf for row in table
        ]
        ratio = (table / table[:, :1]).mean(0)
    norm = p["imbalance_norm"]
    bound = [((s * norm) ** 2 + (norm / s) ** 2) / (2 * norm * norm) for s in scales]
    return dict(
        scales=scales,
        regret_T_per_scale=table.mean(0).tolist(),
        regret_T_per_seed=table.tolist(),
        regret_ratio_to_s1=[float(x) for x in ratio],
        bound_ratio_to_s1=[b / bound[0] for b in bound],
        spread=max(spread),
        diverged_scales=sorted({run["pair_scales"][i] for i, d in enumerate(run["diverged_at"]) if d is not None}),
        seconds=run["seconds"],
    )


# ------------------------------------------------------------------------------------------ run
ONLINE = ("linear_fair", "linear_biased", "quadratic")
ONLINE_TITLES = {
    "linear_fair": "(a) linear, fair ±1",
    "linear_biased": "(a) linear, biased ±1",
    "quadratic": "(b) quadratic",
}


def run(ctx: RunContext) -> SuiteResult:
    with lp.torch_threads(THREADS):
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    size = SIZES[ctx.size]
    if ctx.options.get("tune"):
        tune(ctx)
    base = int(ctx.seed) * 1000
    segments = segments_for(size, base)
    t_max, fit_from = size["t_max"], size["fit_from"]
    lrs = {name: config_lr(METHODS[name][0], SUITE) for name in METHODS}

    online: dict[str, dict[str, Any]] = {name: {} for name in ONLINE}
    raw: dict[str, dict[str, Any]] = {name: {} for name in ONLINE}
    imbalance: dict[str, Any] = {}
    radii: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for method in METHODS:
        res = online_run(method, segments, t_max, lrs[method], ctx=ctx, desc=f"regret {method}")
        seconds[method] = res["quadratic"]["seconds"]
        for name in ONLINE:
            raw[name][method] = res[name]
            online[name][method] = summarize_online(res[name], fit_from)
        imbalance[method] = summarize_imbalance(res["imbalance"])
        radii[method] = summarize_radii(res, size["seeds_radii"])
    imb = next(sg for sg in segments if sg.name == "imbalance")
    res = online_run("sgd", [imb], t_max, lrs["sgd"], lr_scale_power=2.0, ctx=ctx, desc="regret sgd lr/s²")
    imbalance["sgd_rescaled"] = summarize_imbalance(res["imbalance"])
    seconds["sgd_rescaled"] = res["imbalance"]["seconds"]

    checks = _checks(imbalance, radii)
    metrics = dict(online=online, imbalance=imbalance, radii=radii, checks=checks, seconds_per_method=seconds)
    config = dict(
        size=ctx.size,
        t_max=t_max,
        fit_from=fit_from,
        segments=[
            dict(
                name=sg.name,
                kind=sg.kind,
                constrained=sg.constrained,
                seeds=sg.seeds,
                scales=sg.scales,
                bias=sg.bias,
                radii=list(sg.ball()) if sg.constrained else None,
            )
            for sg in segments
        ],
        problem={k: list(v) if isinstance(v, tuple) else v for k, v in PROBLEM.items()},
        lr=lrs,
        methods={k: dict(optimizer=v[0], overrides=v[1], schedule=v[2]) for k, v in METHODS.items()},
        invariance_tol=INVARIANCE_TOL,
        dtype="float64",
        torch_threads=THREADS,
        projection="Frobenius-ball projection of A and B after every step in (a), (b), (d); none in (c)",
        radii_ratios=RADII_RATIOS,
        slope_ci="95 % Student-t over per-seed OLS slopes of log(y) on log(T), T >= fit_from",
        bound_lines="G·D_A·D_B·T^-1/2 and G·(D_A²+D_B²)·T^-1/2 with constant 1, G = max observed ‖∇_Z f_t‖_F",
    )
    figures = [_plot_online(ctx, raw, online), _plot_imbalance(ctx, imbalance)]
    table = _table(online, imbalance, radii, seconds)
    # strict JSON: a diverged run's inf regret / spread is written as null
    return SuiteResult(suite=SUITE, metrics=lp.json_safe(metrics), config=config, table=table, figures=figures)


def _checks(imbalance: dict[str, Any], radii: dict[str, Any]) -> dict[str, bool]:
    """The invariant methods: the same regret for every start scale (c) and every radii ratio (d)."""
    checks = {f"{name}_invariant": bool(imbalance[name]["spread"] <= INVARIANCE_TOL) for name in INVARIANT}
    for name in INVARIANT:
        checks[f"{name}_radii_invariant"] = all(radii[name][q]["spread"] <= INVARIANCE_TOL for q in RADII_PROBLEMS)
    return checks


def _fmt_ci(s: dict[str, float] | None) -> str:
    if s is None:
        return "n/a"
    return f"{s['slope']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _table(online: dict[str, Any], imbalance: dict[str, Any], radii: dict[str, Any], seconds: dict[str, float]) -> str:
    t3 = markdown_table(
        ["method", *[LABELS[k] for k in seconds]],
        [["seconds (all segments)", *[round(v, 1) for v in seconds.values()]]],
    )
    return "\n\n".join([_online_table(online), _imbalance_table(imbalance), _radii_table(radii), t3])


def _online_table(online: dict[str, Any]) -> str:
    rows = []
    for problem in ONLINE:
        for name, s in online[problem].items():
            rows.append(
                [
                    ONLINE_TITLES[problem],
                    LABELS[name],
                    s["final_regret_over_T"],
                    _fmt_ci(s["regret_slope"]),
                    s["final_first_order_over_T"],
                    _fmt_ci(s["first_order_slope"]),
                    s["bound_lora_rite_final"],
                    s["bound_one_sided_final"],
                    f"{s['final_top_sv_z']:.3f}",
                    f"{s['final_tail_mass_a']:.2g} / {s['final_tail_mass_b']:.2g}",
                ]
            )
    head = [
        "problem",
        "method",
        "Regret_T/T",
        "slope [95% CI]",
        "first-order/T",
        "slope [95% CI]",
        "G·D_A·D_B/√T",
        "G·(D_A²+D_B²)/√T",
        "σ₁(Z_T)/(D_A D_B)",
        "tail mass A / B at T",
    ]
    return markdown_table(head, rows)


def _imbalance_table(imbalance: dict[str, Any]) -> str:
    scales = next(iter(imbalance.values()))["scales"]
    rows2 = []
    for name, s in imbalance.items():
        cells = [
            "diverged" if sc in s["diverged_scales"] else f"{v:.4g}"
            for sc, v in zip(s["scales"], s["regret_T_per_scale"])
        ]
        last = s["regret_ratio_to_s1"][-1]
        rows2.append(
            [
                LABELS[name],
                *cells,
                "inf" if math.isinf(s["spread"]) else f"{s['spread']:.2e}",
                f"{last:.3g}" if math.isfinite(last) else "inf",
            ]
        )
    bound = next(iter(imbalance.values()))["bound_ratio_to_s1"]
    rows2.append(
        ["bound ratio (D_A²+D_B²)/(2D_AD_B) rel. to s=1", *[f"{b:.4g}" for b in bound], "", f"{bound[-1]:.4g}"]
    )
    head = ["(c) unconstrained: Regret_T at s =", *[f"{sc:g}" for sc in scales], "rel. spread over s"]
    return markdown_table([*head, f"ratio s={scales[-1]:g} / s=1"], rows2)


def _radii_table(radii: dict[str, Any]) -> str:
    """(d): Regret_T/T per radii ratio, and relative to the balanced radii."""
    rows = []
    for problem in RADII_PROBLEMS:
        for name, per in radii.items():
            s = per[problem]
            cells = [f"{v:.4g} ± {sd:.2g}" for v, sd in zip(s["final_regret_over_T"], s["final_regret_over_T_sd"])]
            rel = s["relative_to_balanced"][-1]
            rows.append([ONLINE_TITLES[problem], LABELS[name], *cells, f"{rel:.3g}" if math.isfinite(rel) else "inf"])
        first = next(iter(radii.values()))[problem]
        bound = [f"{b:.3g}" for b in first["bound_one_sided_factor"]]
        rows.append([ONLINE_TITLES[problem], "(D_A²+D_B²)/(2D_AD_B)", *bound, bound[-1]])
    first = next(iter(radii.values()))[RADII_PROBLEMS[0]]
    head = [f"(d) D_A·D_B fixed, {first['seeds']} seeds", "method"]
    head += [
        f"Regret_T/T at D_A/D_B = {q:g} (D_A={a:.3g}, D_B={b:.3g})"
        for q, (a, b) in zip(first["ratios"], first["radii"])
    ]
    return markdown_table([*head, f"ratio {first['ratios'][-1]:g} / {first['ratios'][0]:g}"], rows)


# --------------------------------------------------------------------------------------- plots
def _plot_online(ctx: RunContext, raw: dict[str, Any], online: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ONLINE), figsize=(6 * len(ONLINE), 9))
    p = PROBLEM
    for col, problem in enumerate(ONLINE):
        for row, key in enumerate(("regret_over_T", "first_order_over_T")):
            ax = axes[row, col]
            g = 0.0
            for name, r in raw[problem].items():
                t = np.asarray(r["T"], dtype=float)
                y = r[key]
                mean = y.mean(0)
                lo, hi = np.percentile(y, [10, 90], axis=0) if y.shape[0] > 2 else (y.min(0), y.max(0))
                ok = mean > 0
                slope = online[problem][name]["regret_slope" if row == 0 else "first_order_slope"]
                lab = LABELS[name] + (f" (slope {slope['slope']:.2f})" if slope else "")
                (line,) = ax.loglog(t[ok], mean[ok], label=lab)
                floor = np.where(mean > 0, mean / 30, np.nan)
                ax.fill_between(t, np.fmax(lo, floor), np.fmax(hi, floor), color=line.get_color(), alpha=0.12)
                g = max(g, float(np.max(r["max_grad"])))
            ax.loglog(t, g * p["d_a"] * p["d_b"] / np.sqrt(t), "k--", lw=1, label="G·D_A·D_B·T^-1/2")
            ax.loglog(t, g * (p["d_a"] ** 2 + p["d_b"] ** 2) / np.sqrt(t), "k:", lw=1, label="G·(D_A²+D_B²)·T^-1/2")
            ax.set_xlabel("T")
            ax.set_ylabel("Regret_T / T" if row == 0 else "(1/T) max_θ* Σ ∇θᵀ(θ−θ*)")
            ax.set_title(f"{ONLINE_TITLES[problem]}: {'regret' if row == 0 else 'first-order term'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Online sanity checks (m×n = {p['m']}×{p['n']}, r = {p['r']}, D_A = {p['d_a']}, D_B = {p['d_b']}); "
        "band: 10–90 % over seeds"
    )
    return savefig(fig, ctx, "regret_online")


def _plot_imbalance(ctx: RunContext, imbalance: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    bound = next(iter(imbalance.values()))
    top = 2 * max(bound["bound_ratio_to_s1"])
    style = {"lora_rite": dict(marker="s", ms=10, mfc="none", lw=2.5), "scaled_gd": dict(marker="o", ms=5)}
    for i, (name, s) in enumerate(imbalance.items()):
        sc = np.asarray(s["scales"])
        ratio = np.asarray(s["regret_ratio_to_s1"], dtype=float)
        ok = np.isfinite(ratio)
        kw = style.get(name, dict(marker="o"))
        ax.loglog(sc[ok], ratio[ok], "-", color=f"C{i}", label=LABELS[name], **kw)
        if (~ok).any():
            ax.scatter(sc[~ok], np.full((~ok).sum(), top), marker="x", s=60, color=f"C{i}")
    ax.loglog(bound["scales"], bound["bound_ratio_to_s1"], "k--", label="bound ratio (D_A²+D_B²)/(2D_AD_B)")
    ax.set_xlabel("s  (start (s·A₀, B₀/s), same Z₀)")
    ax.set_ylabel("Regret_T(s) / Regret_T(1)")
    ax.set_title("(c) imbalance sweep, unconstrained quadratic tracking (x at top: diverged)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return savefig(fig, ctx, "regret_imbalance")


# ------------------------------------------------------------------------------------- tuning
#: log grids (2 points per decade) of the ``--tune`` sweep where a method's differs from (1e-3, 1)
_TUNE_RANGES = {"sgd": (1e-2, 10.0), "adam": (1e-4, 1e-1), "loft": (1e-4, 1e-1), "scaled_adam": (1e-4, 1e-1)}
TUNE_GRID = {name: _TUNE_RANGES.get(name, (1e-3, 1.0)) for name in METHODS}
TUNE_T = 3000
TUNE_SEEDS = (101, 102, 103)


def tune_score(name: str, lr: float) -> float:
    """Mean over (a, biased) and (b) of ``log(Regret_T/T)`` (mean over :data:`TUNE_SEEDS`, disjoint
    from the reported seeds) at ``T = TUNE_T``: the log of the geometric mean, so both problems
    count alike. Diverged or non-positive: ``inf``. (Fair-coin linear losses are left out: there
    every step gives the same regret.)"""
    segs = [
        Segment("linear_biased", "linear", True, list(TUNE_SEEDS), bias=PROBLEM["bias"]),
        Segment("quadratic", "quadratic", True, list(TUNE_SEEDS)),
    ]
    res = online_run(name, segs, TUNE_T, lr)
    logs = []
    for sg in segs:
        v = float(np.mean(res[sg.name]["regret_over_T"][:, -1]))
        if not (math.isfinite(v) and v > 0):
            return math.inf
        logs.append(math.log(v))
    return float(np.mean(logs))


tune_score.suite = SUITE  # type: ignore[attr-defined]


def tune(ctx: RunContext | None = None, write: bool = True) -> dict[str, Any]:
    """Sweep each method's step on :data:`TUNE_GRID` with :func:`tune_score` through
    :func:`benchmarks.optimizers.tune`, which writes the best into ``configs/<name>.json``
    (``lr["regret"]``) and records the sweep in its ``"tuned"`` field."""
    results = {}
    for name, (lo, hi) in TUNE_GRID.items():
        wrap = (lambda it, desc: progress(it, ctx, desc)) if ctx is not None else None
        results.update(
            optimizers.tune(
                tune_score,
                [name],
                optimizers.log_grid(lo, hi, 2),
                suite=SUITE,
                write=write,
                metric=f"geometric mean of Regret_T/T over (a) biased linear and (b) quadratic, T={TUNE_T}, "
                f"seeds {list(TUNE_SEEDS)}, schedule {METHODS[name][2]}",
                progress=wrap,
            )
        )
        r = results[name]
        print(
            f"[regret tune] {name}: best lr {r['best_lr']}; "
            + ", ".join(f"{k:g}:{v:.3f}" for k, v in r["scores"].items())
        )
    return results
