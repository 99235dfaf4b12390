"""``python -m benchmarks <suite> [--quick | --full] [--out DIR] [--seed N]``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from benchmarks.common import RunContext, relative_path
from benchmarks.runner import run_suites

SUITES = ["invariance", "robustness", "convex", "regret", "speed", "finetune"]
#: what ``all`` runs (the README's default comparison)
ALL = ["invariance", "robustness", "convex", "regret", "speed", "finetune"]
#: the order ``all`` starts them in its process pool: the longest first, so that the two
#: processes finish together (from the run times the results record)
POOL_ORDER = ["finetune", "convex", "robustness", "regret", "invariance"]


def _relative_arg(arg: str) -> str:
    """A command-line argument as the results record it: an absolute path (``/x`` or ``--opt=/x``) made
    relative to the checkout, so a recorded command names no machine's directories."""
    opt, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    return f"{opt}{eq}{relative_path(value)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=SUITES + ["all"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes for CI (about a minute)")
    size.add_argument("--full", action="store_true", help="the published problem sizes")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tune", action="store_true", help="re-run the learning-rate sweep first")
    args, extra = parser.parse_known_args(argv)
    ctx = RunContext(
        size="quick" if args.quick else "full" if args.full else "default",
        out=args.out,
        seed=args.seed,
        command="python -m benchmarks " + " ".join(shlex.quote(_relative_arg(a)) for a in argv),
        progress=not args.no_progress,
        options={"tune": args.tune, "extra": extra},
    )
    if args.suite == "all":
        # --tune writes the configs every suite reads: then one suite at a time
        suites = sorted(ALL, key=lambda n: POOL_ORDER.index(n) if n in POOL_ORDER else len(POOL_ORDER))
        runs = run_suites(suites, ctx, parallel=not args.tune)
    else:
        runs = run_suites([args.suite], ctx, parallel=False)
    for run in runs:
        print(f"[{run.name}] {run.seconds:.1f} s -> {run.path}")
        print(run.table)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
