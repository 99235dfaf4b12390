"""lowrank_geom.buckets: stacking that keeps layouts, the workspace's buffer rule, buckets built once."""

from __future__ import annotations

import torch

from lowrank_geom import LoRAPair, LowRankOptimizer
from lowrank_geom.buckets import PairRef, Workspace, build_buckets, stack_like


def test_stack_like_keeps_the_members_memory_layout_and_values():
    base = torch.randn(3, 5, 4)
    members = [x.mT for x in base]  # (4, 5) views with transposed strides
    stacked = stack_like(members)
    assert torch.equal(stacked, torch.stack(members))
    assert stacked.mT.is_contiguous() and not stacked.is_contiguous()
    # a plain torch.stack would lay them out contiguously: the layout the resume bug came from
    assert torch.stack(members).is_contiguous()
    assert stack_like([x.contiguous() for x in members]).is_contiguous()


def test_workspace_rotates_two_buffers_and_never_hands_out_one_in_use():
    buffers: dict = {}
    ws = Workspace(buffers, views=[])
    first = ws.empty("x", (2, 3), torch.float32, "cpu")
    assert ws.empty("x", (2, 3), torch.float32, "cpu").data_ptr() != first.data_ptr()
    third = ws.empty("x", (2, 3), torch.float32, "cpu")  # both buffers live this step: a fresh one
    assert all(third.data_ptr() != b.data_ptr() for b in buffers["x"])
    # next step: state views the first buffer, so only the second is handed out
    ws = Workspace(buffers, views=[first[0]])
    got = ws.empty("x", (2, 3), torch.float32, "cpu")
    assert got.data_ptr() == buffers["x"][1].data_ptr()


def _pairs(n, shapes=((9, 7, 2),), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(m, r, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(k, r, generator=g, dtype=dtype).requires_grad_(),
        )
        for m, k, r in shapes
        for _ in range(n)
    ]


def _grad(pairs, which, tgt):
    for i in which:
        a, b = pairs[i]
        ((a @ b.T - tgt).square().sum() * 0.1).backward()


def test_build_buckets_groups_batchable_pairs_and_foreach_false_keeps_them_apart():
    pairs = _pairs(2, shapes=((9, 7, 2), (6, 5, 2)))
    refs = [PairRef(a, b, -1, -1, f"p{i}") for i, (a, b) in enumerate(pairs)]
    buckets = build_buckets(refs, alone=False)
    assert [[r.name for r in bk.pairs] for bk in buckets] == [["p0", "p1"], ["p2", "p3"]]
    assert [len(bk.pairs) for bk in build_buckets(refs, alone=True)] == [1, 1, 1, 1]


def test_pairs_dropping_in_and_out_keep_their_state_exact():
    """Member lists {0,1,2}, {0,1}, {1,2}, {1,2}: buffers of one member list must never be reused
    while the state of a former member views them (pair 0 keeps its state from step 2)."""
    tgt = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    schedule = [(0, 1, 2), (0, 1), (1, 2), (1, 2), (0, 1, 2)]
    batched = _pairs(3)
    opt = LowRankOptimizer(batched, strategy="scaled_adam", lr=1e-2)
    alone = _pairs(3)
    opts = [LowRankOptimizer([p], strategy="scaled_adam", lr=1e-2) for p in alone]
    for which in schedule:
        opt.zero_grad()
        _grad(batched, which, tgt)
        opt.step()
        for i in which:
            opts[i].zero_grad()
            _grad(alone, [i], tgt)
            opts[i].step()
    # float64, batched vs single elementwise kernels: identical arithmetic; 1e-13 leaves room
    # for a different summation order in the reductions only
    for (a, b), (x, y) in zip(batched, alone):
        torch.testing.assert_close(a, x, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(b, y, rtol=1e-13, atol=1e-13)


def test_a_replaced_state_tensor_is_used_by_the_next_step():
    """The kept stacks are used only while every state tensor is still their view."""
    tgt = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = []
    for replace in (False, True):
        pairs = _pairs(2)
        opt = LowRankOptimizer(pairs, strategy="scaled_adam", lr=1e-2)
        for step in range(3):
            opt.zero_grad()
            _grad(pairs, (0, 1), tgt)
            opt.step()
            if step == 0 and replace:
                st = opt.state[pairs[1][0]]
                st["exp_avg"] = st["exp_avg"] * 3
        runs.append([t.detach().clone() for p in pairs for t in p])
    assert all(torch.equal(x, y) for x, y in zip(runs[0][:2], runs[1][:2]))  # pair 0 untouched
    assert not torch.equal(runs[0][2], runs[1][2])  # pair 1 stepped from the replaced moment


def test_buckets_are_rebuilt_when_the_model_is_cast_after_construction():
    pairs = _pairs(2)
    opt = LowRankOptimizer([LoRAPair(a, b) for a, b in pairs], strategy="scaled_gd", lr=1e-2)
    for a, b in pairs:
        a.data, b.data = a.data.float(), b.data.float()
    tgt = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    _grad(pairs, (0, 1), tgt)
    opt.step()
    assert all(opt.state[a]["step"] == 1 and a.dtype == torch.float32 for a, _ in pairs)
