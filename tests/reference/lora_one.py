"""Float64 NumPy reference of LoRA-One (Zhang, Liu & Chen, "LoRA-One: One-Step Full Gradient Could
Suffice for Fine-Tuning Large Language Models, Provably and Efficiently", ICML 2025, PMLR 267,
arXiv:2502.01235).

Transcription, checked against the ICML text: :func:`spectral_init` line by line against
Algorithm 1 ("LoRA-One for one specific layer", lines 1-5; lines 7-9 train with AdamW), and
:func:`run_lora_one` against the preconditioned gradient descent of Eq. (9) (Section 4),
``A_{t+1} = A_t - eta grad_A L(A_t, B_t) (B_t B_t^T)^{-1}``,
``B_{t+1} = B_t - eta (A_t^T A_t)^{-1} grad_B L(A_t, B_t)``, with ``A`` (d x r), ``B`` (r x k) of
``W + A B`` (Eq. (3)), one step size, both factors from the same iterate; the paper inverts
without damping (it proves both factors stay non-singular). The damping ``lam`` is the authors'
(``prec_reg``; ``1e-3`` in their linear-model notebook); ``lam = 0`` is Eq. (9) as printed.

* :func:`spectral_init`: Algorithm 1's initialization from the full gradient ``G = dL/dW``
  (``out x in``) of the frozen weight: ``U S V^T = SVD(-G)`` (line 2), ``S <- S / S[0,0]`` (line 3),
  ``B_peft = U_r S_r^{1/2} / sqrt(gamma)`` (``out x r``, line 4),
  ``A_peft = S_r^{1/2} V_r^T / sqrt(gamma)`` (``r x in``, line 5), where ``gamma`` is the
  algorithm's scaling parameter ``s`` (it writes ``sqrt(1/s)``); the adapted weight
  ``W + s_peft B_peft A_peft = W - (s_peft / (gamma S_1)) [G]_r`` is one rank-r gradient step.
  ``normalize=False`` skips line 3 (the plain step ``W - (s_peft / gamma) [G]_r``).
* :func:`run_lora_one`: Eq. (9) with damping, written in the paper's orientation ``W + A_p B_p``
  (``A_p`` with ``W``'s rows, ``B_p`` with its columns):
  ``A_p <- A_p - lr dA_p (B_p B_p^T + lam I)^{-1}``, ``B_p <- B_p - lr (A_p^T A_p + lam I)^{-1} dB_p``,
  both from the old factors; plus coupled weight decay and the library's relative step cap
  (neither in the paper; ``weight_decay=0, relative_step_cap=0`` leave Eq. (9)).
* :func:`run_lora_one_authors`: the optimizer the authors released (``AdamWr`` in their
  ``prec_logTrainer.py``), transcribed loop by loop with PEFT's ``lora_A`` (r x in) and ``lora_B``
  (out x r): ``lora_A`` first, Adam moments of the preconditioned gradient without bias correction,
  decay after the step, then ``lora_B`` preconditioned by the *updated* ``lora_A``.

The problems hand over ``A`` (m x r) and ``B`` (n x r) of ``Z = A B^T``; here ``A_p = lora_B = A`` and
``B_p = lora_A = B^T``, converted at the boundary. Plain NumPy, no torch.
"""

from __future__ import annotations

import numpy as np

from .lora_rite import _cap_relative_change, basis_and_magnitude, resolve_lr

__all__ = ["run_lora_one", "run_lora_one_authors", "spectral_init"]


def spectral_init(grad_w: np.ndarray, r: int, gamma: float, normalize: bool = True):
    """``(lora_A, lora_B)`` = ``(B_0, A_0)`` of Algorithm 1, lines 2-5, with its ``s = gamma``."""
    u, s, vt = np.linalg.svd(-np.asarray(grad_w, dtype=np.float64), full_matrices=False)  # line 2
    if normalize:
        s = s / s[0]  # line 3: S <- S / S[0,0]
    gamma_alg = 1.0 / gamma  # line 3: gamma <- 1/s
    root = np.sqrt(s[:r])
    lora_b = np.sqrt(gamma_alg) * u[:, :r] * root[None, :]  # line 4: A_0 (out x r)
    lora_a = np.sqrt(gamma_alg) * root[:, None] * vt[:r, :]  # line 5: B_0 (r x in)
    return lora_a, lora_b


def _cap(step: np.ndarray, x: np.ndarray, cap: float) -> np.ndarray:
    if cap == 0:
        return step
    _, r, r_pinv = basis_and_magnitude(x, "qr")
    return _cap_relative_change(step, r, r_pinv, cap)


