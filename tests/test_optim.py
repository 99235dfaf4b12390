"""Generic optimizer-contract tests, driven by one table of all strategies (in the spirit of torch's optim_db)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from lowrank_geom import (
    LoRAPair,
    LoRARITE,
    LowRankOptimizer,
    OneSidedAdagrad,
    PSDNumericsError,
    ScaledGD,
)
from lowrank_geom.strategies import PairUpdate, Strategy, base
from lowrank_geom.strategies.base import rms
from tests.strategy_table import IDS, STRATEGIES, declared_moves


def make_pairs(dtype=torch.float64, seed=0, shapes=((7, 5, 2), (6, 4, 3)), zero_a=False):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for m, n, r in shapes:
        a = torch.randn(m, r, generator=g, dtype=torch.float64) * (0 if zero_a else 0.5)
        b = torch.randn(n, r, generator=g, dtype=torch.float64) * 0.5
        pairs.append((a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()))
    return pairs


def make_targets(pairs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(a.shape[0], b.shape[0], generator=g, dtype=torch.float64) for a, b in pairs]


def loss_of(pairs, targets):
    return sum(
        0.5 * ((a.float() @ b.float().T).double() - t).pow(2).sum()
        if a.dtype == torch.bfloat16
        else 0.5 * ((a @ b.T).double() - t).pow(2).sum()
        for (a, b), t in zip(pairs, targets)
    )


def run(opt, pairs, targets, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(pairs, targets).backward()
        opt.step()


def snapshot(pairs):
    return [t.detach().clone() for p in pairs for t in p]


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_construction_errors(info):
    for kwargs, exc, msg in info.errors:
        with pytest.raises(exc, match=msg):
            info.cls(make_pairs(), **kwargs)


def test_unknown_strategy_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown strategy: 'adam'.*lora_rite"):
        LowRankOptimizer(make_pairs(), strategy="adam")


@pytest.mark.parametrize(
    "build, exc, msg",
    [
        (
            lambda: [(torch.zeros(5, 2, requires_grad=True), torch.zeros(4, 3, requires_grad=True))],
            ValueError,
            r"rank mismatch",
        ),
        (
            lambda: [
                (torch.zeros(5, 2, requires_grad=True), torch.zeros(4, 2, dtype=torch.float64, requires_grad=True))
            ],
            ValueError,
            r"dtype mismatch",
        ),
        (
            lambda: [(torch.zeros(5, 6, requires_grad=True), torch.zeros(4, 6, requires_grad=True))],
            ValueError,
            r"exceeds min\(m, n\)",
        ),
        (
            lambda: [
                (
                    torch.zeros(5, 2, dtype=torch.complex64, requires_grad=True),
                    torch.zeros(4, 2, dtype=torch.complex64, requires_grad=True),
                )
            ],
            ValueError,
            r"real floating-point",
        ),
        (
            lambda: [(torch.zeros(5, 2, requires_grad=True) * 2, torch.zeros(4, 2, requires_grad=True))],
            ValueError,
            r"non-leaf",
        ),
        (lambda: [(torch.zeros(5), torch.zeros(4))], ValueError, r">= 2 dims"),
        (lambda: [torch.zeros(5, 2)], TypeError, r"must be an \(A, B\) tuple"),
        (lambda: [], ValueError, r"empty parameter list"),
    ],
    ids=["rank", "dtype", "r>min(m,n)", "complex", "non-leaf", "1-d", "not-a-pair", "empty"],
)
def test_pair_validation_names_the_problem(build, exc, msg):
    with pytest.raises(exc, match=msg):
        LowRankOptimizer(build())


def test_a_tensor_in_two_pairs_is_rejected_with_the_pair_name():
    a, b = torch.zeros(5, 2, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    c = torch.zeros(6, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"factor A already appears in first"):
        LowRankOptimizer([LoRAPair(a, b, name="first"), LoRAPair(a, c, name="second")])
    with pytest.raises(ValueError, match=r"already belongs to another pair or group"):
        LowRankOptimizer([{"pairs": [(a, b)]}, {"pairs": [(c, b)]}])


def test_sparse_and_one_sided_gradients_raise():
    a, b = (t.requires_grad_() for t in (torch.randn(5, 2), torch.randn(4, 2)))
    opt = LowRankOptimizer([(a, b)])
    a.grad = torch.zeros(5, 2).to_sparse()
    b.grad = torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    a.grad = torch.zeros(5, 2)
    b.grad = None
    with pytest.raises(RuntimeError, match="factor B has no gradient"):
        opt.step()


# ---------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_step_without_gradients_is_a_no_op(info):
    pairs = make_pairs()
    before = snapshot(pairs)
    opt = info.cls(pairs, lr=info.lr)
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(pairs)))
    assert len(opt.state) == 0


def test_load_state_dict_rejects_another_pair_layout():
    pairs = make_pairs()
    opt = LoRARITE(pairs)
    run(opt, pairs, make_targets(pairs), 1)
    other = LowRankOptimizer(make_pairs(), strategy="scaled_gd")
    with pytest.raises(ValueError, match="checkpoint has strategy='lora_rite'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_per_group_learning_rate(info):
    pairs = make_pairs()
    frozen_before = snapshot(pairs[1:])
    moving_before = snapshot(pairs[:1])
    opt = info.cls([{"pairs": pairs[:1]}, {"pairs": pairs[1:], "lr": 0.0}], lr=info.lr, **info.independent)
    run(opt, pairs, make_targets(pairs), 2)
    assert all(torch.equal(x, y) for x, y in zip(frozen_before, snapshot(pairs[1:])))
    assert not all(torch.equal(x, y) for x, y in zip(moving_before, snapshot(pairs[:1])))


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_lr_schedulers_drive_the_groups(info):
    pairs = make_pairs()
    opt = info.cls(pairs, lr=info.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    targets = make_targets(pairs)
    for _ in range(2):
        run(opt, pairs, targets, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(info.lr * 0.25)
    # OneCycleLR(cycle_momentum=True) rewrites betas[0] or momentum every step; from ScaledGD's
    # default momentum=0 that switches momentum on mid-run (its buffer is created then)
    key = "betas" if info.has_betas else "momentum" if "momentum" in info.strategy.defaults else None
    if key is not None:
        one_cycle = info.cls(make_pairs(), lr=info.lr)
        p2 = [tuple(one_cycle.param_groups[0]["params"][i : i + 2]) for i in (0, 2)]
        run(one_cycle, p2, targets, 1)
        oc = torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=info.lr, total_steps=10, cycle_momentum=True)
        first = lambda: one_cycle.param_groups[0][key][0] if key == "betas" else one_cycle.param_groups[0][key]
        values = []
        for _ in range(3):
            run(one_cycle, p2, targets, 1)
            oc.step()
            values.append(first())
        assert len(set(values)) == 3 and all(torch.isfinite(t).all() for p in p2 for t in p)


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_closure_is_evaluated_with_grad_enabled(info):
    pairs = make_pairs()
    targets = make_targets(pairs)
    opt = info.cls(pairs, lr=info.lr)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_of(pairs, targets)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert opt.state[pairs[0][0]]["step"].item() == 1


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_step_hooks_and_repr(info):
    pairs = make_pairs()
    opt = info.cls(pairs, lr=info.lr)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    run(opt, pairs, make_targets(pairs), 1)
    assert calls == ["pre", "post"]
    text = repr(opt)
    assert info.name in text and f"lr: {info.lr}" in text and "2 pairs" in text


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_batched_pairs_equal_pairs_stepped_alone(info):
    """Same-shape pairs are stacked into one batch; that must not change any pair's trajectory."""
    shapes = ((7, 5, 2),) * 3
    pairs = make_pairs(shapes=shapes)
    targets = make_targets(pairs)
    opt = info.cls(pairs, lr=info.lr, **info.independent)
    run(opt, pairs, targets, 5)
    for i, single in enumerate(make_pairs(shapes=shapes)):
        alone = info.cls([single], lr=info.lr, **info.independent)
        run(alone, [single], targets[i : i + 1], 5)
        # float64 batched vs single LAPACK/BLAS calls differ only in summation order: 1e-12 is
        # ~1e4 ulps of headroom over 5 steps of O(1) quantities.
        for x, y in zip(single, pairs[i]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_transposed_and_conv_storage_match_plain_pairs(info):
    """A factor stored rank-first (PEFT's lora_A, r×n) or as a conv kernel steps like the plain pair."""
    ((a, b),) = make_pairs(shapes=((6, 12, 2),))
    targets = make_targets([(a, b)])
    plain = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())]
    run(info.cls(plain, lr=info.lr), plain, targets, 4)

    bt = b.detach().T.contiguous().reshape(2, 3, 2, 2).requires_grad_()  # r × in × kh × kw
    at = a.detach().clone().requires_grad_()
    opt = info.cls([LoRAPair(at, bt, a_rank_dim=-1, b_rank_dim=0)], lr=info.lr)
    for _ in range(4):
        opt.zero_grad()
        loss_of([(at, bt.reshape(2, -1).T)], targets).backward()
        opt.step()
    torch.testing.assert_close(at, plain[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(bt.reshape(2, -1).T, plain[0][1], rtol=1e-13, atol=1e-13)


# -------------------------------------------------------------------------------- safeguards


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_zero_factor_at_lora_init_takes_finite_nonzero_steps(info):
    pairs = make_pairs(zero_a=True)
    targets = make_targets(pairs)
    opt = info.cls(pairs, lr=info.lr)
    a_moved = [False] * len(pairs)
    for _ in range(4):
        moves = [declared_moves(opt, a) for a, _ in pairs]
        before = snapshot(pairs)
        run(opt, pairs, targets, 1)
        assert all(torch.isfinite(t).all() for t in snapshot(pairs))
        for i, ((a, b), (on_a, on_b)) in enumerate(zip(pairs, moves)):
            if not on_a:
                assert torch.equal(a, before[2 * i]), "A moved on a step its strategy declares it does not"
            if not on_b:
                assert torch.equal(b, before[2 * i + 1]), "B moved on a step its strategy declares it does not"
            if on_a and not a_moved[i]:
                assert a.abs().sum() > 0  # the zero factor moved on its first turn
                a_moved[i] = True
    assert all(a_moved), "A's turn never came in 4 steps"


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_pair_and_keeps_state(info, bad):
    pairs = make_pairs()
    targets = make_targets(pairs)
    opt = info.cls(pairs, lr=info.lr, **info.independent)
    run(opt, pairs, targets, 2)
    before_params = snapshot(pairs)
    before_state = {k: v.clone() for k, v in opt.state[pairs[0][0]].items()}
    healthy_moves = declared_moves(opt, pairs[1][0])
    opt.zero_grad()
    loss_of(pairs, targets).backward()
    pairs[0][0].grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before_params[:2], snapshot(pairs)[:2]))
    assert all(torch.equal(before_state[k], opt.state[pairs[0][0]][k]) for k in before_state if k != "nonfinite_skips")
    # the healthy pair still stepped: exactly the factors its strategy declares for this step moved
    assert any(healthy_moves)
    for x, y, moves in zip(before_params[2:], pairs[1], healthy_moves):
        assert torch.equal(x, y) != moves
    assert opt.nonfinite_skips() == 1
    strict = info.cls(make_pairs(), lr=info.lr, nonfinite="raise")
    p = [tuple(strict.param_groups[0]["params"][i : i + 2]) for i in (0, 2)]
    loss_of(p, targets).backward()
    p[1][1].grad[0, 0] = bad
    with pytest.raises(FloatingPointError, match="pair 1 of param group 0"):
        strict.step()


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_bf16_parameters_keep_fp32_state_across_checkpoints(info):
    pairs = make_pairs(dtype=torch.bfloat16)
    targets = make_targets(pairs)
    opt = info.cls(pairs, lr=info.lr)
    run(opt, pairs, targets, 3)
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in snapshot(pairs))
    state = opt.state[pairs[0][0]]
    float_keys = [k for k, v in state.items() if v.is_floating_point() and k != "step"]
    assert float_keys and all(state[k].dtype == torch.float32 for k in float_keys)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = info.cls(make_pairs(dtype=torch.bfloat16), lr=info.lr)
    opt2.load_state_dict(torch.load(buf))
    loaded = opt2.state[opt2.param_groups[0]["params"][0]]
    for k in float_keys:
        # torch's load_state_dict alone would round these to bf16; they must come back bit-exact
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], state[k])


