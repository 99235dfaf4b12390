r"""Suite ``speed``: optimizer step time and exact optimizer-state bytes on realistic LoRA parameter sets.

Every optimizer of :data:`benchmarks.optimizers.OPTIMIZERS` is built by
:func:`~benchmarks.optimizers.make_optimizer` over a :class:`~benchmarks.optimizers.PairModel`
(float32, both factors random so no QR sees a zero factor) with fixed random gradients set once.
The timed function is ``opt.step()`` (the step mutates the parameters — harmless for timing);
``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)`` with all of torch's threads,
median reported, after one untimed warm-up step that creates the state. Times are reported as a
ratio to ``torch.optim.Adam(foreach=True)`` (config ``adam``) measured in the same run on the same set.

* **Parameter sets**: Gemma-2B-shaped LoRA — 18 layers × q, k, v, o; hidden 2048, kv dim 256
  (``(m, n)`` = q ``2048×2048``, k/v ``256×2048``, o ``2048×2048``), ``r ∈ {8, 16, 64}`` — and
  (full size) a 7B-shaped set at ``r = 16`` (32 layers × q, k, v, o, all
  ``4096×4096``; Shampoo skipped there).
* **m sweep**: ``P`` square pairs ``m×m`` at fixed ``r``, ``m`` doubling — how time grows with m.
* **State bytes**: exact ``Σ numel · element_size`` over every tensor in ``optimizer.state``
  (:func:`benchmarks.optimizers.state_bytes`; checked against ``LowRankOptimizer.state_bytes()``).
* **Shampoo** (``pytorch_optimizer.Shampoo``, library default ``preconditioning_compute_steps=1``)
  keeps an ``m×m`` preconditioner per factor side and takes an SVD of each every step (an ``m³``
  cost per factor side): on Gemma shapes (``--full``; ``skipped`` at the default size) it is
  timed on the first layer only (4 pairs, Adam re-timed on the same subset for its ratio) and its
  full-set time and state are **extrapolated ×18** (layers are identical, so the state bytes
  scale exactly), marked ``*`` in the table; sets with a larger factor dimension than
  ``shampoo_max_dim`` are ``skipped``.
* **LoFT** forms each pair's ``m×n`` direction (``m·n·r(r+1)/2`` multiply-adds a step, :data:`HEAVY`);
  where that exceeds the size's ``max_madds`` (default: Gemma r = 64) it is
  ``skipped`` with the estimate as the reason, and timed with ``--full``.
* ``peft_riemannian`` rewrites ``.grad`` in place every step (the preconditioned gradient), so
  repeated steps on fixed gradients would shrink them towards denormals; its timed function first
  restores the gradients (``torch._foreach_copy_``), and the separately timed copy is subtracted.

* **Targets** (the Targets table): each timed ratio comes from ``targets["repeats"]`` (≥ 5)
  *interleaved* repeats on the main set (:func:`interleaved_repeats`): every optimizer a target
  needs at that rank is built and warmed up on one shared :class:`ParamSet`, then repeat ``k``
  times each once — the median of the steps that fit in a short ``targets["min_run_time"]``, at
  least one — in the list's order rotated by ``k`` (each gets its own factor values and the fixed
  gradients back before its turn, untimed). A ratio is computed per repeat from the two times of
  that repeat, so a slow spell of the machine hits numerator and denominator alike; the table
  shows the median and the min–max over the repeats, the JSON every repeat's value and order, and
  met/missed follows the median. The ratios: LoRA-RITE, ScaledGD and ScaledAdam to Adam(foreach)
  at r = 16 (≤ 1.5, 1.2, 1.2), ScaledAdam and LoRA-RITE to ``peft_riemannian`` at r = 16,
  pytorch_optimizer's LoRARite to ours at every rank (≥ 8), and at r = 64 LoRA-RITE to the floor.
* **Floor** (:func:`floor_fn`, r = 64 at the default size): the work a LoRA-RITE step cannot
  avoid, timed alone in the same repeats — the Grams ``AᵀA`` and ``BᵀB`` of every pair (float32
  ``torch.bmm`` per bucket of same-shape pairs over factors stacked beforehand) and one batched
  ``torch.linalg.eigh`` of the two ``r×r`` second moments per pair (fixed SPD matrices). Target:
  the step within 1.3× of it. At r = 64 the ``r³`` eigendecompositions and the ``(m+n)r²`` Grams
  are what grows faster than Adam's ``(m+n)r``, so the step is judged against them rather than
  against Adam.

On CUDA (when available) every step is followed by ``torch.cuda.synchronize()`` and the peak memory
allocated during the timed steps is recorded.

Timings need an otherwise idle machine. With two threads on a 2-core machine, one other busy
process is enough to stall OpenMP hand-offs, slowing small steps by orders of magnitude;
``--threads 1`` gives timings that survive one competing process.
Each measurement records the share of the CPUs other processes used while it ran (``/proc/stat``
minus our own CPU time, :class:`CpuMonitor`); contended ones are marked † and the targets they
feed are reported as unreliable.

Sizes: ``quick`` a tiny set (4 layers, hidden 128, kv 32, r 8; one thread), ``default`` Gemma-2B
shapes at r ∈ {8, 16, 64} and the m sweep to 2048 (Shampoo only in the sweep, up to m = 512),
``full`` adds the 7B set at r = 16, Shampoo's 1-layer Gemma subset at every r and m = 4096, with
``min_run_time`` 1 s, and the compiled step.
The targets' interleaved repeats are 5 repeats of ``min_run_time`` 0.2 s turns at the default
size (a turn is at least one step, so a slow step at r = 64 makes its turn longer), 9 repeats of
0.5 s at ``full``. ``--compile`` (any size whose main set has
r = 16) also times ``lora_rite``, ``scaled_gd`` and ``scaled_adam`` with ``compile=True`` there.
Each result records its wall time (``run.seconds``) and, per measurement, the median, its
interquartile range and the other processes' CPU share; run-to-run spread on a shared machine
shows in the repeats of the Targets table.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, markdown_table, progress, savefig
from benchmarks.common import color as _color

SUITE = "speed"
BASELINE = "adam"
#: optimizers whose step rewrites ``.grad`` in place (gradients restored before each timed step)
MUTATES_GRAD = {"peft_riemannian"}
#: optimizers whose step work grows like ``m·n`` rather than ``(m + n)``, with their multiply-adds per
#: step on a set of ``(m, n, r)`` pairs: LoFT forms each pair's ``m×n`` direction through an ``r×r``
#: block per row (:mod:`lowrank_geom.strategies.loft`). Sets above the size's ``max_madds`` are
#: skipped, with the estimate as the reason.
HEAVY = {"loft": lambda shapes: sum(m * n * r * (r + 1) // 2 for m, n, r in shapes)}

#: the optimizers profiled per rank (``size["profile"]``): Adam and the strategies with a target there
PROFILED = {16: ["adam", "lora_rite", "scaled_gd", "scaled_adam"], 64: ["adam", "lora_rite"]}

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(
        sets={"tiny": dict(layers=4, hidden=128, kv=32, ranks=[8])},
        m_sweep=dict(ms=[32, 64], r=8, pairs=4),
        min_run_time=0.02,
        shampoo=dict(layers=None, max_dim=128),
        max_madds=float("inf"),
        threads=1,  # a smoke test of tiny sets: one thread keeps it fast on a busy CI machine
        # the targets' interleaved repeats; r = 16 exists only here (tiny: kv 32 allows it), the
        # floor is timed at the largest rank
        targets=dict(ranks=[8, 16], floor_rank=16, repeats=5, min_run_time=0.005),
        profile=dict(optimizers={8: ["adam", "lora_rite"]}, steps=1, warmup=1, top=5),
    ),
    "default": dict(
        # the 7B set only with --full: `make bench` has no time for it
        sets={"gemma-2b": dict(layers=18, hidden=2048, kv=256, ranks=[8, 16, 64])},
        m_sweep=dict(ms=[256, 512, 1024, 2048], r=16, pairs=8),
        min_run_time=0.1,
        # no Gemma-shaped Shampoo: its one-layer subset alone takes ~20 s (~10 s a step), a fifth
        # of the suite, for an extrapolated number; --full times it at every r
        shampoo=dict(layers=1, ranks=[], max_dim=512, sets=["gemma-2b"]),
        # LoFT on Gemma r ∈ {8, 16} and the m sweep; not at r = 64 (~4e11 madds a step)
        max_madds=3e10,
        # ~25 s on the idle 2-core CPU: at r = 64 LoRA-RITE and pytorch_optimizer's LoRARite take
        # ~0.9 s a step, so one step per repeat there; more steps at r = 8 and 16
        targets=dict(ranks=[8, 16, 64], floor_rank=64, repeats=5, min_run_time=0.2),
        # where the time of the missed targets goes (≈15 s): operator families of one step
        profile=dict(optimizers=PROFILED, steps=1, warmup=1, top=8),
    ),
    "full": dict(
        sets={
            "gemma-2b": dict(layers=18, hidden=2048, kv=256, ranks=[8, 16, 64]),
            "7b": dict(layers=32, hidden=4096, kv=4096, ranks=[16]),
        },
        m_sweep=dict(ms=[256, 512, 1024, 2048, 4096], r=16, pairs=8),
        min_run_time=1.0,
        shampoo=dict(layers=1, ranks=[8, 16, 64], max_dim=1024, sets=["gemma-2b"]),
        max_madds=float("inf"),
        targets=dict(ranks=[8, 16, 64], floor_rank=64, repeats=9, min_run_time=0.5),
        profile=dict(optimizers=PROFILED, steps=10, warmup=3, top=12),
        compile=True,
    ),
}

#: the time the floor function (:func:`floor_fn`) takes, as a name among the timed optimizers
FLOOR = "floor"
#: ``rank`` of a target timed at every rank of the size's ``targets["ranks"]``
EVERY_RANK = "every"
#: ... or at its ``targets["floor_rank"]``
FLOOR_RANK = "floor"

#: the project's timed targets: (label, numerator, denominator, rank, comparison, bound). Every one
#: is a ratio per interleaved repeat (:func:`interleaved_repeats`): median and min–max reported.
TARGETS = [
    ("LoRA-RITE / Adam(foreach)", "lora_rite", "adam", 16, "<=", 1.5),
    ("LoRA-RITE step / floor (Grams + r×r eigh)", "lora_rite", FLOOR, FLOOR_RANK, "<=", 1.3),
    ("pytorch_optimizer LoRARite / LoRA-RITE", "pyopt_lora_rite", "lora_rite", EVERY_RANK, ">=", 8.0),
    ("ScaledGD / Adam(foreach)", "scaled_gd", "adam", 16, "<=", 1.2),
    ("ScaledAdam / Adam(foreach)", "scaled_adam", "adam", 16, "<=", 1.2),
    ("ScaledAdam / peft_riemannian (same method)", "scaled_adam", "peft_riemannian", 16, "<=", 1.0),
    ("LoRA-RITE / peft_riemannian", "lora_rite", "peft_riemannian", 16, "<=", 1.0),
]


def _target_ranks(rank: Any, tcfg: dict[str, Any]) -> list[int]:
    if rank == EVERY_RANK:
        return list(tcfg["ranks"])
    if rank == FLOOR_RANK:
        return [tcfg["floor_rank"]]
    return [rank] if rank in tcfg["ranks"] else []


def timed_at(r: int, tcfg: dict[str, Any]) -> list[str]:
    """What the interleaved repeats time at rank ``r``: Adam and every numerator and denominator of
    a target at ``r`` (in :data:`~benchmarks.optimizers.OPTIMIZERS` order, then the floor)."""
    from benchmarks.optimizers import OPTIMIZERS

    names = {BASELINE}
    for _label, num, den, rank, _op, _bound in TARGETS:
        if r in _target_ranks(rank, tcfg):
            names |= {num, den}
    return [n for n in OPTIMIZERS if n in names] + ([FLOOR] if FLOOR in names else [])


def layer_shapes(layers: int, hidden: int, kv: int, r: int) -> list[tuple[int, int, int]]:
    """``(m, n, r)`` of q, k, v, o per layer (``m`` = out features, ``n`` = in features)."""
    one = [(hidden, hidden, r), (kv, hidden, r), (kv, hidden, r), (hidden, hidden, r)]
    return one * layers


#: a measurement during which other processes used more than the CPUs our threads leave free plus
#: this share of all CPUs is marked † (contended)
CONTENDED = 0.15


def _contended(others: float | None) -> bool:
    """Others took more than the cores we leave free plus :data:`CONTENDED` of the machine."""
    if others is None:
        return False
    cpus = os.cpu_count() or 1
    free = max(0, cpus - torch.get_num_threads()) / cpus
    return others > free + CONTENDED


class CpuMonitor:
    """Share of the machine's CPU time used by *other* processes (and hypervisor steal) between
    ``start()`` and ``share()``: busy jiffies of ``/proc/stat`` minus this process's CPU time.
    ``None`` where ``/proc/stat`` is unavailable."""

    def __init__(self) -> None:
        self._t0 = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + vals[4]  # idle + iowait
        return (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")

    def start(self) -> CpuMonitor:
        t = os.times()
        self._t0 = (self._busy_seconds(), t.user + t.system, time.perf_counter())
        return self

    def share(self) -> float | None:
        busy1 = self._busy_seconds()
        if busy1 is None or self._t0 is None or self._t0[0] is None:
            return None
        t = os.times()
        busy0, self0, wall0 = self._t0
        wall = time.perf_counter() - wall0
        others = (busy1 - busy0) - (t.user + t.system - self0)
        return max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


#: every time is the median of at least this many steps (slow steps: more than ``min_run_time``)
MIN_RUNS = 3


#: a step slower than this (its warm-up) is timed once (Shampoo on Gemma shapes: ~10 s per step)
SLOW_STEP_S = 2.0


def _timer(fn, min_run_time: float, estimate_s: float = 0.0) -> dict[str, float]:
    """``blocked_autorange(min_run_time)``, topped up with single runs to :data:`MIN_RUNS` steps;
    a step whose warm-up took more than :data:`SLOW_STEP_S` is timed once. Returns the median and
    IQR (seconds) and the number of steps timed."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if estimate_s > SLOW_STEP_S:
        return {"median": timer.timeit(1).mean, "iqr": 0.0, "runs": 1}
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    runs = len(times) * m.number_per_run
    while runs < MIN_RUNS:
        times.append(timer.timeit(1).mean)
        runs += 1
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "iqr": q[2] - q[0], "runs": runs}


