"""Deterministic float64 test problems for the reference optimizers (NumPy only, seeded).

Every problem is a group of two LoRA pairs with different shapes, in the orientation ``Z = A B^T``
(``A`` m x r, ``B`` n x r), and returns ``(As, Bs, grad_fn)`` where
``grad_fn(As, Bs) -> (gAs, gBs)`` gives the Euclidean factor gradients ``dA = dZ B``, ``dB = dZ^T A``.

* :func:`quadratic_problem` / :func:`zero_init_problem`: ``f(Z) = 0.5 ||Z - Z*||_F^2`` per pair (summed);
  ``grad_fn`` is a pure function of its inputs.
* :func:`linear_problem`: online linear losses ``f_t(Z) = <G_t, Z>``; ``G_t`` depends on the step
  index ``t``, taken from a call counter in the returned callable (one call per optimizer step, as the
  ``run_*`` functions do).  Call ``grad_fn.reset()`` (or build a fresh problem) before every run.
  ``grad_fn.G(t)`` returns the list of ``G_t`` per pair without touching the counter.

The arrays returned are fresh copies on each call, so the problems can be reused to feed both the
reference and the library under test.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OnlineLinearGrad", "linear_problem", "loss", "pair_shapes", "quadratic_problem", "zero_init_problem"]


def pair_shapes(m: int, n: int, r: int) -> list[tuple[int, int, int]]:
    """Shapes ``(m_i, n_i, r)`` of the two pairs: ``(m, n, r)`` and ``(m + 3, max(r, n - 1), r)``."""
    return [(m, n, r), (m + 3, max(r, n - 1), r)]


def _quadratic_grad_fn(targets):
    def grad_fn(As, Bs):
        gA, gB = [], []
        for a, b, zt in zip(As, Bs, targets):
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b, dtype=np.float64)
            dz = a @ b.T - zt
            gA.append(dz @ b)
            gB.append(dz.T @ a)
        return gA, gB

    grad_fn.targets = [t.copy() for t in targets]
    return grad_fn


def loss(As, Bs, targets) -> float:
    """``sum_i 0.5 ||A_i B_i^T - Z*_i||_F^2``."""
    return float(sum(0.5 * np.sum((a @ b.T - t) ** 2) for a, b, t in zip(As, Bs, targets)))


def quadratic_problem(
    m: int = 8, n: int = 6, r: int = 2, seed: int = 0, init_scale: float = 0.3, target_scale: float = 0.3
):
    """Two pairs, random factors ``init_scale * N(0,1)`` and random targets ``target_scale * N(0,1)``.

    Loss ``sum_i 0.5 ||A_i B_i^T - Z*_i||_F^2``; ``grad_fn.targets`` holds the targets.
    """
    rng = np.random.default_rng(seed)
    As, Bs, targets = [], [], []
    for mi, ni, ri in pair_shapes(m, n, r):
        As.append(init_scale * rng.standard_normal((mi, ri)))
        Bs.append(init_scale * rng.standard_normal((ni, ri)))
        targets.append(target_scale * rng.standard_normal((mi, ni)))
    return As, Bs, _quadratic_grad_fn(targets)


def zero_init_problem(
    m: int = 8, n: int = 6, r: int = 2, seed: int = 0, init_scale: float = 0.3, target_scale: float = 0.3
):
    """Like :func:`quadratic_problem` but every ``A`` starts exactly at 0 (PEFT's ``lora_B = 0`` init).

    In PEFT, ``delta W = lora_B @ lora_A`` with ``lora_B`` (out x r) zero and ``lora_A`` (r x in) random;
    in this orientation ``A = lora_B`` (zero) and ``B = lora_A^T`` (random).
    """
    rng = np.random.default_rng(seed)
    As, Bs, targets = [], [], []
    for mi, ni, ri in pair_shapes(m, n, r):
        As.append(np.zeros((mi, ri)))
        Bs.append(init_scale * rng.standard_normal((ni, ri)))
        targets.append(target_scale * rng.standard_normal((mi, ni)))
    return As, Bs, _quadratic_grad_fn(targets)


class OnlineLinearGrad:
    """Gradient oracle of ``f_t(Z) = <G_t, Z>``; ``t`` = number of calls since construction / :meth:`reset`.

    ``G_t`` of pair ``i`` is ``scale * N(0,1)`` from ``np.random.default_rng([seed, t, i])``.
    """

    def __init__(self, shapes, seed: int, scale: float):
        self.shapes = list(shapes)
        self.seed = int(seed)
        self.scale = float(scale)
        self.calls = 0

    def reset(self) -> None:
        """Restart the step counter at 0."""
        self.calls = 0

    def G(self, t: int) -> list[np.ndarray]:
        """``[G_t for each pair]`` (pure function of ``t``)."""
        return [
            self.scale * np.random.default_rng([self.seed, int(t), i]).standard_normal((mi, ni))
            for i, (mi, ni, _) in enumerate(self.shapes)
        ]

    def grad_at(self, t: int, As, Bs):
        """Factor gradients of ``f_t`` at ``(As, Bs)`` without touching the counter."""
        gA, gB = [], []
        for g, a, b in zip(self.G(t), As, Bs):
            gA.append(g @ np.asarray(b, dtype=np.float64))
            gB.append(g.T @ np.asarray(a, dtype=np.float64))
        return gA, gB

    def __call__(self, As, Bs):
        out = self.grad_at(self.calls, As, Bs)
        self.calls += 1
        return out


def linear_problem(m: int = 8, n: int = 6, r: int = 2, seed: int = 0, init_scale: float = 0.3, scale: float = 0.1):
    """Two pairs with random factors and the online linear losses of :class:`OnlineLinearGrad`.

    Returns ``(As, Bs, grad_fn)``; ``grad_fn`` is stateful (call counter): ``reset()`` it, or build a
    fresh problem, before each run.
    """
    rng = np.random.default_rng(seed)
    shapes = pair_shapes(m, n, r)
    As = [init_scale * rng.standard_normal((mi, ri)) for mi, _, ri in shapes]
    Bs = [init_scale * rng.standard_normal((ni, ri)) for _, ni, ri in shapes]
    return As, Bs, OnlineLinearGrad(shapes, seed + 1_000_003, scale)
