"""LoRA-One's update (``strategy="lora_one"``): what the generic suites do not check.

Per-step agreement with the float64 NumPy transcription of the preconditioned update and of the
authors' released optimizer is in ``tests/strategies/test_against_reference.py`` (cases
``lora_one*``; the transcription is ``tests/reference/lora_one.py``).

Agreement with the authors' code: their ``AdamWr`` (``prec_logTrainer.py`` of
``YuanheZ/LoRA-One`` at commit a607f607349f7b19ca27563eaae7d8d0e6db1806, the preconditioned
optimizer they released, removed from the repository later) was run outside the repository
against ``strategy="lora_one", reference=True, relative_step_cap=0`` on a PEFT model (a 12-10-8-3
MLP, rank 2 on two layers, rsLoRA α = 16, LoRA-One init with γ = 4), float64, lr 1e-2,
``prec_reg``/damping 1e-6, weight decay 0.01, betas (0.9, 0.999), cross-entropy on batches of 16:
the largest relative difference of any LoRA factor after 1, 5 and 10 steps was 1.9e-16, 3.9e-16
and 8.5e-16 (round-off).

The default (``reference=False``) is the paper's Eq. (9) with damping. The authors' own
preconditioned gradient descent, the "Prec-GD" loop of their linear-model notebook
(``Toy_Experiments.ipynb`` of ``YuanheZ/LoRA-One`` at commit
d943951913cb630cad3889cb42f28c7c148e21cf, removed from the repository later), was run outside the
repository against ``strategy="lora_one", damping=1e-3, relative_step_cap=0`` on the notebook's
problem (d = k = 100, rank 8, target rank 4, N = 1600 Gaussian inputs, its "Spectral-init"
start, both step sizes 0.5, λ = 1e-3), in float64: the largest relative difference of either
factor after 1, 10 and 100 steps was 1.3e-16, 1.6e-15 and 1.7e-15 (round-off).
"""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_geom import LowRankOptimizer, random_gauge
from tests.strategies.peft_runs import batch_of_one_final_loss


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


def _unbalanced_float32_pair(seed=0):
    """A float32 pair gauged by ``G`` with cond(G) = 10⁴ (factors of size ~10² and ~10⁻²)."""
    g = torch.Generator().manual_seed(seed)
    a = 0.3 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    target = 0.2 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    gauge = random_gauge(3, 1e4, generator=g)
    return (a @ gauge).float(), (b @ torch.linalg.inv(gauge).T).float(), target.float()


def _losses(a0, b0, target, steps=5, **hp):
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LowRankOptimizer([(a, b)], strategy="lora_one", lr=1e-2, **hp)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (a @ b.T - target).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_unbalanced_float32_pair_trains_only_with_the_cap():
    """float32 Gram round-off (eps₃₂·‖AᵀA‖) far above λ = 1e-6: the damped Gram is indefinite
    (its Cholesky failed before the eigh-based inverse) and ``(AᵀA + λI)⁻¹`` amplifies the
    round-off into jumps of the partner; measured 3.7 → 151 in 5 steps without the cap."""
    a, b, target = _unbalanced_float32_pair()
    capped = _losses(a, b, target)
    assert all(map(math.isfinite, capped)) and capped[-1] < capped[0]
    plain = _losses(a, b, target, relative_step_cap=0.0)
    assert plain[-1] > 10 * plain[0]  # the failure the cap removes


@pytest.mark.slow
def test_bf16_peft_batch_of_one_trains_like_adamw():
    """PEFT gaussian init (lora_B = 0), batches of one example (rank-one gradients), bfloat16,
    lr 1e-2 at the defaults: the loss ends within 1.5× of AdamW's at 1e-3 (measured with and
    without the cap; 1.85 vs 1.98 without; undamped ScaledGD without its cap ends at ~14,
    ``tests/strategies/test_scaled_gd.py``)."""
    pytest.importorskip("peft")
    final = batch_of_one_final_loss("gaussian", "lora_one", 1e-2)
    reference = batch_of_one_final_loss("gaussian", None, 1e-3)
    assert final <= 1.5 * reference, (final, reference)
