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
  (default and full sizes) a 7B-shaped set at ``r = 16`` (32 layers × q, k, v, o, all
  ``4096×4096``; Shampoo skipped there).
* **m sweep**: ``P`` square pairs ``m×m`` at fixed ``r``, ``m`` doubling — how time grows with m.
* **State bytes**: exact ``Σ numel · element_size`` over every tensor in ``optimizer.state``
  (:func:`benchmarks.optimizers.state_bytes`; checked against ``LowRankOptimizer.state_bytes()``).
* **Shampoo** (``pytorch_optimizer.Shampoo``, library default ``preconditioning_compute_steps=1``)
  keeps an ``m×m`` preconditioner per factor side and takes an SVD of each every step (≈1.6 s for
  one 2048×2048 SVD here): on Gemma shapes (``--full``; ``skipped`` at the default size) it is
  timed on the first layer only (4 pairs, Adam re-timed on the same subset for its ratio) and its
  full-set time and state are **extrapolated ×18** (layers are identical, so the state bytes
  scale exactly), marked ``*`` in the table; sets with a larger factor dimension than
  ``shampoo_max_dim`` are ``skipped``.
* ``peft_riemannian`` rewrites ``.grad`` in place every step (the preconditioned gradient), so
  repeated steps on fixed gradients would shrink them towards denormals; its timed function first
  restores the gradients (``torch._foreach_copy_``), and the separately timed copy is subtracted.

On CUDA (when available) every step is followed by ``torch.cuda.synchronize()`` and the peak memory
allocated during the timed steps is recorded.

Timings need an otherwise idle machine. With two threads on a 2-core machine, one other busy
process is enough to stall OpenMP hand-offs (measured here: an Adam step of 0.6 ms took 120 ms,
a 12×3 QR 8 ms instead of 7 µs); ``--threads 1`` gives timings that survive one competing process.
Each measurement records the share of the CPUs other processes used while it ran (``/proc/stat``
minus our own CPU time, :class:`CpuMonitor`); contended ones are marked † and the targets they
feed are reported as unreliable.

Sizes (wall time on this idle 2-core CPU): ``quick`` a tiny set (4 layers, hidden 128, kv 32, r 8;
one thread; ≈3 s plus imports), ``default`` Gemma-2B shapes at r ∈ {8, 16, 64}, the 7B set at
r = 16 and the m sweep to 2048 (Shampoo only in the sweep, up to m = 512), ``full`` adds
Shampoo's 1-layer Gemma subset at every r and m = 4096, with ``min_run_time`` 1 s, and the
compiled step. ``--compile`` (any size whose main set has
r = 16) also times ``lora_rite``, ``scaled_gd`` and ``scaled_adam`` with ``compile=True`` there. Run-to-run spread of the
medians on this shared VM is up to ±30 % (Adam(foreach) on Gemma r=16 measured 8.5–14 ms).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from benchmarks.common import RunContext, SuiteResult, markdown_table, progress, savefig

SUITE = "speed"
BASELINE = "adam"
#: optimizers whose step rewrites ``.grad`` in place (gradients restored before each timed step)
MUTATES_GRAD = {"peft_riemannian"}

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(
        sets={"tiny": dict(layers=4, hidden=128, kv=32, ranks=[8])},
        m_sweep=dict(ms=[32, 64], r=8, pairs=4),
        min_run_time=0.02,
        shampoo=dict(layers=None, max_dim=128),
        threads=1,  # a smoke test of tiny sets: one thread keeps it fast on a busy CI machine
    ),
    "default": dict(
        sets={
            "gemma-2b": dict(layers=18, hidden=2048, kv=256, ranks=[8, 16, 64]),
            "7b": dict(layers=32, hidden=4096, kv=4096, ranks=[16]),
        },
        m_sweep=dict(ms=[256, 512, 1024, 2048], r=16, pairs=8),
        min_run_time=0.25,
        # no Gemma-shaped Shampoo: its one-layer subset alone takes ~20 s (~10 s a step), a fifth
        # of the suite, for an extrapolated number; --full times it at every r
        shampoo=dict(layers=1, ranks=[], max_dim=512, sets=["gemma-2b"]),
    ),
    "full": dict(
        sets={
            "gemma-2b": dict(layers=18, hidden=2048, kv=256, ranks=[8, 16, 64]),
            "7b": dict(layers=32, hidden=4096, kv=4096, ranks=[16]),
        },
        m_sweep=dict(ms=[256, 512, 1024, 2048, 4096], r=16, pairs=8),
        min_run_time=1.0,
        shampoo=dict(layers=1, ranks=[8, 16, 64], max_dim=1024, sets=["gemma-2b"]),
        compile=True,
    ),
}

