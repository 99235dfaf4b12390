"""orthonormal_basis, magnitude_pinv and balance (lowrank_geom/geometry/factors.py).

Tolerances follow the standard backward-error bounds (Higham, *Accuracy and Stability of
Numerical Algorithms*, Thm 19.4 for Householder QR, §20 / §5 of Golub & Van Loan for the SVD):
a backward-stable factorization of an m×r matrix reproduces it, and its orthonormal factor is
orthonormal, to ``c · m · r · eps`` relative, with a small constant ``c``. We take ``c = 10``;
observed errors are 1–2 orders of magnitude smaller, while every bug these tests target (wrong
sign, wrong transpose, inf/NaN) shows up as an O(1) error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from lowrank_geom.geometry import balance, magnitude_pinv, orthonormal_basis, random_gauge

F64 = torch.float64
F32 = torch.float32
METHODS = ("qr", "polar")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tol(dtype: torch.dtype, m: int, r: int) -> float:
    """Backward-error bound ``10 · m · r · eps(dtype)`` of a Householder QR / SVD (module docstring)."""
    return 10.0 * m * r * torch.finfo(dtype).eps


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref).clamp_min(1e-300)).max().item()


def _orth_err(u: torch.Tensor) -> float:
    eye = torch.eye(u.shape[-1], dtype=u.dtype)
    return torch.linalg.matrix_norm(u.mT @ u - eye).max().item()


shapes = st.integers(1, 6).flatmap(lambda r: st.tuples(st.integers(r, 24), st.just(r)))
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- orthonormal_basis


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [F64, F32])
@given(shape=shapes, seed=seeds)
def test_basis_reconstructs_and_is_orthonormal(method, dtype, shape, seed):
    m, r = shape
    x = torch.randn(m, r, generator=_gen(seed), dtype=dtype)
    u, mag = orthonormal_basis(x, method)
    assert u.shape == (m, r) and mag.shape == (r, r)
    assert u.dtype == dtype and mag.dtype == dtype
    # float64: tight (1e-13-level for these sizes); float32: the same bound with eps32 (~1e-4).
    tol = _tol(dtype, m, r)
    assert _rel(u @ mag, x) <= tol
    assert _orth_err(u) <= tol


@given(shape=shapes, seed=seeds)
def test_qr_canonical_sign_and_triangular(shape, seed):
    m, r = shape
    x = torch.randn(m, r, generator=_gen(seed), dtype=F64)
    _, mag = orthonormal_basis(x, "qr")
    # LAPACK's Householder R has a diagonal of either sign; the canonical one is >= 0 (exactly:
    # it is a sign flip, not an arithmetic result).
    assert (torch.diagonal(mag) >= 0).all()
    assert torch.equal(torch.tril(mag, -1), torch.zeros_like(mag))


@given(shape=shapes, seed=seeds)
def test_polar_magnitude_is_symmetric_psd_square_root(shape, seed):
    m, r = shape
    x = torch.randn(m, r, generator=_gen(seed), dtype=F64)
    _, mag = orthonormal_basis(x, "polar")
    # symmetrize makes R symmetric bit for bit ((a + b) / 2 == (b + a) / 2 in IEEE arithmetic)
    assert torch.equal(mag, mag.mT)
    norm = torch.linalg.matrix_norm(mag, 2).item()
    # eigenvalues of a symmetric matrix are accurate to eps·‖R‖ (Weyl); allow the QR/SVD bound
    assert torch.linalg.eigvalsh(mag).min().item() >= -_tol(F64, m, r) * norm
    # R is the PSD square root of XᵀX: R² = XᵀX up to the SVD's backward error times ‖X‖²
    assert _rel(mag @ mag, x.mT @ x) <= 2 * _tol(F64, m, r)


@pytest.mark.parametrize("method", METHODS)
def test_basis_is_deterministic(method):
    x = torch.randn(7, 3, generator=_gen(0), dtype=F64)
    u1, r1 = orthonormal_basis(x, method)
    u2, r2 = orthonormal_basis(x.clone(), method)
    assert torch.equal(u1, u2) and torch.equal(r1, r2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_basis_batched_equals_looped(method, dtype):
    x = torch.randn(3, 2, 9, 4, generator=_gen(1), dtype=dtype)
    u, mag = orthonormal_basis(x, method)
    assert u.shape == (3, 2, 9, 4) and mag.shape == (3, 2, 4, 4)
    # Same LAPACK call per slice, so batched and looped agree to round-off; without a canonical
    # sign / a sign-free polar factor they could differ by O(1) sign flips.
    tol = _tol(dtype, 9, 4)
    for i in range(3):
        for j in range(2):
            ui, ri = orthonormal_basis(x[i, j], method)
            torch.testing.assert_close(u[i, j], ui, rtol=0, atol=tol)
            torch.testing.assert_close(mag[i, j], ri, rtol=0, atol=tol)


def _rank_deficient(case: str, dtype=F64) -> torch.Tensor:
    g = _gen(2)
    if case == "zero":  # LoRA's default init
        return torch.zeros(10, 4, dtype=dtype)
    if case == "rank1":
        return torch.randn(10, 1, generator=g, dtype=dtype) @ torch.randn(1, 4, generator=g, dtype=dtype)
    if case == "square":  # r = min(m, n): a square factor
        return torch.randn(5, 5, generator=g, dtype=dtype)
    if case == "square_rank2":
        return torch.randn(5, 2, generator=g, dtype=dtype) @ torch.randn(2, 5, generator=g, dtype=dtype)
    raise AssertionError(case)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["zero", "rank1", "square", "square_rank2"])
def test_basis_rank_deficient_and_square(method, case):
    x = _rank_deficient(case)
    m, r = x.shape
    u, mag = orthonormal_basis(x, method)
    assert torch.isfinite(u).all() and torch.isfinite(mag).all()
    # U stays orthonormal even where X has no column space to give it (backward-error bound)
    assert _orth_err(u) <= _tol(F64, m, r)
    assert torch.linalg.matrix_norm(u @ mag - x).item() <= _tol(F64, m, r) * max(
        torch.linalg.matrix_norm(x).item(), 1.0
    )
    if case == "zero":
        assert torch.equal(mag, torch.zeros_like(mag))  # exactly zero: nothing to round
    if case.startswith("square"):
        assert _orth_err(u.mT) <= _tol(F64, m, r)  # square: U Uᵀ = I too


@pytest.mark.parametrize("method", METHODS)
def test_basis_bf16_input_computed_in_float32(method):
    x = torch.randn(12, 3, generator=_gen(3)).to(torch.bfloat16)
    u, mag = orthonormal_basis(x, method)
    assert u.dtype == F32 and mag.dtype == F32
    # bf16 -> f32 is exact, so the float32 bound applies to X as given
    tol = _tol(F32, 12, 3)
    assert _rel(u @ mag, x.float()) <= tol
    assert _orth_err(u) <= tol


def test_basis_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rows >= rank"):
        orthonormal_basis(torch.randn(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="Invalid basis method"):
        orthonormal_basis(torch.randn(4, 2, dtype=F64), "svd")  # type: ignore[arg-type]


# ---------------------------------------------------------------- magnitude_pinv

ranks = st.integers(1, 6)
conds = st.floats(1.0, 1e3)


@given(r=ranks, cond=conds, seed=seeds)
def test_pinv_equals_inverse_when_well_conditioned(r, cond, seed):
    if r == 1:
        cond = 1.0
    mag = random_gauge(r, cond, _gen(seed))
    pinv = magnitude_pinv(mag)
    # two backward-stable inverses differ by O(r · cond · eps) relative; cond <= 1e3 is far above
    # the r·eps cutoff, so nothing is truncated
    assert _rel(pinv, torch.linalg.inv(mag)) <= 10 * r * cond * torch.finfo(F64).eps


@given(shape=shapes, seed=seeds)
def test_pinv_of_qr_magnitude_is_triangular_inverse(shape, seed):
    m, r = shape
    m = max(m, 2 * r)  # a Gaussian m×r factor with m >= 2r is well conditioned (cond < ~10³ w.h.p.)
    x = torch.randn(m, r, generator=_gen(seed), dtype=F64)
    _, mag = orthonormal_basis(x)
    ref = torch.linalg.solve_triangular(mag, torch.eye(r, dtype=F64), upper=True)
    cond = torch.linalg.cond(mag).item()
    assert _rel(magnitude_pinv(mag, rows=m), ref) <= 10 * r * cond * torch.finfo(F64).eps


def test_pinv_of_zero_is_zero_batched():
    mags = torch.stack([torch.zeros(3, 3, dtype=F64), random_gauge(3, 2.0, _gen(4))])
    pinv = magnitude_pinv(mags)
    assert torch.equal(pinv[0], torch.zeros(3, 3, dtype=F64))  # exactly 0, not just small
    # the other slice of the batch is unaffected (inverse to round-off, cond = 2)
    assert _rel(pinv[1], torch.linalg.inv(mags[1])) <= 1e-13


def _moore_penrose_residuals(a: torch.Tensor, p: torch.Tensor) -> list[float]:
    """Relative residuals of A P A = A, P A P = P, (AP)ᵀ = AP, (PA)ᵀ = PA."""
    ap, pa = a @ p, p @ a
    return [
        _rel(ap @ a, a),
        _rel(p @ ap, p),
        _rel(ap.mT, ap),
        _rel(pa.mT, pa),
    ]


@pytest.mark.parametrize("dtype", [F64, F32])
def test_pinv_of_exact_rank1_magnitude(dtype):
    # integer outer product: exactly rank 1 in floating point, so the default cutoff must apply
    u = torch.tensor([1.0, -2.0, 3.0, 1.0], dtype=dtype)
    v = torch.tensor([2.0, 1.0, -1.0, 4.0], dtype=dtype)
    mag = torch.outer(u, v)
    pinv = magnitude_pinv(mag)
    assert torch.isfinite(pinv).all()
    # R⁺ of u vᵀ is v uᵀ / (‖u‖²‖v‖²)
    ref = torch.outer(v, u) / (u.dot(u) * v.dot(v))
    eps = torch.finfo(dtype).eps
    assert _rel(pinv, ref) <= 100 * eps  # a rank-1 SVD is accurate to a few eps
    assert max(_moore_penrose_residuals(mag, pinv)) <= 100 * eps


@given(r=st.integers(2, 6), data=st.data(), seed=seeds)
def test_pinv_moore_penrose_conditions(r, data, seed):
    k = data.draw(st.integers(1, r - 1), label="rank")
    c = data.draw(st.floats(1.0, 1e3), label="cond of the nonzero part")
    g = _gen(seed)
    q1 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    sigma = torch.zeros(r, dtype=F64)
    sigma[:k] = torch.logspace(0, -torch.log10(torch.tensor(c)).item(), k, dtype=F64)
    mag = (q1 * sigma) @ q2.mT
    # explicit rtol 1e-8: well above the round-off (~r·eps) of the exact zeros, well below 1/c
    pinv = magnitude_pinv(mag, rtol=1e-8)
    assert torch.isfinite(pinv).all()
    assert torch.linalg.matrix_rank(pinv, rtol=1e-8).item() == k
    # the MP identities hold to O(r · c · eps) (the pseudo-inverse's condition number is c)
    assert max(_moore_penrose_residuals(mag, pinv)) <= 100 * r * c * torch.finfo(F64).eps


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [2, 4])
def test_pinv_rows_cutoff_matches_matrix_rank_of_tall_rank1_factor(method, r):
    # A rank-1 4096×r factor: R inherits X's round-off, which grows with m (observed σ₂/σ₁ up to
    # ~8·eps here), so the cutoff has to be the one matrix_rank(X) uses, max(m, r)·eps. With the
    # r·eps cutoff on R alone, about a quarter of these seeds gave ‖R⁺‖ ~ 1e15 / σ₁.
    m = 4096
    for seed in range(8):
        g = _gen(seed)
        x = torch.randn(m, 1, generator=g, dtype=F64) @ torch.randn(1, r, generator=g, dtype=F64)
        _, mag = orthonormal_basis(x, method)
        pinv = magnitude_pinv(mag, rows=m)
        assert torch.linalg.matrix_rank(x).item() == 1
        # rank(R⁺) = 1 and ‖R⁺‖₂ = 1/σ₁(R) (a few eps relative)
        assert torch.linalg.matrix_rank(pinv).item() == 1
        sigma1 = torch.linalg.matrix_norm(mag, 2).item()
        assert torch.linalg.matrix_norm(pinv, 2).item() * sigma1 == pytest.approx(1.0, rel=1e-10)


def test_pinv_safeguard_zero_factor():
    """Without the pseudo-inverse a zero factor (LoRA's B at init) turns the update into inf/NaN."""
    b = torch.zeros(8, 3, dtype=F64)
    _, mag = orthonormal_basis(b)
    eye = torch.eye(3, dtype=F64)
    plain = torch.linalg.solve_triangular(mag, eye, upper=True)
    assert not torch.isfinite(plain).all()
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.inv(mag)
    grad = torch.randn(8, 3, generator=_gen(5), dtype=F64)
    assert not torch.isfinite(grad @ plain @ plain.mT).all()  # the unsafeguarded ScaledGD direction
    safe = magnitude_pinv(mag)
    assert torch.equal(safe, torch.zeros_like(safe))
    assert torch.equal(grad @ safe @ safe.mT, torch.zeros_like(grad))


def test_pinv_bf16_computed_in_float32():
    mag = random_gauge(3, 5.0, _gen(6), dtype=torch.bfloat16)
    pinv = magnitude_pinv(mag)
    assert pinv.dtype == F32
    # the inverse of the bf16 values (exact in f32), cond 5: float32 round-off times cond
    assert _rel(pinv, torch.linalg.inv(mag.double()).float()) <= 100 * 5 * torch.finfo(F32).eps


# ---------------------------------------------------------------- balance


@given(
    dims=st.integers(1, 5).flatmap(lambda r: st.tuples(st.integers(r, 30), st.integers(r, 30), st.just(r))),
    seed=seeds,
)
def test_balance_same_z_equal_grams(dims, seed):
    m, n, r = dims
    g = _gen(seed)
    a = torch.randn(m, r, generator=g, dtype=F64) * 7.0  # deliberately unbalanced scales
    b = torch.randn(n, r, generator=g, dtype=F64) / 3.0
    a2, b2 = balance(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape
    scale = (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)).item()
    # two QRs and an r×r SVD, all backward stable: error <= bound · ‖A‖‖B‖ (~1e-12 here)
    tol = _tol(F64, max(m, n), r)
    assert torch.linalg.matrix_norm(a2 @ b2.mT - a @ b.mT).item() <= tol * scale
    ga, gb = a2.mT @ a2, b2.mT @ b2
    assert torch.linalg.matrix_norm(ga - gb).item() <= tol * scale
    # and both equal Σ = diag(σ(Z)), descending
    sigma = torch.linalg.svdvals(a @ b.mT)[:r]
    assert torch.linalg.matrix_norm(ga - torch.diag(sigma)).item() <= tol * scale


def test_balance_batched_equals_looped():
    g = _gen(7)
    a = torch.randn(3, 9, 2, generator=g, dtype=F64)
    b = torch.randn(3, 6, 2, generator=g, dtype=F64)
    a2, b2 = balance(a, b)
    for i in range(3):
        ai, bi = balance(a[i], b[i])
        # identical per-slice LAPACK calls: round-off level (a sign ambiguity would be O(1))
        torch.testing.assert_close(a2[i], ai, rtol=0, atol=1e-13)
        torch.testing.assert_close(b2[i], bi, rtol=0, atol=1e-13)


@pytest.mark.parametrize("zero", ["a", "b", "both"])
def test_balance_zero_factor(zero):
    g = _gen(8)
    a = torch.randn(7, 3, generator=g, dtype=F64)
    b = torch.randn(5, 3, generator=g, dtype=F64)
    if zero in ("a", "both"):
        a = torch.zeros_like(a)
    if zero in ("b", "both"):
        b = torch.zeros_like(b)
    a2, b2 = balance(a, b)
    assert torch.isfinite(a2).all() and torch.isfinite(b2).all()
    # Z = 0, so Σ = 0 and both balanced factors are exactly 0
    assert torch.equal(a2, torch.zeros_like(a2)) and torch.equal(b2, torch.zeros_like(b2))


def test_balance_bf16_returns_float32():
    g = _gen(9)
    a = torch.randn(6, 2, generator=g).to(torch.bfloat16)
    b = torch.randn(4, 2, generator=g).to(torch.bfloat16)
    a2, b2 = balance(a, b)
    assert a2.dtype == F32 and b2.dtype == F32
    z = a.float() @ b.float().mT  # bf16 -> f32 exact; the product of 2-term sums is f32-accurate
    scale = (torch.linalg.matrix_norm(a.float()) * torch.linalg.matrix_norm(b.float())).item()
    assert torch.linalg.matrix_norm(a2 @ b2.mT - z).item() <= _tol(F32, 6, 2) * scale


class _LargestOutput(TorchFunctionMode):
    """Records the largest tensor any torch function returns (to prove Z is never formed)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
            elif isinstance(o, (tuple, list)):
                stack.extend(o)
        return out


def test_balance_never_forms_z_at_scale():
    m, n, r = 4000, 3500, 4
    g = _gen(10)
    a = torch.randn(m, r, generator=g, dtype=F64)
    b = torch.randn(n, r, generator=g, dtype=F64)
    with _LargestOutput() as rec:
        a2, b2 = balance(a, b)
    # nothing bigger than a thin factor was created (Z would be m·n = 14e6 entries)
    assert 0 < rec.numel <= max(m, n) * r
    # Z' = Z checked through random probes, still without forming Z: ‖(Z' − Z) x‖ <= bound·‖A‖‖B‖‖x‖
    x = torch.randn(n, 3, generator=g, dtype=F64)
    diff = a2 @ (b2.mT @ x) - a @ (b.mT @ x)
    scale = (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(x)).item()
    assert torch.linalg.matrix_norm(diff).item() <= _tol(F64, m, r) * scale
    ab = (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)).item()
    torch.testing.assert_close(a2.mT @ a2, b2.mT @ b2, rtol=0, atol=_tol(F64, m, r) * ab)
