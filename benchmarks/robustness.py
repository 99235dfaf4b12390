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
* **lr**: AdamW's 1e-4, 1e-3, 1e-2 — a decade either side of its recommended 1e-3. Every other
  optimizer runs the same decades around *its own* recommended rate (its config's untuned
  ``"default"`` lr; :func:`optimizer_lr`): an adaptive method (LoRA-RITE, PEFT's Riemannian
  AdamW) at exactly AdamW's rates, ScaledGD and one-sided Adagrad (recommended 1e-2) at 10×
  them, LoRA+ (2e-4) at 0.2×. The rate of a gradient-descent method is in units of the loss's
  gradient, not of the parameters, so AdamW's number means nothing for it; the question is
  whether a method trains at the rates a user would try, without per-cell tuning. Each record
  keeps the rate it ran at (``run_lr``); the head always trains at the cell's (AdamW's) rate.

Optimizers: every registered ``lowrank_geom`` strategy, AdamW, LoRA+, PEFT's Riemannian
preconditioner and pytorch-optimizer's ``LoRARite``, built by
:func:`benchmarks.optimizers.make_optimizer` with their configs' settings. The head (and any
other trainable parameter outside the LoRA pairs) is trained at the cell's learning rate without
weight decay: by a ``lowrank_geom`` optimizer's AdamW fallback group, by an AdamW group of the
torch and PEFT optimizers, and by a separate ``torch.optim.AdamW`` next to pytorch-optimizer's
``LoRARite`` (which pairs the tensors of a group two by two).

