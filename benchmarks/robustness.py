r"""Suite ``robustness``: does each optimizer train the PEFT set-ups that AdamW trains?

A small residual MLP (input layer, two blocks ``x + v_proj(tanh(q_proj(x)))`` of width
:data:`WIDTH`, a classification head) is wrapped by PEFT: LoRA on every ``q_proj``/``v_proj``
(``lora_alpha = 2r``) and the head in ``modules_to_save``. The data is a synthetic
classification set drawn from the seed (a noisy linear teacher; nothing is downloaded). Each
*cell* of the grid is one (init, set-up, dtype, learning rate, seed); in every cell each
optimizer trains a fresh copy of the same model on the same minibatch sequence for a fixed
number of steps, and the *final loss* is the cross-entropy over the whole data set afterwards.

Grid axes:

* **init** (:data:`INITS`): PEFT's default (``lora_B = 0``, Kaiming ``lora_A``), PEFT's
  ``"gaussian"`` (``lora_B = 0``), both factors random and nonzero, and PEFT's ``"pissa"`` and
  ``"olora"`` (nonzero factors, base weight modified) when the installed PEFT supports them on
  this model (checked at run time; an unsupported init is reported and skipped).
* **set-up** (:data:`SETUPS`): gradients of rank below ``r`` — a 2-class head, batch size 1,
  ``r = 8`` with batches of 4 — and a control with 8 classes and batches of 32.
* **dtype**: float32, bfloat16 (the whole model), float64.
* **lr**: 1e-4, 1e-3, 1e-2 for every optimizer (no per-optimizer tuning: the question is
  whether a method trains at the rates a user would try).

Optimizers: every registered ``lowrank_geom`` strategy, AdamW, LoRA+, PEFT's Riemannian
preconditioner and pytorch-optimizer's ``LoRARite``, built by
:func:`benchmarks.optimizers.make_optimizer` with their configs' settings. The head (and any
other trainable parameter outside the LoRA pairs) is trained at the cell's learning rate without
weight decay: by a ``lowrank_geom`` optimizer's AdamW fallback group, by an AdamW group of the
torch and PEFT optimizers, and by a separate ``torch.optim.AdamW`` next to pytorch-optimizer's
``LoRARite`` (which pairs the tensors of a group two by two).

Verdicts (:func:`verdict`): ``raises`` (an exception: its type and first line are recorded),
``diverges`` (a non-finite loss, or a final loss above :data:`RATIO` times AdamW's in the same
cell), ``trains`` (finite and at most :data:`RATIO` times AdamW's), and ``n/a`` when AdamW itself
does not train in that cell (its final loss is not finite or above :data:`ADAMW_TRAINS` times
the initial loss): the ratio then means nothing, and the cell is left out of the target. An
optimizer *trains wherever AdamW trains* when its verdict is ``trains`` in every cell where
AdamW's is.

Sizes (2-core CPU, one torch thread per run; a run of 100 steps takes about 1 s): ``quick`` one
cell (float32, lr 1e-2), every optimizer, 30 steps (a few seconds plus importing PEFT);
``default`` PEFT's default init with the 2-class head, every dtype and lr, 100 steps, for
LoRA-RITE, ScaledGD and the baselines (54 runs, about a minute); ``full`` the whole grid with 2
seeds, 100 steps, every optimizer (2880 runs in two worker processes, about half an hour on two
idle cores).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, markdown_table, progress, savefig

SUITE = "robustness"
#: the reference optimizer every verdict compares with
REFERENCE = "adamw"
#: the baselines besides this package's strategies (names of ``benchmarks/configs/*.json``)
BASELINES = ["adamw", "loraplus", "peft_riemannian", "pyopt_lora_rite"]
#: "trains" means a final loss at most this multiple of AdamW's
RATIO = 1.5
#: AdamW trains a cell when its final loss is finite and at least 1 % below the initial one
ADAMW_TRAINS = 0.99
#: a final loss above this multiple of the initial one diverges, whatever AdamW did
BLOWUP = 2.0
IN_DIM, WIDTH, N_SAMPLES = 12, 20, 256
#: init label -> PEFT's ``init_lora_weights`` (``"random_both"`` is PEFT's gaussian, then lora_B
#: is redrawn like lora_A, so both factors start nonzero)
INITS: dict[str, Any] = {
    "peft_default": True,
    "gaussian": "gaussian",
    "random_both": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
#: set-up label -> classes, batch size, LoRA rank
SETUPS: dict[str, dict[str, int]] = {
    "2class": dict(classes=2, batch=32, r=4),  # head gradient of rank 1 < r
    "batch1": dict(classes=8, batch=1, r=4),  # every step's gradient has rank 1
    "r8_batch4": dict(classes=8, batch=4, r=8),  # rank <= 4 < r
    "control": dict(classes=8, batch=32, r=4),  # gradients of rank >= r
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
LRS = [1e-4, 1e-3, 1e-2]
VERDICTS = ["trains", "diverges", "raises", "n/a"]

SIZES: dict[str, dict[str, Any]] = {
    # every optimizer (None: optimizer_names()) in one cell, for the tests
    "quick": dict(inits=["peft_default"], setups=["2class"], dtypes=["float32"], lrs=[1e-2],
                  seeds=1, steps=30, workers=1, optimizers=None),
    # `make bench` on 2 shared cores (<= 90 s): the cells of the known failure, the invariant
    # strategies and the baselines
    "default": dict(inits=["peft_default"], setups=["2class"], dtypes=list(DTYPES), lrs=LRS,
                    seeds=1, steps=100, workers=1,
                    optimizers=["lora_rite", "scaled_gd", *BASELINES]),
    # the whole grid: 360 cells x 8 optimizers, in two worker processes
    "full": dict(inits=list(INITS), setups=list(SETUPS), dtypes=list(DTYPES), lrs=LRS,
                 seeds=2, steps=100, workers=2, optimizers=None),
}


def optimizer_names() -> list[str]:
    """Every registered ``lowrank_geom`` strategy, then :data:`BASELINES`."""
    from lowrank_geom.strategies import available_strategies

    from benchmarks.optimizers import PACKAGE_OPTIMIZERS

    strategies = list(available_strategies())
    ordered = [n for n in PACKAGE_OPTIMIZERS if n in strategies]
    return ordered + [n for n in strategies if n not in ordered] + BASELINES


# ------------------------------------------------------------------------------------ verdicts
def adamw_trains(adamw_final: float | None, initial: float) -> bool:
    """Whether the reference made real progress (see :data:`ADAMW_TRAINS`)."""
    return adamw_final is not None and math.isfinite(adamw_final) and (
        adamw_final <= ADAMW_TRAINS * initial)


def verdict(final: float | None, adamw_final: float | None, initial: float,
            error: str | None = None) -> str:
    """``raises`` / ``diverges`` / ``trains`` / ``n/a`` for one optimizer in one cell.

    An exception, a non-finite loss or a loss above :data:`BLOWUP` times the initial one is a
    failure whatever AdamW did; the ratio test needs an AdamW that trained, otherwise ``n/a``.
    """
    if error is not None:
        return "raises"
    if final is None or not math.isfinite(final) or final > BLOWUP * initial:
        return "diverges"
    if not adamw_trains(adamw_final, initial):
        return "n/a"
    return "trains" if final <= RATIO * adamw_final else "diverges"


# --------------------------------------------------------------------------------------- model
class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(width, width)
        self.v_proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class _Net(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(IN_DIM, WIDTH)
        self.b1, self.b2 = _Block(WIDTH), _Block(WIDTH)
        self.head = torch.nn.Linear(WIDTH, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(torch.tanh(self.inp(x)))))


class PeftMLP:
    """The PEFT-wrapped MLP with the interface :func:`~benchmarks.optimizers.make_optimizer`
    expects: ``peft_model``, ``pairs()`` and ``trainable_parameters()`` (the LoRA factors only)."""

    def __init__(self, init: str, setup: str, dtype: torch.dtype, seed: int) -> None:
        import peft

        s = SETUPS[setup]
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on PiSSA/OLoRA; not the optimizer's
            torch.manual_seed(seed)
            cfg = peft.LoraConfig(r=s["r"], lora_alpha=2 * s["r"], lora_dropout=0.0,
                                  target_modules=["q_proj", "v_proj"], modules_to_save=["head"],
                                  init_lora_weights=INITS[init])
            # built in float32 (PiSSA/OLoRA factorize the base weight), then cast
            self.peft_model = peft.get_peft_model(_Net(s["classes"]), cfg)
            if init == "random_both":
                for pair in self.pairs():
                    a = pair.a.data  # lora_B: redrawn like PEFT's gaussian lora_A
                    a.copy_(torch.randn_like(a) / s["r"])
        self.peft_model.to(dtype)

    def pairs(self):
        from lowrank_geom.peft import lora_pairs

        return lora_pairs(self.peft_model)

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [t for p in self.pairs() for t in (p.a, p.b)]

    def other_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters outside the pairs (the ``modules_to_save`` head)."""
        from lowrank_geom.peft import non_pair_parameters

        return non_pair_parameters(self.peft_model, self.pairs())


