r"""LoRA-RITE (Yen et al., ICLR 2025, arXiv 2410.20625): Algorithm 1, for A and symmetrically for B.

Every function is batched over a leading pair dim ``P`` and named after the paper's quantity.
The A side reads the B factor's basis and magnitude (``B = U_B R_B``) and vice versa.

One algorithm, two engines. Each step of Algorithm 1 on r×r (and per-factor) quantities is one
function below, used by both engines: :func:`moment_decays`, :func:`skip_mask`,
:func:`clip_scale`, :func:`second_moment` (:func:`accumulate_second_moment`,
:func:`escaped_mass`), :func:`preconditioner`, :func:`first_moment_weights`, :func:`update_cap`.
The engines differ only in how they obtain the r×r inputs and apply the m×r products:

* ``engine="qr"`` (what ``"auto"``, the default, runs: :func:`resolve_engine`) transcribes the
  paper with a Householder QR (or polar) basis of every factor: moments in the basis, the
  transport ``P = U_{B,t}ᵀU_{B,t−1}``, m×r products with ``∇̄ = ∇A R_B⁺``.
* ``engine="gram"`` (opt-in; the one that runs on FSDP2 row shards) never factorizes an m×r
  matrix: it keeps the moments *magnified* (``M̃ = M̄ R_B⁻ᵀ``, ``W = R_B⁻¹ V̄ R_B⁻ᵀ``, both
  independent of the basis ``U_B``), reads ``R_B`` from the Cholesky factor of ``B_tᵀB_t`` and
  the transport from ``C = B_tᵀB_{t−1}``, and updates ``M̃`` with one m×2r×r product.

Three safeguards depart from Algorithm 1 only where it is ill-defined or loses precision
(docs/numerics.rst): eigenvalues of ``V̄`` that ``eigh`` cannot resolve are floored at its
resolution (no step where the gradient is round-off too), each factor's relative change
``δX R_X⁺`` is capped at ``relative_step_cap``, and a pair far from balanced is moved to a
balanced factorization of the same ``Z`` (``rebalance``). All keep the ``Z``-trajectory
GL(r)-invariant and are inactive, bit for bit, on well-conditioned, balanced-enough pairs
taking small steps.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from lowrank_geom.geometry import (
    GRAM_DTYPE,
    balancing_gauge,
    basis_transport,
    compute_dtype,
    eigh_resolution,
    eigh_safe,
    factorization_excess,
    gradient_resolution,
    gram,
    gram_cutoff,
    gram_pinv,
    inverse_magnitude,
    inverse_root_eig,
    magnify,
    magnitude_pinv,
    norm_balance,
    orthonormal_basis,
    relative_change_cap,
    symmetrize,
    transport_first_moment,
    transport_second_moment,
    unmagnify,
    unresolved_directions,
)
from lowrank_geom.geometry.gramian import gram_relative_change_cap
from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    State,
    Strategy,
    _check_lr,
    bias_corrected_decay,
    check_betas,
    check_choice,
    check_eps,
    check_non_negative,
    check_weight_decay,
    expand,
    register,
    rms,
    workspace_like,
)


# ------------------------------------------------------------- Algorithm 1's steps, both engines
def moment_decays(hp: dict[str, Any], step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d₁, d₂) = (β₁, β₂)``, or with ``bias_correction`` ``β(1−β^k)/(1−β^{k+1})`` (authors' code). ``(P,)``."""
    beta1, beta2 = hp["betas"]
    if hp["bias_correction"]:
        return bias_corrected_decay(beta1, step), bias_corrected_decay(beta2, step)
    return torch.full_like(step, beta1, dtype=torch.float64), torch.full_like(step, beta2, dtype=torch.float64)


def skip_mask(rms_gbar: torch.Tensor, threshold: float) -> torch.Tensor:
    """Update skipping (authors' code): 0 for a factor with ``RMS(∇̄) > threshold`` (``∇̄`` taken as 0), else 1."""
    return (~(rms_gbar > threshold)).to(rms_gbar.dtype)


def clip_scale(sq_norm: torch.Tensor, clip: float) -> torch.Tensor:
    """Global clipping (authors' code): ``min(1, clip/‖∇̄‖)`` from ``‖∇̄‖²`` summed over the factors that share it
    (every param group with ``clip_scope="global"``, or one group: :func:`clip_scales`)."""
    norm = sq_norm.sqrt()
    return torch.where(norm > clip, clip / norm, torch.ones_like(norm))