# ------------------------------------------------------------------------------ fallback group


def test_fallback_group_is_torch_adamw():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    pairs = make_pairs()
    opt = LowRankOptimizer([{"pairs": pairs}, {"params": [w], "lr": 1e-2, "weight_decay": 0.1}], lr=1e-2)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(3, generator=g, dtype=torch.float64)
    for _ in range(5):
        for p, o in ((w, opt), (w_ref, ref)):
            o.zero_grad()
            (p @ x).sin().sum().backward()
            o.step()
    # identical arithmetic, in the same order, as torch.optim.AdamW(foreach=False)
    assert torch.equal(w, w_ref)
    assert "fallback AdamW over 1 tensors" in repr(opt)


def test_fallback_group_rejects_pair_hyperparameters():
    with pytest.raises(TypeError, match="unexpected key"):
        LowRankOptimizer([{"pairs": make_pairs()}, {"params": [torch.zeros(2, requires_grad=True)], "escape": True}])


def test_state_bytes_counts_every_state_tensor():
    pairs = make_pairs(dtype=torch.float32)
    opt = LoRARITE(pairs)
    run(opt, pairs, make_targets(pairs), 1)
    expected = 0
    for a, b in pairs:
        (m, r), n = a.shape, b.shape[0]
        # exp_avg + basis per factor, an r×r second moment per factor, and the driver's three
        # float32 scalars: step, nonfinite_skips, update_skips
        expected += 4 * (2 * (m + n) * r + 2 * r * r + 3)
    assert opt.state_bytes() == expected