def make_data(setup: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_SAMPLES`` inputs and labels: argmax of a random linear teacher plus noise."""
    classes = SETUPS[setup]["classes"]
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, classes, generator=g)
    y = (x @ w + 0.3 * torch.randn(N_SAMPLES, classes, generator=g)).argmax(-1)
    return x.to(dtype), y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    # bf16 logits are upcast so the loss itself adds no bf16 round-off
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype,
                                                                           torch.float32)), y)


def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(_loss(model, x, y))


# ---------------------------------------------------------------------------------- optimizers
class _WithHead:
    """A LoRA optimizer plus a separate AdamW for the other parameters (``zero_grad``/``step``)."""

    def __init__(self, main: torch.optim.Optimizer, head: torch.optim.Optimizer) -> None:
        self.main, self.head = main, head

    def step(self) -> None:
        self.main.step()
        self.head.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        self.head.zero_grad(set_to_none=set_to_none)


def build_optimizer(name: str, model: PeftMLP, lr: float):
    """Optimizer ``name`` over the LoRA pairs plus the head, at learning rate ``lr`` for both."""
    from benchmarks.optimizers import config_path, load_config, make_optimizer

    if not config_path(name).exists():  # a strategy registered without a benchmark config
        from lowrank_geom import LowRankOptimizer

        pairs = model.pairs()
        return LowRankOptimizer([{"pairs": pairs}, {"params": model.other_parameters()}],
                                strategy=name, lr=lr)
    opt = make_optimizer(name, model, suite=SUITE, lr=lr)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    rest = [p for p in model.other_parameters() if id(p) not in held]  # PEFT's factories hold all
    if not rest:
        return opt
    if load_config(name)["library"] == "pytorch_optimizer.LoRARite":
        return _WithHead(opt, torch.optim.AdamW(rest, lr=lr, weight_decay=0.0))
    opt.add_param_group({"params": rest, "lr": lr, "weight_decay": 0.0})
    return opt


# ---------------------------------------------------------------------------------------- runs
def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    line = line.replace("|", "/")  # keeps the Markdown table intact
    return f"{type(err).__name__}: {line[:160]}".rstrip(": ")


def train(name: str, cell: dict[str, Any], steps: int) -> dict[str, Any]:
    """One optimizer in one cell: ``initial_loss``, ``final_loss`` (None if non-finite),
    ``error`` (None, or ``"Type: first line"``), ``steps_done`` and the warnings it raised."""
    from benchmarks.lowrank_problems import torch_threads

    # tiny matrices: two threads only add hand-offs (many times slower on a busy machine)
    with torch_threads(1):
        return _train(name, cell, steps)


def _train(name: str, cell: dict[str, Any], steps: int) -> dict[str, Any]:
    dtype = DTYPES[cell["dtype"]]
    x, y = make_data(cell["setup"], cell["seed"], dtype)
    batch = SETUPS[cell["setup"]]["batch"]
    model = PeftMLP(cell["init"], cell["setup"], dtype, cell["seed"])
    out: dict[str, Any] = {"initial_loss": full_loss(model.peft_model, x, y), "final_loss": None,
                           "error": None, "steps_done": 0}
    g = torch.Generator().manual_seed(cell["seed"])
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = build_optimizer(name, model, cell["lr"])
            for step in range(steps):
                idx = torch.randint(0, N_SAMPLES, (batch,), generator=g)
                loss = _loss(model.peft_model, x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                out["steps_done"] = step + 1
                if not math.isfinite(loss.item()):
                    break
            final = full_loss(model.peft_model, x, y)
            out["final_loss"] = final if math.isfinite(final) else None
        except Exception as err:  # noqa: BLE001 - any exception is the "raises" verdict
            out["error"] = _first_line(err)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}"
                              for w in caught})[:3]
    return out


def cell_label(cell: dict[str, Any], with_seed: bool = False) -> str:
    label = f"{cell['init']}/{cell['setup']}/{cell['dtype']}/lr={cell['lr']:g}"
    return label + (f"/seed={cell['seed']}" if with_seed else "")


def supported_inits(inits: list[str]) -> dict[str, str | None]:
    """``{init: None}`` if the installed PEFT builds this model with it, else the error."""
    found = {}
    for init in inits:
        try:
            PeftMLP(init, "2class", torch.float32, 0)
            found[init] = None
        except Exception as err:  # noqa: BLE001 - an unsupported init is reported, not fatal
            found[init] = _first_line(err)
    return found


def run_cell(cell: dict[str, Any], names: list[str], steps: int) -> list[dict[str, Any]]:
    """Every optimizer of ``names`` in one cell, with its verdict against AdamW's run there."""
    runs = {name: train(name, cell, steps) for name in dict.fromkeys([REFERENCE, *names])}
    ref = runs[REFERENCE]
    records = []
    for name in names:
        r = runs[name]
        records.append({
            "optimizer": name, **cell, **r,
            "adamw_final_loss": ref["final_loss"],
            "adamw_trains": adamw_trains(ref["final_loss"], ref["initial_loss"]),
            "verdict": verdict(r["final_loss"], ref["final_loss"], r["initial_loss"], r["error"]),
        })
    return records


def _run_cells(cells: list[dict[str, Any]], names: list[str], size: dict[str, Any],
               ctx: RunContext) -> list[dict[str, Any]]:
    """All cells, in order; with ``workers > 1`` in fresh (spawned) processes (every run has one
    thread, so the numbers are the same as a sequential run's)."""
    workers = min(size.get("workers", 1), len(cells))
    if workers <= 1:
        return [rec for cell in progress(cells, ctx, SUITE, total=len(cells))
                for rec in run_cell(cell, names, size["steps"])]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a fork after OpenMP threads ran (earlier suites of `all`) can hang
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        done = pool.map(run_cell, cells, [names] * len(cells), [size["steps"]] * len(cells))
        return [rec for recs in progress(done, ctx, SUITE, total=len(cells)) for rec in recs]


def run(ctx: RunContext) -> SuiteResult:
    from benchmarks.lowrank_problems import torch_threads

    with torch_threads(1):  # also for building the models and the figure
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    size = SIZES[ctx.size]
    names = size["optimizers"] or optimizer_names()
    inits = supported_inits(size["inits"])
    cells = [dict(init=i, setup=s, dtype=d, lr=lr, seed=ctx.seed + k)
             for i in size["inits"] if inits[i] is None for s in size["setups"]
             for d in size["dtypes"] for lr in size["lrs"] for k in range(size["seeds"])]
    records = _run_cells(cells, names, size, ctx)
    summary = summarize(records, names, size["seeds"] > 1)
    metrics = {
        "cells": records,
        "summary": summary,
        "trains_where_adamw_trains": {n: v["trains_where_adamw_trains"]
                                      for n, v in summary.items()},
        "inits": {i: {"supported": e is None, "error": e} for i, e in inits.items()},
        "optimizers": names,
        "reference": REFERENCE, "ratio": RATIO, "adamw_trains_fraction": ADAMW_TRAINS,
        "blowup": BLOWUP,
    }
    config = {"size": ctx.size, **size, "optimizers": names, "setups": SETUPS,
              "inits": {k: INITS[k] for k in size["inits"]}, "model": _model_note(),
              "in_dim": IN_DIM, "width": WIDTH, "n_samples": N_SAMPLES,
              "torch_threads": torch.get_num_threads()}
    table = _table(records, summary, names, size)
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table,
                       figures=[_heatmap(records, names, ctx)])