Verdicts (:func:`verdict`): ``raises`` (an exception: its type and first line are recorded),
``diverges`` (a non-finite loss, a final loss above :data:`BLOWUP` times the initial one, or one
above :data:`RATIO` times AdamW's without real progress), ``lags`` (real progress — at most
:data:`ADAMW_TRAINS` times the initial loss — but above :data:`RATIO` times AdamW's), ``trains``
(finite and at most :data:`RATIO` times AdamW's), and ``n/a`` when AdamW itself
does not train in that cell (its final loss is not finite or above :data:`ADAMW_TRAINS` times
the initial loss): the ratio then means nothing, and the cell is left out of the target. An
optimizer *trains wherever AdamW trains* when its verdict is ``trains`` in every cell where
AdamW's is.

Conditioning sweep (:func:`run_conditioning`; a separate section of the same suite): does
LoRA-RITE in float32 and bfloat16 end where float64 ends on an ill-conditioned fit? Each cell
(κ, dtype, engine, seed) fits ``Z* = U diag(σ) Vᵀ`` (:data:`COND_M` × :data:`COND_N`, rank
:data:`COND_R`, ``σ`` log-spaced from 1 to ``1/κ``) with the mean squared error
``‖A Bᵀ − Z*‖_F²/(m n)`` from PEFT's start (``A = 0``, ``B`` gaussian / √n), LoRA-RITE with its
library defaults at lr :data:`COND_LR` and ``engine`` ``"qr"`` (what ``"auto"`` picks) or
``"gram"``. The final relative error ``‖A Bᵀ − Z*‖_F/‖Z*‖_F`` is compared with the float64 QR
run of the same seed and κ, floored at :data:`FLOOR_ULPS` unit roundoffs of the cell's dtype
(:func:`error_floor`; float64 reaches ~1e-16 here). Verdicts (:func:`conditioning_verdict`):
``follows`` (at most :data:`COND_RATIO` times that reference), ``lags`` (finite, below 1, but
more), ``diverges`` (non-finite, or above 1: worse than the ``A = 0`` start), ``raises``, and
``n/a`` when the float64 reference did not train. The 2× target applies to float32; bfloat16's
ratios are reported. Sizes (:data:`COND_SIZES`): ``quick`` κ = 1e3, 1 seed, 200 steps, float64
and float32, QR; ``default`` κ ∈ {1e2, 1e4}, 2 seeds, 1000 steps, float64 and float32, QR;
``full`` κ ∈ {1e1, 1e2, 1e3, 1e4}, 3 seeds, 1500 steps, every dtype, both engines.
The cells of one (dtype, engine) run as pairs of one optimizer (each pair gets exactly its own
gradient; per-pair results equal those of separate runs); a batch that raises is rerun cell by
cell.

Sizes (one torch thread per run): ``quick`` one cell (float32, lr 1e-2), every optimizer, 30
steps; ``default`` PEFT's default init with the 2-class head, every dtype and lr, 100 steps, for
LoRA-RITE, ScaledGD, AltLoRA, LoFT, LoRA-One and the baselines (9 runs each); ``full`` the whole
grid (the inits PEFT supports × 4 set-ups × 3 dtypes × 3 lrs) with 2 seeds, 100 steps, every
optimizer, in two worker processes. Each result records its wall time (``run.seconds``; the
conditioning sweep's own in ``conditioning.seconds``, each batch's in its cells' ``batch_seconds``).
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
VERDICTS = ["trains", "lags", "diverges", "raises", "n/a"]
#: verdicts that miss the target "trains wherever AdamW trains"
FAILURES = ("lags", "diverges", "raises")

SIZES: dict[str, dict[str, Any]] = {
    # every optimizer (None: optimizer_names()) in one cell, for the tests
    "quick": dict(
        inits=["peft_default"],
        setups=["2class"],
        dtypes=["float32"],
        lrs=[1e-2],
        seeds=1,
        steps=30,
        workers=1,
        optimizers=None,
    ),
    # `make bench` on 2 shared cores (<= 90 s): the cells of the known failure, the invariant
    # strategies and the baselines
    "default": dict(
        inits=["peft_default"],
        setups=["2class"],
        dtypes=list(DTYPES),
        lrs=LRS,
        seeds=1,
        steps=100,
        workers=1,
        optimizers=["lora_rite", "scaled_gd", "altlora", "loft", "lora_one", *BASELINES],
    ),
    # the whole grid: 360 cells x 8 optimizers, in two worker processes
    "full": dict(
        inits=list(INITS),
        setups=list(SETUPS),
        dtypes=list(DTYPES),
        lrs=LRS,
        seeds=2,
        steps=100,
        workers=2,
        optimizers=None,
    ),
}


def optimizer_names() -> list[str]:
    """Every registered ``lowrank_geom`` strategy, then :data:`BASELINES`."""
    from benchmarks.optimizers import PACKAGE_OPTIMIZERS
    from lowrank_geom.strategies import available_strategies

    strategies = list(available_strategies())
    ordered = [n for n in PACKAGE_OPTIMIZERS if n in strategies]
    return ordered + [n for n in strategies if n not in ordered] + BASELINES


# ------------------------------------------------------------------------------------ verdicts
def adamw_trains(adamw_final: float | None, initial: float) -> bool:
    """Whether the reference made real progress (see :data:`ADAMW_TRAINS`)."""
    return adamw_final is not None and math.isfinite(adamw_final) and (adamw_final <= ADAMW_TRAINS * initial)


def verdict(final: float | None, adamw_final: float | None, initial: float, error: str | None = None) -> str:
    """``raises`` / ``diverges`` / ``lags`` / ``trains`` / ``n/a`` for one optimizer in one cell.

    An exception, a non-finite loss or a loss above :data:`BLOWUP` times the initial one is a
    failure whatever AdamW did; the ratio test needs an AdamW that trained, otherwise ``n/a``.
    Behind AdamW by more than :data:`RATIO` is ``lags`` when the run made the progress that
    counts as training for AdamW (:func:`adamw_trains`), ``diverges`` when it did not.
    """
    if error is not None:
        return "raises"
    if final is None or not math.isfinite(final) or final > BLOWUP * initial:
        return "diverges"
    if not adamw_trains(adamw_final, initial):
        return "n/a"
    if final <= RATIO * adamw_final:
        return "trains"
    return "lags" if adamw_trains(final, initial) else "diverges"


def optimizer_lr(name: str, cell_lr: float) -> float:
    """The rate ``name`` runs at in a cell of AdamW rate ``cell_lr``: ``cell_lr`` times its
    config's recommended (untuned ``"default"``) lr over AdamW's; ``cell_lr`` for a strategy
    registered without a benchmark config."""
    from benchmarks.common import config_lr
    from benchmarks.optimizers import config_path

    if not config_path(name).exists():
        return cell_lr
    return cell_lr * config_lr(name) / config_lr(REFERENCE)


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
            cfg = peft.LoraConfig(
                r=s["r"],
                lora_alpha=2 * s["r"],
                lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["head"],
                init_lora_weights=INITS[init],
            )
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
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)


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


def build_optimizer(name: str, model: PeftMLP, lr: float, head_lr: float | None = None):
    """Optimizer ``name`` over the LoRA pairs at learning rate ``lr``, plus the head by AdamW at
    ``head_lr`` (default ``lr``)."""
    head_lr = lr if head_lr is None else head_lr
    from benchmarks.optimizers import config_path, load_config, make_optimizer

    if not config_path(name).exists():  # a strategy registered without a benchmark config
        from lowrank_geom import LowRankOptimizer

        pairs = model.pairs()
        return LowRankOptimizer(
            [{"pairs": pairs}, {"params": model.other_parameters(), "lr": head_lr}], strategy=name, lr=lr
        )
    opt = make_optimizer(name, model, suite=SUITE, lr=lr)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    rest = [p for p in model.other_parameters() if id(p) not in held]  # PEFT's factories hold all
    if not rest:
        return opt
    if load_config(name)["library"] == "pytorch_optimizer.LoRARite":
        return _WithHead(opt, torch.optim.AdamW(rest, lr=head_lr, weight_decay=0.0))
    opt.add_param_group({"params": rest, "lr": head_lr, "weight_decay": 0.0})
    return opt


# ---------------------------------------------------------------------------------------- runs
def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    line = line.replace("|", "/")  # keeps the Markdown table intact
    return f"{type(err).__name__}: {line[:160]}".rstrip(": ")


def train(name: str, cell: dict[str, Any], steps: int) -> dict[str, Any]:
    """One optimizer in one cell: ``initial_loss``, ``final_loss`` (None if non-finite),
    ``error`` (None, or ``"Type: first line"``), ``steps_done`` and the warnings it raised."""
    from benchmarks.common import torch_threads

    # tiny matrices: two threads only add hand-offs (many times slower on a busy machine)
    with torch_threads(1):
        return _train(name, cell, steps)


def _train(name: str, cell: dict[str, Any], steps: int) -> dict[str, Any]:
    dtype = DTYPES[cell["dtype"]]
    x, y = make_data(cell["setup"], cell["seed"], dtype)
    batch = SETUPS[cell["setup"]]["batch"]
    model = PeftMLP(cell["init"], cell["setup"], dtype, cell["seed"])
    out: dict[str, Any] = {
        "initial_loss": full_loss(model.peft_model, x, y),
        "final_loss": None,
        "error": None,
        "steps_done": 0,
        "run_lr": optimizer_lr(name, cell["lr"]),
    }
    g = torch.Generator().manual_seed(cell["seed"])
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = build_optimizer(name, model, out["run_lr"], head_lr=cell["lr"])
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
        except Exception as err:
            out["error"] = _first_line(err)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})[:3]
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
        except Exception as err:
            found[init] = _first_line(err)
    return found