# ---------------------------------------------------------------------------- skipped updates


class _SkippingSGD(Strategy):
    """SGD that skips a factor whose gradient RMS exceeds ``update_skipping`` and reports it in
    ``PairUpdate.skipped`` (LoRA-RITE's rule, without its math); a negative threshold skips
    every factor, also a zero gradient (the driver's zeros for a non-finite pair)."""

    name = "_test_skipping_sgd"
    defaults = dict(update_skipping=1.0)

    def init(self, a, b, hp):
        return {}, {}

    def update_batch(self, batch, hp):
        skip_a = rms(batch.grad_a) > hp["update_skipping"]
        skip_b = rms(batch.grad_b) > hp["update_skipping"]
        d_a = torch.where(skip_a.view(-1, 1, 1), torch.zeros_like(batch.grad_a), batch.grad_a)
        d_b = torch.where(skip_b.view(-1, 1, 1), torch.zeros_like(batch.grad_b), batch.grad_b)
        skipped = skip_a.to(torch.int64) + skip_b.to(torch.int64)
        return PairUpdate(d_a, d_b, {}, {}, scale=-hp["lr"], skipped=skipped)


@pytest.fixture
def skipping_sgd(monkeypatch):
    # registered for one test only: tests/test_docs.py wants a page for every registered name
    monkeypatch.setitem(base._REGISTRY, _SkippingSGD.name, _SkippingSGD)
    return _SkippingSGD.name


