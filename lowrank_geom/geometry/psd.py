"""PSD numerics: symmetrization, safeguarded inverse roots, and the eigenvalue distance ``d_λ``.

All linear algebra runs in ``promote_types(dtype, float32)``: torch has no bf16/fp16 kernels for
``eigh`` on CPU, and half precision is too coarse for an r×r spectrum anyway.
"""

from __future__ import annotations

import torch


class PSDNumericsError(RuntimeError):
    """An eigendecomposition failed even after the float64 retry.

    The message states the dtypes tried, the shape and whether the input was finite; raised
    through :class:`~lowrank_geom.LowRankOptimizer`, it also says what the optimizer checked and
    what to try."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear algebra runs in: ``promote_types(dtype, float32)``."""
    return torch.promote_types(dtype, torch.float32)


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    """``(X + Xᵀ) / 2`` over the last two dims, removing round-off asymmetry before ``eigh``."""
    return (x + x.mT) * 0.5


def eigh_safe(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of the symmetric part in ``promote_types(dtype, float32)``; float64 if LAPACK does not converge."""
    work = symmetrize(v.to(compute_dtype(v.dtype)))
    try:
        return torch.linalg.eigh(work)
    except torch.linalg.LinAlgError:
        pass
    try:
        lam, q = torch.linalg.eigh(work.to(torch.float64))
    except torch.linalg.LinAlgError as err:
        raise PSDNumericsError(_eigh_failure(work)) from err
    return lam.to(work.dtype), q.to(work.dtype)


def damped_inverse(g: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + λI)⁻¹ = V diag(1/(max(μ, 0) + λ)) Vᵀ`` of a PSD ``G`` (``λ > 0``), by :func:`eigh_safe`.

    A Gram formed by a float32 GEMM carries round-off of ``eps₃₂·‖G‖``: where that exceeds a small
    ``λ``, ``G + λI`` is indefinite and its Cholesky fails. Clamping ``G``'s eigenvalues at zero
    keeps the inverse bounded by ``1/λ`` and equal to the exact one otherwise.
    """
    if not damping > 0:
        raise ValueError(f"damped_inverse needs a positive damping, got {damping}")
    mu, v = eigh_safe(g)
    return (v / (mu.clamp_min(0.0) + damping).unsqueeze(-2)) @ v.mT


def _eigh_failure(work: torch.Tensor) -> str:
    """What is known when both attempts failed: dtypes, shape, and (computed: r×r is cheap)
    whether the input was finite. No guess at the cause: callers know more (the optimizer does)."""
    bad = (~torch.isfinite(work)).flatten(-2).any(-1).reshape(-1)
    count, total = int(bad.sum()), bad.numel()
    finite = "no" if count == 0 else "yes" if total == 1 else f"yes ({count} of {total} matrices)"
    dtype = str(work.dtype).removeprefix("torch.")
    tried = f"in {dtype} and again in float64" if work.dtype != torch.float64 else "twice in float64"
    return (
        f"eigh of a symmetric matrix of shape {tuple(work.shape)} failed to converge {tried}; "
        f"the matrix has non-finite (NaN/inf) entries: {finite}"
    )


def inverse_root(
    v: torch.Tensor,
    root: int = 2,
    *,
    shift: torch.Tensor | float = 0.0,
    eps: float = 0.0,
    null_rtol: float = 0.0,
) -> torch.Tensor:
    """``Q diag(1 / ((max(λ, 0) + shift)^{1/root} + eps)) Qᵀ`` for ``V = Q diag(λ) Qᵀ``.

    Shapes: ``v`` is ``(..., r, r)`` symmetric PSD up to round-off; ``shift`` broadcasts against
    ``(...,)`` (LoRA-RITE's escaped mass ρ goes here, inside the root); ``eps`` is added outside
    the root, as in the authors' LoRA-RITE code. Returns a symmetric ``(..., r, r)`` matrix in
    ``promote_types(v.dtype, float32)``.

    Safeguards: eigenvalues are clamped at 0 before the root, so a second moment made slightly
    indefinite by round-off gives a large but finite factor instead of NaN; the eigendecomposition
    is retried in float64 when LAPACK fails to converge. With ``shift = eps = 0`` a zero eigenvalue
    maps to ``inf`` by design (callers pass a positive ``eps``). ``null_rtol``: see
    :func:`inverse_root_eig`.
    """
    lam, q = eigh_safe(v)
    return inverse_root_eig(lam, q, root, shift=shift, eps=eps, null_rtol=null_rtol)


def gradient_resolution(dtype: torch.dtype) -> float:
    """``√eps``: a direction holding at most this fraction of a gradient's norm counts as its round-off.

    Forming ``∇̄ = ∇A R⁻¹`` leaves round-off of about ``c·eps·‖∇̄‖`` in every direction, ``c`` up to
    ``cond(R)``; ``√eps`` covers ``c ≤ 1/√eps`` (8e3 in float32), and what it drops moves ``Z`` by
    less than ``√eps`` of the step.
    """
    return torch.finfo(compute_dtype(dtype)).eps ** 0.5


def eigh_resolution(r: int, dtype: torch.dtype) -> float:
    """``r · eps``: eigenvalues of an r×r PSD matrix at or below this fraction of ``λ_max`` are not resolved.

    ``eigh`` is backward stable: its eigenpairs are exact for ``V + E`` with ``‖E‖ ≈ r·eps·‖V‖``,
    so an eigenvalue below that is indistinguishable from 0 and its eigenvector is arbitrary
    within the unresolved subspace.
    """
    return r * torch.finfo(compute_dtype(dtype)).eps


def inverse_root_eig(
    lam: torch.Tensor,
    q: torch.Tensor,
    root: int = 2,
    *,
    shift: torch.Tensor | float = 0.0,
    eps: float = 0.0,
    null_rtol: float = 0.0,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`inverse_root` from a given eigendecomposition ``V = Q diag(λ) Qᵀ`` (``(..., r)``, ``(..., r, r)``).

    ``null_rtol > 0`` floors the eigenvalues at ``null_rtol · λ_max`` (the resolution of ``eigh``,
    :func:`eigh_resolution`): an eigenvalue below it is only known to lie in ``[0, null_rtol·λ_max]``,
    so it is taken at that bound — an ε relative to the spectrum, inside the root. Round-off
    components of the preconditioned vector in the unresolved null space then get a gain
    ``≤ 1/√(null_rtol·λ_max)`` instead of ``1/eps``, while a small but real direction still gets a
    step (a gain of 0 there would stall it for good). ``drop`` (``(..., r)`` bool): eigen-directions
    that get the gain 0 instead (see :func:`unresolved_directions`).
    """
    if isinstance(shift, torch.Tensor):
        shift = shift.to(lam.dtype).unsqueeze(-1)
    if null_rtol > 0:
        lam = torch.maximum(lam, null_rtol * lam.amax(dim=-1, keepdim=True).clamp_min(0.0))
    inv = 1.0 / ((lam.clamp_min(0.0) + shift).pow(1.0 / root) + eps)
    if drop is not None:
        inv = torch.where(drop, torch.zeros_like(inv), inv)
    return symmetrize((q * inv.unsqueeze(-2)) @ q.mT)


def unresolved_directions(
    lam: torch.Tensor, q: torch.Tensor, increment: torch.Tensor, null_rtol: float, grad_rtol: float
) -> torch.Tensor:
    """Eigen-directions ``q_i`` of ``V`` that neither ``V`` nor the current gradient resolves. ``(..., r)`` bool.

    ``λ_i ≤ null_rtol·λ_max`` (below ``eigh``'s resolution) and ``‖∇̄ q_i‖ ≤ grad_rtol·‖∇̄‖``
    (no more of the gradient than its round-off), read from ``increment = ∇̄ᵀ∇̄`` (any positive
    scaling): ``‖∇̄ q_i‖² = q_iᵀ (∇̄ᵀ∇̄) q_i``. A direction that only round-off ever reached is
    both; a small but real one (an ill-conditioned fit's last singular direction, whose second
    moment is buried under the history of larger gradients) carries the current gradient.
    """
    inc = increment.to(q.dtype)
    energy = ((q.mT @ inc) * q.mT).sum(dim=-1)  # diag(Qᵀ S Q)
    total = torch.diagonal(inc, dim1=-2, dim2=-1).sum(dim=-1, keepdim=True)
    below = lam <= null_rtol * lam.amax(dim=-1, keepdim=True).clamp_min(0.0)
    return below & (energy <= grad_rtol**2 * total)


def eigenvalue_distance(v_old: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """``d_λ(V_old, V_new) = max_i [λ_i(V_old) − λ_i(V_new)]⁺`` with both spectra sorted (paper §3.2).

    The mass a second moment loses when it is transported into a new basis (``V_new = P V Pᵀ``
    with ``‖P‖ ≤ 1``); LoRA-RITE adds it back as ``ρ I``. Shapes ``(..., r, r)`` → ``(...,)``.
    """
    lam_old = torch.linalg.eigvalsh(symmetrize(v_old.to(compute_dtype(v_old.dtype))))
    lam_new = torch.linalg.eigvalsh(symmetrize(v_new.to(compute_dtype(v_new.dtype))))
    return (lam_old - lam_new).amax(dim=-1).clamp_min(0.0)
