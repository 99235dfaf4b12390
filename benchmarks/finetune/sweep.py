"""The gauge sweep: every optimizer from the same adapter rescaled to ``(s·A, B/s)`` over a range of ``s``.

Every ``s`` is the same point ``Z = A Bᵀ`` and so the same initial model; an optimizer invariant
to the gauge follows the same trajectory of ``Z`` from each, so its results are flat in ``s`` (up
to rounding), while a non-invariant one sees differently scaled factors and gradients.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.common import RunContext, color, savefig
from benchmarks.finetune.lr import selection_window
from benchmarks.finetune.report import mean_std


def sweep_protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    """The protocol the sweep's runs use: the table's with the size's sweep overrides."""
    gauges = cfg["sweep"]["gauges"]
    if 1.0 not in gauges:
        raise ValueError(f"the gauge sweep compares every s with s = 1, which {gauges} lacks")
    return {**cfg, **cfg["sweep"]["protocol"]}


def final_train_loss(run: dict[str, Any], steps: int) -> float:
    """Mean training loss of the last quarter of a run (the lr-selection loss); inf if it diverged."""
    tail = run["train_loss"][-selection_window(steps) :]
    return statistics.fmean(tail) if tail and all(math.isfinite(x) for x in tail) else math.inf


def _paired_max_change(per_gauge: dict[float, list[float]]) -> float | None:
    """``max_s |mean_seeds (x(s, seed) − x(1, seed))|``: paired by seed, so seed noise cancels;
    None (JSON null) when a run diverged."""
    ref = per_gauge[1.0]
    worst = 0.0
    for xs in per_gauge.values():
        d = [x - r for x, r in zip(xs, ref)]
        if not all(math.isfinite(v) for v in d):
            return None
        worst = max(worst, abs(statistics.fmean(d)))
    return worst


def run_sweep(one: Callable[[float, int], dict[str, Any]], cfg: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """One optimizer's sweep (``one(s, seed)``: its run from the gauge ``s``): per-gauge results and summaries."""
    gauges, steps = cfg["sweep"]["gauges"], sweep_protocol(cfg)["steps"]
    acc = {s: [] for s in gauges}
    loss = {s: [] for s in gauges}
    for s in gauges:
        for seed in seeds:
            r = one(s, seed)
            acc[s].append(r["acc"])
            loss[s].append(final_train_loss(r, steps))

    def ms(xs):  # mean ± std of the finite values; JSON null when there are none
        return [None if math.isnan(v) else v for v in mean_std(xs)]

    return {
        "gauges": gauges,
        "seeds": seeds,
        "acc_per_seed": [acc[s] for s in gauges],
        "final_train_loss_per_seed": [[x if math.isfinite(x) else None for x in loss[s]] for s in gauges],
        "acc_mean_std": [ms(acc[s]) for s in gauges],
        "final_train_loss_mean_std": [ms(loss[s]) for s in gauges],
        "acc_max_change": _paired_max_change(acc),
        "final_train_loss_max_change": _paired_max_change(loss),
    }


def sweep_figure(ctx: RunContext, sweeps: dict[str, dict[str, Any]], invariant: set[str], title: str) -> str:
    """Test accuracy and final training loss against ``s`` (mean ± std over seeds), one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(title, fontsize=9)
    for i, (name, sw) in enumerate(sweeps.items()):
        style = dict(color=color(i), capsize=3, marker="o" if name in invariant else "s")
        style["linestyle"] = "-" if name in invariant else "--"
        label = name + (" (GL(r)-invariant)" if name in invariant else "")
        for ax, key in zip(axes, ("acc_mean_std", "final_train_loss_mean_std")):
            pts = [(s, m, sd) for s, (m, sd) in zip(sw["gauges"], sw[key]) if m is not None]
            if pts:
                ax.errorbar(*zip(*[(s, m) for s, m, _ in pts]), yerr=[sd for *_, sd in pts], label=label, **style)
    n = len(next(iter(sweeps.values()))["seeds"]) if sweeps else 0
    axes[0].set(xscale="log", xlabel="gauge s: start (s·A, B/s)", ylabel=f"test accuracy % (mean ± std, {n} seeds)")
    axes[1].set(xscale="log", xlabel="gauge s: start (s·A, B/s)", ylabel="training loss, last quarter")
    axes[0].set_title("same initial model for every s", fontsize=9)
    axes[1].set_title("flat = invariant to the gauge", fontsize=9)
    axes[0].legend(fontsize=8)
    return savefig(fig, ctx, "finetune_gauge_sweep")