def set_grads(pairs, values):
    """Constant gradients: ``values[i] = (value for A, value for B)`` (RMS = |value|)."""
    for (a, b), (va, vb) in zip(pairs, values):
        a.grad = torch.full_like(a, va)
        b.grad = torch.full_like(b, vb)


def test_pair_update_skipped_is_optional_and_last():
    upd = PairUpdate(torch.zeros(1), torch.zeros(1), {}, {})
    assert upd.skipped is None and len(upd) == 7 and upd[:4][2:] == ({}, {})
    assert PairUpdate(*upd[:6], torch.tensor([1])).skipped.tolist() == [1]


def test_update_skips_counts_skipped_factor_updates(skipping_sgd):
    pairs = make_pairs(shapes=((7, 5, 2), (7, 5, 2), (6, 4, 3)))  # a batch of two and one alone
    opt = LowRankOptimizer(pairs, strategy=skipping_sgd, lr=0.1)
    before = snapshot(pairs)
    for _ in range(2):
        set_grads(pairs, [(5.0, 0.5), (0.5, 0.5), (-3.0, 2.0)])  # skips: 1, 0, 2 per step
        opt.step()
    assert opt.update_skips() == 6
    counts = [opt.state[a]["update_skips"] for a, _ in pairs]
    assert [c.item() for c in counts] == [2.0, 0.0, 4.0]
    assert all(c.dtype == torch.float32 and c.ndim == 0 for c in counts)
    after = snapshot(pairs)
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[4], before[4]) and torch.equal(after[5], before[5])
    assert opt.nonfinite_skips() == 0


