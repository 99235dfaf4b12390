"""Float64 NumPy reference of AltLoRA (Yu, Wang, Chen & Xue, arXiv 2505.12455, Algorithm 1).

Written in the paper's orientation ``W = W0 + B A`` (``B`` m x r, ``A`` r x n) and converted at the
boundary only: the package's pair ``(A_pkg, B_pkg)`` with ``Z = A_pkg B_pkg^T`` is ``B = A_pkg``,
``A = B_pkg^T``, so ``grad_A = dB_pkg^T`` and ``grad_B = dA_pkg``.

``alternate=True`` (Algorithm 1 of the paper, "if t mod 2 = 0 then Update A ... else Update B",
each with its own backpropagation): step ``k`` moves one factor, ``A`` when ``k`` is even, ``B``
when odd, with the gradient of that step; the other factor and its momentum stay.

* ``A``: ``G_A = (B^T B + delta I)^{-1} grad_A``; momentum carried by Theorem 2's alignment from
  ``B_seen``, the ``B`` at A's previous update, to the current ``B``:
  ``M_A = beta (B^T B + delta I)^{-1} B^T B_seen M_A + (1-beta) G_A``; ``A <- A - lr_k M_A - lr wd A``.
* ``B``: ``G_B = grad_B (A A^T + delta I)^{-1}``;
  ``M_B = beta M_B A_seen A^T (A A^T + delta I)^{-1} + (1-beta) G_B``; ``B <- B - lr_k M_B - lr wd B``,
  ``A_seen`` the ``A`` at B's previous update.

``lr_k = lr / (1 - beta^k)`` with bias correction, ``k`` counting that factor's own updates from 1.

``alternate=False`` (the authors' optimizer class given both gradients of one backward pass at
``(A_t, B_t)``): every step moves ``A`` with ``B_t`` (momentum carried from ``B_{t-1}``), then ``B``
with the new ``A_{t+1}`` (momentum carried from ``A_t``), each ``X <- (1 - lr wd)(X - lr_t M)``,
``lr_t = lr / (1 - beta^t)``, ``t = k + 1``.

``delta == 0`` uses the pseudo-inverse of the Gram (a zero factor gives a zero step). Library
safeguard (``relative_step_cap > 0``): the step ``-lr_k M`` of each factor has its relative change
capped as ScaledGD's (``_cap_relative_change`` on the factor in its ``rows x r`` form), before the
decay. Record keys (package orientation): ``A, B, Z``, ``M_A`` (m x r, the momentum of ``A_pkg``),
``M_B`` (n x r).
"""

from __future__ import annotations

import numpy as np

from .lora_rite import _cap_relative_change, basis_and_magnitude, resolve_lr
from .scaled import inv_gram

__all__ = ["run_altlora"]


def _capped(step: np.ndarray, x: np.ndarray, cap: float) -> np.ndarray:
    """``step`` of a factor ``x`` (both rows x r) with its relative change capped (no-op for ``cap == 0``)."""
    if cap <= 0:
        return step
    _, r, r_pinv = basis_and_magnitude(x, "qr")
    return _cap_relative_change(step, r, r_pinv, cap)


def _decayed(x: np.ndarray, step: np.ndarray, lr_wd: float, alternate: bool) -> np.ndarray:
    """Algorithm 1: ``x + step - lr wd x``; the authors' code: ``(1 - lr wd)(x + step)``."""
    return x + step - lr_wd * x if alternate else (1.0 - lr_wd) * (x + step)


def run_altlora(
    As,
    Bs,
    grad_fn,
    steps,
    lr,
    beta=0.9,
    delta=0.0,
    weight_decay=0.0,
    bias_correction=True,
    relative_step_cap=1.0,
    alternate=True,
):
    """Run AltLoRA on every pair for ``steps`` steps; one record per step and pair (keys above)."""
    paper_B = [np.array(a, dtype=np.float64, copy=True) for a in As]  # m x r
    paper_A = [np.array(b, dtype=np.float64, copy=True).T for b in Bs]  # r x n
    n_pairs = len(paper_B)
    M_A = [np.zeros_like(a) for a in paper_A]
    M_B = [np.zeros_like(b) for b in paper_B]
    B_seen = [b.copy() for b in paper_B]  # B at A's previous update (the alignment of M_A = 0 is moot)
    A_seen = [a.copy() for a in paper_A]  # A at B's previous update
    records = []
    for k in range(steps):
        lr_k = resolve_lr(lr, k)
        t = k // 2 + 1 if alternate else k + 1  # the moving factor's own update count
        lr_t = lr_k / (1.0 - beta**t) if bias_correction and beta > 0 else lr_k
        move_A = not alternate or k % 2 == 0
        move_B = not alternate or k % 2 == 1
        gA_pkg, gB_pkg = grad_fn([b.copy() for b in paper_B], [a.T.copy() for a in paper_A])
        step_rec = []
        for i in range(n_pairs):
            A, B = paper_A[i], paper_B[i]
            grad_A = np.asarray(gB_pkg[i], dtype=np.float64).T
            grad_B = np.asarray(gA_pkg[i], dtype=np.float64)
            A_new, B_new = A, B
            if move_A:
                K_B = inv_gram(B, delta)  # (B^T B + delta I)^{-1}, r x r
                M_A[i] = beta * K_B @ B.T @ B_seen[i] @ M_A[i] + (1.0 - beta) * K_B @ grad_A
                step_A = _capped((-lr_t * M_A[i]).T, A.T, relative_step_cap).T
                A_new = _decayed(A, step_A, lr_k * weight_decay, alternate)
                B_seen[i] = B.copy()
            if move_B:
                # B after A's update: within the step (authors' code) or from the previous one (Algorithm 1)
                K_A = inv_gram(A_new.T, delta)  # (A A^T + delta I)^{-1}
                M_B[i] = beta * M_B[i] @ A_seen[i] @ A_new.T @ K_A + (1.0 - beta) * grad_B @ K_A
                step_B = _capped(-lr_t * M_B[i], B, relative_step_cap)
                B_new = _decayed(B, step_B, lr_k * weight_decay, alternate)
                A_seen[i] = A_new.copy()
            paper_A[i], paper_B[i] = A_new, B_new
            rec = dict(A=B_new.copy(), B=A_new.T.copy(), Z=B_new @ A_new, M_A=M_B[i].copy(), M_B=M_A[i].T.copy())
            step_rec.append(rec)
        records.append(step_rec)
    return records
