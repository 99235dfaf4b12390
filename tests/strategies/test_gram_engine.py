"""LoRA-RITE's QR-free gram engine against the QR engine, per pair and batched, and its float32 accuracy.

The gram engine computes the same step as the literal QR transcription (``engine="qr"``) in exact
arithmetic: ``R`` enters only through ``RᵀR = BᵀB``, and the moments are kept magnified. In
float64 with well-conditioned factors the two agree to round-off (~1e-14 per step); 1e-9 over 20
steps leaves wide margin while any algorithmic difference shows at 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_geom import LoRAPair, LowRankOptimizer
from tests.strategy_table import RITE_ALGORITHM_1

# Summed losses here make LoRA-RITE's update skipping (the authors' default) drop whole steps, and
# the driver warns when it does (tests/test_optim.py tests the warning); these tests compare
# engines and batching, skipping included, so the warning is expected.
SKIP_WARNING = pytest.mark.filterwarnings("ignore:.*every pair's update was skipped:UserWarning")


def _problem(seed: int, shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    factors = [
        (0.5 * torch.randn(m, r, generator=g, dtype=dtype), 0.5 * torch.randn(n, r, generator=g, dtype=dtype))
        for m, n, r in shapes
    ]
    targets = [0.3 * torch.randn(m, n, generator=g, dtype=dtype) for m, n, _ in shapes]
    return factors, targets


def _run(factors, targets, steps, *, separate=False, peft_layout=False, grads_mask=None, strategy="lora_rite", **hp):
    """Z of every pair after ``steps`` steps; ``separate``: one optimizer per pair; ``peft_layout``:
    B stored r×n (PEFT's ``lora_A.weight``) through ``LoRAPair(b_rank_dim=0)``."""
    pairs = []
    for a, b in factors:
        a = a.clone().requires_grad_()
        b = (b.T.contiguous() if peft_layout else b.clone()).requires_grad_()
        pairs.append(LoRAPair(a, b, b_rank_dim=0 if peft_layout else -1))
    opts = (
        [LowRankOptimizer([p], strategy=strategy, lr=2e-2, **hp) for p in pairs]
        if separate
        else [LowRankOptimizer(pairs, strategy=strategy, lr=2e-2, **hp)]
    )

    def zs():
        return [p.a @ (p.b if peft_layout else p.b.T) for p in pairs]

    for t in range(steps):
        for o in opts:
            o.zero_grad(set_to_none=True)
        active = [i for i in range(len(pairs)) if grads_mask is None or grads_mask(t, i)]
        sum(0.5 * (zs()[i] - targets[i]).pow(2).sum() + 0.1 * zs()[i].sin().sum() for i in active).backward()
        for o in opts:
            o.step()
    return [z.detach() for z in zs()]


SHAPES = [(12, 9, 3)] * 3 + [(7, 10, 2)] * 2


@pytest.mark.parametrize("peft_layout", [False, True])
@pytest.mark.parametrize(
    "hp",
    [
        {},
        RITE_ALGORITHM_1,
        dict(weight_decay=0.1, update_capping=0.05, balance=True),
    ],
    ids=["defaults", "paper", "options"],
)
def test_gram_engine_equals_the_qr_engine(hp, peft_layout):
    factors, targets = _problem(0, SHAPES)
    fast = _run(factors, targets, 20, peft_layout=peft_layout, engine="gram", **hp)
    slow = _run(factors, targets, 20, peft_layout=peft_layout, engine="qr", **hp)
    moved = max((z - a @ b.T).abs().max().item() for z, (a, b) in zip(fast, factors))
    assert moved > 1e-2
    # float64: the engines compute the same step through different factorizations (Cholesky of
    # BᵀB vs Householder QR of B), each exact to ~cond(B)²·1e-16 ≈ 1e-14 here; 20 steps of
    # O(1) moments amplify that to ≤ 1e-10, so 1e-9 relative (1e-11 absolute near 0) is the bound
    for z1, z2 in zip(fast, slow):
        torch.testing.assert_close(z1, z2, rtol=1e-9, atol=1e-11)


@SKIP_WARNING
@pytest.mark.parametrize("strategy", ["lora_rite", "lora_rite_qr", "scaled_gd", "scaled_adam"])
def test_batched_step_equals_one_optimizer_per_pair(strategy):
    """Stacking same-shape pairs (and all their r×r work) changes nothing but round-off. Global
    clipping couples the pairs of a group, so it is off here; pairs drop in and out of having
    gradients, so stacks of different member lists and the driver's rotating buffers alternate."""
    factors, targets = _problem(1, SHAPES)
    hp = {}
    if strategy.startswith("lora_rite"):
        hp = dict(clip_unmagnified_grad=0.0, engine="qr" if strategy == "lora_rite_qr" else "gram")
        strategy = "lora_rite"
    mask = lambda t, i: (t + i) % 3 != 0
    for peft_layout in (False, True):
        batched = _run(factors, targets, 15, peft_layout=peft_layout, grads_mask=mask, strategy=strategy, **hp)
        per_pair = _run(
            factors, targets, 15, separate=True, peft_layout=peft_layout, grads_mask=mask, strategy=strategy, **hp
        )
        for z1, z2 in zip(batched, per_pair):
            torch.testing.assert_close(z1, z2, rtol=1e-10, atol=1e-12)


def _one_step_dz(a0, b0, ga, gb, dtype, engine):
    a, b = a0.to(dtype).clone().requires_grad_(), b0.to(dtype).clone().requires_grad_()
    opt = LowRankOptimizer(
        [(a, b)], strategy="lora_rite", lr=1e-2, engine=engine, update_skipping=0.0, clip_unmagnified_grad=0.0
    )
    a.grad, b.grad = ga.to(dtype), gb.to(dtype)
    opt.step()
    return a.detach().double() @ b.detach().double().T - a0 @ b0.T


@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0, 300.0, 1e3, 1e4])
def test_float32_condition_sweep_against_float64(cond):
    """One float32 step with a factor of condition number ``cond`` against the float64 QR step.

    A Gram squares the condition number: forming ``AᵀA`` in float32 perturbs it by ~eps₃₂‖A‖², so
    ``R⁻¹`` from its Cholesky factor carries a relative error ~cond²·eps₃₂ (Householder QR:
    ~cond·eps₃₂). Measured here (m=256, r=8, worst of 3 seeds): 9e-7 at cond 1, 4e-5 at 100,
    5e-4 at 300 (QR: 1e-6, 5e-5, 4e-4) — the tolerance ``cond²·eps₃₂ + 1e-5`` leaves ≥ 10× margin.
    From cond ≈ (r·eps₃₂)^{-1/2} ≈ 1e3 the Gram's smallest eigenvalues are round-off: the
    Cholesky pivot test routes the factor to the filtered pseudo-inverse, whose step stays bounded
    (relative error ≤ 1 here, where float32 QR's exact inverse amplifies round-off 60-fold at
    cond 1e4). Use ``engine="qr"`` or float64 factors for factors that ill-conditioned.
    """
    eps32 = torch.finfo(torch.float32).eps
    worst = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        m, n, r = 256, 192, 8
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        a0 = (u * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)) @ v
        b0 = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
        ga, gb = (
            1e-2 * torch.randn(m, r, generator=g, dtype=torch.float64),
            1e-2 * torch.randn(n, r, generator=g, dtype=torch.float64),
        )
        ref = _one_step_dz(a0, b0, ga, gb, torch.float64, "qr")
        dz = _one_step_dz(a0, b0, ga, gb, torch.float32, "gram")
        assert torch.isfinite(dz).all()
        worst = max(worst, ((dz - ref).norm() / ref.norm()).item())
    if cond <= 300:
        assert worst <= cond**2 * eps32 + 1e-5
    else:
        assert worst <= 1.0


