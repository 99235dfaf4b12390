"""The conditioning tables of ``docs/numerics.rst``, written from the published benchmark JSONs.

``docs/conf.py`` calls :func:`generate` before every build; it writes
``docs/_generated/numerics_conditioning.rst`` (git-ignored) from

* ``docs/results/invariance.json``: the ``Z``-trajectory gap under random gauges of growing
  condition number, in float32 and float64, for LoRA-RITE with each engine forced and for
  ScaledGD (Gram-based, :math:`GL(r)`-invariant);
* ``docs/results/robustness.json``, its conditioning sweep: LoRA-RITE's final error on
  ill-conditioned fits per κ and dtype, against the float64 run of the same seed.

No figure on that page is typed by hand; a missing JSON gives a note with the command that
makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lr_guide import _missing, _source, _table, write_if_changed  # helpers shared by the generated pages

DOCS = Path(__file__).resolve().parent
INVARIANCE = DOCS / "results" / "invariance.json"
ROBUSTNESS = DOCS / "results" / "robustness.json"
OUT = DOCS / "_generated" / "numerics_conditioning.rst"
# the GL(r)-invariant rows the engine comparison of numerics.rst is about, in this order where present
GAUGE_ROWS = ("lora_rite[engine=gram]", "lora_rite[engine=qr]", "scaled_gd")
DTYPES = ("float32", "float64")


def _e(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.1e}"


def invariance_table(payload: dict) -> str:
    """Gap per optimizer (rows) and dtype × random gauge ``cond=…`` (columns)."""
    metrics = payload["metrics"]
    gauges = [g for g in metrics["gauges"] if g.startswith("cond=")]
    if not gauges:
        raise ValueError("invariance.json has no random gauges (cond=...): nothing to tabulate")
    rows = []
    for name in (n for n in GAUGE_ROWS if n in metrics["optimizers"]):
        gaps = metrics["optimizers"][name]["gaps"]
        rows.append([f"``{name}``"] + [_e(gaps.get(dt, {}).get(g)) for dt in DTYPES for g in gauges])
    header = ["optimizer"] + [f"{dt}, {g.replace('=', ' ')}" for dt in DTYPES for g in gauges]
    return _table(header, rows)


def conditioning_table(payload: dict) -> str:
    """One row per (κ, dtype, engine) of the robustness suite's conditioning sweep."""
    cond = payload["metrics"]["conditioning"]
    rows = [
        [
            f"{row['kappa']:g}",
            row["dtype"],
            row["engine"],
            str(row["seeds"]),
            f"{_e(row['error_median'])} ({_e(row['error_max'])})",
            _e(row["float64_error_median"]),
            f"{row['ratio_median']:.2g} ({row['ratio_max']:.2g})",
            ", ".join(f"{row[v]} {v}" for v in ("follows", "lags", "diverges", "raises") if row.get(v)) or "—",
        ]
        for row in cond["rows"]
    ]
    header = [
        "κ",
        "dtype",
        "engine",
        "seeds",
        "final relative error, median (max)",
        "float64 run's, median",
        "ratio to it (floored), median (max)",
        "verdicts",
    ]
    return _table(header, rows)


def _invariance_part() -> list[str]:
    if not INVARIANCE.exists():
        return [_missing("invariance result", "python -m benchmarks invariance --out results")]
    payload = json.loads(INVARIANCE.read_text())
    steps = payload["run"].get("config", {}).get("steps", "?")
    intro = (
        f"{_source(payload, '/results/invariance.json')} The gap after {steps} steps between the run from "
        "the factors and the run from the factors gauged by a random :math:`G` of condition number ``cond`` "
        "(the :doc:`invariance benchmark </benchmarks/invariance>`'s definition).\n"
    )
    return [intro, invariance_table(payload)]


def _conditioning_part() -> list[str]:
    if not ROBUSTNESS.exists():
        return [_missing("robustness result", "python -m benchmarks robustness --out results")]
    payload = json.loads(ROBUSTNESS.read_text())
    cfg = payload["run"].get("config", {}).get("conditioning", {})
    target = payload["metrics"]["conditioning"].get("ratio", "?")
    intro = (
        f"{_source(payload, '/results/robustness.json')} LoRA-RITE with its defaults fitting a "
        f"rank-{cfg.get('r', '?')} target of size {cfg.get('m', '?')} × {cfg.get('n', '?')} with singular "
        f"values log-spaced from 1 to 1/κ, {cfg.get('steps', '?')} steps from PEFT's zero-factor start "
        f"(the :doc:`robustness benchmark </benchmarks/robustness>`'s conditioning sweep; a dtype *follows* "
        f"float64 within {target}× of its error, floored at the dtype's rounding level).\n"
    )
    return [intro, conditioning_table(payload)]


def page() -> str:
    """The generated reST: both tables with their sources, or notes where a JSON is missing."""
    parts = [".. rubric:: Invariance under ill-conditioned gauges, per engine\n", *_invariance_part()]
    parts += [".. rubric:: Ill-conditioned fits in float32 against float64\n", *_conditioning_part()]
    return "\n".join(parts)


def generate() -> None:
    """Write ``docs/_generated/numerics_conditioning.rst`` when its content changed."""
    write_if_changed(OUT, page())
