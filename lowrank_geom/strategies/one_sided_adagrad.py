r"""One-sided matrix Adagrad: an r×r accumulated second moment per factor (LoRA-RITE paper §3.3)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import inverse_root, symmetrize
from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    State,
    Strategy,
    _check_lr,
    check_eps,
    check_weight_decay,
    register,
)


def accumulate_gram(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``H_t = H_{t−1} + ∇Aᵀ∇A``: the summed one-sided second moment. ``(P, r, r)``."""
    return h + symmetrize(grad.mT @ grad)


@register
class OneSidedAdagradStrategy(Strategy):
    r"""One-sided matrix Adagrad, the comparison method of the LoRA-RITE regret analysis.

    .. math::
        \begin{aligned}
        H_{A,t} &= H_{A,t-1} + \nabla A_t^\top \nabla A_t\\
        A_{t+1} &= A_t - \eta_t\, \nabla A_t (H_{A,t} + \epsilon I)^{-1/2}
        \end{aligned}

    and the same for B. Its regret bound is ``O(G (D_A² + D_B²) T^{-1/2})`` against LoRA-RITE's
    ``O(G D_A D_B T^{-1/2})`` (paper §3.3). Invariant to orthogonal gauges only. With
    ``weight_decay``, ``∇A ← ∇A + λA`` before everything.
    """

    name = "one_sided_adagrad"
    invariance = "O(r)"
    defaults = dict(eps=1e-6, weight_decay=0.0)

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_eps(hp["eps"])
        check_weight_decay(hp["weight_decay"])

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        r = a.shape[-1]
        return {"sum_gram": a.new_zeros(r, r)}, {"sum_gram": b.new_zeros(r, r)}

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        deltas, states = [], []
        for x, grad, state in ((batch.a, batch.grad_a, batch.state_a), (batch.b, batch.grad_b, batch.state_b)):
            if hp["weight_decay"] != 0:
                grad = grad + hp["weight_decay"] * x
            h = accumulate_gram(state["sum_gram"], grad)
            deltas.append(-hp["lr"] * (grad @ inverse_root(h, 2, shift=hp["eps"]).to(grad.dtype)))
            states.append({"sum_gram": h})
        return PairUpdate(deltas[0], deltas[1], states[0], states[1])
