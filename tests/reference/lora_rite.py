"""Float64 NumPy reference of LoRA-RITE (Yen et al., "LoRA Done RITE", ICLR 2025, arXiv:2410.20625).

Transcribes, line by line, Algorithm 1 / Sec. 3.2 of the paper in the orientation ``Z = A B^T``
(``A`` is m x r, ``B`` is n x r, ``dA = dZ B``, ``dB = dZ^T A``), with the practical options of the
library's specification layered on top.  For the A factor (B is symmetric with the roles swapped):

* magnitude / basis split  ``B_t = U_{B,t} R_{B,t}``                        (Sec. 3.2, "polar" split)
* unmagnified gradient      ``gbar_A = dA R_B^+``                           (paper: ``grad_A R_B^{-1}``)
* transport                 ``P_A = U_{B,t}^T U_{B,t-1}``                   (Sec. 3.2, second moment)
* second moment             ``V_A,t = P V_A,t-1 P^T + gbar^T gbar``          (``second_moment="sum"``)
                            or the (bias-corrected) EMA of the same terms    (``second_moment="ema"``)
* escaped mass              ``rho_t = rho_{t-1} + d_lambda(V_{t-1}, P V_{t-1} P^T)``
* preconditioned direction  ``Sbar_A = gbar (V_A,t + rho I)^{-1/2}``  (``eps`` added after the sqrt)
* first moment              ``M_A,t = b1 M_A,t-1 P^T + (1 - b1) Sbar_A``
* update                    ``A_{t+1} = A_t - lr (M_A,t (R_B^+)^T + wd A_t)``

plus update skipping, clipping of the unmagnified gradients by their norm over all param groups
(the authors' code) or over each group, update
capping and a post-step factor balancing, and the library's two safeguards (both inactive on
full-rank, well-conditioned problems): eigenvalues of ``V`` below eigh's resolution
(``r * eps * lam_max``) are floored there, and get no step where the gradient holds at most its
round-off (``sqrt(eps)`` of its norm) in that direction; each factor's relative change ``delta R^+`` has
its singular values clipped at ``relative_step_cap`` (0: the paper's update).  A third library
safeguard changes the factorization, never ``Z``: when ``|A|_F |B|_F / |A B^T|_*`` exceeds
``rebalance`` and every singular value of ``Z`` is resolved, the new pair is multiplied by the
balancing gauge of the old one (``_balancing_gauge``; 0: off).  Everything is plain NumPy,
float64, no torch.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EPS64",
    "basis_and_magnitude",
    "pinv_cutoff",
    "polar_split",
    "qr_canonical",
    "resolve_lr",
    "rms",
    "run_lora_rite",
    "sym",
]

EPS64 = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------------------------
# small helpers (also used by the other reference modules)
# ----------------------------------------------------------------------------------------------
def resolve_lr(lr, t: int) -> float:
    """Learning rate at 0-based step ``t``: ``lr(t)`` if callable, else ``lr``."""
    return float(lr(t)) if callable(lr) else float(lr)


def rms(x: np.ndarray) -> float:
    """Root mean square ``sqrt(mean(x**2))`` (0 for an empty array)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(x * x)))


def sym(x: np.ndarray) -> np.ndarray:
    """Symmetric part ``(x + x^T) / 2``."""
    return 0.5 * (x + x.T)


def pinv_cutoff(x: np.ndarray) -> np.ndarray:
    """Moore-Penrose pseudo-inverse via SVD.

    Singular values ``s <= max(rows, cols) * eps64 * s_max`` are treated as zero, so a zero matrix
    maps to the (transposed-shape) zero matrix.
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols = x.shape
    if x.size == 0:
        return np.zeros((cols, rows))
    w, s, vt = np.linalg.svd(x, full_matrices=False)
    smax = float(s.max()) if s.size else 0.0
    cutoff = max(rows, cols) * EPS64 * smax
    keep = s > cutoff
    s_inv = np.zeros_like(s)
    s_inv[keep] = 1.0 / s[keep]
    return (vt.T * s_inv) @ w.T


def qr_canonical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced QR ``x = U R`` with signs fixed so that ``diag(R) >= 0``.

    Column ``j`` of ``U`` and row ``j`` of ``R`` are negated where ``R_jj < 0`` (zeros untouched).
    """
    x = np.asarray(x, dtype=np.float64)
    u, r = np.linalg.qr(x, mode="reduced")
    d = np.diag(r)
    sign = np.where(d < 0, -1.0, 1.0)
    u = u * sign[None, :]
    r = r * sign[:, None]
    return u, r


