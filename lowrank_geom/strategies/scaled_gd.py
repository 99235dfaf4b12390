r"""ScaledGD / Riemannian gradient descent (Tong, Ma & Chi, JMLR 2021; Zhang & Pilanci, ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import (
    compute_dtype,
    damped_inverse,
    gram,
    gram_cutoff,
    gram_pinv,
    inverse_magnitude,
)
from lowrank_geom.geometry.gramian import gram_relative_change_cap
from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    State,
    Strategy,
    _check_lr,
    check_non_negative,
    check_weight_decay,
    register,
    right_multiply,
    workspace_like,
)


def scaled_gradient(
    grad: torch.Tensor,
    other: torch.Tensor,
    delta: float,
    row_reduce=None,
    out: torch.Tensor | None = None,
    gram_other: torch.Tensor | None = None,
    rinv_other: torch.Tensor | None = None,
) -> torch.Tensor:
    """``∇A (BᵀB + δI)⁻¹`` (Tong et al. Eq. 6). ``(P, m, r)``, ``(P, n, r)`` → ``(P, m, r)``.

    QR-free: the r×r Gram ``G = BᵀB`` (one GEMM, summed over rows through ``row_reduce``) is
    inverted in float64 and applied with one m×r×r GEMM. ``δ = 0`` is the Riemannian gradient of
    the preconditioned metric, ``∇A G⁺`` with ``G⁺ = R⁻¹R⁻ᵀ`` from the Cholesky factor
    (:func:`~lowrank_geom.geometry.inverse_magnitude`): a zero factor gives a zero direction and
    a rank-deficient one the filtered pseudo-inverse. ``δ > 0`` inverts ``G + δI`` with ``G``'s
    eigenvalues clamped at zero (:func:`~lowrank_geom.geometry.damped_inverse`: a float32 Gram's
    round-off can exceed ``δ``).
    Written to ``out`` when given; ``gram_other`` is ``BᵀB`` and ``rinv_other`` its inverse
    magnitude (:func:`inverse_magnitude` at the compute dtype's cutoff) when the caller has them.
    """
    g = gram(other, None, row_reduce or (lambda t: t)) if gram_other is None else gram_other
    return right_multiply(grad, inverse_gram(g, other.dtype, delta, rinv_other), out)


def inverse_gram(g: torch.Tensor, dtype: torch.dtype, delta: float, rinv: torch.Tensor | None = None) -> torch.Tensor:
    """``K = (XᵀX + δI)⁻¹`` from the Gram ``G = XᵀX`` of a factor of ``dtype``. ``(P, r, r)``.

    ``δ = 0``: the filtered pseudo-inverse ``G⁺`` at the compute dtype's cutoff (``rinv``: its
    :func:`magnitude_inverse` when the caller has it), so a zero factor gives ``K = 0`` and a zero
    step instead of ``1/0``; ``δ > 0``: :func:`~lowrank_geom.geometry.damped_inverse`.
    """
    if delta == 0:
        return gram_pinv(magnitude_inverse(g, dtype) if rinv is None else rinv)
    return damped_inverse(g, delta)


def magnitude_inverse(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``R⁺`` of a factor of ``dtype`` from its Gram ``G = RᵀR``, at the compute dtype's cutoff."""
    return inverse_magnitude(g, gram_cutoff(g, compute_dtype(dtype)))


def capped_direction(
    d: torch.Tensor, g_self: torch.Tensor, rinv_self: torch.Tensor, cap: float, lr: float, row_reduce=None
) -> torch.Tensor:
    """The direction ``D`` of a factor ``X`` (step ``−η D``) with its relative change ``η D R_X⁺``
    capped at ``cap`` (:func:`~lowrank_geom.geometry.relative_change_cap`; ``G_X = XᵀX = RᵀR``,
    ``rinv_self = R⁺`` from :func:`magnitude_inverse`).

    ScaledGD multiplies the partner's gradient by ``(XᵀX)⁻¹``, so a factor with a direction far
    smaller than its step there — a newly started direction, or one that rounding to bfloat16
    created — makes the partner jump by ``1/σ_min²``; capped, each factor changes by at most
    ``cap`` relative to itself along any direction. GL(r)-invariant; uncapped pairs bit for bit.
    """
    return gram_relative_change_cap(d, g_self, rinv_self, cap, lr, row_reduce)


