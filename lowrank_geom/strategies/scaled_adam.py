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
    check_choice,
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
    correction: str = "adam",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam's direction over ``d`` elementwise; returns (direction, m, v).

    ``correction``: ``"adam"``, ``m̂ / (√v̂ + ε)`` (Kingma & Ba, Alg. 1); ``"step_size"``,
    ``m / (√v + ε) · √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` (the correction folded into the step size, as in
    BERT's and Zhang & Pilanci's AdamW: ε then acts as ``ε / √(1 − β₂ᵗ)`` against ``√v̂``);
    ``"none"``, ``m / (√v + ε)``. No m×r temporary: ``m`` by ``lerp`` and ``v`` by
    ``mul``/``addcmul_`` (into ``out`` when given), the direction in place over ``d``, which is
    overwritten.
    """
    beta1, beta2 = betas
    out_m, out_v = out if out is not None else (None, None)
    m = torch.lerp(exp_avg, d, 1.0 - beta1, out=out_m)
    v = torch.mul(exp_avg_sq, beta2, out=out_v).addcmul_(d, d, value=1.0 - beta2)
    if correction == "none":
        return torch.div(m, torch.sqrt(v, out=d).add_(eps), out=d), m, v
    t = step.to(torch.float64) + 1.0
    c1 = expand(1.0 - beta1**t, d)
    if correction == "step_size":
        direction = torch.div(m, torch.sqrt(v, out=d).add_(eps), out=d)
        return direction.mul_(expand((1.0 - beta2**t).sqrt(), d)).div_(c1), m, v
    if correction != "adam":
        raise ValueError(f"Invalid correction: {correction!r} (expected 'adam', 'step_size' or 'none')")
    c2 = expand((1.0 - beta2**t).rsqrt(), d)
    direction = torch.sqrt(v, out=d).mul_(c2).add_(eps)
    return torch.div(m, direction, out=direction).div_(c1), m, v


def _correction(hp: dict[str, Any]) -> str:
    """The bias correction of :func:`adam_direction` that ``hp`` selects."""
    if not hp["bias_correction"]:
        return "none"
    return "step_size" if hp["reference"] else "adam"


def scaled_adam_side(
    batch: PairBatch, side: str, grad: torch.Tensor, other: torch.Tensor, state: State, hp: dict[str, Any]
) -> tuple[torch.Tensor, State]:
    """One factor's Adam direction over its scaled gradient ``∇X (YᵀY + δI)⁻¹`` (``other = Y``) and its new state."""
    ws = batch.workspace
    d = scaled_gradient(grad, other, hp["delta"], batch.row_reduce, workspace_like(ws, "direction_" + side, grad))
    direction, m, v = adam_direction(
        d,
        state["exp_avg"],
        state["exp_avg_sq"],
        batch.step,
        hp["betas"],
        hp["eps"],
        out=(workspace_like(ws, "exp_avg_" + side, grad), workspace_like(ws, "exp_avg_sq_" + side, grad)),
        correction=_correction(hp),
    )
    return direction, {"exp_avg": m, "exp_avg_sq": v}


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

    ``reference=True`` is the authors' code (``AdamWr``): the factor PEFT calls ``lora_A`` (``B``
    here) steps first, ``B_{t+1} = (B_t − η u_B)(1 − ηλ)``, and ``A`` is scaled by the Gram of
    that updated ``B_{t+1}``; with ``bias_correction`` the correction is folded into the step size
    (``correction="step_size"`` of :func:`adam_direction`). ``bias_correction=False`` drops it
    (their default, ``correct_bias=False``). Their damping and ε are ``delta=1e-6, eps=1e-6``.
    """

    name = "scaled_adam"
    invariance = "none"
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, delta=0.0, weight_decay=0.0, bias_correction=True, reference=False)

    def row_sharding_requirements(self, hp: dict[str, Any], dtype: torch.dtype | None = None) -> list[str]:
        # every hyperparameter: one r×r Gram per factor through row_reduce, element-wise otherwise
        return []

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        check_non_negative("delta", hp["delta"])
        check_weight_decay(hp["weight_decay"])
        for key in ("bias_correction", "reference"):
            check_choice(key, hp[key], (True, False))

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        def side(x: torch.Tensor) -> State:
            return {"exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x)}

        return side(a), side(b)

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        lr, wd = hp["lr"], hp["weight_decay"]
        if not hp["reference"]:
            dir_a, state_a = scaled_adam_side(batch, "a", batch.grad_a, batch.b, batch.state_a, hp)
            dir_b, state_b = scaled_adam_side(batch, "b", batch.grad_b, batch.a, batch.state_b, hp)
            # A ← A(1 − ηλ) − η·m̂/(√v̂ + ε): applied by the driver's in-place update
            return PairUpdate(dir_a, dir_b, state_a, state_b, scale=-lr, decay=lr * wd if wd else 0.0)
        # AdamWr: X ← X − η u, then X ← X(1 − ηλ), i.e. X(1 − ηλ) − η(1 − ηλ) u; B (lora_A) first,
        # and A's scaled gradient reads the B it has just written
        keep = 1.0 - lr * wd
        dir_b, state_b = scaled_adam_side(batch, "b", batch.grad_b, batch.a, batch.state_b, hp)
        b_next = (batch.b - lr * dir_b) * keep
        dir_a, state_a = scaled_adam_side(batch, "a", batch.grad_a, b_next, batch.state_a, hp)
        return PairUpdate(dir_a, dir_b, state_a, state_b, scale=-lr * keep, decay=lr * wd if wd else 0.0)