def run_cell(cell: dict[str, Any], names: list[str], steps: int) -> list[dict[str, Any]]:
    """Every optimizer of ``names`` in one cell, with its verdict against AdamW's run there."""
    runs = {name: train(name, cell, steps) for name in dict.fromkeys([REFERENCE, *names])}
    ref = runs[REFERENCE]
    records = []
    for name in names:
        r = runs[name]
        records.append(
            {
                "optimizer": name,
                **cell,
                **r,
                "adamw_final_loss": ref["final_loss"],
                "adamw_trains": adamw_trains(ref["final_loss"], ref["initial_loss"]),
                "verdict": verdict(r["final_loss"], ref["final_loss"], r["initial_loss"], r["error"]),
            }
        )
    return records


def _run_cells(
    cells: list[dict[str, Any]], names: list[str], size: dict[str, Any], ctx: RunContext
) -> list[dict[str, Any]]:
    """All cells, in order; with ``workers > 1`` in fresh (spawned) processes (every run has one
    thread, so the numbers are the same as a sequential run's)."""
    workers = min(size.get("workers", 1), len(cells))
    if workers <= 1:
        return [
            rec
            for cell in progress(cells, ctx, SUITE, total=len(cells))
            for rec in run_cell(cell, names, size["steps"])
        ]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a fork after OpenMP threads ran (earlier suites of `all`) can hang
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        done = pool.map(run_cell, cells, [names] * len(cells), [size["steps"]] * len(cells))
        return [rec for recs in progress(done, ctx, SUITE, total=len(cells)) for rec in recs]


def run(ctx: RunContext) -> SuiteResult:
    from benchmarks.common import torch_threads

    with torch_threads(1):  # also for building the models and the figure
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    size = SIZES[ctx.size]
    names = size["optimizers"] or optimizer_names()
    inits = supported_inits(size["inits"])
    cells = [
        dict(init=i, setup=s, dtype=d, lr=lr, seed=ctx.seed + k)
        for i in size["inits"]
        if inits[i] is None
        for s in size["setups"]
        for d in size["dtypes"]
        for lr in size["lrs"]
        for k in range(size["seeds"])
    ]
    records = _run_cells(cells, names, size, ctx)
    summary = summarize(records, names, size["seeds"] > 1)
    metrics = {
        "cells": records,
        "summary": summary,
        "trains_where_adamw_trains": {n: v["trains_where_adamw_trains"] for n, v in summary.items()},
        "inits": {i: {"supported": e is None, "error": e} for i, e in inits.items()},
        "optimizers": names,
        "reference": REFERENCE,
        "ratio": RATIO,
        "adamw_trains_fraction": ADAMW_TRAINS,
        "blowup": BLOWUP,
    }
    config = {
        "size": ctx.size,
        **size,
        "optimizers": names,
        "setups": SETUPS,
        "inits": {k: INITS[k] for k in size["inits"]},
        "model": _model_note(),
        "in_dim": IN_DIM,
        "width": WIDTH,
        "n_samples": N_SAMPLES,
        "torch_threads": torch.get_num_threads(),
    }
    table = _table(records, summary, names, size)
    figures = [_heatmap(records, names, ctx)]
    cond_size = COND_SIZES[ctx.size]
    metrics["conditioning"] = run_conditioning(cond_size, ctx.seed, ctx)
    config["conditioning"] = conditioning_config(cond_size)
    table += "\n\n### Conditioning sweep: LoRA-RITE in float32/bfloat16 vs float64\n\n" + _conditioning_table(
        metrics["conditioning"]
    )
    figures.append(_conditioning_figure(metrics["conditioning"], ctx))
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table, figures=figures)


def _model_note() -> str:
    return (
        f"inp Linear({IN_DIM},{WIDTH}) + tanh, 2 blocks x + v_proj(tanh(q_proj(x))), head; "
        "PEFT LoRA on q_proj/v_proj (lora_alpha = 2r, dropout 0), head in modules_to_save"
    )