class ParamSet:
    """A :class:`PairModel` with saved starting factors and fixed gradients (reset before each optimizer)."""

    def __init__(self, shapes: list[tuple[int, int, int]], seed: int, device: torch.device) -> None:
        from benchmarks.optimizers import PairModel

        self.shapes = shapes
        self.device = device
        self.model = PairModel(shapes, dtype=torch.float32, seed=seed).to(device)
        self.factors0 = [(a.detach().clone(), b.detach().clone()) for a, b in self.model.factors()]
        g = torch.Generator().manual_seed(seed + 1)
        self.grads = [
            (1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float32)).to(device)
            for p in self.model.trainable_parameters()
        ]
        self.numel = sum(p.numel() for p in self.model.trainable_parameters())

    def reset(self) -> list[torch.Tensor]:
        self.model.set_factors(self.factors0)
        params = self.model.trainable_parameters()
        for p, g in zip(params, self.grads):
            p.grad = g.clone()
        return params


def measure(name: str, ps: ParamSet, min_run_time: float, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median step time (ms) and exact state bytes of optimizer ``name`` (config kwargs replaced by
    ``overrides``) on ``ps``; the untimed warm-up step includes any compilation (``warmup_s``)."""
    from benchmarks.optimizers import make_optimizer, state_bytes

    params = ps.reset()
    opt = make_optimizer(name, ps.model, suite=SUITE, **(overrides or {}))
    device = ps.device
    restore = name in MUTATES_GRAD
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads] if restore else None

    def step() -> None:
        if restore:
            torch._foreach_copy_(grads, saved)
        opt.step()  # noqa: F821 (opt is deleted only after the last call)
        _sync(device)

    t0 = time.perf_counter()
    step()  # warm-up: creates the state
    warmup_s = time.perf_counter() - t0
    sbytes = state_bytes(opt)
    if hasattr(opt, "state_bytes"):
        own = opt.state_bytes()
        if own != sbytes:
            raise AssertionError(f"{name}: state_bytes() = {own} but Σ numel·element_size = {sbytes}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    mon = CpuMonitor().start()
    m = _timer(step, min_run_time, warmup_s)
    others = mon.share()
    out = {
        "ms": m["median"] * 1e3,
        "iqr_ms": m["iqr"] * 1e3,
        "runs": m["runs"],
        "warmup_s": warmup_s,
        "state_bytes": sbytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "pairs": len(ps.shapes),
        "others_cpu": others,
        "contended": _contended(others),
    }
    if restore:
        c = _timer(lambda: (torch._foreach_copy_(grads, saved), _sync(device)), min_run_time)
        out["grad_restore_ms"] = c["median"] * 1e3
        out["ms"] = out["ms"] - out["grad_restore_ms"]
    if device.type == "cuda":
        out["peak_step_mem_bytes"] = torch.cuda.max_memory_allocated() - base_mem
    del opt
    return out


def floor_fn(ps: ParamSet, seed: int = 0) -> Callable[[], None]:
    r"""The work every LoRA-RITE step on ``ps`` cannot avoid, as one callable (its time is the
    ``floor`` of the targets).

    * the Grams ``AᵀA`` and ``BᵀB`` of every pair, float32, one ``torch.bmm(X.mT, X, out=…)`` per
      factor side and bucket of same-shape pairs, over factors stacked once beforehand (the
      stacking copy is not part of the floor: factors kept in stacked storage would not need it);
    * the eigendecompositions of the two ``r×r`` second moments per pair (whose inverse square
      roots precondition the step): one ``torch.linalg.eigh(…, out=…)`` of all ``2P`` of them per
      rank, on fixed well-conditioned SPD matrices (``XᵀX/(4r)``, ``X`` a ``4r×r`` Gaussian).

    Nothing else: no update GEMM, no transport, no elementwise pass, no Python of a driver."""
    device = ps.device
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for i, shape in enumerate(ps.shapes):
        buckets.setdefault(shape, []).append(i)
    factors = ps.model.factors()
    grams: list[tuple[torch.Tensor, torch.Tensor]] = []
    pairs_per_rank: dict[int, int] = {}
    with torch.no_grad():
        for (_m, _n, r), idx in buckets.items():
            pairs_per_rank[r] = pairs_per_rank.get(r, 0) + len(idx)
            for side in (0, 1):
                x = torch.stack([factors[i][side].detach().to(torch.float32) for i in idx]).contiguous()
                grams.append((x, torch.empty(len(idx), r, r, dtype=torch.float32, device=device)))
        g = torch.Generator().manual_seed(seed)
        eighs = []
        for r, pairs in pairs_per_rank.items():
            x = torch.randn(2 * pairs, 4 * r, r, generator=g, dtype=torch.float32)
            v = (x.mT @ x / (4 * r)).to(device)
            eighs.append(
                (
                    v,
                    torch.empty(2 * pairs, r, dtype=torch.float32, device=device),
                    torch.empty(2 * pairs, r, r, dtype=torch.float32, device=device),
                )
            )

    def floor() -> None:
        for x, out in grams:
            torch.bmm(x.mT, x, out=out)
        for v, lam, q in eighs:
            torch.linalg.eigh(v, out=(lam, q))
        _sync(device)

    return floor


def _sample(fn: Callable[[], Any], min_run_time: float) -> list[float]:
    """Seconds of each call of ``fn``, called until ``min_run_time`` has passed (at least once;
    garbage collection off, as in ``timeit``)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if t1 - start >= min_run_time:
                return times
    finally:
        if enabled:
            gc.enable()


class _Turn:
    """One optimizer of the interleaved repeats on a :class:`ParamSet` shared with the others: before
    its turn its own factor values are copied into the model and the fixed gradients restored, after
    it its factors are saved, so each optimizer follows its own trajectory as if it had the model to
    itself (the copies are not timed). The floor (:func:`floor_fn`) is a turn with no optimizer."""

    def __init__(self, name: str, ps: ParamSet) -> None:
        self.name, self.ps = name, ps
        self.restore = name in MUTATES_GRAD
        self.params = ps.model.trainable_parameters()
        if name == FLOOR:
            self.opt, self.own, self.fn = None, None, floor_fn(ps)
        else:
            from benchmarks.optimizers import make_optimizer

            with torch.no_grad():
                ps.model.set_factors(ps.factors0)
            self._restore_grads()
            self.opt = make_optimizer(name, ps.model, suite=SUITE)
            self.fn = self._step
        t0 = time.perf_counter()
        self.fn()  # warm-up: creates the state
        self.warmup_s = time.perf_counter() - t0
        self.own = None if self.opt is None else [p.detach().clone() for p in self.params]

    def _restore_grads(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.ps.grads)

    def _step(self) -> None:
        if self.restore:
            self._restore_grads()
        self.opt.step()
        _sync(self.ps.device)

    def restore_only(self) -> None:
        self._restore_grads()
        _sync(self.ps.device)

    def enter(self) -> None:
        if self.opt is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.own)
            self._restore_grads()

    def leave(self) -> None:
        if self.opt is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.own, self.params)


