"""AdamW for the parameters of a model that are not in a LoRA pair (biases, heads, DoRA magnitudes).

The driver runs it for param groups given as ``{"params": [...]}``, so one optimizer (one
checkpoint, one scheduler) covers the whole model. Same arithmetic as ``torch.optim.AdamW``
with ``foreach=False``.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "adamw"
DEFAULTS: dict[str, Any] = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def adamw_step(params: list[torch.Tensor], state: Any, group: dict[str, Any]) -> None:
    """One AdamW step (Loshchilov & Hutter, Alg. 2) over ``params`` with lazily created state."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("LowRankOptimizer's fallback AdamW does not support sparse gradients")
        s = state[p]
        if not s:
            s["step"] = torch.tensor(0.0)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = -p.grad if group.get("maximize", False) else p.grad
        s["step"] += 1
        t = s["step"].item()
        p.mul_(1 - lr * wd)
        s["exp_avg"].lerp_(grad, 1 - beta1)
        s["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t) ** 0.5
        denom = (s["exp_avg_sq"].sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(s["exp_avg"], denom, value=-lr / bias1)
