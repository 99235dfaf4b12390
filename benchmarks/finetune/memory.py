"""Peak memory of training, measured in a fresh process per optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.finetune.data import collate
from benchmarks.finetune.model import Classifier, init_adapter, load_encoder, make_finetune_optimizer, opt_state_bytes

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

    The child (:func:`memory_child`) loads the model and then takes :data:`MEMORY_STEPS` full
    training steps on the batch ``ids`` (forward, backward, optimizer step, ``zero_grad``) while a
    thread samples its RSS every 1 ms: reported is the peak during the steps minus the RSS before
    them — activations, gradients, optimizer state and the step's temporaries. Every optimizer runs
    the same child from the same start, so the differences between optimizers are theirs. A fresh
    process each: in one long process the allocator keeps pages freed by earlier runs, and later
    optimizers would show almost nothing.
    """
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
    root = str(Path(__file__).resolve().parents[2])  # the checkout: the child imports this package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-c", "from benchmarks.finetune.memory import memory_child; memory_child()"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"finetune memory measurement of {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child() -> None:
    """The child process of :func:`training_peak_memory`: job as JSON on stdin, result as JSON on stdout."""
    job = json.loads(sys.stdin.read())
    _, enc = load_encoder(job["model"])
    enc.eval()
    model = Classifier(enc, job["n_classes"])
    init_adapter(model, job["seed"], job["n_classes"], job["init"])
    x, m = collate(job["ids"], job["pad_id"])
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
                "state_bytes": opt_state_bytes(opt),
                "steps": MEMORY_STEPS,
            }
        )
    )
