"""What every suite shares: run/meta info, the results folder (JSON + Markdown table + PNGs), progress.

A suite is a module ``benchmarks/<suite>.py`` with ``run(ctx: RunContext) -> SuiteResult``. It
reads its sizes from ``ctx.size`` (``"quick"``, ``"default"`` or ``"full"``) and its optimizer
settings from :mod:`benchmarks.optimizers`; the CLI writes what it returns with :func:`write_result`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class RunContext:
    """Where and how big a suite runs."""

    size: str  # "quick" | "default" | "full"
    out: Path
    seed: int = 0
    command: str = ""
    progress: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SuiteResult:
    """What a suite returns: metrics (JSON-able), the config it ran, a Markdown table, figure paths."""

    suite: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    table: str
    figures: list[str] = dataclasses.field(default_factory=list)


def config_lr(name: str, suite: str = "default") -> float:
    """The learning rate of optimizer ``name`` for ``suite`` (its ``"default"`` when the suite has none)."""
    from benchmarks.optimizers import load_config  # imported here: optimizers sits above this module

    lrs = load_config(name)["lr"]
    return float(lrs.get(suite, lrs["default"]))


class torch_threads:
    """``with torch_threads(k): ...`` runs with ``k`` intra-op threads and restores the old count.

    The suites' matrices are tiny, so a step is Python and dispatch overhead: one thread is as
    fast as two on an idle machine and many times faster on a busy one (OpenMP workers spin-wait
    for cores that other processes hold). ``k = None`` keeps the current count.
    """

    def __init__(self, k: int | None) -> None:
        self.k = k

    def __enter__(self) -> torch_threads:
        self.old = torch.get_num_threads()
        if self.k is not None:
            torch.set_num_threads(self.k)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def color(i: int):
    """The ``i``-th line colour of a figure: tab10, then four more that stay apart from it."""
    import matplotlib.pyplot as plt

    extra = ["black", "gold", "navy", "lime"]
    return plt.get_cmap("tab10")(i) if i < 10 else extra[(i - 10) % len(extra)]


#: the checkout (paths in the results are recorded relative to it)
ROOT = Path(__file__).resolve().parent.parent


def relative_path(path: str | Path) -> str:
    """``path`` relative to the checkout (``..`` steps when outside it): results never record absolute paths."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def git_sha() -> str:
    """The commit the benchmark ran on (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def meta_info() -> dict[str, Any]:
    """Versions, CPU and threads: what a reader needs to compare numbers across machines."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "geoopt": _version("geoopt"),
        "peft": _version("peft"),
        "pytorch_optimizer": _version("pytorch_optimizer"),
        "lowrank_geom": _version("lowrank_geom"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(result: SuiteResult, ctx: RunContext, seconds: float) -> Path:
    """Write ``<out>/<suite>.json`` and ``<out>/<suite>.md``; returns the JSON path."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "suite": result.suite,
        "run": {
            "command": ctx.command,
            "git_sha": git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "size": ctx.size,
            "seed": ctx.seed,
            "config": result.config,
            # the suites that ran at the same time, each in its own process (benchmarks/runner.py)
            "alongside": ctx.options.get("alongside", []),
        },
        "meta": meta_info(),
        "metrics": result.metrics,
        "figures": [str(Path(f).name) for f in result.figures],
    }
    path = ctx.out / f"{result.suite}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    alongside = payload["run"]["alongside"]
    md = [
        f"# {result.suite}",
        "",
        f"Command: `{ctx.command}` (size `{ctx.size}`, seed {ctx.seed}, {seconds:.1f} s, "
        f"git {payload['run']['git_sha'][:12]}, torch {payload['meta']['torch']}, "
        f"{payload['meta']['torch_threads']} threads on {payload['meta']['cpu']}"
        + (f"; alongside {', '.join(alongside)}, one process each" if alongside else "")
        + ")",
        "",
        result.table.strip(),
        "",
    ]
    md += [f"![{Path(f).stem}]({Path(f).name})" for f in result.figures]
    (ctx.out / f"{result.suite}.md").write_text("\n".join(md) + "\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def markdown_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub Markdown table; floats in compact scientific or fixed notation."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "nan"
            if v == 0 or 1e-3 <= abs(v) < 1e4:
                return f"{v:.4g}"
            return f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(iterable: Iterable, ctx: RunContext, desc: str, total: int | None = None):
    """tqdm progress on stderr when enabled (disabled for ``--quick`` runs in tests)."""
    if not ctx.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0


def savefig(fig: Any, ctx: RunContext, name: str) -> str:
    """Save a matplotlib figure as ``<out>/<name>.png`` and close it; returns the path."""
    import matplotlib.pyplot as plt

    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)
