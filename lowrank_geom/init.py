r"""Initializations of LoRA adapters from data, usable with any strategy (PEFT is imported lazily).

:func:`lora_one` is the spectral initialization of LoRA-One (Zhang, Liu & Chen, ICML 2025,
arXiv 2502.01235, Algorithm 1, lines 1-5): the adapter starts at the best rank-r approximation of
one full gradient descent step of the frozen weight, normalized by its largest singular value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lowrank_geom.peft import lora_pairs

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def _lora_classes() -> tuple[type, type, type]:
    try:
        from peft.tuners.lora import Linear, LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as err:
        raise ImportError("lowrank_geom.init needs PEFT, an optional extra: pip install lowrank_geom[peft]") from err
    return Linear, LoraLayer, BaseTunerLayer


def _targets(model: torch.nn.Module, adapter_name: str | None) -> list[tuple[str, torch.nn.Module, str]]:
    """``(label, layer, adapter)`` for every trainable LoRA pair; a clear error for layers other than Linear."""
    linear, lora_layer, _ = _lora_classes()
    by_name = {name: m for name, m in model.named_modules() if isinstance(m, lora_layer)}
    targets = []
    for pair in lora_pairs(model, adapter_name):  # raises when there is no trainable pair
        module_name, _, key = pair.name.rpartition("[")
        module, key = by_name[module_name], key[:-1]
        kind = type(module.get_base_layer()).__name__
        if not isinstance(module, linear) or key not in module.lora_A:
            raise ValueError(
                f"{pair.name}: lowrank_geom.init.lora_one supports linear LoRA layers (peft.tuners.lora.Linear "
                f"over nn.Linear or Conv1D), not {type(module).__name__} over {kind}; leave it out of "
                "target_modules or initialize it otherwise"
            )
        if getattr(module, "use_dora", {}).get(key, False):
            raise ValueError(f"{pair.name}: DoRA's magnitude vector has no LoRA-One initialization; use plain LoRA")
        weight = module.get_base_layer().weight
        if not weight.is_floating_point():
            raise ValueError(f"{pair.name}: the base weight is {weight.dtype} (quantized); its gradient is not defined")
        targets.append((pair.name, module, key))
    return targets


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"a batch of type {type(batch).__name__} needs loss_fn(model, batch) -> scalar loss; without it a batch "
            "must be a mapping of keyword arguments whose model output has a .loss (Hugging Face style)"
        )
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError("the model's output has no .loss (pass labels in the batch, or pass loss_fn)")
    return loss


def _without_adapters(model: torch.nn.Module, weights: list[torch.Tensor]):
    """Adapters switched off and ``weights`` made trainable; returns the function that undoes both."""
    _, _, tuner_layer = _lora_classes()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers = [m for m in model.modules() if isinstance(m, tuner_layer) and not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    for w in weights:
        w.requires_grad_(True)

    def restore() -> None:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:  # enable_adapters resets the flags of adapter weights; the user's stand
            p.requires_grad_(flag)

    return restore


def full_gradients(
    model: torch.nn.Module, weights: list[torch.Tensor], batches: Iterable[Any], loss_fn: LossFn | None
) -> list[torch.Tensor]:
    """``∇_W L`` of the frozen ``weights`` at the pre-trained model (adapters off), averaged over batches.

    Each batch's loss is ``loss_fn(model, batch)`` (default: ``model(**batch).loss``); the result
    is the mean of the per-batch gradients, as the authors' ``estimate_gradient``. ``.grad`` of
    every parameter is left as it was (``torch.autograd.grad``, not ``backward``).
    """
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError("batches must be an iterable of batches (a list or a DataLoader): pass [batch] for one")
    loss_fn = loss_fn or _default_loss
    restore = _without_adapters(model, weights)
    try:
        total, count = [torch.zeros_like(w, dtype=torch.float64) for w in weights], 0
        for batch in batches:
            loss = loss_fn(model, batch)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"the loss must be a scalar tensor, got {type(loss).__name__}")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g.to(torch.float64)
            count += 1
    finally:
        restore()
    if count == 0:
        raise ValueError("batches is empty: LoRA-One's initialization needs at least one batch")
    return [t / count for t in total]


def spectral_factors(
    grad: torch.Tensor, r: int, gamma: float, normalize: bool, label: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B, σ)``: ``U Σ Vᵀ = SVD(−∇_W L)``, ``lora_B = U_r Σ_r^{1/2}/√γ``, ``lora_A = Σ_r^{1/2} V_rᵀ/√γ``.

    ``normalize`` also divides both by ``√σ₁``: Algorithm 1's ``S ← S/S[0,0]`` (line 3), which the
    authors' released code does too. Float64; ``grad`` is ``out × in``.
    """
    u, s, vh = torch.linalg.svd(-grad.to(torch.float64), full_matrices=False)
    if r > s.numel():
        raise ValueError(f"{label}: rank {r} exceeds the weight's smaller dimension {s.numel()}")
    if not bool(s[0] > 0):
        raise ValueError(f"{label}: the full gradient is zero on these batches, so LoRA-One has no direction for it")
    # singular values below the gradient's round-off: directions the data do not determine
    resolved = int((s[:r] > s[0] * max(grad.shape) * torch.finfo(torch.float32).eps).sum())
    if resolved < r:
        warnings.warn(
            f"{label}: the full gradient has rank {resolved} < r = {r} on these batches, so the adapter starts "
            f"with {r - resolved} zero direction(s), where both factors' gradients stay zero; use more or "
            "larger batches",
            stacklevel=3,
        )
    root = s[:r].sqrt() / (gamma**0.5 * (s[0].sqrt() if normalize else 1.0))
    return root[:, None] * vh[:r], u[:, :r] * root, s[:r]


