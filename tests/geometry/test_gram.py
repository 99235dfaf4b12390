"""QR-free factor geometry (lowrank_geom/geometry/gramian.py): Grams through row_reduce, R⁻¹ from Cholesky."""

from __future__ import annotations

import torch

from lowrank_geom.geometry import gram, gram_cutoff, gram_pinv, inverse_magnitude, magnitude_pinv, orthonormal_basis
from lowrank_geom.geometry.gramian import FILTER_POWER, FILTER_SHIFT


def test_inverse_magnitude_is_the_inverse_of_qr_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, 5, generator=g, dtype=torch.float64)
    gm = gram(x)
    t = inverse_magnitude(gm, gram_cutoff(gm, torch.float64))
    _, r = orthonormal_basis(x)  # diag(R) ≥ 0: the Cholesky factor's transpose
    torch.testing.assert_close(t, torch.linalg.inv(r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram_pinv(t), torch.linalg.inv(gm), rtol=1e-12, atol=1e-12)


def test_zero_factor_has_zero_inverse_magnitude():
    gm = gram(torch.zeros(2, 7, 3))
    t = inverse_magnitude(gm, gram_cutoff(gm, torch.float32))
    assert torch.equal(t, torch.zeros_like(t))


def test_rank_deficient_factor_gets_the_pseudo_inverse_on_its_range():
    """Rank 2 of 4: ``T Tᵀ`` equals ``G⁺`` up to the filter's O(τ/λ), and ``T`` vanishes on the null space."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 4, generator=g, dtype=torch.float64)
    gm = gram(x[None])
    tau = gram_cutoff(gm, torch.float64)
    t = inverse_magnitude(gm, tau)
    pinv = torch.linalg.pinv(gm, hermitian=True, rtol=1e-10)
    lam_min = torch.linalg.eigvalsh(gm)[0, -2]  # smallest nonzero eigenvalue
    # the filter's relative error on the range is ≈ 2·FILTER_POWER·s/λ with s = FILTER_SHIFT·τ
    bound = 2 * FILTER_POWER * FILTER_SHIFT * tau / lam_min * pinv.abs().max()
    assert torch.allclose(gram_pinv(t), pinv, rtol=0, atol=float(2 * bound))
    null = torch.linalg.eigh(gm)[1][0, :, :2]  # eigenvectors of the two zero eigenvalues
    assert (t[0] @ t[0].mT @ null).abs().max() < 1e-6 * pinv.abs().max()
    # the same factor through the QR route: magnitude_pinv's R⁺R⁺ᵀ is G⁺ too
    _, r = orthonormal_basis(x)
    rp = magnitude_pinv(r, rows=20)
    torch.testing.assert_close(rp @ rp.mT, pinv[0], rtol=1e-6, atol=1e-8)


def test_gram_sums_row_shards_through_row_reduce():
    """Two row shards: each computes its partial Gram, ``row_reduce`` adds the other's (an all-reduce)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 40, 4, generator=g, dtype=torch.float64)
    shards = [(x[:, :25], y[:, :25]), (x[:, 25:], y[:, 25:])]
    partial = [xs.mT @ ys for xs, ys in shards]
    for k, (xs, ys) in enumerate(shards):
        reduced = gram(xs, ys, row_reduce=lambda t, k=k: t + partial[1 - k])
        torch.testing.assert_close(reduced, x.mT @ y, rtol=1e-13, atol=1e-13)


def test_gram_relative_change_cap_is_the_cap_with_the_qr_magnitude():
    """From the Gram and ``R⁻¹`` (ScaledGD's and LoRA-RITE's Gram engine) the cap equals
    :func:`relative_change_cap` with QR's ``R``, ``R⁻¹`` and ``k₀ = I``; every relative change ends
    at most ``cap``, and a direction below the cap is returned bit for bit."""
    from lowrank_geom.geometry import relative_change_cap
    from lowrank_geom.geometry.gramian import gram_relative_change_cap

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 30, 4, generator=g, dtype=torch.float64)
    d = torch.randn(3, 30, 4, generator=g, dtype=torch.float64)
    gm = gram(x)
    t = inverse_magnitude(gm, gram_cutoff(gm, torch.float64))
    _, r = orthonormal_basis(x)
    eye = torch.eye(4, dtype=torch.float64)
    capped = gram_relative_change_cap(d, gm, t, 0.1, 1.0)
    torch.testing.assert_close(
        capped, relative_change_cap(d, eye, torch.linalg.inv(r), r, 0.1, 1.0), rtol=1e-10, atol=1e-12
    )
    assert (torch.linalg.matrix_norm(capped @ t, ord=2) <= 0.1 * (1 + 1e-9)).all()
    small = 1e-3 * d
    assert torch.equal(gram_relative_change_cap(small, gm, t, 10.0, 1.0), small)
