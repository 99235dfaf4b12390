"""FixedRankQuotient: the quotient geometry of LoRA pairs as a geoopt manifold.

float64 checks the equations to round-off; float32 checks robustness with looser tolerances.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_geom.geometry.gauge import gauge_act, random_gauge
from lowrank_geom.geometry.manifold import FixedRankQuotient, RankDeficientError

METRICS = ["euclidean", "preconditioned"]
DTYPES = [torch.float64, torch.float32]
# (m, n, r): generic, rank 1, r = min(m, n) with m < n, square factors, tall
SHAPES = [(5, 4, 2), (7, 3, 1), (4, 6, 4), (3, 3, 3), (12, 9, 3)]
BATCHES = [(), (3,), (2, 2)]
SEEDS = [0, 1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny (r ≤ 4): intra-op threads only add OpenMP overhead, which turns
    into seconds per test when other processes compete for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 5e-4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(metric, dtype, shape, seed, batch=()):
    m, n, r = shape
    man = FixedRankQuotient(m, n, r, metric)
    g = _gen(seed)
    x = man.random(*batch, m + n, r, generator=g, dtype=torch.float64)
    # keep random points moderately conditioned so float32 tolerances stay meaningful
    a, b = man.unpack(x)
    x = man.pack(a + 0.5 * _eye(m, r), b + 0.5 * _eye(n, r)).to(dtype)
    u = torch.randn(*batch, m + n, r, generator=g, dtype=torch.float64).to(dtype)
    return man, x, u, g


def _eye(rows, r):
    return torch.eye(rows, r, dtype=torch.float64)


def _vertical(man, x, omega):
    a, b = man.unpack(x)
    return man.pack(a @ omega, -b @ omega.mT)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- construction, packing


def test_constructor_validates_and_repr():
    man = FixedRankQuotient(5, 4, 2, "preconditioned")
    assert man.name == "FixedRankQuotient"
    assert man.ndim == 2
    assert repr(man) == "FixedRankQuotient(m=5, n=4, r=2, metric='preconditioned') manifold"
    assert FixedRankQuotient(5, 4, 2).metric == "euclidean"
    with pytest.raises(ValueError, match="Invalid rank"):
        FixedRankQuotient(5, 4, 5)
    with pytest.raises(ValueError, match="Invalid m"):
        FixedRankQuotient(0, 4, 1)
    with pytest.raises(ValueError, match="Invalid r"):
        FixedRankQuotient(5, 4, 2.0)
    with pytest.raises(ValueError, match="Invalid metric"):
        FixedRankQuotient(5, 4, 2, "canonical")


def test_pack_unpack_roundtrip_and_broadcast():
    man = FixedRankQuotient(5, 4, 2)
    a = torch.randn(3, 5, 2)
    b = torch.randn(4, 2)
    x = man.pack(a, b)
    assert x.shape == (3, 9, 2)
    a2, b2 = man.unpack(x)
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
    torch.testing.assert_close(b2, b.expand(3, 4, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="A must have shape"):
        man.pack(torch.randn(4, 2), b)
    with pytest.raises(ValueError, match="B must have shape"):
        man.pack(a, torch.randn(4, 3))
    with pytest.raises(ValueError, match="m\\+n, r"):
        man.unpack(torch.randn(8, 2))


# ---------------------------------------------------------------- horizontal projection


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_proju_projector_properties(metric, dtype, shape, seed, batch):
    """Idempotent, metric-orthogonal to vertical vectors, zero on them, and self-adjoint."""
    man, x, u, g = _setup(metric, dtype, shape, seed, batch)
    tol = _tol(dtype)
    r = shape[2]
    p = man.proju(x, u)
    assert p.dtype == dtype and p.shape == u.shape
    assert _rel(man.proju(x, p) - p, p) < tol

    omega = torch.randn(*batch, r, r, generator=g, dtype=torch.float64).to(dtype)
    vert = _vertical(man, x, omega)
    cos = man.inner(x, p, vert) / (man.norm(x, p) * man.norm(x, vert))
    assert float(cos.abs().max()) < tol
    assert _rel(man.proju(x, vert), vert) < tol

    v = torch.randn(u.shape, generator=g, dtype=torch.float64).to(dtype)
    lhs = man.inner(x, p, v)
    rhs = man.inner(x, u, man.proju(x, v))
    scale = man.norm(x, u) * man.norm(x, v)
    assert float(((lhs - rhs) / scale).abs().max()) < tol
    assert man.check_vector_on_tangent(x, p, atol=0, rtol=10 * tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_proju_satisfies_the_horizontal_equations(shape, seed):
    """Euclidean: Aᵀξ_A = ξ_BᵀB. Preconditioned: Aᵀξ_A (BᵀB) = (AᵀA) ξ_BᵀB."""
    for metric in METRICS:
        man, x, u, _ = _setup(metric, torch.float64, shape, seed)
        a, b = man.unpack(x)
        pa, pb = man.unpack(man.proju(x, u))
        if metric == "euclidean":
            lhs, rhs = a.mT @ pa, pb.mT @ b
        else:
            lhs, rhs = a.mT @ pa @ (b.mT @ b), (a.mT @ a) @ pb.mT @ b
        assert _rel(lhs - rhs, lhs) < 1e-10
        # the removed part is vertical: u − proju(u) = (AΩ, −BΩᵀ) with Ω = A⁺ (u_A − p_A)
        da, db = man.unpack(u - man.proju(x, u))
        omega = torch.linalg.lstsq(a, da).solution
        assert _rel(a @ omega - da, da) < 1e-9
        assert _rel(-b @ omega.mT - db, db) < 1e-9


def _reference_proju(man, x, u):
    """Independent float64 projection: solve the r²×r² Gram system of the vertical basis."""
    r = man.r
    basis = torch.eye(r * r, dtype=torch.float64).reshape(r * r, r, r)
    verts = _vertical(man, x, basis)  # (r², m+n, r)
    gram = man.inner(x, verts.unsqueeze(1), verts.unsqueeze(0))  # (r², r²)
    rhs = man.inner(x, u, verts)  # (r²,)
    coef = torch.linalg.solve(gram, rhs)
    return u - (coef[:, None, None] * verts).sum(0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_proju_matches_generic_gram_solve(metric, shape):
    man, x, u, _ = _setup(metric, torch.float64, shape, seed=3)
    assert _rel(man.proju(x, u) - _reference_proju(man, x, u), u) < 1e-9


@pytest.mark.parametrize("shape", [(5, 4, 2), (7, 3, 1), (4, 6, 4), (3, 3, 3)])
@pytest.mark.parametrize("metric", METRICS)
def test_horizontal_space_has_quotient_dimension(metric, shape):
    """rank(proju) = dim of the rank-r m×n matrices = (m + n − r) r."""
    m, n, r = shape
    man, x, _, _ = _setup(metric, torch.float64, shape, seed=0)
    dim = (m + n) * r
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, m + n, r)
    mat = man.proju(x, basis).reshape(dim, dim)
    assert int(torch.linalg.matrix_rank(mat, rtol=1e-8)) == (m + n - r) * r


@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    metric=st.sampled_from(METRICS),
)
def test_proju_property_random_shapes(m, n, r, seed, metric):
    r = min(r, m, n)
    man, x, u, _ = _setup(metric, torch.float64, (m, n, r), seed)
    p = man.proju(x, u)
    assert _rel(man.proju(x, p) - p, p) < 1e-9
    assert _rel(p - _reference_proju(man, x, u), u) < 1e-8


# ---------------------------------------------------------------- metric


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_inner_formula_keepdim_and_symmetry(metric, dtype):
    man, x, u, g = _setup(metric, dtype, (5, 4, 2), seed=0, batch=(3,))
    v = torch.randn(u.shape, generator=g, dtype=torch.float64).to(dtype)
    a, b = man.unpack(x)
    ua, ub = man.unpack(u)
    va, vb = man.unpack(v)
    if metric == "euclidean":
        expected = (ua * va).sum((-2, -1)) + (ub * vb).sum((-2, -1))
    else:
        tr = lambda t: torch.diagonal(t, dim1=-2, dim2=-1).sum(-1)
        expected = tr(b.mT @ b @ ua.mT @ va) + tr(a.mT @ a @ ub.mT @ vb)
    got = man.inner(x, u, v)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=_tol(dtype), atol=0)
    torch.testing.assert_close(man.inner(x, v, u), got, rtol=_tol(dtype), atol=0)
    assert man.inner(x, u, v, keepdim=True).shape == (3, 1, 1)
    torch.testing.assert_close(man.inner(x, u), man.inner(x, u, u), rtol=0, atol=0)
    assert bool((man.inner(x, u) > 0).all())
    # broadcasting: one point, a batch of vectors
    assert man.inner(x[0], u, v).shape == (3,)


@pytest.mark.parametrize("metric", METRICS)
def test_inner_broadcasts_the_batch_of_x_and_checks_shapes(metric):
    """Both metrics: the batch dims of x count (one value per point, as in geoopt.Euclidean,
    though the euclidean value does not depend on x), and a wrong shape is a ValueError."""
    man, x, u, _ = _setup(metric, torch.float64, (5, 4, 2), seed=2, batch=(4,))
    one = u[0]  # a single vector at each of the 4 points
    got = man.inner(x, one)
    assert got.shape == (4,)
    assert man.inner(x, one, keepdim=True).shape == (4, 1, 1)
    assert man.component_inner(x, one).shape == (4, 1, 1)  # geoopt's RiemannianAdam uses this
    assert man.norm(x, one).shape == (4,)
    looped = torch.stack([man.inner(x[i], one) for i in range(4)])
    # float64, one batched call vs a loop: only the summation order may differ (~1e-16 each)
    torch.testing.assert_close(got, looped, rtol=1e-12, atol=0)
    # x, u and v broadcast together: (4, 1) with (3,) gives (4, 3)
    assert man.inner(x.unsqueeze(1), u[:3]).shape == (4, 3)
    assert man.inner(x[0], u[:3], one).shape == (3,)
    bad_rows = torch.randn(4, 8, 2, dtype=torch.float64)
    bad_rank = torch.randn(9, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`x` should have shape \(\.\.\., m\+n, r\)"):
        man.inner(bad_rows, one)
    with pytest.raises(ValueError, match="`x` should have shape"):
        man.inner(bad_rank, one)
    with pytest.raises(ValueError, match="requires more than 2 dim"):
        man.inner(torch.randn(9, dtype=torch.float64), one)
    with pytest.raises(ValueError, match="`u` should have shape"):
        man.inner(x, bad_rank)
    with pytest.raises(ValueError, match="`v` should have shape"):
        man.inner(x, one, bad_rank)
    with pytest.raises(ValueError, match="do not broadcast"):
        man.inner(x, u[:3])


def test_preconditioned_metric_is_gauge_invariant_and_euclidean_is_not():
    """g_{xG}(ξG, ηG) = g_x(ξ, η) with (A, B)·G = (AG, BG⁻ᵀ): for all G (preconditioned), for
    orthogonal G only (Euclidean)."""
    g = _gen(7)
    for metric, cond, invariant in [
        ("preconditioned", 30.0, True),
        ("euclidean", 1.0, True),
        ("euclidean", 30.0, False),
    ]:
        man, x, u, _ = _setup(metric, torch.float64, (6, 5, 3), seed=1)
        v = torch.randn(u.shape, generator=g, dtype=torch.float64)
        G = random_gauge(3, cond, g)
        push = lambda t, man=man, G=G: man.pack(*gauge_act(*man.unpack(t), G))
        # tangent vectors push forward like points: (ξ_A G, ξ_B G⁻ᵀ)
        before = man.inner(x, u, v)
        after = man.inner(push(x), push(u), push(v))
        assert (abs(float(after - before)) < 1e-9 * abs(float(before))) == invariant
        if invariant:  # proju is equivariant when the metric is invariant
            lhs = man.proju(push(x), push(u))
            assert _rel(lhs - push(man.proju(x, u)), lhs) < 1e-9


# ---------------------------------------------------------------- gradients


def _loss(man, x, target):
    a, b = man.unpack(x)
    z = a @ b.mT
    return 0.5 * ((z - target) ** 2).sum() + 0.1 * torch.sin(z).sum()


def _egrad(man, x, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(man, x, target), x)
    return grad


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_preconditioned_rgrad_is_scaled_gd(dtype, shape, seed):
    man, x, _, g = _setup("preconditioned", dtype, shape, seed)
    m, n, _ = shape
    target = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    egrad = _egrad(man, x, target)
    a, b = man.unpack(x.double())
    ga, gb = man.unpack(egrad.double())
    expected = man.pack(torch.linalg.solve(b.mT @ b, ga.mT).mT, torch.linalg.solve(a.mT @ a, gb.mT).mT)
    got = man.egrad2rgrad(x, egrad)
    assert got.dtype == dtype
    assert _rel(got.double() - expected, expected) < _tol(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_euclidean_rgrad_of_a_function_of_z_is_the_egrad(shape):
    """(∇f B, ∇fᵀ A) already satisfies Aᵀξ_A = ξ_BᵀB, so the projection is a no-op."""
    man, x, _, g = _setup("euclidean", torch.float64, shape, seed=0)
    target = torch.randn(shape[0], shape[1], generator=g, dtype=torch.float64)
    egrad = _egrad(man, x, target)
    assert _rel(man.egrad2rgrad(x, egrad) - egrad, egrad) < 1e-10


@pytest.mark.parametrize("batch", [(), (4,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_rgrad_represents_the_egrad_on_horizontal_vectors(metric, dtype, batch):
    """inner(x, egrad2rgrad(x, e), v) = ⟨e, v⟩ for horizontal v, even for a non-invariant e;
    the result is horizontal."""
    man, x, e, g = _setup(metric, dtype, (6, 5, 2), seed=2, batch=batch)
    v = man.proju(x, torch.randn(e.shape, generator=g, dtype=torch.float64).to(dtype))
    rgrad = man.egrad2rgrad(x, e)
    lhs = man.inner(x, rgrad, v)
    rhs = (e * v).sum((-2, -1))
    scale = e.norm(dim=(-2, -1)) * v.norm(dim=(-2, -1))
    assert float(((lhs - rhs) / scale).abs().max()) < 10 * _tol(dtype)
    assert _rel(man.proju(x, rgrad) - rgrad, rgrad) < _tol(dtype)


def test_preconditioned_rgrad_is_gauge_equivariant():
    """ScaledGD invariance: rgrad at (AG, BG⁻ᵀ) is the pushed-forward rgrad at (A, B)."""
    man, x, _, g = _setup("preconditioned", torch.float64, (8, 6, 3), seed=4)
    target = torch.randn(8, 6, generator=g, dtype=torch.float64)
    G = random_gauge(3, 50.0, g)
    push = lambda t: man.pack(*gauge_act(*man.unpack(t), G))
    xg = push(x)
    lhs = man.egrad2rgrad(xg, _egrad(man, xg, target))
    rhs = push(man.egrad2rgrad(x, _egrad(man, x, target)))
    assert _rel(lhs - rhs, rhs) < 1e-9


def _taylor_slope(man, x, v, direction_fn, target):
    f0 = _loss(man, x, target)
    slope_term = man.inner(x, direction_fn(), v)
    ts = torch.logspace(-5, -1, 9, dtype=torch.float64)
    errs = torch.stack([(_loss(man, man.retr(x, t * v), target) - f0 - t * slope_term).abs() for t in ts])
    lt, le = ts.log(), errs.log()
    return float(((lt - lt.mean()) * (le - le.mean())).sum() / ((lt - lt.mean()) ** 2).sum())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("metric", METRICS)
def test_taylor_remainder_has_slope_two(metric, seed):
    """f(R_x(tv)) − f(x) − t·g_x(grad f, v) = O(t²) (pymanopt's check_gradient)."""
    man, x, u, g = _setup(metric, torch.float64, (7, 5, 3), seed)
    target = torch.randn(7, 5, generator=g, dtype=torch.float64)
    v = man.proju(x, u)
    v = v / man.norm(x, v)
    egrad = _egrad(man, x, target)
    slope = _taylor_slope(man, x, v, lambda: man.egrad2rgrad(x, egrad), target)
    assert abs(slope - 2.0) < 0.1
    if metric == "preconditioned":
        # the check can fail: treating the Euclidean gradient as the Riemannian one under the
        # preconditioned metric leaves a first-order remainder
        bad = _taylor_slope(man, x, v, lambda: egrad, target)
        assert bad < 1.6


# ---------------------------------------------------------------- retraction, transport


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_retr_keeps_full_rank_and_transp_lands_horizontal(metric, dtype, shape):
    man, x, u, g = _setup(metric, dtype, shape, seed=5, batch=(2,))
    a, b = man.unpack(x)
    smin = torch.minimum(torch.linalg.svdvals(a)[..., -1], torch.linalg.svdvals(b)[..., -1]).min()
    xi = man.proju(x, u)
    xi = xi * (0.5 * smin / torch.linalg.matrix_norm(xi, ord=2).max())  # ‖ξ‖₂ < σ_min
    y = man.retr(x, xi)
    torch.testing.assert_close(y, x + xi, rtol=0, atol=0)
    torch.testing.assert_close(man.expmap(x, xi), y, rtol=0, atol=0)
    assert man.check_point_on_manifold(y)

    w = man.proju(x, torch.randn(u.shape, generator=g, dtype=torch.float64).to(dtype))
    wt = man.transp(x, y, w)
    torch.testing.assert_close(wt, man.proju(y, w), rtol=0, atol=0)
    assert man.check_vector_on_tangent(y, wt, atol=0, rtol=10 * _tol(dtype))
    y2, wt2 = man.retr_transp(x, xi, w)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(wt2, wt, rtol=0, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_batched_equals_looped(metric):
    man, x, u, g = _setup(metric, torch.float64, (6, 4, 2), seed=6, batch=(2, 3))
    v = torch.randn(u.shape, generator=g, dtype=torch.float64)
    y = man.retr(x, 0.05 * man.proju(x, u))
    batched = {
        "proju": man.proju(x, u),
        "egrad2rgrad": man.egrad2rgrad(x, u),
        "inner": man.inner(x, u, v),
        "transp": man.transp(x, y, v),
    }
    for i in range(2):
        for j in range(3):
            xi, ui, vi, yi = x[i, j], u[i, j], v[i, j], y[i, j]
            looped = {
                "proju": man.proju(xi, ui),
                "egrad2rgrad": man.egrad2rgrad(xi, ui),
                "inner": man.inner(xi, ui, vi),
                "transp": man.transp(xi, yi, vi),
            }
            for key, val in looped.items():
                torch.testing.assert_close(batched[key][i, j], val, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- checks, degenerate inputs


@pytest.mark.parametrize("metric", METRICS)
def test_check_point_reasons(metric):
    man, x, _, _ = _setup(metric, torch.float64, (5, 4, 2), seed=0)
    assert man.check_point_on_manifold(x, explain=True) == (True, None)

    ok, reason = man.check_point_on_manifold(torch.randn(8, 2), explain=True)
    assert not ok and "(..., 9, 2)" in reason
    ok, reason = man.check_point_on_manifold(torch.randn(9), explain=True)
    assert not ok and "requires more than 2 dim" in reason
    ok, reason = man.check_point(torch.randn(9, 3), explain=True)
    assert not ok and "(..., 9, 2)" in reason

    a, b = man.unpack(x)
    zero_a = man.pack(torch.zeros_like(a), b)
    ok, reason = man.check_point_on_manifold(zero_a, explain=True)
    assert not ok and "factor A" in reason and "zero" in reason
    zero_b = man.pack(a, torch.zeros_like(b))
    ok, reason = man.check_point_on_manifold(zero_b, explain=True)
    assert not ok and "factor B" in reason and "zero" in reason
    rank1 = man.pack(a[:, :1].expand(5, 2) * torch.tensor([1.0, 2.0], dtype=a.dtype), b)
    ok, reason = man.check_point_on_manifold(rank1, explain=True)
    assert not ok and "factor A" in reason and "rank-deficient" in reason
    nan = x.clone()
    nan[0, 0] = float("nan")
    ok, reason = man.check_point_on_manifold(nan, explain=True)
    assert not ok and "non-finite" in reason
    # one bad element of a batch fails the whole batch
    assert not man.check_point_on_manifold(torch.stack([x, zero_a]))
    with pytest.raises(ValueError, match="factor A"):
        man.assert_check_point_on_manifold(zero_a)


@pytest.mark.parametrize("metric", METRICS)
def test_check_vector_reasons(metric):
    man, x, u, _ = _setup(metric, torch.float64, (5, 4, 2), seed=0)
    assert man.check_vector_on_tangent(x, man.proju(x, u), explain=True) == (True, None)
    ok, reason = man.check_vector_on_tangent(x, u, explain=True)
    assert not ok and "not horizontal" in reason
    ok, reason = man.check_vector_on_tangent(x, torch.randn(9, 3), explain=True)
    assert not ok and "`u` should have shape" in reason
    ok, reason = man.check_vector_on_tangent(
        x.expand(3, 9, 2), torch.randn(2, 9, 2, dtype=torch.float64), ok_point=True, explain=True
    )
    assert not ok and "does not broadcast" in reason
    bad = u.clone()
    bad[1, 1] = float("inf")
    ok, reason = man.check_vector_on_tangent(x, bad, explain=True)
    assert not ok and "non-finite" in reason
    a, b = man.unpack(x)
    zero_b = man.pack(a, torch.zeros_like(b))
    ok, reason = man.check_vector_on_tangent(zero_b, u, explain=True)
    assert not ok and "factor B" in reason
    ok, reason = man.check_vector_on_tangent(zero_b, u, ok_point=True, explain=True)
    assert not ok and "factor B" in reason and "rank-deficient" in reason
    with pytest.raises(ValueError, match="not horizontal"):
        man.assert_check_vector_on_tangent(x, u)


@pytest.mark.parametrize("metric", METRICS)
def test_rank_deficient_points_raise_instead_of_nan(metric):
    """PEFT's zero-initialized factor: a clear error from every operation that inverts a Gram."""
    man, x, u, _ = _setup(metric, torch.float64, (5, 4, 2), seed=0)
    a, b = man.unpack(x)
    peft_init = man.pack(a, torch.zeros_like(b))
    rank1 = man.pack(a[:, :1].expand(5, 2).clone(), b)
    nan = x.clone()
    nan[2, 1] = float("nan")
    for bad, label in [(peft_init, "factor B"), (rank1, "factor A"), (nan, "factor A")]:
        for op in (
            lambda bad=bad: man.proju(bad, u),
            lambda bad=bad: man.egrad2rgrad(bad, u),
            lambda bad=bad: man.transp(x, bad, u),
        ):
            with pytest.raises(RankDeficientError, match=label):
                op()
    assert issubclass(RankDeficientError, ValueError)
    # inner inverts nothing: a semi-definite form, finite
    assert torch.isfinite(man.inner(peft_init, u)).all()
    # projx is the identity (documented): it cannot repair a rank-deficient pair
    assert man.projx(peft_init) is peft_init
    with pytest.raises(ValueError):
        man.projx(torch.randn(8, 2))


def test_low_precision_inputs_compute_in_float32():
    man, x, u, _ = _setup("preconditioned", torch.float64, (5, 4, 2), seed=0)
    p = man.proju(x.bfloat16(), u.bfloat16())
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    # the bf16 inputs themselves carry relative errors up to 2^-8 ≈ 4e-3 each; proju combines
    # them through O(1)-conditioned Grams and rounds its output to bf16 again: 0.05 is ~10× that
    torch.testing.assert_close(p.double(), man.proju(x, u), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("metric", METRICS)
def test_ill_conditioned_point_float32(metric):
    """Factors with condition number 1e3 in float32: proju is still a projector onto the
    horizontal space, to a tolerance that grows with the conditioning."""
    m, n, r = 10, 8, 3
    man = FixedRankQuotient(m, n, r, metric)
    g = _gen(11)
    qa, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0, 3e-2, 1e-3], dtype=torch.float64)
    x = man.pack(qa * s, qb * s.flip(0)).float()
    assert man.check_point_on_manifold(x)
    u = torch.randn(m + n, r, generator=g).float()
    p = man.proju(x, u)
    assert torch.isfinite(p).all()
    assert _rel(man.proju(x, p) - p, p) < 1e-2
    ref = man.proju(x.double(), u.double())
    assert _rel(p.double() - ref, ref) < 1e-2


# ---------------------------------------------------------------- random, origin


def test_random_and_origin():
    man = FixedRankQuotient(5, 4, 2)
    x = man.random(3, 9, 2, dtype=torch.float64, generator=_gen(0))
    assert isinstance(x, geoopt.ManifoldTensor) and x.manifold is man
    assert x.shape == (3, 9, 2) and x.dtype == torch.float64
    assert man.check_point_on_manifold(x)
    y = man.random((3, 9, 2), dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert man.random().shape == (9, 2)
    assert float(man.random(9, 2, std=1e-3).abs().max()) < 0.1
    with pytest.raises(ValueError):
        man.random(8, 2)

    o = man.origin(2, 9, 2, dtype=torch.float32)
    assert isinstance(o, geoopt.ManifoldTensor) and o.shape == (2, 9, 2)
    a, b = man.unpack(o)
    torch.testing.assert_close(a, torch.eye(5, 2).expand(2, 5, 2))
    torch.testing.assert_close(b, torch.eye(4, 2).expand(2, 4, 2))
    torch.testing.assert_close(man.origin(), man.origin(seed=None))
    assert man.check_point_on_manifold(man.origin())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_proju_keeps_the_change_of_z(metric, shape):
    """The removed vertical part does not move Z to first order: dZ(u) = dZ(proju(u)), with
    dZ(ξ) = ξ_A Bᵀ + A ξ_Bᵀ. Includes rank 1 and r = min(m, n) (a square, invertible factor)."""
    man, x, u, _ = _setup(metric, torch.float64, shape, seed=8)
    a, b = man.unpack(x)
    ua, ub = man.unpack(u)
    pa, pb = man.unpack(man.proju(x, u))
    dz = ua @ b.mT + a @ ub.mT
    assert _rel(pa @ b.mT + a @ pb.mT - dz, dz) < 1e-10


# ---------------------------------------------------------------- optimization with geoopt


def _factorization_problem(m=20, n=15, r=3, cond=100.0, seed=0):
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    target = (u * s) @ v.mT
    a0 = u * s.sqrt() + 0.3 * torch.randn(m, r, generator=g, dtype=torch.float64) / m**0.5
    b0 = v * s.sqrt() + 0.3 * torch.randn(n, r, generator=g, dtype=torch.float64) / n**0.5
    return target, a0, b0


def _run_rsgd(metric, lr, steps=50, momentum=0.0):
    target, a0, b0 = _factorization_problem()
    man = FixedRankQuotient(a0.shape[0], b0.shape[0], a0.shape[1], metric)
    p = geoopt.ManifoldParameter(man.pack(a0, b0), manifold=man)
    opt = geoopt.optim.RiemannianSGD([p], lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        a, b = man.unpack(p)
        (0.5 * ((a @ b.mT - target) ** 2).sum()).backward()
        opt.step()
    a, b = man.unpack(p.detach())
    return float(torch.linalg.norm(a @ b.mT - target) / torch.linalg.norm(target))


def test_riemannian_sgd_preconditioned_solves_ill_conditioned_factorization():
    """RiemannianSGD under the preconditioned metric is ScaledGD: linear convergence at a rate
    independent of cond(Z*) = 100."""
    assert _run_rsgd("preconditioned", lr=0.5) < 1e-6


def test_riemannian_sgd_euclidean_is_slow_on_the_same_problem():
    """The counterpart: the Euclidean metric (plain GD on the factors) at the same step budget,
    at its best step size from a grid, stays far from the solution on the ill-conditioned Z*."""
    errors = [_run_rsgd("euclidean", lr=lr) for lr in (0.3, 0.5, 0.8)]
    assert min(errors) > 1e-3


def test_riemannian_sgd_momentum_uses_retr_transp():
    assert _run_rsgd("preconditioned", lr=0.3, steps=30, momentum=0.3) < 1e-3


def test_riemannian_adam_runs():
    """RiemannianAdam (component_inner, retr_transp) takes finite steps that lower the loss."""
    target, a0, b0 = _factorization_problem()
    man = FixedRankQuotient(20, 15, 3, "preconditioned")
    p = geoopt.ManifoldParameter(man.pack(a0, b0), manifold=man)
    opt = geoopt.optim.RiemannianAdam([p], lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        a, b = man.unpack(p)
        loss = 0.5 * ((a @ b.mT - target) ** 2).sum()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert torch.isfinite(p).all() and losses[-1] < losses[0]