def run_lora_one(As, Bs, grad_fn, steps, lr, damping=1e-6, weight_decay=0.0, relative_step_cap=1.0):
    """Eq. (9) with damping ``lam``; records ``A, B, Z`` per pair and step (package orientation)."""
    A = [np.array(a, dtype=np.float64) for a in As]
    B = [np.array(b, dtype=np.float64) for b in Bs]
    records = []
    for k in range(steps):
        lr_t = resolve_lr(lr, k)
        gA, gB = grad_fn([a.copy() for a in A], [b.copy() for b in B])
        rec = []
        for i in range(len(A)):
            a_p, b_p = A[i], B[i].T  # the paper's A (rows of W x r) and B (r x columns of W)
            g_ap, g_bp = np.asarray(gA[i]), np.asarray(gB[i]).T
            r = a_p.shape[1]
            # Eq. (9): dA_p (B_p B_p^T + lam I)^{-1} and (A_p^T A_p + lam I)^{-1} dB_p, as linear solves
            d_ap = np.linalg.solve(b_p @ b_p.T + damping * np.eye(r), g_ap.T).T
            d_bp = np.linalg.solve(a_p.T @ a_p + damping * np.eye(r), g_bp)
            new_a = a_p + _cap(-lr_t * d_ap, a_p, relative_step_cap) - lr_t * weight_decay * a_p
            new_bt = b_p.T + _cap(-lr_t * d_bp.T, b_p.T, relative_step_cap) - lr_t * weight_decay * b_p.T
            rec.append((new_a, new_bt))
        A, B = [x for x, _ in rec], [y for _, y in rec]
        records.append([{"A": a.copy(), "B": b.copy(), "Z": a @ b.T} for a, b in zip(A, B)])
    return records


def _adamwr_param(p, g, precond_inv, left, state, lr, betas, eps, wd, cap, x_pkg):
    """One parameter of ``AdamWr.step``: precondition, moments, ``p - lr m/(sqrt(v)+eps)``, decay."""
    scaled = precond_inv @ g if left else g @ precond_inv
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * scaled
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * scaled**2
    step = -lr * state["m"] / (np.sqrt(state["v"]) + eps)
    # the library cap acts on the factor in the package orientation (lora_A is B^T)
    step = _cap(step.T, x_pkg, cap).T if left else _cap(step, x_pkg, cap)
    return (p + step) * (1 - lr * wd)


def run_lora_one_authors(
    As,
    Bs,
    grad_fn,
    steps,
    lr,
    damping=1e-6,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    relative_step_cap=1.0,
    reference=True,
):
    """The released ``AdamWr``; records ``A, B, Z`` and the moments ``m_A, v_A, m_B, v_B`` (package orientation)."""
    # ``reference`` is the package's switch that selects this optimizer; this runner is always it
    if reference is not True:
        raise ValueError(f"run_lora_one_authors transcribes reference=True only, got reference={reference!r}")
    lora_a = [np.array(b, dtype=np.float64).T for b in Bs]  # r x in
    lora_b = [np.array(a, dtype=np.float64) for a in As]  # out x r
    st_a = [{"m": np.zeros_like(x), "v": np.zeros_like(x)} for x in lora_a]
    st_b = [{"m": np.zeros_like(x), "v": np.zeros_like(x)} for x in lora_b]
    records = []
    for k in range(steps):
        lr_t = resolve_lr(lr, k)
        gA, gB = grad_fn([x.copy() for x in lora_b], [x.T.copy() for x in lora_a])
        for i in range(len(lora_a)):
            r = lora_a[i].shape[0]
            c = lora_b[i]
            c_inv = np.linalg.inv(c.T @ c + damping * np.eye(r))
            args = (lr_t, betas, eps, weight_decay, relative_step_cap)
            lora_a[i] = _adamwr_param(lora_a[i], np.asarray(gB[i]).T, c_inv, True, st_a[i], *args, lora_a[i].T)
            c1 = lora_a[i]  # already updated: lora_B is preconditioned by the new lora_A
            c1_inv = np.linalg.inv(c1 @ c1.T + damping * np.eye(r))
            lora_b[i] = _adamwr_param(lora_b[i], np.asarray(gA[i]), c1_inv, False, st_b[i], *args, lora_b[i])
        records.append(
            [
                {
                    "A": b.copy(),
                    "B": a.T.copy(),
                    "Z": b @ a,
                    "m_A": sb["m"].copy(),
                    "v_A": sb["v"].copy(),
                    "m_B": sa["m"].T.copy(),
                    "v_B": sa["v"].T.copy(),
                }
                for a, b, sa, sb in zip(lora_a, lora_b, st_a, st_b)
            ]
        )
    return records