@SKIP_WARNING
def test_zero_and_rank_deficient_factors_step_like_the_qr_engine():
    """LoRA's zero init and a rank-one factor: the pseudo-inverse branch, in float64."""
    g = torch.Generator().manual_seed(7)
    a = torch.zeros(10, 3, dtype=torch.float64)
    b = torch.randn(8, 3, generator=g, dtype=torch.float64)
    targets = [0.3 * torch.randn(10, 8, generator=g, dtype=torch.float64)]
    fast = _run([(a, b)], targets, 10, engine="gram")
    slow = _run([(a, b)], targets, 10, engine="qr")
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-9, atol=1e-11)
    rank_one = torch.randn(10, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 3, generator=g, dtype=torch.float64
    )
    out = _run([(rank_one, b)], targets, 5, engine="gram")
    assert torch.isfinite(out[0]).all()


@SKIP_WARNING
def test_auto_engine_is_qr_for_every_dtype():
    """``engine="auto"`` is the QR engine in every dtype (the Gram engine is opt-in); the state keys say
    which engine built them."""
    from lowrank_geom.strategies.lora_rite import resolve_engine

    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert resolve_engine("auto", dtype) == "qr"
    assert resolve_engine("gram", torch.float64) == "gram" and resolve_engine("qr", torch.float32) == "qr"
    for dtype, engine, key in (
        (torch.float32, "auto", "exp_avg"),
        (torch.bfloat16, "auto", "exp_avg"),
        (torch.float32, "gram", "magnified_exp_avg"),
    ):
        a = torch.randn(6, 2, dtype=dtype, requires_grad=True)
        b = torch.randn(5, 2, dtype=dtype, requires_grad=True)
        opt = LowRankOptimizer([(a, b)], strategy="lora_rite", lr=1e-2, engine=engine)
        (a @ b.T).square().sum().backward()
        opt.step()
        assert key in opt.state[a], (dtype, sorted(opt.state[a]))


