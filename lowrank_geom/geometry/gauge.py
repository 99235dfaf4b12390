"""The gauge action of GL(r) on a LoRA pair, and gauges to test invariance with."""

from __future__ import annotations

from collections.abc import Callable

import torch


def gauge_act(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A G, B G⁻ᵀ)``: the same ``Z = A Bᵀ`` in another factorization. ``G`` is ``(..., r, r)``.

    ``B G⁻ᵀ`` is computed with a linear solve (``G Xᵀ = Bᵀ``), never an explicit inverse.
    """
    return a @ g, torch.linalg.solve(g, b.mT).mT


def scale_gauge(
    s: float, r: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``G = s I_r``: the scalar rescaling ``(s A, B / s)`` of paper §2.1 (scalar scale invariance)."""
    if s == 0:
        raise ValueError("scale_gauge needs s != 0 (G must be invertible)")
    return s * torch.eye(r, dtype=dtype, device=device)


def _random_orthogonal(r: int, generator: torch.Generator | None, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.randn(r, r, generator=generator, dtype=torch.float64, device=device)
    q, rr = torch.linalg.qr(x)
    return (q * torch.diagonal(rr).sign()).to(dtype)


def random_gauge(
    r: int,
    cond: float = 10.0,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random ``G ∈ GL(r)`` with condition number exactly ``cond``: ``G = Q₁ diag(σ) Q₂ᵀ``.

    ``Q₁, Q₂`` are Haar-random orthogonal matrices and ``σ`` is log-spaced from ``cond^{1/2}`` to
    ``cond^{-1/2}``, so ``|det G| ≈ 1`` and the gauge neither grows nor shrinks the pair on average.
    ``cond = 1`` gives a random orthogonal ``G``.
    """
    if cond < 1:
        raise ValueError(f"Invalid condition number: {cond} (must be >= 1)")
    if r < 1:
        raise ValueError(f"Invalid rank: {r}")
    if r == 1 and cond != 1:
        raise ValueError("a 1×1 gauge always has condition number 1")
    q1 = _random_orthogonal(r, generator, torch.float64, device)
    q2 = _random_orthogonal(r, generator, torch.float64, device)
    half = 0.5 * torch.log(torch.tensor(float(cond), dtype=torch.float64))
    sigma = torch.exp(torch.linspace(float(half), float(-half), r, dtype=torch.float64))
    return ((q1 * sigma.to(q1.device)) @ q2.mT).to(dtype)


def norm_balance(
    a: torch.Tensor, b: torch.Tensor, row_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c A, B / c)`` with ``c = (‖B‖_F / ‖A‖_F)^{1/2}``: equal Frobenius norms, same ``Z``.

    Batched over leading dims; a pair with a zero factor is returned unchanged (no inf/NaN).
    ``row_reduce`` sums the per-column squared norms over row shards (identity if None).
    """
    rr = row_reduce or (lambda t: t)
    na = rr(a.square().sum(dim=-2)).sum(dim=-1).sqrt().unsqueeze(-1).unsqueeze(-1)
    nb = rr(b.square().sum(dim=-2)).sum(dim=-1).sqrt().unsqueeze(-1).unsqueeze(-1)
    ok = (na > 0) & (nb > 0)
    c = torch.where(ok, (nb / torch.where(ok, na, 1.0)).sqrt(), 1.0)
    return a * c, b / c


def factorization_excess(ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    """``‖A‖_F ‖B‖_F / ‖A Bᵀ‖_*`` from the Grams ``G_A = AᵀA``, ``G_B = BᵀB``. ``(..., r, r)`` → ``(...,)``.

    ``‖Z‖_* = min ‖A‖_F ‖B‖_F`` over the factorizations of ``Z``, so the excess is ``≥ 1``, with
    equality exactly at the balanced ones (``AᵀA = BᵀB``); ``inf`` where ``Z = 0``. It bounds how
    much the entries of ``A Bᵀ`` cancel: the rounding of a product formed from the factors is
    ``≲ r·u·‖A‖_F‖B‖_F``, the excess times that of the best factorization. The singular values
    of ``Z`` are the roots of the eigenvalues of ``G_A^{1/2} G_B G_A^{1/2}``.
    """
    lam, q = torch.linalg.eigh(ga)
    root = (q * lam.clamp_min(0.0).sqrt().unsqueeze(-2)) @ q.mT
    s2 = torch.linalg.eigvalsh(root @ gb @ root)
    nuclear = s2.clamp_min(0.0).sqrt().sum(dim=-1)
    frob = (_trace(ga).clamp_min(0.0) * _trace(gb).clamp_min(0.0)).sqrt()
    return torch.where(nuclear > 0, frob / torch.where(nuclear > 0, nuclear, 1.0), torch.inf)


def balancing_gauge(ga: torch.Tensor, gb: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T_A, T_B, ok)``: ``T_B = T_A⁻ᵀ`` with ``(A T_A)ᵀ(A T_A) = (B T_B)ᵀ(B T_B) = Σ``, ``σ(Z)``.

    From the Grams (use float64): ``G = RᵀR`` (Cholesky), ``R_A R_Bᵀ = W Σ Vᵀ``,
    ``T_A = R_A⁻¹ W Σ^{1/2}``, ``T_B = R_B⁻¹ V Σ^{1/2}`` (``T_A T_Bᵀ = R_A⁻¹ W Σ Vᵀ R_B⁻ᵀ = I``).
    ``ok`` is False, and both gauges the identity, where a Gram is not positive definite or
    ``σ_min(Z) ≤ rtol · ‖A‖_F‖B‖_F``: there a direction of ``Z`` is not resolved, the balanced
    pair would drop it from *both* factors, and a gradient method could never restart it.
    """
    ra, info_a = torch.linalg.cholesky_ex(ga, upper=True)
    rb, info_b = torch.linalg.cholesky_ex(gb, upper=True)
    w, s, vh = torch.linalg.svd(ra @ rb.mT)
    frob = (_trace(ga).clamp_min(0.0) * _trace(gb).clamp_min(0.0)).sqrt()
    ok = (info_a == 0) & (info_b == 0) & (s[..., -1] > rtol * frob) & torch.isfinite(s).all(dim=-1)
    root = s.clamp_min(torch.finfo(s.dtype).tiny).sqrt().unsqueeze(-2)
    eye = torch.eye(ga.shape[-1], dtype=ga.dtype, device=ga.device)
    keep = ok.unsqueeze(-1).unsqueeze(-1)
    ra, rb = torch.where(keep, ra, eye), torch.where(keep, rb, eye)
    ta = torch.linalg.solve_triangular(ra, torch.where(keep, w * root, eye), upper=True)
    tb = torch.linalg.solve_triangular(rb, torch.where(keep, vh.mT * root, eye), upper=True)
    return ta, tb, ok


def _trace(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1).sum(dim=-1)