#: the project's targets: (label, numerator, denominator, rank or None, comparison, bound)
TARGETS = [
    ("LoRA-RITE / Adam(foreach), r=16", "lora_rite", "adam", 16, "<=", 1.5),
    ("LoRA-RITE / Adam(foreach), r=64", "lora_rite", "adam", 64, "<=", 2.5),
    ("pytorch_optimizer LoRARite / LoRA-RITE, r=16", "pyopt_lora_rite", "lora_rite", 16, ">=", 8.0),
    ("ScaledGD / Adam(foreach), r=16", "scaled_gd", "adam", 16, "<=", 1.2),
    ("ScaledAdam / Adam(foreach), r=16", "scaled_adam", "adam", 16, "<=", 1.2),
    ("ScaledAdam / peft_riemannian (same method), r=16", "scaled_adam", "peft_riemannian", 16, "<=", 1.0),
    ("LoRA-RITE / peft_riemannian, r=16", "lora_rite", "peft_riemannian", 16, "<=", 1.0),
]


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

    def start(self) -> "CpuMonitor":
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
    import statistics

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
        opt.step()
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


def _shampoo_plan(size: dict[str, Any], set_name: str, spec: dict[str, Any], r: int) -> tuple[str, Any]:
    """("full", None) | ("subset", layers) | ("skipped", reason) for Shampoo on this set."""
    sh = size["shampoo"]
    max_dim = max(spec["hidden"], spec["kv"])
    if max_dim <= sh["max_dim"]:
        return "full", None
    if sh.get("layers") and r in sh.get("ranks", []) and set_name in sh.get("sets", [set_name]):
        return "subset", sh["layers"]
    where = f"at r ∈ {sh['ranks']}" if sh.get("ranks") else "with --full"
    return "skipped", (f"m×m preconditioners with m = {max_dim} and an SVD of each every step "
                       f"(≈1.6 s per 2048² SVD on this CPU); timed on a 1-layer subset only "
                       f"{where}")


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
    from benchmarks.lowrank_problems import torch_threads

    with torch_threads(_threads_option(ctx) or SIZES[ctx.size].get("threads") or None):
        return _run(ctx)


