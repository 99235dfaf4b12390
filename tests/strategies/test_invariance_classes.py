"""Each strategy has exactly the invariance class it claims; non-invariant optimizers fail the same check.

The table is built from the registry: every discovered strategy, at its defaults, is checked for
the class its ``invariance`` attribute declares (``VARIANTS`` adds option settings and references).

Gauges ``G`` are drawn by hypothesis with bounded condition number. An invariant optimizer's gap
is round-off: observed ≤ 1e-14 at cond(G) = 100 over 20 float64 steps; a conservative bound is
cond(G)² · eps · steps · O(10) ≈ 1e-10, so 1e-9 is the pass threshold. Non-invariant optimizers
show gaps of order 1e-1 … 1e1 on this problem, so 1e-3 separates "fails" with a wide margin.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_geom import (
    LoRARITE,
    LowRankOptimizer,
    ScaledGD,
    invariance_gap,
    random_gauge,
    scale_gauge,
)
from lowrank_geom.strategies import get_strategy
from tests.strategy_table import RITE_ALGORITHM_1, shipped_strategies

INVARIANT_TOL = 1e-9
BROKEN_TOL = 1e-3
#: a smaller "fails" threshold where the breaking term is small by design: LoRA-One's default damping
#: λ = 1e-6 (the authors' value) against Grams of 1e-2 … 1e2 under these gauges breaks GL(r) by
#: 7e-5 … 5e-4 over 20 steps, still 1e10 times an invariant gap
BROKEN_TOL_OF = {"lora_one": 1e-6}
STEPS = 20
CLASSES = ("GL(r)", "O(r)", "none")


def problem(seed: int, m: int = 9, n: int = 7, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    a = 0.3 * torch.randn(m, r, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(n, r, generator=g, dtype=torch.float64)
    # moderate gradients: LoRA-RITE skips a factor whose unmagnified-gradient RMS exceeds 1
    target = 0.2 * torch.randn(m, n, generator=g, dtype=torch.float64)

    def loss(z):
        return 0.5 * (z - target).pow(2).sum() + 0.1 * z.sin().sum()

    return a, b, loss


def pair_opt(cls, **kw):
    return lambda a, b: cls([(a, b)], **kw)


PAPER_RITE = RITE_ALGORITHM_1

#: learning rates other than 0.05 (elementwise-normalized steps move much further per step)
LR = {"scaled_adam": 0.01, "loft": 0.01}
#: variants with options that change (or must keep) the class, and references outside the package
VARIANTS = {
    "lora_rite_paper": ("GL(r)", pair_opt(LoRARITE, lr=0.05, **PAPER_RITE)),
    "lora_rite_options": ("GL(r)", pair_opt(LoRARITE, lr=0.05, balance=True, weight_decay=0.1, update_capping=0.01)),
    "lora_rite_polar": ("GL(r)", pair_opt(LoRARITE, lr=0.05, basis="polar")),
    "scaled_gd_momentum": ("GL(r)", pair_opt(ScaledGD, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "scaled_gd_damped": ("O(r)", pair_opt(ScaledGD, lr=0.05, delta=0.1)),
    "altlora_paper": (
        "GL(r)",
        pair_opt(LowRankOptimizer, strategy="altlora", lr=0.05, relative_step_cap=0.0, weight_decay=0.01),
    ),
    "altlora_damped": ("O(r)", pair_opt(LowRankOptimizer, strategy="altlora", lr=0.05, delta=0.1)),
    "altlora_simultaneous": (
        "GL(r)",
        pair_opt(LowRankOptimizer, strategy="altlora", lr=0.05, alternate=False, weight_decay=0.01),
    ),
    "torch_adam": ("none", lambda a, b: torch.optim.Adam([a, b], lr=0.01)),
    "lora_one_undamped": ("GL(r)", pair_opt(LowRankOptimizer, strategy="lora_one", lr=0.05, damping=0.0)),
    "lora_one_reference": ("none", pair_opt(LowRankOptimizer, strategy="lora_one", lr=0.01, reference=True)),
}


def _declared() -> dict[str, tuple[str, object]]:
    # every discovered strategy at its defaults, checked for the class it declares: no edit here
    return {
        name: (get_strategy(name).invariance, pair_opt(LowRankOptimizer, strategy=name, lr=LR.get(name, 0.05)))
        for name in shipped_strategies()
    }


TABLE = {**_declared(), **VARIANTS}
GL_INVARIANT = {k: opt for k, (cls, opt) in TABLE.items() if cls == "GL(r)"}
ORTHOGONAL_ONLY = {k: opt for k, (cls, opt) in TABLE.items() if cls == "O(r)"}
NOT_INVARIANT = {k: opt for k, (cls, opt) in TABLE.items() if cls == "none"}

# 12 examples per class: each runs 2 × 20 optimizer steps; classes are wide apart (see above)
few = settings(max_examples=12)
seeds = st.integers(0, 2**16)
conds = st.floats(1.0, 100.0)


def gap(opt, seed, gauge):
    a, b, loss = problem(seed)
    value, zs, _ = invariance_gap(a, b, loss, optimizer=opt, steps=STEPS, gauge=gauge, return_trajectories=True)
    # the trajectory must really move, or a zero gap would prove nothing
    moved = torch.linalg.matrix_norm(zs[-1] - a @ b.T) / torch.linalg.matrix_norm(a @ b.T)
    assert moved > 1e-2
    return value


@pytest.mark.parametrize("name", sorted(GL_INVARIANT))
@few
@given(seed=seeds, cond=conds)
def test_gl_invariant_strategies_pass_every_gauge(name, seed, cond):
    g = torch.Generator().manual_seed(seed + 1)
    assert gap(GL_INVARIANT[name], seed, random_gauge(3, cond, g)) < INVARIANT_TOL


@pytest.mark.parametrize("name", sorted(GL_INVARIANT))
@few
@given(seed=seeds, s=st.sampled_from([1e-2, 1e-1, 10.0, 100.0]))
def test_gl_invariant_strategies_pass_scalar_gauges(name, seed, s):
    assert gap(GL_INVARIANT[name], seed, scale_gauge(s, 3, dtype=torch.float64)) < INVARIANT_TOL


@pytest.mark.parametrize("name", sorted(ORTHOGONAL_ONLY))
@few
@given(seed=seeds)
def test_orthogonal_only_strategies(name, seed):
    g = torch.Generator().manual_seed(seed + 1)
    opt, broken = ORTHOGONAL_ONLY[name], BROKEN_TOL_OF.get(name, BROKEN_TOL)
    assert gap(opt, seed, random_gauge(3, 1.0, g)) < INVARIANT_TOL
    assert gap(opt, seed, scale_gauge(10.0, 3, dtype=torch.float64)) > broken
    assert gap(opt, seed, random_gauge(3, 100.0, g)) > broken


@pytest.mark.parametrize("name", sorted(NOT_INVARIANT))
@few
@given(seed=seeds)
def test_non_invariant_optimizers_fail_the_check(name, seed):
    g = torch.Generator().manual_seed(seed + 1)
    opt = NOT_INVARIANT[name]
    assert gap(opt, seed, random_gauge(3, 1.0, g)) > BROKEN_TOL
    assert gap(opt, seed, scale_gauge(10.0, 3, dtype=torch.float64)) > BROKEN_TOL


def test_strategy_metadata_matches_the_measured_classes():
    """Every discovered strategy declares a class the tests above can check (and so are checked
    for it); the built-in ones keep the classes their papers prove."""
    bad = {n: cls for n, (cls, _) in _declared().items() if cls not in CLASSES}
    assert not bad, f"Strategy.invariance must be one of {CLASSES} (the classes tested here), got {bad}"
    assert set(_declared()) <= set(GL_INVARIANT) | set(ORTHOGONAL_ONLY) | set(NOT_INVARIANT)
    builtin = {"lora_rite": "GL(r)", "scaled_gd": "GL(r)", "one_sided_adagrad": "O(r)", "scaled_adam": "none"}
    assert {n: get_strategy(n).invariance for n in builtin} == builtin
