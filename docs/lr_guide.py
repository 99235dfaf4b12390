"""The learning-rate tables of ``docs/choosing.rst``, written from the published benchmark JSONs.

``docs/conf.py`` calls :func:`generate` before every build; it writes
``docs/_generated/lr_guide.rst`` (git-ignored) from

* ``docs/results/finetune-all/finetune.json`` (the fine-tune comparison of every optimizer): each
  optimizer's learning-rate grid with the selection loss and test accuracy at every lr, the lr
  the benchmark selected, its ratio to AdamW's, and the mean test accuracy over the seeds;
* ``docs/results/robustness.json``: the lr each optimizer ran at relative to AdamW's in the
  robustness grid, and its final losses and verdicts at each of AdamW's rates.

No figure on that page is typed by hand; a missing JSON gives a note with the command that
makes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median

DOCS = Path(__file__).resolve().parent
FINETUNE = DOCS / "results" / "finetune-all" / "finetune.json"
ROBUSTNESS = DOCS / "results" / "robustness.json"
OUT = DOCS / "_generated" / "lr_guide.rst"
#: the run that writes :data:`FINETUNE` (then ``docs/publish_results.py results-all docs/results/finetune-all``)
ALL_COMMAND = "python -m benchmarks finetune --optimizers all --seeds 3 --lr-grid 0.3,1,3 --out results-all"


def _g(x: float) -> str:
    return f"{x:.3g}"


def _source(payload: dict, download: str) -> str:
    run = payload.get("run", {})
    sha = (run.get("git_sha") or "")[:12]
    return f"From :download:`{Path(download).name} <{download}>` (``{run.get('command', '?')}``, git ``{sha}``)."


def _table(header: list[str], rows: list[list[str]], widths: str | None = None) -> str:
    lines = [".. list-table::", "   :header-rows: 1"]
    if widths:
        lines.append(f"   :widths: {widths}")
    lines.append("")
    for row in [header, *rows]:
        lines += [f"   * - {row[0]}"] + [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


def finetune_table(payload: dict) -> str:
    """Each optimizer's lr grid (selection loss, test accuracy) and the selected lr."""
    optimizers = payload["metrics"]["optimizers"]
    reference = optimizers.get("adamw", {}).get("lr")
    rows = []
    for name, o in optimizers.items():
        losses, accs = o.get("lr_grid_selection_loss", {}), o.get("lr_grid_acc", {})
        grid = sorted(losses, key=float)
        best = min(grid, key=lambda lr: losses[lr]) if grid else None
        cells = [
            (f"**{_g(float(lr))}**" if lr == best else _g(float(lr)))
            + f": {losses[lr]:.3f} ({accs.get(lr, float('nan')):.1f} %)"
            for lr in grid
        ]
        ratio = _g(o["lr"] / reference) + "×" if reference else "—"
        spread = f"{max(losses.values()) / min(losses.values()):.2f}×" if losses else "—"
        acc = f"{o.get('acc_mean', float('nan')):.1f} ± {o.get('acc_std', float('nan')):.1f}"
        rows.append([f"``{name}``", _g(o["lr"]), ratio, "; ".join(cells), spread, acc])
    header = [
        "optimizer",
        "selected lr",
        "vs AdamW's",
        "lr: selection loss (test accuracy), best in bold",
        "worst / best loss over the grid",
        "test accuracy at the selected lr, mean ± std over seeds (%)",
    ]
    return _table(header, rows, "14 10 9 39 12 16")


def robustness_table(payload: dict) -> str:
    """Per optimizer: its lr relative to AdamW's, and median final loss and verdicts per AdamW lr."""
    cells = payload["metrics"]["cells"]
    names = list(dict.fromkeys(c["optimizer"] for c in cells))
    lrs = sorted({c["lr"] for c in cells})
    rows = []
    for name in names:
        mine = [c for c in cells if c["optimizer"] == name]
        ratios = sorted({round(c["run_lr"] / c["lr"], 6) for c in mine})
        row = [f"``{name}``", ", ".join(_g(r) + "×" for r in ratios)]
        for lr in lrs:
            at = [c for c in mine if c["lr"] == lr]
            finite = [
                c["final_loss"] for c in at if c.get("final_loss") is not None and c["final_loss"] == c["final_loss"]
            ]
            trains = sum(c.get("verdict") == "trains" for c in at)
            row.append((f"{median(finite):.3g}" if finite else "—") + f" ({trains}/{len(at)} train)")
        rows.append(row)
    header = ["optimizer", "lr vs AdamW's"] + [f"AdamW lr {_g(lr)}: median final loss" for lr in lrs]
    return _table(header, rows)


def _missing(what: str, commands: str) -> str:
    return f".. note::\n\n   Not yet generated: no published {what}. Run ``{commands}`` and rebuild.\n"


def page() -> str:
    """The generated reST: both tables with their sources, or notes where a JSON is missing."""
    parts = [".. rubric:: Fine-tune: the learning-rate grid of every optimizer\n"]
    if FINETUNE.exists():
        payload = json.loads(FINETUNE.read_text())
        parts += [_source(payload, "/results/finetune-all/finetune.json") + "\n", finetune_table(payload)]
    else:
        parts.append(_missing("fine-tune result of every optimizer", ALL_COMMAND))
    parts.append(".. rubric:: Robustness grid: the same model at three of AdamW's learning rates\n")
    if ROBUSTNESS.exists():
        payload = json.loads(ROBUSTNESS.read_text())
        parts += [_source(payload, "/results/robustness.json") + "\n", robustness_table(payload)]
    else:
        parts.append(_missing("robustness result", "python -m benchmarks robustness --out results"))
    return "\n".join(parts)


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (its folder created) unless it already holds it: an unchanged page keeps
    its mtime, so incremental builds do not re-read it."""
    path.parent.mkdir(exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate() -> None:
    """Write ``docs/_generated/lr_guide.rst`` when its content changed."""
    write_if_changed(OUT, page())