def polar_split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar split ``x = U H`` from the thin SVD ``x = W S V^T``: ``U = W V^T``, ``H = V S V^T``."""
    x = np.asarray(x, dtype=np.float64)
    w, s, vt = np.linalg.svd(x, full_matrices=False)
    u = w @ vt
    h = (vt.T * s) @ vt
    return u, h


def basis_and_magnitude(x: np.ndarray, basis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(U, R, R^+)`` for factor ``x = U R`` (``basis`` is ``"qr"`` or ``"polar"``)."""
    if x.shape[0] < x.shape[1]:
        raise ValueError(f"factor with fewer rows than rank: shape {x.shape}")
    if basis == "qr":
        u, r = qr_canonical(x)
    elif basis == "polar":
        u, r = polar_split(x)
    else:
        raise ValueError(f"unknown basis {basis!r}")
    return u, r, pinv_cutoff(r)


def _inv_sqrt_apply(g: np.ndarray, v: np.ndarray, rho: float, eps: float) -> np.ndarray:
    """``g Q diag(1 / (sqrt(max(lam, 0) + rho) + eps)) Q^T`` with ``sym(v) = Q diag(lam) Q^T``.

    Library safeguard: eigenvalues below eigh's backward error ``floor = r * eps64 * lam_max`` are
    raised to ``floor``; a direction ``q_i`` below it that also holds no more than ``sqrt(eps64)``
    of the gradient (``|g q_i| <= sqrt(eps64) |g|_F``) gets the factor 0.
    """
    lam, q = np.linalg.eigh(sym(v))
    floor = v.shape[0] * EPS64 * max(float(lam.max()), 0.0)
    scale = 1.0 / (np.sqrt(np.maximum(lam, floor) + rho) + eps)
    quiet = np.linalg.norm(g @ q, axis=0) <= np.sqrt(EPS64) * np.linalg.norm(g)
    scale[(lam <= floor) & quiet] = 0.0
    return g @ ((q * scale[None, :]) @ q.T)


def _cap_relative_change(delta: np.ndarray, r: np.ndarray, r_pinv: np.ndarray, cap: float) -> np.ndarray:
    """Library safeguard: ``E = delta R^+`` with singular values clipped at ``cap``; ``E' R + delta (I - R^+ R)``."""
    e = delta @ r_pinv
    w, s, vt = np.linalg.svd(e, full_matrices=False)
    clipped = (w * np.minimum(s, cap)[None, :]) @ vt
    return clipped @ r + delta @ (np.eye(r.shape[0]) - r_pinv @ r)


def _escaped_mass(v_prev: np.ndarray, v_transported: np.ndarray) -> float:
    """Paper's ``d_lambda``: ``max_i (lam_i(V_prev) - lam_i(P V_prev P^T))`` clamped at 0 (both sorted ascending)."""
    lam_prev = np.linalg.eigvalsh(sym(v_prev))
    lam_tr = np.linalg.eigvalsh(sym(v_transported))
    return float(max(0.0, float(np.max(lam_prev - lam_tr))))


# ----------------------------------------------------------------------------------------------
# LoRA-RITE
# ----------------------------------------------------------------------------------------------
def _clip(work, groups, clip, scope):
    """Scale the ``gbar_A, gbar_B`` of each group's pairs in ``work`` by ``c / norm`` where ``norm > c``."""
    thresholds = list(clip) if np.ndim(clip) else [float(clip)] * len(groups)
    if len(thresholds) != len(groups):
        raise ValueError("clip_unmagnified_grad: one threshold per group")
    sq = [sum(float(np.sum(work[i]["gbar_A"] ** 2)) + float(np.sum(work[i]["gbar_B"] ** 2)) for i in g) for g in groups]
    for g, c, own in zip(groups, thresholds, sq):
        norm = float(np.sqrt(sum(sq) if scope == "global" else own))
        if c > 0 and norm > c:
            for i in g:
                work[i]["gbar_A"] = work[i]["gbar_A"] * (c / norm)
                work[i]["gbar_B"] = work[i]["gbar_B"] * (c / norm)


