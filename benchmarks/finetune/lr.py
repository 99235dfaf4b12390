"""Learning-rate selection without the test set: the grid, its widening past an edge, the choice."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def selection_window(steps: int) -> int:
    """How many final steps the lr-selection loss averages: the last quarter of the run."""
    return max(1, steps // 4)


def widen_grid(
    best_lr: float, grid: Sequence[float], base_lr: float, widen: tuple[Sequence[float], Sequence[float]]
) -> float | None:
    """The next lr to try when ``best_lr`` is the smallest or largest of ``grid``, else None.

    ``widen = (below, above)``: factors of ``base_lr`` to add, in order, beyond the grid's low and
    high end; None once the side's factors are used up (the result is then reported at the edge).
    """
    if len(grid) < 2 or min(grid) < best_lr < max(grid):
        return None
    below, above = widen
    side = below if best_lr == min(grid) else above
    for f in side:
        lr = float(f"{base_lr * f:.3g}")
        if lr not in grid:
            return lr
    return None


def select_lr(train_losses: dict[float, Sequence[float]], window: int) -> tuple[float, dict[float, float]]:
    """The lr whose run has the lowest mean training loss over its last ``window`` steps.

    Each step's loss is taken on its batch *before* the step on it, and a run shorter than one
    epoch never sees a batch twice, so this is a progressive-validation estimate of the
    population loss: the lr is chosen without the test set. A window holding a non-finite loss
    (a diverged run) scores ``inf``; ties go to the smaller lr. Returns (lr, scores).
    """
    if not train_losses:
        raise ValueError("select_lr: empty grid")
    scores = {}
    for lr, losses in train_losses.items():
        tail = list(losses)[-window:]
        scores[lr] = statistics.fmean(tail) if tail and all(math.isfinite(x) for x in tail) else math.inf
    return min(scores, key=lambda lr: (scores[lr], lr)), scores


def lr_grid(base_lr: float, factors: Sequence[float]) -> list[float]:
    """The grid ``factors × base_lr``, each rounded to 3 significant digits (the cache keys name them)."""
    return [float(f"{base_lr * f:.3g}") for f in factors]


def choose_lr(
    one: Callable[[float], dict[str, Any]], base_lr: float, cfg: dict[str, Any]
) -> tuple[float, dict[float, dict[str, Any]], dict[float, float]]:
    """Run the grid (``one(lr)``: a run at the first seed), widen it past an edge choice, and choose.

    Returns ``(lr, runs by lr, selection score by lr)``.
    """
    window = selection_window(cfg["steps"])
    by_lr = {lr: one(lr) for lr in lr_grid(base_lr, cfg["lr_grid"])}
    while True:
        best_lr, scores = select_lr({lr: r["train_loss"] for lr, r in by_lr.items()}, window)
        # a best lr on the grid's edge does not bracket the optimum: widen the grid that way
        lr = widen_grid(best_lr, list(by_lr), base_lr, cfg["lr_widen"])
        if lr is None:
            return best_lr, by_lr, scores
        by_lr[lr] = one(lr)
