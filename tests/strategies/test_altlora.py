"""AltLoRA: its float64 reference and the agreement with the authors' code.

The package is compared with the independent NumPy transcription ``tests/reference/altlora.py``
(written in the paper's orientation ``W = B A`` from its Algorithm 1, ``A`` r×n moving on even
steps, converted only at its boundary) after every one of 50 float64 steps, both factors and both
momenta, by ``tests/strategies/test_against_reference.py`` (ids ``altlora*``: defaults, the paper's
update with Corollary 1's Tikhonov term and the decay, no bias correction, no momentum, a cap that
acts, and ``alternate=False`` with and without the authors' Tikhonov term and decay).

Agreement with the authors' code (``optimizer_new.py``, class ``altlora``, of LucasXinYu/AltLoRA
at commit 94b219882abcaa6004d2029fd8a09cd190a8a9aa), run in float64 on a one-layer PEFT-layout
model (``lora_A`` 6×12, ``lora_B`` 10×6 random, r = 6; quadratic loss ``0.5‖BA − T‖²``), lr 0.01,
betas (0.9, 0.999), reg 1e-5, weight_decay 1e-5, correct_bias True, both gradients given to it every
step, against ``strategy="altlora"`` with ``alternate=False, beta=0.9, delta=1e-5,
weight_decay=1e-5, relative_step_cap=0``: after 20 steps the largest relative difference (max-abs
difference over max-abs entry) of either factor is 1.4e-15, and 1.4e-14 from ``lora_B = 0``
(PEFT's init). Fed only ``lora_A``'s gradient on even steps and only ``lora_B``'s on odd ones
(their trainer's freezing, Appendix C.1), their class matches the default ``alternate=True`` with
``weight_decay=0`` to 1.6e-15 (1.0e-14 from ``lora_B = 0``); with ``weight_decay=1e-5`` the two
decay orders differ at O(η²λ), 3e-8 (1e-7). Script: their class imported unchanged, both optimizers fed
the same losses, outside this repository.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_geom import LowRankOptimizer
from tests.reference.altlora import run_altlora
from tests.reference.problems import quadratic_problem
from tests.strategies.test_scaled_gd import _tiny_direction_pair


@pytest.mark.parametrize("alternate", [True, False])
def test_the_reference_is_gl_invariant(alternate):
    """The transcription itself (no cap, δ = 0): ``(A G, B G⁻ᵀ)`` gives the same ``Z`` trajectory."""
    As, Bs, grad_fn = quadratic_problem(m=8, n=6, r=2, seed=4)
    rng = np.random.default_rng(0)
    gauges = [rng.standard_normal((2, 2)) + 2 * np.eye(2) for _ in As]
    ref = run_altlora(As, Bs, grad_fn, 20, lr=0.05, relative_step_cap=0.0, alternate=alternate)
    As_g = [a @ g for a, g in zip(As, gauges)]
    Bs_g = [b @ np.linalg.inv(g).T for b, g in zip(Bs, gauges)]
    gauged = run_altlora(As_g, Bs_g, grad_fn, 20, lr=0.05, relative_step_cap=0.0, alternate=alternate)
    for r1, r2 in zip(ref, gauged):
        for p1, p2 in zip(r1, r2):
            # cond(G) < 10: round-off ~1e-15 · cond amplified over 20 steps stays < 1e-11
            np.testing.assert_allclose(p2["Z"], p1["Z"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alternate", [True, False])
def test_first_move_from_peft_init_is_one_scaled_gradient_step_of_a(alternate):
    """From ``A = 0`` (PEFT's ``lora_B``) ``∇B = 0``, so ``B`` stays, and with bias correction
    ``η₁ (1 − β) = η``: A's first move is ScaledGD's ``A₁ = −η ∇A (BᵀB)⁻¹``, with no momentum
    history to realign. Algorithm 1 (``alternate=True``) moves only ``B`` on the first step (a
    zero step, preconditioned by ``A = 0``) and ``A`` on the second, with that step's gradient;
    ``alternate=False`` moves ``A`` on the first. Float64 solve vs the package's Cholesky route on
    a cond < 10 Gram: 1e-12."""
    g = torch.Generator().manual_seed(5)
    a = torch.zeros(9, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 7, generator=g, dtype=torch.float64)
    b0 = b.detach().clone()
    opt = LowRankOptimizer([(a, b)], strategy="altlora", lr=0.1, beta=0.9, relative_step_cap=0.0, alternate=alternate)
    for step in range(2 if alternate else 1):
        opt.zero_grad()
        (0.5 * (a @ b.T - target).pow(2).sum()).backward()
        expected = -0.1 * torch.linalg.solve(b0.T @ b0, a.grad.T).T
        opt.step()
        if alternate and step == 0:
            assert torch.equal(a.detach(), torch.zeros_like(a)) and torch.equal(b.detach(), b0)
    torch.testing.assert_close(a.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(b.detach(), b0)


def test_alternate_moves_one_factor_per_step_with_its_own_gradient():
    """Algorithm 1: B (the paper's A) moves on even steps and A on odd ones; the other factor and
    its momentum stay, and each move uses the gradient of its own step."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(8, 6, generator=g, dtype=torch.float64)
    opt = LowRankOptimizer([(a, b)], strategy="altlora", lr=0.05, relative_step_cap=0.0)
    for step in range(4):
        opt.zero_grad()
        (0.5 * (a @ b.T - target).pow(2).sum()).backward()
        none = torch.zeros((), dtype=torch.float64)
        before = {x: (x.detach().clone(), opt.state[x].get("exp_avg", none).clone()) for x in (a, b)}
        opt.step()
        moving, fixed = (b, a) if step % 2 == 0 else (a, b)
        assert not torch.equal(moving.detach(), before[moving][0])
        assert torch.equal(fixed.detach(), before[fixed][0])
        if step > 0:
            assert torch.equal(opt.state[fixed]["exp_avg"], before[fixed][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_step_cap_bounds_each_factors_relative_change(dtype):
    """A tiny direction of ``A`` makes ``(AᵀA)⁻¹`` blow up ``B``'s step (PEFT's first steps, or
    bfloat16 rounding); the cap keeps every factor's relative change at most 1 (ScaledGD's
    safeguard, the same pair)."""
    a, b, target = _tiny_direction_pair(dtype)

    def largest_relative_change(cap):
        x = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        opt = LowRankOptimizer([tuple(x)], strategy="altlora", lr=1e-2, relative_step_cap=cap)
        worst = 0.0
        for _ in range(3):  # B, A, then B again with a momentum built from its capped first move
            opt.zero_grad()
            (x[0] @ x[1].T - target).pow(2).sum().backward()
            before = [t.detach().double().clone() for t in x]
            opt.step()
            for x0, x1 in zip(before, x):
                change = (x1.detach().double() - x0) @ torch.linalg.pinv(x0)
                worst = max(worst, torch.linalg.svdvals(change).max().item())
        return worst

    # 1e-3: float32 rounding of the capped step, measured through pinv of a cond-300 factor
    assert largest_relative_change(1.0) <= 1.0 + (1e-3 if dtype == torch.float32 else 1e-9)
    assert largest_relative_change(0.0) > 5.0
