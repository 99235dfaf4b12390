"""Float64 NumPy references of ScaledGD (Riemannian GD) and ScaledAdam for LoRA factors.

Orientation ``Z = A B^T`` (``A`` m x r, ``B`` n x r, ``dA = dZ B``, ``dB = dZ^T A``).

* ScaledGD: Tong, Ma & Chi, "Accelerating Ill-Conditioned Low-Rank Matrix Estimation via Scaled
  Gradient Descent" (JMLR 2021), eq. (ScaledGD) ``A+ = A - lr dA (B^T B)^{-1}``, ``B+ = B - lr dB (A^T A)^{-1}``;
  with the ``delta I`` damping of Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning
  Foundation Models" (ICML 2024), Sec. 3 (scaled GD preconditioner ``(B^T B + delta I)^{-1}``),
  plus coupled weight decay and torch.optim.SGD-style heavy-ball momentum.
* ScaledAdam: Zhang & Pilanci 2024, Alg. "scaled AdamW": Adam's first/second moments computed on the
  scaled gradient ``dA (B^T B + delta I)^{-1}``, bias correction, and AdamW's decoupled weight decay.
* ScaledAdam as the authors' code runs it (``reference=True``): their ``AdamWr`` class
  (pilancilab/Riemannian_Preconditioned_LoRA, ``custom_optimizer.py``), transcribed in PEFT's
  layout, see :func:`run_adamwr`.

For ``delta == 0`` the inverse Gram is the pseudo-inverse ``R^+ R^{+T}`` of ``B^T B = R^T R`` (QR of B,
same singular-value cutoff as the LoRA-RITE reference), so a zero factor yields a zero direction.
"""

from __future__ import annotations

import numpy as np

from .lora_rite import _cap_relative_change, basis_and_magnitude, pinv_cutoff, qr_canonical, resolve_lr

__all__ = ["inv_gram", "run_adamwr", "run_scaled_adam", "run_scaled_gd", "scaled_direction"]


def inv_gram(x: np.ndarray, delta: float) -> np.ndarray:
    """``(x^T x + delta I)^{-1}``; for ``delta == 0`` the pseudo-inverse ``R^+ R^{+T}`` with ``x = U R``."""
    r = x.shape[1]
    if delta == 0:
        _, R = qr_canonical(x)
        Rp = pinv_cutoff(R)
        return Rp @ Rp.T
    return np.linalg.inv(x.T @ x + delta * np.eye(r))


def scaled_direction(g: np.ndarray, other: np.ndarray, delta: float) -> np.ndarray:
    """Scaled gradient ``g (other^T other + delta I)^{-1}`` (pseudo-inverse when ``delta == 0``).

    For ``delta > 0`` this is a linear solve with the (symmetric) damped Gram matrix.
    """
    if delta == 0:
        return g @ inv_gram(other, 0.0)
    gram = other.T @ other + delta * np.eye(other.shape[1])
    return np.linalg.solve(gram, g.T).T


def _init(As, Bs):
    A = [np.array(a, dtype=np.float64, copy=True) for a in As]
    B = [np.array(b, dtype=np.float64, copy=True) for b in Bs]
    if len(A) != len(B):
        raise ValueError("As and Bs must have the same length")
    return A, B


def _grads(grad_fn, A, B):
    gA, gB = grad_fn([a.copy() for a in A], [b.copy() for b in B])
    return [np.asarray(g, dtype=np.float64) for g in gA], [np.asarray(g, dtype=np.float64) for g in gB]


