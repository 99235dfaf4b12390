r"""LoRA-RITE (Yen et al., ICLR 2025, arXiv 2410.20625): Algorithm 1, for A and symmetrically for B.

Every function is batched over a leading pair dim ``P`` and named after the paper's quantity.
The A side reads the B factor's basis and magnitude (``B = U_B R_B``) and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch

from lowrank_geom.geometry import (
    basis_transport,
    eigenvalue_distance,
    inverse_root,
    magnitude_pinv,
    norm_balance,
    orthonormal_basis,
    symmetrize,
    transport_first_moment,
    transport_second_moment,
)
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
)


def unmagnified_grad(grad: torch.Tensor, r_pinv_other: torch.Tensor) -> torch.Tensor:
    """``∇̄A = ∇A R_B⁻¹`` (Alg. 1 line 5; ``R⁻¹`` is the pseudo-inverse ``R⁺``). ``(P, m, r)``."""
    return grad @ r_pinv_other


def skip_large(gbar: torch.Tensor, threshold: float) -> torch.Tensor:
    """Update skipping (authors' code): ``∇̄ = 0`` for a factor whose RMS exceeds ``threshold``."""
    return torch.where(expand(rms(gbar) > threshold, gbar), torch.zeros_like(gbar), gbar)


def second_moment_increment(gbar: torch.Tensor, row_normalize: bool) -> torch.Tensor:
    """``∇̄ᵀ∇̄`` (Alg. 1 line 7), divided by the row count with ``row_normalize`` (authors' code)."""
    s = symmetrize(gbar.mT @ gbar)
    return s / gbar.shape[-2] if row_normalize else s


def accumulate_second_moment(
    v_transported: torch.Tensor, increment: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """``V̄_t = P V̄_{t−1} Pᵀ + ∇̄ᵀ∇̄`` (paper, ``decay=None``) or its EMA ``d·P V̄ Pᵀ + (1−d)·∇̄ᵀ∇̄``."""
    if decay is None:
        return v_transported + increment
    d = expand(decay, increment)
    return symmetrize(d * v_transported + (1.0 - d) * increment)


def escaped_mass(
    rho: torch.Tensor, v_old: torch.Tensor, v_transported: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """``ρ_t = ρ_{t−1} + d_λ(V̄_{t−1}, P V̄_{t−1} Pᵀ)`` (Alg. 1 line 8); EMA mode decays it with V̄."""
    rho = rho + eigenvalue_distance(v_old, v_transported).to(rho.dtype)
    return rho if decay is None else decay.to(rho.dtype) * rho


def preconditioned_direction(
    gbar: torch.Tensor, v: torch.Tensor, rho: torch.Tensor | float, eps: float
) -> torch.Tensor:
    """``S̄ = ∇̄ (V̄ + ρI)^{-1/2}`` (Alg. 1 line 9), as ``Q diag(1/(√(λ+ρ) + ε)) Qᵀ`` with λ clamped at 0."""
    return gbar @ inverse_root(v, 2, shift=rho, eps=eps).to(gbar.dtype)


def accumulate_first_moment(
    m_transported: torch.Tensor, direction: torch.Tensor, decay: torch.Tensor | float
) -> torch.Tensor:
    """``M̄_t = β₁ M̄_{t−1} Pᵀ + (1 − β₁) S̄_t`` (Alg. 1 line 10); ``decay`` is β₁ or its bias-corrected form."""
    d = expand(decay, direction) if isinstance(decay, torch.Tensor) else decay
    return d * m_transported + (1.0 - d) * direction


def cap_update(m: torch.Tensor, cap: float) -> torch.Tensor:
    """Update capping (authors' code): ``M / max(1, RMS(M)/cap)``."""
    return m / expand(torch.clamp(rms(m) / cap, min=1.0), m)


def magnitude_restoration(m: torch.Tensor, r_pinv_other: torch.Tensor) -> torch.Tensor:
    """``δA = M̄ R_B⁻ᵀ`` (Alg. 1 line 11, before the learning rate). ``(P, m, r)``."""
    return m @ r_pinv_other.mT


@register
class LoRARITEStrategy(Strategy):
    r"""LoRA-RITE: transformation-invariant adaptive matrix preconditioning of LoRA factors.

    For the A factor (B symmetrically, with the roles of A and B swapped):

    .. math::
        \begin{aligned}
        B_t &= U_{B,t} R_{B,t} && \text{(QR, or polar with basis="polar")}\\
        \bar\nabla A_t &= \nabla A_t\, R_{B,t}^{-1} && \text{(unmagnified gradient)}\\
        P_{A,t} &= U_{B,t}^\top U_{B,t-1} && \text{(basis transport)}\\
        \bar V_{A,t} &= P_{A,t} \bar V_{A,t-1} P_{A,t}^\top + \bar\nabla A_t^\top \bar\nabla A_t\\
        \rho_{A,t} &= \rho_{A,t-1} + d_\lambda(\bar V_{A,t-1}, P_{A,t} \bar V_{A,t-1} P_{A,t}^\top)\\
        \bar S_{A,t} &= \bar\nabla A_t (\bar V_{A,t} + \rho_{A,t} I)^{-1/2}\\
        \bar M_{A,t} &= \beta_1 \bar M_{A,t-1} P_{A,t}^\top + (1-\beta_1) \bar S_{A,t}\\
        A_{t+1} &= A_t - \eta_t\, \bar M_{A,t} R_{B,t}^{-\top}
        \end{aligned}

    Defaults reproduce the authors' published PyTorch code: ``second_moment="ema"`` with
    ``bias_correction`` (decay ``β(1−β^k)/(1−β^{k+1})`` for both moments and ρ), ``row_normalize``
    (``∇̄ᵀ∇̄ / rows``), ``eps`` outside the root, ``escape=False``, update skipping at RMS 1 and
    global clipping of the unmagnified gradients at norm 1 over the pairs of a param group,
    lr-coupled weight decay after magnitude restoration. ``escape=True, second_moment="sum",
    bias_correction=False, row_normalize=False, clip_unmagnified_grad=0, update_skipping=0``
    is the paper's Algorithm 1. One departure: eigenvalues of V̄ are clamped at 0, so round-off
    never turns a step into NaN (the authors' code then zeroes the whole step).
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
        balance=False,
        basis="qr",
    )

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        check_weight_decay(hp["weight_decay"])
        for key in ("clip_unmagnified_grad", "update_skipping", "update_capping"):
            check_non_negative(key, hp[key])
        check_choice("second_moment", hp["second_moment"], ("ema", "sum"))
        check_choice("basis", hp["basis"], ("qr", "polar"))
        for key in ("escape", "bias_correction", "row_normalize", "balance"):
            check_choice(key, hp[key], (True, False))

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        def side(x: torch.Tensor) -> State:
            r = x.shape[-1]
            s = {
                "exp_avg": torch.zeros_like(x),
                "second_moment": x.new_zeros(r, r),
                # zero basis: the first transport is P = 0, so the (zero) moments start afresh
                "basis": torch.zeros_like(x),
            }
            if hp["escape"]:
                s["escaped_mass"] = x.new_zeros(())
            return s

        return side(a), side(b)

    def update(self, batches: list[PairBatch], hp: dict[str, Any]) -> list[PairUpdate]:
        # Phase 1: bases, magnitudes and unmagnified gradients of every batch, so the global
        # clipping norm can be reduced over all pairs of the group before any moment is touched.
        prepared = []
        sq_norm = None
        for batch in batches:
            u_a, r_a = orthonormal_basis(batch.a, hp["basis"])
            u_b, r_b = orthonormal_basis(batch.b, hp["basis"])
            rinv_a = magnitude_pinv(r_a, rows=batch.a.shape[-2])
            rinv_b = magnitude_pinv(r_b, rows=batch.b.shape[-2])
            gbar_a = unmagnified_grad(batch.grad_a, rinv_b)
            gbar_b = unmagnified_grad(batch.grad_b, rinv_a)
            if hp["update_skipping"] > 0:
                gbar_a = skip_large(gbar_a, hp["update_skipping"])
                gbar_b = skip_large(gbar_b, hp["update_skipping"])
            part = torch.linalg.vector_norm(gbar_a).square() + torch.linalg.vector_norm(gbar_b).square()
            sq_norm = part if sq_norm is None else sq_norm + part.to(sq_norm)
            prepared.append((u_a, u_b, rinv_a, rinv_b, gbar_a, gbar_b))

        clip = hp["clip_unmagnified_grad"]
        scale = None
        if clip > 0 and sq_norm is not None:
            norm = sq_norm.sqrt()
            scale = torch.where(norm > clip, clip / norm, torch.ones_like(norm))

        out = []
        for batch, (u_a, u_b, rinv_a, rinv_b, gbar_a, gbar_b) in zip(batches, prepared):
            if scale is not None:
                gbar_a = gbar_a * scale.to(gbar_a)
                gbar_b = gbar_b * scale.to(gbar_b)
            new_a, delta_a = self._side(batch.a, gbar_a, batch.state_a, batch.state_b["basis"], u_b, rinv_b, batch.step, hp)
            new_b, delta_b = self._side(batch.b, gbar_b, batch.state_b, batch.state_a["basis"], u_a, rinv_a, batch.step, hp)
            new_a["basis"], new_b["basis"] = u_a, u_b
            if hp["balance"]:
                a1, b1 = norm_balance(batch.a + delta_a, batch.b + delta_b)
                delta_a, delta_b = a1 - batch.a, b1 - batch.b
            out.append(PairUpdate(delta_a, delta_b, new_a, new_b))
        return out

    @staticmethod
    def _side(
        x: torch.Tensor,
        gbar: torch.Tensor,
        state: State,
        basis_other_old: torch.Tensor,
        basis_other: torch.Tensor,
        rinv_other: torch.Tensor,
        step: torch.Tensor,
        hp: dict[str, Any],
    ) -> tuple[State, torch.Tensor]:
        """One factor's moments and update; returns (new state without basis, delta)."""
        beta1, beta2 = hp["betas"]
        ema = hp["second_moment"] == "ema"
        if hp["bias_correction"]:
            d1 = bias_corrected_decay(beta1, step)
            d2 = bias_corrected_decay(beta2, step)
        else:
            d1 = torch.full_like(step, beta1, dtype=torch.float64)
            d2 = torch.full_like(step, beta2, dtype=torch.float64)
        p = basis_transport(basis_other, basis_other_old)
        v_old = state["second_moment"]
        v_transported = transport_second_moment(v_old, p)
        v = accumulate_second_moment(
            v_transported, second_moment_increment(gbar, hp["row_normalize"]), d2 if ema else None
        )
        new = {"second_moment": v}
        rho: torch.Tensor | float = 0.0
        if hp["escape"]:
            rho = escaped_mass(state["escaped_mass"], v_old, v_transported, d2 if ema else None)
            new["escaped_mass"] = rho
        s_bar = preconditioned_direction(gbar, v, rho, hp["eps"])
        m = accumulate_first_moment(transport_first_moment(state["exp_avg"], p), s_bar, d1)
        new["exp_avg"] = m
        if hp["update_capping"] > 0:
            m = cap_update(m, hp["update_capping"])
        direction = magnitude_restoration(m, rinv_other)
        if hp["weight_decay"] != 0:
            direction = direction + hp["weight_decay"] * x
        return new, -hp["lr"] * direction
