"""lowrank_geom.peft: pairs by module in the paper's orientation, robust to PEFT's parameter order.

Every orientation claim is checked numerically against PEFT itself: ``scaling · A Bᵀ`` must equal
the layer's ``get_delta_weight(adapter)`` and the adapter's contribution to the layer's forward.
Tiny models are built locally; nothing is downloaded.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lowrank_geom.pairs import factor_view

peft = pytest.importorskip("peft")
from lowrank_geom.peft import lora_pairs, non_pair_parameters  # noqa: E402

LoraLayer = peft.tuners.lora.LoraLayer
R, ALPHA = 2, 3  # scaling = 1.5, so a forgotten scaling factor fails the numeric checks

GROUPED_CONV_WARNING = "ignore:LoRA adapter added to ConvNd layer with groups > 1:UserWarning"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.q = torch.nn.Linear(6, 5)
        self.v = torch.nn.Linear(6, 4)
        self.c1 = torch.nn.Conv1d(2, 3, 3)
        self.c2 = torch.nn.Conv2d(2, 3, (3, 2))
        self.pw = torch.nn.Conv2d(2, 3, 1)  # PEFT's 1x1 special case in get_delta_weight
        self.c3 = torch.nn.Conv3d(2, 3, (2, 3, 2))
        self.attn = torch.nn.MultiheadAttention(8, 2)  # in_proj pair + nested out_proj lora.Linear
        self.head = torch.nn.Linear(4, 2)


ALL = ["emb", "q", "v", "c1", "c2", "pw", "c3", "attn"]
# (expected A view shape, expected B view shape) per module, r = 2
VIEW_SHAPES = {
    "emb": ((11, R), (6, R)),
    "q": ((5, R), (6, R)),
    "v": ((4, R), (6, R)),
    "c1": ((3, R), (2 * 3, R)),
    "c2": ((3, R), (2 * 3 * 2, R)),
    "pw": ((3, R), (2, R)),
    "c3": ((3, R), (2 * 2 * 3 * 2, R)),
    "attn": ((3 * 8, R), (8, R)),
    "attn.base_layer.out_proj": ((8, R), (8, R)),
}


def wrap(targets=ALL, seed=0, **config):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, modules_to_save=["head"], **config)
    return peft.get_peft_model(Net(), cfg)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()


def short(pair):
    """'base_model.model.c2[default]' -> ('c2', 'default')."""
    module, adapter = pair.name[:-1].rsplit("[", 1)
    return module.removeprefix("base_model.model."), adapter


def layer_of(model, pair):
    return model.get_submodule(pair.name.rsplit("[", 1)[0])


def pair_z(pair):
    return factor_view(pair.a, pair.a_rank_dim) @ factor_view(pair.b, pair.b_rank_dim).T


def assert_pair_is_delta_weight(model, pair):
    """The numeric orientation check: scaling · A Bᵀ == the layer's own ΔW (2-D, out × in)."""
    layer = layer_of(model, pair)
    adapter = short(pair)[1]
    delta = layer.get_delta_weight(adapter)
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T  # stored in×out (GPT-2 Conv1D); Z is out×in
    z = pair_z(pair) * layer.scaling[adapter]
    assert z.shape == (delta.shape[0], delta[0].numel())
    torch.testing.assert_close(z, delta.reshape(delta.shape[0], -1), rtol=1e-5, atol=1e-6)


