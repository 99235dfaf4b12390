r"""AltLoRA (Yu, Wang, Chen & Xue, arXiv 2505.12455): alternating projected steps with realigned momentum."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import gram, gram_pinv
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
    right_multiply,
)
from lowrank_geom.strategies.scaled_gd import capped_direction, magnitude_inverse


def inverse_gram(g: torch.Tensor, dtype: torch.dtype, delta: float) -> torch.Tensor:
    """``K = (XᵀX + δI)⁻¹`` from the Gram ``G = XᵀX`` (the pseudo-inverse ``G⁺`` when ``δ = 0``). ``(P, r, r)``.

    ``δ = 0``: the filtered pseudo-inverse at the compute dtype's cutoff, so a zero factor (LoRA's
    init) gives ``K = 0`` and a zero step instead of ``1/0``; ``δ > 0``: Cholesky of ``G + δI``.
    """
    if delta == 0:
        return gram_pinv(magnitude_inverse(g, dtype))
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(g + delta * eye))


def realigned_momentum(
    grad: torch.Tensor, exp_avg: torch.Tensor, overlap: torch.Tensor, k: torch.Tensor, beta: float
) -> torch.Tensor:
    """``M ← β M (X_oldᵀ X K) + (1 − β) ∇ K`` = ``(β M X_oldᵀX + (1 − β) ∇) K`` (Algorithm 1; ``overlap = X_oldᵀ X``).

    ``X_oldᵀ X K`` is the least-squares map of the partner's previous column space onto its
    current one: momentum accumulated in the old coordinates is re-expressed in the new ones
    before the scaled gradient ``∇ K = ∇ (XᵀX)⁻¹`` is added. ``(P, rows, r)``.
    """
    mixed = right_multiply(exp_avg, overlap).mul_(beta).add_(grad, alpha=1.0 - beta)
    return right_multiply(mixed, k)


def step_size(lr: float | torch.Tensor, beta: float, step: torch.Tensor, bias_correction: bool) -> torch.Tensor:
    """``η_t = η / (1 − β^t)`` with ``t = step + 1`` (``η`` without bias correction). ``(P,)`` float64."""
    t = step.to(torch.float64) + 1.0
    lr = torch.as_tensor(lr, dtype=torch.float64, device=step.device).reshape(())
    return lr / (1.0 - beta**t) if bias_correction and beta > 0 else lr.expand_as(t)


def factor_step(
    x: torch.Tensor, direction: torch.Tensor, g_self: torch.Tensor, eta: torch.Tensor, hp: dict[str, Any], rr
) -> torch.Tensor:
    """The additive update ``X_{t+1} − X_t`` with ``X_{t+1} = (1 − ηλ)(X_t − η_t M)`` (the authors' decay order).

    ``relative_step_cap = c > 0`` caps the relative change ``η_t M R_X⁺`` at ``c`` (the momentum
    keeps the uncapped ``M``), as ScaledGD's safeguard. ``(P, rows, r)``.
    """
    lr, wd, cap = hp["lr"], hp["weight_decay"], hp["relative_step_cap"]
    eta_x = expand(eta, direction)
    if cap > 0:
        direction = capped_direction(direction, g_self, magnitude_inverse(g_self, x.dtype), cap, eta_x, rr)
    shrink = 1.0 - lr * wd
    return -shrink * eta_x * direction - (lr * wd) * x


@register
class AltLoRAStrategy(Strategy):
    r"""AltLoRA: alternating ScaledGD steps with momentum realigned to the partner's new column space.

    In the paper's notation :math:`W = W_0 + s\,\mathbf{B}\mathbf{A}` the input-side factor
    :math:`\mathbf{A}` (PEFT's ``lora_A``, here :math:`B^\top`) is updated first, and the output-side
    factor is then preconditioned by the *updated* one. In this package's :math:`Z = A B^\top`:

    .. math::
        \begin{aligned}
        K_A &= (A_t^\top A_t + \delta I)^{-1}, \qquad
        M_{B,t} = \beta\, M_{B,t-1} (A_{t-1}^\top A_t K_A) + (1-\beta)\, \nabla B_t K_A\\
        B_{t+1} &= (1 - \eta\lambda)\,(B_t - \eta_t M_{B,t})\\
        K_B &= (B_{t+1}^\top B_{t+1} + \delta I)^{-1}, \qquad
        M_{A,t} = \beta\, M_{A,t-1} (B_t^\top B_{t+1} K_B) + (1-\beta)\, \nabla A_t K_B\\
        A_{t+1} &= (1 - \eta\lambda)\,(A_t - \eta_t M_{A,t}), \qquad
        \eta_t = \eta / (1 - \beta^t)\ (\texttt{bias\_correction})
        \end{aligned}

    :math:`X_{\mathrm{old}}^\top X K` maps the momentum, kept in the coordinates of the partner of
    the previous step, onto the partner's current column space (the paper's momentum alignment),
    so the state is :math:`O((m+n)r)`: ``exp_avg`` of each factor and ``previous_factor``
    (:math:`A_{t-1}`) on A's side. Both gradients are those of one backward pass at
    :math:`(A_t, B_t)`, as in the authors' code. The Grams go through ``row_reduce``, so the
    strategy runs on row shards.

    Safeguard (``relative_step_cap = c > 0``, default 1; 0 is the paper's update): each factor's
    relative change :math:`\eta_t M R_X^+` is capped at ``c``, as ScaledGD's (:doc:`/numerics`).

    Invariant to every :math:`G \in GL(r)` with ``delta=0`` (momentum, realignment and the decay
    included); only to orthogonal :math:`G` when ``delta > 0`` (the authors' ``reg``).
    """

    name = "altlora"
    invariance = "GL(r)"
    defaults = dict(beta=0.9, delta=0.0, weight_decay=0.0, bias_correction=True, relative_step_cap=1.0)

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # r×r Grams and overlaps through row_reduce; every state tensor has its own factor's rows
        return []

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        if not 0.0 <= hp["beta"] < 1.0:
            raise ValueError(f"Invalid beta value: {hp['beta']}")
        check_non_negative("delta", hp["delta"])
        check_non_negative("relative_step_cap", hp["relative_step_cap"])
        check_weight_decay(hp["weight_decay"])
        if not isinstance(hp["bias_correction"], bool):
            raise ValueError(f"Invalid bias_correction value: {hp['bias_correction']!r} (expected a bool)")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        # previous_factor = A itself: a momentum realigned from it is only projected (A K_A Aᵀ A = A)
        return {"exp_avg": torch.zeros_like(a), "previous_factor": a.clone()}, {"exp_avg": torch.zeros_like(b)}

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        rr, beta, delta = batch.row_reduce, hp["beta"], hp["delta"]
        a, b = batch.a, batch.b
        eta = step_size(hp["lr"], beta, batch.step, hp["bias_correction"])
        g_a = gram(a, None, rr)
        # the paper's A (this package's B) first, preconditioned by the current partner A_t
        k_a = inverse_gram(g_a, a.dtype, delta)
        overlap_a = gram(batch.state_a["previous_factor"], a, rr)  # A_{t−1}ᵀ A_t
        m_b = realigned_momentum(batch.grad_b, batch.state_b["exp_avg"], overlap_a, k_a, beta)
        delta_b = factor_step(b, m_b, gram(b, None, rr), eta, hp, rr)
        b_new = b + delta_b
        # then A, preconditioned by the updated B_{t+1}; its momentum moves from B_t to B_{t+1}
        g_b_new = gram(b_new, None, rr)
        k_b = inverse_gram(g_b_new, b.dtype, delta)
        m_a = realigned_momentum(batch.grad_a, batch.state_a["exp_avg"], gram(b, b_new, rr), k_b, beta)
        delta_a = factor_step(a, m_a, g_a, eta, hp, rr)
        state_a = {"exp_avg": m_a, "previous_factor": a.clone()}
        return PairUpdate(delta_a, delta_b, state_a, {"exp_avg": m_b})