@torch.no_grad()
def _write(module: torch.nn.Module, key: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    for param, value in ((module.lora_A[key].weight, lora_a), (module.lora_B[key].weight, lora_b)):
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def lora_one(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    gamma: float = 128.0,
    normalize: bool = True,
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor]:
    r"""LoRA-One's spectral initialization of every trainable linear LoRA pair of a PEFT model, in place.

    For each layer with frozen weight ``W`` (``out × in``), PEFT scaling ``s`` and rank ``r``
    (Algorithm 1 of the paper, lines 1-5): ``U Σ Vᵀ = SVD(−∇_W L)`` at the pre-trained model
    (adapters switched off, gradient averaged over ``batches``), ``Σ ← Σ/σ₁``, then
    ``lora_B = U_r Σ_r^{1/2}/√γ`` and ``lora_A = Σ_r^{1/2} V_rᵀ/√γ``, so the adapted weight is
    ``W + s·lora_B lora_A = W − (s/(γσ₁))·[∇_W L]_r``: one full-gradient step projected on rank r,
    of spectral norm ``s/γ`` whatever the loss's scale. ``gamma`` is the algorithm's scaling
    parameter (Algorithm 1 takes it as input and names its reciprocal ``γ``; the authors' code
    calls it ``stable_gamma``). ``W`` is not changed (Algorithm 1 returns ``W + (α/√r)·A_T B_T``; it
    subtracts nothing), so the model's output changes at initialization. ``normalize=False`` skips
    the division by ``σ₁`` (not in Algorithm 1): the step is then ``−(s/γ)·[∇_W L]_r``, of learning
    rate ``s/γ``. Factors are computed in float64 and cast to the adapter's dtype. Run it once,
    before creating the optimizer.

    Args:
        model: a PEFT model (or any module with PEFT LoRA layers) whose pairs are to be set.
        batches: an iterable of batches (a list, a DataLoader); ``[batch]`` for one. The paper
            uses one (large) batch; the authors' default is 8 batches of one example.
        loss_fn: ``loss_fn(model, batch)`` → scalar loss; default ``model(**batch).loss``.
        gamma: ``γ > 0``, the scale of the step (the authors use 64–128).
        normalize: divide by ``σ₁`` as Algorithm 1 (line 3) and the authors' code do (default);
            ``False`` for the plain rank-r gradient step.
        adapter_name: only this adapter (default: every trainable one).

    Returns:
        ``{pair name: the top-r singular values of −∇_W L}`` (float64), one entry per pair set.

    Raises:
        ValueError: a trainable adapter on a layer other than Linear/Conv1D (Embedding, Conv,
            MultiheadAttention, quantized), a DoRA adapter, ``r`` above ``min(out, in)``, a zero
            gradient, ``gamma ≤ 0`` or no batch. TypeError: a batch the default loss cannot use.
        UserWarning: a gradient of rank below ``r`` (the adapter starts with zero directions).
    """
    if not gamma > 0:
        raise ValueError(f"Invalid gamma value: {gamma} (must be > 0)")
    targets = _targets(model, adapter_name)
    weights = list({id(m.get_base_layer().weight): m.get_base_layer().weight for _, m, _ in targets}.values())
    grads = dict(zip(map(id, weights), full_gradients(model, weights, batches, loss_fn)))
    singular_values = {}
    for label, module, key in targets:
        grad = grads[id(module.get_base_layer().weight)]
        grad = grad.T if module.fan_in_fan_out else grad  # Conv1D stores W as in × out
        lora_a, lora_b, sigma = spectral_factors(grad, module.r[key], gamma, normalize, label)
        _write(module, key, lora_a, lora_b)
        singular_values[label] = sigma
    return singular_values
