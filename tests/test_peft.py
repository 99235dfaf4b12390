"""lora_pairs: pairs by module in paper orientation, robust to PEFT's parameter ordering."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lowrank_geom.pairs import factor_view

peft = pytest.importorskip("peft")
from lowrank_geom.peft import lora_pairs, non_pair_parameters  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.q = torch.nn.Linear(6, 5)
        self.v = torch.nn.Linear(6, 4)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.head = torch.nn.Linear(4, 2)


def wrap(**config):
    torch.manual_seed(0)
    # PEFT supports neither DoRA nor lora_bias on embeddings
    targets = ["q", "v", "conv"] if config else ["emb", "q", "v", "conv"]
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, modules_to_save=["head"], **config)
    return peft.get_peft_model(Net(), cfg)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()


def delta_weights(model, adapter="default"):
    return {name: m.get_delta_weight(adapter) for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.scaling}


def pair_z(pair):
    return factor_view(pair.a, pair.a_rank_dim) @ factor_view(pair.b, pair.b_rank_dim).T


def test_orientation_matches_peft_delta_weight_for_every_layer_type():
    model = wrap()
    randomize(model)
    deltas = delta_weights(model)
    pairs = lora_pairs(model)
    assert len(pairs) == 4
    for pair in pairs:
        module = pair.name.rsplit("[", 1)[0]
        delta = deltas[module]
        z = pair_z(pair)
        if "emb" in module:
            torch.testing.assert_close(z, delta)  # (num_embeddings, embedding_dim)
        else:
            torch.testing.assert_close(z, delta.reshape(delta.shape[0], -1))


def test_factor_views_are_views_not_copies():
    model = wrap()
    for pair in lora_pairs(model):
        for t, d in ((pair.a, pair.a_rank_dim), (pair.b, pair.b_rank_dim)):
            assert factor_view(t, d).data_ptr() == t.data_ptr()
            assert factor_view(t, d)._base is not None or factor_view(t, d).shape == t.shape


def test_paper_a_is_the_zero_factor_at_peft_init():
    for pair in lora_pairs(wrap()):
        assert torch.count_nonzero(pair.a) == 0 and torch.count_nonzero(pair.b) > 0


@pytest.mark.parametrize("variant", ["dora", "lora_bias", "two_adapters"])
def test_pairs_by_module_where_parameter_order_interleaves(variant):
    if variant == "dora":
        model = wrap(use_dora=True)
    elif variant == "lora_bias":
        model = wrap(lora_bias=True)
    else:
        model = wrap()
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q", "v"]))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    randomize(model)
    pairs = lora_pairs(model)
    names = {p.name for p in pairs}
    for adapter in (["default", "second"] if variant == "two_adapters" else ["default"]):
        deltas = delta_weights(model, adapter)
        for module, delta in deltas.items():
            if "emb" in module or "conv" in module and variant == "dora":
                continue
            pair = next(p for p in pairs if p.name == f"{module}[{adapter}]")
            torch.testing.assert_close(pair_z(pair), delta.reshape(delta.shape[0], -1) if "emb" not in module else delta)
    assert all("[" in n for n in names)
    # naive alternating pairing of named_parameters() gets these models wrong
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    naive_ok = all(
        p1.dim() >= 2 and p2.dim() >= 2 and n1.replace("lora_A", "X").replace("lora_embedding_A", "X") ==
        n2.replace("lora_B", "X").replace("lora_embedding_B", "X")
        for (n1, p1), (n2, p2) in zip(lora[::2], lora[1::2])
    ) and len(lora) % 2 == 0
    assert not naive_ok


def test_adapter_filter_and_no_pair_error():
    model = wrap()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    assert {p.name for p in lora_pairs(model, "second")} == {"base_model.model.q[second]"}
    assert len(lora_pairs(model, ["default", "second"])) == 5
    with pytest.raises(ValueError, match="no trainable LoRA pair found for adapter"):
        lora_pairs(model, "missing")
    with pytest.raises(ValueError, match="no trainable LoRA pair"):
        lora_pairs(torch.nn.Linear(3, 3))


def test_non_pair_parameters_are_what_the_fallback_group_needs():
    model = wrap(lora_bias=True)
    pairs = lora_pairs(model)
    rest = non_pair_parameters(model, pairs)
    in_pairs = {id(t) for p in pairs for t in (p.a, p.b)}
    assert rest and not any(id(p) in in_pairs for p in rest)
    assert {id(p) for p in rest} | in_pairs == {id(p) for p in model.parameters() if p.requires_grad}


def test_optimizer_trains_a_peft_model_with_a_fallback_group():
    from lowrank_geom import LowRankOptimizer

    model = wrap()
    pairs = lora_pairs(model)
    opt = LowRankOptimizer([{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}], lr=1e-2)
    x = torch.randn(8, 6)
    before = [p.a.detach().clone() for p in pairs]
    for _ in range(3):
        opt.zero_grad()
        (1e-3 * model.base_model.model.q(x).pow(2).sum()).backward()  # small: no update skipping
        opt.step()
    q_pair = next(p for p in pairs if ".q[" in p.name)
    assert torch.count_nonzero(q_pair.a) > 0 and torch.isfinite(q_pair.a).all()
    assert sum(torch.count_nonzero(p.a) for p in pairs) > sum(torch.count_nonzero(b) for b in before)


def test_importing_the_package_does_not_import_peft():
    code = "import lowrank_geom, sys; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
