r"""LoFT (Tastan et al., "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning", ICLR 2026)."""

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
    check_betas,
    check_eps,
    check_weight_decay,
    expand,
    moving_masks,
    register,
    right_multiply,
)
from lowrank_geom.strategies.scaled_gd import magnitude_inverse

#: the authors' Tikhonov terms of ``(YᵀY + δI)⁻¹`` (``reference=True``): their ``lora_B`` (our A)
#: is scaled with the Gram of B plus 1e-8·I, their ``lora_A`` (our B) with the Gram of A plus 1e-6·I
REFERENCE_DELTA = {"a": 1e-8, "b": 1e-6}


def partner_maps(
    y: torch.Tensor, y_prev: torch.Tensor, delta: float, row_reduce=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = (YᵀY)⁺`` and the calibration ``C = Y_prevᵀ Y S`` of the partner ``Y``; float64 ``(P, r, r)``.

    ``δ = 0``: the filtered pseudo-inverse (a zero partner gives ``S = 0``, hence zero scaled
    gradients and a zero calibration); ``δ > 0``: ``(YᵀY + δI)⁻¹`` by Cholesky.
    """
    rr = row_reduce or (lambda t: t)
    g = gram(y, None, rr)
    if delta == 0:
        s = gram_pinv(magnitude_inverse(g, y.dtype))
    else:
        eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        s = torch.cholesky_inverse(torch.linalg.cholesky(g + delta * eye))
    return s, gram(y_prev, y, rr) @ s


def calibrate(m: torch.Tensor, p: torch.Tensor, c: torch.Tensor, transposed: bool = False):
    """Moments in the partner's new basis: ``m ← m C``, ``p_i ← Cᵀ p_i C`` (``C p_i Cᵀ`` if ``transposed``)."""
    c = c.to(m.dtype)
    cl, cr = (c, c.mT) if transposed else (c.mT, c)
    return right_multiply(m, c), cl[:, None] @ p @ cr[:, None]


def accumulate(m: torch.Tensor, p: torch.Tensor, g: torch.Tensor, betas: tuple[float, float]):
    """``m ← β₁m + (1−β₁)g``, ``p_i ← β₂p_i + (1−β₂) g_iᵀg_i`` per row ``g_i`` of the scaled gradient."""
    beta1, beta2 = betas
    outer = g[..., :, None] * g[..., None, :]
    return torch.lerp(m, g, 1.0 - beta1), torch.add(p * beta2, outer, alpha=1.0 - beta2)


def adam_ratio_bound(betas: tuple[float, float], step: torch.Tensor) -> torch.Tensor:
    """The largest ``|m̂|/√v̂`` that Adam's moments of one sequence can have after ``t = step + 1`` steps. ``(P,)``.

    Cauchy–Schwarz on ``m = Σ_k (1−β₁)β₁^{t−k} g_k`` against ``v = Σ_k (1−β₂)β₂^{t−k} g_k²`` gives
    ``m² ≤ v · (1−β₁)²/(1−β₂) · Σ_{j<t} q^j`` with ``q = β₁²/β₂``; bias-corrected, times
    ``√(1−β₂^t)/(1−β₁^t)``. ``inf`` when ``β₂ = 0 < β₁`` (no bound). float64.
    """
    beta1, beta2 = betas
    t = step.to(torch.float64) + 1.0
    if beta2 == 0:
        return torch.full_like(t, 1.0 if beta1 == 0 else float("inf"))
    q = beta1**2 / beta2
    geometric = t if q == 1 else (1.0 - q**t) / (1.0 - q)
    bound_sq = (1.0 - beta1) ** 2 / (1.0 - beta2) * geometric
    return bound_sq.sqrt() * (1.0 - beta2**t).sqrt() / (1.0 - beta1**t)


def full_direction(
    m: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    clamp: bool = True,
) -> torch.Tensor:
    """AdamW's full-space direction ``D = M̂ / (√V̂ + ε)``, ``M = m Yᵀ``, ``V_ij = y_j p_i y_jᵀ``. ``(P, m, n)``.

    ``V`` is the exact second moment of the full-space gradients ``g_i y_jᵀ`` while ``Y`` stays
    fixed; it is one GEMM over the ``r²`` entries of ``p_i`` and ``y_j y_jᵀ`` (clamped at 0, as the
    authors do). Safeguard: ``|D|`` is clamped at :func:`adam_ratio_bound`, which consistent
    moments never exceed (a no-op in exact arithmetic). A calibration with a large ``C`` (a
    partner with a weak direction that moved) leaves ``V_ij`` as a float32 difference of large
    terms; where it cancels to ~0 while ``M_ij`` does not, ``M/ε`` would step by ``1/ε``.
    ``clamp=False`` for the authors' calibration ``C p Cᵀ``, whose moments are not those of one
    sequence (the bound does not hold for them).
    """
    r = m.shape[-1]
    t = step.to(torch.float64) + 1.0
    c1 = expand(1.0 - betas[0] ** t, m)
    c2 = expand((1.0 - betas[1] ** t).rsqrt(), m)
    # p_i symmetric: its upper triangle (off-diagonal doubled) against y_j's, r(r+1)/2 terms
    i, j = torch.triu_indices(r, r, device=m.device)
    w = torch.where(i == j, 1.0, 2.0).to(m.dtype)
    v = ((p[..., i, j] * w) @ (y[..., i] * y[..., j]).mT).clamp_min_(0.0)
    d = (m @ y.mT).div_(c1).div_(v.sqrt_().mul_(c2).add_(eps))
    if not clamp:
        return d
    bound = expand(adam_ratio_bound(betas, step), d)
    return torch.minimum(torch.maximum(d, -bound), bound, out=d)


#: most elements of one m×n temporary: a batch's pairs are taken in chunks below it (a batch of
#: 128 pairs 4096×4096 would otherwise hold 128·4096² floats per temporary)
CHUNK_ELEMENTS = 2**24


def projected_direction(
    m: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    clamp: bool = True,
) -> torch.Tensor:
    """``D Y S`` (:func:`full_direction`) over chunks of pairs of at most :data:`CHUNK_ELEMENTS` in ``D``."""
    rows, n = m.shape[-2], y.shape[-2]
    size = max(1, CHUNK_ELEMENTS // max(1, rows * n))
    parts = [
        full_direction(m[k : k + size], p[k : k + size], y[k : k + size], step[k : k + size], betas, eps, clamp)
        @ y[k : k + size]
        for k in range(0, m.shape[0], size)
    ]
    return right_multiply(parts[0] if len(parts) == 1 else torch.cat(parts), s)


def side_update(
    grad: torch.Tensor,
    y: torch.Tensor,
    y_prev: torch.Tensor,
    state: State,
    step: torch.Tensor,
    active: torch.Tensor | None,
    hp: dict[str, Any],
    delta: float,
) -> tuple[torch.Tensor | None, State]:
    """One factor's step with partner ``Y`` (``Y_prev`` at its last step): calibrate, accumulate, and
    when some pair is ``active`` the projected direction ``D Y S`` (else None); and the new moments."""
    s, c = partner_maps(y, y_prev, delta)
    m, p = calibrate(state["exp_avg"], state["row_second_moment"], c, transposed=hp["reference"])
    m, p = accumulate(m, p, right_multiply(grad, s), hp["betas"])
    new = {"exp_avg": m, "row_second_moment": p}
    if active is None:
        return None, new
    return projected_direction(m, p, y, s, step, hp["betas"], hp["eps"], clamp=not hp["reference"]), new


def _lr_like(lr: Any, like: torch.Tensor) -> Any:
    return lr.to(like).reshape(()) if isinstance(lr, torch.Tensor) else lr


def factor_delta(
    x: torch.Tensor, direction: torch.Tensor | None, active: torch.Tensor | None, hp: dict[str, Any]
) -> torch.Tensor:
    """``δX = −η D Y S − λ' X`` on the active pairs (0 elsewhere); ``λ' = ηλ`` (AdamW), ``λ`` with ``reference``."""
    if direction is None:
        return torch.zeros_like(x)
    lr = _lr_like(hp["lr"], x)
    wd = hp["weight_decay"] if hp["reference"] else lr * hp["weight_decay"]
    delta = direction.mul(-lr)
    if hp["weight_decay"]:
        delta = delta - wd * x
    return delta * expand(active, x)


@register
class LoFTStrategy(Strategy):
    r"""LoFT: AdamW's moments of the full matrix kept in the factors' subspace, one factor per step.

    For the factor :math:`X` that moves (``A`` on even steps, ``B`` on odd ones), with partner
    :math:`Y` (``B``, resp. ``A``), :math:`S = (Y^\top Y)^{+}`, rows :math:`g_i` of the scaled
    gradient and :math:`y_j` of :math:`Y`, :math:`t` counting from 1:

    .. math::
        \begin{aligned}
        C_t &= Y_{t-1}^\top Y_t S_t, \qquad m \leftarrow m\, C_t, \qquad p_i \leftarrow C_t^\top p_i C_t
            &&\text{(state calibration)}\\
        g_t &= \nabla X_t\, S_t, \qquad m_t = \beta_1 m + (1-\beta_1) g_t, \qquad
            p_{i,t} = \beta_2 p_i + (1-\beta_2)\, g_{t,i}^\top g_{t,i} &&\text{(gradient scaling)}\\
        D_t &= \frac{m_t Y_t^\top / (1-\beta_1^t)}{\sqrt{[\,y_j\, p_{i,t}\, y_j^\top]_{ij} / (1-\beta_2^t)} + \epsilon}
            &&\text{(full AdamW direction)}\\
        X_{t+1} &= X_t (1 - \eta_t\lambda) - \eta_t\, D_t\, Y_t S_t &&\text{(projected update)}
        \end{aligned}

    Both factors' moments are calibrated and accumulated every step; only the active factor
    moves (``alternate=False``: both, each from the current point). :math:`m Y^\top` and
    :math:`[y_j p_i y_j^\top]` are the first and second moments of the full-matrix gradient
    :math:`\nabla Z\, P_Y` exactly while :math:`Y` is fixed, so with :math:`r = m = n` LoFT is
    AdamW on :math:`Z` step for step. State per factor: ``exp_avg`` (m×r), ``row_second_moment``
    (m×r×r), ``previous_factor`` (m×r). Cost per step: an m×n direction (one m×r²×n GEMM).

    Safeguard: ``|D|`` is clamped at Adam's own bound (:func:`adam_ratio_bound`; a no-op in exact
    arithmetic, it stops float32 cancellation in ``V`` from stepping by ``M/ε``; not with
    ``reference``, whose moments it does not bound).

    Invariant to every :math:`G \in GL(r)` (the scaled gradients, moments and calibration transform
    as :math:`X G`, :math:`G^\top p G`, :math:`G^{-1} C G`; :math:`D` is gauge-free).
    ``reference=True`` reproduces the authors' code (``tnurbek/loft`` 148998d): Tikhonov terms
    1e-8/1e-6 in :math:`S`, :math:`p_i \leftarrow C p_i C^\top`, weight decay :math:`\lambda` per
    step (not :math:`\eta\lambda`), and A's side reading B after B's update on B's steps; only
    invariant to orthogonal gauges only then.
    """

    name = "loft"
    invariance = "GL(r)"
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, alternate=True, reference=False)

    def moves(self, hp: dict[str, Any], step: Any) -> tuple[Any, Any]:
        # A on even step counts (its partner is the non-zero factor of a PEFT init), B on odd ones
        if not hp["alternate"]:
            return True, True
        return step % 2 == 0, step % 2 == 1

    def validate(self, hp: dict[str, Any]) -> None:
        _check_lr(hp["lr"])
        check_betas(hp["betas"])
        check_eps(hp["eps"])
        check_weight_decay(hp["weight_decay"])
        for key in ("alternate", "reference"):
            if not isinstance(hp[key], bool):
                raise ValueError(f"Invalid {key}: {hp[key]!r} (expected True or False)")

    def init(self, a: torch.Tensor, b: torch.Tensor, hp: dict[str, Any]) -> tuple[State, State]:
        def side(x: torch.Tensor) -> State:
            r = x.shape[-1]
            return {
                "exp_avg": torch.zeros_like(x),
                "row_second_moment": x.new_zeros((*x.shape[:-1], r, r)),
                "previous_factor": x.clone(),
            }

        return side(a), side(b)

    def update_batch(self, batch: PairBatch, hp: dict[str, Any]) -> PairUpdate:
        on_a, on_b = moving_masks(self, hp, batch.step)
        ref = hp["reference"]
        sa, sb = batch.state_a, batch.state_b
        # B's side first, the authors' order (their lora_A precedes lora_B); immaterial unless ``reference``
        d_b, new_b = side_update(
            batch.grad_b, batch.a, sa["previous_factor"], sb, batch.step, on_b, hp, REFERENCE_DELTA["b"] * ref
        )
        delta_b = factor_delta(batch.b, d_b, on_b, hp)
        # the authors' sequential loop shows A's side the B it has just updated
        b_seen = batch.b + delta_b if ref else batch.b
        d_a, new_a = side_update(
            batch.grad_a, b_seen, sb["previous_factor"], sa, batch.step, on_a, hp, REFERENCE_DELTA["a"] * ref
        )
        delta_a = factor_delta(batch.a, d_a, on_a, hp)
        new_a["previous_factor"] = batch.a.clone()
        new_b["previous_factor"] = b_seen.clone() if b_seen is batch.b else b_seen
        return PairUpdate(delta_a, delta_b, new_a, new_b)
