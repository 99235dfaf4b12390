"""The ``torch.optim`` contract of :class:`~lowrank_geom.LowRankOptimizer`, for every registered strategy.

Driven by :mod:`tests.strategy_table` (built from the registry): exact resume through every
route (``torch.save``/``weights_only`` load, ``deepcopy``, pickle; HF Trainer in
``test_trainer_resume``) in every dtype and factor layout, load/state-dict hooks, every
hyperparameter switched mid-run, torch's keyword arguments, lr as a Tensor, per-group options,
zero gradients, the factors each step moves (:meth:`~lowrank_geom.strategies.Strategy.moves`).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from lowrank_geom import LoRAPair, LowRankOptimizer
from lowrank_geom.pairs import factor_view
from tests.strategy_table import IDS, STRATEGIES, declared_moves, switched_values

M, N, R = 96, 80, 8  # large enough that BLAS picks layout-dependent kernels (rank-dim-first bug)

#: stored shapes and rank dims of (A, B) per layout; every layout views as A: M×R, B: N×R
LAYOUTS = {
    "plain": (((M, R), -1), ((N, R), -1)),
    "rank_dim_first": (((M, R), -1), ((R, N), 0)),  # PEFT's Linear: B is lora_A.weight (r×in)
    "conv": (((M, R, 1, 1), 1), ((R, 20, 2, 2), 0)),  # PEFT's Conv2d: lora_B (out×r×1×1), lora_A (r×in×kh×kw)
    "embedding": (((R, M), 0), ((N, R), -1)),  # PEFT's Embedding: A is lora_embedding_A (r×num)
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_pairs(layout: str, dtype: torch.dtype, count: int = 2, seed: int = 0) -> list[LoRAPair]:
    g = torch.Generator().manual_seed(seed)
    (sa, ra), (sb, rb) = LAYOUTS[layout]
    return [
        LoRAPair(
            (0.3 * torch.randn(sa, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(),
            (0.3 * torch.randn(sb, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(),
            ra,
            rb,
        )
        for _ in range(count)
    ]


def targets(count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.2 * torch.randn(M, N, generator=g, dtype=torch.float64) for _ in range(count)]


def loss_of(pairs: list[LoRAPair], tgts: list[torch.Tensor], sign: float = 1.0) -> torch.Tensor:
    total = 0.0
    for p, t in zip(pairs, tgts):
        z = factor_view(p.a, p.a_rank_dim).double() @ factor_view(p.b, p.b_rank_dim).double().T
        total = total + (z - t).square().mean() + 0.1 * z.sin().sum() / z.numel() ** 0.5
    return sign * total


def run(opt, pairs, tgts, steps: int, sched=None, sign: float = 1.0) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_of(pairs, tgts, sign).backward()
        opt.step()
        if sched is not None:
            sched.step()


def tensors(pairs) -> list[torch.Tensor]:
    return [t.detach().clone() for p in pairs for t in (p.a, p.b)]


def same_state(opt1, opt2) -> bool:
    s1, s2 = opt1.state_dict()["state"], opt2.state_dict()["state"]
    return s1.keys() == s2.keys() and all(
        s1[k].keys() == s2[k].keys() and all(torch.equal(s1[k][j], s2[k][j]) for j in s1[k]) for k in s1
    )


def build(info, layout, dtype, **hp):
    pairs = make_pairs(layout, dtype)
    opt = info.cls(pairs, lr=info.lr, **hp)
    # a warmup: the continuation must also be exact while the lr changes every step
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=6)
    return pairs, opt, sched


def via_save_load(info, layout, dtype, pairs, opt, sched):
    buf = io.BytesIO()
    torch.save({"params": tensors(pairs), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pairs2, opt2, sched2 = build(info, layout, dtype)
    with torch.no_grad():
        for t, saved in zip((t for p in pairs2 for t in (p.a, p.b)), ckpt["params"]):
            t.copy_(saved)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    return pairs2, opt2, sched2


def via_deepcopy(info, layout, dtype, pairs, opt, sched):
    return copy.deepcopy((pairs, opt, sched))


def via_pickle(info, layout, dtype, pairs, opt, sched):
    return pickle.loads(pickle.dumps((pairs, opt, sched)))


ROUTES = {"save_load": via_save_load, "deepcopy": via_deepcopy, "pickle": via_pickle}


# ------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_resume_continues_bit_identically(info, layout, dtype, route):
    """A resumed run continues exactly as the uninterrupted one, bit for bit (every strategy,
    dtype, factor layout and route)."""
    tgts = targets()
    pairs, opt, sched = build(info, layout, DTYPES[dtype])
    run(opt, pairs, tgts, 3, sched)
    pairs2, opt2, sched2 = ROUTES[route](info, layout, DTYPES[dtype], pairs, opt, sched)
    run(opt, pairs, tgts, 4, sched)
    run(opt2, pairs2, tgts, 4, sched2)
    assert all(torch.equal(x, y) for x, y in zip(tensors(pairs), tensors(pairs2)))
    assert same_state(opt, opt2)


# -------------------------------------------------------------------------------------- hooks


def _first_pair_state(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_load_pre_hook_may_replace_the_state_dict(info):
    tgts = targets()
    pairs, opt, _ = build(info, "plain", torch.float64)
    run(opt, pairs, tgts, 2)
    sd = opt.state_dict()
    _pairs2, opt2, _ = build(info, "plain", torch.float64)

    def halve(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        for st in new["state"].values():
            for k, v in st.items():
                if v.is_floating_point() and v.ndim > 0:
                    st[k] = v / 2
        return new  # a returned dict replaces the argument, as in torch

    opt2.register_load_state_dict_pre_hook(halve)
    opt2.load_state_dict(sd)
    ours, theirs = _first_pair_state(opt2), _first_pair_state(opt)
    tensor_keys = [k for k, v in theirs.items() if v.ndim > 0]
    assert tensor_keys or not info.strategy.state_keys(opt.param_groups[0])[0]
    for k in tensor_keys:
        assert torch.equal(ours[k], theirs[k] / 2), k


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_load_post_hook_edits_of_the_state_are_kept_and_used(info):
    tgts = targets()
    pairs, opt, _ = build(info, "plain", torch.float64)
    run(opt, pairs, tgts, 2)
    sd = opt.state_dict()
    snap = tensors(pairs)

    def fresh():
        p2, o2, _ = build(info, "plain", torch.float64)
        with torch.no_grad():
            for t, s in zip((t for p in p2 for t in (p.a, p.b)), snap):
                t.copy_(s)
        return p2, o2

    def edit(optimizer):  # what a post-hook may do: rewrite a state tensor
        st = _first_pair_state(optimizer)
        for k, v in st.items():
            if v.is_floating_point() and v.ndim > 0:
                st[k] = v * 3

    hooked, by_hand, plain = fresh(), fresh(), fresh()
    hooked[1].register_load_state_dict_post_hook(edit)
    for _, o2 in (hooked, by_hand, plain):
        o2.load_state_dict(sd)
    edit(by_hand[1])
    for p2, o2 in (hooked, by_hand, plain):
        run(o2, p2, tgts, 2)
    assert all(torch.equal(x, y) for x, y in zip(tensors(hooked[0]), tensors(by_hand[0])))
    if any(v.ndim > 0 for v in _first_pair_state(opt).values()):  # stateless strategies: nothing to edit
        assert not all(torch.equal(x, y) for x, y in zip(tensors(hooked[0]), tensors(plain[0])))


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_state_dict_hooks_run_and_a_post_hook_result_is_returned(info):
    pairs, opt, _ = build(info, "plain", torch.float64)
    run(opt, pairs, targets(), 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": len(calls)})
    sd = opt.state_dict()
    assert calls == ["pre"] and sd["tag"] == 1


# ------------------------------------------------------------------------ options switched mid-run

SWITCHES = [
    (info, key, value)
    for info in STRATEGIES
    for key in info.strategy.defaults
    for value in switched_values(info.strategy, key)
] + [
    (info, key, value)
    for info in STRATEGIES
    for key, value in (("maximize", True), ("foreach", False), ("nonfinite", "raise"))
]


@pytest.mark.parametrize("info, key, value", SWITCHES, ids=[f"{i.name}-{k}={v!r}" for i, k, v in SWITCHES])
def test_every_option_switched_mid_run_continues_or_is_refused_naming_it(info, key, value):
    """A scheduler or user code may change any option between steps (OneCycleLR switches
    momentum on): the step then runs with state fitted to the new options, or raises a
    ``ValueError`` naming the option, leaving the factors untouched."""
    tgts = targets()
    pairs, opt, _ = build(info, "rank_dim_first", torch.float32)
    run(opt, pairs, tgts, 2)
    opt.param_groups[0][key] = value
    before = tensors(pairs)
    try:
        run(opt, pairs, tgts, 3)
    except ValueError as err:
        assert key in str(err)
        assert all(torch.equal(x, y) for x, y in zip(before, tensors(pairs)))
        return
    assert all(torch.isfinite(t).all() for t in tensors(pairs))
    keys_a, keys_b = info.strategy.state_keys(opt.param_groups[0])
    for p in pairs:
        assert set(opt.state[p.a]) - {"step", "nonfinite_skips", "update_skips"} == keys_a
        assert set(opt.state[p.b]) == keys_b


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_an_invalid_value_set_mid_run_is_refused_at_the_next_step(info):
    pairs, opt, _ = build(info, "plain", torch.float64)
    run(opt, pairs, targets(), 1)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param group 0 \(changed mid-run\?\): Invalid learning rate"):
        run(opt, pairs, targets(), 1)


# ------------------------------------------------------------------- torch's keyword arguments

TORCH_DEFAULTS = dict(foreach=None, fused=None, capturable=False, differentiable=False, maximize=False)


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_torch_keyword_arguments_at_their_defaults_change_nothing(info):
    tgts = targets()
    runs = []
    for kwargs in ({}, TORCH_DEFAULTS, dict(fused=False)):
        pairs, opt, _ = build(info, "plain", torch.float64, **kwargs)
        run(opt, pairs, tgts, 3)
        runs.append(tensors(pairs))
        assert all(opt.param_groups[0][k] is kwargs.get(k, v) for k, v in TORCH_DEFAULTS.items())
    assert all(torch.equal(x, y) for other in runs[1:] for x, y in zip(runs[0], other))


@pytest.mark.parametrize("key", ["fused", "capturable", "differentiable"])
@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_unsupported_torch_options_are_refused_saying_why(info, key):
    pairs = make_pairs("plain", torch.float64)
    with pytest.raises(ValueError, match=rf"{key}=True is not supported: .*pass {key}="):
        info.cls(pairs, lr=info.lr, **{key: True})
    with pytest.raises(ValueError, match=rf"param group 0: {key}=True is not supported"):
        LowRankOptimizer([{"pairs": pairs, key: True}], strategy=info.name)
    with pytest.raises(ValueError, match=r"Invalid foreach: 'yes'"):
        info.cls(pairs, lr=info.lr, foreach="yes")


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_maximize_ascends_exactly_as_minimizing_the_negated_objective(info):
    """``maximize=True`` on ``−f`` is minimizing ``f``: negation is exact, so bit for bit."""
    tgts = targets()
    results = []
    for maximize, sign in ((False, 1.0), (True, -1.0)):
        pairs, opt, _ = build(info, "rank_dim_first", torch.float32, maximize=maximize)
        run(opt, pairs, tgts, 4, sign=sign)
        results.append(tensors(pairs))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_maximize_in_the_fallback_group_is_torch_adamw_maximize():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    opt = LowRankOptimizer(
        [{"pairs": make_pairs("plain", torch.float64)}, {"params": [w], "weight_decay": 0.1}], lr=1e-2, maximize=True
    )
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.1, foreach=False, maximize=True)
    for p, o in ((w, opt), (w_ref, ref)):
        for _ in range(3):
            o.zero_grad()
            (p.cos().sum()).backward()
            o.step()
    assert torch.equal(w, w_ref)


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_foreach_false_steps_each_pair_alone_with_the_same_result(info, monkeypatch):
    sizes = []
    real = LowRankOptimizer._strategy

    def recording(name):
        # the driver calls update for a group alone, update_groups for groups the strategy couples
        strat = real(name)
        update, update_groups = strat.update, strat.update_groups
        strat.update = lambda batches, hp: (sizes.append([b.a.shape[0] for b in batches]), update(batches, hp))[1]
        strat.update_groups = lambda groups: (
            sizes.extend([b.a.shape[0] for b in batches] for batches, _ in groups),
            update_groups(groups),
        )[1]
        return strat

    monkeypatch.setattr(LowRankOptimizer, "_strategy", staticmethod(recording))
    tgts = targets()
    results = []
    for foreach in (None, False):
        sizes.clear()
        pairs, opt, _ = build(info, "plain", torch.float64, foreach=foreach)
        run(opt, pairs, tgts, 3)
        results.append(tensors(pairs))
        assert sizes == ([[2]] if foreach is None else [[1, 1]]) * 3
    # float64, batched vs single LAPACK/BLAS calls: only the summation order can differ, 1e-12
    # is ~1e4 ulps of headroom over 3 steps of O(1) quantities
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- lr, groups, gradients


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_tensor_lr_steps_like_a_float_lr_and_follows_schedulers(info):
    tgts = targets()
    results = []
    for lr in (info.lr, torch.tensor(info.lr, dtype=torch.float64)):
        pairs = make_pairs("plain", torch.float64)
        opt = info.cls(pairs, lr=lr)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=3)
        run(opt, pairs, tgts, 4, sched)
        results.append(tensors(pairs))
    # float64: a 0-dim float64 lr and a Python float enter the same products; 1e-13 leaves
    # room for a different order of the scalar multiplications only
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_per_group_weight_decay_acts_on_its_group_only(info):
    if "weight_decay" not in info.strategy.defaults:
        pytest.skip(f"{info.name} has no weight_decay")
    tgts = targets()
    runs = []
    for wd in (0.0, 0.5):
        pairs = make_pairs("plain", torch.float64)
        opt = info.cls([{"pairs": pairs[:1], "weight_decay": wd}, {"pairs": pairs[1:]}], lr=info.lr, **info.independent)
        run(opt, pairs, tgts, 3)
        runs.append(tensors(pairs))
    assert not torch.equal(runs[0][0], runs[1][0])  # the decayed group moved differently
    assert all(torch.equal(x, y) for x, y in zip(runs[0][2:], runs[1][2:]))  # the other did not


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_each_step_moves_exactly_the_factors_the_strategy_declares(info):
    tgts = targets()
    # the defaults and each boolean hyperparameter switched (e.g. alternate=False)
    settings = [{}] + [{k: not v} for k, v in info.strategy.defaults.items() if isinstance(v, bool)]
    for hp in settings:
        pairs = make_pairs("plain", torch.float64)
        opt = info.cls(pairs, lr=info.lr, **info.independent, **hp)
        for step in range(4):
            moves = [declared_moves(opt, p.a) for p in pairs]
            assert any(any(m) for m in moves), f"{hp}: step {step} declares no factor moves"
            before = tensors(pairs)
            run(opt, pairs, tgts, 1)
            for x, y, moved in zip(before, tensors(pairs), (m for pair in moves for m in pair)):
                assert torch.equal(x, y) != moved, f"{hp}: step {step} declared {moves}"


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_zero_gradients_leave_the_factors_unchanged_and_the_state_finite(info):
    pairs, opt, _ = build(info, "plain", torch.float32)
    before = tensors(pairs)
    for p in pairs:
        p.a.grad, p.b.grad = torch.zeros_like(p.a), torch.zeros_like(p.b)
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, tensors(pairs)))
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values())
    run(opt, pairs, targets(), 2)
    for p in pairs:
        p.a.grad.zero_(), p.b.grad.zero_()
    opt.step()
    assert all(torch.isfinite(t).all() for t in tensors(pairs))


# ------------------------------------------------------------------------------ HF Trainer


class _Net(torch.nn.Module):
    """Linear, embedding and conv LoRA layers (every stored layout PEFT gives) and a 2-class head."""

    def __init__(self):
        super().__init__()
        # sizes at which BLAS picks layout-dependent kernels (M, N above)
        self.emb = torch.nn.Embedding(M, N)
        self.q = torch.nn.Linear(N, M)
        self.c2 = torch.nn.Conv2d(20, 24, (2, 2))
        self.head = torch.nn.Linear(M + 24, 2)

    def forward(self, ids, img, labels):
        h = torch.cat([self.q(self.emb(ids).mean(1)), self.c2(img).mean((2, 3))], -1)
        logits = self.head(h)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _trainer(info, out_dir, steps):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lowrank_geom.peft import lora_pairs, non_pair_parameters

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=R, lora_alpha=16, target_modules=["emb", "q", "c2"], modules_to_save=["head"])
    model = peft.get_peft_model(_Net(), cfg)  # PEFT's default init: one factor of each pair is zero
    pairs = lora_pairs(model)
    opt = info.cls([{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}], lr=info.lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4)
    g = torch.Generator().manual_seed(5)
    data = [
        dict(
            ids=torch.randint(0, M, (4,), generator=g),
            img=torch.randn(20, 5, 4, generator=g),
            labels=torch.randint(0, 2, (), generator=g),
        )
        for _ in range(32)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        save_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="steps",
    )
    return model, transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_trainer_resume_from_checkpoint_continues_bit_identically(info, tmp_path):
    """HF ``Trainer(optimizers=(opt, sched))`` saves ``optimizer.pt`` and resumes with
    ``resume_from_checkpoint``: the resumed run ends exactly where the uninterrupted one does."""
    model, trainer = _trainer(info, tmp_path, 6)
    trainer.train()
    resumed_model, resumed = _trainer(info, tmp_path / "unused", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    ours = dict(model.named_parameters())
    theirs = dict(resumed_model.named_parameters())
    fresh = dict(_trainer(info, tmp_path / "fresh", 6)[0].named_parameters())
    assert any(not torch.equal(ours[n], fresh[n]) for n in ours if "lora_" in n)  # it trained
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