def run_lora_rite(
    As,
    Bs,
    grad_fn,
    steps,
    lr,
    betas=(0.9, 0.999),
    eps=1e-6,
    weight_decay=0.0,
    escape=False,
    second_moment="ema",
    bias_correction=True,
    row_normalize=True,
    clip_unmagnified_grad=1.0,
    update_skipping=1.0,
    update_capping=0.0,
    balance=False,
    basis="qr",
    relative_step_cap=1.0,
    rebalance=4.0,
    clip_scope="global",
    groups=None,
):
    """Run ``steps`` LoRA-RITE steps on a group of pairs; return one record (list of per-pair dicts) per step.

    ``groups``: the pairs split into param groups (lists of pair indices; None: one group of all).
    Clipping of the unmagnified gradients: a group's ``gbar`` are scaled by ``c / norm`` when its
    norm exceeds its threshold ``c`` (``clip_unmagnified_grad``, one number or one per group; 0:
    never), where the norm is that of the ``gbar`` of every pair of every group
    (``clip_scope="global"``: the authors' code, which sums over all its param groups, and
    pytorch-optimizer's ``LoRARite``, which compares that one norm with each group's own
    threshold) or of the group's own pairs (``clip_scope="group"``).

    ``grad_fn(As, Bs) -> (gAs, gBs)`` is called exactly once per step at the factors before the step.
    Each per-pair dict holds ``U_A, R_A, U_B, R_B`` (split of the factors used in the step) and
    ``gbar_*`` (after skipping and clipping), ``P_*, S_*, V_*, rho_*, Sbar_*, M_*`` (uncapped),
    ``delta_*`` (the applied update, before balancing), and ``A, B, Z`` after the step (and balancing).
    """
    if second_moment not in ("ema", "sum"):
        raise ValueError(f"unknown second_moment {second_moment!r}")
    if clip_scope not in ("global", "group"):
        raise ValueError(f"unknown clip_scope {clip_scope!r}")
    groups = [list(range(len(As)))] if groups is None else [list(g) for g in groups]
    if sorted(i for g in groups for i in g) != list(range(len(As))):
        raise ValueError("groups must split the pairs: every index exactly once")
    beta1, beta2 = float(betas[0]), float(betas[1])
    A = [np.array(a, dtype=np.float64, copy=True) for a in As]
    B = [np.array(b, dtype=np.float64, copy=True) for b in Bs]
    npairs = len(A)
    if len(B) != npairs:
        raise ValueError("As and Bs must have the same length")

    # per pair, per side state ("A" = state that updates A, driven by B's basis, and vice versa)
    state = []
    for a, b in zip(A, B):
        r = a.shape[1]
        if b.shape[1] != r:
            raise ValueError("A and B must share the rank dimension")
        state.append(
            {
                side: {"V": np.zeros((r, r)), "M": np.zeros((x.shape[0], r)), "rho": 0.0, "U_prev": None}
                for side, x in (("A", a), ("B", b))
            }
        )

    records = []
    for k in range(steps):
        lr_t = resolve_lr(lr, k)
        if bias_correction:
            b1 = beta1 * (1.0 - beta1**k) / (1.0 - beta1 ** (k + 1))
            b2 = beta2 * (1.0 - beta2**k) / (1.0 - beta2 ** (k + 1))
        else:
            b1, b2 = beta1, beta2

        gA, gB = grad_fn([a.copy() for a in A], [b.copy() for b in B])
        gA = [np.asarray(g, dtype=np.float64) for g in gA]
        gB = [np.asarray(g, dtype=np.float64) for g in gB]

        # 1-3: basis/magnitude of both factors (old factors), unmagnified gradients, skipping
        work = []
        for i in range(npairs):
            U_A, R_A, Rp_A = basis_and_magnitude(A[i], basis)
            U_B, R_B, Rp_B = basis_and_magnitude(B[i], basis)
            gbar_A = gA[i] @ Rp_B  # m x r
            gbar_B = gB[i] @ Rp_A  # n x r
            if update_skipping > 0 and rms(gbar_A) > update_skipping:
                gbar_A = np.zeros_like(gbar_A)
            if update_skipping > 0 and rms(gbar_B) > update_skipping:
                gbar_B = np.zeros_like(gbar_B)
            work.append(dict(U_A=U_A, R_A=R_A, Rp_A=Rp_A, U_B=U_B, R_B=R_B, Rp_B=Rp_B, gbar_A=gbar_A, gbar_B=gbar_B))

        # 4: clipping by the norm over all groups (global) or over each group
        _clip(work, groups, clip_unmagnified_grad, clip_scope)

        # 5-14: per-side state update, all from the old factors
        step_rec = []
        new_A, new_B = [], []
        for i in range(npairs):
            w = work[i]
            rec = {"U_A": w["U_A"].copy(), "R_A": w["R_A"].copy(), "U_B": w["U_B"].copy(), "R_B": w["R_B"].copy()}
            deltas = {}
            for side, other, x_old in (("A", "B", A[i]), ("B", "A", B[i])):
                st = state[i][side]
                g = w["gbar_" + side]
                U_o = w["U_" + other]  # basis of the other factor, now
                Rp_o = w["Rp_" + other]  # magnitude pinv of the other factor
                r = g.shape[1]
                # 5: transport
                P = np.zeros((r, r)) if st["U_prev"] is None else U_o.T @ st["U_prev"]
                # 6: increment
                S = g.T @ g
                if row_normalize:
                    S = S / g.shape[0]
                # 7: transported second moment
                V_prev = st["V"]
                Vt = P @ V_prev @ P.T
                # 8: decay
                if second_moment == "ema":
                    V = b2 * Vt + (1.0 - b2) * S
                else:
                    V = Vt + S
                # 9: escaped mass
                if escape:
                    d = _escaped_mass(V_prev, Vt)
                    rho = b2 * (st["rho"] + d) if second_moment == "ema" else st["rho"] + d
                else:
                    rho = 0.0
                # 10: preconditioned direction
                Sbar = _inv_sqrt_apply(g, V, rho, eps)
                # 11: first moment
                M = b1 * (st["M"] @ P.T) + (1.0 - b1) * Sbar
                # 12: update capping (stored state stays uncapped)
                if update_capping > 0:
                    Mc = M / max(1.0, rms(M) / update_capping)
                else:
                    Mc = M
                # 13: magnitude restoration + weight decay
                delta = -lr_t * (Mc @ Rp_o.T)
                if relative_step_cap > 0:  # library safeguard, see _cap_relative_change
                    delta = _cap_relative_change(delta, w["R_" + side], w["Rp_" + side], relative_step_cap)
                delta = delta - lr_t * weight_decay * x_old
                deltas[side] = delta
                # commit state
                st["V"], st["M"], st["rho"], st["U_prev"] = V, M, rho, U_o
                rec.update(
                    {
                        "gbar_" + side: g.copy(),
                        "P_" + side: P,
                        "S_" + side: S,
                        "V_" + side: V.copy(),
                        "rho_" + side: float(rho),
                        "Sbar_" + side: Sbar,
                        "M_" + side: M.copy(),
                        "delta_" + side: delta.copy(),
                    }
                )
            # 14: simultaneous update
            a_new = A[i] + deltas["A"]
            b_new = B[i] + deltas["B"]
            # library safeguard: the balancing gauge of the old pair (Z_{t+1} unchanged)
            gauge = _balancing_gauge(A[i], B[i], rebalance) if rebalance > 0 else None
            if gauge is not None:
                a_new, b_new = a_new @ gauge[0], b_new @ gauge[1]
            # 15: balancing (Z unchanged)
            if balance:
                na, nb = float(np.linalg.norm(a_new)), float(np.linalg.norm(b_new))
                if na > 0 and nb > 0:
                    c = np.sqrt(nb / na)
                    a_new = a_new * c
                    b_new = b_new / c
            new_A.append(a_new)
            new_B.append(b_new)
            step_rec.append(rec)
        A, B = new_A, new_B
        for i in range(npairs):
            step_rec[i]["A"] = A[i].copy()
            step_rec[i]["B"] = B[i].copy()
            step_rec[i]["Z"] = A[i] @ B[i].T
        records.append(step_rec)
    return records