def interleaved_repeats(ps: ParamSet, names: list[str], repeats: int, min_run_time: float) -> dict[str, Any]:
    """Time ``names`` (optimizers, or :data:`FLOOR`) on ``ps`` in ``repeats`` interleaved repeats:
    repeat ``k`` gives every one a turn, in the order of ``names`` rotated by ``k``; a turn is the
    median of the steps run in ``min_run_time`` (at least one). All are built and warmed up first.

    Returns per-repeat lists: ``ms[name][k]`` (``peft_riemannian``: less the gradient copy timed
    in the same turn, ``grad_restore_ms``), ``steps``, ``order[k]`` (names in timed order),
    ``others_cpu``/``contended`` per repeat (:class:`CpuMonitor`)."""
    t_start = time.perf_counter()
    ps.reset()
    turns = [_Turn(name, ps) for name in names]
    rec: dict[str, Any] = {
        "names": list(names),
        "repeats": repeats,
        "min_run_time": min_run_time,
        "order": [],
        "ms": {n: [] for n in names},
        "steps": {n: [] for n in names},
        "grad_restore_ms": {t.name: [] for t in turns if t.restore},
        "warmup_s": {t.name: t.warmup_s for t in turns},
        "others_cpu": [],
        "contended": [],
    }
    for k in range(repeats):
        rot = k % len(turns)
        mon = CpuMonitor().start()
        for turn in turns[rot:] + turns[:rot]:
            turn.enter()
            times = _sample(turn.fn, min_run_time)
            ms = statistics.median(times) * 1e3
            if turn.restore:
                copy_ms = statistics.median(_sample(turn.restore_only, min_run_time / 4)) * 1e3
                rec["grad_restore_ms"][turn.name].append(copy_ms)
                ms -= copy_ms
            turn.leave()
            rec["ms"][turn.name].append(ms)
            rec["steps"][turn.name].append(len(times))
        others = mon.share()
        rec["order"].append([t.name for t in turns[rot:] + turns[:rot]])
        rec["others_cpu"].append(others)
        rec["contended"].append(_contended(others))
    del turns
    rec["seconds"] = time.perf_counter() - t_start
    return rec


