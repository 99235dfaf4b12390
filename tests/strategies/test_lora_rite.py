"""LoRA-RITE: the pure functions, the numerical safeguards, and a cross-check with an outside implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_geom import LoRARITE, LowRankOptimizer, eigenvalue_distance
from lowrank_geom.strategies.lora_rite import (
    accumulate_second_moment,
    escaped_mass,
    preconditioned_direction,
    skip_large,
)
from tests.reference.lora_rite import run_lora_rite
from tests.reference.problems import quadratic_problem


def test_escaped_mass_follows_the_sorted_eigenvalue_drop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    v = x.mT @ x
    p = torch.linalg.qr(torch.randn(3, 4, 4, generator=g, dtype=torch.float64))[0][..., :, :3]
    p = torch.cat([p, torch.zeros(3, 4, 1, dtype=torch.float64)], dim=-1)  # a contraction dropping mass
    vt = p @ v @ p.mT
    lam = torch.linalg.eigvalsh(v)
    rho = escaped_mass(torch.zeros(3, dtype=torch.float64), lam, vt, None)
    expected = (torch.linalg.eigvalsh(v) - torch.linalg.eigvalsh(vt)).amax(-1).clamp_min(0)
    torch.testing.assert_close(rho, expected)
    assert (rho > 0).all()
    decay = torch.full((3,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(escaped_mass(rho, lam, vt, decay), 0.5 * (rho + eigenvalue_distance(v, vt)))


def test_skip_large_zeroes_only_the_loud_factors():
    gbar = torch.stack([torch.full((4, 2), 0.5), torch.full((4, 2), 2.0)])
    out, keep = skip_large(gbar, 1.0)
    assert torch.equal(out[0], gbar[0]) and torch.equal(out[1], torch.zeros(4, 2))
    assert keep.tolist() == [1.0, 0.0]


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
        a = (
            torch.zeros(m, r, dtype=torch.float64)
            if zero_init
            else 0.3 * torch.randn(m, r, generator=g, dtype=torch.float64)
        )
        init.append((a, 0.3 * torch.randn(n, r, generator=g, dtype=torch.float64)))
    targets = [0.2 * torch.randn(m, n, generator=g, dtype=torch.float64) for m, n, _ in shapes]
    ours = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    theirs = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    opt = LoRARITE(ours, lr=2e-2, weight_decay=0.01)
    # alternating order; both factors keep r in the last dim
    ref = pytorch_optimizer.LoRARite(
        [t for p in theirs for t in p], lr=2e-2, weight_decay=0.01, lora_l_dim=-1, lora_r_dim=-1
    )
    for _ in range(30):
        for pairs, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            sum(
                0.5 * (a @ b.T - t).pow(2).sum() + 0.05 * (a @ b.T).sin().sum() for (a, b), t in zip(pairs, targets)
            ).backward()
            o.step()
    for (a, b), (a2, b2) in zip(ours, theirs):
        torch.testing.assert_close(a @ b.T, a2 @ b2.T, rtol=1e-7, atol=1e-9)
    moved = sum((a @ b.T - a0 @ b0.T).norm() for (a, b), (a0, b0) in zip(ours, init))
    assert moved > 1e-2


# ------------------------------------------------------------------ safeguards (numerics.rst)
def _rank_one_second_moment(dtype):
    """V̄ = ∇̄ᵀ∇̄/m for a rank-one ∇̄ carrying round-off-sized components in V̄'s null space."""
    g = torch.Generator().manual_seed(6)
    u, w = torch.randn(1, 24, 1, generator=g, dtype=dtype), torch.randn(1, 4, 1, generator=g, dtype=dtype)
    gbar = u @ w.mT + 1e3 * torch.finfo(dtype).eps * torch.randn(1, 24, 4, generator=g, dtype=dtype)
    return gbar, (gbar.mT @ u @ u.mT @ gbar) / (u.mT @ u) / 24


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unresolved_null_space_of_the_second_moment_gets_no_step(dtype):
    """A rank-one V̄: the direction must stay rank one (its second singular value at round-off).

    With ``1/(√λ + ε)`` on the unresolved eigenvalues (``null_rtol=0``, the paper's formula) the
    round-off components are amplified by ~1/ε into a second direction 1e-6 (float32) to 1e-9
    (float64) of the first: the start of the float64 blow-up of a 2-class head under PEFT's init.
    """
    from lowrank_geom.geometry import inverse_root

    gbar, v = _rank_one_second_moment(dtype)
    s = torch.linalg.svdvals(preconditioned_direction(gbar, v, 0.0, 1e-6).double())[0]
    assert s[1] <= 1e3 * torch.finfo(dtype).eps * s[0], s
    plain = torch.linalg.svdvals((gbar @ inverse_root(v, 2, eps=1e-6).to(dtype)).double())[0]
    assert plain[1] > 1e4 * torch.finfo(dtype).eps * plain[0], plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_direction_below_eigh_resolution_that_carries_the_gradient_still_moves(dtype):
    """V̄'s last eigenvalue is 1e-2 of eigh's resolution (an ill-conditioned fit's last direction
    under the history of larger gradients) and the whole current ∇̄ lies along it: the step there
    takes the floored gain ``1/(√(r·eps·λ_max) + ε)``, neither 0 (which stalled float32 fits at
    κ = 1e4) nor the plain ``1/(√λ + ε)`` (10× larger here)."""
    from lowrank_geom.geometry import eigh_resolution

    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    floor = eigh_resolution(4, dtype)
    v = (q * torch.tensor([1.0, 1.0, 1.0, 1e-2 * floor], dtype=torch.float64)) @ q.T
    gbar = torch.randn(24, 1, generator=g, dtype=torch.float64) @ q[:, 3:].T
    s_bar = preconditioned_direction(gbar.to(dtype), v.to(dtype), 0.0, 1e-6).double()
    expected = gbar / (floor**0.5 + 1e-6)
    # float32: eigh's eigenvectors are accurate to ~u/gap = 1e-7, times the gain ratio (1e3) of
    # the floored and the resolved directions: 1e-4; float64: the same at 1e-16 · 1e7
    torch.testing.assert_close(s_bar, expected, rtol=1e-4 if dtype == torch.float32 else 1e-8, atol=0.0)


