"""QR-free factor geometry from r×r Gram matrices: ``G = XᵀX``, ``R⁻¹`` by Cholesky, transports.

A factor ``X = U R`` (``Uᵀ U = I``) enters every invariant optimizer only through its magnitude
``R`` with ``RᵀR = G = XᵀX``: the update of the partner factor does not change when ``R`` is
replaced by ``Q R`` for an orthogonal ``Q`` (the basis absorbs ``Qᵀ``). So ``R`` can be taken from
the Cholesky factor of the Gram — ``R = Lᵀ`` with ``G = L Lᵀ``, equal to Householder QR's ``R``
with ``diag(R) ≥ 0`` in exact arithmetic — and ``U = X R⁻¹`` is never formed. Every sum over the
rows of a factor is one GEMM ``XᵀY`` passed through ``row_reduce`` (identity on one process, an
all-reduce for row-sharded factors), so nothing here reads the full rows of a factor.

Precision: the Grams are formed in the factor's compute dtype ``promote_types(dtype, float32)``
(the m×r GEMMs are the cost) and returned in float64 (:data:`GRAM_DTYPE`); a caller may run the
r×r work in float64 or, cheaper at large r, in the compute dtype (LoRA-RITE does). A Gram squares
the condition number: with float32 factors the
inverse magnitude is accurate to about ``cond(X)² · 1e-7`` (measured in
``tests/geometry/test_gram.py``), against ``cond(X) · 1e-7`` for Householder QR.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_geom.geometry.psd import compute_dtype, eigh_safe, symmetrize

#: dtype of all r×r work (Cholesky, inverses, eigendecompositions of the Gram engine)
GRAM_DTYPE = torch.float64

RowReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def gram(x: torch.Tensor, y: torch.Tensor | None = None, row_reduce: RowReduce = _identity) -> torch.Tensor:
    """``XᵀY`` (``XᵀX`` when ``y`` is None), summed over the rows through ``row_reduce``, in float64. ``(..., r, r)``.

    The GEMM runs in ``promote_types(x.dtype, float32)``; the r×r result is returned in
    :data:`GRAM_DTYPE`.
    """
    work = compute_dtype(x.dtype)
    x = x.to(work)
    out = x.mT @ (x if y is None else y.to(work))
    return row_reduce(out).to(GRAM_DTYPE)


def gram_cutoff(g: torch.Tensor, gram_dtype: torch.dtype) -> torch.Tensor:
    """``τ = r · eps(gram_dtype) · max_i G_ii``: a Gram pivot at or below it counts as zero. ``(...,)``.

    ``matrix_rank``'s cutoff for a Hermitian r×r matrix, relative to the largest diagonal entry
    (within a factor r of ``λ_max``): the rounding of a Gram formed in ``gram_dtype`` is of that
    order, so smaller pivots carry no information.
    """
    r = g.shape[-1]
    return r * torch.finfo(gram_dtype).eps * torch.diagonal(g, dim1=-2, dim2=-1).amax(dim=-1)


#: The filtered pseudo-inverse shifts by this multiple of the cutoff. Eigenvalues at the cutoff
#: (round-off of a rank-deficient Gram) are suppressed by (1/1000)⁸, eigenvalues above 1e5× the
#: cutoff are inverted to 1e-2 relative.
FILTER_SHIFT = 1e3
#: The power of the filter ``(G (G + sI)⁻¹)^FILTER_POWER``, sharp enough to tell round-off from signal.
FILTER_POWER = 4


def inverse_magnitude(g: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``R⁻¹`` for ``RᵀR = G`` (paper §3.2: ``B = U_B R_B``), from the Cholesky factor of the Gram. ``(..., r, r)``.

    Full rank (Cholesky succeeds and every pivot exceeds ``τ``): ``R⁻¹ = L⁻ᵀ`` with ``G = L Lᵀ``,
    the inverse of QR's ``R`` with ``diag(R) ≥ 0``. Otherwise — a zero factor (LoRA's init), a
    rank-deficient or numerically singular one — a filtered pseudo-inverse: with ``s`` =
    :data:`FILTER_SHIFT`·τ, ``G + sI = L_s L_sᵀ`` and ``E = G (G + sI)⁻¹``, ``T = E⁴ L_s⁻ᵀ``. Then
    ``T Tᵀ`` has eigenvalues ``(λ/(λ+s))⁸ / (λ+s)`` and ``Tᵀ G T`` about ``(λ/(λ+s))⁹``: ``T`` acts
    as ``R⁺`` on eigen-directions with ``λ ≫ s`` (relative error ``≈ 8 s/λ``) and vanishes on the
    null space and on round-off eigenvalues ``≲ τ`` (by ``(τ/s)⁸``). A zero factor gives
    ``T = 0``, as ``R⁺ = 0``. Unlike a hard ``matrix_rank`` cutoff this needs no eigendecomposition;
    the two branches are selected per pair with ``torch.where``, no data-dependent branch.
    ``g`` and ``tau`` in :data:`GRAM_DTYPE`.
    """
    r = g.shape[-1]
    eye = torch.eye(r, dtype=g.dtype, device=g.device)
    l, info = torch.linalg.cholesky_ex(g)
    piv = torch.diagonal(l, dim1=-2, dim2=-1)
    ok = (info == 0) & (piv.square().amin(dim=-1) > tau) & torch.isfinite(piv).all(dim=-1)
    l = torch.where(ok[..., None, None], l, eye)
    t_full = torch.linalg.solve_triangular(l, eye.expand_as(g), upper=False).mT  # L⁻ᵀ

    shift = torch.where(tau > 0, FILTER_SHIFT * tau, torch.ones_like(tau))[..., None, None]
    l_s, _ = torch.linalg.cholesky_ex(g + shift * eye)
    l_s_inv = torch.linalg.solve_triangular(l_s, eye.expand_as(g), upper=False)
    e = symmetrize(eye - shift * (l_s_inv.mT @ l_s_inv))  # G (G + sI)⁻¹
    f = e
    for _ in range(FILTER_POWER.bit_length() - 1):  # E⁴ by squaring
        f = symmetrize(f @ f)
    return torch.where(ok[..., None, None], t_full, f @ l_s_inv.mT)