def _shampoo_plan(size: dict[str, Any], set_name: str, spec: dict[str, Any], r: int) -> tuple[str, Any]:
    """("full", None) | ("subset", layers) | ("skipped", reason) for Shampoo on this set."""
    sh = size["shampoo"]
    max_dim = max(spec["hidden"], spec["kv"])
    if max_dim <= sh["max_dim"]:
        return "full", None
    if sh.get("layers") and r in sh.get("ranks", []) and set_name in sh.get("sets", [set_name]):
        return "subset", sh["layers"]
    where = f"at r ∈ {sh['ranks']}" if sh.get("ranks") else "with --full"
    return "skipped", (
        f"m×m preconditioners with m = {max_dim} and an SVD of each every step "
        f"(≈1.6 s per 2048² SVD on this CPU); timed on a 1-layer subset only "
        f"{where}"
    )


#: strategies timed again with ``compile=True`` (``--compile``; always at size ``full``), on the
#: main set at :data:`COMPILE_RANK` only: each new shape costs a compilation of 10–30 s here
COMPILED = ["lora_rite", "scaled_gd", "scaled_adam"]
COMPILE_RANK = 16


def _compile_option(ctx: RunContext, size: dict[str, Any]) -> bool:
    return "--compile" in (ctx.options.get("extra") or []) or bool(size.get("compile"))


def _threads_option(ctx: RunContext) -> int | None:
    """``--threads N`` (or ``--threads=N``) among the CLI's extra arguments."""
    extra = list(ctx.options.get("extra") or [])
    for i, a in enumerate(extra):
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
        if a == "--threads" and i + 1 < len(extra):
            return int(extra[i + 1])
    return ctx.options.get("threads")


def run(ctx: RunContext) -> SuiteResult:
    """Run the suite; ``python -m benchmarks speed --threads N`` times with ``N`` torch threads
    (default: all, except ``quick`` which uses 1)."""
    from benchmarks.common import torch_threads

    with torch_threads(_threads_option(ctx) or SIZES[ctx.size].get("threads") or None):
        return _run(ctx)


def _jobs(size: dict[str, Any], names: list[str]) -> list[tuple[str, Any, int, str | None]]:
    """(kind, set name or m, r, optimizer) in timing order: each (set, r) × optimizer, on the main
    set followed by that rank's interleaved target repeats (sharing its ParamSet), then the m sweep."""
    main_set = next(iter(size["sets"]))
    tcfg = size["targets"]
    jobs: list[tuple[str, Any, int, str | None]] = []
    for set_name, spec in size["sets"].items():
        for r in spec["ranks"]:
            jobs += [("set", set_name, r, name) for name in names]
            if set_name == main_set and r in tcfg["ranks"]:
                jobs.append(("targets", set_name, r, None))
        if set_name == main_set:
            jobs += [("targets", set_name, r, None) for r in tcfg["ranks"] if r not in spec["ranks"]]
    sweep = size["m_sweep"]
    jobs += [("m", m, sweep["r"], name) for m in sweep["ms"] for name in names]
    return jobs


