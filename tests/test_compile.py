"""``LowRankOptimizer(compile=True)``: the strategy update through ``torch.compile`` equals eager.

One compile per strategy (inductor's CPU backend, ~10–30 s each here). Tolerance: the compiler
fuses elementwise chains and may reorder the reductions inside GEMMs and norms, so compiled and
eager float32 steps differ by round-off, ~1e-7 relative per step (measured: ≤ 6e-8 absolute on
O(1) factors over 8 steps); 1e-5 over 6 steps leaves two orders of margin, while a wrong
hyperparameter (an lr the graph baked in, a stale state) shows at ≥ 1e-3. The lr changes every
step (StepLR), so the same test shows that a scheduled lr does not recompile the graph.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lowrank_geom import LowRankOptimizer
from tests.test_optim import IDS, STRATEGIES, loss_of, make_pairs, make_targets, snapshot

STEPS = 6


def _trajectory(info, compile_, dtype, **hp):
    pairs = make_pairs(dtype=dtype, shapes=((7, 5, 2), (7, 5, 2), (6, 4, 3)))
    targets = make_targets(pairs)
    opt = LowRankOptimizer(pairs, strategy=info.name, lr=info.lr, compile=compile_, **hp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    out = []
    for t in range(STEPS):
        opt.zero_grad()
        loss_of(pairs, targets).backward()
        # A new lr must not recompile. Step 2 may: state written by step 1 can have other strides
        # than the fresh zeros (the QR engine's basis comes from LAPACK in column-major layout).
        with torch._dynamo.config.patch(error_on_recompile=compile_ and t > 1):
            opt.step()
        sched.step()
        out.append(snapshot(pairs))
    return out, opt


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_compiled_step_equals_eager(info):
    torch._dynamo.reset()
    eager, _ = _trajectory(info, False, torch.float32)
    compiled, _ = _trajectory(info, True, torch.float32)
    for step, (e, c) in enumerate(zip(eager, compiled)):
        for x, y in zip(e, c):
            # float32: inductor fuses elementwise ops and may reorder reductions, each rounding
            # differently at u ≈ 6e-8; 1e-5 is ~170 u of headroom over the few steps compared
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}")
    start = snapshot(make_pairs(dtype=torch.float32, shapes=((7, 5, 2), (7, 5, 2), (6, 4, 3))))
    assert max((x - y).abs().max().item() for x, y in zip(start, eager[-1])) > 1e-3  # the runs moved


def test_compiled_lora_rite_float64_runs_the_qr_engine_and_equals_eager():
    """engine='auto' on float64: the QR engine's Householder QR and pseudo-inverses compile too."""
    torch._dynamo.reset()
    info = STRATEGIES[IDS.index("lora_rite")]
    eager, _ = _trajectory(info, False, torch.float64)
    compiled, opt = _trajectory(info, True, torch.float64)
    assert "exp_avg" in opt.state[opt.param_groups[0]["params"][0]]
    for e, c in zip(eager, compiled):
        for x, y in zip(e, c):
            # float64: round-off ~1e-16 per operation; 1e-10 as in the reference tests
            torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


def test_compile_flag_is_validated():
    with pytest.raises(ValueError, match="Invalid compile"):
        LowRankOptimizer(make_pairs(), compile="yes")
    with pytest.raises(ValueError, match="Invalid compile"):
        LowRankOptimizer([{"pairs": make_pairs(), "compile": 1.5}])
