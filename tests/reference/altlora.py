"""Float64 NumPy reference of AltLoRA (Yu, Wang, Chen & Xue, arXiv 2505.12455, Algorithm 1).

Written in the paper's orientation ``W = W0 + B A`` (``B`` m x r, ``A`` r x n) and converted at the
boundary only: the package's pair ``(A_pkg, B_pkg)`` with ``Z = A_pkg B_pkg^T`` is ``B = A_pkg``,
``A = B_pkg^T``, so ``grad_A = dB_pkg^T`` and ``grad_B = dA_pkg``.

One iteration (both gradients from one backward pass at ``(A_t, B_t)``, as the authors run it):

* ``A`` first: ``G_A = (B_t^T B_t + delta I)^{-1} grad_A``; momentum carried from ``B_{t-1}`` to ``B_t``
  by the projection ``P_A = (B_t^T B_t + delta I)^{-1} B_t^T B_{t-1}``: ``M_A = beta P_A M_A + (1-beta) G_A``;
  ``A_{t+1} = (1 - lr wd)(A_t - lr_t M_A)``.
* then ``B`` with the new ``A``: ``G_B = grad_B (A_{t+1} A_{t+1}^T + delta I)^{-1}``;
  ``P_B = A_t A_{t+1}^T (A_{t+1} A_{t+1}^T + delta I)^{-1}``; ``M_B = beta M_B P_B + (1-beta) G_B``;
  ``B_{t+1} = (1 - lr wd)(B_t - lr_t M_B)``.

``lr_t = lr / (1 - beta^t)`` with bias correction (``t = k + 1``), else ``lr``. ``delta == 0`` uses the
pseudo-inverse of the Gram (a zero factor gives a zero step). Library safeguard
(``relative_step_cap > 0``): the step ``-lr_t M`` of each factor has its relative change capped as
ScaledGD's (``_cap_relative_change`` on the factor in its ``rows x r`` form), before the decay.
Record keys (package orientation): ``A, B, Z``, ``M_A`` (m x r, the momentum of ``A_pkg``),
``M_B`` (n x r), ``prev_A`` (``A_pkg`` before the step).
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
):
    """Run AltLoRA on every pair for ``steps`` steps; one record per step and pair (keys above)."""
    paper_B = [np.array(a, dtype=np.float64, copy=True) for a in As]  # m x r
    paper_A = [np.array(b, dtype=np.float64, copy=True).T for b in Bs]  # r x n
    n_pairs = len(paper_B)
    M_A = [np.zeros_like(a) for a in paper_A]
    M_B = [np.zeros_like(b) for b in paper_B]
    B_prev = [b.copy() for b in paper_B]  # B at the previous A update (P_A = 0 x M_A = 0 on step 1)
    records = []
    for k in range(steps):
        t = k + 1
        lr_k = resolve_lr(lr, k)
        lr_t = lr_k / (1.0 - beta**t) if bias_correction and beta > 0 else lr_k
        shrink = 1.0 - lr_k * weight_decay
        gA_pkg, gB_pkg = grad_fn([b.copy() for b in paper_B], [a.T.copy() for a in paper_A])
        step_rec = []
        for i in range(n_pairs):
            A, B = paper_A[i], paper_B[i]
            grad_A = np.asarray(gB_pkg[i], dtype=np.float64).T
            grad_B = np.asarray(gA_pkg[i], dtype=np.float64)
            # A: precondition by B_t, move the momentum from B_{t-1}'s space to B_t's
            K_B = inv_gram(B, delta)  # (B^T B + delta I)^{-1}, r x r
            P_A = K_B @ B.T @ B_prev[i]
            M_A[i] = beta * P_A @ M_A[i] + (1.0 - beta) * K_B @ grad_A
            step_A = _capped((-lr_t * M_A[i]).T, A.T, relative_step_cap).T
            A_new = shrink * (A + step_A)
            # B: precondition by the new A_{t+1}, move the momentum from A_t's space to A_{t+1}'s
            K_A = inv_gram(A_new.T, delta)  # (A A^T + delta I)^{-1}
            P_B = A @ A_new.T @ K_A
            M_B[i] = beta * M_B[i] @ P_B + (1.0 - beta) * grad_B @ K_A
            step_B = _capped(-lr_t * M_B[i], B, relative_step_cap)
            B_new = shrink * (B + step_B)
            B_prev[i] = B.copy()
            paper_A[i], paper_B[i] = A_new, B_new
            step_rec.append(
                dict(
                    A=B_new.copy(),
                    B=A_new.T.copy(),
                    Z=B_new @ A_new,
                    M_A=M_B[i].copy(),
                    M_B=M_A[i].T.copy(),
                    prev_A=B.copy(),
                )
            )
        records.append(step_rec)
    return records
