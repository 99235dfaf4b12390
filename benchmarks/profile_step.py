"""``python -m benchmarks.profile_step``: where one optimizer step spends its time, by operator.

Builds the speed suite's Gemma-2B-shaped LoRA set (:func:`benchmarks.speed.layer_shapes`, float32,
fixed gradients), takes untimed warm-up steps, then profiles ``steps`` steps of each named
optimizer with ``torch.profiler`` (CPU, and CUDA when available) and prints the operators by
self time, per step, next to the same table for ``torch.optim.Adam(foreach=True)``::

    python -m benchmarks.profile_step --optimizers lora_rite,scaled_adam --r 16 --steps 20

The totals are the profiler's (its overhead inflates many small calls), so read the shares, not
the absolute times; :mod:`benchmarks.speed` measures the step times.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

#: operator families of the profile's summary, by aten name (``aten::`` and leading ``_`` dropped,
#: ``foreach_`` ops by the op they apply, in-place ``_`` dropped); what is in none is ``other`` (views, allocation,
#: ``item``). The optimizer's own Python is the ``Optimizer.step#…`` record's self time.
CATEGORIES = {
    "GEMM": set("bmm mm matmul addmm baddbmm addbmm linear dot".split()),
    "factorization (QR, SVD, eigh, Cholesky, solve)": set(
        "linalg_qr linalg_svd linalg_eigh linalg_eigvalsh linalg_cholesky_ex linalg_solve_ex "
        "linalg_solve_triangular linalg_inv_ex linalg_pinv triangular_solve cholesky_solve".split()
    ),
    "copy / stack / cast": set("copy cat stack to_copy clone contiguous fill zero".split()),
    "reduction (norm, sum, any)": set("linalg_vector_norm norm sum any all amax amin max min".split()),
    "elementwise": set(
        "mul add sub div where sqrt rsqrt pow clamp clamp_min clamp_max maximum minimum triu tril neg abs "
        "addcmul addcdiv lerp reciprocal square isfinite eq ne gt lt ge le logical_and logical_or logical_not "
        "sign exp log nan_to_num masked_fill".split()
    ),
}
PYTHON = "driver Python (Optimizer.step self time)"


def category(op: str) -> str:
    """The family (:data:`CATEGORIES`) of the profiler key ``op``."""
    if op.startswith("Optimizer.step"):
        return PYTHON
    name = op.removeprefix("aten::").lstrip("_").removeprefix("foreach_").rstrip("_")
    return next((label for label, names in CATEGORIES.items() if name in names), "other")


def by_category(rows: list[tuple[str, int, float]]) -> dict[str, float]:
    """Self ms per step summed over the operators of each family (every operator, not a top-k)."""
    out: dict[str, float] = {}
    for key, _calls, ms in rows:
        out[category(key)] = out.get(category(key), 0.0) + ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile(
    name: str,
    r: int,
    steps: int,
    warmup: int = 3,
    layers: int = 18,
    top: int = 12,
    overrides: dict[str, Any] | None = None,
    hidden: int = 2048,
    kv: int = 256,
    categories: bool = False,
) -> tuple[float, list[tuple[str, int, float]]] | tuple[float, list[tuple[str, int, float]], dict[str, float]]:
    """(profiled ms per step, [(operator, calls per step, self ms per step)] for the ``top`` operators)
    on the Gemma-shaped set ``layer_shapes(layers, hidden, kv, r)``; with ``categories`` also the
    self ms per step of each operator family (:func:`by_category`, over all operators)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.optimizers import make_optimizer
    from benchmarks.speed import ParamSet, _device, _sync, layer_shapes

    device = _device()
    ps = ParamSet(layer_shapes(layers, hidden, kv, r), seed=0, device=device)
    ps.reset()
    opt = make_optimizer(name, ps.model, suite="speed", **(overrides or {}))
    for _ in range(warmup):
        opt.step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        _sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(((e.key, e.count // steps, getattr(e, attr) / 1e3 / steps) for e in events), key=lambda x: -x[2])
    total = sum(x[2] for x in rows)
    if categories:
        return total, rows[:top], by_category(rows)
    return total, rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default="lora_rite", help="comma-separated names of benchmarks/configs")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    for name in ["adam"] + [n.strip() for n in args.optimizers.split(",") if n.strip() and n.strip() != "adam"]:
        total, rows = profile(name, args.r, args.steps, layers=args.layers, top=args.top)
        print(
            f"\n{name}: Gemma-2B set, {args.layers} layers × q,k,v,o, r={args.r}, "
            f"{torch.get_num_threads()} threads: {total:.2f} ms self time per profiled step"
        )
        print(f"{'operator':44} {'calls/step':>10} {'ms/step':>9} {'share':>6}")
        for key, calls, ms in rows:
            print(f"{key[:44]:44} {calls:>10} {ms:>9.3f} {ms / total:>6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
