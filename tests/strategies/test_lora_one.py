"""LoRA-One's update (``strategy="lora_one"``): what the generic suites do not check.

Per-step agreement with the float64 NumPy transcription of the paper's Algorithm 1 and of the
authors' released optimizer is in ``tests/strategies/test_against_reference.py`` (cases
``lora_one*``; the transcription is ``tests/reference/lora_one.py``).

Agreement with the authors' code: their ``AdamWr`` (``prec_logTrainer.py`` of
``YuanheZ/LoRA-One`` at commit a607f607349f7b19ca27563eaae7d8d0e6db1806, the preconditioned
optimizer they released, removed from the repository later) was run outside the repository
against ``strategy="lora_one", reference=True, relative_step_cap=0`` on a PEFT model (a 12-10-8-3
MLP, rank 2 on two layers, rsLoRA α = 16, LoRA-One init with γ = 4), float64, lr 1e-2,
``prec_reg``/damping 1e-6, weight decay 0.01, betas (0.9, 0.999), cross-entropy on batches of 16:
the largest relative difference of any LoRA factor after 1, 5 and 10 steps was 1.9e-16, 3.9e-16
and 8.5e-16 (round-off). Algorithm 1 itself (``reference=False``, preconditioned gradient
descent) has no released implementation to compare with.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_geom import LowRankOptimizer
from lowrank_geom.strategies.lora_one import damped_direction
from tests.strategies.peft_batch_of_one import final_loss


def test_damped_direction_solves_the_damped_system():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    other = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    d = damped_direction(grad, other, 0.3)
    # D (BᵀB + λI) = ∇A; 1e-12: one float64 Cholesky solve of a cond < 1e2 system
    lhs = d @ (other.mT @ other + 0.3 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(lhs, grad, rtol=1e-12, atol=1e-12)


def test_relative_step_cap_bounds_a_tiny_direction_jump():
    """B full rank, A tiny (3e-3) along one direction, above √λ = 1e-3: ``(AᵀA + λI)⁻¹`` makes B's
    plain step there 8 times B itself; the cap bounds every factor's relative change by 1."""
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    a0 = q * torch.tensor([1.0, 0.5, 3e-3], dtype=torch.float64)
    b0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    target = torch.randn(20, 16, generator=g, dtype=torch.float64)

    def relative_change(cap):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = LowRankOptimizer([(a, b)], strategy="lora_one", lr=1e-2, relative_step_cap=cap)
        (a @ b.T - target).pow(2).sum().backward()
        opt.step()
        # largest singular value of (X₊ − X) X⁺ over both factors
        return max(
            torch.linalg.matrix_norm((x.detach() - x0) @ torch.linalg.pinv(x0), ord=2) for x, x0 in ((a, a0), (b, b0))
        )

    # 1e-9: float64 round-off of the capped step measured through the pinv of a cond-300 factor
    assert relative_change(1.0) <= 1.0 + 1e-9
    assert relative_change(0.0) > 5.0  # measured 8.1


@pytest.mark.slow
def test_bf16_peft_batch_of_one_trains_like_adamw():
    """PEFT gaussian init (lora_B = 0), batches of one example (rank-one gradients), bfloat16,
    lr 1e-2 at the defaults: the loss ends within 1.5× of AdamW's at 1e-3 (measured: 1.85 vs 1.98;
    undamped ScaledGD without its cap ends at ~14, ``tests/strategies/test_scaled_gd.py``)."""
    pytest.importorskip("peft")
    final, reference = final_loss("lora_one"), final_loss("adamw")
    assert final <= 1.5 * reference, (final, reference)