def run_scaled_gd(As, Bs, grad_fn, steps, lr, delta=0.0, momentum=0.0, weight_decay=0.0, relative_step_cap=1.0):
    """ScaledGD with optional damping, coupled weight decay and SGD momentum.

    Per pair and step: ``D_A = dA (B^T B + delta I)^{-1} + wd A`` (old factors), ``buf_A = D_A`` at the
    first step then ``buf_A = momentum buf_A + D_A``; ``A <- A - lr_t buf_A`` (``D_A`` if momentum == 0).
    Library safeguard (``relative_step_cap > 0``): the step ``-lr_t buf_A`` (without momentum:
    ``-lr_t (D_A - wd A)``, the weight decay added after) has the singular values of its relative
    change ``step R_A^+`` clipped at the cap, as LoRA-RITE's (``_cap_relative_change``).
    Record keys: ``D_A, D_B`` (scaled directions incl. weight decay), ``buf_A, buf_B`` (momentum > 0), ``A, B, Z``.
    """
    A, B = _init(As, Bs)
    n = len(A)
    bufs = [None] * n
    records = []
    for k in range(steps):
        lr_t = resolve_lr(lr, k)
        gA, gB = _grads(grad_fn, A, B)
        step_rec = []
        new_A, new_B = [], []
        for i in range(n):
            D_A = scaled_direction(gA[i], B[i], delta)
            D_B = scaled_direction(gB[i], A[i], delta)
            if weight_decay != 0:
                D_A = D_A + weight_decay * A[i]
                D_B = D_B + weight_decay * B[i]
            rec = {"D_A": D_A.copy(), "D_B": D_B.copy()}
            if momentum != 0:
                if bufs[i] is None:
                    bufs[i] = (D_A.copy(), D_B.copy())
                else:
                    bufs[i] = (momentum * bufs[i][0] + D_A, momentum * bufs[i][1] + D_B)
                dirA, dirB = bufs[i]
                rec["buf_A"] = dirA.copy()
                rec["buf_B"] = dirB.copy()
            else:
                dirA, dirB = D_A, D_B
            steps_ab = []
            for direction, x in ((dirA, A[i]), (dirB, B[i])):
                decay = weight_decay * x if momentum == 0 else 0.0  # the driver's uncapped decay
                step = -lr_t * (direction - decay)
                if relative_step_cap > 0:
                    _, r, r_pinv = basis_and_magnitude(x, "qr")
                    step = _cap_relative_change(step, r, r_pinv, relative_step_cap)
                steps_ab.append(step - lr_t * decay)
            new_A.append(A[i] + steps_ab[0])
            new_B.append(B[i] + steps_ab[1])
            step_rec.append(rec)
        A, B = new_A, new_B
        for i in range(n):
            step_rec[i].update(A=A[i].copy(), B=B[i].copy(), Z=A[i] @ B[i].T)
        records.append(step_rec)
    return records


def run_scaled_adam(
    As,
    Bs,
    grad_fn,
    steps,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    delta=0.0,
    weight_decay=0.0,
    bias_correction=True,
    reference=False,
):
    """ScaledAdam: Adam moments over the scaled gradient, AdamW decoupled weight decay.

    ``reference=True``: the authors' ``AdamWr`` instead (:func:`run_adamwr`, same records).
    ``bias_correction=False``: ``mhat = m``, ``vhat = v``.

    ``D_A = dA (B^T B + delta I)^{-1}``; ``m = b1 m + (1-b1) D``; ``v = b2 v + (1-b2) D**2``;
    ``A <- A (1 - lr_t wd) - lr_t mhat / (sqrt(vhat) + eps)`` with ``mhat = m/(1-b1^t)``,
    ``vhat = v/(1-b2^t)``, ``t = k + 1``; all from the old factors.
    Record keys: ``D_A, D_B, m_A, m_B, v_A, v_B, A, B, Z``.
    """
    if reference:
        return run_adamwr(As, Bs, grad_fn, steps, lr, betas, eps, delta, weight_decay, bias_correction)
    beta1, beta2 = float(betas[0]), float(betas[1])
    A, B = _init(As, Bs)
    n = len(A)
    mA = [np.zeros_like(a) for a in A]
    mB = [np.zeros_like(b) for b in B]
    vA = [np.zeros_like(a) for a in A]
    vB = [np.zeros_like(b) for b in B]
    records = []
    for k in range(steps):
        t = k + 1
        lr_t = resolve_lr(lr, k)
        bc1 = 1.0 - beta1**t if bias_correction else 1.0
        bc2 = 1.0 - beta2**t if bias_correction else 1.0
        gA, gB = _grads(grad_fn, A, B)
        step_rec = []
        new_A, new_B = [], []
        for i in range(n):
            D_A = scaled_direction(gA[i], B[i], delta)
            D_B = scaled_direction(gB[i], A[i], delta)
            mA[i] = beta1 * mA[i] + (1.0 - beta1) * D_A
            mB[i] = beta1 * mB[i] + (1.0 - beta1) * D_B
            vA[i] = beta2 * vA[i] + (1.0 - beta2) * D_A**2
            vB[i] = beta2 * vB[i] + (1.0 - beta2) * D_B**2
            stepA = (mA[i] / bc1) / (np.sqrt(vA[i] / bc2) + eps)
            stepB = (mB[i] / bc1) / (np.sqrt(vB[i] / bc2) + eps)
            new_A.append(A[i] * (1.0 - lr_t * weight_decay) - lr_t * stepA)
            new_B.append(B[i] * (1.0 - lr_t * weight_decay) - lr_t * stepB)
            step_rec.append(
                {
                    "D_A": D_A,
                    "D_B": D_B,
                    "m_A": mA[i].copy(),
                    "m_B": mB[i].copy(),
                    "v_A": vA[i].copy(),
                    "v_B": vB[i].copy(),
                }
            )
        A, B = new_A, new_B
        for i in range(n):
            step_rec[i].update(A=A[i].copy(), B=B[i].copy(), Z=A[i] @ B[i].T)
        records.append(step_rec)
    return records


