"""AltLoRA equals the independent float64 transcription of the paper in ``tests/reference/altlora.py``.

The reference is NumPy, written in the paper's orientation (``W = B A``, ``A`` r×n updated first)
and converted only at its boundary; the package works in ``Z = A Bᵀ`` with Gram matrices. Both run
the same problems for 50 steps in float64; both factors and every state tensor are compared
after every step. Tolerance 1e-10 relative (atol 1e-12): the two sides invert the r×r Grams by
different routes (Cholesky with a filtered pseudo-inverse vs QR and SVD), ~1e-15 per step on
these factors (condition numbers < 10); 50 steps accumulate < 1e-12, so 1e-10 leaves two orders
of margin while an algorithmic difference (the order of the two updates, the realignment, the
bias correction, where the decay acts) shows at 1e-4 or more.

Agreement with the authors' code (``optimizer_new.py``, class ``altlora``, of LucasXinYu/AltLoRA
at commit 94b219882abcaa6004d2029fd8a09cd190a8a9aa), run in float64 on a one-layer PEFT-layout
model (``lora_A`` 6×12, ``lora_B`` 10×6 random, r = 6; quadratic loss ``0.5‖BA − T‖²``), lr 0.01,
betas (0.9, 0.999), reg 1e-5, weight_decay 1e-5, correct_bias True, against ``strategy="altlora"``
with ``beta=0.9, delta=1e-5, weight_decay=1e-5, relative_step_cap=0``: after 20 steps the largest
relative difference (max-abs difference over max-abs entry) of either factor is 1.4e-15, and
1.4e-14 from ``lora_B = 0`` (PEFT's init). Script: their class imported unchanged, both optimizers
fed the same losses, outside this repository.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_geom import LowRankOptimizer
from tests.reference.altlora import run_altlora
from tests.reference.problems import linear_problem, quadratic_problem, zero_init_problem

STEPS = 50
RTOL, ATOL = 1e-10, 1e-12

PROBLEMS = {
    "quadratic": lambda: quadratic_problem(m=8, n=6, r=2, seed=0),
    "zero_init": lambda: zero_init_problem(m=9, n=7, r=3, seed=1),
    "online_linear": lambda: linear_problem(m=8, n=6, r=2, seed=2),
}
CASES = {
    "defaults": dict(lr=0.05),
    # the paper's update (no safeguard) with the authors' Tikhonov term and decay
    "paper": dict(lr=0.05, relative_step_cap=0.0, delta=1e-3, weight_decay=0.01),
    "no_bias_correction": dict(lr=0.05, beta=0.5, bias_correction=False, weight_decay=0.1),
    "no_momentum": dict(lr=0.05, beta=0.0),
    # a cap that acts on most steps of these problems
    "tight_cap": dict(lr=0.05, relative_step_cap=0.02),
}


def close(actual: torch.Tensor, expected, what: str) -> None:
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_step_and_state_tensor_matches_the_reference(case, problem):
    hp = CASES[case]
    As, Bs, grad_fn = PROBLEMS[problem]()
    records = run_altlora(As, Bs, grad_fn, STEPS, **hp)
    As, Bs, grad_fn = PROBLEMS[problem]()  # fresh: the online problem counts its calls
    pairs = [(torch.tensor(a).requires_grad_(), torch.tensor(b).requires_grad_()) for a, b in zip(As, Bs)]
    opt = LowRankOptimizer(pairs, strategy="altlora", **hp)
    for t, record in enumerate(records):
        ga, gb = grad_fn([a.detach().numpy() for a, _ in pairs], [b.detach().numpy() for _, b in pairs])
        for (a, b), g1, g2 in zip(pairs, ga, gb):
            a.grad, b.grad = torch.tensor(g1), torch.tensor(g2)
        opt.step()
        for i, ((a, b), rec) in enumerate(zip(pairs, record)):
            where = f"step {t}, pair {i}"
            close(a.detach(), rec["A"], f"{where}, A")
            close(b.detach(), rec["B"], f"{where}, B")
            close(opt.state[a]["exp_avg"], rec["M_A"], f"{where}, momentum of A")
            close(opt.state[b]["exp_avg"], rec["M_B"], f"{where}, momentum of B")
            close(opt.state[a]["previous_factor"], rec["prev_A"], f"{where}, previous A")


def test_the_reference_is_gl_invariant():
    """The transcription itself (no cap, δ = 0): ``(A G, B G⁻ᵀ)`` gives the same ``Z`` trajectory."""
    As, Bs, grad_fn = quadratic_problem(m=8, n=6, r=2, seed=4)
    rng = np.random.default_rng(0)
    gauges = [rng.standard_normal((2, 2)) + 2 * np.eye(2) for _ in As]
    ref = run_altlora(As, Bs, grad_fn, 20, lr=0.05, relative_step_cap=0.0)
    As_g = [a @ g for a, g in zip(As, gauges)]
    Bs_g = [b @ np.linalg.inv(g).T for b, g in zip(Bs, gauges)]
    gauged = run_altlora(As_g, Bs_g, grad_fn, 20, lr=0.05, relative_step_cap=0.0)
    for r1, r2 in zip(ref, gauged):
        for p1, p2 in zip(r1, r2):
            # cond(G) < 10: round-off ~1e-15 · cond amplified over 20 steps stays < 1e-11
            np.testing.assert_allclose(p2["Z"], p1["Z"], rtol=1e-10, atol=1e-12)