def accumulate_second_moment(
    v_transported: torch.Tensor, increment: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """``V̄_t = P V̄_{t−1} Pᵀ + ∇̄ᵀ∇̄`` (paper, ``decay=None``) or its EMA ``d·P V̄ Pᵀ + (1−d)·∇̄ᵀ∇̄``."""
    if decay is None:
        return v_transported + increment
    d = expand(decay, increment)
    return symmetrize(d * v_transported + (1.0 - d) * increment)


def eigenvalue_drop(lam_old: torch.Tensor, v_transported: torch.Tensor) -> torch.Tensor:
    """``d_λ(V̄_{t−1}, P V̄_{t−1} Pᵀ) = max_i [λ_i(V̄_{t−1}) − λ_i(P V̄ Pᵀ)]⁺`` from the sorted ``λ(V̄_{t−1})``. ``(P,)``."""
    lam_new = torch.linalg.eigvalsh(symmetrize(v_transported.to(compute_dtype(v_transported.dtype))))
    return (lam_old.to(lam_new.dtype) - lam_new).amax(dim=-1).clamp_min(0.0)


def escaped_mass(
    rho: torch.Tensor, lam_old: torch.Tensor, v_transported: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """``ρ_t = ρ_{t−1} + d_λ(V̄_{t−1}, P V̄_{t−1} Pᵀ)`` (Alg. 1 line 8); EMA mode decays it with V̄ (``decay·ρ_t``).

    ``lam_old`` is ``λ(V̄_{t−1})`` sorted; the decayed ``ρ`` is rounded from the promoted dtype of
    ``decay`` and ``ρ`` (the QR engine passes ``decay`` in ``ρ``'s, the Gram engine in float64).
    """
    rho = rho + eigenvalue_drop(lam_old, v_transported).to(rho.dtype)
    return rho if decay is None else decay * rho


class SecondMoment(NamedTuple):
    """Alg. 1 lines 7–8 of a stack of factors."""

    v: torch.Tensor  #: ``V̄_t``
    rho: torch.Tensor | float  #: ``ρ_t``; 0.0 without ``escape``


def second_moment(
    v_transported: torch.Tensor,
    increment: torch.Tensor,
    rho: torch.Tensor | None,
    lam_old: torch.Tensor | None,
    d2: torch.Tensor,
    hp: dict[str, Any],
) -> SecondMoment:
    """``V̄_t`` (Alg. 1 line 7) and ``ρ_t`` (line 8; ``rho`` and ``lam_old`` are read only with ``escape``)."""
    decay = d2 if hp["second_moment"] == "ema" else None
    v = accumulate_second_moment(v_transported, increment, decay)
    return SecondMoment(v, escaped_mass(rho, lam_old, v_transported, decay) if hp["escape"] else 0.0)


class Preconditioner(NamedTuple):
    """Alg. 1 line 9's r×r factor and the spectrum it came from."""

    root: torch.Tensor  #: ``X = (V̄ + ρI)^{-1/2}``, safeguarded
    lam: torch.Tensor  #: ``λ(V̄)``, sorted


def preconditioner(v: torch.Tensor, rho: torch.Tensor | float, eps: float, increment: torch.Tensor) -> Preconditioner:
    """``X = (V̄ + ρI)^{-1/2}`` (Alg. 1 line 9) as ``Q diag(1/(√(λ+ρ) + ε)) Qᵀ`` with λ clamped at 0.

    Eigenvalues below ``eigh``'s resolution (``r·eps·λ_max``,
    :func:`~lowrank_geom.geometry.eigh_resolution`) are floored there; directions that the current
    gradient does not resolve either (:func:`~lowrank_geom.geometry.unresolved_directions`, from
    ``increment = ∇̄ᵀ∇̄``) get the factor 0: ``∇̄`` is round-off there.
    """
    lam, q = eigh_safe(v)
    null_rtol = eigh_resolution(v.shape[-1], lam.dtype)
    drop = unresolved_directions(lam, q, increment, null_rtol, gradient_resolution(lam.dtype))
    return Preconditioner(inverse_root_eig(lam, q, 2, shift=rho, eps=eps, null_rtol=null_rtol, drop=drop), lam)


def first_moment_weights(
    d1: torch.Tensor | float, s: torch.Tensor | None = None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The weights ``(d₁, (1 − d₁)·s)`` of ``M̄_t = β₁ M̄_{t−1} Pᵀ + (1 − β₁) S̄_t`` (Alg. 1 line 10).

    ``s`` is the gradient scale (clipping × skip mask) where the engine has not applied it to ``∇̄``.
    """
    return d1, ((1.0 - d1) if s is None else (1.0 - d1) * s)


def update_cap(rms_m: torch.Tensor, cap: float) -> torch.Tensor:
    """Update capping (authors' code): the divisor ``max(1, RMS(M̄)/cap)`` of ``M̄``. ``(P,)``."""
    return torch.clamp(rms_m / cap, min=1.0)


def _pair_update(batch: PairBatch, deltas: list, states: list, skipped, hp: dict[str, Any]) -> PairUpdate:
    """``δ = −η(δ̃ + λX)`` (the driver applies ``scale`` and ``decay``), then the balancing safeguards."""
    lr, wd = hp["lr"], hp["weight_decay"]
    upd = PairUpdate(
        deltas[0], deltas[1], states[0], states[1], scale=-lr, decay=lr * wd if wd else 0.0, skipped=skipped
    )
    return _rebalanced(batch, _balanced(batch, upd, hp), hp)


# ---------------------------------------------------------------------------- QR engine, m×r
def unmagnified_grad(grad: torch.Tensor, r_pinv_other: torch.Tensor) -> torch.Tensor:
    """``∇̄A = ∇A R_B⁻¹`` (Alg. 1 line 5; ``R⁻¹`` is the pseudo-inverse ``R⁺``). ``(P, m, r)``."""
    return grad @ r_pinv_other


def skip_large(gbar: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Update skipping on an m×r ``∇̄``: ``(∇̄, mask)`` with ``∇̄ = 0`` where :func:`skip_mask` is 0."""
    keep = skip_mask(rms(gbar), threshold)
    return torch.where(expand(keep == 0, gbar), torch.zeros_like(gbar), gbar), keep


def second_moment_increment(gbar: torch.Tensor, row_normalize: bool) -> torch.Tensor:
    """``∇̄ᵀ∇̄`` (Alg. 1 line 7), divided by the row count with ``row_normalize`` (authors' code)."""
    s = symmetrize(gbar.mT @ gbar)
    return s / gbar.shape[-2] if row_normalize else s


def preconditioned_direction(
    gbar: torch.Tensor,
    v: torch.Tensor,
    rho: torch.Tensor | float,
    eps: float,
    increment: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S̄ = ∇̄ (V̄ + ρI)^{-1/2}`` (Alg. 1 line 9, :func:`preconditioner`; ``increment = ∇̄ᵀ∇̄`` or None)."""
    inc = second_moment_increment(gbar, False) if increment is None else increment
    return gbar @ preconditioner(v, rho, eps, inc).root.to(gbar.dtype)


def accumulate_first_moment(
    m_transported: torch.Tensor, direction: torch.Tensor, decay: torch.Tensor | float
) -> torch.Tensor:
    """``M̄_t = β₁ M̄_{t−1} Pᵀ + (1 − β₁) S̄_t`` (Alg. 1 line 10); ``decay`` is rounded to ``S̄``'s dtype first."""
    if isinstance(decay, torch.Tensor):
        keep, new = (expand(w, direction) for w in first_moment_weights(decay.to(direction.dtype)))
    else:
        keep, new = first_moment_weights(decay)
    return keep * m_transported + new * direction


def cap_update(m: torch.Tensor, cap: float) -> torch.Tensor:
    """Update capping (authors' code): ``M̄ / max(1, RMS(M̄)/cap)`` (:func:`update_cap`)."""
    return m / expand(update_cap(rms(m), cap), m)


def magnitude_restoration(
    m: torch.Tensor, r_pinv_other: torch.Tensor, r_self: torch.Tensor, r_pinv_self: torch.Tensor, hp: dict[str, Any]
) -> torch.Tensor:
    """``δA = M̄ R_B⁻ᵀ`` (Alg. 1 line 11, before the learning rate), its relative change capped at
    ``relative_step_cap`` (:func:`~lowrank_geom.geometry.relative_change_cap`). ``(P, m, r)``."""
    if hp["relative_step_cap"] <= 0:
        return m @ r_pinv_other.mT
    return relative_change_cap(m, r_pinv_other.mT, r_pinv_self, r_self, hp["relative_step_cap"], hp["lr"])


class QRFactor(NamedTuple):
    """A factor as basis times magnitude, ``X = U R``, with ``R⁺``."""

    u: torch.Tensor
    r: torch.Tensor
    rinv: torch.Tensor


class QRPair(NamedTuple):
    """Phase 1 of the QR engine for a batch: both factors and the unmagnified gradients after skipping."""

    a: QRFactor
    b: QRFactor
    gbar_a: torch.Tensor
    gbar_b: torch.Tensor
    skipped: torch.Tensor | None  #: skipped factor updates per pair, with ``update_skipping``


def qr_factor(x: torch.Tensor, basis: str) -> QRFactor:
    """``X = U R`` (:func:`~lowrank_geom.orthonormal_basis`) and ``R⁺`` at ``matrix_rank``'s cutoff."""
    u, r = orthonormal_basis(x, basis)
    return QRFactor(u, r, magnitude_pinv(r, rows=x.shape[-2]))


def qr_pair(batch: PairBatch, hp: dict[str, Any]) -> QRPair:
    """Bases, magnitudes and unmagnified gradients ``∇̄A = ∇A R_B⁺``, ``∇̄B = ∇B R_A⁺`` (line 5), skipped."""
    fa, fb = qr_factor(batch.a, hp["basis"]), qr_factor(batch.b, hp["basis"])
    gbar_a, gbar_b = unmagnified_grad(batch.grad_a, fb.rinv), unmagnified_grad(batch.grad_b, fa.rinv)
    skipped = None
    if hp["update_skipping"] > 0:
        (gbar_a, keep_a), (gbar_b, keep_b) = (skip_large(g, hp["update_skipping"]) for g in (gbar_a, gbar_b))
        skipped = (1.0 - keep_a) + (1.0 - keep_b)
    return QRPair(fa, fb, gbar_a, gbar_b, skipped)


def qr_side(
    gbar: torch.Tensor,
    state: State,
    basis_other_old: torch.Tensor,
    basis_other: torch.Tensor,
    step: torch.Tensor,
    hp: dict[str, Any],
) -> tuple[State, torch.Tensor]:
    """One factor's moments (Alg. 1 lines 6–10): its new state without the basis, and ``M̄`` after update capping."""
    # decays rounded to the moments' dtype: the QR engine's arithmetic, ρ's decay included
    d1, d2 = (d.to(gbar.dtype) for d in moment_decays(hp, step))
    p = basis_transport(basis_other, basis_other_old)
    v_old = state["second_moment"]
    inc = second_moment_increment(gbar, hp["row_normalize"])
    lam_old = torch.linalg.eigvalsh(symmetrize(v_old.to(compute_dtype(v_old.dtype)))) if hp["escape"] else None
    v, rho = second_moment(transport_second_moment(v_old, p), inc, state.get("escaped_mass"), lam_old, d2, hp)
    new = {"second_moment": v, "escaped_mass": rho} if hp["escape"] else {"second_moment": v}
    s_bar = preconditioned_direction(gbar, v, rho, hp["eps"], inc)
    m = accumulate_first_moment(transport_first_moment(state["exp_avg"], p), s_bar, d1)
    new["exp_avg"] = m
    return new, (cap_update(m, hp["update_capping"]) if hp["update_capping"] > 0 else m)


def qr_prepare(batches: list[PairBatch], hp: dict[str, Any]) -> tuple[list[QRPair], torch.Tensor | None]:
    """Phase 1 of the QR engine for every batch of a param group, and ``Σ‖∇̄‖²`` over them for
    clipping (None when nothing reads it: ``clip_unmagnified_grad = 0`` in group scope)."""
    prepared = [qr_pair(batch, hp) for batch in batches]
    if not (hp["clip_unmagnified_grad"] > 0 or hp["clip_scope"] == "global") or not prepared:
        return prepared, None
    sq_norm = None
    for p in prepared:
        part = torch.linalg.vector_norm(p.gbar_a).square() + torch.linalg.vector_norm(p.gbar_b).square()
        sq_norm = part if sq_norm is None else sq_norm + part.to(sq_norm)
    return prepared, sq_norm


def qr_finish(
    batches: list[PairBatch], prepared: list[QRPair], scale: torch.Tensor | None, hp: dict[str, Any]
) -> list[PairUpdate]:
    """Phases 2–3 of the QR engine: the moments and updates of every batch, ``∇̄`` times the clipping ``scale``."""
    out = []
    for batch, p in zip(batches, prepared):
        gbar_a, gbar_b = p.gbar_a, p.gbar_b
        if scale is not None:
            gbar_a, gbar_b = gbar_a * scale.to(gbar_a), gbar_b * scale.to(gbar_b)
        new_a, m_a = qr_side(gbar_a, batch.state_a, batch.state_b["basis"], p.b.u, batch.step, hp)
        new_b, m_b = qr_side(gbar_b, batch.state_b, batch.state_a["basis"], p.a.u, batch.step, hp)
        new_a["basis"], new_b["basis"] = p.a.u, p.b.u
        deltas = [
            magnitude_restoration(m_a, p.b.rinv, p.a.r, p.a.rinv, hp),
            magnitude_restoration(m_b, p.a.rinv, p.b.r, p.b.rinv, hp),
        ]
        out.append(_pair_update(batch, deltas, [new_a, new_b], p.skipped, hp))
    return out


# ------------------------------------------------------------------------ Gram engine, m×r
def magnitude_grams(other: torch.Tensor, other_prev: torch.Tensor, row_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """``G_B = B_tᵀB_t`` (``R_BᵀR_B``) and ``C = B_tᵀB_{t−1}`` (``P_A = R_{B,t}⁻ᵀ C R_{B,t−1}⁻¹``), float64."""
    return gram(other, None, row_reduce), gram(other, other_prev, row_reduce)


def unmagnified_grad_gram(grad_gram: torch.Tensor, rinv_other: torch.Tensor) -> torch.Tensor:
    """``∇̄ᵀ∇̄ = R_B⁻ᵀ (∇Aᵀ∇A) R_B⁻¹`` (Alg. 1 line 7 before normalization); its trace is ``‖∇̄A‖²_F``."""
    return unmagnify(grad_gram, rinv_other)


def transported_second_moment(w: torch.Tensor, transport_gram: torch.Tensor, rinv_other: torch.Tensor) -> torch.Tensor:
    """``P V̄_{t−1} Pᵀ = R_{B,t}⁻ᵀ (C W_{t−1} Cᵀ) R_{B,t}⁻¹`` with ``W = R_B⁻¹ V̄ R_B⁻ᵀ`` (Alg. 1 line 7's transport)."""
    return unmagnify(transport_gram @ w @ transport_gram.mT, rinv_other)


def magnified_first_moment(
    m_mag: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, apply: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``M̃_t = M̄_t R_B⁻ᵀ = M̃_{t−1}·[d₁ Cᵀ G_B⁺] + ∇A·[(1−d₁) s R_B⁻¹ (V̄+ρI)^{-1/2} R_B⁻ᵀ]`` (Alg. 1 lines 9–11).

    ``keep`` and ``apply`` are the two bracketed r×r matrices; one m×2r×r product per factor,
    written to ``out`` (which must not alias ``m_mag`` or ``grad``) when given.
    """
    apply, keep = apply.to(grad.dtype), keep.to(m_mag.dtype)
    if out is not None and out.mT.is_contiguous() and not out.is_contiguous():
        # factor stored r×rows (PEFT's lora_A): the same product transposed, on contiguous data
        torch.bmm(apply.mT, grad.mT, out=out.mT).baddbmm_(keep.mT, m_mag.mT)
        return out
    return torch.bmm(grad, apply, out=out).baddbmm_(m_mag, keep)


def capped_scale(
    m_mag: torch.Tensor, g_other: torch.Tensor, cap: float, row_reduce, rows: torch.Tensor | float
) -> torch.Tensor:
    """Update capping (authors' code): ``1 / max(1, RMS(M̄)/cap)`` with ``‖M̄‖² = tr(M̃ᵀM̃ G_B)``. ``(P,)``.

    ``rows`` is the factor's global row count (a row shard has fewer)."""
    sq = (gram(m_mag, None, row_reduce) * g_other).sum(dim=(-2, -1)).clamp_min(0.0)
    return 1.0 / update_cap((sq / (rows * m_mag.shape[-1])).sqrt(), cap)


def _row_count(grad: torch.Tensor, row_reduce) -> torch.Tensor:
    """The factor's row count, float64 0-dim, summed over row shards by ``row_reduce`` (None: the local count)."""
    rows = grad.new_tensor(float(grad.shape[-2]), dtype=torch.float64)
    return rows if row_reduce is None else row_reduce(rows)


class GramSide(NamedTuple):
    """One factor's side of a pair in the Gram engine (the A side: ``other = B``), after phase 1."""

    g: torch.Tensor  #: ``G = B_tᵀB_t``, float64
    c: torch.Tensor  #: ``C = B_tᵀB_{t−1}``, float64
    n: torch.Tensor  #: ``N = ∇Aᵀ∇A``, float64
    rows: torch.Tensor  #: A's global row count, float64 0-dim
    dtype: torch.dtype  #: B's compute dtype, the rounding of ``G`` (so of ``R_B⁻¹``'s cutoff)
    state: State  #: A's state
    step: torch.Tensor  #: steps taken, ``(P,)``


def gram_sides(batch: PairBatch, needs_rows: bool) -> tuple[GramSide, GramSide]:
    """Phase 1 (m×r): the Grams of both sides of a batch, each one GEMM summed through ``row_reduce``."""
    rr = batch.row_reduce

    def side(grad: torch.Tensor, state: State, other: torch.Tensor, other_prev: torch.Tensor) -> GramSide:
        g, c = magnitude_grams(other, other_prev, rr)
        # the global row count costs a collective on shards: only the options that read it ask
        return GramSide(
            g,
            c,
            gram(grad, None, rr),
            _row_count(grad, rr if needs_rows else None),
            compute_dtype(other.dtype),
            state,
            batch.step,
        )

    return (
        side(batch.grad_a, batch.state_a, batch.b, batch.state_b["previous_factor"]),
        side(batch.grad_b, batch.state_b, batch.a, batch.state_a["previous_factor"]),
    )


# ------------------------------------------------------------------------ Gram engine, r×r
class Unmagnified(NamedTuple):
    """Alg. 1 line 5 from Grams, for a stack of Gram sides of one rank."""

    t: torch.Tensor  #: ``R_B⁻¹`` (filtered pseudo-inverse), in the r×r work dtype
    s_gram: torch.Tensor  #: ``∇̄ᵀ∇̄`` before clipping and skipping
    keep: torch.Tensor  #: :func:`skip_mask`, ``(P,)``
    rows: torch.Tensor  #: row count per matrix, ``(P,)``
    sq_norm: torch.Tensor  #: ``Σ ‖∇̄‖²`` of the kept factors, 0-dim


def gram_unmagnified(sides: list[GramSide], hp: dict[str, Any]) -> Unmagnified:
    """``R_B⁻¹`` (:func:`~lowrank_geom.geometry.inverse_magnitude` of ``G``), ``∇̄ᵀ∇̄`` and the skip mask of ``sides``."""
    # r×r work in the factors' compute dtype: at r = 64 float64 r×r products cost more than the m×r GEMMs
    work = functools.reduce(torch.promote_types, (sd.dtype for sd in sides))
    g = torch.cat([sd.g for sd in sides]).to(work)
    t = inverse_magnitude(g, torch.cat([gram_cutoff(sd.g, sd.dtype) for sd in sides]).to(work))
    s_gram = unmagnified_grad_gram(torch.cat([sd.n for sd in sides]).to(work), t)
    sq = torch.diagonal(s_gram, dim1=-2, dim2=-1).sum(-1)  # ‖∇̄‖², so no m×r ∇̄ is formed
    rows = torch.cat([sd.rows.to(work).expand(sd.g.shape[0]) for sd in sides])
    thr = hp["update_skipping"]
    keep = skip_mask((sq / (rows * g.shape[-1])).sqrt(), thr) if thr > 0 else torch.ones_like(sq)
    return Unmagnified(t, s_gram, keep, rows, (keep * sq).sum())


class GramStep(NamedTuple):
    """One Gram side's r×r result: the factors of its m×2r×r product and its new r×r state."""

    keep: torch.Tensor  #: ``d₁ CᵀG⁺``
    apply: torch.Tensor  #: ``(1−d₁) s R_B⁻¹ X R_B⁻ᵀ``
    rinv: torch.Tensor  #: ``R_B⁻¹``
    state: State  #: ``magnified_second_moment`` (and ``escaped_mass``, ``second_moment_eigenvalues``)
    skipped: torch.Tensor  #: 1 where the update was skipped, ``(P,)``


def gram_moments(
    sides: list[GramSide], u: Unmagnified, scale: torch.Tensor | None, hp: dict[str, Any]
) -> list[GramStep]:
    """Alg. 1 lines 6–10 on r×r matrices for a stack of Gram sides (one rank), one result per side."""
    t = u.t
    cat = lambda get: torch.cat([get(sd) for sd in sides]).to(t.dtype)
    c = cat(lambda sd: sd.c)
    d1, d2 = moment_decays(hp, cat(lambda sd: sd.step))
    s = u.keep if scale is None else u.keep * scale  # the engine scales ∇̄ here, through its Gram
    inc = u.s_gram * expand(s.square(), u.s_gram)
    if hp["row_normalize"]:
        inc = inc / expand(u.rows, inc)
    v_transported = transported_second_moment(cat(lambda sd: sd.state["magnified_second_moment"]), c, t)
    rho_old = lam_old = None
    if hp["escape"]:  # λ(V̄_{t−1}) kept from the last step: V̄ itself is not
        rho_old = cat(lambda sd: sd.state["escaped_mass"])
        lam_old = cat(lambda sd: sd.state["second_moment_eigenvalues"])
    v, rho = second_moment(v_transported, inc, rho_old, lam_old, d2, hp)
    x_root, lam = preconditioner(v, rho, hp["eps"], inc)
    w1, w2 = first_moment_weights(d1, s)
    split = lambda x: torch.split(x, [sd.g.shape[0] for sd in sides])
    chunks = zip(
        split(expand(w1, c) * (c.mT @ gram_pinv(t))),
        split(expand(w2, c) * (t @ x_root @ t.mT)),
        split(t),
        split(magnify(v, t)),
        split(1.0 - u.keep),
        split(rho) if hp["escape"] else [None] * len(sides),
        split(lam),
    )
    out = []
    for sd, (keep, apply, rinv, w, skipped, rho_i, lam_i) in zip(sides, chunks):
        st = sd.state
        new = {"magnified_second_moment": w.to(st["magnified_second_moment"].dtype)}
        if hp["escape"]:
            new["escaped_mass"] = rho_i.to(st["escaped_mass"].dtype)
            new["second_moment_eigenvalues"] = lam_i.to(st["second_moment_eigenvalues"].dtype)
        out.append(GramStep(keep, apply, rinv, new, skipped))
    return out


def gram_pair_update(
    batch: PairBatch, sides: tuple[GramSide, GramSide], steps: list[GramStep], hp: dict[str, Any]
) -> PairUpdate:
    """Phase 3 (m×r): ``M̃_t`` by one m×2r×r product per side, update capping and the relative-change cap."""
    deltas, states = [], []
    for k, (x, grad) in enumerate(((batch.a, batch.grad_a), (batch.b, batch.grad_b))):
        sd, st = sides[k], steps[k]
        out = workspace_like(batch.workspace, "magnified_exp_avg_" + "ab"[k], grad)
        m_mag = magnified_first_moment(sd.state["magnified_exp_avg"], grad, st.keep, st.apply, out=out)
        states.append({**st.state, "magnified_exp_avg": m_mag, "previous_factor": x})
        if hp["update_capping"] > 0:
            scale = capped_scale(m_mag, sd.g, hp["update_capping"], batch.row_reduce, sd.rows.to(m_mag.dtype))
            m_mag = m_mag * expand(scale, m_mag)
        if hp["relative_step_cap"] > 0:  # the partner side holds this factor's G and R⁻¹
            m_mag = gram_relative_change_cap(
                m_mag, sides[1 - k].g, steps[1 - k].rinv, hp["relative_step_cap"], hp["lr"], batch.row_reduce
            )
        deltas.append(m_mag)  # M̃ is δ: the magnitude is restored already
    skipped = steps[0].skipped + steps[1].skipped if hp["update_skipping"] > 0 else None
    return _pair_update(batch, deltas, states, skipped, hp)


class GramPrepared(NamedTuple):
    """Phase 1 of the Gram engine for a param group: every side's Grams, grouped by rank, and ``R_B⁻¹``, ``∇̄ᵀ∇̄``."""

    pairs: list  #: ``(GramSide, GramSide)`` per batch
    by_rank: dict  #: rank → indices into the flattened sides
    unmag: dict  #: rank → :class:`Unmagnified`


def gram_prepare(batches: list[PairBatch], hp: dict[str, Any]) -> tuple[GramPrepared, torch.Tensor]:
    """Phase 1 of the Gram engine (Grams, m×r; ``R_B⁻¹`` and ``∇̄ᵀ∇̄``, r×r) and ``Σ‖∇̄‖²`` of the kept factors."""
    needs_rows = hp["row_normalize"] or hp["update_skipping"] > 0 or hp["update_capping"] > 0
    pairs = [gram_sides(batch, needs_rows) for batch in batches]
    sides = [sd for pair in pairs for sd in pair]
    by_rank: dict[int, list[int]] = {}
    for i, sd in enumerate(sides):
        by_rank.setdefault(sd.g.shape[-1], []).append(i)
    unmag = {r: gram_unmagnified([sides[i] for i in idx], hp) for r, idx in by_rank.items()}
    return GramPrepared(pairs, by_rank, unmag), sum(u.sq_norm for u in unmag.values())


def gram_finish(
    batches: list[PairBatch], prep: GramPrepared, scale: torch.Tensor | None, hp: dict[str, Any]
) -> list[PairUpdate]:
    """Phases 2–3 of the Gram engine: every side of one rank as one stack of r×r matrices (one
    Cholesky, one ``eigh``), ``∇̄`` times the clipping ``scale``; then the m×r products."""
    sides = [sd for pair in prep.pairs for sd in pair]
    steps: list[GramStep] = [None] * len(sides)  # type: ignore[list-item]
    for r, idx in prep.by_rank.items():
        for i, step in zip(idx, gram_moments([sides[i] for i in idx], prep.unmag[r], scale, hp)):
            steps[i] = step
    return [gram_pair_update(batch, prep.pairs[i], steps[2 * i : 2 * i + 2], hp) for i, batch in enumerate(batches)]


# ------------------------------------------------------------------------------- engines
#: state key that tells the engine a pair's state was initialized for
_ENGINE_KEYS = {"gram": "magnified_exp_avg", "qr": "exp_avg"}


def resolve_engine(engine: str, dtype: torch.dtype) -> str:
    """The engine that runs factors of ``dtype``: ``engine`` itself, or ``"qr"`` for ``"auto"`` (every dtype).

    Why not the Gram engine: a Gram squares the factors' condition number. In float32 it
    diverged or raised on ill-conditioned fits from a zero factor that the QR engine fits to
    float64's error, and its float32 invariance gap at ``cond(G) = 1e4`` is orders above the QR
    engine's (``python -m benchmarks invariance`` and ``robustness``, rows ``lora_rite[engine=…]``).
    ``dtype`` is kept for callers that ask per dtype.
    """
    return "qr" if engine == "auto" else engine


#: each engine's phase 1 (which yields the group's ``Σ‖∇̄‖²``) and phases 2–3 (which take the clipping scale)
_ENGINES = {"gram": (gram_prepare, gram_finish), "qr": (qr_prepare, qr_finish)}


def clip_scales(sq_norms: list[torch.Tensor | None], hps: list[dict[str, Any]]) -> list[torch.Tensor | None]:
    """Each param group's clipping scale ``min(1, c/‖∇̄‖)`` (:func:`clip_scale`; None where ``c =
    clip_unmagnified_grad`` is 0) from ``Σ‖∇̄‖²`` of its own pairs (``clip_scope="group"``) or of the
    pairs of every group with ``clip_scope="global"`` (each still clipped at its own ``c``)."""
    shared = [sq for sq, hp in zip(sq_norms, hps) if hp["clip_scope"] == "global" and sq is not None]
    total = None
    if shared:  # one group alone: its own norm, bit for bit
        dtype = functools.reduce(torch.promote_types, (sq.dtype for sq in shared))
        total = functools.reduce(torch.add, (sq.to(device=shared[0].device, dtype=dtype) for sq in shared))
    out = []
    for sq, hp in zip(sq_norms, hps):
        clip = hp["clip_unmagnified_grad"]
        out.append(clip_scale(total if hp["clip_scope"] == "global" else sq, clip) if clip > 0 else None)
    return out


def update_groups(groups: list[tuple[list[PairBatch], dict[str, Any]]]) -> list[list[PairUpdate]]:
    """Phase 1 of every param group ``(batches, hp)``, the clipping scales (:func:`clip_scales`),
    then phases 2–3 of every group; one list of updates per group."""
    # one engine per group: every pair's state was fitted to the group's engine option
    engines = [_ENGINES[batch_engine(batches[0])] for batches, _ in groups]
    prepared = [prepare(batches, hp) for (prepare, _), (batches, hp) in zip(engines, groups)]
    scales = clip_scales([sq for _, sq in prepared], [hp for _, hp in groups])
    return [
        finish(batches, prep, scale, hp)
        for (_, finish), (batches, hp), (prep, _), scale in zip(engines, groups, prepared, scales)
    ]


def batch_engine(batch: PairBatch) -> str:
    """The engine a batch's state was built by (:meth:`LoRARITEStrategy.reconcile_state` has
    checked it against the ``engine`` option)."""
    found = [e for e, key in _ENGINE_KEYS.items() if key in batch.state_a]
    if len(found) != 1:
        raise KeyError(
            f"lora_rite: state has neither {' nor '.join(map(repr, _ENGINE_KEYS.values()))}; "
            f"got keys {sorted(batch.state_a)}"
        )
    return found[0]


def _balanced(batch: PairBatch, upd: PairUpdate, hp: dict[str, Any]) -> PairUpdate:
    """With ``balance``: the updates that also norm-balance the new pair (``Z`` unchanged); none
    at ``lr = 0``, where a step must leave the factors as they are (torch.distributed.checkpoint
    creates a fresh optimizer's state with such a step)."""
    if not hp["balance"] or bool(torch.as_tensor(upd.scale) == 0):
        return upd
    delta_a, delta_b = upd.additive(batch.a, batch.b)
    a1, b1 = norm_balance(batch.a + delta_a, batch.b + delta_b, batch.row_reduce)
    return PairUpdate(a1 - batch.a, b1 - batch.b, upd.state_a, upd.state_b, skipped=upd.skipped)


def _rebalanced(batch: PairBatch, upd: PairUpdate, hp: dict[str, Any]) -> PairUpdate:
    """With ``rebalance = τ > 0``: pairs whose factorization excess exceeds ``τ`` move to
    ``(A + δA) T_A, (B + δB) T_B`` with the balancing gauge of ``(A, B)``
    (:func:`~lowrank_geom.geometry.balancing_gauge`): ``Z_{t+1}`` unchanged, its rounding cut."""
    tau = hp["rebalance"]
    if tau <= 0:
        return upd
    rr = batch.row_reduce or (lambda t: t)
    # cheap necessary condition, from the Grams: χ ≤ ‖A‖_F‖B‖_F/‖Z‖_F (‖Z‖_F² = ⟨G_A, G_B⟩)
    ga, gb = gram(batch.a, None, rr), gram(batch.b, None, rr)
    z_sq = (ga * gb).sum(dim=(-2, -1))
    frob_sq = torch.diagonal(ga, dim1=-2, dim2=-1).sum(-1) * torch.diagonal(gb, dim1=-2, dim2=-1).sum(-1)
    maybe = frob_sq > tau**2 * z_sq
    if not bool(maybe.any()):  # host sync
        return upd
    # χ itself from the same Grams (r×r eigensolves; the Frobenius bound is loose by up to √r)
    if not bool((maybe & (factorization_excess(ga, gb) > tau)).any()):
        return upd
    # the gauge: float64 Grams, since a compute-dtype Gram has lost cond(X)² of its digits
    a64, b64 = batch.a.to(GRAM_DTYPE), batch.b.to(GRAM_DTYPE)
    ga, gb = rr(a64.mT @ a64), rr(b64.mT @ b64)
    rtol = a64.shape[-1] * torch.finfo(batch.a.dtype).eps  # σ_min(Z) above the factors' rounding
    ta, tb, ok = balancing_gauge(ga, gb, rtol)
    act = ok & (factorization_excess(ga, gb) > tau)
    if not bool(act.any()):  # balanced enough, or Z not resolved (a zero or rank-deficient factor)
        return upd
    scale = torch.as_tensor(upd.scale, dtype=GRAM_DTYPE, device=a64.device)
    decay = torch.as_tensor(upd.decay, dtype=GRAM_DTYPE, device=a64.device)
    if bool(scale == 0):  # lr = 0: the driver's update cannot express a new factorization
        return upd
    act = act.unsqueeze(-1).unsqueeze(-1)
    add_a, add_b = upd.additive(batch.a, batch.b)
    # in the driver's form A ← (1 − decay)·A + scale·δ, so that a pair that does not act keeps
    # its δ bit for bit (the same arithmetic as a batch without the acting pairs)
    new_a = ((a64 + add_a.to(GRAM_DTYPE)) @ ta - (1.0 - decay) * a64) / scale
    new_b = ((b64 + add_b.to(GRAM_DTYPE)) @ tb - (1.0 - decay) * b64) / scale
    delta_a = torch.where(act, new_a.to(upd.delta_a.dtype), upd.delta_a)
    delta_b = torch.where(act, new_b.to(upd.delta_b.dtype), upd.delta_b)
    return upd._replace(delta_a=delta_a, delta_b=delta_b)


@register
class LoRARITEStrategy(Strategy):
    r"""LoRA-RITE: transformation-invariant adaptive matrix preconditioning of LoRA factors.

    For the A factor (B symmetrically, with the roles of A and B swapped):

    .. math::
        \begin{aligned}
        B_t &= U_{B,t} R_{B,t} && \text{(magnitude: } R_{B,t}^\top R_{B,t} = B_t^\top B_t\text{)}\\
        \bar\nabla A_t &= \nabla A_t\, R_{B,t}^{-1} && \text{(unmagnified gradient)}\\
        P_{A,t} &= U_{B,t}^\top U_{B,t-1}
                 = R_{B,t}^{-\top} (B_t^\top B_{t-1}) R_{B,t-1}^{-1} && \text{(basis transport)}\\
        \bar V_{A,t} &= P_{A,t} \bar V_{A,t-1} P_{A,t}^\top + \bar\nabla A_t^\top \bar\nabla A_t\\
        \rho_{A,t} &= \rho_{A,t-1} + d_\lambda(\bar V_{A,t-1}, P_{A,t} \bar V_{A,t-1} P_{A,t}^\top)\\
        \bar S_{A,t} &= \bar\nabla A_t (\bar V_{A,t} + \rho_{A,t} I)^{-1/2}\\
        \bar M_{A,t} &= \beta_1 \bar M_{A,t-1} P_{A,t}^\top + (1-\beta_1) \bar S_{A,t}\\
        A_{t+1} &= A_t - \eta_t\, \bar M_{A,t} R_{B,t}^{-\top}
        \end{aligned}

    ``engine="gram"`` computes this without any m×r factorization. With
    ``G = BᵀB = L Lᵀ`` (Cholesky, ``R_B = Lᵀ``), ``C = B_tᵀB_{t−1}`` and the moments kept
    magnified, ``M̃ = M̄ R_B⁻ᵀ`` and ``W = R_B⁻¹ V̄ R_B⁻ᵀ`` (both independent of the basis):
    ``∇̄ᵀ∇̄ = R⁻ᵀ(∇Aᵀ∇A)R⁻¹``, ``P V̄ Pᵀ = R⁻ᵀ(C W Cᵀ)R⁻¹`` and
    ``M̃_t = M̃_{t−1}·d₁CᵀG⁺ + ∇A·(1−d₁) s R⁻¹(V̄+ρI)^{-1/2}R⁻ᵀ``, ``δA = −η(M̃_t + λA)``, where
    ``s`` is the clipping scale times the skip mask. Per factor that is three m×r×r GEMMs
    (``BᵀB``, ``BᵀB_{t−1}``, ``∇ᵀ∇``) and one m×2r×r GEMM, plus r×r work in the factors' compute
    dtype, batched over the whole param group; every row
    sum goes through ``PairBatch.row_reduce``. A zero or rank-deficient factor uses a filtered
    pseudo-inverse (:func:`~lowrank_geom.geometry.inverse_magnitude`). State per factor:
    ``magnified_exp_avg`` (m×r, ``M̃``), ``magnified_second_moment`` (r×r, ``W``),
    ``previous_factor`` (m×r, the factor at its last step, which the partner's transport
    reads), and with ``escape=True`` ``escaped_mass`` (ρ) and ``second_moment_eigenvalues``
    (``λ(V̄)``, r floats, for ``d_λ``). The unmagnified moments of the paper are
    ``M̄ = M̃ R_Bᵀ`` and ``V̄ = R_B W R_Bᵀ``.

    ``engine="qr"`` is the literal transcription with a Householder QR (``basis="qr"``) or polar
    (``basis="polar"``) basis of each factor and pseudo-inverses ``R⁺``
    (:func:`~lowrank_geom.magnitude_pinv`); state ``exp_avg`` (``M̄``), ``second_moment``
    (``V̄``), ``basis`` (``U``), ``escaped_mass``. It is about 2× slower and more accurate for
    ill-conditioned float32 factors: a Gram squares the condition number, so the gram engine's
    float32 error grows like ``cond(B)²·1e-7`` against QR's ``cond(B)·1e-7`` (see
    :doc:`/numerics`). The update does not depend on ``basis`` in exact arithmetic (``R`` enters
    only through ``RᵀR``); ``basis`` only selects the QR engine's state coordinates.

    ``engine="auto"`` (default) runs the QR engine in every dtype (:func:`resolve_engine`); each
    pair keeps the engine its state was built by, and a param group runs one engine (its
    ``engine`` option), which param groups coupled by the clipping norm need not share. FSDP2 row
    shards need ``engine="gram"``.

    Safeguards (:doc:`/numerics`): eigenvalues of ``V̄`` below ``r·eps·λ_max`` (unresolved by
    ``eigh``) are floored there in ``(V̄ + ρI)^{-1/2}``, and get the factor 0 where the gradient
    holds only round-off (≤ √eps of its norm) too; with ``relative_step_cap = c > 0``
    (default 1; 0 is the paper's update) each factor's relative change ``E = δX R_X⁺`` has its
    singular values clamped at ``c``
    (:func:`~lowrank_geom.geometry.relative_change_cap`), which bounds the cross term
    ``δA δBᵀ`` by ``c`` times the first-order terms; with ``rebalance = τ > 0`` (default 4; 0
    is the paper's pair) a pair with ``‖A‖_F‖B‖_F > τ‖ABᵀ‖_*`` and ``Z`` resolved has its new
    factors multiplied by the balancing gauge of the old ones
    (:func:`~lowrank_geom.geometry.balancing_gauge`), which cuts the rounding of ``A Bᵀ`` and
    changes no ``Z``. All keep the ``Z``-trajectory
    GL(r)-invariant and leave the step of full-rank, well-conditioned, balanced-enough pairs
    taking small steps exactly as in Algorithm 1.

    Defaults reproduce the authors' published PyTorch code: ``second_moment="ema"`` with
    ``bias_correction`` (decay ``β(1−β^k)/(1−β^{k+1})`` for both moments and ρ), ``row_normalize``
    (``∇̄ᵀ∇̄ / rows``), ``eps`` outside the root, ``escape=False``, update skipping at RMS 1 and
    global clipping of the unmagnified gradients at norm 1, lr-coupled weight decay after
    magnitude restoration. The clipping norm is one over every pair of every param group with
    ``clip_scope="global"`` (the default, as the authors' code and pytorch-optimizer's
    ``LoRARite`` compute it: one norm over all groups, which each group compares with its own
    ``clip_unmagnified_grad``); ``clip_scope="group"`` clips each group by the norm of its own
    pairs, so that one group's gradients never shrink another's steps. ``escape=True, second_moment="sum",
    bias_correction=False, row_normalize=False, clip_unmagnified_grad=0, update_skipping=0,
    relative_step_cap=0`` is the paper's Algorithm 1. One departure: eigenvalues of V̄ are clamped at 0, so round-off
    never turns the preconditioned direction into NaN (the authors' code then replaces that
    direction S̄ by zeros with ``nan_to_num``, so the step is only the transported momentum
    ``β₁ M̄ Pᵀ``: the new gradient is silently dropped while the factor still moves).
    """

    name = "lora_rite"
    invariance = "GL(r)"
    defaults = dict(
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        escape=False,
        second_moment="ema",
        bias_correction=True,
        row_normalize=True,
        clip_unmagnified_grad=1.0,
        update_skipping=1.0,
        update_capping=0.0,
        relative_step_cap=1.0,
        rebalance=4.0,
        balance=False,
        basis="qr",
        engine="auto",
        clip_scope="global",
    )

    choices = dict(
        second_moment=("ema", "sum"),
        basis=("qr", "polar"),
        engine=("auto", "gram", "qr"),
        clip_scope=("global", "group"),
    )

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str] | None:
        # the Gram engine routes every Gram, norm and row count through row_reduce; the QR
        # engine factorizes each factor, which a shard cannot do alone
        engine = hp.get("engine", "auto")
        if resolve_engine(engine, dtype if dtype is not None else torch.float32) == "gram":
            return []
        why = "engine='auto' runs the QR engine" if engine == "auto" else "engine='qr'"
        return [f"engine='gram' ({why}, which factorizes each factor: a shard cannot do that alone)"]

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        check_weight_decay(hp["weight_decay"])
        for key in ("clip_unmagnified_grad", "update_skipping", "update_capping", "relative_step_cap", "rebalance"):
            check_non_negative(key, hp[key])
        for key, values in self.choices.items():
            check_choice(key, hp[key], values)
        for key in ("escape", "bias_correction", "row_normalize", "balance"):
            check_choice(key, hp[key], (True, False))

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        magnified = resolve_engine(hp["engine"], a.dtype) == "gram"

        # gram: magnified moments and the factor of the last step (a zero previous factor makes the
        # first transport C = BᵀB_{t−1} zero); qr: moments in the basis and the basis itself (a
        # zero basis makes the first P zero). Either way the (zero) moments start afresh.
        keys = (
            ("magnified_exp_avg", "magnified_second_moment", "previous_factor")
            if magnified
            else ("exp_avg", "second_moment", "basis")
        )

        def side(x: torch.Tensor) -> State:
            r = x.shape[-1]
            s = {keys[0]: torch.zeros_like(x), keys[1]: x.new_zeros(r, r), keys[2]: torch.zeros_like(x)}
            if hp["escape"]:
                s["escaped_mass"] = x.new_zeros(())
                if magnified:
                    s["second_moment_eigenvalues"] = x.new_zeros(r)
            return s

        return side(a), side(b)

    def reconcile_state(
        self, a: torch.Tensor, b: torch.Tensor, state_a: State, state_b: State, hp: dict[str, Any]
    ) -> tuple[State, State]:
        """:meth:`Strategy.reconcile_state`, refusing an engine switch: neither engine's state
        holds what the other needs (the QR engine keeps moments in the other factor's basis, the
        Gram engine magnified ones and the previous factor), so no moment could be carried over."""
        built = [e for e, key in _ENGINE_KEYS.items() if key in state_a]
        want = resolve_engine(hp["engine"], a.dtype)
        if built and built != [want]:
            raise ValueError(
                f"lora_rite: engine={hp['engine']!r} runs the {want!r} engine, but this pair's state "
                f"was built by the {built[0]!r} engine (the option changed mid-run, or a checkpoint "
                f"of an older default was loaded); the engines keep different moments and neither "
                f"can be converted to the other. Set engine={built[0]!r} in the param group to "
                "continue this state, or start a fresh optimizer to switch engines"
            )
        return super().reconcile_state(a, b, state_a, state_b, hp)

    def couples_groups(self, hp: dict[str, Any]) -> bool:
        # clip_scope="global": one clipping norm over every such group of the optimizer
        return hp.get("clip_scope") == "global"

    def update(self, batches: list[PairBatch], hp: dict[str, Any]) -> list[PairUpdate]:
        # one group alone: its own norm, whatever the scope
        return update_groups([(batches, hp)])[0]

    def update_groups(self, groups: list[tuple[list[PairBatch], dict[str, Any]]]) -> list[list[PairUpdate]]:
        """:func:`update_groups`: one clipping norm over the groups with ``clip_scope="global"``."""
        return update_groups(groups)
