"""lowrank_geom.init.lora_one: LoRA-One's spectral initialization on small PEFT models.

The expected factors come from the float64 NumPy transcription of the paper
(``tests/reference/lora_one.py::spectral_init``) applied to a gradient computed independently,
by autograd on a plain copy of the pre-trained network (no PEFT, no adapters). Tolerance 1e-10
relative: both sides are float64 SVDs of the same gradient (they differ by round-off, ~1e-15, and
by the sign of each singular pair, which is aligned before comparing; the singular values here are
separated by > 1e-2, so the vectors are well determined).

Agreement with the authors' code (``reinit_lora_modules`` of ``YuanheZ/LoRA-One`` at commit
01bba0596ee698e5e932fc073924f98307a55ca1, ``direction="LoRA-One"``, ``scale="stable"``; run
outside the repository on a 12-10-8-3 MLP, rank 2 on two layers, rsLoRA α = 16, γ = 4, four
batches of 16): with ``normalize=True`` the factors, ``lora_B @ lora_A`` and the model's output
agree to 7e-7 relative, the float32 rounding of the authors' ``grads.float()`` SVD.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lowrank_geom import LowRankOptimizer, available_strategies
from tests.reference.lora_one import spectral_init

peft = pytest.importorskip("peft")
import lowrank_geom.init  # noqa: E402
from lowrank_geom.peft import lora_pairs  # noqa: E402

R, ALPHA, GAMMA = 2, 3, 8.0  # scaling = 1.5: a forgotten PEFT scaling fails the output check
RTOL = 1e-10


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


def data(n_batches=3, size=10):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 7, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n_batches)
    ]


def loss_fn(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def wrap(base, targets=("0", "2"), **config):
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), **config)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def reference_gradients(base, batches):
    """Mean over batches of ``∇_W L`` of the plain network, by autograd (no package code)."""
    model = copy.deepcopy(base)
    weights = {name: mod.weight for name, mod in model.named_children() if isinstance(mod, torch.nn.Linear)}
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()))
        for name, g in zip(weights, grads):
            total[name] += g / len(batches)
    return {name: g.numpy() for name, g in total.items()}


def close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max(), err_msg=what)


@pytest.mark.parametrize("normalize", [False, True])
def test_factors_and_output_match_the_paper(normalize):
    base, batches = net(), data()
    model = wrap(base)
    sigma = lowrank_geom.init.lora_one(model, batches, loss_fn, gamma=GAMMA, normalize=normalize)
    grads = reference_gradients(base, batches)
    adapted = copy.deepcopy(base)
    for name in ("0", "2"):
        layer = model.base_model.model[int(name)]
        lora_a, lora_b = spectral_init(grads[name], R, GAMMA, normalize)
        got_a, got_b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
        signs = np.sign(np.sum(got_b * lora_b, axis=0))  # each singular pair's sign is arbitrary
        close(got_a, signs[:, None] * lora_a, f"lora_A of {name}")
        close(got_b, signs[None, :] * lora_b, f"lora_B of {name}")
        close(sigma[f"base_model.model.{name}[default]"].numpy(), np.linalg.svd(grads[name])[1][:R], "σ")
        # the paper's adapted weight: W + s·lora_B lora_A, with W itself unchanged
        with torch.no_grad():
            adapted[int(name)].weight += torch.tensor(layer.scaling["default"] * lora_b @ lora_a)
        assert torch.equal(layer.get_base_layer().weight, base[int(name)].weight)
    x = batches[0][0]
    close(model(x).detach().numpy(), adapted(x).detach().numpy(), "model output after the init")


def test_unnormalized_init_is_one_projected_gradient_step():
    # W + s·B A = W − (s/γ)·[∇W]_r without Algorithm 1's line 3, on the middle layer (5×6 gradient)
    base, batches = net(), data()
    model = wrap(base)
    lowrank_geom.init.lora_one(model, batches, loss_fn, gamma=GAMMA, normalize=False)
    g = reference_gradients(base, batches)["2"]
    u, s, vt = np.linalg.svd(g)
    step = -(1.5 / GAMMA) * (u[:, :R] * s[:R]) @ vt[:R]
    layer = model.base_model.model[2]
    close(layer.get_delta_weight("default").detach().numpy(), step, "ΔW")


def test_default_init_is_algorithm_1_normalized_step():
    # Algorithm 1 divides S by S[0,0] (line 3): W + s·B A = W − (s/(γσ₁))·[∇W]_r, of spectral norm s/γ
    base, batches = net(), data()
    model = wrap(base)
    lowrank_geom.init.lora_one(model, batches, loss_fn, gamma=GAMMA)
    g = reference_gradients(base, batches)["2"]
    u, s, vt = np.linalg.svd(g)
    step = -(1.5 / (GAMMA * s[0])) * (u[:, :R] * s[:R]) @ vt[:R]
    layer = model.base_model.model[2]
    close(layer.get_delta_weight("default").detach().numpy(), step, "ΔW")


def test_state_is_restored_and_training_proceeds_with_every_strategy():
    base, batches = net(), data()
    for strategy in available_strategies():
        model = wrap(base)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        lowrank_geom.init.lora_one(model, batches, loss_fn, gamma=GAMMA)
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert all(p.grad is None for p in model.parameters())
        assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
        opt = LowRankOptimizer(lora_pairs(model), strategy=strategy, lr=1e-2)
        start = sum(loss_fn(model, b).item() for b in batches)
        for _ in range(5):  # 15 steps: enough to lower the loss, cheap enough for every strategy
            for b in batches:
                opt.zero_grad()
                loss_fn(model, b).backward()
                opt.step()
        assert sum(loss_fn(model, b).item() for b in batches) < start, strategy


def test_fan_in_fan_out_conv1d_is_initialized_in_the_linear_orientation():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = torch.nn.Sequential(transformers.pytorch_utils.Conv1D(5, 7), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    base = base.double()
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], fan_in_fan_out=True)
    )
    batches = data(2)
    lowrank_geom.init.lora_one(model, batches, loss_fn, gamma=GAMMA, normalize=False)
    plain = copy.deepcopy(base)
    g = sum(torch.autograd.grad(loss_fn(plain, b), plain[0].weight)[0] for b in batches) / 2  # in × out
    u, s, vt = np.linalg.svd(g.T.numpy())
    delta = model.base_model.model[0].get_delta_weight("default").detach().numpy()  # stored in × out
    close(delta.T, -(1.5 / GAMMA) * (u[:, :R] * s[:R]) @ vt[:R], "ΔW of Conv1D")


def test_rank_deficient_gradient_warns():
    base = net()
    model = wrap(base)
    with pytest.warns(UserWarning, match=r"rank 1 < r = 2"):
        lowrank_geom.init.lora_one(model, [data(1, size=1)[0]], loss_fn, gamma=GAMMA)


def test_errors():
    base, batches = net(), data()
    with pytest.raises(ValueError, match="Invalid gamma value"):
        lowrank_geom.init.lora_one(wrap(base), batches, loss_fn, gamma=0.0)
    with pytest.raises(ValueError, match="batches is empty"):
        lowrank_geom.init.lora_one(wrap(base), [], loss_fn)
    with pytest.raises(TypeError, match=r"pass \[batch\] for one"):
        lowrank_geom.init.lora_one(wrap(base), {"x": batches[0][0]})
    with pytest.raises(TypeError, match="needs loss_fn"):
        lowrank_geom.init.lora_one(wrap(base), batches)
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        lowrank_geom.init.lora_one(
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["4"])), batches, loss_fn
        )
    with pytest.raises(ValueError, match="full gradient is zero"):
        lowrank_geom.init.lora_one(wrap(base), batches, lambda m, b: 0.0 * loss_fn(m, b))
    emb = torch.nn.Sequential(torch.nn.Embedding(5, 7), torch.nn.Linear(7, 3)).double()
    emb_model = peft.get_peft_model(emb, peft.LoraConfig(r=R, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match="supports linear LoRA layers"):
        lowrank_geom.init.lora_one(emb_model, [(torch.tensor([1, 2]), torch.tensor([0, 1]))], loss_fn)
