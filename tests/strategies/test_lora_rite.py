"""LoRA-RITE: the pure functions, the numerical safeguards, and a cross-check with an outside implementation."""

from __future__ import annotations

import pytest
import torch

from lowrank_geom import LoRARITE, eigenvalue_distance
from lowrank_geom.strategies.lora_rite import (
    accumulate_second_moment,
    escaped_mass,
    preconditioned_direction,
    skip_large,
)


def test_escaped_mass_follows_the_sorted_eigenvalue_drop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    v = x.mT @ x
    p = torch.linalg.qr(torch.randn(3, 4, 4, generator=g, dtype=torch.float64))[0][..., :, :3]
    p = torch.cat([p, torch.zeros(3, 4, 1, dtype=torch.float64)], dim=-1)  # a contraction dropping mass
    vt = p @ v @ p.mT
    rho = escaped_mass(torch.zeros(3, dtype=torch.float64), v, vt, None)
    expected = (torch.linalg.eigvalsh(v) - torch.linalg.eigvalsh(vt)).amax(-1).clamp_min(0)
    torch.testing.assert_close(rho, expected)
    assert (rho > 0).all()
    decay = torch.full((3,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(escaped_mass(rho, v, vt, decay), 0.5 * (rho + eigenvalue_distance(v, vt)))


def test_skip_large_zeroes_only_the_loud_factors():
    gbar = torch.stack([torch.full((4, 2), 0.5), torch.full((4, 2), 2.0)])
    out = skip_large(gbar, 1.0)
    assert torch.equal(out[0], gbar[0]) and torch.equal(out[1], torch.zeros(4, 2))


def test_indefinite_second_moment_gives_a_finite_direction():
    """Round-off can push an eigenvalue of a rank-deficient V̄ below zero; the clamp keeps the step finite."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 16, 1, generator=g)
    v = u @ u.mT
    q = torch.linalg.eigh(v)[1]
    v = v - 1e-9 * q[..., :, :1] @ q[..., :, :1].mT  # one eigenvalue now slightly negative
    assert torch.linalg.eigvalsh(v).min() < 0
    gbar = torch.randn(1, 8, 16, generator=g)
    out = preconditioned_direction(gbar, v, 0.0, 1e-6)
    assert torch.isfinite(out).all()
    # without the clamp the same formula is NaN: this is what the safeguard prevents
    lam, vec = torch.linalg.eigh(v)
    unclamped = gbar @ (vec * (1 / (lam.sqrt() + 1e-6)).unsqueeze(-2)) @ vec.mT
    assert torch.isnan(unclamped).any()


def test_rank_one_gradients_at_r16_never_lose_a_step():
    """The authors' code loses the first steps here (NaN → zeroed step); every step must move A."""
    g = torch.Generator().manual_seed(2)
    a = (0.1 * torch.randn(64, 16, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(48, 16, generator=g)).requires_grad_()
    opt = LoRARITE([(a, b)], lr=1e-2)
    for t in range(16):
        u = torch.randn(64, 1, generator=g)
        w = torch.randn(48, 1, generator=g)
        before = a.detach().clone()
        opt.zero_grad()
        (1e-2 * (u @ w.T) * (a @ b.T)).sum().backward()  # ∇Z = 1e-2 u wᵀ: rank one
        opt.step()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert not torch.equal(a, before), f"step {t} was lost"


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e5, 1e7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_rank_deficient_factors_take_finite_steps(cond, dtype):
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 4, dtype=torch.float64)
    a = (u * s).to(dtype).requires_grad_()
    b = torch.randn(12, 4, generator=g, dtype=dtype).requires_grad_()
    target = 0.1 * torch.randn(20, 12, generator=g, dtype=dtype)
    opt = LoRARITE([(a, b)], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (0.5 * (a @ b.T - target).pow(2).sum()).backward()
        opt.step()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_bf16_end_to_end_decreases_the_loss():
    g = torch.Generator().manual_seed(4)
    a = torch.zeros(32, 4, dtype=torch.bfloat16, requires_grad=True)
    b = (0.3 * torch.randn(24, 4, generator=g)).to(torch.bfloat16).requires_grad_()
    target = (0.1 * torch.randn(32, 4, generator=g) @ torch.randn(4, 24, generator=g)).to(torch.bfloat16)
    opt = LoRARITE([(a, b)], lr=2e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = 0.5 * (a.float() @ b.float().T - target.float()).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert a.dtype == torch.bfloat16 and torch.isfinite(a.float()).all()
    assert losses[-1] < 0.3 * losses[0]


def test_sum_mode_is_the_running_sum():
    v = torch.eye(2).expand(3, 2, 2)
    inc = 2 * torch.eye(2).expand(3, 2, 2)
    torch.testing.assert_close(accumulate_second_moment(v, inc, None), 3 * torch.eye(2).expand(3, 2, 2))


@pytest.mark.parametrize("zero_init", [False, True])
def test_matches_pytorch_optimizer_lora_rite(zero_init):
    """An outside implementation of the authors' algorithm (pytorch-optimizer's LoRARite) agrees.

    Differences allowed: it adds eps² inside the root (1e-12 against eigenvalues ≥ 1e-6 here, a
    relative change below 1e-8) and runs QR without sign canonicalization (absorbed by the basis
    transport in exact arithmetic). float64, 30 steps: agreement to 1e-7 relative leaves a wide
    margin over both effects while any algorithmic difference shows at 1e-2 or more.
    """
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    g = torch.Generator().manual_seed(5)
    shapes = [(10, 8, 3), (10, 8, 3), (7, 12, 2)]
    init = []
    for m, n, r in shapes:
        a = torch.zeros(m, r, dtype=torch.float64) if zero_init else 0.3 * torch.randn(m, r, generator=g, dtype=torch.float64)
        init.append((a, 0.3 * torch.randn(n, r, generator=g, dtype=torch.float64)))
    targets = [0.2 * torch.randn(m, n, generator=g, dtype=torch.float64) for m, n, _ in shapes]
    ours = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    theirs = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    opt = LoRARITE(ours, lr=2e-2, weight_decay=0.01)
    # alternating order; both factors keep r in the last dim
    ref = pytorch_optimizer.LoRARite([t for p in theirs for t in p], lr=2e-2, weight_decay=0.01, lora_l_dim=-1, lora_r_dim=-1)
    for _ in range(30):
        for pairs, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            sum(0.5 * (a @ b.T - t).pow(2).sum() + 0.05 * (a @ b.T).sin().sum() for (a, b), t in zip(pairs, targets)).backward()
            o.step()
    for (a, b), (a2, b2) in zip(ours, theirs):
        torch.testing.assert_close(a @ b.T, a2 @ b2.T, rtol=1e-7, atol=1e-9)
    moved = sum((a @ b.T - a0 @ b0.T).norm() for (a, b), (a0, b0) in zip(ours, init))
    assert moved > 1e-2