def _run(ctx: RunContext) -> SuiteResult:
    from benchmarks.optimizers import OPTIMIZERS

    torch.manual_seed(ctx.seed)
    size = SIZES[ctx.size]
    device = _device()
    load_before = os.getloadavg()
    whole = CpuMonitor().start()
    mrt = size["min_run_time"]
    names = list(OPTIMIZERS)

    # ---- the jobs: (set, r) × optimizer, then the m sweep
    jobs: list[tuple[str, Any, int, str]] = []
    for set_name, spec in size["sets"].items():
        for r in spec["ranks"]:
            for name in names:
                jobs.append(("set", set_name, r, name))
    sweep = size["m_sweep"]
    for m in sweep["ms"]:
        for name in names:
            jobs.append(("m", m, sweep["r"], name))

    sets: dict[str, dict[str, dict[str, Any]]] = {}
    msweep: dict[str, dict[str, Any]] = {name: {} for name in names}
    current: tuple | None = None
    ps: ParamSet | None = None
    for kind, key, r, name in progress(jobs, ctx, "speed", total=len(jobs)):
        if kind == "set":
            spec = size["sets"][key]
            ident = ("set", key, r)
            if current != ident:
                ps = None
                ps = ParamSet(layer_shapes(spec["layers"], spec["hidden"], spec["kv"], r), ctx.seed, device)
                current = ident
            entry = sets.setdefault(key, {}).setdefault(str(r), {})
            if name == "shampoo":
                plan, arg = _shampoo_plan(size, key, spec, r)
                if plan == "skipped":
                    entry[name] = {"skipped": arg}
                    continue
                if plan == "subset":
                    sub = ParamSet(layer_shapes(arg, spec["hidden"], spec["kv"], r), ctx.seed, device)
                    res = measure(name, sub, mrt)
                    base = measure(BASELINE, sub, mrt)
                    factor = len(ps.shapes) / len(sub.shapes)
                    entry[name] = dict(
                        res, subset_pairs=len(sub.shapes), subset_ms=res["ms"], subset_state_bytes=res["state_bytes"],
                        subset_adam_ms=base["ms"], ms=res["ms"] * factor, state_bytes=int(res["state_bytes"] * factor),
                        param_bytes=ps.numel * 4, pairs=len(ps.shapes), extrapolated=factor,
                        ratio_to_adam_subset=res["ms"] / base["ms"],
                        contended=res["contended"] or base["contended"],
                    )
                    del sub
                    continue
            entry[name] = measure(name, ps, mrt)
        else:
            ident = ("m", key, r)
            if name == "shampoo" and key > size["shampoo"]["max_dim"]:
                msweep[name][str(key)] = {"skipped": f"m = {key} > shampoo max_dim {size['shampoo']['max_dim']}"}
                continue
            if current != ident:
                ps = None
                ps = ParamSet([(key, key, r)] * sweep["pairs"], ctx.seed, device)
                current = ident
            msweep[name][str(key)] = measure(name, ps, mrt)
    ps = None
    compiled: dict[str, Any] = {}
    main_set = next(iter(size["sets"]))
    if _compile_option(ctx, size) and COMPILE_RANK in size["sets"][main_set]["ranks"]:
        spec = size["sets"][main_set]
        ps = ParamSet(layer_shapes(spec["layers"], spec["hidden"], spec["kv"], COMPILE_RANK), ctx.seed, device)
        eager = sets[main_set][str(COMPILE_RANK)]
        for name in progress(COMPILED, ctx, "speed (compile=True)", total=len(COMPILED)):
            res = measure(name, ps, mrt, {"compile": True})
            res["ratio_to_eager"] = res["ms"] / eager[name]["ms"]
            res["ratio_to_adam"] = res["ms"] / eager[BASELINE]["ms"]
            res["contended"] = res["contended"] or eager[name].get("contended") or eager[BASELINE].get("contended")
            compiled[name] = res
        ps = None
    load = {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count(),
            "others_cpu_share": whole.share()}

    # ---- ratios, targets
    for set_name, by_r in sets.items():
        for r, by_name in by_r.items():
            adam = by_name[BASELINE]["ms"]
            adamw = by_name["adamw"]["state_bytes"]
            for name, res in by_name.items():
                if "ms" in res:
                    res["ratio_to_adam"] = res.get("ratio_to_adam_subset", res["ms"] / adam)
                    res["state_ratio_to_adamw"] = res["state_bytes"] / adamw
    main = next(iter(sets))
    targets = _targets(sets[main], size)

    metrics = {"sets": sets, "m_sweep": {"r": sweep["r"], "pairs": sweep["pairs"], "results": msweep},
               "targets": targets, "device": str(device), "threads": torch.get_num_threads(),
               "compiled": {"set": main_set, "r": COMPILE_RANK, "results": compiled} if compiled else None,
               "baseline": "torch.optim.Adam(foreach=True) (config 'adam')", "load_average": load}
    config = {"size": ctx.size, **size, "device": str(device), "dtype": "float32",
              "timer": f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={mrt}), median, "
                       f"{torch.get_num_threads()} threads"}
    table = _table(sets, msweep, sweep, targets, size, load)
    if compiled:
        table = _compiled_table(compiled, main_set) + "\n\n" + table
    figures = _plots(sets, msweep, sweep, ctx)
    return SuiteResult(suite=SUITE, metrics=metrics, config=config, table=table, figures=figures)


