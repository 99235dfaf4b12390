r"""ScaledGD / Riemannian gradient descent (Tong, Ma & Chi, JMLR 2021; Zhang & Pilanci, ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import magnitude_pinv, orthonormal_basis
from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    State,
    Strategy,
    _check_lr,
    check_non_negative,
    check_weight_decay,
    expand,
    register,
)


def scaled_gradient(grad: torch.Tensor, other: torch.Tensor, delta: float) -> torch.Tensor:
    """``∇A (BᵀB + δI)⁻¹`` (Tong et al. Eq. 6). ``(P, m, r)``, ``(P, n, r)`` → ``(P, m, r)``.

    ``δ = 0`` is the Riemannian gradient of the preconditioned metric; it is computed as
    ``∇A R_B⁺ R_B⁺ᵀ`` from the QR of ``B`` (conditioning of ``B``, not of the squared Gram) and a
    zero factor gives a zero direction. ``δ > 0`` solves the damped system by Cholesky.
    """
    if delta == 0:
        _, r = orthonormal_basis(other, "qr")
        rinv = magnitude_pinv(r, rows=other.shape[-2])
        return grad @ rinv @ rinv.mT
    gram = other.mT @ other
    gram = gram + delta * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(grad.mT, torch.linalg.cholesky(gram)).mT


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

    Tong, Ma & Chi (2021) Eq. (6); with ``delta=0`` the direction is the Riemannian gradient of
    the metric ``tr(BᵀB ξ_Aᵀ η_A) + tr(AᵀA ξ_Bᵀ η_B)`` (Mishra & Sepulchre 2016), see
    :class:`~lowrank_geom.geometry.manifold.FixedRankQuotient`. Invariant to every ``G ∈ GL(r)`` when
    ``delta=0`` (momentum and the coupled weight decay ``λ`` included); only to orthogonal ``G``
    when ``delta > 0``.
    """

    name = "scaled_gd"
    invariance = "GL(r)"
    defaults = dict(delta=0.0, momentum=0.0, weight_decay=0.0)

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_non_negative("delta", hp["delta"])
        check_weight_decay(hp["weight_decay"])
        if not 0.0 <= hp["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum value: {hp['momentum']}")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        if hp["momentum"] == 0:
            return {}, {}
        return {"momentum_buffer": torch.zeros_like(a)}, {"momentum_buffer": torch.zeros_like(b)}

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        d_a = scaled_gradient(batch.grad_a, batch.b, hp["delta"])
        d_b = scaled_gradient(batch.grad_b, batch.a, hp["delta"])
        if hp["weight_decay"] != 0:
            d_a = d_a + hp["weight_decay"] * batch.a
            d_b = d_b + hp["weight_decay"] * batch.b
        new_a: State = {}
        new_b: State = {}
        mu = hp["momentum"]
        if mu != 0:
            first = expand(batch.step == 0, d_a)
            d_a = torch.where(first, d_a, mu * batch.state_a["momentum_buffer"] + d_a)
            d_b = torch.where(first, d_b, mu * batch.state_b["momentum_buffer"] + d_b)
            new_a["momentum_buffer"], new_b["momentum_buffer"] = d_a, d_b
        return PairUpdate(-hp["lr"] * d_a, -hp["lr"] * d_b, new_a, new_b)
