"""LoRA pairs from a PEFT model, found by module (never by parameter order). PEFT is imported lazily.

How PEFT's factors map to the paper's ``Z = A Bᵀ`` (``A: m×r``, ``B: n×r``), with ``s`` the
layer's ``scaling[adapter]`` (``α/r``, or ``α/√r`` with rsLoRA):

- **Linear** (also ``nn.MultiheadAttention`` and GPT-2's ``Conv1D``): PEFT's
  ``ΔW = s · lora_B.weight @ lora_A.weight`` (``out×r`` @ ``r×in``), so ``A = lora_B.weight``
  (rank dim 1) and ``B = lora_A.weightᵀ`` (stored ``r×in``, rank dim 0).
- **Conv1d/2d/3d**: ``lora_A`` is a conv with weight ``r×in×kh×kw`` and ``lora_B`` a 1×1 conv
  with weight ``out×r×1×1``; ``ΔW[o, i, kh, kw] = s · Σ_k lora_B[o, k] lora_A[k, i, kh, kw]``, so
  ``A = lora_B.weight`` (rank dim 1, viewed ``out×r``) and ``B = lora_A.weight`` (rank dim 0,
  viewed ``(in·kh·kw)×r``), and ``Z`` is ``ΔW / s`` flattened to ``out × (in·kh·kw)``.
- **Embedding**: ``lora_embedding_A`` is ``r×num_embeddings`` and ``lora_embedding_B`` is
  ``embedding_dim×r``; PEFT's ``ΔW = s · (lora_embedding_B @ lora_embedding_A)ᵀ``, shaped like
  ``nn.Embedding.weight`` (``num_embeddings × embedding_dim``). As ``(B_peft A_peft)ᵀ =
  A_peftᵀ B_peftᵀ``, ``A = lora_embedding_Aᵀ`` (stored as is, rank dim 0) and
  ``B = lora_embedding_B`` (rank dim 1). The names swap relative to Linear: here PEFT's "A" is the
  paper's ``A``.

In every case the factor PEFT initializes to zero (``lora_B`` for Linear and Conv,
``lora_embedding_A`` for Embedding) is the paper's ``A``, and ``s · A Bᵀ`` equals the layer's
``get_delta_weight(adapter)`` (flattened to 2-D for conv; for ``fan_in_fan_out`` layers such as
GPT-2's ``Conv1D``, which store the weight ``in×out``, ``Z`` is ``out×in`` and equals its
transpose). The factors are passed as stored, with their rank dim recorded in the
:class:`~lowrank_geom.LoRAPair`; ``lowrank_geom.pairs.factor_view`` reads each as a
``(rows, r)`` view of the parameter, without a copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_geom.pairs import LoRAPair

# LoRA variants whose trainable update is still ``scaling · lora_B @ lora_A`` in the factors as
# stored (extra parameters such as DoRA's magnitude are outside the pair). Any other variant (KaSA's
# diagonal, BD-LoRA's block-diagonal storage, QA-LoRA's pooled input, MonteCLoRA's sampled noise,
# variants added to PEFT later) is refused rather than silently given the wrong geometry.
_PAIR_VARIANTS = frozenset(
    {
        "DoraLinearVariant",
        "DoraEmbeddingVariant",
        "DoraConv1dVariant",
        "DoraConv2dVariant",
        "DoraConv3dVariant",
        "ALoraLinearVariant",
        "VeloraLinearVariant",
        "MiCALinearVariant",
        "MiCAEmbeddingVariant",
        "ArrowLinearVariant",
    }
)


def _lora_layer_cls() -> type:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ImportError(
            "lowrank_geom.peft needs PEFT, which is an optional extra: pip install lowrank_geom[peft]"
        ) from err
    return LoraLayer


def _wanted(adapter_name: str | Iterable[str] | None) -> set[str] | None:
    if adapter_name is None:
        return None
    if isinstance(adapter_name, str):
        return {adapter_name}
    names = set(adapter_name)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_name must be a str or an iterable of str, got {adapter_name!r}")
    return names


def _unsupported(label: str, why: str) -> ValueError:
    return ValueError(
        f"{label}: {why}, so it is not a LoRA pair Z = A Bᵀ that lowrank_geom can optimize. Leave "
        "this module out of target_modules, freeze this adapter, or select other adapters with "
        "adapter_name."
    )


def _check_variant(module: torch.nn.Module, key: str, label: str) -> None:
    variant = getattr(module, "lora_variant", {}).get(key)
    if variant is not None and type(variant).__name__ not in _PAIR_VARIANTS:
        raise _unsupported(label, f"the LoRA variant {type(variant).__name__} changes ΔW = s·lora_B @ lora_A")


def _linear_or_conv_pair(module: torch.nn.Module, key: str, label: str) -> LoRAPair | None:
    lora_a, lora_b = module.lora_A[key], module.lora_B[key]
    b, a = getattr(lora_a, "weight", None), getattr(lora_b, "weight", None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not (a.requires_grad and b.requires_grad):
        return None
    _check_variant(module, key, label)
    if getattr(module, "num_experts", 1) != 1:
        raise _unsupported(label, f"it stacks {module.num_experts} experts' factors in one lora_A/lora_B")
    if getattr(module.get_base_layer(), "groups", 1) != 1:
        raise _unsupported(label, "lora_B is a grouped conv (base layer groups > 1), so ΔW is block-structured")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise _unsupported(label, f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__} without a weight")
    if a.ndim != b.ndim or a.ndim < 2 or any(d != 1 for d in a.shape[2:]) or a.shape[1] != b.shape[0]:
        raise _unsupported(
            label, f"lora_B.weight {tuple(a.shape)} and lora_A.weight {tuple(b.shape)} do not compose as out×r @ r×in"
        )
    return LoRAPair(a, b, a_rank_dim=1, b_rank_dim=0, name=label)


def _embedding_pair(module: torch.nn.Module, key: str, label: str) -> LoRAPair | None:
    a, b = module.lora_embedding_A[key], module.lora_embedding_B[key]
    if not (a.requires_grad and b.requires_grad):
        return None
    _check_variant(module, key, label)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise _unsupported(
            label,
            f"lora_embedding_B {tuple(b.shape)} and lora_embedding_A {tuple(a.shape)} do not compose as dim×r @ r×num",
        )
    return LoRAPair(a, b, a_rank_dim=0, b_rank_dim=1, name=label)


def lora_pairs(model: torch.nn.Module, adapter_name: str | Iterable[str] | None = None) -> list[LoRAPair]:
    """Every trainable LoRA pair of a PEFT model, found by module, in the paper's orientation.

    Iterates the model's ``peft.tuners.lora.LoraLayer`` modules (in ``named_modules()`` order) and,
    within each, its adapters (in the order they were added); never pairs by the order of
    ``named_parameters()``, which DoRA magnitudes, ``lora_bias`` and a second adapter interleave.
    The result is deterministic for a given model, as the optimizer's positional state needs.

    Orientation (see the module docstring for the table): Linear and Conv layers give
    ``A = lora_B.weight`` (rank dim 1) and ``B = lora_A.weight`` (rank dim 0, so ``B`` is its
    transpose; a conv kernel flattens ``in × kh × kw``); Embedding layers give
    ``A = lora_embedding_A`` (rank dim 0) and ``B = lora_embedding_B`` (rank dim 1). In every case
    the factor PEFT initializes to zero is ``A``, and ``scaling · A Bᵀ`` equals the layer's
    ``get_delta_weight(adapter)`` (flattened to 2-D for conv; transposed for ``fan_in_fan_out``).

    Only pairs whose two factors both require grad are returned: PEFT freezes adapters that are not
    active (e.g. one added with ``add_adapter``) and some variants freeze one factor. A factor whose
    partner is frozen is not in any pair; :func:`non_pair_parameters` returns it with the other
    trainable parameters that belong in a fallback group (DoRA's ``lora_magnitude_vector``,
    ``lora_bias`` biases, ``modules_to_save`` heads).

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers).
        adapter_name: only these adapters: a name or an iterable of names (default: all).

    Returns:
        One :class:`~lowrank_geom.LoRAPair` per (LoRA layer, adapter) with both factors trainable,
        named ``"<module name>[<adapter>]"``; the tensors are the model's own parameters.

    Raises:
        ImportError: if PEFT is not installed.
        ValueError: if an adapter named in ``adapter_name`` is on no LoRA layer, if no trainable pair
            is found, or if a trainable adapter is not a plain ``A Bᵀ`` pair (grouped conv, stacked
            MoE experts, a variant such as KaSA, BD-LoRA, QA-LoRA or MonteCLoRA).
    """
    lora_layer = _lora_layer_cls()
    wanted = _wanted(adapter_name)
    pairs: list[LoRAPair] = []
    seen_adapters: set[str] = set()
    n_layers = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        n_layers += 1
        kinds = ((module.lora_A.keys(), _linear_or_conv_pair), (module.lora_embedding_A.keys(), _embedding_pair))
        for keys, build in kinds:
            for key in keys:
                seen_adapters.add(key)
                if wanted is not None and key not in wanted:
                    continue
                pair = build(module, key, f"{module_name}[{key}]")
                if pair is not None:
                    pairs.append(pair)
    if wanted is not None and wanted - seen_adapters:
        raise ValueError(
            f"adapter(s) {sorted(wanted - seen_adapters)} not found on any of the {n_layers} LoRA layers "
            f"(peft.tuners.lora.LoraLayer); adapters present: {sorted(seen_adapters)}"
        )
    if not pairs:
        which = "any adapter" if wanted is None else f"adapter(s) {sorted(wanted)}"
        raise ValueError(
            f"no trainable LoRA pair found for {which}: searched {n_layers} peft.tuners.lora.LoraLayer "
            "module(s) for lora_A/lora_B or lora_embedding_A/lora_embedding_B factors that both "
            "require grad (PEFT freezes adapters that are not active)"
        )
    ids = [id(t) for p in pairs for t in (p.a, p.b)]
    if len(ids) != len(set(ids)):
        raise ValueError(
            "a LoRA factor tensor is shared by two pairs (tied adapters); they cannot be optimized as pairs"
        )
    return pairs


def non_pair_parameters(model: torch.nn.Module, pairs: Iterable[LoRAPair]) -> list[torch.Tensor]:
    """The trainable parameters of ``model`` that are in no pair, for an ordinary fallback group.

    Returns every parameter with ``requires_grad`` (in ``model.parameters()`` order, each once) that
    is neither factor of any of ``pairs``: ``modules_to_save`` heads, DoRA's
    ``lora_magnitude_vector``, ``lora_bias`` biases (``lora_B.<adapter>.bias``), other trainable
    base weights, and a LoRA factor whose partner is frozen. Without them in a group they would not
    be trained at all::

        pairs = lora_pairs(model)
        opt = LowRankOptimizer([{"pairs": pairs}, {"params": non_pair_parameters(model, pairs)}], lr=...)

    Args:
        model: the model the pairs came from.
        pairs: the pairs (e.g. from :func:`lora_pairs`) whose factors to leave out.
    """
    in_pairs = {id(t) for p in pairs for t in (p.a, p.b)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