def _model_note() -> str:
    return (f"inp Linear({IN_DIM},{WIDTH}) + tanh, 2 blocks x + v_proj(tanh(q_proj(x))), head; "
            "PEFT LoRA on q_proj/v_proj (lora_alpha = 2r, dropout 0), head in modules_to_save")


# ------------------------------------------------------------------------------------- summary
def summarize(records: list[dict[str, Any]], names: list[str],
              with_seed: bool = False) -> dict[str, dict[str, Any]]:
    """Per optimizer: verdict counts, whether it trains wherever AdamW trains, failing cells."""
    out = {}
    for name in names:
        mine = [r for r in records if r["optimizer"] == name]
        counts = {v: sum(r["verdict"] == v for r in mine) for v in VERDICTS}
        target = [r for r in mine if r["adamw_trains"]]
        failing = [_failure(r, with_seed) for r in mine if r["verdict"] in ("diverges", "raises")]
        out[name] = {**counts, "target_cells": len(target), "failing": failing,
                     "trains_where_adamw_trains": all(r["verdict"] == "trains" for r in target)}
    return out


def why_diverged(r: dict[str, Any]) -> str:
    """``non-finite``, ``N× initial`` (blew up) or ``N× AdamW`` (finite, but fell behind)."""
    final = r["final_loss"]
    if final is None:
        return "non-finite"
    if final > BLOWUP * r["initial_loss"]:
        return f"{final / r['initial_loss']:.3g}× initial"
    return f"{final / r['adamw_final_loss']:.3g}× AdamW"


