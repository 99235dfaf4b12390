"""Float64 NumPy reference of LoFT (Tastan, Laskaridis, Takáč, Nandakumar, Horváth, "LoFT: Low-Rank
Adaptation That Behaves Like Full Fine-Tuning", ICLR 2026, arXiv 2505.21289), LoFT-AdamW.

Orientation ``Z = A B^T`` (``A`` m x r, ``B`` n x r, ``dA = dZ B``, ``dB = dZ^T A``). For a factor
``X`` with partner ``Y`` (``S = (Y^T Y)^+``), every step, from the paper's building blocks:

* optimizer-state calibration: ``C = Y_prev^T Y S``; ``m <- m C``; each row's r x r second moment
  ``p_i <- C^T p_i C`` (``Y_prev``: the partner at the previous step);
* gradient scaling: ``g = dX S``; ``m <- b1 m + (1-b1) g``; ``p_i <- b2 p_i + (1-b2) g_i^T g_i``;
* alternating updates: ``A`` moves on steps 1, 3, ... (``k`` even, counting from 0), ``B`` on the
  others; both moments are calibrated and accumulated every step;
* projected full update of the moving factor: ``M = m Y^T``, ``V_ij = y_j p_i y_j^T`` (rows ``y_j`` of
  ``Y``), ``D = (M / (1-b1^t)) / (sqrt(V / (1-b2^t)) + eps)``, ``X <- X (1 - lr wd) - lr D Y S``.

``reference=True`` transcribes the published code's departures instead (``tnurbek/loft`` at
148998d, ``loft_optim/optimizer.py`` and ``optim_helper.py``, read, not run here): ``S`` with a
Tikhonov term (``1e-8 I`` for A's partner B, ``1e-6 I`` for B's partner A), ``p_i <- C p_i C^T``,
weight decay ``X <- X (1 - wd)``, and B's side processed before A's so that on B's steps A's side
sees the updated B (for its scaling, its calibration and as its stored previous partner).

Record keys per pair: ``A, B, Z, m_A, m_B, p_A, p_B``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["run_loft"]

AUTHORS_DELTA = {"A": 1e-8, "B": 1e-6}


def _inverse_gram(y: np.ndarray, delta: float) -> np.ndarray:
    g = y.T @ y
    if delta == 0:
        return np.linalg.pinv(g, hermitian=True)
    return np.linalg.inv(g + delta * np.eye(g.shape[0]))


def _side(x, grad, y, y_prev, m, p, move, t, lr, betas, eps, wd, delta, authors):
    """One factor: calibrate, accumulate, and the new factor when it moves. Returns (x, m, p)."""
    b1, b2 = betas
    S = _inverse_gram(y, delta)
    C = y_prev.T @ y @ S
    m = m @ C
    p = np.stack([(C @ pi @ C.T) if authors else (C.T @ pi @ C) for pi in p])
    g = grad @ S
    m = b1 * m + (1.0 - b1) * g
    p = np.stack([b2 * p[i] + (1.0 - b2) * np.outer(g[i], g[i]) for i in range(g.shape[0])])
    if not move:
        return x, m, p
    M = m @ y.T
    V = np.zeros_like(M)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            V[i, j] = max(y[j] @ p[i] @ y[j], 0.0)
    D = (M / (1.0 - b1**t)) / (np.sqrt(V / (1.0 - b2**t)) + eps)
    decay = wd if authors else lr * wd
    return x * (1.0 - decay) - lr * (D @ y @ S), m, p


def run_loft(
    As, Bs, grad_fn, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, alternate=True, reference=False
):
    """LoFT-AdamW on every pair for ``steps`` steps; one record (list of per-pair dicts) per step."""
    A = [np.array(a, dtype=np.float64) for a in As]
    B = [np.array(b, dtype=np.float64) for b in Bs]
    prev_A, prev_B = [a.copy() for a in A], [b.copy() for b in B]
    mA, mB = [np.zeros_like(a) for a in A], [np.zeros_like(b) for b in B]
    pA = [np.zeros((a.shape[0], a.shape[1], a.shape[1])) for a in A]
    pB = [np.zeros((b.shape[0], b.shape[1], b.shape[1])) for b in B]
    records = []
    for k in range(steps):
        t = k + 1
        gA, gB = grad_fn([a.copy() for a in A], [b.copy() for b in B])
        move_a, move_b = (k % 2 == 0, k % 2 == 1) if alternate else (True, True)
        rec = []
        for i in range(len(A)):
            common = dict(t=t, lr=lr, betas=betas, eps=eps, wd=weight_decay, authors=reference)
            dB = AUTHORS_DELTA["B"] if reference else 0.0
            dA = AUTHORS_DELTA["A"] if reference else 0.0
            new_B, mB[i], pB[i] = _side(B[i], gB[i], A[i], prev_A[i], mB[i], pB[i], move_b, delta=dB, **common)
            b_seen = new_B if reference else B[i]
            new_A, mA[i], pA[i] = _side(A[i], gA[i], b_seen, prev_B[i], mA[i], pA[i], move_a, delta=dA, **common)
            prev_A[i], prev_B[i] = A[i].copy(), b_seen.copy()
            A[i], B[i] = new_A, new_B
            rec.append(
                dict(A=A[i].copy(), B=B[i].copy(), Z=A[i] @ B[i].T, m_A=mA[i].copy(), m_B=mB[i].copy())
                | dict(p_A=pA[i].copy(), p_B=pB[i].copy())
            )
        records.append(rec)
    return records
