"""``run(ctx)``: the fine-tune suite from its sizes to its result (see the package docstring)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, config_lr, progress
from benchmarks.finetune.cache import RunCache
from benchmarks.finetune.config import parse_extra, resolve_config
from benchmarks.finetune.data import load_dataset, tokenized
from benchmarks.finetune.lr import choose_lr, selection_window
from benchmarks.finetune.memory import training_peak_memory
from benchmarks.finetune.model import (
    INITS,
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    SUITE,
    Classifier,
    head_mode,
    init_adapter,
    load_encoder,
)
from benchmarks.finetune.report import (
    curves_figure,
    lr_sensitivity_figure,
    optimizer_metrics,
    table_markdown,
    updates_figure,
)
from benchmarks.finetune.sweep import run_sweep, sweep_figure, sweep_protocol
from benchmarks.finetune.training import interleaved_step_ms, train_run
from benchmarks.optimizers import INVARIANT

Runner = Callable[[str, float, int, float], dict[str, Any]]


def _runner(model: Classifier, cfg: dict, data: dict, cache: RunCache, n_classes: int, ctx: RunContext) -> Runner:
    """``one(name, lr, seed, gauge_s)``: a training run under ``cfg``'s protocol, from the cache when there."""

    def one(name: str, lr: float, seed: int, gauge_s: float = 1.0) -> dict[str, Any]:
        tag = f"{name} lr={lr:g} s{seed}" + (f" gauge s={gauge_s:g}" if gauge_s != 1.0 else "")

        def compute() -> dict[str, Any]:
            start = init_adapter(model, seed, n_classes, cfg["init"])
            return train_run(model, name, lr, cfg, data, start, seed, gauge_s=gauge_s, ctx=ctx, desc=tag)

        return cache.run(name, lr, seed, gauge_s, compute)

    return one


def _optimizer(name: str, one: Runner, one_sweep: Runner, cfg: dict, seeds: list[int]) -> dict[str, Any]:
    """One optimizer: the lr grid at the first seed, the other seeds at the chosen lr, the gauge sweep."""
    best_lr, by_lr, sel = choose_lr(lambda lr: one(name, lr, seeds[0]), config_lr(name, SUITE), cfg)
    sweep_seeds = [seeds[0] + k for k in range(cfg["sweep"]["seeds"])]
    return {
        "lr": best_lr,
        "grid": {str(lr): r["acc"] for lr, r in by_lr.items()},
        "grid_sel": {str(lr): v if math.isfinite(v) else None for lr, v in sel.items()},
        "runs": [by_lr[best_lr]] + [one(name, best_lr, s) for s in seeds[1:]],
        "sweep": run_sweep(lambda s, seed: one_sweep(name, best_lr, seed, s), cfg, sweep_seeds),
    }


def _memory(names: list[str], results: dict, cfg: dict, data: dict, args, n_classes: int, seed: int, ctx) -> dict:
    """Each optimizer's training peak memory, in a fresh process each, on the first batch of the training set."""
    idx = list(range(min(cfg["batch"], len(data["train_ids"]))))
    ids, ys = [data["train_ids"][i] for i in idx], [data["train_y"][i] for i in idx]
    return {
        n: training_peak_memory(
            n, results[n]["lr"], cfg["head_lr"], args.model, ids, ys, n_classes, data["pad_id"], seed, cfg["init"]
        )
        for n in progress(names, ctx, "finetune memory (one process each)", total=len(names))
    }


def _dataset_info(ds: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": ds["name"],
        "classes": ds["classes"],
        "split": ds["split"],
        "n_train": len(ds["train"][0]),
        "n_test_total": len(ds["test"][0]),
        "n_test_eval": len(data["test_ids"]),
    }


def _config(cfg: dict, seeds: list[int], results: dict, sweep_cfg: dict) -> dict[str, Any]:
    names = cfg["optimizers"]
    config = {k: v for k, v in cfg.items()}
    config.update(
        seeds=seeds,
        lrs={n: results[n]["lr"] for n in names},
        lora={"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)},
        head={n: head_mode(n) for n in names},
        sweep_protocol={k: sweep_cfg[k] for k in RunCache.PROTOCOL_KEYS},
    )
    config["start"] = INITS[cfg["init"]]
    return config


def run(ctx: RunContext) -> SuiteResult:
    args = parse_extra(ctx.options.get("extra"))
    cfg = resolve_config(ctx.size, args)
    torch.manual_seed(ctx.seed)
    t_load = time.perf_counter()
    ds = load_dataset(cfg["dataset"])
    tok, enc = load_encoder(args.model)
    enc.eval()  # dropout off (deterministic runs); gradients still flow to the adapters
    model = Classifier(enc, len(ds["classes"]))
    model.peft_model.eval()
    sweep_cfg = sweep_protocol(cfg)
    data = tokenized(tok, ds, cfg["max_len"], cfg["eval_cap"])
    same = all(sweep_cfg[k] == cfg[k] for k in ("max_len", "eval_cap"))
    sweep_data = data if same else tokenized(tok, ds, sweep_cfg["max_len"], sweep_cfg["eval_cap"])
    load_s = time.perf_counter() - t_load
    names, seeds, n_classes = cfg["optimizers"], [ctx.seed + k for k in range(cfg["seeds"])], len(ds["classes"])
    cache = RunCache(args.cache, cfg, args.max_new_runs, allow_mixed=args.allow_mixed_commits)
    one = _runner(model, cfg, data, cache, n_classes, ctx)
    one_sweep = _runner(model, sweep_cfg, sweep_data, cache.with_protocol(sweep_cfg), n_classes, ctx)
    results = {name: _optimizer(name, one, one_sweep, cfg, seeds) for name in names}

    timed = interleaved_step_ms(
        model, {n: results[n]["lr"] for n in names}, cfg, data, init_adapter(model, seeds[0], n_classes, cfg["init"])
    )
    memory = _memory(names, results, cfg, data, args, n_classes, seeds[0], ctx)
    metrics: dict[str, Any] = {
        "dataset": _dataset_info(ds, data),
        "lr_selection": {
            "criterion": "mean training loss of the last steps at the first seed",
            "window_steps": selection_window(cfg["steps"]),
            "seed": seeds[0],
            "every_batch_unseen": cfg["steps"] * cfg["batch"] <= len(ds["train"][0]),
        },
        "gauge_sweep": {"gauges": cfg["sweep"]["gauges"], "seeds": results[names[0]]["sweep"]["seeds"]},
        "load_seconds": round(load_s, 2),
        "memory_batch": min(cfg["batch"], len(data["train_ids"])),
        "optimizers": {
            n: optimizer_metrics(n, results[n], timed[n], timed.get("adamw", float("nan")), memory[n]) for n in names
        },
        "run_cache": cache.summary(),
    }
    title = f"{ds['name']}, start: {INITS[cfg['init']]}"
    figures = [curves_figure(ctx, metrics, title), updates_figure(ctx, metrics, title)]
    if len(cfg["lr_grid"]) > 1:
        figures.append(lr_sensitivity_figure(ctx, metrics, title))
    sweeps = {n: metrics["optimizers"][n]["gauge_sweep"] for n in names}
    figures.append(sweep_figure(ctx, sweeps, set(INVARIANT), f"{title}; gauge sweep at each optimizer's chosen lr"))
    table = table_markdown(metrics, cfg, seeds, sweep_cfg)
    return SuiteResult(
        suite=SUITE, metrics=metrics, config=_config(cfg, seeds, results, sweep_cfg), table=table, figures=figures
    )