def _failure(r: dict[str, Any], with_seed: bool) -> str:
    if r["verdict"] == "raises":
        error = r["error"] if len(r["error"]) <= 70 else r["error"][:69] + "…"  # JSON: whole
        what = f"raises {error}"
    else:
        what = f"diverges: {why_diverged(r)}"
    mark = "" if r["adamw_trains"] else " †"
    return f"{cell_label(r, with_seed)} ({what}){mark}"


#: the failing-cells column lists at most this many (the JSON has them all)
MAX_LISTED = 8
_MARK = {"trains": "✓", "diverges": "✗", "raises": "!", "n/a": "–"}


def _table(records: list[dict[str, Any]], summary: dict[str, Any], names: list[str],
           size: dict[str, Any]) -> str:
    rows = []
    for name in names:
        s = summary[name]
        fails = s["failing"][:MAX_LISTED]
        if len(s["failing"]) > MAX_LISTED:
            fails.append(f"… {len(s['failing']) - MAX_LISTED} more")
        rows.append([name, s["trains"], s["diverges"], s["raises"], s["n/a"],
                     "yes" if s["trains_where_adamw_trains"] else "no",
                     "; ".join(fails) or "—"])
    head = ["optimizer", "trains", "diverges", "raises", "n/a", "trains wherever AdamW trains",
            "failing cells"]
    text = "### Verdicts\n\n" + markdown_table(head, rows)
    cells = list(dict.fromkeys(cell_label(r, True) for r in records))
    if len(cells) <= 30:
        text += "\n\n### Final losses\n\n" + _loss_table(records, names)
    else:  # too many cells to list: where the failures are, axis by axis
        text += "\n\n### Failing runs by axis\n\n" + _axis_table(records, names, size)
    return text + "\n\n" + _note(size)