@register
class ScaledGDStrategy(Strategy):
    r"""ScaledGD: gradient descent preconditioned by the other factor's Gram matrix.

    .. math::
        \begin{aligned}
        D_{A,t} &= \nabla A_t (B_t^\top B_t + \delta I)^{-1} + \lambda A_t, \qquad
        D_{B,t} = \nabla B_t (A_t^\top A_t + \delta I)^{-1} + \lambda B_t\\
        \mathrm{buf}_t &= \mu\, \mathrm{buf}_{t-1} + D_t \quad (\mathrm{buf}_1 = D_1)\\
        A_{t+1} &= A_t - \eta_t\, \mathrm{buf}_{A,t}
        \end{aligned}

    Computed without any m×r factorization: one Gram GEMM ``BᵀB`` and one m×r×r GEMM per factor,
    the r×r inverse in float64 (:func:`scaled_gradient`); the learning rate and the weight decay
    are applied by the driver's in-place update. State: ``momentum_buffer`` (m×r) with
    ``momentum > 0``, none otherwise.

    Safeguard (``relative_step_cap = c > 0``, default 1; 0 is the paper's update): the applied
    direction ``buf`` of each factor has its relative change ``η buf R_X⁺`` capped at ``c``
    (:func:`capped_direction`); the momentum buffer keeps the uncapped ``buf``. Without it a
    bfloat16 factor whose rounding left a tiny direction, or a newly started one, made the partner
    jump by ``1/σ_min²`` (:doc:`/numerics`).

    Tong, Ma & Chi (2021) Eq. (6); with ``delta=0`` the direction is the Riemannian gradient of
    the metric ``tr(BᵀB ξ_Aᵀ η_A) + tr(AᵀA ξ_Bᵀ η_B)`` (Mishra & Sepulchre 2016), see
    :class:`~lowrank_geom.geometry.manifold.FixedRankQuotient`. Invariant to every ``G ∈ GL(r)`` when
    ``delta=0`` (momentum and the coupled weight decay ``λ`` included); only to orthogonal ``G``
    when ``delta > 0``.
    """

    name = "scaled_gd"
    invariance = "GL(r)"
    defaults = dict(delta=0.0, momentum=0.0, weight_decay=0.0, relative_step_cap=1.0)

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # every hyperparameter: one r×r Gram per factor through row_reduce, element-wise otherwise
        return []

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_non_negative("delta", hp["delta"])
        check_non_negative("relative_step_cap", hp["relative_step_cap"])
        check_weight_decay(hp["weight_decay"])
        if not 0.0 <= hp["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum value: {hp['momentum']}")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        if hp["momentum"] == 0:
            return {}, {}
        return {"momentum_buffer": torch.zeros_like(a)}, {"momentum_buffer": torch.zeros_like(b)}

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        ws, rr = batch.workspace, batch.row_reduce
        lr, wd, mu, cap = hp["lr"], hp["weight_decay"], hp["momentum"], hp["relative_step_cap"]
        g_a, g_b = gram(batch.a, None, rr), gram(batch.b, None, rr)
        # each R⁺ serves both the partner's direction (δ = 0) and its own factor's cap
        t_a, t_b = (
            (None, None)
            if hp["delta"] > 0 and cap == 0
            else (magnitude_inverse(g_a, batch.a.dtype), magnitude_inverse(g_b, batch.b.dtype))
        )
        d_a = scaled_gradient(
            batch.grad_a, batch.b, hp["delta"], rr, workspace_like(ws, "direction_a", batch.grad_a), g_b, t_b
        )
        d_b = scaled_gradient(
            batch.grad_b, batch.a, hp["delta"], rr, workspace_like(ws, "direction_b", batch.grad_b), g_a, t_a
        )

        def capped(d_a, d_b):
            return capped_direction(d_a, g_a, t_a, cap, lr, rr), capped_direction(d_b, g_b, t_b, cap, lr, rr)

        if mu == 0:
            if cap > 0:
                d_a, d_b = capped(d_a, d_b)
            # δA = −η(D + λA): scale and decay are applied by the driver in its in-place update
            return PairUpdate(d_a, d_b, {}, {}, scale=-lr, decay=lr * wd if wd else 0.0)
        if wd != 0:
            d_a = d_a.add_(batch.a, alpha=wd)
            d_b = d_b.add_(batch.b, alpha=wd)
        # buf_t = μ buf_{t−1} + D_t; the buffer starts at zero, so buf_1 = D_1 exactly
        d_a = d_a.add_(batch.state_a["momentum_buffer"], alpha=mu)
        d_b = d_b.add_(batch.state_b["momentum_buffer"], alpha=mu)
        state_a, state_b = {"momentum_buffer": d_a}, {"momentum_buffer": d_b}
        if cap > 0:  # the step is capped, the buffer is not
            d_a, d_b = capped(d_a, d_b)
        return PairUpdate(d_a, d_b, state_a, state_b, scale=-lr)