def test_update_skips_is_zero_for_strategies_that_do_not_report():
    pairs = make_pairs()
    opt = ScaledGD(pairs)
    run(opt, pairs, make_targets(pairs), 2)
    assert opt.update_skips() == 0
    assert all(opt.state[a]["update_skips"].item() == 0.0 for a, _ in pairs)


def test_update_skips_counts_pairs_with_finite_gradients_only(skipping_sgd):
    pairs = make_pairs(shapes=((7, 5, 2), (7, 5, 2)))  # one batch: the driver masks within it
    opt = LowRankOptimizer(pairs, strategy=skipping_sgd, lr=0.1, update_skipping=-1.0)
    set_grads(pairs, [(0.5, 0.5), (0.5, float("nan"))])
    # the strategy reports 2 for both pairs (it sees zeros for the NaN one); the driver skipped
    # the NaN pair itself, so it counts under nonfinite_skips only. Every pair that stepped had
    # both updates skipped: the warning fires.
    with pytest.warns(UserWarning, match="every pair's update was skipped"):
        opt.step()
    assert opt.update_skips() == 2 and opt.nonfinite_skips() == 1
    assert [opt.state[a]["update_skips"].item() for a, _ in pairs] == [2.0, 0.0]


def test_no_warning_when_only_nonfinite_pairs_or_some_updates_remain(skipping_sgd):
    pairs = make_pairs()
    opt = LowRankOptimizer(pairs, strategy=skipping_sgd, lr=0.1, update_skipping=-1.0)
    set_grads(pairs, [(float("inf"), 0.5), (0.5, float("nan"))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # every pair skipped by the driver: nonfinite_skips says so, not this warning
        opt.param_groups[0]["update_skipping"] = 1.0
        set_grads(pairs, [(5.0, 5.0), (5.0, 0.5)])  # pair 1's B factor still moves
        opt.step()
    assert opt.nonfinite_skips() == 2 and opt.update_skips() == 3


def test_all_skipped_step_warns_once_per_optimizer(skipping_sgd):
    pairs = make_pairs()
    groups = [{"pairs": pairs[:1], "update_skipping": 1.0}, {"pairs": pairs[1:], "update_skipping": 2.0}]
    opt = LowRankOptimizer(groups, strategy=skipping_sgd, lr=0.1)
    before = snapshot(pairs)
    set_grads(pairs, [(0.5, 0.5), (3.0, 3.0)])  # group 1 only: every pair, both factors
    with pytest.warns(UserWarning) as record:
        opt.step()
    assert len(record) == 1
    msg = str(record[0].message)
    assert "param group 1 (_test_skipping_sgd)" in msg
    assert "every pair's update was skipped this step by update_skipping=2.0" in msg
    assert "loss will not move" in msg
    assert "mean-reduced loss" in msg and "update_skipping=0" in msg
    assert torch.equal(snapshot(pairs)[2], before[2]) and torch.equal(snapshot(pairs)[3], before[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second all-skipped step does not warn again
        set_grads(pairs, [(3.0, 3.0), (3.0, 3.0)])
        opt.step()
    assert opt.update_skips() == 2 + 4
    # once per optimizer: a new one warns again
    opt2 = LowRankOptimizer(pairs, strategy=skipping_sgd, lr=0.1)
    set_grads(pairs, [(3.0, 3.0), (3.0, 3.0)])
    with pytest.warns(UserWarning, match="param group 0"):
        opt2.step()


def test_update_skips_survive_checkpoints(skipping_sgd):
    pairs = make_pairs()
    opt = LowRankOptimizer(pairs, strategy=skipping_sgd, lr=0.1)
    set_grads(pairs, [(5.0, 0.5), (0.5, 0.5)])
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = [tuple(t.detach().clone().requires_grad_() for t in pair) for pair in pairs]
    opt2 = LowRankOptimizer(fresh, strategy=skipping_sgd, lr=0.1)
    opt2.load_state_dict(saved)
    assert opt2.update_skips() == 1
    assert opt2.state[fresh[0][0]]["update_skips"].dtype == torch.float32
    set_grads(fresh, [(5.0, 5.0), (0.5, 0.5)])
    opt2.step()
    assert opt2.update_skips() == 3
    # a checkpoint from before the counter existed loads, steps, and counts from then on
    for st in saved["state"].values():
        st.pop("update_skips", None)
    opt3 = LowRankOptimizer(fresh, strategy=skipping_sgd, lr=0.1)
    opt3.load_state_dict(saved)
    assert opt3.update_skips() == 0
    set_grads(fresh, [(5.0, 0.5), (0.5, 0.5)])
    opt3.step()
    assert opt3.update_skips() == 1 and opt3.state[fresh[0][0]]["step"].item() == 2


# ------------------------------------------------------------------------- PSDNumericsError


def _broken_eigh(x, *args, **kwargs):
    raise torch.linalg.LinAlgError("injected: failed to converge")


@pytest.mark.parametrize(
    "strategy, kwargs, expect",
    [
        ("one_sided_adagrad", {}, ["strategy 'one_sided_adagrad' (eps=1e-06)", "a larger eps"]),
        (
            "lora_rite",
            dict(engine="qr"),
            ["strategy 'lora_rite' (eps=1e-06, engine='qr')", "Try: a larger eps (now 1e-06); nonfinite='raise'"],
        ),
        ("lora_rite", dict(engine="gram"), ["Try: a larger eps (now 1e-06); engine='qr'; "]),
        (
            "lora_rite",
            {},
            ["strategy 'lora_rite' (eps=1e-06, engine='auto')", "Try: a larger eps (now 1e-06); nonfinite='raise'"],
        ),
    ],
)
def test_psd_failure_in_a_step_says_the_gradients_were_finite(monkeypatch, strategy, kwargs, expect):
    pairs = make_pairs()
    opt = LowRankOptimizer(pairs, strategy=strategy, lr=1e-2, **kwargs)
    loss_of(pairs, make_targets(pairs)).backward()
    before = snapshot(pairs)
    monkeypatch.setattr(torch.linalg, "eigh", _broken_eigh)
    with pytest.raises(PSDNumericsError) as info:
        opt.step()
    msg = str(info.value)
    assert msg.startswith("param group 0, strategy")
    assert "The gradients of this param group were finite (the driver checks them first)" in msg
    assert "Every factor finite: yes; every state tensor finite: yes" in msg
    assert "rank-deficient or ill-conditioned factor" in msg and "underflows or overflows" in msg
    assert "nonfinite='raise'" in msg and "nonfinite_skips() = 0 so far" in msg
    assert "float32 factors instead of" not in msg  # the factors are float64
    assert "failed to converge twice in float64" in msg  # psd.py's own facts
    assert "non-finite (NaN/inf) entries: no" in msg
    for part in expect:
        assert part in msg
    assert isinstance(info.value.__cause__, PSDNumericsError)
    assert isinstance(info.value.__cause__.__cause__, torch.linalg.LinAlgError)
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(pairs)))  # nothing was applied


def test_psd_failure_message_with_masked_pairs_and_bf16_factors(monkeypatch):
    pairs = make_pairs(dtype=torch.bfloat16)
    opt = OneSidedAdagrad(pairs)
    loss_of(pairs, make_targets(pairs)).backward()
    pairs[1][0].grad[0, 0] = float("nan")
    monkeypatch.setattr(torch.linalg, "eigh", _broken_eigh)
    with pytest.raises(PSDNumericsError) as info:
        opt.step()
    msg = str(info.value)
    assert "The gradients the strategy received were finite" in msg
    assert "passed the 1 pair(s) with a non-finite gradient as zeros" in msg
    assert "failed to converge in float32 and again in float64" in msg
    assert "float32 factors instead of bfloat16" in msg


# ---------------------------------------------------------------------------- coupled param groups


class _CoupledSGD(Strategy):
    """SGD whose step is ``−lr·g·s`` with ``s`` the number of pairs it sees at once: those of one
    group, or of every group with ``coupled=True`` (``update_groups``), so the coupling shows in
    the factors."""

    name = "_test_coupled_sgd"
    defaults = dict(coupled=False)
    calls: list = []

    def init(self, a, b, hp):
        return {}, {}

    def couples_groups(self, hp):
        return hp["coupled"]

    def _step(self, groups):
        count = sum(b.a.shape[0] for batches, _ in groups for b in batches)
        return [
            [PairUpdate(b.grad_a, b.grad_b, {}, {}, scale=-hp["lr"] * count) for b in batches] for batches, hp in groups
        ]

    def update(self, batches, hp):
        self.calls.append(("update", 1))
        return self._step([(batches, hp)])[0]

    def update_groups(self, groups):
        self.calls.append(("update_groups", len(groups)))
        return self._step(groups)


@pytest.mark.parametrize("compile_", [False, True])
def test_coupled_param_groups_step_together_and_the_others_alone(monkeypatch, compile_):
    monkeypatch.setitem(base._REGISTRY, _CoupledSGD.name, _CoupledSGD)
    monkeypatch.setattr(_CoupledSGD, "calls", [])
    pairs = make_pairs(shapes=((7, 5, 2), (6, 4, 3), (5, 3, 2)))
    groups = [{"pairs": [p], "coupled": c} for p, c in zip(pairs, (True, False, True))]
    opt = LowRankOptimizer(groups, strategy=_CoupledSGD.name, lr=0.1, compile=compile_)
    before = snapshot(pairs)
    set_grads(pairs, [(1.0, 1.0)] * 3)
    opt.step()
    # one update_groups for groups 0 and 2 (two pairs seen: a step of 0.2), update for group 1 (0.1)
    if not compile_:  # compiled, the calls are those of tracing
        assert sorted(_CoupledSGD.calls) == [("update", 1), ("update_groups", 2)]
    for (a, _), a0, step in zip(pairs, before[::2], (0.2, 0.1, 0.2)):
        torch.testing.assert_close(a.detach(), a0 - step, rtol=0, atol=1e-12)