def naive_pairs(model):
    """What pairing by alternating order of trainable LoRA parameters gives (unordered, by id)."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return {frozenset((id(x), id(y))) for x, y in zip(lora[::2], lora[1::2])}, len(lora) % 2


def by_module(pairs):
    return {frozenset((id(p.a), id(p.b))) for p in pairs}


# --- orientation ----------------------------------------------------------------------------


def test_one_pair_per_lora_layer_in_module_order_with_module_names():
    model = wrap()
    pairs = lora_pairs(model)
    assert [short(p) for p in pairs] == [(m, "default") for m in ALL[:-1] + ["attn", "attn.base_layer.out_proj"]]
    assert all(p.name == f"base_model.model.{short(p)[0]}[default]" for p in pairs)


@pytest.mark.parametrize("module", list(VIEW_SHAPES))
def test_orientation_matches_peft_delta_weight_for_every_layer_type(module):
    model = wrap(seed=1)
    randomize(model)
    pair = next(p for p in lora_pairs(model) if short(p)[0] == module)
    layer = layer_of(model, pair)
    if module == "emb":
        assert pair.a is layer.lora_embedding_A["default"] and pair.b is layer.lora_embedding_B["default"]
        assert (pair.a_rank_dim, pair.b_rank_dim) == (0, 1)
    else:
        assert pair.a is layer.lora_B["default"].weight and pair.b is layer.lora_A["default"].weight
        assert (pair.a_rank_dim, pair.b_rank_dim) == (1, 0)
    a_shape, b_shape = VIEW_SHAPES[module]
    assert factor_view(pair.a, pair.a_rank_dim).shape == a_shape
    assert factor_view(pair.b, pair.b_rank_dim).shape == b_shape
    assert_pair_is_delta_weight(model, pair)


def test_forward_adds_exactly_scaling_times_z_for_linear_and_embedding():
    """Independent of get_delta_weight: what the adapter adds to the layer's output."""
    model = wrap(seed=2)
    randomize(model)
    pairs = {short(p)[0]: p for p in lora_pairs(model)}
    q, emb = model.base_model.model.q, model.base_model.model.emb
    x = torch.randn(7, 6)
    torch.testing.assert_close(q(x) - q.base_layer(x), x @ (1.5 * pair_z(pairs["q"])).T)
    ids = torch.tensor([0, 3, 3, 10])
    # Z is num_embeddings × embedding_dim: row i is what token i's embedding gains
    torch.testing.assert_close(emb(ids) - emb.base_layer(ids), 1.5 * pair_z(pairs["emb"])[ids])


def test_fan_in_fan_out_conv1d_gives_z_in_linear_orientation():
    from transformers.pytorch_utils import Conv1D  # GPT-2's layer, weight stored in × out

    torch.manual_seed(3)
    model = peft.get_peft_model(
        torch.nn.Sequential(Conv1D(5, 6)),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], fan_in_fan_out=True),
    )
    randomize(model)
    (pair,) = lora_pairs(model)
    assert factor_view(pair.a, pair.a_rank_dim).shape == (5, R)  # out × r
    assert layer_of(model, pair).get_delta_weight("default").shape == (6, 5)
    assert_pair_is_delta_weight(model, pair)
    x = torch.randn(4, 6)
    layer = model.base_model.model[0]
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (1.5 * pair_z(pair)).T)


def test_factor_views_are_views_of_the_parameters_not_copies():
    model = wrap()
    for pair in lora_pairs(model):
        for t, d in ((pair.a, pair.a_rank_dim), (pair.b, pair.b_rank_dim)):
            view = factor_view(t, d)
            assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), pair.name
            with torch.no_grad():
                view[-1, -1] = 123.0  # a write through the view lands in the parameter
            assert (t == 123.0).sum() == 1, pair.name


def test_paper_a_is_exactly_zero_at_peft_default_init():
    pairs = lora_pairs(wrap())
    assert len(pairs) == len(VIEW_SHAPES)
    for pair in pairs:
        assert torch.count_nonzero(pair.a) == 0, pair.name
        assert torch.count_nonzero(pair.b) == pair.b.numel(), pair.name


# --- pairing by module where named_parameters() order interleaves ----------------------------


def test_naive_alternating_pairing_is_right_only_on_a_plain_single_adapter_model():
    model = wrap()
    naive, odd = naive_pairs(model)
    assert not odd and naive == by_module(lora_pairs(model))  # the control: same pairs here


