"""gauge_act, random_gauge, scale_gauge, norm_balance (lowrank_geom/geometry/gauge.py).

Tolerances: acting by ``G`` multiplies by ``G`` and solves with ``G``; both are backward stable,
so ``Z`` is reproduced to ``O(r · cond(G) · eps) · ‖A‖‖B‖`` (the solve's forward error is
``cond(G) · eps`` relative, and ``‖A G‖ ‖B G⁻ᵀ‖ <= cond(G) ‖A‖‖B‖``). We allow a constant 10.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_geom.geometry import gauge_act, norm_balance, random_gauge, scale_gauge

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z_err(a, b, a2, b2) -> float:
    """‖A' B'ᵀ − A Bᵀ‖_F / (‖A‖_F ‖B‖_F), the backward-error scale of the product."""
    num = torch.linalg.matrix_norm(a2 @ b2.mT - a @ b.mT)
    return (num / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))).max().item()


@st.composite
def pairs(draw, max_r=6):
    r = draw(st.integers(1, max_r), label="r")
    m = draw(st.integers(r, 20), label="m")
    n = draw(st.integers(r, 20), label="n")
    cond = 1.0 if r == 1 else draw(st.floats(1.0, 1e4), label="cond")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = _gen(seed)
    a = torch.randn(m, r, generator=g, dtype=F64)
    b = torch.randn(n, r, generator=g, dtype=F64)
    return a, b, cond, g


@given(pairs())
def test_gauge_act_preserves_z(pair):
    a, b, cond, g = pair
    r = a.shape[-1]
    gauge = random_gauge(r, cond, g)
    a2, b2 = gauge_act(a, b, gauge)
    assert a2.shape == a.shape and b2.shape == b.shape
    assert _z_err(a, b, a2, b2) <= 10 * r * cond * EPS  # module docstring
    # and the factorization really changed (otherwise the check above is vacuous)
    if cond > 2:
        assert not torch.allclose(a2, a)


@given(pairs())
def test_gauge_act_composes(pair):
    a, b, cond, g = pair
    r = a.shape[-1]
    g1 = random_gauge(r, cond, g)
    g2 = random_gauge(r, cond, g)
    a12, b12 = gauge_act(*gauge_act(a, b, g1), g2)
    a_c, b_c = gauge_act(a, b, g1 @ g2)
    # two gauges of condition number cond each: the errors compound to cond² · eps
    tol = 10 * r * cond**2 * EPS
    rel = lambda x, y: (torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)).item()
    assert rel(a12, a_c) <= tol
    assert rel(b12, b_c) <= tol


def test_gauge_act_batched_and_broadcast():
    g = _gen(0)
    a = torch.randn(4, 7, 3, generator=g, dtype=F64)
    b = torch.randn(4, 5, 3, generator=g, dtype=F64)
    gauges = torch.stack([random_gauge(3, 10.0, g) for _ in range(4)])
    a2, b2 = gauge_act(a, b, gauges)
    for i in range(4):
        ai, bi = gauge_act(a[i], b[i], gauges[i])
        # per-slice solve/matmul: agreement to round-off (cond 10 → ~1e-14)
        torch.testing.assert_close(a2[i], ai, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(b2[i], bi, rtol=1e-13, atol=1e-13)
    # one (r, r) gauge broadcasts over the batch
    a3, b3 = gauge_act(a, b, gauges[0])
    torch.testing.assert_close(a3[2], gauge_act(a[2], b[2], gauges[0])[0], rtol=1e-13, atol=1e-13)
    assert _z_err(a, b, a3, b3) <= 10 * 3 * 10 * EPS


@given(
    r=st.integers(2, 8),
    cond=st.floats(1.0, 1e6),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_gauge_has_prescribed_condition_number(r, cond, seed):
    gauge = random_gauge(r, cond, _gen(seed))
    assert gauge.shape == (r, r) and gauge.dtype == F64
    sv = torch.linalg.svdvals(gauge)
    # singular values are accurate to eps·σ_max absolute, so σ_min (= σ_max / cond) to
    # cond·eps relative: the computed condition number is exact to O(r · cond · eps)
    assert (sv[0] / sv[-1]).item() == pytest.approx(cond, rel=10 * r * cond * EPS)
    # σ log-spaced from cond^{1/2} to cond^{-1/2}: |det G| = Π σ = 1, to the accuracy of the
    # computed σ_min (cond · eps relative, as above)
    assert sv.log().sum().exp().item() == pytest.approx(1.0, rel=10 * r * cond * EPS)
    assert sv[0].item() == pytest.approx(math.sqrt(cond), rel=10 * r * EPS)


def test_random_gauge_rank1_and_orthogonal():
    assert abs(random_gauge(1, 1.0, _gen(0)).item()) == pytest.approx(1.0, rel=1e-15)
    q = random_gauge(5, 1.0, _gen(1))
    torch.testing.assert_close(q.mT @ q, torch.eye(5, dtype=F64), rtol=0, atol=1e-14)  # orthogonal to ~r·eps


def test_random_gauge_deterministic_and_dtype():
    g1 = random_gauge(4, 30.0, _gen(3))
    g2 = random_gauge(4, 30.0, _gen(3))
    assert torch.equal(g1, g2)
    assert not torch.equal(g1, random_gauge(4, 30.0, _gen(4)))
    g32 = random_gauge(4, 30.0, _gen(3), dtype=torch.float32)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32, g1.float())  # computed in float64, then rounded


def test_random_gauge_rejects_bad_arguments():
    with pytest.raises(ValueError, match="condition number"):
        random_gauge(3, 0.5)
    with pytest.raises(ValueError, match="rank"):
        random_gauge(0, 2.0)
    with pytest.raises(ValueError, match="1×1"):
        random_gauge(1, 2.0)


@given(s=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3), r=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_scale_gauge_is_scalar_rescaling(s, r, seed):
    gauge = scale_gauge(s, r, dtype=F64)
    assert torch.equal(gauge, s * torch.eye(r, dtype=F64))
    g = _gen(seed)
    a = torch.randn(6, r, generator=g, dtype=F64)
    b = torch.randn(5, r, generator=g, dtype=F64)
    a2, b2 = gauge_act(a, b, gauge)
    # (s A, B / s): the matmul by s·I is exact; the solve divides by s (one rounding)
    assert torch.equal(a2, s * a)
    torch.testing.assert_close(b2, b / s, rtol=4 * EPS, atol=0)
    assert _z_err(a, b, a2, b2) <= 10 * r * EPS


def test_scale_gauge_rejects_zero_and_keeps_dtype():
    with pytest.raises(ValueError, match="s != 0"):
        scale_gauge(0.0, 3)
    assert scale_gauge(2.0, 3, dtype=torch.float32).dtype == torch.float32


def test_gauge_act_singular_gauge_raises():
    a = torch.randn(4, 2, dtype=F64)
    b = torch.randn(3, 2, dtype=F64)
    with pytest.raises(torch.linalg.LinAlgError):
        gauge_act(a, b, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(RuntimeError):  # a gauge of the wrong size
        gauge_act(a, b, torch.eye(3, dtype=F64))


@given(pair=pairs(), scale=st.floats(-6, 6))
def test_norm_balance_equal_norms_same_z(pair, scale):
    a, b, _, _ = pair
    a = a * 10.0**scale  # unbalanced on purpose
    a2, b2 = norm_balance(a, b)
    na, nb = torch.linalg.matrix_norm(a2).item(), torch.linalg.matrix_norm(b2).item()
    # one sqrt, one division, one multiplication and a norm per side: a few eps relative
    assert na == pytest.approx(nb, rel=20 * EPS * max(a.shape[0], b.shape[0]))
    assert _z_err(a, b, a2, b2) <= 10 * EPS


def test_norm_balance_batched():
    g = _gen(5)
    a = torch.randn(3, 6, 2, generator=g, dtype=F64) * torch.tensor([1e-3, 1.0, 1e3], dtype=F64)[:, None, None]
    b = torch.randn(3, 4, 2, generator=g, dtype=F64)
    a2, b2 = norm_balance(a, b)
    # per pair, not a global scale: each slice gets equal norms (relative, few eps)
    torch.testing.assert_close(torch.linalg.matrix_norm(a2), torch.linalg.matrix_norm(b2), rtol=1e-14, atol=0)
    assert _z_err(a, b, a2, b2) <= 10 * EPS


@pytest.mark.parametrize("zero", ["a", "b", "both"])
def test_norm_balance_zero_factor_unchanged(zero):
    g = _gen(6)
    a = torch.randn(5, 3, generator=g, dtype=F64)
    b = torch.randn(4, 3, generator=g, dtype=F64)
    if zero in ("a", "both"):
        a = torch.zeros_like(a)
    if zero in ("b", "both"):
        b = torch.zeros_like(b)
    a2, b2 = norm_balance(a, b)
    assert torch.isfinite(a2).all() and torch.isfinite(b2).all()
    assert torch.equal(a2, a) and torch.equal(b2, b)  # c = 1 exactly


# ------------------------------------------------------------ factorization excess, balancing
def _pair(seed: int, m=12, n=9, r=3, cond=1.0):
    g = _gen(seed)
    a, b = torch.randn(m, r, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64)
    return gauge_act(a, b, random_gauge(r, cond, g)) if cond > 1 else (a, b)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_factorization_excess_is_frobenius_over_nuclear(cond):
    from lowrank_geom.geometry import factorization_excess

    a, b = _pair(0, cond=cond)
    nuclear = torch.linalg.svdvals(a @ b.T).sum()  # independent: the SVD of the explicit Z
    expected = (torch.linalg.norm(a) * torch.linalg.norm(b) / nuclear).item()
    # r×r eigen-route vs m×n SVD: both backward stable; cond(G)² · eps of the Gram, ×100
    got = factorization_excess(a.T @ a, b.T @ b).item()
    assert got == pytest.approx(expected, rel=100 * cond**2 * EPS)
    assert got >= 1.0 - 1e-12


def test_factorization_excess_is_one_exactly_when_balanced_and_inf_at_z_zero():
    from lowrank_geom.geometry import balance, factorization_excess

    a, b = balance(*_pair(1, cond=1e3))
    assert factorization_excess(a.T @ a, b.T @ b).item() == pytest.approx(1.0, abs=1e-10)
    z = torch.zeros(12, 3, dtype=F64)
    assert factorization_excess(z.T @ z, b.T @ b).item() == math.inf


@pytest.mark.parametrize("cond", [1.0, 1e3])
def test_balancing_gauge_balances_and_keeps_z(cond):
    from lowrank_geom.geometry import balancing_gauge

    a, b = _pair(2, cond=cond)
    ta, tb, ok = balancing_gauge(a.T @ a, b.T @ b, rtol=1e-12)
    assert bool(ok)
    a1, b1 = a @ ta, b @ tb
    # Z: the gauge is built from Grams of cond(X)², cond ≤ 1e3 here: ≲ 10·cond²·eps relative
    assert _z_err(a, b, a1, b1) < 10 * cond**2 * EPS
    ga, gb = a1.T @ a1, b1.T @ b1
    sigma = torch.linalg.svdvals(a @ b.T)[:3]
    torch.testing.assert_close(ga, torch.diag(sigma), rtol=0, atol=10 * cond**2 * EPS * sigma[0].item())
    torch.testing.assert_close(gb, torch.diag(sigma), rtol=0, atol=10 * cond**2 * EPS * sigma[0].item())


def test_balancing_gauge_refuses_unresolved_pairs_and_is_identity_there():
    from lowrank_geom.geometry import balancing_gauge

    a, b = _pair(3)
    b_def = torch.cat([b[:, :2], torch.zeros(9, 1, dtype=F64)], dim=1)  # rank 2 < r
    zero = torch.zeros_like(a)
    batch_a, batch_b = torch.stack([a, a, zero]), torch.stack([b, b_def, b])
    ta, tb, ok = balancing_gauge(batch_a.mT @ batch_a, batch_b.mT @ batch_b, rtol=1e-12)
    assert ok.tolist() == [True, False, False]
    eye = torch.eye(3, dtype=F64)
    for i in (1, 2):
        assert torch.equal(ta[i], eye) and torch.equal(tb[i], eye)
    # a resolved pair is refused once its smallest singular value is below rtol · ‖A‖‖B‖
    s_min = torch.linalg.svdvals(a @ b.T)[2] / (torch.linalg.norm(a) * torch.linalg.norm(b))
    assert not bool(balancing_gauge(a.T @ a, b.T @ b, rtol=1.01 * s_min.item())[2])
    assert bool(balancing_gauge(a.T @ a, b.T @ b, rtol=0.99 * s_min.item())[2])
