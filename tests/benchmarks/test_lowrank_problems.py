"""Problem generators and exact references of the convex and regret suites."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks import lowrank_problems as lp

KAPPAS = [1, 10, 100, 1000]


@pytest.mark.parametrize("spacing", ["linear", "log"])
@pytest.mark.parametrize("kappa", KAPPAS)
def test_planted_target_has_the_promised_condition_number(kappa, spacing):
    x, u, _sigma, v = lp.planted_target(40, 30, 5, kappa, lp.generator(3), spacing=spacing)
    s = torch.linalg.svdvals(x)
    assert abs(float(s[0] / s[4]) / kappa - 1) < 1e-8
    assert float(s[5] / s[0]) < 1e-12  # rank exactly r
    assert abs(float(s[0]) - 1) < 1e-12  # σ_max = 1, so GD's paper step 0.5/σ_max is 0.5
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(v.T @ v, torch.eye(5, dtype=torch.float64))


def test_linear_spacing_matches_the_authors_linspace():
    torch.testing.assert_close(lp.singular_values(4, 10), torch.tensor([1.0, 0.7, 0.4, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError):
        lp.singular_values(1, 10)


def test_same_seed_same_problem():
    a = lp.MatrixSensing.generate(12, 12, 2, 10, seed=5)
    b = lp.MatrixSensing.generate(12, 12, 2, 10, seed=5)
    c = lp.MatrixSensing.generate(12, 12, 2, 10, seed=6)
    assert torch.equal(a.ops, b.ops) and torch.equal(a.x_star, b.x_star)
    assert not torch.equal(a.ops, c.ops)


def test_sensing_adjoint_and_gradient():
    prob = lp.MatrixSensing.generate(9, 7, 2, 10, seed=0)
    assert prob.m == 5 * 9 * 2
    g = lp.generator(1)
    x = torch.randn(9, 7, generator=g, dtype=torch.float64)
    v = torch.randn(prob.m, generator=g, dtype=torch.float64)
    # <A(X), v> = <X, A*(v)>
    assert abs(float(prob.measure(x) @ v) - float((x * prob.adjoint(v)).sum())) < 1e-10
    # A(X) componentwise is <A_i, X>
    a3 = prob.ops[3].reshape(9, 7)
    assert abs(float(prob.measure(x)[3]) - float((a3 * x).sum())) < 1e-12
    z = x.clone().requires_grad_(True)
    prob.loss(z).backward()
    torch.testing.assert_close(z.grad, prob.grad(x))
    assert float(prob.loss(prob.x_star)) < 1e-25


def test_completion_gradient_and_sampling_rate():
    prob = lp.MatrixCompletion.generate(200, 200, 3, 10, p=0.2, seed=0)
    assert abs(float(prob.mask.mean()) - 0.2) < 0.01
    x = torch.randn(200, 200, dtype=torch.float64)
    z = x.clone().requires_grad_(True)
    prob.loss(z).backward()
    torch.testing.assert_close(z.grad, prob.grad(x))


@pytest.mark.parametrize(
    "kind, n, r, kw", [("sensing", 40, 4, {}), ("completion", 400, 5, {"p": 0.2})]
)  # default sizes
@pytest.mark.parametrize("kappa", KAPPAS)
def test_spectral_init_is_close_for_the_default_sampling(kind, n, r, kw, kappa):
    prob = lp.make_estimation_problem(kind, n, r, kappa, seed=0, **kw)
    a0, b0 = prob.spectral_init()
    assert a0.shape == (n, r) and b0.shape == (n, r)
    # balanced: A0ᵀA0 = B0ᵀB0 = Σ0
    torch.testing.assert_close(a0.T @ a0, b0.T @ b0)
    # ||X0 - X*||_F / ||X*||_F below 1 (Tong et al.: spectral init lands within a constant of σ_r
    # only with κ-dependent sampling; the relative error is O(1) and < 1 at these sizes)
    assert prob.rel_error(a0 @ b0.T) < 0.9


def test_iterations_to_target_and_extrapolation():
    e = 0.5 ** np.arange(60)
    assert lp.iterations_to_target(e, 1e-10) == math.ceil(math.log(1e10) / math.log(2))
    capped = e[:30]
    est = lp.extrapolate_iterations(capped, 1e-10, window=20)
    assert abs(est - math.log(1e10) / math.log(2)) < 1e-6
    assert lp.extrapolate_iterations(np.ones(100), 1e-10) is None  # plateau


# ------------------------------------------------------------------------------ regret helpers
def test_fit_loglog_slope_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    t = np.logspace(1, 4, 25)
    y = 3.0 * t**-0.5 * (1 + 0.05 * rng.standard_normal((6, t.size)))
    slope, lo, hi = lp.fit_loglog_slope(t, y)
    assert abs(slope + 0.5) < 0.02
    assert lo < -0.5 < hi
    assert hi - lo < 0.04
    assert not (lo < -0.6 < hi) and not (lo < -0.4 < hi)  # a different slope is rejected
    # one series: OLS interval
    s1, lo1, hi1 = lp.fit_loglog_slope(t, y[0])
    assert lo1 < -0.5 < hi1 and abs(s1 + 0.5) < 0.02
    assert not (lo1 < -1.0 < hi1)
    # y = T^-1 exactly: zero-width interval at -1
    s2, lo2, hi2 = lp.fit_loglog_slope(t, 2.0 / t)
    assert abs(s2 + 1) < 1e-12 and hi2 - lo2 < 1e-9


def test_fit_loglog_slope_drops_nonpositive_points():
    t = np.logspace(1, 3, 10)
    y = t**-0.5
    y[0] = -1.0
    slope, _, _ = lp.fit_loglog_slope(t, y)
    assert abs(slope + 0.5) < 1e-12
    with pytest.raises(ValueError):
        lp.fit_loglog_slope(t[:2], y[:2])


def test_linear_comparator_matches_brute_force():
    g = lp.generator(0)
    s = torch.randn(3, 2, generator=g, dtype=torch.float64)
    d_a, d_b, r = 2.0, 0.5, 2
    value, a, b = lp.linear_comparator(s, d_a, d_b, r)
    assert abs(float(value) + d_a * d_b * float(torch.linalg.svdvals(s)[0])) < 1e-12
    # the minimizer is feasible and attains the value
    assert float(lp.frob(a)) <= d_a + 1e-12 and float(lp.frob(b)) <= d_b + 1e-12
    assert abs(float((s * (a @ b.T)).sum()) - float(value)) < 1e-12
    # random search over the (full, rank-2) feasible set never goes below the closed form
    n = 200_000
    aa = torch.randn(n, 3, r, generator=g, dtype=torch.float64)
    bb = torch.randn(n, 2, r, generator=g, dtype=torch.float64)
    aa = aa / lp.frob(aa)[:, None, None] * d_a * torch.rand(n, 1, 1, generator=g, dtype=torch.float64).sqrt()
    bb = bb / lp.frob(bb)[:, None, None] * d_b
    vals = (s * (aa @ bb.mT)).sum((-2, -1))
    assert float(vals.min()) >= float(value) - 1e-12
    # rank-1 points on the sphere boundaries (3 free dims) come within 1 % of it
    a1 = torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
    b1 = torch.randn(n, 2, 1, generator=g, dtype=torch.float64)
    a1, b1 = a1 / lp.frob(a1)[:, None, None] * d_a, b1 / lp.frob(b1)[:, None, None] * d_b
    vals1 = (s * (a1 @ b1.mT)).sum((-2, -1))
    assert float(value) - 1e-12 <= float(vals1.min()) <= float(value) * 0.99


def test_rank_nuclear_projection_is_optimal():
    g = lp.generator(1)
    m = torch.randn(6, 5, generator=g, dtype=torch.float64)
    r, radius = 2, 1.5
    u, s, v = lp.project_rank_nuclear(m, r, radius)
    z = (u * s) @ v.T
    assert float(s.sum()) <= radius + 1e-12 and int((s > 0).sum()) <= r
    best = float((z - m).pow(2).sum())
    # no feasible point is closer: random rank-r factors inside the balls of balanced_factors
    d_a, d_b = 3.0, 0.5  # D_A D_B = radius
    a, b = lp.balanced_factors(u, s, v, d_a, d_b)
    torch.testing.assert_close(a @ b.T, z)
    assert float(lp.frob(a)) <= d_a + 1e-12 and float(lp.frob(b)) <= d_b + 1e-12
    n = 100_000
    aa = lp.project_frobenius_ball(torch.randn(n, 6, r, generator=g, dtype=torch.float64), d_a)
    bb = lp.project_frobenius_ball(torch.randn(n, 5, r, generator=g, dtype=torch.float64), d_b)
    # local perturbations of the optimum stay feasible after projection and are never better
    aa = lp.project_frobenius_ball(a + 0.05 * aa / d_a, d_a)
    bb = lp.project_frobenius_ball(b + 0.05 * bb / d_b, d_b)
    dist = (aa @ bb.mT - m).pow(2).sum((-2, -1))
    assert float(dist.min()) >= best - 1e-12
    # no radius: plain truncated SVD (Eckart–Young)
    u2, s2, v2 = lp.project_rank_nuclear(m, r, None)
    sv = torch.linalg.svdvals(m)
    assert abs(float((((u2 * s2) @ v2.T) - m).pow(2).sum()) - float(sv[r:].pow(2).sum())) < 1e-10


def test_l1_projection():
    v = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(lp.project_l1_nonneg(v, 2.0), torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(lp.project_l1_nonneg(v, 10.0), v)
    torch.testing.assert_close(lp.project_l1_nonneg(v, 3.0), torch.tensor([2.5, 0.5, 0.0], dtype=torch.float64))


def test_quadratic_regret_bookkeeping_matches_direct_sums():
    m, n, r, d_a, d_b = 5, 4, 2, 2.0, 0.5
    zs = torch.randn(m, n, dtype=torch.float64)
    stream = lp.QuadraticStream([0, 1], zs, noise=0.3)
    book = lp.QuadraticRegret(2, m, n, r, d_a, d_b)
    g = lp.generator(2)
    cs, zt = [], []
    for _ in range(7):
        c = stream.next()
        a = torch.randn(2, m, r, generator=g, dtype=torch.float64)
        b = torch.randn(2, n, r, generator=g, dtype=torch.float64)
        gz = a @ b.mT - c
        book.observe(c, a, b, gz @ b, gz.mT @ a, gz)
        cs.append(c)
        zt.append(a @ b.mT)
    c = torch.stack(cs)
    u, s, v = lp.project_rank_nuclear(c.mean(0), r, d_a * d_b)
    zstar = (u * s.unsqueeze(-2)) @ v.mT
    direct = 0.5 * (torch.stack(zt) - c).pow(2).sum((-2, -1)).sum(0) - 0.5 * (zstar - c).pow(2).sum((-2, -1)).sum(0)
    torch.testing.assert_close(book.regret(), direct)


def test_linear_stream_is_scaled_signs_and_repeatable():
    s1 = lp.LinearStream([0, 1], 4, 3, g=2.0, chunk=4)
    s2 = lp.LinearStream([0, 1], 4, 3, g=2.0, chunk=4)
    for _ in range(6):
        g1, g2 = s1.next(), s2.next()
        assert torch.equal(g1, g2)
        torch.testing.assert_close(lp.frob(g1), torch.full((2,), 2.0, dtype=torch.float64))
        assert torch.allclose(g1.abs(), torch.full_like(g1, 2.0 / math.sqrt(12)))


def test_worst_case_first_order_is_the_max_over_the_balls():
    g = lp.generator(4)
    sa = torch.randn(5, 2, generator=g, dtype=torch.float64)
    sb = torch.randn(4, 2, generator=g, dtype=torch.float64)
    gt = torch.tensor(0.3, dtype=torch.float64)
    d_a, d_b = 2.0, 0.5
    worst = float(lp.worst_case_first_order(gt, sa, sb, d_a, d_b))
    # attained at θ⋆ = (−D_A ΣĝA/‖ΣĝA‖, −D_B ΣĝB/‖ΣĝB‖)
    a_star, b_star = -d_a * sa / lp.frob(sa), -d_b * sb / lp.frob(sb)
    assert abs(worst - float(gt - (sa * a_star).sum() - (sb * b_star).sum())) < 1e-12
    # and no feasible θ⋆ gives more
    aa = lp.project_frobenius_ball(torch.randn(20_000, 5, 2, generator=g, dtype=torch.float64), d_a)
    bb = lp.project_frobenius_ball(torch.randn(20_000, 4, 2, generator=g, dtype=torch.float64), d_b)
    vals = gt - (sa * aa).sum((-2, -1)) - (sb * bb).sum((-2, -1))
    assert float(vals.max()) <= worst + 1e-12