# ------------------------------------------------------------------------------------- summary
def summarize(records: list[dict[str, Any]], names: list[str], with_seed: bool = False) -> dict[str, dict[str, Any]]:
    """Per optimizer: verdict counts, whether it trains wherever AdamW trains, failing cells."""
    out = {}
    for name in names:
        mine = [r for r in records if r["optimizer"] == name]
        counts = {v: sum(r["verdict"] == v for r in mine) for v in VERDICTS}
        target = [r for r in mine if r["adamw_trains"]]
        failing = [_failure(r, with_seed) for r in mine if r["verdict"] in FAILURES]
        out[name] = {
            **counts,
            "target_cells": len(target),
            "failing": failing,
            "trains_where_adamw_trains": all(r["verdict"] == "trains" for r in target),
        }
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
        what = f"{r['verdict']}: {why_diverged(r)}"
    mark = "" if r["adamw_trains"] else " †"
    return f"{cell_label(r, with_seed)} ({what}){mark}"


#: the failing-cells column lists at most this many (the JSON has them all)
MAX_LISTED = 8
_MARK = {"trains": "✓", "lags": "~", "diverges": "✗", "raises": "!", "n/a": "–"}


def _table(records: list[dict[str, Any]], summary: dict[str, Any], names: list[str], size: dict[str, Any]) -> str:
    rows = []
    for name in names:
        s = summary[name]
        fails = s["failing"][:MAX_LISTED]
        if len(s["failing"]) > MAX_LISTED:
            fails.append(f"… {len(s['failing']) - MAX_LISTED} more")
        rows.append(
            [
                name,
                s["trains"],
                s["lags"],
                s["diverges"],
                s["raises"],
                s["n/a"],
                "yes" if s["trains_where_adamw_trains"] else "no",
                "; ".join(fails) or "—",
            ]
        )
    head = ["optimizer", "trains", "lags", "diverges", "raises", "n/a", "trains wherever AdamW trains", "failing cells"]
    text = "### Verdicts\n\n" + markdown_table(head, rows)
    cells = list(dict.fromkeys(cell_label(r, True) for r in records))
    if len(cells) <= 30:
        text += "\n\n### Final losses\n\n" + _loss_table(records, names)
    else:  # too many cells to list: where the failures are, axis by axis
        text += "\n\n### Failing runs by axis\n\n" + _axis_table(records, names, size)
    return text + "\n\n" + _note(size, names)


def _axis_table(records: list[dict[str, Any]], names: list[str], size: dict[str, Any]) -> str:
    """Per optimizer and axis value: failing runs (lags, diverges or raises) / runs."""
    axes = [(key, value) for key in ("init", "setup", "dtype", "lr") for value in size[key + "s"]]
    rows = []
    for name in names:
        row: list[Any] = [name]
        for key, value in axes:
            mine = [r for r in records if r["optimizer"] == name and r[key] == value]
            bad = sum(r["verdict"] in FAILURES for r in mine)
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


def _note(size: dict[str, Any], names: list[str]) -> str:
    setups = ", ".join(
        f"{k} = {v['classes']} classes, batch {v['batch']}, r={v['r']}"
        for k, v in SETUPS.items()
        if k in size["setups"]
    )
    scaled = ", ".join(f"{n} {optimizer_lr(n, 1.0):g}×" for n in names if optimizer_lr(n, 1.0) != 1.0)
    return (
        f"{size['steps']} steps per run; lr = AdamW's rate, the head's rate for every optimizer; "
        "the LoRA factors run at that rate times the optimizer's recommended lr over AdamW's "
        f"({scaled or 'none differs'}; 1× for the others). Final loss = cross-entropy over all "
        f"{N_SAMPLES} samples after training. Verdicts: ✓ trains (finite, ≤ {RATIO:g}× AdamW's "
        f"final loss in the same cell), ~ lags (≤ {ADAMW_TRAINS:g}× the initial loss but "
        f"> {RATIO:g}× AdamW's), ✗ diverges (non-finite, > {BLOWUP:g}× the initial loss, or "
        f"> {RATIO:g}× AdamW's without that progress: the failing-cells column says which), "
        "! raises (exception type; its first line is in the JSON), – n/a (AdamW itself does not "
        f"train: its final loss is not ≤ {ADAMW_TRAINS:g}× the initial one). 'trains wherever "
        "AdamW trains' is over the cells where AdamW trains; † marks a failure in a cell where it "
        f"does not. Set-ups: {setups}."
    )


