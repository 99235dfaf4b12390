"""The training loop: one seeded run of an optimizer at one lr (and gauge), test evaluation, interleaved step timing."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from benchmarks.common import RunContext, progress
from benchmarks.finetune.data import collate
from benchmarks.finetune.model import Classifier, load_state, make_finetune_optimizer, opt_state_bytes


@torch.no_grad()
def evaluate(model: Classifier, ids, ys, pad_id: int, batch: int = 128) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) over the whole given set; batches sorted by length."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct, loss = 0, 0.0
    for k in range(0, len(order), batch):
        idx = order[k : k + batch]
        x, m = collate([ids[i] for i in idx], pad_id)
        y = torch.tensor([ys[i] for i in idx])
        logits = model(x, m)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return 100.0 * correct / len(ids), loss / len(ids)


def _add_rel(acc: float | None, delta: torch.Tensor, x0: torch.Tensor) -> float | None:
    """``acc + ‖delta‖/‖x0‖``; None (undefined) once any layer's ``x0`` is zero."""
    n0 = x0.norm().item()
    if acc is None or n0 == 0.0:
        return None
    return acc + delta.norm().item() / n0


def _factors(layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(A, B)`` in the paper's orientation: ``A = lora_B.weight``, ``B = lora_A.weightᵀ``."""
    return [(l.lora_B["default"].weight, l.lora_A["default"].weight) for l in layers]


@torch.no_grad()
def _relative_updates(layers, before: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float | None, float | None]:
    """``(Σ_layers ‖δA‖/‖A‖, Σ_layers ‖δB‖/‖B‖)`` of one step; a step from a zero factor (PEFT's
    ``lora_B = 0``) has no relative size: None."""
    ua = ub = 0.0
    for (a1, b1), (a0, b0) in zip(_factors(layers), before):
        ua = _add_rel(ua, a1 - a0, a0)
        ub = _add_rel(ub, b1 - b0, b0)
    return ua, ub


class _Batches:
    """The seeded stream of training batches: a fresh permutation per epoch, no batch across two."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.g).tolist(), 0

    def next(self) -> list[int]:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _step(model: Classifier, opt, x, m, y) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One whole training step (forward, backward, optimizer step, zero_grad): (loss, logits, seconds)."""
    t0 = time.perf_counter()
    logits = model(x, m)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, logits, time.perf_counter() - t0


def train_run(
    model: Classifier,
    name: str,
    lr: float,
    cfg: dict[str, Any],
    data: dict[str, Any],
    init_state: dict[str, torch.Tensor],
    seed: int,
    gauge_s: float = 1.0,
    ctx: RunContext | None = None,
    desc: str = "",
) -> dict[str, Any]:
    """One seeded run of ``name`` at ``lr`` from ``init_state`` rescaled by the gauge ``(s·A, B/s)``;
    returns metrics and curves."""
    load_state(model, init_state, gauge_s)
    opt = make_finetune_optimizer(name, model, list(model.head.parameters()), lr, cfg["head_lr"])
    tr_ids, tr_y, pad = data["train_ids"], data["train_y"], data["pad_id"]
    batches, layers, steps = _Batches(len(tr_ids), cfg["batch"], seed), model.lora_layers(), cfg["steps"]
    c: dict[str, list] = {k: [] for k in ("train_loss", "train_acc", "step_s", "upd_A", "upd_B", "evals")}
    for step in range(steps) if ctx is None else progress(range(steps), ctx, desc or name):
        idx = batches.next()
        x, m = collate([tr_ids[i] for i in idx], pad)
        y = torch.tensor([tr_y[i] for i in idx])
        before = [(a.detach().clone(), b.detach().clone()) for a, b in _factors(layers)]
        loss, logits, seconds = _step(model, opt, x, m, y)
        c["step_s"].append(seconds)
        for key, v in zip(("upd_A", "upd_B"), _relative_updates(layers, before)):
            c[key].append(v)
        lv = loss.item()
        c["train_loss"].append(lv if math.isfinite(lv) else float("nan"))
        c["train_acc"].append(100.0 * (logits.argmax(-1) == y).float().mean().item())
        if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0 and step + 1 < steps:
            c["evals"].append((step + 1, *evaluate(model, data["test_ids"], data["test_y"], pad)))
    acc, tloss = evaluate(model, data["test_ids"], data["test_y"], pad)
    c["evals"].append((steps, acc, tloss))
    step_s = c.pop("step_s")
    warm = step_s[3:] if len(step_s) > 6 else step_s
    return {
        "acc": acc,
        "loss": tloss,
        **c,
        "step_ms": 1e3 * statistics.median(warm),
        "state_bytes": opt_state_bytes(opt),
    }


def interleaved_step_ms(
    model: Classifier,
    lrs: dict[str, float],
    cfg: dict[str, Any],
    data: dict[str, Any],
    init_state: dict[str, torch.Tensor],
    rounds: int = 12,
    warmup: int = 2,
) -> dict[str, float]:
    """Median whole training-step time (ms) of each optimizer, measured round-robin on one batch.

    Timing each optimizer during its own run biases the ratios by run order (warm-up, allocator
    state, other load on the machine drifting over minutes). Here every optimizer gets its own
    instance over the same parameters and, after ``warmup`` untimed steps each, the optimizers take
    turns for ``rounds`` rounds, so drift hits all of them alike.
    """
    load_state(model, init_state)
    head_params = list(model.head.parameters())
    opts = {n: make_finetune_optimizer(n, model, head_params, lr, cfg["head_lr"]) for n, lr in lrs.items()}
    idx = list(range(min(cfg["batch"], len(data["train_ids"]))))
    x, m = collate([data["train_ids"][i] for i in idx], data["pad_id"])
    y = torch.tensor([data["train_y"][i] for i in idx])
    times: dict[str, list[float]] = {n: [] for n in opts}
    for k in range(warmup + rounds):
        for n, opt in opts.items():
            seconds = _step(model, opt, x, m, y)[2]
            if k >= warmup:
                times[n].append(seconds)
    return {n: 1e3 * statistics.median(t) for n, t in times.items()}