def _balancing_gauge(a: np.ndarray, b: np.ndarray, tau: float):
    """``(T_A, T_B)`` with ``(A T_A)^T (A T_A) = (B T_B)^T (B T_B) = diag(sigma(Z))`` and
    ``T_A T_B^T = I``, or None when the pair is balanced enough or ``Z`` is not resolved.

    Excess from the SVD of the explicit ``Z = A B^T`` (nuclear norm = the sum of its singular
    values); the gauge from ``A = Q_A R_A`` (``R_A`` with a positive diagonal, i.e. the Cholesky
    factor of ``A^T A``) and the SVD ``R_A R_B^T = W S V^T``: ``T_A = R_A^{-1} W S^{1/2}``.
    """
    r = a.shape[1]
    sigma = np.linalg.svd(a @ b.T, compute_uv=False)[:r]
    frob = float(np.linalg.norm(a) * np.linalg.norm(b))
    if sigma.sum() == 0 or frob / sigma.sum() <= tau or sigma[-1] <= r * EPS64 * frob:
        return None
    ra = _positive_r(a)
    rb = _positive_r(b)
    w, s, vt = np.linalg.svd(ra @ rb.T)
    return np.linalg.solve(ra, w * np.sqrt(s)), np.linalg.solve(rb, vt.T * np.sqrt(s))


def _positive_r(x: np.ndarray) -> np.ndarray:
    r = np.linalg.qr(x, mode="r")
    return r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]