def _tiny_direction_pair(dtype=torch.float64):
    """A full-rank B and an A that is tiny along one direction: the partner's plain step there is far too large.

    Tiny is 1e-6 in float64 and 1e-4 in float32: above the magnitude pseudo-inverse's cutoff
    (max(m, r)·eps·σ_max, 2.4e-6 in float32), below which a direction counts as not started."""
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    tiny = 1e-6 if dtype == torch.float64 else 1e-4
    a = q * torch.tensor([1.0, 0.5, tiny], dtype=torch.float64)
    b = torch.randn(16, 3, generator=g, dtype=torch.float64)
    target = torch.randn(20, 16, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), target.to(dtype)


def _one_step(a, b, target, **hp):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    opt = LoRARITE([(a, b)], lr=1e-2, **hp)
    (a @ b.T - target).pow(2).mean().backward()
    opt.step()
    return a.detach(), b.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_step_cap_bounds_each_factors_relative_change(dtype):
    """Singular values of ``E = δX R_X⁺`` stay ≤ cap (1); without the cap B's change is ~1e3 here."""
    a, b, target = _tiny_direction_pair(dtype)

    def relative_changes(a1, b1):
        out = []
        for x0, x1 in ((a, a1), (b, b1)):
            x0d = x0.double()
            out.append(torch.linalg.svdvals((x1.double() - x0d) @ torch.linalg.pinv(x0d)).max().item())
        return out

    capped = relative_changes(*_one_step(a, b, target))
    plain = relative_changes(*_one_step(a, b, target, relative_step_cap=0.0))
    # 1e-3: float32 rounding of the capped step, measured through pinv of a cond-1e6 factor
    assert max(capped) <= 1.0 + (1e-3 if dtype == torch.float32 else 1e-9), capped
    assert max(plain) > 100.0, plain