def _targets(by_r: dict[str, dict[str, Any]], size: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, num, den, r, op, bound in TARGETS:
        res = by_r.get(str(r))
        if res is None or "ms" not in res.get(num, {}) or "ms" not in res.get(den, {}):
            out.append({"target": label, "bound": f"{op} {bound}", "value": None, "status": "not measured"})
            continue
        v = res[num]["ms"] / res[den]["ms"]
        ok = v <= bound if op == "<=" else v >= bound
        status = "met" if ok else "missed"
        if res[num].get("contended") or res[den].get("contended"):
            status += " (unreliable: contended †)"
        out.append({"target": label, "bound": f"{op} {bound}", "value": v, "status": status})
    # state: LoRA-RITE <= AdamW + 2 r² + 1 float32 per pair. AdamW's two step scalars per pair
    # (one per tensor) offset two of the driver's three (step, nonfinite_skips, update_skips);
    # the third, update_skips, is the + 1.
    for r, res in by_r.items():
        if "lora_rite" in res and "adamw" in res:
            pairs = res["lora_rite"]["pairs"]
            bound = res["adamw"]["state_bytes"] + pairs * (2 * int(r) ** 2 + 1) * 4
            v = res["lora_rite"]["state_bytes"]
            target = f"LoRA-RITE state bytes <= AdamW + 2r² + 1 floats per pair, r={r}"
            out.append({"target": target,
                        "bound": f"<= {bound}", "value": v, "status": "met" if v <= bound else "missed",
                        "excess_bytes": v - bound})
    return out


def _compiled_table(compiled: dict[str, Any], set_name: str) -> str:
    rows = [[name, _fmt_ms(res), f"{res['ratio_to_eager']:.3g}" + ("†" if res["contended"] else ""),
             f"{res['ratio_to_adam']:.3g}", f"{res['warmup_s']:.1f}"] for name, res in compiled.items()]
    return (f"### compile=True: {set_name}, r={COMPILE_RANK}\n\n"
            + markdown_table(["optimizer", "ms", "×eager", "×Adam", "first step s (compiles)"], rows)
            + "\n\nThe same strategy with `LowRankOptimizer(compile=True)` (its update through `torch.compile`), "
              "timed after the eager rows of the same run; ×eager and ×Adam divide by those rows' medians.")


def _fmt_ms(res: dict[str, Any]) -> Any:
    if "skipped" in res:
        return "skipped"
    s = f"{res['ms']:.3g}"
    s = s + "*" if res.get("extrapolated") else s
    return s + "†" if res.get("contended") else s


def _table(sets, msweep, sweep, targets, size, load) -> str:
    from benchmarks.optimizers import OPTIMIZERS

    parts = []
    notes = []
    for set_name, by_r in sets.items():
        ranks = list(by_r)
        head = ["optimizer"] + [h for r in ranks for h in (f"ms r={r}", f"×Adam r={r}")] + \
               [h for r in ranks for h in (f"state MB r={r}", f"×AdamW r={r}")]
        rows = []
        for name in OPTIMIZERS:
            row = [name]
            for r in ranks:
                res = by_r[r].get(name, {"skipped": "not run"})
                if "skipped" in res:
                    row += [_fmt_ms(res), "—"]
                else:
                    flag = res.get("contended") or by_r[r][BASELINE].get("contended")
                    row += [_fmt_ms(res), f"{res['ratio_to_adam']:.4g}" + ("†" if flag else "")]
            for r in ranks:
                res = by_r[r].get(name, {"skipped": "not run"})
                if "skipped" in res:
                    row += ["—", "—"]
                else:
                    mb = f"{res['state_bytes'] / 2**20:.2f}" + ("*" if res.get("extrapolated") else "")
                    row += [mb, res["state_ratio_to_adamw"]]
                    if res.get("extrapolated"):
                        notes.append(
                            f"`{name}` on {set_name} r={r}: timed on the first {res['subset_pairs']} pairs "
                            f"({res['subset_ms']:.0f} ms per step; Adam on the same subset {res['subset_adam_ms']:.2f} ms, "
                            f"×Adam = {res['ratio_to_adam_subset']:.0f}); ms and state MB marked * are ×{res['extrapolated']:.0f} "
                            "extrapolations (identical layers: the state scales exactly, the time per pair is assumed constant)."
                        )
            rows.append(row)
        pairs = next(iter(by_r.values()))[BASELINE]["pairs"]
        parts.append(f"### {set_name} ({pairs} pairs), step time and optimizer state\n\n" + markdown_table(head, rows))
        for r in ranks:
            res = by_r[r].get("shampoo", {})
            if "skipped" in res:
                notes.append(f"`shampoo` on {set_name} r={r}: skipped ({res['skipped']}).")
    ms = [str(m) for m in sweep["ms"]]
    head = ["optimizer"] + [f"ms m={m}" for m in ms]
    rows = [[name] + [_fmt_ms(msweep[name][m]) for m in ms] for name in OPTIMIZERS]
    parts.append(f"### m sweep: {sweep['pairs']} pairs m×m, r={sweep['r']}\n\n" + markdown_table(head, rows))
    for m in ms:
        if "skipped" in msweep["shampoo"].get(m, {}):
            notes.append(f"`shampoo` m={m}: skipped ({msweep['shampoo'][m]['skipped']}).")
    trows = [[t["target"], t["bound"], "—" if t["value"] is None else t["value"], t["status"]] for t in targets]
    parts.append("### Targets\n\n" + markdown_table(["ratio", "target", "measured", "status"], trows))
    n_cont = sum(1 for by_r in sets.values() for res_r in by_r.values() for x in res_r.values() if x.get("contended")) + \
        sum(1 for by_m in msweep.values() for x in by_m.values() if x.get("contended"))
    notes.append(
        f"† = other processes used more than the cores left free by our {torch.get_num_threads()} thread(s) "
        f"plus {CONTENDED:.0%} of the machine while this was timed "
        f"({n_cont} measurement(s)); such numbers are not reliable."
    )
    notes.append(
        "Step time: median of `blocked_autorange`, fixed gradients, float32; ×Adam = ratio to "
        "`torch.optim.Adam(foreach=True)` timed in the same run on the same set. State: exact Σ numel·element_size "
        "over `optimizer.state`. `peft_riemannian` restores its (in-place preconditioned) gradients before every "
        "step; the separately timed copy is subtracted."
    )
    share = load["others_cpu_share"]
    notes.append(
        f"{torch.get_num_threads()} torch thread(s) on {load['cpus']} CPUs; other processes used "
        + ("an unknown share" if share is None else f"{share:.0%}")
        + f" of the machine during the run (1-min load average {load['before'][0]:.2f} before, "
        f"{load['after'][0]:.2f} after)"
        + (f"; **{n_cont} measurement(s) contended (†)**." if n_cont else "; no measurement contended.")
    )
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes))