class _Sets:
    """The :class:`ParamSet` of the job at hand, rebuilt only when the job's (kind, set, r) changes."""

    def __init__(self, size: dict[str, Any], seed: int, device: torch.device) -> None:
        self.size, self.seed, self.device = size, seed, device
        self.key: tuple | None = None
        self.ps: ParamSet | None = None

    def get(self, kind: str, key: Any, r: int) -> ParamSet:
        if self.key != (kind, key, r):
            self.ps = None  # free the previous set first
            if kind == "m":
                shapes = [(key, key, r)] * self.size["m_sweep"]["pairs"]
            else:
                spec = self.size["sets"][key]
                shapes = layer_shapes(spec["layers"], spec["hidden"], spec["kv"], r)
            self.ps, self.key = ParamSet(shapes, self.seed, self.device), (kind, key, r)
        return self.ps


def _shampoo_subset(size: dict[str, Any], ps: ParamSet, spec: dict[str, Any], layers: int, r: int, seed: int):
    """Shampoo timed on the first ``layers`` layers of ``ps``'s set, extrapolated to the whole set."""
    mrt = size["min_run_time"]
    sub = ParamSet(layer_shapes(layers, spec["hidden"], spec["kv"], r), seed, ps.device)
    res = measure("shampoo", sub, mrt)
    base = measure(BASELINE, sub, mrt)
    factor = len(ps.shapes) / len(sub.shapes)
    return dict(
        res,
        subset_pairs=len(sub.shapes),
        subset_ms=res["ms"],
        subset_state_bytes=res["state_bytes"],
        subset_adam_ms=base["ms"],
        ms=res["ms"] * factor,
        state_bytes=int(res["state_bytes"] * factor),
        param_bytes=ps.numel * 4,
        pairs=len(ps.shapes),
        extrapolated=factor,
        ratio_to_adam_subset=res["ms"] / base["ms"],
        contended=res["contended"] or base["contended"],
    )


def _heavy_skip(size: dict[str, Any], name: str, shapes: list[tuple[int, int, int]]) -> dict[str, Any] | None:
    """``{"skipped": reason}`` for a :data:`HEAVY` optimizer whose step on ``shapes`` exceeds ``max_madds``."""
    if name not in HEAVY:
        return None
    madds = HEAVY[name](shapes)
    if madds <= size["max_madds"]:
        return None
    return {"skipped": f"≈{madds:.1e} multiply-adds a step (m·n·r(r+1)/2 per pair) > {size['max_madds']:.0e}; --full"}


def _set_entry(size: dict[str, Any], sets: _Sets, set_name: str, r: int, name: str) -> dict[str, Any]:
    """One optimizer's row on a parameter set (Shampoo: measured, on a subset, or skipped)."""
    spec = size["sets"][set_name]
    ps = sets.get("set", set_name, r)
    skip = _heavy_skip(size, name, ps.shapes)
    if skip:
        return skip
    if name == "shampoo":
        plan, arg = _shampoo_plan(size, set_name, spec, r)
        if plan == "skipped":
            return {"skipped": arg}
        if plan == "subset":
            return _shampoo_subset(size, ps, spec, arg, r, sets.seed)
    return measure(name, ps, size["min_run_time"])


def _time_jobs(ctx: RunContext, size: dict[str, Any], device: torch.device):
    """Run :func:`_jobs`: (set tables, m sweep, interleaved target repeats by rank)."""
    from benchmarks.optimizers import OPTIMIZERS

    names, tcfg, max_dim = list(OPTIMIZERS), size["targets"], size["shampoo"]["max_dim"]
    sets, jobs = _Sets(size, ctx.seed, device), _jobs(size, names)
    by_set: dict[str, dict[str, dict[str, Any]]] = {}
    msweep: dict[str, dict[str, Any]] = {name: {} for name in names}
    interleaved: dict[str, dict[str, Any]] = {}
    for kind, key, r, name in progress(jobs, ctx, "speed", total=len(jobs)):
        if kind == "targets":
            ps = sets.get("set", key, r)
            interleaved[str(r)] = interleaved_repeats(ps, timed_at(r, tcfg), tcfg["repeats"], tcfg["min_run_time"])
        elif kind == "set":
            by_set.setdefault(key, {}).setdefault(str(r), {})[name] = _set_entry(size, sets, key, r, name)
        elif name == "shampoo" and key > max_dim:
            msweep[name][str(key)] = {"skipped": f"m = {key} > shampoo max_dim {max_dim}"}
        else:
            ps = sets.get("m", key, r)
            msweep[name][str(key)] = _heavy_skip(size, name, ps.shapes) or measure(name, ps, size["min_run_time"])
    return by_set, msweep, interleaved


def _time_compiled(ctx: RunContext, size: dict[str, Any], sets: dict[str, Any], device: torch.device):
    """:data:`COMPILED` with ``compile=True`` on the main set at :data:`COMPILE_RANK`, against the eager rows."""
    main_set = next(iter(size["sets"]))
    if not (_compile_option(ctx, size) and COMPILE_RANK in size["sets"][main_set]["ranks"]):
        return {}
    spec = size["sets"][main_set]
    ps = ParamSet(layer_shapes(spec["layers"], spec["hidden"], spec["kv"], COMPILE_RANK), ctx.seed, device)
    eager = sets[main_set][str(COMPILE_RANK)]
    compiled = {}
    for name in progress(COMPILED, ctx, "speed (compile=True)", total=len(COMPILED)):
        res = measure(name, ps, size["min_run_time"], {"compile": True})
        res["ratio_to_eager"] = res["ms"] / eager[name]["ms"]
        res["ratio_to_adam"] = res["ms"] / eager[BASELINE]["ms"]
        res["contended"] = res["contended"] or eager[name].get("contended") or eager[BASELINE].get("contended")
        compiled[name] = res
    return compiled


def _add_ratios(sets: dict[str, dict[str, dict[str, Any]]]) -> None:
    """``ratio_to_adam`` and ``state_ratio_to_adamw`` on every measured row, in place."""
    for by_r in sets.values():
        for by_name in by_r.values():
            adam = by_name[BASELINE]["ms"]
            adamw = by_name["adamw"]["state_bytes"]
            for res in by_name.values():
                if "ms" in res:
                    res["ratio_to_adam"] = res.get("ratio_to_adam_subset", res["ms"] / adam)
                    res["state_ratio_to_adamw"] = res["state_bytes"] / adamw


