r"""AltLoRA (Yu, Wang, Chen & Xue, arXiv 2505.12455): alternating projected steps with realigned momentum."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import gram
from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    State,
    Strategy,
    _check_lr,
    check_non_negative,
    check_weight_decay,
    expand,
    moving_masks,
    register,
    right_multiply,
)
from lowrank_geom.strategies.scaled_gd import capped_direction, inverse_gram, magnitude_inverse


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
    """The additive update ``X_{t+1} − X_t``. ``(P, rows, r)``.

    ``alternate=True``: ``X_{t+1} = X_t − η_t M − ηλ X_t`` (Algorithm 1's ``X − η(M + γX)``);
    ``alternate=False``: ``X_{t+1} = (1 − ηλ)(X_t − η_t M)`` (the authors' code, decay after the
    step). ``relative_step_cap = c > 0`` caps the relative change ``η_t M R_X⁺`` at ``c`` (the
    momentum keeps the uncapped ``M``), as ScaledGD's safeguard.
    """
    lr, wd, cap = hp["lr"], hp["weight_decay"], hp["relative_step_cap"]
    eta_x = expand(eta, direction)
    if cap > 0:
        direction = capped_direction(direction, g_self, magnitude_inverse(g_self, x.dtype), cap, eta_x, rr)
    shrink = 1.0 if hp["alternate"] else 1.0 - lr * wd
    return -shrink * eta_x * direction - (lr * wd) * x


@register
class AltLoRAStrategy(Strategy):
    r"""AltLoRA: alternating ScaledGD steps with momentum realigned to the partner's new column space.

    In the paper's notation :math:`W = W_0 + s\,\mathbf{B}\mathbf{A}` the input-side factor
    :math:`\mathbf{A}` (PEFT's ``lora_A``, here :math:`B^\top`) moves first, and the output-side
    factor is then preconditioned by the *updated* one. ``alternate=True`` (the default) is the
    paper's Algorithm 1: one factor per optimizer step, :math:`B` on even step counts and
    :math:`A` on odd ones, each with the gradient of its own step (so :math:`A`'s is taken after
    :math:`B` has moved). With :math:`X` the factor that moves, :math:`Y` its partner,
    :math:`Y_{\mathrm{old}}` the partner at :math:`X`'s previous move, in this package's
    :math:`Z = A B^\top`:

    .. math::
        \begin{aligned}
        K &= (Y^\top Y + \delta I)^{-1}, \qquad
        M_X \leftarrow \beta\, M_X (Y_{\mathrm{old}}^\top Y K) + (1-\beta)\, \nabla X\, K\\
        X &\leftarrow X - \eta_k M_X - \eta\lambda X, \qquad
        \eta_k = \eta / (1 - \beta^k)\ (\texttt{bias\_correction},\ k\text{: the factor's own move count})
        \end{aligned}

    ``alternate=False`` is the authors' optimizer class given both gradients of one backward pass
    at :math:`(A_t, B_t)`: every step moves :math:`B` with :math:`Y = A_t`, then :math:`A` with
    :math:`Y = B_{t+1}`, :math:`Y_{\mathrm{old}} = B_t`, decay applied after the step,
    :math:`X \leftarrow (1 - \eta\lambda)(X - \eta_t M_X)`, :math:`t` the step count.

    :math:`Y_{\mathrm{old}}^\top Y K` maps the momentum, kept in the coordinates of the partner it
    was accumulated with, onto the partner's current column space (the paper's momentum
    alignment), so the state is :math:`O((m+n)r)`: ``exp_avg`` of each factor and
    ``previous_factor`` (the factor before its last move; on A's side only with
    ``alternate=False``). The Grams go through ``row_reduce``, so the strategy runs on row shards.

    Safeguard (``relative_step_cap = c > 0``, default 1; 0 removes it): each moving factor's
    relative change :math:`\eta_k M R_X^+` is capped at ``c``, as ScaledGD's (:doc:`/numerics`).

    Invariant to every :math:`G \in GL(r)` with ``delta=0`` (momentum, realignment and the decay
    included); only to orthogonal :math:`G` when ``delta > 0`` (the authors' ``reg``).
    """

    name = "altlora"
    invariance = "GL(r)"
    defaults = dict(beta=0.9, delta=0.0, weight_decay=0.0, bias_correction=True, relative_step_cap=1.0, alternate=True)

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # r×r Grams and overlaps through row_reduce; every state tensor has its own factor's rows
        return []

    def moves(self, hp: dict[str, Any], step: Any) -> tuple[Any, Any]:
        # Algorithm 1 moves the paper's A (this package's B) on even step counts, the other factor on odd ones
        if not hp["alternate"]:
            return True, True
        return step % 2 == 1, step % 2 == 0

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        if not 0.0 <= hp["beta"] < 1.0:
            raise ValueError(f"Invalid beta value: {hp['beta']}")
        check_non_negative("delta", hp["delta"])
        check_non_negative("relative_step_cap", hp["relative_step_cap"])
        check_weight_decay(hp["weight_decay"])
        for key in ("bias_correction", "alternate"):
            if not isinstance(hp[key], bool):
                raise ValueError(f"Invalid {key} value: {hp[key]!r} (expected a bool)")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        # previous_factor = the factor itself: a momentum realigned from it is only projected (X K Xᵀ X = X)
        state_b = {"exp_avg": torch.zeros_like(b)}
        if hp["alternate"]:
            state_b["previous_factor"] = b.clone()
        return {"exp_avg": torch.zeros_like(a), "previous_factor": a.clone()}, state_b

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        if hp["alternate"]:
            return self._alternating(batch, hp)
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

    def _alternating(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        """Algorithm 1: the factor whose turn it is moves with the gradient of this step; the other keeps its state."""
        rr, beta, delta = batch.row_reduce, hp["beta"], hp["delta"]
        a, b = batch.a, batch.b
        # each factor moves every other step: its own move count k = step // 2 + 1 sets η_k
        eta = step_size(hp["lr"], beta, torch.div(batch.step, 2, rounding_mode="floor"), hp["bias_correction"])
        on_a, on_b = moving_masks(self, hp, batch.step)
        g_a, g_b = gram(a, None, rr), gram(b, None, rr)

        def move(x, y, g_x, g_y, grad, state, partner_state, active):
            if active is None:
                return torch.zeros_like(x), dict(state)
            k = inverse_gram(g_y, y.dtype, delta)
            # the partner at x's previous move is the partner before its own last move
            m = realigned_momentum(grad, state["exp_avg"], gram(partner_state["previous_factor"], y, rr), k, beta)
            mask = expand(active, x)
            new = {
                "exp_avg": torch.where(mask, m, state["exp_avg"]),
                "previous_factor": torch.where(mask, x, state["previous_factor"]),
            }
            return factor_step(x, m, g_x, eta, hp, rr) * mask, new

        delta_b, state_b = move(b, a, g_b, g_a, batch.grad_b, batch.state_b, batch.state_a, on_b)
        delta_a, state_a = move(a, b, g_a, g_b, batch.grad_a, batch.state_a, batch.state_b, on_a)
        return PairUpdate(delta_a, delta_b, state_a, state_b)
