"""The fine-tune result: per-optimizer metrics, the Markdown table and its note, the figures."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.common import RunContext, markdown_table, savefig
from benchmarks.finetune.memory import MEMORY_STEPS
from benchmarks.finetune.model import INITS, LORA_ALPHA, LORA_R, LORA_TARGETS, head_mode
from benchmarks.optimizers import load_config

HEADERS = [
    "optimizer",
    "lr",
    "test acc % (mean ± std)",
    "test loss",
    "step time / AdamW",
    "training peak MiB",
    "opt. state KiB",
    "Σ‖δA‖/‖A‖ per step",
    "Σ‖δB‖/‖B‖ per step",
    "gauge sweep: max |Δacc| (points)",
    "gauge sweep: max |Δ train loss|",
]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (nan, nan if none)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _mean_defined(curves: Sequence[Sequence[float | None]]) -> float:
    """Mean over runs of each run's mean over its defined (not None) steps."""
    per_run = [[x for x in c if x is not None] for c in curves]
    return mean_std([statistics.fmean(xs) if xs else math.nan for xs in per_run])[0]


def optimizer_metrics(name: str, res: dict[str, Any], step_ms: float, ref_ms: float, memory: dict) -> dict[str, Any]:
    """One optimizer's entry of ``metrics["optimizers"]`` (``res``: its lr choice, runs and gauge sweep)."""
    runs = res["runs"]
    acc, acc_sd = mean_std([r["acc"] for r in runs])
    loss, loss_sd = mean_std([r["loss"] for r in runs])
    return {
        "label": load_config(name)["label"],
        "lr": res["lr"],
        "lr_grid_acc": res["grid"],
        "lr_grid_selection_loss": res["grid_sel"],
        "head": head_mode(name),
        "acc_mean": acc,
        "acc_std": acc_sd,
        "loss_mean": loss,
        "loss_std": loss_sd,
        "acc_per_seed": [r["acc"] for r in runs],
        "loss_per_seed": [r["loss"] for r in runs],
        "step_ms": step_ms,
        "step_time_rel_adamw": step_ms / ref_ms,
        "peak_memory_mb": memory["training_peak_bytes"] / 2**20,
        "memory": memory,
        "state_bytes": runs[0]["state_bytes"],
        "upd_A_mean": _mean_defined([r["upd_A"] for r in runs]),
        "upd_B_mean": _mean_defined([r["upd_B"] for r in runs]),
        "gauge_sweep": res["sweep"],
        "curves": {key: [r[key] for r in runs] for key in ("train_loss", "train_acc", "evals", "upd_A", "upd_B")},
    }


def _row(name: str, m: dict[str, Any]) -> list[str]:
    sw = m["gauge_sweep"]
    return [
        name,
        f"{m['lr']:.3g}",
        f"{m['acc_mean']:.2f} ± {m['acc_std']:.2f}",
        f"{m['loss_mean']:.4f} ± {m['loss_std']:.4f}",
        f"{m['step_time_rel_adamw']:.2f}",
        f"{m['peak_memory_mb']:.1f}",
        f"{m['state_bytes'] / 1024:.1f}",
        f"{m['upd_A_mean']:.3g}",
        f"{m['upd_B_mean']:.3g}",
        "diverged" if sw["acc_max_change"] is None else f"{sw['acc_max_change']:.2f}",
        "diverged" if sw["final_train_loss_max_change"] is None else f"{sw['final_train_loss_max_change']:.3g}",
    ]


def ranking_note(optimizers: dict[str, dict[str, Any]], n_seeds: int) -> str:
    """What the accuracy column can and cannot say: the spread of the means against the seed noise."""
    means = [m["acc_mean"] for m in optimizers.values()]
    if n_seeds < 2:
        return "One seed: the accuracy column has no noise estimate and does not rank the optimizers. "
    spread, noise = max(means) - min(means), max(m["acc_std"] for m in optimizers.values())
    verdict = "within" if spread <= 2 * noise else "beyond"
    return (
        f"The mean test accuracies span {spread:.2f} points, the seed std is up to {noise:.2f} points: "
        f"the spread is {verdict} twice the seed noise"
        + (", so the accuracy column does not rank the optimizers. " if verdict == "within" else ". ")
    )