def _profiles(ctx: RunContext, size: dict[str, Any]) -> dict[str, Any]:
    """``torch.profiler`` self time per operator family of one step (:mod:`benchmarks.profile_step`)
    for each (rank, optimizer) of ``size["profile"]``, on the main set's shapes: where a missed
    target's time goes."""
    from benchmarks.profile_step import profile

    cfg = size["profile"]
    spec = next(iter(size["sets"].values()))
    jobs = [(r, name) for r, names in cfg["optimizers"].items() for name in names]
    out: dict[str, Any] = {"steps": cfg["steps"], "warmup": cfg["warmup"], "by_rank": {}}
    for r, name in progress(jobs, ctx, "speed (profile)", total=len(jobs)):
        total, top, families = profile(
            name, r, cfg["steps"], cfg["warmup"], spec["layers"], cfg["top"],
            hidden=spec["hidden"], kv=spec["kv"], categories=True,
        )  # fmt: skip
        out["by_rank"].setdefault(str(r), {})[name] = {
            "profiled_ms": total,
            "families_ms": families,
            "top_ops": [{"op": k, "calls": c, "ms": ms} for k, c, ms in top],
        }
    return out


def _run(ctx: RunContext) -> SuiteResult:
    torch.manual_seed(ctx.seed)
    size = SIZES[ctx.size]
    device = _device()
    load_before = os.getloadavg()
    whole = CpuMonitor().start()
    tcfg = size["targets"]
    main_set = next(iter(size["sets"]))
    sets, msweep, interleaved = _time_jobs(ctx, size, device)
    compiled = _time_compiled(ctx, size, sets, device)
    load = {
        "before": list(load_before),
        "after": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "others_cpu_share": whole.share(),
    }
    profiles = _profiles(ctx, size)  # after the load record: the profiler's overhead is not a timing
    _add_ratios(sets)
    targets = _targets(sets[main_set], interleaved, tcfg)
    sweep = size["m_sweep"]
    metrics = {
        "sets": sets,
        "m_sweep": {"r": sweep["r"], "pairs": sweep["pairs"], "results": msweep},
        "targets": targets,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "interleaved": {
            "set": main_set,
            "repeats": tcfg["repeats"],
            "min_run_time": tcfg["min_run_time"],
            "floor_rank": tcfg["floor_rank"],
            "spread": "min–max",
            "by_rank": interleaved,
        },
        "compiled": {"set": main_set, "r": COMPILE_RANK, "results": compiled} if compiled else None,
        "profile": profiles,
        "baseline": "torch.optim.Adam(foreach=True) (config 'adam')",
        "load_average": load,
    }
    config = {
        "size": ctx.size,
        **size,
        "device": str(device),
        "dtype": "float32",
        "timer": f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={size['min_run_time']}), median, "
        f"{torch.get_num_threads()} threads",
    }
    table = _table(sets, msweep, sweep, targets, tcfg, load) + "\n\n" + _profile_table(profiles, main_set)
    if compiled:
        table = _compiled_table(compiled, main_set) + "\n\n" + table
    figures = _plots(sets, msweep, sweep, ctx)
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table, figures=figures)


def _ratio_target(label: str, num: str, den: str, r: int, op: str, bound: float, rec: dict[str, Any]) -> dict[str, Any]:
    """A target row from the interleaved repeats at rank ``r``: the ratio per repeat (both times
    from the same repeat), its median (``value``, what the status follows) and min–max."""
    per = [a / b for a, b in zip(rec["ms"][num], rec["ms"][den])]
    med = statistics.median(per)
    ok = med <= bound if op == "<=" else med >= bound
    n_cont = sum(rec["contended"])
    status = "met" if ok else "missed"
    if 2 * n_cont >= len(per):
        status += f" (unreliable: {n_cont}/{len(per)} repeats contended †)"
    row = {
        "target": f"{label}, r={r}",
        "bound": f"{op} {bound}",
        "value": med,
        "median": med,
        "min": min(per),
        "max": max(per),
        "spread": "min–max",
        "per_repeat": per,
        "repeats": len(per),
        "numerator": num,
        "denominator": den,
        "r": r,
        "numerator_ms": list(rec["ms"][num]),
        "denominator_ms": list(rec["ms"][den]),
        "order": rec["order"],
        "contended_repeats": n_cont,
        "status": status,
    }
    if den == FLOOR:
        row.update(floor_ms=statistics.median(rec["ms"][FLOOR]), step_ms=statistics.median(rec["ms"][num]))
    return row