def test_relative_step_cap_leaves_well_conditioned_steps_bit_for_bit():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    target = 0.1 * torch.randn(12, 9, generator=g, dtype=torch.float64)
    for cap in (1.0, 0.0):
        pair = (a.clone().requires_grad_(), b.clone().requires_grad_())
        opt = LoRARITE([pair], lr=1e-3)
        opt.param_groups[0]["relative_step_cap"] = cap
        for _ in range(5):
            opt.zero_grad()
            (pair[0] @ pair[1].T - target).pow(2).mean().backward()
            opt.step()
        if cap:
            capped = [x.detach().clone() for x in pair]
    assert all(torch.equal(x, y.detach()) for x, y in zip(capped, pair))


# test_relative_step_cap_keeps_gl_r_invariance_where_it_acts: tests/strategies/test_scaled_gd.py
# (one test for both strategies that use the cap)


def test_skipped_updates_are_counted_and_announced():
    """A summed loss makes RMS(∇̄) > 1: the authors' update skipping drops every update, visibly."""
    g = torch.Generator().manual_seed(9)
    for engine in ("qr", "gram"):
        a = (0.1 * torch.randn(64, 4, generator=g)).requires_grad_()
        b = torch.randn(48, 4, generator=g).requires_grad_()
        target = torch.randn(64, 48, generator=g)
        opt = LoRARITE([(a, b)], lr=1e-2, engine=engine)
        with pytest.warns(UserWarning, match="every pair's update was skipped"):
            for _ in range(3):
                opt.zero_grad()
                (a @ b.T - target).pow(2).sum().backward()
                opt.step()
        assert opt.update_skips() == 6, engine  # 3 steps × 2 factors