def _adamwr_moments(state, grad_scaled, beta1, beta2):
    state["m"] = beta1 * state["m"] + (1.0 - beta1) * grad_scaled
    state["v"] = beta2 * state["v"] + (1.0 - beta2) * grad_scaled * grad_scaled
    return state["m"], state["v"]


def run_adamwr(As, Bs, grad_fn, steps, lr, betas, eps, reg, weight_decay, correct_bias):
    """The authors' ``AdamWr.step`` (Zhang & Pilanci's code), line by line, on PEFT's parameters.

    PEFT stores ``lora_A`` (r x n, ``= B^T``) and ``lora_B`` (m x r, ``= A``), and their optimizer
    walks the pairs ``(p1, p2) = (lora_A, lora_B)``. Per pair and step ``t`` (from 1)::

        grad1_scaled = inv(lora_B^T lora_B + reg I) @ grad(lora_A)      # with lora_B at step t
        m1, v1 = Adam moments of grad1_scaled
        step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)    if correct_bias else lr
        lora_A <- lora_A - step_size * m1 / (sqrt(v1) + eps);  lora_A <- lora_A (1 - lr wd)
        grad2_scaled = grad(lora_B) @ inv(lora_A lora_A^T + reg I)      # the lora_A just written
        m2, v2 = Adam moments of grad2_scaled
        lora_B <- lora_B - step_size * m2 / (sqrt(v2) + eps);  lora_B <- lora_B (1 - lr wd)

    Both gradients are taken at step ``t``'s factors (one backward per step). Records as
    :func:`run_scaled_adam`'s, in this package's orientation (``D_A`` = ``grad2_scaled``,
    ``m_A`` = ``m2``, ...), with ``A, B, Z`` after the step.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    A, B = _init(As, Bs)
    lora_A = [b.T.copy() for b in B]
    lora_B = [a.copy() for a in A]
    st = [
        {"A": {"m": np.zeros_like(la), "v": np.zeros_like(la)}, "B": {"m": np.zeros_like(lb), "v": np.zeros_like(lb)}}
        for la, lb in zip(lora_A, lora_B)
    ]
    records = []
    for k in range(steps):
        t = k + 1
        lr_t = resolve_lr(lr, k)
        step_size = lr_t * np.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if correct_bias else lr_t
        gA, gB = _grads(grad_fn, [lb.copy() for lb in lora_B], [la.T.copy() for la in lora_A])
        step_rec = []
        for i in range(len(lora_A)):
            r = lora_A[i].shape[0]
            grad1 = gB[i].T  # d/d(lora_A) = (dB)^T
            grad1_scaled = np.linalg.inv(lora_B[i].T @ lora_B[i] + reg * np.eye(r)) @ grad1
            m1, v1 = _adamwr_moments(st[i]["A"], grad1_scaled, beta1, beta2)
            lora_A[i] = lora_A[i] - step_size * m1 / (np.sqrt(v1) + eps)
            lora_A[i] = lora_A[i] * (1.0 - lr_t * weight_decay)
            grad2_scaled = gA[i] @ np.linalg.inv(lora_A[i] @ lora_A[i].T + reg * np.eye(r))
            m2, v2 = _adamwr_moments(st[i]["B"], grad2_scaled, beta1, beta2)
            lora_B[i] = lora_B[i] - step_size * m2 / (np.sqrt(v2) + eps)
            lora_B[i] = lora_B[i] * (1.0 - lr_t * weight_decay)
            a, b = lora_B[i].copy(), lora_A[i].T.copy()
            step_rec.append(
                {
                    "D_A": grad2_scaled,
                    "D_B": grad1_scaled.T,
                    "m_A": m2.copy(),
                    "m_B": m1.T.copy(),
                    "v_A": v2.copy(),
                    "v_B": v1.T.copy(),
                    "A": a,
                    "B": b,
                    "Z": a @ b.T,
                }
            )
        records.append(step_rec)
    return records