def _targets(
    by_r: dict[str, dict[str, Any]], interleaved: dict[str, dict[str, Any]], tcfg: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for label, num, den, rank, op, bound in TARGETS:
        ranks = _target_ranks(rank, tcfg)
        if not ranks:
            out.append(
                {"target": f"{label}, r={rank}", "bound": f"{op} {bound}", "value": None, "status": "not measured"}
            )
        for r in ranks:
            out.append(_ratio_target(label, num, den, r, op, bound, interleaved[str(r)]))
    # state: LoRA-RITE <= AdamW + 2 r² + 1 float32 per pair. AdamW's two step scalars per pair
    # (one per tensor) offset two of the driver's three (step, nonfinite_skips, update_skips);
    # the third, update_skips, is the + 1.
    for r, res in by_r.items():
        if "lora_rite" in res and "adamw" in res:
            pairs = res["lora_rite"]["pairs"]
            bound = res["adamw"]["state_bytes"] + pairs * (2 * int(r) ** 2 + 1) * 4
            v = res["lora_rite"]["state_bytes"]
            target = f"LoRA-RITE state bytes <= AdamW + 2r² + 1 floats per pair, r={r}"
            out.append(
                {
                    "target": target,
                    "bound": f"<= {bound}",
                    "value": v,
                    "status": "met" if v <= bound else "missed",
                    "excess_bytes": v - bound,
                }
            )
    return out


def _compiled_table(compiled: dict[str, Any], set_name: str) -> str:
    rows = [
        [
            name,
            _fmt_ms(res),
            f"{res['ratio_to_eager']:.3g}" + ("†" if res["contended"] else ""),
            f"{res['ratio_to_adam']:.3g}",
            f"{res['warmup_s']:.1f}",
        ]
        for name, res in compiled.items()
    ]
    return (
        f"### compile=True: {set_name}, r={COMPILE_RANK}\n\n"
        + markdown_table(["optimizer", "ms", "×eager", "×Adam", "first step s (compiles)"], rows)
        + "\n\nThe same strategy with `LowRankOptimizer(compile=True)` (its update through `torch.compile`), "
        "timed after the eager rows of the same run; ×eager and ×Adam divide by those rows' medians."
    )


def _fmt_ms(res: dict[str, Any]) -> Any:
    if "skipped" in res:
        return "skipped"
    s = f"{res['ms']:.3g}"
    s = s + "*" if res.get("extrapolated") else s
    return s + "†" if res.get("contended") else s


def _set_rows(set_name: str, by_r: dict[str, Any], notes: list[str]) -> list[list[Any]]:
    """Rows of one parameter set's table: per optimizer, ms and ×Adam then state MB and ×AdamW per rank."""
    from benchmarks.optimizers import OPTIMIZERS

    rows = []
    for name in OPTIMIZERS:
        row, state = [name], []
        for r, by_name in by_r.items():
            res = by_name.get(name, {"skipped": "not run"})
            if "skipped" in res:
                row += [_fmt_ms(res), "—"]
                state += ["—", "—"]
                continue
            flag = res.get("contended") or by_name[BASELINE].get("contended")
            row += [_fmt_ms(res), f"{res['ratio_to_adam']:.4g}" + ("†" if flag else "")]
            state += [
                f"{res['state_bytes'] / 2**20:.2f}" + ("*" if res.get("extrapolated") else ""),
                res["state_ratio_to_adamw"],
            ]
            if res.get("extrapolated"):
                notes.append(
                    f"`{name}` on {set_name} r={r}: timed on the first {res['subset_pairs']} pairs "
                    f"({res['subset_ms']:.0f} ms per step; Adam on the same subset "
                    f"{res['subset_adam_ms']:.2f} ms, ×Adam = {res['ratio_to_adam_subset']:.0f}); ms and state "
                    f"MB marked * are ×{res['extrapolated']:.0f} extrapolations (identical layers: the state "
                    "scales exactly, the time per pair is assumed constant)."
                )
        rows.append(row + state)
    return rows


def _set_tables(sets: dict[str, Any], notes: list[str]) -> list[str]:
    parts = []
    for set_name, by_r in sets.items():
        ranks = list(by_r)
        head = (
            ["optimizer"]
            + [h for r in ranks for h in (f"ms r={r}", f"×Adam r={r}")]
            + [h for r in ranks for h in (f"state MB r={r}", f"×AdamW r={r}")]
        )
        rows = _set_rows(set_name, by_r, notes)
        pairs = next(iter(by_r.values()))[BASELINE]["pairs"]
        parts.append(f"### {set_name} ({pairs} pairs), step time and optimizer state\n\n" + markdown_table(head, rows))
        notes += [
            f"`{name}` on {set_name} r={r}: skipped ({x['skipped']})."
            for r, res in by_r.items()
            for name, x in res.items()
            if "skipped" in x
        ]
    return parts


def _sweep_table(msweep: dict[str, Any], sweep: dict[str, Any], notes: list[str]) -> str:
    from benchmarks.optimizers import OPTIMIZERS

    ms = [str(m) for m in sweep["ms"]]
    rows = [[name] + [_fmt_ms(msweep[name][m]) for m in ms] for name in OPTIMIZERS]
    notes += [
        f"`{name}` m={m}: skipped ({by_m[m]['skipped']})."
        for name, by_m in msweep.items()
        for m in ms
        if "skipped" in by_m.get(m, {})
    ]
    head = ["optimizer"] + [f"ms m={m}" for m in ms]
    return f"### m sweep: {sweep['pairs']} pairs m×m, r={sweep['r']}\n\n" + markdown_table(head, rows)


def _method_notes(targets: list[dict[str, Any]], tcfg: dict[str, Any], n_cont: int) -> list[str]:
    contended = {t["r"]: t["contended_repeats"] for t in targets if "per_repeat" in t}
    return [
        f"† = other processes used more than the cores left free by our {torch.get_num_threads()} thread(s) "
        f"plus {CONTENDED:.0%} of the machine while this was timed "
        f"({n_cont} measurement(s)); such numbers are not reliable.",
        "Step time (set and sweep tables): median of `blocked_autorange`, fixed gradients, float32; ×Adam = ratio to "
        "`torch.optim.Adam(foreach=True)` timed in the same run on the same set. State: exact Σ numel·element_size "
        "over `optimizer.state`. `peft_riemannian` restores its (in-place preconditioned) gradients before every "
        "step; the separately timed copy is subtracted.",
        f"Targets: every timed ratio is taken per repeat, both times from the same repeat, over {tcfg['repeats']} "
        f"interleaved repeats (repeat k times each optimizer once, for ≥ {tcfg['min_run_time']:g} s and at least one "
        "step, in an order rotated by k); the table shows the median and the min–max of the per-repeat ratios "
        "(each repeat's values in the JSON, `targets[i].per_repeat`), and the status follows the median. These "
        "medians come from their own steps, not from the set tables above. A status is marked unreliable when at "
        "least half of its repeats were contended (†); contended repeats here: "
        + ", ".join(f"r={r} {c}/{tcfg['repeats']}" for r, c in sorted(contended.items()))
        + ".",
        f"Floor at r={tcfg['floor_rank']}: the work LoRA-RITE cannot avoid — the Grams AᵀA and BᵀB of every pair "
        "(float32 `torch.bmm` over each bucket of same-shape pairs, stacked once, untimed) and one batched "
        "`torch.linalg.eigh` of the 2 r×r second moments per pair; no update GEMM, transport, elementwise pass "
        "or driver Python.",
    ]


def _table(sets, msweep, sweep, targets, tcfg, load) -> str:
    notes: list[str] = []
    parts = _set_tables(sets, notes)
    parts.append(_sweep_table(msweep, sweep, notes))
    parts.append(_targets_table(targets, tcfg, next(iter(sets))))
    measured = [x for by_r in sets.values() for res_r in by_r.values() for x in res_r.values()]
    measured += [x for by_m in msweep.values() for x in by_m.values()]
    n_cont = sum(1 for x in measured if x.get("contended"))
    notes += _method_notes(targets, tcfg, n_cont)
    share = load["others_cpu_share"]
    notes.append(
        f"{torch.get_num_threads()} torch thread(s) on {load['cpus']} CPUs; other processes used "
        + ("an unknown share" if share is None else f"{share:.0%}")
        + f" of the machine during the run (1-min load average {load['before'][0]:.2f} before, "
        f"{load['after'][0]:.2f} after)"
        + (f"; **{n_cont} measurement(s) contended (†)**." if n_cont else "; no measurement contended.")
    )
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes))


