"""symmetrize, inverse_root (with its safeguards), eigenvalue_distance (lowrank_geom/geometry/psd.py).

Tolerances: for SPD ``V`` with condition number ``κ`` a backward-stable ``eigh`` perturbs ``V`` by
``O(r · eps) ‖V‖``; ``f(λ) = λ^{-1/p}`` has ``|f'(λ)| / |f(λ)| = 1/(p λ)``, so ``V^{-1/p}`` is
accurate to ``O(r · κ · eps)`` relative. Two independent implementations (ours in torch, the
reference in numpy / scipy) therefore agree to ``10 · r · κ · eps``. Eigenvalues themselves are
accurate to ``O(r · eps) ‖V‖`` absolute (Weyl).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_geom.geometry import (
    PSDNumericsError,
    basis_transport,
    compute_dtype,
    damped_inverse,
    eigenvalue_distance,
    inverse_root,
    orthonormal_basis,
    symmetrize,
    transport_second_moment,
)

F64 = torch.float64
F32 = torch.float32
EPS = torch.finfo(F64).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(r: int, cond: float, g: torch.Generator, scale: float = 1.0, dtype=F64) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with λ log-spaced in ``[scale / cond, scale]`` and Haar-random Q."""
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    lam = scale * torch.logspace(0, -float(np.log10(cond)), r, dtype=F64)
    return symmetrize((q * lam) @ q.mT).to(dtype)


def _ref_inverse_root(v: torch.Tensor, root: int, shift: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """numpy float64 reference: ``Q diag(1 / ((λ + shift)^{1/root} + eps)) Qᵀ``."""
    w, q = np.linalg.eigh(v.double().numpy())
    return torch.from_numpy((q * (1.0 / ((w + shift) ** (1.0 / root) + eps))) @ q.T)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x.double() - ref.double()) / torch.linalg.matrix_norm(ref.double())).max().item()


# ---------------------------------------------------------------- symmetrize / compute_dtype