# -------------------------------------------------------------------------------------- figure
_COLORS = {"trains": "#4daf4a", "lags": "#ff7f00", "diverges": "#e41a1c", "raises": "#984ea3", "n/a": "#d9d9d9"}
#: over seeds a heatmap square shows the worst verdict
_SEVERITY = ["n/a", "trains", "lags", "diverges", "raises"]


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
    ax.legend(
        handles=[Patch(color=_COLORS[v], label=v) for v in VERDICTS],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    ax.set_title("Robustness: verdict per optimizer and cell (init/setup/dtype/lr; worst over seeds)", fontsize=9)
    return savefig(fig, ctx, "robustness_verdicts")


# =============================================================================================
# Conditioning sweep: does LoRA-RITE in float32 / bfloat16 end where float64 ends?
# =============================================================================================
#: problem shape (Z* is COND_M x COND_N of rank COND_R) and the one learning rate of every run
COND_M, COND_N, COND_R = 64, 48, 4
COND_LR = 1e-3
COND_KAPPAS = [1e1, 1e2, 1e3, 1e4]
COND_DTYPES = ["float64", "float32", "bfloat16"]
COND_ENGINES = ["qr", "gram"]
#: the run every cell is compared with: float64, QR engine, same seed and kappa
COND_REFERENCE = ("float64", "qr")
#: "follows" means a final error at most this multiple of the reference error
COND_RATIO = 2.0
#: the reference error is floored at this many unit roundoffs of the cell's dtype (see
#: :func:`error_floor`)
FLOOR_ULPS = 16
#: dtypes the 2x target applies to; bfloat16's ratios are reported, not targeted
COND_TARGET_DTYPES = ["float32"]
COND_VERDICTS = ["follows", "lags", "diverges", "raises", "n/a"]
COND_SIZES: dict[str, dict[str, Any]] = {
    # the tests: one kappa, one seed, float64 + float32, default engine
    "quick": dict(kappas=[1e3], seeds=1, steps=200, dtypes=["float64", "float32"], engines=["qr"]),
    # `make bench` (<= 25 s on 2 shared cores): the two ends of the range
    "default": dict(kappas=[1e2, 1e4], seeds=2, steps=1000, dtypes=["float64", "float32"], engines=["qr"]),
    # the whole grid
    "full": dict(kappas=COND_KAPPAS, seeds=3, steps=1500, dtypes=COND_DTYPES, engines=COND_ENGINES),
}


def unit_roundoff(dtype: str) -> float:
    """``u = eps/2`` of ``dtype``: 2⁻⁵³ (float64), 2⁻²⁴ (float32), 2⁻⁸ (bfloat16)."""
    return torch.finfo(DTYPES[dtype]).eps / 2


def error_floor(dtype: str) -> float:
    """The smallest reference error a ``dtype`` run is held to: :data:`FLOOR_ULPS` unit roundoffs.

    Float64's own error falls to ~1e-16 on this problem, far below what a run whose factors,
    residual and gradient are ``dtype`` numbers can reach (rounding ``Z*`` alone to float32
    costs ~u/2 relative; float32 runs on a κ = 10 target, where conditioning is no cause, end at
    2-11 u); without a floor every float32 run would "lag" by 10⁸ whatever the conditioning."""
    return FLOOR_ULPS * unit_roundoff(dtype)


def conditioning_reference(float64_error: float | None, dtype: str) -> float | None:
    """``max(float64 QR error, error_floor(dtype))``; None when float64's error is not finite."""
    if float64_error is None or not math.isfinite(float64_error):
        return None
    return max(float64_error, error_floor(dtype))


def conditioning_ratio(final_error: float | None, float64_error: float | None, dtype: str) -> float | None:
    """Final error over :func:`conditioning_reference`; None if either is not finite."""
    ref = conditioning_reference(float64_error, dtype)
    if ref is None or final_error is None or not math.isfinite(final_error):
        return None
    return final_error / ref


def conditioning_verdict(
    final_error: float | None, float64_error: float | None, dtype: str, exception: str | None = None
) -> str:
    """``raises`` / ``diverges`` / ``follows`` / ``lags`` / ``n/a`` for one run of the sweep.

    ``diverges``: the final relative error is not finite or above 1 (worse than the ``A = 0``
    start, whose error is exactly 1). ``n/a``: the float64 reference itself did not train (not
    finite or not below 1). Otherwise ``follows`` when the error is at most :data:`COND_RATIO`
    times :func:`conditioning_reference`, else ``lags``.
    """
    if exception is not None:
        return "raises"
    if final_error is None or not math.isfinite(final_error) or final_error > 1.0:
        return "diverges"
    ref = conditioning_reference(float64_error, dtype)
    if ref is None or ref >= 1.0:
        return "n/a"
    return "follows" if final_error <= COND_RATIO * ref else "lags"


def conditioning_problem(kappa: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z*, B₀)`` in float64: ``Z* = U diag(σ) Vᵀ`` (``σ`` log-spaced from 1 to 1/κ, ``U, V``
    orthonormal bases of random ±1 matrices) and ``B₀`` gaussian / √n. One generator per seed,
    ``U, V`` drawn first: a seed gives the same ``U, V, B₀`` at every κ."""
    from benchmarks.lowrank_problems import generator, planted_target

    g = generator(seed)
    z, *_ = planted_target(COND_M, COND_N, COND_R, kappa, g, spacing="log")
    b0 = torch.randn(COND_N, COND_R, generator=g, dtype=torch.float64) / math.sqrt(COND_N)
    return z, b0


def relative_error(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> float | None:
    """``‖A Bᵀ − Z*‖_F / ‖Z*‖_F`` in float64 (the factors upcast exactly); None if not finite."""
    with torch.no_grad():
        err = float(torch.linalg.norm(a.double() @ b.double().T - z) / torch.linalg.norm(z))
    return err if math.isfinite(err) else None


def fit_conditioning(cells: list[tuple[float, int]], dtype: str, engine: str, steps: int) -> dict[str, Any]:
    """LoRA-RITE (library defaults, ``engine``) on each ``(kappa, seed)`` of ``cells``, in one
    optimizer: every cell is its own pair, the loss their sum, so each pair gets exactly its own
    gradient (the optimizer batches same-shape pairs; per-pair state and arithmetic are those of
    a run alone). Returns ``{"errors", "update_skips", "nonfinite_skips", "exception",
    "steps_done", "seconds", "warnings"}`` (lists per cell). An exception stops every pair of
    the batch: :func:`run_conditioning_batch` then reruns the cells one by one."""
    from benchmarks.common import torch_threads

    with torch_threads(1):  # tiny matrices: one thread (see :func:`train`)
        return _fit_conditioning(cells, dtype, engine, steps)


def _fit_conditioning(cells: list[tuple[float, int]], dtype: str, engine: str, steps: int) -> dict[str, Any]:
    from lowrank_geom import LoRAPair, LowRankOptimizer

    dt = DTYPES[dtype]
    loss_dtype = torch.promote_types(dt, torch.float32)  # the reduction adds no bf16 round-off
    problems = [conditioning_problem(k, s) for k, s in cells]
    a = [torch.zeros(COND_M, COND_R, dtype=dt, requires_grad=True) for _ in problems]
    b = [b0.to(dt).requires_grad_() for _, b0 in problems]
    targets = [z.to(dt) for z, _ in problems]
    out: dict[str, Any] = {"exception": None, "steps_done": 0}
    opt = None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairs = [LoRAPair(ai, bi, name=f"kappa={k:g}/seed={s}") for ai, bi, (k, s) in zip(a, b, cells)]
            opt = LowRankOptimizer(pairs, strategy="lora_rite", lr=COND_LR, engine=engine)
            for step in range(steps):
                losses = [
                    (ai @ bi.T - zi).to(loss_dtype).square().sum() / (COND_M * COND_N)
                    for ai, bi, zi in zip(a, b, targets)
                ]
                total = torch.stack(losses).sum()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                out["steps_done"] = step + 1
                if not math.isfinite(float(total.detach())) and not any(
                    math.isfinite(float(x.detach())) for x in losses
                ):
                    break  # every pair is gone
        except Exception as err:
            out["exception"] = _first_line(err)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["errors"] = [relative_error(ai.detach(), bi.detach(), z) for ai, bi, (z, _) in zip(a, b, problems)]
    state = opt.state if opt is not None else {}
    out["update_skips"] = [int(float(state.get(ai, {}).get("update_skips", 0))) for ai in a]
    out["nonfinite_skips"] = [int(float(state.get(ai, {}).get("nonfinite_skips", 0))) for ai in a]
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})[:3]
    return out


def run_conditioning_batch(cells: list[tuple[float, int]], dtype: str, engine: str, steps: int) -> list[dict[str, Any]]:
    """One record per cell (``kappa, seed, dtype, engine, final_error, exception, ...``); a
    batch that raised is rerun cell by cell, so an exception is charged to its own cell only."""
    fit = fit_conditioning(cells, dtype, engine, steps)
    if fit["exception"] is not None and len(cells) > 1:
        return [rec for cell in cells for rec in run_conditioning_batch([cell], dtype, engine, steps)]
    return [
        dict(
            kappa=k,
            seed=s,
            dtype=dtype,
            engine=engine,
            steps=steps,
            final_error=None if fit["exception"] else fit["errors"][i],
            exception=fit["exception"],
            steps_done=fit["steps_done"],
            update_skips=fit["update_skips"][i],
            nonfinite_skips=fit["nonfinite_skips"][i],
            batch_size=len(cells),
            batch_seconds=fit["seconds"],
            warnings=fit["warnings"],
        )
        for i, (k, s) in enumerate(cells)
    ]


def run_conditioning(size: dict[str, Any], seed: int, ctx: RunContext) -> dict[str, Any]:
    """The whole sweep of one size: records with verdicts, the per-row summary, the claim."""
    t0 = time.perf_counter()
    cells = [(k, seed + j) for k in size["kappas"] for j in range(size["seeds"])]
    combos = [(d, e) for d in size["dtypes"] for e in size["engines"]]
    if COND_REFERENCE not in combos:
        raise ValueError(f"the conditioning sweep needs its reference {COND_REFERENCE}")
    combos.remove(COND_REFERENCE)
    records = []
    for dtype, engine in progress([COND_REFERENCE, *combos], ctx, f"{SUITE}/conditioning"):
        records += run_conditioning_batch(cells, dtype, engine, size["steps"])
    section = conditioning_section(records, size)
    section["seconds"] = round(time.perf_counter() - t0, 3)
    return section


def conditioning_section(records: list[dict[str, Any]], size: dict[str, Any]) -> dict[str, Any]:
    """Verdicts against the float64 QR run of the same (kappa, seed), the rows and the claim,
    from the records of :func:`run_conditioning_batch` (strict-JSON safe)."""
    from benchmarks.lowrank_problems import json_safe

    for r in records:
        if r["final_error"] is not None and not math.isfinite(r["final_error"]):
            r["final_error"] = None
    ref = {(r["kappa"], r["seed"]): r["final_error"] for r in records if (r["dtype"], r["engine"]) == COND_REFERENCE}
    for r in records:
        f64 = ref.get((r["kappa"], r["seed"]))
        r["float64_error"] = f64
        r["reference_error"] = conditioning_reference(f64, r["dtype"])
        r["ratio"] = None if r["exception"] else conditioning_ratio(r["final_error"], f64, r["dtype"])
        r["verdict"] = conditioning_verdict(r["final_error"], f64, r["dtype"], r["exception"])
        r["targeted"] = r["dtype"] in COND_TARGET_DTYPES
    # the claim: every float32 cell whose reference trained follows it (per engine, and all)
    by_engine = (
        {
            e: all(
                r["verdict"] == "follows"
                for r in records
                if r["dtype"] == "float32" and r["engine"] == e and r["verdict"] != "n/a"
            )
            for e in size["engines"]
        }
        if "float32" in size["dtypes"]
        else {}
    )
    return json_safe(
        {
            "cells": records,
            "rows": conditioning_rows(records),
            "float32_follows_float64": all(by_engine.values()) if by_engine else None,
            "float32_follows_float64_by_engine": by_engine,
            "reference": {"dtype": COND_REFERENCE[0], "engine": COND_REFERENCE[1]},
            "ratio": COND_RATIO,
            "floor_ulps": FLOOR_ULPS,
            "error_floors": {d: error_floor(d) for d in size["dtypes"]},
            "target_dtypes": COND_TARGET_DTYPES,
        }
    )


def conditioning_config(size: dict[str, Any]) -> dict[str, Any]:
    from lowrank_geom.strategies import get_strategy

    hp = {k: v for k, v in get_strategy("lora_rite").defaults.items() if k != "engine"}
    return {
        **size,
        "m": COND_M,
        "n": COND_N,
        "r": COND_R,
        "lr": COND_LR,
        "sigma": "log-spaced from 1 to 1/kappa",
        "init": "A = 0, B gaussian / sqrt(n)",
        "loss": "sum over cells of ||A B^T - Z*||_F^2 / (m n) (residual in the run's dtype, "
        "reduction in float32 or wider)",
        "error": "||A B^T - Z*||_F / ||Z*||_F in float64",
        "lora_rite": hp,
    }


def conditioning_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kappa, dtype, engine): median/max over seeds, verdict counts, failures."""
    import statistics

    rows = []
    keys = list(dict.fromkeys((r["kappa"], r["dtype"], r["engine"]) for r in records))
    order = {d: i for i, d in enumerate(COND_DTYPES)}
    keys.sort(key=lambda k: (k[0], order.get(k[1], 99), COND_ENGINES.index(k[2]) if k[2] in COND_ENGINES else 99))
    for kappa, dtype, engine in keys:
        mine = [r for r in records if (r["kappa"], r["dtype"], r["engine"]) == (kappa, dtype, engine)]
        errs = [r["final_error"] for r in mine if r["final_error"] is not None]
        f64 = [r["float64_error"] for r in mine if r["float64_error"] is not None]
        ratios = [r["ratio"] for r in mine if r["ratio"] is not None]
        rows.append(
            {
                "kappa": kappa,
                "dtype": dtype,
                "engine": engine,
                "seeds": len(mine),
                "float64_error_median": statistics.median(f64) if f64 else None,
                "error_median": statistics.median(errs) if errs else None,
                "error_max": max(errs) if errs else None,
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                **{v: sum(r["verdict"] == v for r in mine) for v in COND_VERDICTS},
                "targeted": dtype in COND_TARGET_DTYPES,
                "not_following": [_cond_failure(r) for r in mine if r["verdict"] != "follows"],
            }
        )
    return rows


def _cond_failure(r: dict[str, Any]) -> str:
    """``seed 1: lags 52.3×`` / ``diverges (non-finite)`` / ``raises Type (step 56)`` (the
    exception's first line is in the JSON)."""
    what = r["verdict"]
    if what == "raises":
        what += f" {r['exception'].split(':', 1)[0]} (step {r['steps_done'] + 1})"
    elif what == "diverges":
        what += " (non-finite)" if r["final_error"] is None else f" (error {r['final_error']:.3g})"
    elif r["ratio"] is not None:
        what += f" {r['ratio']:.3g}×"
    return f"seed {r['seed']}: {what}"


def _conditioning_table(section: dict[str, Any]) -> str:
    head = [
        "κ",
        "dtype",
        "engine",
        "float64 QR error (median)",
        "error median",
        "error max",
        "ratio median",
        "ratio max",
        "follows",
        "lags",
        "diverges",
        "raises",
        "n/a",
        "2× target",
        "not following",
    ]
    rows = [_conditioning_row(row) for row in section["rows"]]
    return markdown_table(head, rows) + _conditioning_note(section)


def _conditioning_row(row: dict[str, Any]) -> list[Any]:
    reference = (row["dtype"], row["engine"]) == COND_REFERENCE
    target = "reference" if reference else ("yes" if row["targeted"] else "reported only")
    return [
        f"{row['kappa']:.0e}",
        row["dtype"],
        row["engine"],
        _num(row["float64_error_median"]),
        _num(row["error_median"]),
        _num(row["error_max"]),
        _num(row["ratio_median"]),
        _num(row["ratio_max"]),
        row["follows"],
        row["lags"],
        row["diverges"],
        row["raises"],
        row["n/a"],
        target,
        "; ".join(row["not_following"]) or "—",
    ]


def _conditioning_note(section: dict[str, Any]) -> str:
    """The claim's verdict and how to read the conditioning table."""
    claim = section["float32_follows_float64"]
    by_engine = ", ".join(
        f"{e}: {'yes' if ok else 'no'}" for e, ok in section["float32_follows_float64_by_engine"].items()
    )
    floors = ", ".join(f"{d} {f:.2g}" for d, f in section["error_floors"].items())
    text = (
        f"\n\n**float32 follows float64 (≤ {COND_RATIO:g}×) in every cell: "
        f"{'n/a' if claim is None else ('yes' if claim else 'no')}** ({by_engine})."
    )
    text += (
        f"\n\nLoRA-RITE (library defaults, lr {COND_LR:g}) fits a rank-{COND_R} "
        f"{COND_M}×{COND_N} target Z* with singular values log-spaced from 1 to 1/κ from A = 0; "
        "error = ‖ABᵀ − Z*‖_F/‖Z*‖_F after the last step. Each cell is compared with the float64 "
        "QR run of the same seed and κ: reference = max(float64 error, "
        f"{FLOOR_ULPS} unit roundoffs of the cell's dtype) ({floors}); ratio = error / "
        f"reference. follows: ≤ {COND_RATIO:g}× the reference; lags: finite, below 1, but "
        f"> {COND_RATIO:g}×; diverges: non-finite or above 1 (worse than the A = 0 start); "
        "raises: an exception; n/a: the float64 reference did not train. The "
        f"{COND_RATIO:g}× target applies to float32; bfloat16 (8-bit mantissa, unit roundoff "
        "2⁻⁸ ≈ 3.9e-3 per entry) is reported only."
    )
    return text


def _num(x: float | None) -> Any:
    return "—" if x is None else float(x)


_COND_COLORS = {"float64": "black", "float32": "tab:blue", "bfloat16": "tab:orange"}
_COND_MARKERS = {"qr": "o", "gram": "s"}


def _plot_cond_combo(ax, section: dict[str, Any], dtype: str, engine: str, height: float, failed_label: bool) -> bool:
    """One dtype/engine: median error vs κ, min-max band, ``x`` at ``height`` where any seed
    diverged or raised (one height per combination, so the marks do not hide each other).
    Returns whether it drew such marks."""
    rows = [r for r in section["rows"] if (r["dtype"], r["engine"]) == (dtype, engine)]
    ok = [r for r in rows if r["error_median"] is not None]
    style = "--" if dtype == "float64" else ("-" if engine == "qr" else "-.")
    color, marker = _COND_COLORS.get(dtype, "gray"), _COND_MARKERS.get(engine, "^")
    if ok:
        ks = [r["kappa"] for r in ok]
        ax.plot(
            ks,
            [r["error_median"] for r in ok],
            style,
            color=color,
            marker=marker,
            label=f"{dtype} / {engine}",
            alpha=0.9 if engine == "qr" else 0.6,
        )
        lo = [
            min(
                c["final_error"]
                for c in section["cells"]
                if (c["kappa"], c["dtype"], c["engine"]) == (r["kappa"], dtype, engine) and c["final_error"] is not None
            )
            for r in ok
        ]
        ax.fill_between(ks, lo, [r["error_max"] for r in ok], color=color, alpha=0.08)
    bad = [r["kappa"] for r in rows if r["diverges"] + r["raises"]]
    if bad:
        label = "diverges / raises (any seed)" if failed_label else None
        ax.plot(bad, [height] * len(bad), "x", color=color, markersize=8, label=label)
    return bool(bad)


def _conditioning_figure(section: dict[str, Any], ctx: RunContext) -> str:
    """Final error vs κ: median over seeds (min-max shaded), one line per dtype/engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    combos = list(dict.fromkeys((r["dtype"], r["engine"]) for r in section["rows"]))
    top = max([r["error_max"] for r in section["rows"] if r["error_max"]] + [1.0]) * 3
    failed_label = True
    for i, (dtype, engine) in enumerate(combos):
        failed = _plot_cond_combo(ax, section, dtype, engine, top * 2.0**i, failed_label)
        failed_label = failed_label and not failed
    for dtype, floor in section["error_floors"].items():
        if dtype != "float64":
            ax.axhline(floor, color=_COND_COLORS.get(dtype, "gray"), linestyle=":", linewidth=0.8)
            ax.annotate(
                f"{dtype} floor ({FLOOR_ULPS}u)",
                (0.01, floor),
                fontsize=7,
                xycoords=("axes fraction", "data"),
                va="bottom",
                color=_COND_COLORS.get(dtype, "gray"),
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("condition number κ of Z*")
    ax.set_ylabel("final ‖ABᵀ − Z*‖_F / ‖Z*‖_F (median over seeds)")
    ax.set_title("Conditioning sweep: LoRA-RITE by dtype / engine (float64 dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="major", alpha=0.3)
    return savefig(fig, ctx, "robustness_conditioning")
