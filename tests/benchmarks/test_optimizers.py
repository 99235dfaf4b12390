"""``benchmarks.optimizers``: configs, PairModel orientation, every optimizer builds and steps."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import optimizers as O
from benchmarks.common import config_lr
from tests.strategy_table import declared_moves

SHAPES = [(6, 5, 2), (4, 7, 3)]


@pytest.fixture(scope="module")
def model64():
    return O.PairModel(SHAPES, dtype=torch.float64, seed=0)


def _loss(model) -> torch.Tensor:
    # a mean: LoRA-RITE skips steps whose unmagnified gradient has RMS > 1 (authors' default)
    return sum(((z - 0.3) ** 2).mean() for z in model.zs())


def test_lists_and_configs_are_consistent():
    from lowrank_geom.strategies import discovered_strategies, get_strategy

    # the package's strategies come from the registry, built-in ones first in report order
    assert sorted(O.PACKAGE_OPTIMIZERS) == sorted(discovered_strategies())
    assert O.PACKAGE_OPTIMIZERS[:4] == ["lora_rite", "scaled_gd", "scaled_adam", "one_sided_adagrad"]
    assert O.OPTIMIZERS == O.PACKAGE_OPTIMIZERS + O.EXTERNAL_OPTIMIZERS
    assert len(set(O.OPTIMIZERS)) == len(O.OPTIMIZERS)
    claims = {n for n in O.PACKAGE_OPTIMIZERS if get_strategy(n).invariance == "GL(r)"}
    assert set(O.INVARIANT) == claims | {"pyopt_lora_rite"} and {"lora_rite", "scaled_gd"} <= claims
    # every config is an optimizer's; only package strategies may go without one (default_config)
    configs = {p.stem for p in O.CONFIG_DIR.glob("*.json")}
    assert configs <= set(O.OPTIMIZERS) and set(O.EXTERNAL_OPTIMIZERS) <= configs
    for name in O.OPTIMIZERS:
        cfg = O.load_config(name)
        assert cfg["name"] == name and cfg["lr"]["default"] > 0
        assert config_lr(name, "no-such-suite") == cfg["lr"]["default"]


def test_a_strategy_without_a_config_runs_at_its_defaults(monkeypatch, tmp_path, model64):
    # a new strategy file needs no benchmarks/configs entry: it runs untuned until --tune writes one
    monkeypatch.setattr(O, "CONFIG_DIR", tmp_path)
    cfg = O.load_config("scaled_gd")
    assert cfg == O.default_config("scaled_gd") and config_lr("scaled_gd", "convex") == 1e-2
    opt = O.make_optimizer("scaled_gd", model64)
    assert opt.param_groups[0]["strategy"] == "scaled_gd"
    with pytest.raises(O.ConfigError, match="no config for optimizer 'adam'"):
        O.load_config("adam")


@pytest.mark.parametrize("name", O.OPTIMIZERS)
def test_every_optimizer_builds_and_steps_on_a_pair_model(name, model64):
    model64.set_factors(O._random_factors(SHAPES, torch.float64, 1))
    before = [(a.detach().clone(), b.detach().clone()) for a, b in model64.factors()]
    opt = O.make_optimizer(name, model64)
    assert isinstance(opt, torch.optim.Optimizer)
    # exactly the LoRA factors, each once
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model64.trainable_parameters()}
    assert len(ids) == 2 * len(SHAPES)
    # methods that alternate (LoFT, AltLoRA) declare which factor their first step moves
    moves = [declared_moves(opt, pair.a) for pair in model64.pairs()]
    assert all(any(m) for m in moves), name
    opt.zero_grad()
    _loss(model64).backward()
    opt.step()
    for (a, b), (a0, b0), (on_a, on_b) in zip(model64.factors(), before, moves):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a, a0) != on_a and torch.equal(b, b0) != on_b, name
    # every state tensor counted, by an independent walk over the state
    expected = sum(v.numel() * v.element_size() for st in opt.state.values() for v in _tensors(st))
    assert O.state_bytes(opt) == expected and (expected > 0) == any(opt.state.values())


def _tensors(x):
    """Every tensor in a (nested) state value."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for v in x for t in _tensors(v)] if isinstance(x, (list, tuple)) else []


def test_pair_model_orientation_matches_peft(model64):
    model64.set_factors(O._random_factors(SHAPES, torch.float64, 2))
    for layer, (a, b), z, pair, (m, n, r) in zip(
        model64._layers, model64.factors(), model64.zs(), model64.pairs(), SHAPES
    ):
        assert a.shape == (m, r) and b.shape == (n, r)
        assert a.data_ptr() == layer.lora_B["default"].weight.data_ptr()  # views, not copies
        assert layer.scaling["default"] == 1.0
        delta = layer.get_delta_weight("default")
        torch.testing.assert_close(z, delta, rtol=0, atol=0)
        torch.testing.assert_close(a @ b.T, delta, rtol=0, atol=0)
        # lowrank_geom.peft.lora_pairs agrees: A = lora_B.weight (rank dim 1), B = lora_A.weight (rank dim 0)
        assert pair.a is layer.lora_B["default"].weight and pair.b is layer.lora_A["default"].weight
        assert pair.a_rank_dim % 2 == 1 and pair.b_rank_dim % 2 == 0
    # a forward pass through PEFT adds exactly x Zᵀ (the base weight is zero)
    x = torch.randn(3, SHAPES[0][1], dtype=torch.float64)
    y = model64._layers[0](x)
    torch.testing.assert_close(y, x @ model64.zs()[0].T)