def _conditioned_fit(dtype, kappa, seed, steps, engine="auto", noise=1e-3, **hp):
    """The issue's float32 case: rank-4 target of condition κ, m=64, n=48, A = 0, MSE, lr 1e-3.

    Plus (``noise=1e-3``) a full-rank noise of relative size ~5e-2, so the attainable error is a
    noise floor both dtypes can resolve; ``noise=0`` lets float64 reach ~1e-15."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(64, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 4, generator=g, dtype=torch.float64))
    target = (u * torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), 4, dtype=torch.float64)) @ v.T
    target = target + noise * torch.randn(64, 48, generator=g, dtype=torch.float64)
    a = torch.zeros(64, 4, dtype=dtype, requires_grad=True)
    b = (torch.randn(48, 4, generator=g, dtype=torch.float64) / 48**0.5).to(dtype).requires_grad_()
    opt = LoRARITE([(a, b)], lr=1e-3, engine=engine, **hp)
    t = target.to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        (a @ b.T - t).pow(2).mean().backward()
        opt.step()
    return ((a.double() @ b.double().T - target).norm() / target.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_ill_conditioned_fit_follows_float64(seed):
    """κ = 1e3 from A = 0, 1000 steps: the default engine in float32 ends within 2× of float64's error
    (the issue's target; the Gram engine, formerly the float32 default, diverged here in 4 of 6 seeds)."""
    ref = _conditioned_fit(torch.float64, 1e3, seed, 1000)
    err = _conditioned_fit(torch.float32, 1e3, seed, 1000)
    assert ref < 0.5  # the float64 run does fit
    assert err <= 2 * ref, (err, ref)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_rebalancing_lets_float32_follow_float64_on_a_noise_free_kappa_1e4_fit(seed):
    """κ = 1e4, exact rank-4 target: float64 reaches ~1e-15, so float32's bar is its own floor,
    16 unit roundoffs (9.5e-7: where κ = 10 runs end). Unbalanced, the invariant steps let the
    factorization drift (‖A‖_F‖B‖_F/‖Z‖_* ~ 250): float32's A Bᵀ then cancels to ~r·u·250
    relative, which buries the 1e-4 direction (error ~1e-4). Rebalanced, float32 follows."""
    floor = 16 * torch.finfo(torch.float32).eps / 2
    ref = max(_conditioned_fit(torch.float64, 1e4, seed, 1000, noise=0.0), floor)
    assert _conditioned_fit(torch.float32, 1e4, seed, 1000, noise=0.0) <= 2 * ref
    assert _conditioned_fit(torch.float32, 1e4, seed, 1000, noise=0.0, rebalance=0.0) > 10 * ref


def _gauged_pair(cond, seed=3):
    from lowrank_geom.geometry import gauge_act, random_gauge

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(15, 4, generator=g, dtype=torch.float64)
    return (*gauge_act(a, b, random_gauge(4, cond, g)), 0.1 * torch.randn(20, 15, generator=g, dtype=torch.float64))


def test_rebalance_balances_the_new_pair_and_keeps_its_z():
    from lowrank_geom.geometry import factorization_excess

    a, b, target = _gauged_pair(1e3)
    assert factorization_excess(a.T @ a, b.T @ b) > 100  # the start is far from balanced
    a1, b1 = _one_step(a, b, target)
    a0, b0 = _one_step(a, b, target, rebalance=0.0)
    # one step of lr 1e-2 from the balanced gauge of (A, B): balanced to O(lr)
    assert factorization_excess(a1.T @ a1, b1.T @ b1) < 1.05
    assert factorization_excess(a0.T @ a0, b0.T @ b0) > 100
    # the same Z_{t+1}: 1e-12 relative is the rounding of a cond-1e3 gauge in float64
    torch.testing.assert_close(a1 @ b1.T, a0 @ b0.T, rtol=1e-12, atol=1e-12 * (a0 @ b0.T).abs().max().item())


def test_rebalance_never_acts_where_z_is_not_resolved():
    """From PEFT's A = 0, and with a rank-2 B at r = 4, balancing would zero directions of both
    factors for good: the step is the plain one, bit for bit."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(15, 4, generator=g, dtype=torch.float64)
    target = torch.randn(20, 15, generator=g, dtype=torch.float64)
    starts = [
        (torch.zeros(20, 4, dtype=torch.float64), b),
        (
            1e-3 * torch.randn(20, 4, generator=g, dtype=torch.float64),
            torch.cat([1e3 * b[:, :2], torch.zeros(15, 2, dtype=torch.float64)], dim=1),
        ),
    ]
    for a0, b0 in starts:
        for x, y in zip(_one_step(a0, b0, target), _one_step(a0, b0, target, rebalance=0.0)):
            assert torch.equal(x, y)


class _Block(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(w, w), torch.nn.Linear(w, w)

    def forward(self, x):
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class _TwoClassNet(torch.nn.Module):
    """Residual MLP with a 2-class head: the last adapted layer's gradient has rank 1 < r = 4."""

    def __init__(self, d=10, w=16):
        super().__init__()
        self.inp, self.b1, self.b2, self.head = torch.nn.Linear(d, w), _Block(w), _Block(w), torch.nn.Linear(w, 2)

    def forward(self, x):
        return self.head(self.b2(self.b1(torch.tanh(self.inp(x)))))


def _train_peft(opt_name, dtype, lr, steps=80):
    peft = pytest.importorskip("peft")
    from lowrank_geom import LowRankOptimizer
    from lowrank_geom.peft import lora_pairs, non_pair_parameters

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["head"])
    model = peft.get_peft_model(_TwoClassNet(), cfg).to(dtype)  # PEFT's default init: lora_B = 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, 2, generator=g)).argmax(-1)
    x = x.to(dtype)
    if opt_name == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    else:
        pairs = lora_pairs(model)
        opt = LowRankOptimizer(
            [{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}], strategy=opt_name, lr=lr
        )
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x).float(), y).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_peft_default_init_with_a_two_class_head_trains_like_adamw(dtype, lr):
    """The failure users hit: before the safeguards float64 went to loss 1e7 and float32 raised
    PSDNumericsError here. 1.5×: the robustness suite's "trains" verdict (same lr, same data)."""
    ours, adamw = _train_peft("lora_rite", dtype, lr), _train_peft("adamw", dtype, lr)
    assert adamw < 0.69  # AdamW trains this cell (ln 2 is chance)
    assert ours <= 1.5 * adamw, (ours, adamw)


