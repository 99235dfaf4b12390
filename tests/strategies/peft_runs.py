"""A bfloat16 PEFT run with batches of one example (the robustness suite's model), shared by the
strategies' safeguard tests: the final loss of one strategy against AdamW's."""

from __future__ import annotations

from typing import Any

import torch


def batch_of_one_final_loss(init: str, strategy: str | None, lr: float, **hyperparameters: Any) -> float:
    """Final full-data loss after 100 bfloat16 steps on batches of one from PEFT's ``init``:
    ``strategy`` None is ``torch.optim.AdamW``; the head trains with AdamW at 1e-3 either way."""
    from benchmarks import robustness as rb
    from lowrank_geom import LowRankOptimizer

    model = rb.PeftMLP(init, "batch1", torch.bfloat16, 0)
    x, y = rb.make_data("batch1", 0, torch.bfloat16)
    head = {"params": model.other_parameters(), "lr": 1e-3, "weight_decay": 0.0}
    if strategy is None:
        opt = torch.optim.AdamW([{"params": model.trainable_parameters()}, head], lr=lr, weight_decay=0.0)
    else:
        opt = LowRankOptimizer([{"pairs": model.pairs()}, head], strategy=strategy, lr=lr, **hyperparameters)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, rb.N_SAMPLES, (1,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.peft_model(x[idx]).float(), y[idx]).backward()
        opt.step()
    return rb.full_loss(model.peft_model, x, y)
