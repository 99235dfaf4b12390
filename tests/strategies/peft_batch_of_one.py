"""The bfloat16 PEFT run with batches of one example that the safeguard tests train on.

PEFT gaussian init (``lora_B = 0``), rank-one gradients (one example per step), bfloat16, the
robustness benchmark's MLP and data; the head in an AdamW fallback group at lr 1e-3.
"""

from __future__ import annotations

import torch


def final_loss(strategy: str, lr: float = 1e-2, steps: int = 100, **hp) -> float:
    """Full-data loss after ``steps`` steps of ``strategy`` (``"adamw"``: torch's AdamW at lr 1e-3)."""
    from benchmarks import robustness as rb
    from lowrank_geom import LowRankOptimizer

    model = rb.PeftMLP("gaussian", "batch1", torch.bfloat16, 0)
    x, y = rb.make_data("batch1", 0, torch.bfloat16)
    head = {"params": model.other_parameters(), "lr": 1e-3, "weight_decay": 0.0}
    if strategy == "adamw":
        opt = torch.optim.AdamW([{"params": model.trainable_parameters()}, head], lr=1e-3, weight_decay=0.0)
    else:
        opt = LowRankOptimizer([{"pairs": model.pairs()}, head], strategy=strategy, lr=lr, **hp)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, rb.N_SAMPLES, (1,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.peft_model(x[idx]).float(), y[idx]).backward()
        opt.step()
    return rb.full_loss(model.peft_model, x, y)