# ------------------------------------------------------------------ clipping scope over param groups
def _two_problems():
    """Four pairs (two quadratic problems of two pairs each) and their joint gradient."""
    (as1, bs1, g1), (as2, bs2, g2) = quadratic_problem(seed=0), quadratic_problem(m=9, n=7, r=3, seed=4)

    def grad_fn(As, Bs):
        ga1, gb1 = g1(As[:2], Bs[:2])
        ga2, gb2 = g2(As[2:], Bs[2:])
        return ga1 + ga2, gb1 + gb2

    return as1 + as2, bs1 + bs2, grad_fn


# pairs 0, 2 in one param group and 1, 3 in the other, each with its own threshold: small enough
# that both clip on most steps, far enough apart that the scopes give different trajectories
GROUPS, CLIPS = [[0, 2], [1, 3]], [0.05, 0.2]


def _run_groups(scope, engine, steps):
    As, Bs, grad_fn = _two_problems()
    pairs = [(torch.tensor(a).requires_grad_(), torch.tensor(b).requires_grad_()) for a, b in zip(As, Bs)]
    groups = [{"pairs": [pairs[i] for i in g], "clip_unmagnified_grad": c} for g, c in zip(GROUPS, CLIPS)]
    opt = LowRankOptimizer(groups, strategy="lora_rite", lr=0.05, clip_scope=scope, engine=engine)
    out = []
    for _ in range(steps):
        ga, gb = grad_fn([a.detach().numpy() for a, _ in pairs], [b.detach().numpy() for _, b in pairs])
        for (a, b), g1, g2 in zip(pairs, ga, gb):
            a.grad, b.grad = torch.tensor(g1), torch.tensor(g2)
        opt.step()
        out.append([(a.detach().clone(), b.detach().clone()) for a, b in pairs])
    return out


@pytest.mark.parametrize("engine", ["qr", "gram"])
@pytest.mark.parametrize("scope", ["global", "group"])
def test_clipping_scope_over_param_groups_matches_the_reference(scope, engine):
    """Two param groups with different thresholds against the float64 reference (its ``groups``).

    Tolerance as in test_against_reference.py (1e-10 relative, float64 on both sides, different
    LAPACK routes); the other scope's reference trajectory differs from this one by more than
    1e-3, so a norm taken over the wrong pairs cannot pass."""
    steps = 20
    records = run_lora_rite(*_two_problems(), steps, 0.05, clip_unmagnified_grad=CLIPS, clip_scope=scope, groups=GROUPS)
    for t, (record, pairs) in enumerate(zip(records, _run_groups(scope, engine, steps))):
        for i, (rec, (a, b)) in enumerate(zip(record, pairs)):
            for x, key in ((a, "A"), (b, "B")):
                where = f"step {t}, pair {i}, {key}"
                torch.testing.assert_close(
                    x, torch.as_tensor(rec[key]), rtol=1e-10, atol=1e-12, msg=lambda m, where=where: f"{where}: {m}"
                )
    other = "group" if scope == "global" else "global"
    records_other = run_lora_rite(
        *_two_problems(), steps, 0.05, clip_unmagnified_grad=CLIPS, clip_scope=other, groups=GROUPS
    )
    gap = max(np.abs(r1["Z"] - r2["Z"]).max() for r1, r2 in zip(records[-1], records_other[-1]))
    assert gap > 1e-3