def _profile_table(profiles: dict[str, Any], set_name: str) -> str:
    """Per rank: self ms per step of each operator family, per profiled optimizer (share of its total)."""
    parts = []
    for r, by_name in profiles["by_rank"].items():
        names = list(by_name)
        families = list(dict.fromkeys(f for res in by_name.values() for f in res["families_ms"]))
        rows = [
            [fam]
            + [
                f"{res['families_ms'].get(fam, 0.0):.3g} ({res['families_ms'].get(fam, 0.0) / res['profiled_ms']:.0%})"
                for res in by_name.values()
            ]
            for fam in families
        ]
        rows.append(["**total (profiled)**"] + [f"{res['profiled_ms']:.3g}" for res in by_name.values()])
        top = "; ".join(
            f"`{n}`: " + ", ".join(f"{t['op'].removeprefix('aten::')} {t['ms']:.3g}" for t in res["top_ops"][:4])
            for n, res in by_name.items()
        )
        parts.append(
            f"### Profile: {set_name}, r={r}, self ms per step by operator family\n\n"
            + markdown_table(["operator family"] + [f"{n} ms (share)" for n in names], rows)
            + f"\n\nTop operators (self ms per step): {top}."
        )
    return (
        "\n\n".join(parts) + f"\n\n- `torch.profiler` self CPU time per step ({profiles['steps']} profiled steps after "
        f"{profiles['warmup']} warm-up step(s); `python -m benchmarks.profile_step` prints the full list). "
        "The profiler's own overhead inflates small calls, so read the shares, not the absolute times; "
        "the step times are the tables above."
    )


def _spread(t: dict[str, Any], key_min: str = "min", key_max: str = "max") -> str:
    return f"{t[key_min]:.3g}–{t[key_max]:.3g}"


def _targets_table(targets: list[dict[str, Any]], tcfg: dict[str, Any], set_name: str) -> str:
    """The Targets table (median and min–max of the interleaved repeats) and the floor table."""
    n = tcfg["repeats"]
    rows = []
    for t in targets:
        if "per_repeat" in t:
            rows.append([t["target"], t["bound"], t["median"], _spread(t), t["status"]])
        else:  # state bytes (exact) or not measured
            rows.append([t["target"], t["bound"], "—" if t["value"] is None else t["value"], "—", t["status"]])
    out = "### Targets\n\n" + markdown_table(
        ["ratio", "target", f"median of {n} interleaved repeats", "min–max", "status"], rows
    )
    floors = [t for t in targets if t.get("denominator") == FLOOR]
    if floors:
        frows = []
        for t in floors:
            f_ms, s_ms = t["denominator_ms"], t["numerator_ms"]
            frows.append(
                [
                    f"r={t['r']}",
                    f"{t['floor_ms']:.3g}",
                    f"{min(f_ms):.3g}–{max(f_ms):.3g}",
                    f"{t['step_ms']:.3g}",
                    f"{min(s_ms):.3g}–{max(s_ms):.3g}",
                    t["median"],
                    _spread(t),
                ]
            )
        out += f"\n\n### Floor: {set_name}, Grams + r×r eigendecompositions\n\n" + markdown_table(
            ["rank", "floor ms", "min–max", "LoRA-RITE step ms", "min–max", "step / floor", "min–max"], frows
        )
    return out


MARKERS = "os^vD<>pPX*hd"


def _time_vs_r(ax, by_r: dict[str, Any], set_name: str) -> None:
    from matplotlib.ticker import NullFormatter

    from benchmarks.optimizers import OPTIMIZERS

    ranks = sorted(int(r) for r in by_r)
    for i, name in enumerate(OPTIMIZERS):
        xs = [r for r in ranks if "ms" in by_r[str(r)].get(name, {})]
        if not xs:
            continue
        extrap = any(by_r[str(r)][name].get("extrapolated") for r in xs)
        ax.loglog(
            xs,
            [by_r[str(r)][name]["ms"] for r in xs],
            marker=MARKERS[i % len(MARKERS)],
            color=_color(i),
            linestyle=":" if extrap else ("-" if i < 4 else "--"),
            label=name + (" (extrapolated)" if extrap else ""),
            markerfacecolor="none" if extrap else None,
        )
    ax.set_xlabel("rank r")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"{set_name}: step time vs r")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    for r in ranks:
        res = by_r[str(r)].get("shampoo", {})
        if res.get("extrapolated"):
            label = f"shampoo ×{res['extrapolated']:.0f} from {res['subset_pairs']} pairs"
            ax.annotate(label, (r, res["ms"]), textcoords="offset points", xytext=(6, -4), fontsize=7)


def _time_vs_m(ax, msweep: dict[str, Any], sweep: dict[str, Any]) -> None:
    from matplotlib.ticker import NullFormatter

    from benchmarks.optimizers import OPTIMIZERS

    for i, name in enumerate(OPTIMIZERS):
        xs = [int(m) for m, res in msweep[name].items() if "ms" in res]
        ys = [msweep[name][str(m)]["ms"] for m in xs]
        if xs:
            style = "-" if i < 4 else "--"
            ax.loglog(xs, ys, marker=MARKERS[i % len(MARKERS)], color=_color(i), linestyle=style, label=name)
    ax.set_xticks(sweep["ms"], [str(m) for m in sweep["ms"]])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("m (pairs m×m)")
    ax.set_title(f"{sweep['pairs']} pairs m×m, r={sweep['r']}: step time vs m")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _ratio_bars(axes, by_r: dict[str, Any], set_name: str) -> None:
    from benchmarks.optimizers import OPTIMIZERS

    r = "16" if "16" in by_r else str(max(int(k) for k in by_r))
    names = [n for n in OPTIMIZERS if "ms" in by_r[r].get(n, {})]
    bars = [("ratio_to_adam", "step time / Adam(foreach)", "tab:blue", "step time")]
    bars.append(("state_ratio_to_adamw", "state bytes / AdamW", "tab:orange", "optimizer state"))
    for ax, (key, ylabel, color, title) in zip(axes, bars):
        ax.bar(names, [by_r[r][n][key] for n in names], color=color)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{set_name} r={r}: {title}")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)


def _plots(sets, msweep, sweep, ctx: RunContext) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_name = next(iter(sets))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    _time_vs_r(axes[0], sets[set_name], set_name)
    _time_vs_m(axes[1], msweep, sweep)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    figs = [savefig(fig, ctx, "speed_time_vs_r_and_m")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    _ratio_bars(axes, sets[set_name], set_name)
    figs.append(savefig(fig, ctx, "speed_ratios"))
    return figs