def _color(i: int):
    import matplotlib.pyplot as plt

    extra = ["black", "gold", "navy", "lime"]
    return plt.get_cmap("tab10")(i) if i < 10 else extra[(i - 10) % len(extra)]


def _plots(sets, msweep, sweep, ctx: RunContext) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.optimizers import OPTIMIZERS

    markers = "os^vD<>pPX*hd"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    set_name = next(iter(sets))
    by_r = sets[set_name]
    ranks = sorted(int(r) for r in by_r)
    for i, name in enumerate(OPTIMIZERS):
        xs = [r for r in ranks if "ms" in by_r[str(r)].get(name, {})]
        ys = [by_r[str(r)][name]["ms"] for r in xs]
        if xs:
            extrap = any(by_r[str(r)][name].get("extrapolated") for r in xs)
            axes[0].loglog(xs, ys, marker=markers[i % len(markers)], color=_color(i), linestyle=":" if extrap else ("-" if i < 4 else "--"),
                           label=name + (" (extrapolated)" if extrap else ""), markerfacecolor="none" if extrap else None)
    axes[0].set_xlabel("rank r")
    axes[0].set_ylabel("step time (ms)")
    axes[0].set_title(f"{set_name}: step time vs r")
    from matplotlib.ticker import NullFormatter

    axes[0].set_xticks(ranks, [str(r) for r in ranks])
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    for r in ranks:
        res = by_r[str(r)].get("shampoo", {})
        if res.get("extrapolated"):
            axes[0].annotate(f"shampoo ×{res['extrapolated']:.0f} from {res['subset_pairs']} pairs",
                             (r, res["ms"]), textcoords="offset points", xytext=(6, -4), fontsize=7)
    for i, name in enumerate(OPTIMIZERS):
        xs = [int(m) for m, res in msweep[name].items() if "ms" in res]
        ys = [msweep[name][str(m)]["ms"] for m in xs]
        if xs:
            axes[1].loglog(xs, ys, marker=markers[i % len(markers)], color=_color(i), linestyle="-" if i < 4 else "--", label=name)
    axes[1].set_xticks(sweep["ms"], [str(m) for m in sweep["ms"]])
    axes[1].xaxis.set_minor_formatter(NullFormatter())
    axes[1].set_xlabel("m (pairs m×m)")
    axes[1].set_title(f"{sweep['pairs']} pairs m×m, r={sweep['r']}: step time vs m")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figs = [savefig(fig, ctx, "speed_time_vs_r_and_m")]

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    r = str(16 if "16" in by_r else ranks[-1])
    names = [n for n in OPTIMIZERS if "ms" in by_r[r].get(n, {})]
    axes[0].bar(names, [by_r[r][n]["ratio_to_adam"] for n in names], color="tab:blue")
    axes[0].axhline(1.0, color="k", linewidth=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("step time / Adam(foreach)")
    axes[1].bar(names, [by_r[r][n]["state_ratio_to_adamw"] for n in names], color="tab:orange")
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("state bytes / AdamW")
    for ax, title in zip(axes, ["step time", "optimizer state"]):
        ax.set_title(f"{set_name} r={r}: {title}")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    figs.append(savefig(fig, ctx, "speed_ratios"))
    return figs