def table_markdown(metrics: dict[str, Any], cfg: dict[str, Any], seeds: list[int], sweep_cfg: dict[str, Any]) -> str:
    """The Markdown table with its start in bold above and the protocol below."""
    names, ds = list(metrics["optimizers"]), metrics["dataset"]
    table = markdown_table(HEADERS, [_row(n, metrics["optimizers"][n]) for n in names])
    flag = metrics["run_cache"] is not None and not metrics["run_cache"]["single_clean_commit"]
    warn = "**Runs from several commits or an uncommitted tree: not reproducible by one command.**\n\n" if flag else ""
    sw = sweep_cfg["sweep"]
    sweep_protocol = "the table's protocol" if not sw["protocol"] else f"the table's protocol with {sw['protocol']}"
    return (
        f"{warn}**Start: {INITS[cfg['init']]}**\n\n{table}\n\n"
        f"{ds['name']}: {ds['n_train']} train / {ds['n_test_eval']} test examples ({len(ds['classes'])} classes, "
        f"split by {ds['split']}); {cfg['steps']} steps × batch {cfg['batch']}, max_len {cfg['max_len']}, "
        f"seeds {seeds}; LoRA r={LORA_R}, α={LORA_ALPHA} on {'/'.join(LORA_TARGETS)}; "
        f"head AdamW lr {cfg['head_lr']:g}. "
        + ranking_note(metrics["optimizers"], len(seeds))
        + f"lr: chosen from the grid {cfg['lr_grid']} × each optimizer's configured lr (widened by "
        f"{cfg['lr_widen'][0]} below / {cfg['lr_widen'][1]} above while the choice is on an edge) "
        f"by the mean training loss of the last {metrics['lr_selection']['window_steps']} steps at seed {seeds[0]} "
        f"(never the test set). Gauge sweep: every optimizer at its chosen lr from (s·A, B/s), s ∈ {sw['gauges']} "
        f"(the same initial model), seeds {metrics['gauge_sweep']['seeds']}, {sweep_protocol}; max |Δ| is the "
        "largest change over s of the seed-paired mean against s = 1 (test accuracy; training loss of the last "
        f"quarter). Training peak: peak RSS during {MEMORY_STEPS} training steps on one batch of "
        f"{metrics['memory_batch']} minus the RSS before them, in a fresh process per optimizer (1 ms sampling)."
    )


def _smooth(xs: Sequence[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1) : i + 1] if math.isfinite(x)]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(ctx: RunContext, metrics: dict[str, Any], title: str) -> str:
    """Training loss, batch accuracy (5-step means over seeds) and test accuracy of the first seed."""
    fig, axes = _plt().subplots(1, 3, figsize=(15, 4))
    fig.suptitle(title, fontsize=10)
    for name, m in metrics["optimizers"].items():
        c = m["curves"]
        loss = [statistics.fmean(v) for v in zip(*c["train_loss"])]
        acc = [statistics.fmean(v) for v in zip(*c["train_acc"])]
        steps = range(1, len(loss) + 1)
        (line,) = axes[0].plot(steps, _smooth(loss), label=name)
        axes[1].plot(steps, _smooth(acc), color=line.get_color(), label=name)
        ev = c["evals"][0]
        axes[2].plot([e[0] for e in ev], [e[1] for e in ev], "o-", color=line.get_color(), label=name)
    axes[0].set(xlabel="step", ylabel="train loss (5-step mean)", title="train loss")
    axes[1].set(xlabel="step", ylabel="batch accuracy % (5-step mean)", title="train accuracy")
    axes[2].set(xlabel="step", ylabel="test accuracy %", title="test accuracy (seed 0)")
    axes[0].legend(fontsize=8)
    return savefig(fig, ctx, "finetune_curves")


def updates_figure(ctx: RunContext, metrics: dict[str, Any], title: str) -> str:
    """The per-step relative update sizes of the first seed (a step from a zero factor: not drawn)."""
    fig, axes = _plt().subplots(1, 2, figsize=(10, 4))
    fig.suptitle(title, fontsize=9)
    for name, m in metrics["optimizers"].items():
        for ax, key in zip(axes, ("upd_A", "upd_B")):
            ys = [math.nan if v is None else max(v, 1e-12) for v in m["curves"][key][0]]
            ax.semilogy(range(1, len(ys) + 1), ys, label=name)
    axes[0].set(xlabel="step", ylabel="Σ_layers ‖δA‖/‖A‖", title="A = lora_B.weight")
    axes[1].set(xlabel="step", ylabel="Σ_layers ‖δB‖/‖B‖", title="B = lora_A.weightᵀ")
    axes[0].legend(fontsize=8)
    return savefig(fig, ctx, "finetune_updates")


def lr_sensitivity_figure(ctx: RunContext, metrics: dict[str, Any], title: str) -> str:
    """How much each optimizer's result depends on hitting its lr: test accuracy and selection loss on the grid."""
    fig, axes = _plt().subplots(1, 2, figsize=(10, 4))
    fig.suptitle(title, fontsize=9)
    for name, m in metrics["optimizers"].items():
        lrs = sorted(m["lr_grid_acc"], key=float)
        rel = [float(lr) / m["lr"] for lr in lrs]
        axes[0].semilogx(rel, [m["lr_grid_acc"][lr] for lr in lrs], "o-", label=name)
        sel = [m["lr_grid_selection_loss"][lr] for lr in lrs]  # None: diverged
        axes[1].semilogx(rel, [float("nan") if v is None else v for v in sel], "o-", label=name)
    axes[0].set(xlabel="lr / chosen lr", ylabel="test accuracy % (first seed)", title="lr sensitivity")
    axes[1].set(xlabel="lr / chosen lr", ylabel="selection loss", title="mean train loss, last quarter")
    axes[0].legend(fontsize=8)
    return savefig(fig, ctx, "finetune_lr_sensitivity")
