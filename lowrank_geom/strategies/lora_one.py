r"""LoRA-One's preconditioned update (Zhang, Liu & Chen, ICML 2025, arXiv 2502.01235).

The spectral initialization from one full gradient step, the method's other half (Algorithm 1,
lines 1-5), is at the adapter layer: :func:`lowrank_geom.init.lora_one`. Algorithm 1 then trains
with AdamW (lines 7-9); this module is the preconditioned gradient descent of the paper's Eq. (9),
with the authors' damping.
"""

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
    check_betas,
    check_eps,
    check_non_negative,
    check_weight_decay,
    register,
)
from lowrank_geom.strategies.scaled_gd import capped_direction, magnitude_inverse, scaled_gradient


def capped(d: torch.Tensor, x: torch.Tensor, cap: float, lr, row_reduce=None) -> torch.Tensor:
    """``D`` with the relative change ``η D R_X⁺`` of its factor ``X`` capped at ``cap`` (0: unchanged)."""
    if cap == 0:
        return d
    g = gram(x, None, row_reduce)
    return capped_direction(d, g, magnitude_inverse(g, x.dtype), cap, lr, row_reduce)


def uncorrected_adam(
    d: torch.Tensor, state: State, betas: tuple[float, float], eps: float
) -> tuple[torch.Tensor, State]:
    """``m / (√v + ε)`` with ``m = β₁m + (1−β₁)D``, ``v = β₂v + (1−β₂)D²``, no bias correction; (dir, new state)."""
    m = torch.lerp(state["exp_avg"], d, 1.0 - betas[0])
    v = state["exp_avg_sq"] * betas[1] + (1.0 - betas[1]) * d * d
    return m / (v.sqrt() + eps), {"exp_avg": m, "exp_avg_sq": v}


@register
class LoRAOneStrategy(Strategy):
    r"""LoRA-One: gradient descent preconditioned by the other factor's damped Gram matrix.

    .. math::
        A_{t+1} = A_t - \eta\, \bigl(\nabla A_t (B_t^\top B_t + \lambda I)^{-1} + w A_t\bigr), \qquad
        B_{t+1} = B_t - \eta\, \bigl(\nabla B_t (A_t^\top A_t + \lambda I)^{-1} + w B_t\bigr)

    Zhang, Liu & Chen (ICML 2025), Eq. (9): preconditioned gradient descent, both factors from the
    same iterate (Algorithm 1 itself trains with AdamW), in the package's orientation ``Z = A Bᵀ``
    (the paper's ``A`` is our ``A``, PEFT's ``lora_B``; its ``B`` is our ``Bᵀ``, ``lora_A``); checked
    against the paper's text (:doc:`/strategies/lora_one`). Eq. (9) inverts without damping;
    ``damping`` λ defaults to the authors' ``prec_reg = 1e-6`` (``damping=0`` and
    ``relative_step_cap=0`` are Eq. (9) as printed). Meant to start from the spectral
    initialization :func:`lowrank_geom.init.lora_one`. ``weight_decay`` ``w`` is not in the paper
    (0). No state.

    ``reference=True`` is the preconditioned optimizer the authors released (their ``AdamWr``,
    adapted from Zhang & Pilanci's scaled AdamW), which differs from the update above: Adam moments
    (``betas``, ``eps``) over the preconditioned gradient without bias correction, ``lora_A``
    (our ``B``) stepped first and ``lora_B`` (our ``A``) then preconditioned by the *updated*
    ``B``, and the decay ``X ← X_{new}(1 − ηw)`` after the step. State ``exp_avg``,
    ``exp_avg_sq`` (m×r, n×r).

    Safeguard (``relative_step_cap = c > 0``, default 1; 0 is the paper's and the authors'
    update): each factor's step has its relative change ``η D R_X⁺`` capped at ``c``
    (:func:`~lowrank_geom.strategies.scaled_gd.capped_direction`), as ScaledGD's. In float32 an
    unbalanced pair (a gauge of condition 10⁴) leaves Gram round-off far above ``λ``, and
    ``(AᵀA + λI)⁻¹`` then turns it into jumps of the partner: the loss grew 40× in 5 steps
    without the cap and decreases with it.

    Invariance: :math:`O(r)` for ``λ > 0`` (:math:`GL(r)` when ``λ = 0`` and
    ``reference=False``); ``reference=True`` is not invariant (elementwise moments).
    """

    name = "lora_one"
    invariance = "O(r)"
    defaults = dict(
        damping=1e-6, weight_decay=0.0, relative_step_cap=1.0, reference=False, betas=(0.9, 0.999), eps=1e-8
    )

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # every row sum is an r×r Gram through row_reduce; the rest is row-wise or elementwise
        return []

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_non_negative("damping", hp["damping"])
        check_non_negative("relative_step_cap", hp["relative_step_cap"])
        check_weight_decay(hp["weight_decay"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        if not isinstance(hp["reference"], bool):
            raise ValueError(f"Invalid reference value: {hp['reference']!r} (a bool)")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        if not hp["reference"]:
            return {}, {}

        def side(x: torch.Tensor) -> State:
            return {"exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x)}

        return side(a), side(b)

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        if hp["reference"]:
            return self._authors_update(batch, hp)
        rr, lr, lam, cap, wd = batch.row_reduce, hp["lr"], hp["damping"], hp["relative_step_cap"], hp["weight_decay"]
        d_a = capped(scaled_gradient(batch.grad_a, batch.b, lam, rr), batch.a, cap, lr, rr)
        d_b = capped(scaled_gradient(batch.grad_b, batch.a, lam, rr), batch.b, cap, lr, rr)
        # A ← A − η(D + wA): the driver applies the scale and the decay in its in-place update
        return PairUpdate(d_a, d_b, {}, {}, scale=-lr, decay=lr * wd if wd else 0.0)

    def _authors_update(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        """The released ``AdamWr``: ``B`` (their ``lora_A``) first, then ``A`` against the new ``B``."""
        rr, lr, lam, wd = batch.row_reduce, hp["lr"], hp["damping"], hp["weight_decay"]
        keep = 1.0 - lr * wd

        def side(grad, other, x, state):
            d, new_state = uncorrected_adam(scaled_gradient(grad, other, lam, rr), state, hp["betas"], hp["eps"])
            # X_new(1 − ηw) = X(1 − ηw) + step·(1 − ηw): the driver applies X(1 − ηw)
            return capped(d, x, hp["relative_step_cap"], lr, rr) * (-lr * keep), new_state

        step_b, state_b = side(batch.grad_b, batch.a, batch.b, batch.state_b)
        step_a, state_a = side(batch.grad_a, batch.b * keep + step_b, batch.a, batch.state_a)
        return PairUpdate(step_a, step_b, state_a, state_b, decay=lr * wd if wd else 0.0)
