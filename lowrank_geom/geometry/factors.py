"""A factor as orthonormal basis times magnitude (``X = U R``), its pseudo-inverse, and balancing."""

from __future__ import annotations

from typing import Literal

import torch

from lowrank_geom.geometry.psd import compute_dtype, symmetrize

BasisMethod = Literal["qr", "polar"]


def orthonormal_basis(x: torch.Tensor, method: BasisMethod = "qr") -> tuple[torch.Tensor, torch.Tensor]:
    """``X = U R`` with ``Uᵀ U = I_r`` (paper §3.2: ``B = U_B R_B``). ``(..., m, r)`` → ``(..., m, r), (..., r, r)``.

    ``method="qr"``: Householder QR with the canonical sign ``diag(R) ≥ 0``, so the result is
    deterministic and batched equals looped. ``method="polar"``: ``U = W Vᵀ`` and the symmetric PSD
    ``R = V S Vᵀ`` from the thin SVD ``X = W S Vᵀ``.

    Rank-deficient ``X`` (LoRA's default init makes one factor exactly zero): ``U`` is still
    orthonormal (its columns beyond the rank span an arbitrary, deterministic complement) and
    ``R`` is singular — exactly zero for a zero factor. Nothing is inverted here, so no inf/NaN
    appears; invert ``R`` only through :func:`magnitude_pinv`.

    Computed in ``promote_types(x.dtype, float32)``; ``U`` and ``R`` are returned in that dtype.
    """
    if x.shape[-2] < x.shape[-1]:
        raise ValueError(f"orthonormal_basis needs rows >= rank, got a factor of shape {tuple(x.shape)}")
    work = x.to(compute_dtype(x.dtype))
    if method == "qr":
        u, r = torch.linalg.qr(work)
        sign = torch.diagonal(r, dim1=-2, dim2=-1).sign()
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return u * sign.unsqueeze(-2), r * sign.unsqueeze(-1)
    if method == "polar":
        w, s, vh = torch.linalg.svd(work, full_matrices=False)
        return w @ vh, symmetrize((vh.mT * s.unsqueeze(-2)) @ vh)
    raise ValueError(f"Invalid basis method: {method!r} (expected 'qr' or 'polar')")


def magnitude_pinv(r: torch.Tensor, rtol: float | None = None, *, rows: int | None = None) -> torch.Tensor:
    """``R⁺``, the pseudo-inverse of a magnitude, with a ``matrix_rank``-style cutoff. ``(..., r, r)``.

    Singular values ``≤ rtol · σ_max`` count as zero. By default ``rtol = max(rows, r) · eps(dtype)``:
    pass ``rows = m``, the row count of the factor ``X = U R`` that ``R`` came from, to get the
    cutoff ``torch.linalg.matrix_rank(X)`` uses. ``R`` inherits ``X``'s round-off (Householder
    QR's backward error grows with ``m``), so the smaller default ``r · eps`` (``rows=None``) can
    miss the round-off singular values of a rank-deficient tall factor and return a huge ``R⁺``.
    A zero factor's magnitude maps to ``R⁺ = 0``, so its unmagnified gradient ``∇ R⁺`` is zero
    instead of inf/NaN.
    """
    work = r.to(compute_dtype(r.dtype))
    if rtol is None:
        rtol = max(rows or 0, r.shape[-1]) * torch.finfo(work.dtype).eps
    return torch.linalg.pinv(work, rtol=rtol)


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced factorization of the same ``Z = A Bᵀ``: ``(A', B')`` with ``A'ᵀA' = B'ᵀB' = Σ``.

    From the thin factors only, never forming the m×n ``Z``: with ``A = Q_A R_A``, ``B = Q_B R_B``
    and the r×r SVD ``R_A R_Bᵀ = W Σ Vᵀ``, ``A' = Q_A W Σ^{1/2}`` and ``B' = Q_B V Σ^{1/2}``.
    Shapes ``(..., m, r), (..., n, r)``; returned in ``promote_types(dtype, float32)``.
    """
    qa, ra = orthonormal_basis(a)
    qb, rb = orthonormal_basis(b)
    w, s, vh = torch.linalg.svd(ra @ rb.mT)
    root = s.sqrt().unsqueeze(-2)
    return qa @ (w * root), qb @ (vh.mT * root)
