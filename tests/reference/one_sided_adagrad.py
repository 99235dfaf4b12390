"""Float64 NumPy reference of one-sided matrix Adagrad for LoRA factors.

This is the baseline LoRA-RITE is compared against in Sec. 3.3 of Yen et al. (ICLR 2025,
arXiv:2410.20625): full-matrix Adagrad preconditioning on the r-dimensional (low-rank) side only,

    H_{A,t} = H_{A,t-1} + dA_t^T dA_t,         A_{t+1} = A_t - lr_t dA_t (H_{A,t} + eps I)^{-1/2}

(and the same for B with dB), with regret O(G (D_A^2 + D_B^2) T^{-1/2}).  Coupled weight decay
``dA <- dA + wd A`` is applied to the gradient before everything.  Orientation ``Z = A B^T``.
"""

from __future__ import annotations

import numpy as np

from .lora_rite import resolve_lr, sym

__all__ = ["inv_sqrt_psd", "run_one_sided_adagrad"]


def inv_sqrt_psd(h: np.ndarray, eps: float) -> np.ndarray:
    """``(H + eps I)^{-1/2}`` via ``eigh`` of ``sym(H)``, eigenvalues clamped at 0 before adding ``eps``."""
    lam, q = np.linalg.eigh(sym(h))
    scale = 1.0 / np.sqrt(np.maximum(lam, 0.0) + eps)
    return (q * scale[None, :]) @ q.T


def run_one_sided_adagrad(As, Bs, grad_fn, steps, lr, eps=1e-6, weight_decay=0.0):
    """Run one-sided matrix Adagrad on a group of pairs (simultaneous A/B updates from old factors).

    Record keys per pair: ``H_A, H_B`` (accumulators after the step), ``delta_A, delta_B`` (applied
    updates), ``A, B, Z``.
    """
    A = [np.array(a, dtype=np.float64, copy=True) for a in As]
    B = [np.array(b, dtype=np.float64, copy=True) for b in Bs]
    if len(A) != len(B):
        raise ValueError("As and Bs must have the same length")
    n = len(A)
    HA = [np.zeros((a.shape[1], a.shape[1])) for a in A]
    HB = [np.zeros((b.shape[1], b.shape[1])) for b in B]
    records = []
    for k in range(steps):
        lr_t = resolve_lr(lr, k)
        gA, gB = grad_fn([a.copy() for a in A], [b.copy() for b in B])
        step_rec = []
        new_A, new_B = [], []
        for i in range(n):
            ga = np.asarray(gA[i], dtype=np.float64)
            gb = np.asarray(gB[i], dtype=np.float64)
            if weight_decay != 0:
                ga = ga + weight_decay * A[i]
                gb = gb + weight_decay * B[i]
            HA[i] = HA[i] + ga.T @ ga
            HB[i] = HB[i] + gb.T @ gb
            dA = -lr_t * (ga @ inv_sqrt_psd(HA[i], eps))
            dB = -lr_t * (gb @ inv_sqrt_psd(HB[i], eps))
            new_A.append(A[i] + dA)
            new_B.append(B[i] + dB)
            step_rec.append({"H_A": HA[i].copy(), "H_B": HB[i].copy(), "delta_A": dA, "delta_B": dB})
        A, B = new_A, new_B
        for i in range(n):
            step_rec[i].update(A=A[i].copy(), B=B[i].copy(), Z=A[i] @ B[i].T)
        records.append(step_rec)
    return records