def _axis_table(records: list[dict[str, Any]], names: list[str], size: dict[str, Any]) -> str:
    """Per optimizer and axis value: failing runs (diverges or raises) / runs."""
    axes = [(key, value) for key in ("init", "setup", "dtype", "lr")
            for value in size[key + "s"]]
    rows = []
    for name in names:
        row: list[Any] = [name]
        for key, value in axes:
            mine = [r for r in records if r["optimizer"] == name and r[key] == value]
            bad = sum(r["verdict"] in ("diverges", "raises") for r in mine)
            row.append(f"{bad}/{len(mine)}" if mine else "—")
        rows.append(row)
    head = ["optimizer"] + [f"lr={v:g}" if k == "lr" else str(v) for k, v in axes]
    return markdown_table(head, rows)


def _loss_table(records: list[dict[str, Any]], names: list[str]) -> str:
    by_cell: dict[str, dict[str, Any]] = {}
    for r in records:
        by_cell.setdefault(cell_label(r, True), {})[r["optimizer"]] = r
    rows = []
    for label, recs in by_cell.items():
        first = next(iter(recs.values()))
        row = [label, first["initial_loss"]]
        for name in names:
            r = recs[name]
            if r["verdict"] == "raises":
                row.append("! " + r["error"].split(":", 1)[0])
            else:
                loss = r["final_loss"]
                row.append(("nan" if loss is None else f"{loss:.4g}") + " " + _MARK[r["verdict"]])
        rows.append(row)
    return markdown_table(["cell (init/setup/dtype/lr/seed)", "initial"] + names, rows)


