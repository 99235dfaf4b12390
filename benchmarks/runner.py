"""Run suites one after another, or the ones that need no idle machine two at a time.

``python -m benchmarks all`` runs the suites whose results are not timings (iteration counts,
losses, accuracies, regrets) in a pool of one process per core, each process with one intra-op
thread, then the timing suite alone on the idle machine (:data:`ALONE`). The small problems of
those suites are Python- and dispatch-bound, so one thread each loses nothing and two processes
use both cores. A pooled result records the suites it ran alongside (``run.alongside``), since
its seconds columns were measured next to another process; the fine-tune suite's step-time
column is a ratio of interleaved steps, which a neighbour slows alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from benchmarks.common import RunContext, write_result

#: suites that time steps and need the machine to themselves
ALONE = ("speed",)


@dataclasses.dataclass(frozen=True)
class SuiteRun:
    """What a finished suite reports back: where its result went and its table."""

    name: str
    seconds: float
    path: str
    table: str


def run_suite(name: str, ctx: RunContext, threads: int | None = None) -> SuiteRun:
    """Run suite ``name`` and write its result; ``threads``: intra-op threads (None: torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)
    module = importlib.import_module(f"benchmarks.{name}")
    t0 = time.perf_counter()
    result = module.run(ctx)
    seconds = time.perf_counter() - t0
    return SuiteRun(name, seconds, str(write_result(result, ctx, seconds)), result.table)


def workers(names: list[str]) -> int:
    """Pool size: one process per core, at most one per pooled suite."""
    return max(1, min(os.cpu_count() or 1, len(names)))


def run_suites(names: list[str], ctx: RunContext, *, parallel: bool):
    """Yield a :class:`SuiteRun` per suite as each finishes. With ``parallel`` (and at least two
    cores), the suites not in :data:`ALONE` run in a process pool (in the order given: put the
    longest first), then the others one by one; otherwise every suite runs in this process, in order."""
    pooled = [n for n in names if n not in ALONE] if parallel else []
    if len(pooled) < 2 or workers(pooled) < 2:  # nothing would run beside anything: no pool
        pooled = []
    yield from _pool(pooled, ctx) if pooled else ()
    for name in names:
        if name not in pooled:
            yield run_suite(name, ctx)


def _pool(names: list[str], ctx: RunContext):
    # spawn: a fresh interpreter per worker (no forked torch thread pools); no progress bars, whose
    # lines the processes would interleave
    mp = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers(names), mp_context=mp) as pool:
        pending = set()
        for name in names:
            alongside = [n for n in names if n != name]
            sub = dataclasses.replace(ctx, progress=False, options={**ctx.options, "alongside": alongside})
            pending.add(pool.submit(run_suite, name, sub, 1))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