def test_set_factors_round_trip_and_shape_check(model64):
    f = O._random_factors(SHAPES, torch.float64, 3)
    model64.set_factors(f)
    for (a, b), (a2, b2) in zip(f, model64.factors()):
        assert torch.equal(a, a2) and torch.equal(b, b2)
    with pytest.raises(ValueError, match="shape mismatch"):
        model64.set_factors([(f[0][1], f[0][0]), f[1]])


def test_pair_model_float32_and_peft_init():
    m = O.PairModel([(8, 4, 2)], init="peft", seed=5)
    a, b = m.factors()[0]
    assert a.dtype == torch.float32 and torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0
    m2 = O.PairModel([(8, 4, 2)], init="peft", seed=5)
    assert torch.equal(m2.factors()[0][1], b)  # seeded


def test_pyopt_lora_rite_pairs_like_ours(model64):
    opt = O.make_optimizer("pyopt_lora_rite", model64)
    params = opt.param_groups[0]["params"]
    for i, pair in enumerate(model64.pairs()):
        assert params[2 * i] is pair.a and params[2 * i + 1] is pair.b
    assert opt.param_groups[0]["lora_l_dim"] == 1 and opt.param_groups[0]["lora_r_dim"] == 0


def test_leaf_pairs_for_tensor_optimizers():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(5, 2, generator=g).requires_grad_(), torch.randn(4, 2, generator=g).requires_grad_())]
    leaf = O.LeafPairs(pairs)
    for name in ("lora_rite", "sgd", "pyopt_lora_rite"):
        opt = O.make_optimizer(name, leaf, lr=1e-2)
        before = pairs[0][0].detach().clone()
        opt.zero_grad()
        (leaf.zs()[0] ** 2).mean().backward()
        opt.step()
        assert not torch.equal(before, pairs[0][0])
    with pytest.raises(TypeError, match="PairModel"):
        O.make_optimizer("loraplus", leaf)


def test_config_schema_errors(tmp_path, monkeypatch):
    good = O.load_config("adam")
    O.validate_config(good, "adam.json", "adam")
    bad_cases = [
        ({k: v for k, v in good.items() if k != "lr"}, "missing key"),
        ({**good, "lr": {"invariance": 1e-3}}, "'default'"),
        ({**good, "lr": {"default": -1.0}}, "positive finite"),
        ({**good, "kwargs": []}, "'kwargs' must be a dict"),
        ({**good, "library": "Adam"}, "dotted path"),
        ({**good, "extra": 1}, "unknown key"),
        ({**good, "kwargs": {"lr": 0.1}}, "not in 'kwargs'"),
    ]
    for cfg, msg in bad_cases:
        with pytest.raises(O.ConfigError, match=msg):
            O.validate_config(cfg, "adam.json", "adam")
    with pytest.raises(O.ConfigError, match="file is for"):
        O.validate_config(good, "x.json", "sgd")
    monkeypatch.setattr(O, "CONFIG_DIR", tmp_path)
    (tmp_path / "adam.json").write_text(json.dumps({**good, "tuned": 3}))
    with pytest.raises(O.ConfigError, match=r"adam\.json.*'tuned' must be a str"):
        O.load_config("adam")
    with pytest.raises(O.ConfigError, match="no config"):
        O.load_config("nope")


def test_tune_writes_best_lr_back(tmp_path, monkeypatch):
    monkeypatch.setattr(O, "CONFIG_DIR", tmp_path)
    (tmp_path / "sgd.json").write_text(json.dumps(_sgd_cfg()))
    grid = O.log_grid(1e-3, 1e1, 1)
    assert grid == [1e-3, 1e-2, 1e-1, 1.0, 10.0]

    def score(name, lr):
        if lr > 1:
            raise RuntimeError("diverged")
        return (torch.log10(torch.tensor(lr)) + 1.2).abs().item()

    res = O.tune(score, ["sgd"], grid, suite="unit", metric="distance to 10^-1.2")
    assert res["sgd"]["best_lr"] == 0.1 and res["sgd"]["scores"][10.0] == float("inf")
    cfg = O.load_config("sgd")
    assert cfg["lr"]["unit"] == 0.1 and "unit: best of log grid" in cfg["tuned"]
    O.tune(score, ["sgd"], grid, suite="unit")  # re-tuning replaces the entry
    assert O.load_config("sgd")["tuned"].count("unit:") == 1


def _sgd_cfg():
    return {
        "name": "sgd",
        "label": "SGD",
        "library": "torch.optim.SGD",
        "kwargs": {"momentum": 0.0},
        "lr": {"default": 0.01},
        "tuned": "default: not swept",
    }
