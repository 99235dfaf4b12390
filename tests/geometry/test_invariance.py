"""invariance_gap (lowrank_geom/geometry/invariance.py): it must read ≈ 0 for an invariant update
and clearly non-zero for a non-invariant one, whichever way the optimizer is given.

Tolerances: an invariant step reproduces ``Z`` in both runs up to round-off, amplified per step
by at most ``cond(G) · cond(BᵀB)`` (the gauge's solve and the scaled step's solve); over 10
float64 steps that is ~1e-13 for these sizes, so ``1e-10`` leaves a 1000× margin. Adam and SGD
change ``Z`` differently by O(lr · ‖∇‖) per step, giving gaps of order 0.1–1; ``1e-2`` is far
from both ends.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_geom import (
    LoRARITE,
    LowRankOptimizer,
    OneSidedAdagrad,
    ScaledAdam,
    ScaledGD,
)
from lowrank_geom.geometry import invariance_gap, random_gauge, scale_gauge

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(seed: int = 0, m: int = 8, n: int = 6, r: int = 3, dtype=F64):
    g = _gen(seed)
    a = torch.randn(m, r, generator=g, dtype=dtype)
    b = torch.randn(n, r, generator=g, dtype=dtype)
    target = torch.randn(m, n, generator=g, dtype=dtype)

    def loss(z):
        return 0.5 * (z - target).pow(2).sum()

    return a, b, loss


def scaled_step(a, b, grad_a, grad_b, state, lr=0.05):
    """ScaledGD, invariant by construction: ``A −= lr ∇A (BᵀB)⁻¹``, ``B −= lr ∇B (AᵀA)⁻¹``.

    Under ``(A G, B G⁻ᵀ)``: ``∇A → ∇A G⁻ᵀ`` and ``(BᵀB)⁻¹ → Gᵀ (BᵀB)⁻¹ G``, so the new ``A`` is the
    old one times ``G`` (and ``B`` times ``G⁻ᵀ``): the same ``Z``.
    """
    state["t"] = state.get("t", 0) + 1
    new_a = a - lr * torch.linalg.solve(b.mT @ b, grad_a.mT).mT
    new_b = b - lr * torch.linalg.solve(a.mT @ a, grad_b.mT).mT
    return new_a, new_b


@given(
    seed=st.integers(0, 2**31 - 1),
    r=st.integers(1, 4),
    cond=st.floats(1.0, 100.0),
)
def test_gap_is_roundoff_for_an_invariant_step(seed, r, cond):
    a, b, loss = _problem(seed, r=r)
    gauge = random_gauge(r, cond if r > 1 else 1.0, _gen(seed + 1))
    gap = invariance_gap(a, b, loss, step_fn=scaled_step, gauge=gauge)
    assert 0.0 <= gap < 1e-10  # module docstring


@pytest.mark.parametrize(
    "optimizer, kwargs",
    [(torch.optim.SGD, dict(lr=0.01)), (torch.optim.Adam, dict(lr=0.05))],
)
def test_gap_is_large_for_non_invariant_optimizers(optimizer, kwargs):
    a, b, loss = _problem(1)
    gap = invariance_gap(a, b, loss, optimizer=optimizer, generator=_gen(2), **kwargs)
    assert gap > 1e-2  # the check can fail: neither SGD nor Adam is GL(r)-invariant
    assert gap < float("inf")


def test_gap_float32():
    # float32 robustness: the invariant step's gap is float32 round-off (eps32 · cond ~ 1e-6),
    # still clearly separated from Adam's O(1) gap
    a, b, loss = _problem(3, dtype=torch.float32)
    gauge = random_gauge(3, 10.0, _gen(4), dtype=torch.float32)
    assert invariance_gap(a, b, loss, step_fn=scaled_step, gauge=gauge) < 1e-4
    assert invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=0.05, gauge=gauge) > 1e-2


def test_optimizer_class_and_factory_agree():
    a, b, loss = _problem(5)
    gauge = random_gauge(3, 10.0, _gen(6))
    by_class = invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=0.05, gauge=gauge)

    def factory(x, y, lr):
        return torch.optim.Adam([x, y], lr=lr)

    by_factory = invariance_gap(a, b, loss, optimizer=factory, lr=0.05, gauge=gauge)
    by_lambda = invariance_gap(a, b, loss, optimizer=lambda x, y: torch.optim.Adam([x, y], lr=0.05), gauge=gauge)
    # the same optimizer built three ways runs the same arithmetic: identical gaps
    assert by_class == by_factory == by_lambda
    assert by_class > 1e-2


def test_gauge_as_float_or_tensor():
    a, b, loss = _problem(7)
    # a float s means G = s I, bit for bit
    g_float = invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=0.05, gauge=10.0)
    g_tensor = invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=0.05, gauge=scale_gauge(10.0, 3, dtype=F64))
    assert g_float == g_tensor
    assert g_float > 1e-2  # Adam is not even scale invariant (paper §2.1)
    # a moderate scale keeps plain SGD stable; it is not scale invariant either
    assert invariance_gap(a, b, loss, optimizer=torch.optim.SGD, lr=0.01, gauge=2.0) > 1e-2
    # the invariant step is invariant to scalings too (round-off, see module docstring)
    assert invariance_gap(a, b, loss, step_fn=scaled_step, gauge=10.0) < 1e-10
    # a float32 tensor gauge is cast to the pair's dtype
    g32 = random_gauge(3, 5.0, _gen(8), dtype=torch.float32)
    assert invariance_gap(a, b, loss, step_fn=scaled_step, gauge=g32) < 1e-10


def test_default_gauge_is_random_and_reproducible():
    a, b, loss = _problem(9)
    kw = dict(optimizer=torch.optim.Adam, lr=0.05)
    first = invariance_gap(a, b, loss, generator=_gen(0), **kw)
    assert first == invariance_gap(a, b, loss, generator=_gen(0), **kw)  # same gauge, same gap
    assert first != invariance_gap(a, b, loss, generator=_gen(1), **kw)  # another gauge
    # rank 1: the default gauge is ±1 (condition number 1 is the only choice)
    a1, b1, loss1 = _problem(9, r=1)
    assert invariance_gap(a1, b1, loss1, step_fn=scaled_step, generator=_gen(0)) < 1e-10


def test_returns_trajectories():
    a, b, loss = _problem(10)
    a0, b0 = a.clone(), b.clone()
    gap, zs, zs2 = invariance_gap(
        a, b, loss, optimizer=torch.optim.Adam, lr=0.05, steps=4, gauge=3.0, return_trajectories=True
    )
    assert len(zs) == len(zs2) == 4
    assert all(z.shape == (8, 6) and not z.requires_grad for z in zs + zs2)
    # the gap is exactly what the docstring says it is, computed from these trajectories
    diff = max(torch.linalg.matrix_norm(z - z2).item() for z, z2 in zip(zs, zs2))
    scale = max(torch.linalg.matrix_norm(z).item() for z in zs)
    assert gap == diff / scale
    # steps were taken from the given pair, and the pair itself was left alone
    assert not torch.equal(zs[0], a0 @ b0.mT)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_step_fn_state_persists_across_steps():
    a, b, loss = _problem(11)
    seen = []

    def counting_step(a, b, ga, gb, state):
        out = scaled_step(a, b, ga, gb, state)
        seen.append(state["t"])
        return out

    invariance_gap(a, b, loss, step_fn=counting_step, steps=3, gauge=2.0)
    # one state dict per run, kept across that run's steps
    assert seen == [1, 2, 3, 1, 2, 3]


def test_bad_arguments():
    a, b, loss = _problem(12)
    with pytest.raises(ValueError, match="exactly one"):
        invariance_gap(a, b, loss)
    with pytest.raises(ValueError, match="exactly one"):
        invariance_gap(a, b, loss, optimizer=torch.optim.SGD, step_fn=scaled_step, lr=0.1)
    with pytest.raises(ValueError, match="together with step_fn"):
        invariance_gap(a, b, loss, step_fn=scaled_step, lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        invariance_gap(a, b, loss, step_fn=scaled_step, steps=0)
    with pytest.raises(ValueError, match="s != 0"):
        invariance_gap(a, b, loss, step_fn=scaled_step, gauge=0.0)


# ------------------------------------------------- the library's own optimizer classes (pairs)

# every optimizer class the package exports; each takes a list of (A, B) pairs, not of tensors
LIBRARY_CLASSES = [LoRARITE, ScaledGD, ScaledAdam, OneSidedAdagrad, LowRankOptimizer]


def _small_problem(seed: int):
    """``_problem`` shrunk (factors × 0.3, target × 0.2), as in docs/geometry.rst: a summed loss on
    O(1) factors has gradients above LoRA-RITE's default ``update_skipping=1.0``, whose skipped
    steps would leave ``Z`` still and make a zero gap vacuous."""
    a, b, _ = _problem(seed)
    target = 0.2 * torch.randn(8, 6, generator=_gen(seed + 100), dtype=F64)
    return 0.3 * a, 0.3 * b, lambda z: 0.5 * (z - target).pow(2).sum()


@pytest.mark.parametrize("cls", LIBRARY_CLASSES, ids=lambda c: c.__name__)
def test_class_form_builds_the_library_optimizers_from_pairs(cls):
    a, b, loss = _small_problem(13)
    gauge = random_gauge(3, 10.0, _gen(14))
    gap, zs, _ = invariance_gap(a, b, loss, optimizer=cls, lr=0.05, gauge=gauge, return_trajectories=True)
    assert 0.0 <= gap < float("inf")
    assert not torch.equal(zs[-1], a @ b.mT)  # it did take steps
    # the class form is cls([(A, B)], **kwargs): the same arithmetic as the factory, bit for bit
    by_factory = invariance_gap(a, b, loss, optimizer=lambda x, y: cls([(x, y)], lr=0.05), gauge=gauge)
    assert gap == by_factory


def test_class_form_shows_lora_rite_invariant_and_adam_not():
    a, b, loss = _small_problem(15)
    gauge = random_gauge(3, 10.0, _gen(16))
    gap, zs, _ = invariance_gap(a, b, loss, optimizer=LoRARITE, lr=0.05, gauge=gauge, return_trajectories=True)
    # LoRA-RITE is GL(r)-invariant: round-off only, ~1e-15 here (module docstring: 1e-10 leaves a
    # ≥1000× margin over the cond(G)·cond(BᵀB)-amplified float64 round-off of 10 steps)
    assert gap < 1e-10
    # ... and not because it stood still (skipped updates would give a gap of 0 too)
    assert torch.linalg.matrix_norm(zs[-1] - a @ b.mT) > 0.1 * torch.linalg.matrix_norm(a @ b.mT)
    # the same problem, gauge and lr with Adam: the invariance claim fails, as it must
    assert invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=0.05, gauge=gauge) > 1e-2


def test_class_form_passes_hyperparameters_to_the_library_class():
    a, b, loss = _small_problem(17)
    kw = {"optimizer": LowRankOptimizer, "lr": 0.05, "gauge": random_gauge(3, 10.0, _gen(18))}
    # the strategy keyword reaches the driver: ScaledAdam is not invariant, LoRA-RITE is
    assert invariance_gap(a, b, loss, strategy="scaled_adam", **kw) > 1e-2
    assert invariance_gap(a, b, loss, strategy="lora_rite", **kw) < 1e-10


def test_bad_optimizer_arguments():
    a, b, loss = _problem(19)
    with pytest.raises(TypeError, match="instance of Adam; pass its class or a factory"):
        invariance_gap(a, b, loss, optimizer=torch.optim.Adam([a.clone().requires_grad_()]), gauge=2.0)
    with pytest.raises(TypeError, match=r"Optimizer subclass or a factory.*str"):
        invariance_gap(a, b, loss, optimizer="adam", gauge=2.0)
    with pytest.raises(TypeError, match="no zero_grad"):
        invariance_gap(a, b, loss, optimizer=lambda x, y: None, gauge=2.0)

    class PairsCalledParams(LowRankOptimizer):  # takes pairs, but does not say so by name
        def __init__(self, params, lr=1e-3):
            super().__init__(params, lr=lr)

    with pytest.raises(TypeError, match=r"PairsCalledParams\(\[A, B\], \*\*kwargs\).*named `pairs`.*factory"):
        invariance_gap(a, b, loss, optimizer=PairsCalledParams, lr=0.05, gauge=2.0)
    # hyperparameter errors still come from the optimizer itself
    with pytest.raises(ValueError, match="learning rate"):
        invariance_gap(a, b, loss, optimizer=LoRARITE, lr=-1.0, gauge=2.0)