@pytest.mark.parametrize("engine", ["qr", "gram"])
def test_global_scope_of_one_param_group_is_the_group_scope_bit_for_bit(engine):
    runs = []
    for scope in ("global", "group"):
        As, Bs, grad_fn = _two_problems()
        pairs = [
            (torch.tensor(a).float().requires_grad_(), torch.tensor(b).float().requires_grad_()) for a, b in zip(As, Bs)
        ]
        opt = LoRARITE(pairs, lr=0.05, clip_unmagnified_grad=0.05, clip_scope=scope, engine=engine)
        for _ in range(5):
            ga, gb = grad_fn(
                [a.detach().double().numpy() for a, _ in pairs], [b.detach().double().numpy() for _, b in pairs]
            )
            for (a, b), g1, g2 in zip(pairs, ga, gb):
                a.grad, b.grad = torch.tensor(g1).float(), torch.tensor(g2).float()
            opt.step()
        runs.append([t.detach().clone() for p in pairs for t in p])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_a_group_scope_param_group_steps_as_if_alone_beside_global_ones():
    """Groups 0 and 1 share one norm (``clip_scope="global"``); group 2 (``"group"``) keeps its own:
    its trajectory is that of an optimizer holding it alone, bit for bit, while group 0's is not."""
    As, Bs, grad_fn = _two_problems()

    def run(group_ids):
        pairs = [(torch.tensor(a).requires_grad_(), torch.tensor(b).requires_grad_()) for a, b in zip(As, Bs)]
        spec = {0: ([0], "global"), 1: ([1, 2], "global"), 2: ([3], "group")}
        groups = [
            {"pairs": [pairs[i] for i in spec[k][0]], "clip_scope": spec[k][1], "clip_unmagnified_grad": 0.05}
            for k in group_ids
        ]
        opt = LowRankOptimizer(groups, strategy="lora_rite", lr=0.05)
        for _ in range(5):
            ga, gb = grad_fn([a.detach().numpy() for a, _ in pairs], [b.detach().numpy() for _, b in pairs])
            for (a, b), g1, g2 in zip(pairs, ga, gb):
                a.grad, b.grad = torch.tensor(g1), torch.tensor(g2)
            opt.step()
        return pairs

    together, alone2, alone0 = run([0, 1, 2]), run([2]), run([0])
    assert torch.equal(together[3][0], alone2[3][0]) and torch.equal(together[3][1], alone2[3][1])
    assert not torch.allclose(together[0][0], alone0[0][0], rtol=1e-6, atol=0)


def test_matches_pytorch_optimizer_lora_rite_over_param_groups():
    """pytorch-optimizer's ``LoRARite`` clips every group by one norm over all groups, each at its
    own threshold: so does the default ``clip_scope="global"``. Tolerance and its reasons as in
    :func:`test_matches_pytorch_optimizer_lora_rite`; the thresholds 0.5 and 2 clip both groups
    (``clip_scope="group"`` ends 1e-1 away) while the gradients stay large enough that its eps²
    inside the root changes no digit that 1e-7 compares (0.05 would: 2e-6)."""
    clips = [0.5, 2.0]
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    As, Bs, _ = _two_problems()
    init = [(torch.tensor(a), torch.tensor(b)) for a, b in zip(As, Bs)]
    g = torch.Generator().manual_seed(7)
    targets = [0.3 * torch.randn(a.shape[0], b.shape[0], generator=g, dtype=torch.float64) for a, b in init]
    ours = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    theirs = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in init]
    opt = LowRankOptimizer(
        [{"pairs": [ours[i] for i in grp], "clip_unmagnified_grad": c} for grp, c in zip(GROUPS, clips)],
        strategy="lora_rite",
        lr=2e-2,
    )
    ref = pytorch_optimizer.LoRARite(
        [{"params": [t for i in grp for t in theirs[i]], "clip_unmagnified_grad": c} for grp, c in zip(GROUPS, clips)],
        lr=2e-2,
        lora_l_dim=-1,
        lora_r_dim=-1,
    )
    for _ in range(30):
        for pairs, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            sum(0.5 * (a @ b.T - t).pow(2).sum() for (a, b), t in zip(pairs, targets)).backward()
            o.step()
    for (a, b), (a2, b2) in zip(ours, theirs):
        torch.testing.assert_close(a @ b.T, a2 @ b2.T, rtol=1e-7, atol=1e-9)
    moved = sum((a @ b.T - a0 @ b0.T).norm() for (a, b), (a0, b0) in zip(ours, init))
    assert moved > 1e-2