def _note(size: dict[str, Any]) -> str:
    setups = ", ".join(f"{k} = {v['classes']} classes, batch {v['batch']}, r={v['r']}"
                       for k, v in SETUPS.items() if k in size["setups"])
    return (
        f"{size['steps']} steps per run, one learning rate for the LoRA factors and the head; "
        f"final loss = cross-entropy over all {N_SAMPLES} samples after training. Verdicts: "
        f"✓ trains (finite, ≤ {RATIO:g}× AdamW's final loss in the same cell), ✗ diverges "
        f"(non-finite, > {BLOWUP:g}× the initial loss, or finite but > {RATIO:g}× AdamW's: "
        "the failing-cells column says which), ! raises (exception type; its first line is in "
        f"the JSON), – n/a (AdamW itself does not train: its final loss is not ≤ "
        f"{ADAMW_TRAINS:g}× the initial one). 'trains wherever AdamW trains' is over the cells "
        f"where AdamW trains; † marks a failure in a cell where it does not. Set-ups: {setups}."
    )


# -------------------------------------------------------------------------------------- figure
_COLORS = {"trains": "#4daf4a", "diverges": "#e41a1c", "raises": "#984ea3", "n/a": "#d9d9d9"}
#: over seeds a heatmap square shows the worst verdict
_SEVERITY = ["n/a", "trains", "diverges", "raises"]


def _heatmap(records: list[dict[str, Any]], names: list[str], ctx: RunContext) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cells = list(dict.fromkeys(cell_label(r) for r in records))
    grid = torch.zeros(len(names), len(cells), dtype=torch.long)
    for r in records:
        i, j = names.index(r["optimizer"]), cells.index(cell_label(r))
        grid[i, j] = max(int(grid[i, j]), _SEVERITY.index(r["verdict"]))
    width = min(4 + 0.18 * len(cells), 40)
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.35 * len(names)))
    cmap = ListedColormap([_COLORS[v] for v in _SEVERITY])
    ax.imshow(grid.numpy(), cmap=cmap, vmin=-0.5, vmax=len(_SEVERITY) - 0.5, aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(len(cells)), cells, rotation=90, fontsize=6)
    ax.set_xticks([j - 0.5 for j in range(1, len(cells))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(names))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.legend(handles=[Patch(color=_COLORS[v], label=v) for v in VERDICTS], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Robustness: verdict per optimizer and cell (init/setup/dtype/lr; "
                 "worst over seeds)", fontsize=9)
    return savefig(fig, ctx, "robustness_verdicts")