def _variant(variant):
    if variant == "dora":
        return wrap(["emb", "q", "v", "c2", "c3"], use_dora=True), ["default"]
    if variant == "lora_bias":  # PEFT refuses lora_bias on embeddings
        return wrap(["q", "v", "c1", "c2"], lora_bias=True), ["default"]
    model = wrap()
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=2, target_modules=["emb", "q", "c2"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)  # PEFT freezes the adapter that is not active
    return model, ["default", "second"]


@pytest.mark.parametrize("variant", ["dora", "lora_bias", "two_adapters"])
def test_pairs_by_module_where_parameter_order_interleaves(variant):
    model, adapters = _variant(variant)
    randomize(model)
    pairs = lora_pairs(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    expected = [f"{n}[{k}]" for n, m in layers for k in [*m.lora_A.keys(), *m.lora_embedding_A.keys()]]
    assert [p.name for p in pairs] == expected
    assert {short(p)[1] for p in pairs} == set(adapters)
    for pair in pairs:
        layer, adapter = layer_of(model, pair), short(pair)[1]
        if adapter in layer.lora_embedding_A:
            assert pair.a is layer.lora_embedding_A[adapter] and pair.b is layer.lora_embedding_B[adapter]
        else:
            assert pair.a is layer.lora_B[adapter].weight and pair.b is layer.lora_A[adapter].weight
        assert_pair_is_delta_weight(model, pair)
    # naive alternating pairing of named_parameters() gets every one of these models wrong
    naive, odd = naive_pairs(model)
    assert odd or naive != by_module(pairs)
    extras = {"dora": "lora_magnitude_vector", "lora_bias": "lora_B.default.bias"}.get(variant)
    if extras:  # the interleaved extras are exactly what non_pair_parameters adds besides the head
        rest = {id(p) for p in non_pair_parameters(model, pairs)}
        want = {id(p) for n, p in model.named_parameters() if p.requires_grad and (extras in n or "head" in n)}
        assert rest == want and rest


def test_two_adapters_interleave_in_named_parameters():
    model, _ = _variant("two_adapters")
    names = [
        n.removeprefix("base_model.model.")
        for n, _ in model.named_parameters()
        if n.startswith("base_model.model.q.lora_")
    ]
    assert names == [
        "q.lora_A.default.weight",
        "q.lora_A.second.weight",
        "q.lora_B.default.weight",
        "q.lora_B.second.weight",
    ]


# --- selection and errors -----------------------------------------------------------------------


def test_adapter_name_filter_accepts_a_str_or_any_iterable():
    model, _ = _variant("two_adapters")
    second = ["base_model.model.emb[second]", "base_model.model.q[second]", "base_model.model.c2[second]"]
    assert [p.name for p in lora_pairs(model, "second")] == second
    n_all = len(lora_pairs(model))
    assert n_all == len(VIEW_SHAPES) + 3
    for names in (
        ["default", "second"],
        ("second", "default"),
        {"default", "second"},
        (n for n in ["default", "second"]),
    ):
        assert len(lora_pairs(model, names)) == n_all
    assert len(lora_pairs(model, ["default"])) == len(VIEW_SHAPES)
    with pytest.raises(
        ValueError, match=r"adapter\(s\) \['missing'\] not found.*adapters present: \['default', 'second'\]"
    ):
        lora_pairs(model, ["default", "missing"])
    with pytest.raises(TypeError, match="adapter_name"):
        lora_pairs(model, [1])


def test_inactive_adapter_is_frozen_by_peft_so_it_has_no_pair():
    model = wrap()
    model.add_adapter("second", peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q"]))
    assert all(short(p)[1] == "default" for p in lora_pairs(model))
    with pytest.raises(ValueError, match=r"no trainable LoRA pair found for adapter\(s\) \['second'\]"):
        lora_pairs(model, "second")


def test_no_pair_error_says_what_was_searched():
    with pytest.raises(
        ValueError, match=r"no trainable LoRA pair found for any adapter: searched 0 peft\.tuners\.lora\.LoraLayer"
    ):
        lora_pairs(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    model = wrap(["q", "v"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"searched 2 peft\.tuners\.lora\.LoraLayer.*require grad"):
        lora_pairs(model)


def test_a_pair_with_one_frozen_factor_is_left_out_and_its_trainable_factor_falls_back():
    model = wrap(["q", "v"])
    q = model.base_model.model.q
    q.lora_A["default"].weight.requires_grad_(False)
    pairs = lora_pairs(model)
    assert [short(p)[0] for p in pairs] == ["v"]
    assert any(p is q.lora_B["default"].weight for p in non_pair_parameters(model, pairs))


@pytest.mark.parametrize(
    "config, extra", [({"use_dora": True}, "lora_magnitude_vector"), ({"lora_bias": True}, "lora_B")]
)
def test_non_pair_parameters_complete_the_trainable_set_without_overlap(config, extra):
    model = wrap(["q", "c2"], **config)
    pairs = lora_pairs(model)
    rest = non_pair_parameters(model, pairs)
    in_pairs = [id(t) for p in pairs for t in (p.a, p.b)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(set(map(id, rest))) == len(rest) and not set(map(id, rest)) & set(in_pairs)
    assert len(rest) + len(in_pairs) == len(trainable)
    assert [id(p) for p in rest] == [id(p) for p in trainable if id(p) not in set(in_pairs)]  # model order
    named = {id(p): n for n, p in model.named_parameters()}
    kinds = sorted({n.split(".")[3] if "lora_" in n else "head" for n in (named[id(p)] for p in rest)})
    assert kinds == sorted(["head", extra])  # lora_B: its bias


@pytest.mark.filterwarnings(GROUPED_CONV_WARNING)
def test_grouped_conv_is_refused_unless_frozen():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Linear(4, 4)),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0", "1"]),
    )
    with pytest.raises(ValueError, match=r"model\.0\[default\]: lora_B is a grouped conv.*target_modules"):
        lora_pairs(model)
    model.base_model.model[0].lora_B["default"].weight.requires_grad_(False)
    assert [short(p)[0] for p in lora_pairs(model)] == ["1"]


def test_a_variant_that_is_not_a_plain_product_is_refused():
    from peft.tuners.lora.config import KasaConfig

    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(6, 4)),
        peft.LoraConfig(r=R, target_modules=["0"], kasa_config=KasaConfig()),
    )
    with pytest.raises(ValueError, match=r"KasaLinearVariant changes ΔW"):
        lora_pairs(model)


class _Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w2 = torch.nn.Parameter(torch.randn(5, 4))
        self.experts = torch.nn.Parameter(torch.randn(3, 4, 5))


def test_target_parameters_plain_2d_is_a_pair_and_stacked_experts_are_refused():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(_Params()), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=["0.w2"])
    )
    randomize(model)
    (pair,) = lora_pairs(model)
    assert factor_view(pair.a, pair.a_rank_dim).shape == (5, R)
    assert_pair_is_delta_weight(model, pair)
    moe = peft.get_peft_model(torch.nn.Sequential(_Params()), peft.LoraConfig(r=R, target_parameters=["0.experts"]))
    with pytest.raises(ValueError, match="stacks 3 experts"):
        lora_pairs(moe)


# --- use with the optimizer, and the optional dependency -----------------------------------------


def test_optimizer_trains_a_peft_model_with_a_fallback_group():
    from lowrank_geom import LowRankOptimizer

    model = wrap()
    pairs = lora_pairs(model)
    opt = LowRankOptimizer([{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}], lr=1e-2)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        (1e-3 * model.base_model.model.q(x).pow(2).sum()).backward()  # small: no update skipping
        opt.step()
    q_pair = next(p for p in pairs if short(p)[0] == "q")
    assert torch.count_nonzero(q_pair.a) > 0 and torch.isfinite(q_pair.a).all()


def test_missing_peft_raises_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.tuners.lora", None)
    with pytest.raises(ImportError, match=r"pip install lowrank_geom\[peft\]"):
        lora_pairs(torch.nn.Linear(2, 2))
