"""ScaledGD: the δ = 0 direction is the Riemannian gradient of the preconditioned metric."""

from __future__ import annotations

import pytest
import torch

from lowrank_geom import FixedRankQuotient, ScaledGD
from lowrank_geom.strategies.scaled_gd import scaled_gradient


@pytest.mark.parametrize("m, n, r", [(8, 6, 2), (12, 5, 5), (30, 20, 4)])
def test_delta_zero_is_the_riemannian_gradient_of_the_preconditioned_metric(m, n, r):
    g = torch.Generator().manual_seed(m * n + r)
    a = torch.randn(m, r, generator=g, dtype=torch.float64)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    dz = torch.randn(m, n, generator=g, dtype=torch.float64)
    ga, gb = dz @ b, dz.T @ a  # Euclidean gradients of <dZ, A Bᵀ>
    manifold = FixedRankQuotient(m, n, r, metric="preconditioned")
    rgrad_a, rgrad_b = manifold.unpack(manifold.egrad2rgrad(manifold.pack(a, b), manifold.pack(ga, gb)))
    # two different routes (QR pseudo-inverse vs the manifold's SVD-based solve) of a
    # well-conditioned r×r system: agreement to 1e-10 is ~1e5 ulps of headroom
    torch.testing.assert_close(scaled_gradient(ga[None], b[None], 0.0)[0], rgrad_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled_gradient(gb[None], a[None], 0.0)[0], rgrad_b, rtol=1e-10, atol=1e-12)


def test_damped_direction_solves_the_damped_system():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    other = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    gram = other.mT @ other + 0.3 * torch.eye(3, dtype=torch.float64)
    expected = torch.linalg.solve(gram, grad.mT).mT  # gram is symmetric
    torch.testing.assert_close(scaled_gradient(grad, other, 0.3), expected, rtol=1e-12, atol=1e-12)


def test_zero_factor_gives_a_zero_direction_for_its_partner():
    grad = torch.ones(1, 4, 2, dtype=torch.float64)
    assert torch.equal(scaled_gradient(grad, torch.zeros(1, 5, 2, dtype=torch.float64), 0.0), torch.zeros(1, 4, 2, dtype=torch.float64))


def test_one_step_is_the_manifold_retraction_of_the_riemannian_gradient():
    """A ScaledGD step equals geoopt-style ``retr(x, -lr · egrad2rgrad(x, ∇))`` on FixedRankQuotient."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 7, generator=g, dtype=torch.float64)
    manifold = FixedRankQuotient(9, 7, 3, metric="preconditioned")
    loss = 0.5 * (a @ b.T - target).pow(2).sum()
    loss.backward()
    x = manifold.pack(a.detach(), b.detach())
    expected = manifold.retr(x, -0.1 * manifold.egrad2rgrad(x, manifold.pack(a.grad, b.grad)))
    ScaledGD([(a, b)], lr=0.1).step()
    torch.testing.assert_close(manifold.pack(a.detach(), b.detach()), expected, rtol=1e-12, atol=1e-12)
