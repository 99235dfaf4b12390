r"""ScaledAdam (Zhang & Pilanci, "Riemannian Preconditioned LoRA", ICML 2024): Adam over scaled gradients."""

from __future__ import annotations

from typing import Any

import torch

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
    expand,
    register,
    workspace_like,
)
from lowrank_geom.strategies.scaled_gd import scaled_gradient


def adam_direction(
    d: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam's ``m̂ / (√v̂ + ε)`` over ``d`` elementwise (Kingma & Ba, Alg. 1); returns (direction, m, v).

    No m×r temporary: ``m`` by ``lerp`` and ``v`` by ``mul``/``addcmul_`` (into ``out`` when
    given), the direction in place over ``d``, which is overwritten.
    """
    beta1, beta2 = betas
    out_m, out_v = out if out is not None else (None, None)
    m = torch.lerp(exp_avg, d, 1.0 - beta1, out=out_m)
    v = torch.mul(exp_avg_sq, beta2, out=out_v).addcmul_(d, d, value=1.0 - beta2)
    t = step.to(torch.float64) + 1.0
    c1 = expand(1.0 - beta1**t, d)
    c2 = expand((1.0 - beta2**t).rsqrt(), d)
    direction = torch.sqrt(v, out=d).mul_(c2).add_(eps)
    return torch.div(m, direction, out=direction).div_(c1), m, v


@register
class ScaledAdamStrategy(Strategy):
    r"""ScaledAdam: AdamW moments over the ScaledGD direction of each factor.

    .. math::
        \begin{aligned}
        D_{A,t} &= \nabla A_t (B_t^\top B_t + \delta I)^{-1}\\
        m_{A,t} &= \beta_1 m_{A,t-1} + (1-\beta_1) D_{A,t}, \qquad
        v_{A,t} = \beta_2 v_{A,t-1} + (1-\beta_2) D_{A,t}^{\odot 2}\\
        A_{t+1} &= A_t (1 - \eta_t \lambda) - \eta_t\, \hat m_{A,t} / (\sqrt{\hat v_{A,t}} + \epsilon)
        \end{aligned}

    Zhang & Pilanci (2024), Alg. 2 (scaled AdamW). ``D`` by :func:`~lowrank_geom.strategies.scaled_gd.scaled_gradient`
    (QR-free: a Gram GEMM, an r×r float64 inverse, an m×r×r GEMM); state ``exp_avg``,
    ``exp_avg_sq`` (m×r each). The elementwise normalization makes it
    non-invariant even to scalar gauges (it is scale-free in the gradient, but ``δA`` then fails
    to scale with ``A``); it is here as the paper's comparison method.
    """

    name = "scaled_adam"
    invariance = "none"
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, delta=0.0, weight_decay=0.0)

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # every hyperparameter: one r×r Gram per factor through row_reduce, element-wise otherwise
        return []

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        check_non_negative("delta", hp["delta"])
        check_weight_decay(hp["weight_decay"])

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        def side(x: torch.Tensor) -> State:
            return {"exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x)}

        return side(a), side(b)

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        deltas, states = [], []
        ws = batch.workspace
        for side, grad, other, state in (
            ("a", batch.grad_a, batch.b, batch.state_a),
            ("b", batch.grad_b, batch.a, batch.state_b),
        ):
            d = scaled_gradient(
                grad, other, hp["delta"], batch.row_reduce, workspace_like(ws, "direction_" + side, grad)
            )
            direction, m, v = adam_direction(
                d,
                state["exp_avg"],
                state["exp_avg_sq"],
                batch.step,
                hp["betas"],
                hp["eps"],
                out=(workspace_like(ws, "exp_avg_" + side, grad), workspace_like(ws, "exp_avg_sq_" + side, grad)),
            )
            deltas.append(direction)
            states.append({"exp_avg": m, "exp_avg_sq": v})
        # A ← A(1 − ηλ) − η·m̂/(√v̂ + ε): applied by the driver's in-place update
        lr, wd = hp["lr"], hp["weight_decay"]
        return PairUpdate(deltas[0], deltas[1], states[0], states[1], scale=-lr, decay=lr * wd if wd else 0.0)