@given(r=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_symmetrize(r, seed):
    x = torch.randn(3, r, r, generator=_gen(seed), dtype=F64)
    s = symmetrize(x)
    assert s.dtype == F64 and s.shape == x.shape
    assert torch.equal(s, s.mT)  # exact: (a + b) / 2 == (b + a) / 2 in IEEE arithmetic
    assert torch.equal(s, (x + x.mT) / 2)  # * 0.5 and / 2 round identically
    assert torch.equal(symmetrize(s), s)  # idempotent, exactly
    assert torch.equal(symmetrize(x.float()), symmetrize(x.float()).mT)


def test_compute_dtype():
    assert compute_dtype(torch.bfloat16) == F32
    assert compute_dtype(torch.float16) == F32
    assert compute_dtype(F32) == F32
    assert compute_dtype(F64) == F64


# ---------------------------------------------------------------- inverse_root


@given(
    r=st.integers(1, 8),
    cond=st.floats(1.0, 1e6),
    scale=st.floats(1e-6, 1e6),
    root=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_inverse_root_matches_numpy_reference(r, cond, scale, root, seed):
    v = _spd(r, cond, _gen(seed), scale)
    out = inverse_root(v, root)
    assert out.dtype == F64 and out.shape == (r, r)
    assert torch.equal(out, out.mT)
    assert _rel(out, _ref_inverse_root(v, root)) <= 10 * r * cond * EPS  # module docstring


@pytest.mark.parametrize("root", [2, 4])
def test_inverse_root_matches_scipy_fractional_power(root):
    v = _spd(5, 100.0, _gen(0))
    ref = scipy.linalg.fractional_matrix_power(v.numpy(), -1.0 / root)
    ref = np.real_if_close(ref, tol=1000)  # scipy may return complex with ~eps imaginary parts
    assert np.isrealobj(ref)
    assert _rel(inverse_root(v, root), torch.from_numpy(ref)) <= 10 * 5 * 100.0 * EPS


def test_inverse_root_shift_and_eps_on_a_diagonal_matrix():
    lam = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=F64)
    v = torch.diag(lam)
    out = inverse_root(v, 2, shift=0.5, eps=0.1)
    # shift inside the root, eps outside: 1 / (sqrt(λ + 0.5) + 0.1); eigh of a diagonal matrix is
    # exact up to the order of the eigenvalues, so a few eps relative
    ref = torch.diag(1.0 / ((lam + 0.5).sqrt() + 0.1))
    torch.testing.assert_close(out, ref, rtol=4 * EPS, atol=0)


@given(
    r=st.integers(1, 6),
    cond=st.floats(1.0, 1e4),
    shift=st.floats(0.0, 10.0),
    eps=st.floats(0.0, 10.0),
    root=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_inverse_root_shift_and_eps_semantics(r, cond, shift, eps, root, seed):
    v = _spd(r, cond, _gen(seed))
    out = inverse_root(v, root, shift=shift, eps=eps)
    # shift and eps only make the spectrum better conditioned: the cond bound still applies
    assert _rel(out, _ref_inverse_root(v, root, shift, eps)) <= 10 * r * cond * EPS
    if eps == 0.0:
        # shift = adding shift·I inside the root
        eye = torch.eye(r, dtype=F64)
        assert _rel(out, inverse_root(v + shift * eye, root)) <= 10 * r * cond * EPS


def test_inverse_root_tensor_shift_broadcasts_over_batch():
    g = _gen(1)
    v = torch.stack([_spd(3, 10.0, g) for _ in range(4)])
    shift = torch.tensor([0.0, 0.1, 1.0, 10.0], dtype=F64)
    out = inverse_root(v, 2, shift=shift, eps=1e-3)
    assert out.shape == (4, 3, 3)
    for i in range(4):
        # each slice gets its own shift (cond <= 10 → ~1e-14)
        assert _rel(out[i], _ref_inverse_root(v[i], 2, shift[i].item(), 1e-3)) <= 10 * 3 * 10 * EPS
    # a 0-dim tensor shift acts like the float
    torch.testing.assert_close(
        inverse_root(v, 2, shift=torch.tensor(0.5, dtype=F64)), inverse_root(v, 2, shift=0.5), rtol=0, atol=0
    )


def test_inverse_root_batched_equals_looped():
    g = _gen(2)
    v = torch.stack([torch.stack([_spd(4, 50.0, g) for _ in range(3)]) for _ in range(2)])
    out = inverse_root(v, 4, eps=1e-6)
    for i in range(2):
        for j in range(3):
            # per-slice LAPACK calls: round-off level, cond 50
            torch.testing.assert_close(out[i, j], inverse_root(v[i, j], 4, eps=1e-6), rtol=1e-12, atol=1e-12)


def test_inverse_root_zero_eigenvalue():
    v = torch.zeros(3, 3, dtype=F64)
    # shift = eps = 0: 0^{-1/2} = inf by design (documented); callers pass a positive eps
    assert not torch.isfinite(inverse_root(v, 2)).all()
    # with eps it is exactly 1/eps on the null space
    torch.testing.assert_close(inverse_root(v, 2, eps=1e-4), 1e4 * torch.eye(3, dtype=F64), rtol=4 * EPS, atol=0)


def test_inverse_root_safeguard_clamps_roundoff_negative_eigenvalues():
    """A PSD second moment made indefinite by round-off gives NaN without the clamp, finite with it."""
    g = _gen(3)
    grads = torch.randn(10, 2, generator=g, dtype=F64) @ torch.randn(2, 4, generator=g, dtype=F64)
    v = grads.mT @ grads  # 4×4 PSD of rank 2
    lam, q = torch.linalg.eigh(v)
    # push the smallest (≈ 0) eigenvalue to ≈ −1e-12: far above float64 round-off (~1e-14 for
    # ‖V‖ ~ 50), far below anything meaningful — what accumulated round-off can do to a sum of gᵀg
    null = q[:, :1]
    v_bad = symmetrize(v - 1e-12 * (null @ null.mT) - (null @ null.mT) * lam[0])
    assert torch.linalg.eigvalsh(v_bad).min().item() < 0

    eps = 1e-8
    lam_bad, q_bad = torch.linalg.eigh(v_bad)
    unclamped = (q_bad * (1.0 / (lam_bad.pow(0.5) + eps))) @ q_bad.mT  # the formula without the clamp
    assert torch.isnan(unclamped).any()

    out = inverse_root(v_bad, 2, eps=eps)
    assert torch.isfinite(out).all()
    # the clamped eigenvalue gives exactly 1/eps on its eigenvector: vᵀ out v ≈ 1/eps
    assert (null.mT @ out @ null).item() == pytest.approx(1.0 / eps, rel=1e-6)


def test_inverse_root_retries_in_float64(monkeypatch):
    real_eigh = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky_eigh(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype != F64 and len(calls) == 1:
            raise torch.linalg.LinAlgError("injected: failed to converge")
        return real_eigh(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    v = _spd(4, 100.0, _gen(4), dtype=F32)
    out = inverse_root(v, 2, eps=1e-6)
    assert calls == [F32, F64]  # first in float32, then the retry in float64
    assert out.dtype == F32  # returned in the input's compute dtype
    # the retry is more accurate than float32 itself: float32 rounding of the result (cond 100)
    ref = _ref_inverse_root(v, 2, 0.0, 1e-6)
    assert _rel(out, ref) <= 10 * 4 * torch.finfo(F32).eps


def test_inverse_root_raises_a_factual_error_when_retry_fails(monkeypatch):
    def broken_eigh(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("injected: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    with pytest.raises(PSDNumericsError) as info:
        inverse_root(_spd(3, 2.0, _gen(5), dtype=F32), 2)
    msg = str(info.value)
    # the facts only: what failed, in which dtypes, on what shape, and whether it was finite (it
    # was: no guess about NaN gradients, which the optimizer has already ruled out by then)
    assert msg == (
        "eigh of a symmetric matrix of shape (3, 3) failed to converge in float32 and again in "
        "float64; the matrix has non-finite (NaN/inf) entries: no"
    )
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)
    assert isinstance(info.value, RuntimeError)


def test_psd_error_counts_the_nonfinite_matrices_of_a_batch(monkeypatch):
    def broken_eigh(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("injected: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    v = torch.stack([_spd(2, 2.0, _gen(7)) for _ in range(3)])  # float64: no second dtype
    v[1, 0, 1] = float("inf")
    with pytest.raises(PSDNumericsError) as info:
        inverse_root(v, 2)
    msg = str(info.value)
    assert "shape (3, 2, 2) failed to converge twice in float64" in msg
    assert msg.endswith("non-finite (NaN/inf) entries: yes (1 of 3 matrices)")


def test_inverse_root_nan_input_raises_psd_error():
    # real LAPACK, no monkeypatching: a NaN second moment fails both attempts
    with pytest.raises(PSDNumericsError, match=r"non-finite \(NaN/inf\) entries: yes$"):
        inverse_root(torch.full((3, 3), float("nan")), 2, eps=1e-8)


def test_inverse_root_bf16_input():
    v = _spd(4, 10.0, _gen(6), dtype=torch.bfloat16)
    out = inverse_root(v, 2, eps=1e-6)
    assert out.dtype == F32
    assert torch.isfinite(out).all()
    # the bf16 values are exact in float32, so the float32 bound applies to V as given
    ref = _ref_inverse_root(v.float(), 2, 0.0, 1e-6)
    assert _rel(out, ref) <= 10 * 4 * 10 * torch.finfo(F32).eps


# ---------------------------------------------------------------- eigenvalue_distance


def _ref_distance(v_old: torch.Tensor, v_new: torch.Tensor) -> float:
    lo = np.linalg.eigvalsh(v_old.double().numpy())
    ln = np.linalg.eigvalsh(v_new.double().numpy())
    return max(0.0, float(np.max(lo - ln)))


@st.composite
def moment_and_contraction(draw):
    r = draw(st.integers(1, 6), label="r")
    g = _gen(draw(st.integers(0, 2**31 - 1), label="seed"))
    rank = draw(st.integers(1, r), label="rank of V")
    x = torch.randn(r, rank, generator=g, dtype=F64)
    v = x @ x.mT
    if draw(st.booleans(), label="P from bases"):
        # the LoRA-RITE case: P = U_newᵀ U_old between consecutive bases
        n = draw(st.integers(r, 12), label="n")
        u_old, _ = orthonormal_basis(torch.randn(n, r, generator=g, dtype=F64))
        u_new, _ = orthonormal_basis(u_old + draw(st.floats(0, 2)) * torch.randn(n, r, generator=g, dtype=F64))
        p = basis_transport(u_new, u_old)
    else:
        m = torch.randn(r, r, generator=g, dtype=F64)
        p = m / max(1.0, torch.linalg.matrix_norm(m, 2).item())  # any contraction
    return v, p


@given(case=moment_and_contraction())
def test_eigenvalue_distance_matches_sorted_drops(case):
    v, p = case
    v_new = transport_second_moment(v, p)
    d = eigenvalue_distance(v, v_new)
    assert d.shape == () and d.dtype == F64
    # eigenvalues accurate to O(r · eps)‖V‖ in either implementation
    tol = 10 * v.shape[-1] * EPS * torch.linalg.matrix_norm(v, 2).item()
    assert d.item() == pytest.approx(_ref_distance(v, v_new), abs=tol)


@given(case=moment_and_contraction())
def test_eigenvalue_distance_is_min_of_max_drop_and_trace_drop(case):
    # For PSD V and ‖P‖ <= 1 every sorted eigenvalue can only drop (λ_i(P V Pᵀ) <= λ_i(V), since
    # P V Pᵀ has the spectrum of V^{1/2} PᵀP V^{1/2} ≼ V), so the trace drop (the sum of the drops)
    # bounds the max drop, and d_λ = min(max drop, trace drop) — as the authors' code computes it.
    v, p = case
    v_new = transport_second_moment(v, p)
    d = eigenvalue_distance(v, v_new).item()
    lam_old = torch.linalg.eigvalsh(v)
    lam_new = torch.linalg.eigvalsh(v_new)
    drops = lam_old - lam_new
    trace_drop = (torch.trace(v) - torch.trace(v_new)).item()
    tol = 10 * v.shape[-1] * EPS * torch.linalg.matrix_norm(v, 2).item()
    assert drops.min().item() >= -tol
    assert d <= trace_drop + tol
    assert d == pytest.approx(min(drops.max().item(), trace_drop), abs=tol)


def test_eigenvalue_distance_zero_for_identity_transport():
    v = _spd(5, 1e3, _gen(7))
    v_new = transport_second_moment(v, torch.eye(5, dtype=F64))
    assert torch.equal(v_new, v)  # I V I and symmetrize of a symmetric matrix are exact
    assert eigenvalue_distance(v, v_new).item() == 0.0


def test_eigenvalue_distance_positive_for_projection():
    g = _gen(8)
    v = _spd(4, 10.0, g)
    p = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))  # drops one direction
    d = eigenvalue_distance(v, transport_second_moment(v, p)).item()
    # P V Pᵀ loses the mass in e₄: d > 0 and, by interlacing, at least λ_min(V) = 0.1
    assert d > 0
    assert d >= 0.1 * (1 - 1e-12)
    assert d == pytest.approx(_ref_distance(v, transport_second_moment(v, p)), abs=1e-13)


def test_eigenvalue_distance_batched_and_bf16():
    g = _gen(9)
    v = torch.stack([_spd(3, 10.0, g) for _ in range(5)])
    p = torch.stack([torch.diag(torch.rand(3, generator=g, dtype=F64)) for _ in range(5)])
    v_new = transport_second_moment(v, p)
    d = eigenvalue_distance(v, v_new)
    assert d.shape == (5,)
    for i in range(5):
        assert d[i].item() == pytest.approx(eigenvalue_distance(v[i], v_new[i]).item(), abs=1e-14)
        assert d[i].item() == pytest.approx(_ref_distance(v[i], v_new[i]), abs=1e-13)
    d16 = eigenvalue_distance(v.to(torch.bfloat16), v_new.to(torch.bfloat16))
    assert d16.dtype == F32 and torch.isfinite(d16).all()
    # bf16 storage rounds V to 2^-8 relative: the distance moves by at most that times ‖V‖ (~1)
    torch.testing.assert_close(d16.double(), d, rtol=0, atol=2 * 2.0**-8 * 3)


# --------------------------------------------------------- floor and drop of unresolved directions
def test_null_rtol_floors_eigenvalues_and_drop_zeroes_gains():
    from lowrank_geom.geometry import inverse_root_eig

    lam = torch.tensor([1e-20, 1e-3, 1.0], dtype=torch.float64)
    q = torch.eye(3, dtype=torch.float64)
    got = torch.diagonal(inverse_root_eig(lam, q, 2, eps=1e-6, null_rtol=1e-8))
    expected = 1.0 / (torch.tensor([1e-8, 1e-3, 1.0], dtype=torch.float64).sqrt() + 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0.0)
    drop = torch.tensor([True, False, False])
    got = torch.diagonal(inverse_root_eig(lam, q, 2, eps=1e-6, null_rtol=1e-8, drop=drop))
    assert got[0] == 0 and torch.equal(got[1:], expected[1:])


def test_unresolved_directions_needs_both_a_tiny_eigenvalue_and_a_quiet_gradient():
    from lowrank_geom.geometry import unresolved_directions

    lam = torch.tensor([1e-20, 1e-20, 1.0], dtype=torch.float64)
    q = torch.eye(3, dtype=torch.float64)
    # the gradient: loud along e1 (1e-3 of its norm: real), round-off along e0 (1e-12), e2 bulk
    gbar = torch.tensor([[1e-12, 1e-3, 1.0]], dtype=torch.float64)
    got = unresolved_directions(lam, q, gbar.T @ gbar, null_rtol=1e-8, grad_rtol=1e-8)
    assert got.tolist() == [True, False, False]
    # the increment's scale does not matter (row normalization)
    assert torch.equal(unresolved_directions(lam, q, 7.0 * gbar.T @ gbar, 1e-8, 1e-8), got)


def test_damped_inverse_is_the_inverse_of_a_psd_matrix_and_bounded_for_an_indefinite_one():
    g = torch.randn(3, 6, 4, generator=_gen(7), dtype=F64)
    psd = g.mT @ g
    # 1e-12: one eigh-based inverse of a matrix with condition < 1e3
    torch.testing.assert_close(
        damped_inverse(psd, 0.5), torch.linalg.inv(psd + 0.5 * torch.eye(4, dtype=F64)), rtol=1e-12, atol=1e-12
    )
    # round-off made an eigenvalue negative (-1e-3 ≫ λ): still positive definite, norm 1/λ
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(8), dtype=F64))
    indefinite = (q * torch.tensor([-1e-3, 1.0, 2.0, 3.0], dtype=F64)) @ q.T
    inv = damped_inverse(indefinite, 1e-6)
    lam = torch.linalg.eigvalsh(inv)
    assert lam.min() > 0 and torch.isclose(lam.max(), torch.tensor(1e6, dtype=F64))
    with pytest.raises(ValueError, match="positive damping"):
        damped_inverse(psd, 0.0)