def gram_pinv(t: torch.Tensor) -> torch.Tensor:
    """``G⁺ = R⁻¹ R⁻ᵀ`` from an inverse magnitude ``T = R⁻¹`` (:func:`inverse_magnitude`). ``(..., r, r)``."""
    return symmetrize(t @ t.mT)


def unmagnify(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Tᵀ S T``: an r×r quadratic form in factor coordinates expressed in the basis ``U = X T``.

    ``∇̄ᵀ∇̄ = R⁻ᵀ (∇ᵀ∇) R⁻¹`` and the transported second moment ``R⁻ᵀ (C W Cᵀ) R⁻¹`` are both of
    this form. ``(..., r, r)``.
    """
    return symmetrize(t.mT @ s @ t)


def magnify(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``T V Tᵀ`` (``R⁻¹ V̄ R⁻ᵀ``): a basis-``U`` quadratic form in factor coordinates, basis-free. ``(..., r, r)``."""
    return symmetrize(t @ v @ t.mT)


def _clamped_singular_values(e_gram: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``V D Vᵀ`` with ``EᵀE = V diag(s²) Vᵀ``, ``D = diag(min(1, cap/s))``, and whether any ``s > cap``.

    ``(..., r, r), (...,)``."""
    lam, v = eigh_safe(e_gram)
    d = (cap / lam.clamp_min(0.0).sqrt()).clamp(max=1.0)  # 1 where s ≤ cap (and where s = 0)
    return (v * d.unsqueeze(-2)) @ v.mT, (d < 1).any(dim=-1)


def relative_change_cap(
    m: torch.Tensor,
    k0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    cap: float,
    lr: float | torch.Tensor,
    row_reduce: RowReduce = _identity,
) -> torch.Tensor:
    """The direction ``M k₀`` of a factor ``X = U R`` (step ``lr·M k₀``), relative change capped. ``(..., m, r)``.

    The relative change ``E = lr·M k₀ R⁺`` (the step in the basis ``U``, per unit of the factor's
    own magnitude) gets its singular values clamped at ``cap`` (``E' = E V D Vᵀ`` with
    ``EᵀE = V diag(s²) Vᵀ``, ``D = diag(min(1, cap/s))``), and the direction becomes
    ``E' R / lr + M k₀ (I − R⁺R)``: the second term leaves the step in directions where ``X`` is
    zero (not started) as it is. ``E`` transforms as ``E Qᵀ`` (``Q`` orthogonal) under a gauge
    ``X → X G``, so the cap is GL(r)-invariant; a pair with every ``s ≤ cap`` keeps ``M k₀``
    bit for bit. The factor is given as its magnitude ``r = R`` and ``t = R⁺`` (from a Gram,
    ``R = tᵀ G`` up to an orthogonal factor, which the result does not depend on).

    Numerics: ``E`` can exceed ``cap`` by ``1/eps`` (a factor with a round-off-sized direction),
    so it is never formed unclamped and never subtracted from: the first clamp comes from the
    r×r ``(k₀R⁺)ᵀ MᵀM (k₀R⁺)`` in float64, the second re-measures the m×r ``E'`` it produced
    (whose small directions the first could not resolve). The m×r work runs only in a step
    where some pair is capped (one host sync decides).
    """
    work = torch.float64  # s² can span (1/eps)² · cap²: beyond float32's range
    k0, t, r = k0.to(work), t.to(work), r.to(work)
    lr_w = torch.as_tensor(lr, dtype=work, device=k0.device)
    plain = m @ k0.to(m.dtype)
    k = k0 @ t
    e_gram = lr_w.square() * unmagnify(gram(m, None, row_reduce), k)  # EᵀE
    # max s² ≤ tr(EᵀE): no eigendecomposition in the (usual) steps whose whole E is below the cap
    if not bool((torch.diagonal(e_gram, dim1=-2, dim2=-1).sum(-1) > cap**2).any()):
        return plain
    vdv, capped = _clamped_singular_values(e_gram, cap)
    if not bool(capped.any()):
        return plain
    e = lr_w * (m.to(work) @ (k @ vdv))
    vdv, _ = _clamped_singular_values(gram(e, None, row_reduce), cap)
    eye = torch.eye(k.shape[-1], dtype=work, device=k.device)
    direction = (e @ (vdv @ r)) / lr_w + m.to(work) @ (k0 @ (eye - t @ r))
    return torch.where(capped[..., None, None], direction.to(m.dtype), plain)


def gram_relative_change_cap(
    d: torch.Tensor,
    g: torch.Tensor,
    t: torch.Tensor,
    cap: float,
    lr: float | torch.Tensor,
    row_reduce: RowReduce | None = None,
) -> torch.Tensor:
    """:func:`relative_change_cap` of a direction ``D`` of a factor ``X`` given by its Gram: step ``lr·D``,
    ``G = XᵀX``, ``t = R⁺`` (:func:`inverse_magnitude`), ``k₀ = I``. ``(..., m, r)``.

    ``R = tᵀ G`` (``RᵀR = G`` up to an orthogonal factor, which the cap does not depend on) and
    ``I`` are formed in ``t``'s dtype; ``row_reduce`` None sums over the local rows only.
    """
    eye = torch.eye(g.shape[-1], dtype=t.dtype, device=t.device)
    return relative_change_cap(d, eye, t, t.mT @ g.to(t.dtype), cap, lr, row_reduce or _identity)
