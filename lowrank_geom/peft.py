"""Pairs from a PEFT model, by module (never by parameter order). PEFT is imported lazily.

PEFT's ``ΔW = scaling · lora_B.weight @ lora_A.weight``; in the paper's ``Z = A Bᵀ`` that is
``A = lora_B.weight`` (``out×r``) and ``B = lora_A.weight``ᵀ (``in×r``, stored ``r×in``). For
embeddings PEFT uses ``ΔW = scaling · (lora_embedding_B @ lora_embedding_A)ᵀ`` (``num_embeddings ×
embedding_dim``), so ``A = lora_embedding_A``ᵀ and ``B = lora_embedding_B``. In both cases the
factor PEFT initializes to zero is the paper's ``A``. Conv kernels flatten ``in × kh × kw``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lowrank_geom.pairs import LoRAPair


def _lora_layer_cls():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - exercised only without peft
        raise ImportError(
            "lowrank_geom.peft needs PEFT: pip install 'lowrank_geom[peft]'"
        ) from err
    return LoraLayer


def lora_pairs(model: torch.nn.Module, adapter_name: str | Iterable[str] | None = None) -> list[LoRAPair]:
    """Every trainable LoRA pair of a PEFT model, found by module, in paper orientation.

    Args:
        model: a PEFT model (or any module containing ``peft`` LoRA layers).
        adapter_name: only these adapters (a name or an iterable of names); default all.

    Returns:
        One :class:`~lowrank_geom.LoRAPair` per (LoRA layer, adapter) whose two factors both
        require grad, named ``"<module name>[<adapter>]"``. Linear and Conv layers give
        ``A = lora_B.weight`` (rank dim 1) and ``B = lora_A.weight`` (rank dim 0); Embedding layers
        give ``A = lora_embedding_A`` (rank dim 0) and ``B = lora_embedding_B`` (rank dim 1).
        DoRA magnitudes and LoRA biases are not in pairs: see :func:`non_pair_parameters`.

    Raises:
        ValueError: if no pair is found.
    """
    lora_layer = _lora_layer_cls()
    wanted = None if adapter_name is None else ({adapter_name} if isinstance(adapter_name, str) else set(adapter_name))
    pairs: list[LoRAPair] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        for key in module.lora_A.keys():
            if wanted is not None and key not in wanted:
                continue
            a, b = module.lora_B[key].weight, module.lora_A[key].weight
            if a.requires_grad and b.requires_grad:
                pairs.append(LoRAPair(a, b, a_rank_dim=1, b_rank_dim=0, name=f"{module_name}[{key}]"))
        for key in module.lora_embedding_A.keys():
            if wanted is not None and key not in wanted:
                continue
            a, b = module.lora_embedding_A[key], module.lora_embedding_B[key]
            if a.requires_grad and b.requires_grad:
                pairs.append(LoRAPair(a, b, a_rank_dim=0, b_rank_dim=1, name=f"{module_name}[{key}]"))
    if not pairs:
        which = "any adapter" if wanted is None else f"adapter(s) {sorted(wanted)}"
        raise ValueError(
            f"no trainable LoRA pair found for {which}: looked for peft.tuners.lora.LoraLayer modules "
            "with lora_A/lora_B or lora_embedding_A/lora_embedding_B that require grad"
        )
    return pairs


def non_pair_parameters(model: torch.nn.Module, pairs: Iterable[LoRAPair]) -> list[torch.Tensor]:
    """Trainable parameters of ``model`` that are in no pair (heads, biases, DoRA magnitudes).

    Put them in the optimizer's AdamW fallback group:
    ``LowRankOptimizer([{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}])``.
    """
    in_pairs = {id(t) for p in pairs for t in (p.a, p.b)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