@SKIP_WARNING
@pytest.mark.parametrize("built, switched", [("gram", "auto"), ("gram", "qr"), ("qr", "gram"), ("auto", "gram")])
def test_switching_the_engine_of_existing_state_is_refused_naming_the_option(built, switched):
    g = torch.Generator().manual_seed(3)
    # two shapes, two buckets: a pair whose state is created after the switch would join the new
    # engine while the other keeps the old one; the switch is refused before any pair steps
    pairs = [
        (torch.randn(m, 2, generator=g).requires_grad_(), torch.randn(5, 2, generator=g).requires_grad_())
        for m in (6, 7)
    ]
    opt = LowRankOptimizer(pairs, strategy="lora_rite", lr=1e-2, engine=built, update_skipping=0.0)
    (pairs[0][0] @ pairs[0][1].T).square().sum().backward()
    opt.step()
    before = [t.detach().clone() for p in pairs for t in p]
    opt.param_groups[0]["engine"] = switched
    for a, b in pairs:
        (a @ b.T).square().sum().backward()
    with pytest.raises(ValueError, match=r"engine=.*was built by the '(gram|qr)' engine.*Set engine="):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, (t for p in pairs for t in p)))
    # back to the state's engine: the run continues
    opt.param_groups[0]["engine"] = built
    opt.step()
    assert not torch.equal(before[0], pairs[0][0])


@pytest.mark.parametrize(
    "hp, reads_rows",
    [
        ({}, True),  # defaults: row normalization and update skipping
        (dict(row_normalize=False, update_skipping=0.0, update_capping=0.0), False),
        (dict(row_normalize=False, update_skipping=0.0, update_capping=0.05), True),
    ],
)
def test_global_row_count_is_reduced_only_when_an_option_reads_it(hp, reads_rows):
    # on FSDP2 shards every row_reduce call is an all-reduce: the 0-dim row count is one per side,
    # and worth a collective only for the options that use it
    from lowrank_geom.strategies.base import PairBatch, get_strategy

    strat = get_strategy("lora_rite")
    full = dict(strat.defaults, lr=1e-2, engine="gram", **hp)
    strat.validate(full)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    sa, sb = strat.init(a[0], b[0], full)
    stack = lambda s: {k: torch.stack([v, v]) for k, v in s.items()}
    shapes = []

    def row_reduce(t):
        shapes.append(tuple(t.shape))
        return t

    batch = PairBatch(
        a,
        b,
        torch.randn(2, 6, 3, generator=g),
        torch.randn(2, 5, 3, generator=g),
        stack(sa),
        stack(sb),
        torch.zeros(2),
        row_reduce,
    )
    strat.update([batch], full)
    assert shapes, "the Grams go through row_reduce"
    assert shapes.count(()) == (2 if reads_rows else 0), shapes
