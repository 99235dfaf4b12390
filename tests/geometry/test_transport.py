"""basis_transport and the transport of first / second moments (lowrank_geom/geometry/transport.py).

Tolerances: every quantity here is a product of at most five matrices with orthonormal or
bounded factors, so float64 round-off is ``O(n · r · eps)`` relative to the operands' norms; we
allow ``10 · n · r · eps`` (~1e-13 for these sizes). A sign or transpose error is O(1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_geom.geometry import (
    basis_transport,
    orthonormal_basis,
    transport_first_moment,
    transport_second_moment,
)

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tol(n: int, r: int, dtype=F64) -> float:
    return 10.0 * n * r * torch.finfo(dtype).eps


def _psd(r: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(r, rank or r, generator=g, dtype=F64)
    return x @ x.mT


@st.composite
def bases(draw, dtype=F64):
    """Two orthonormal bases U_old, U_new (n×r) from QR of random factors, plus a PSD V and M."""
    r = draw(st.integers(1, 6), label="r")
    n = draw(st.integers(r, 20), label="n")
    m = draw(st.integers(1, 12), label="m")
    g = _gen(draw(st.integers(0, 2**31 - 1), label="seed"))
    u_old, _ = orthonormal_basis(torch.randn(n, r, generator=g, dtype=dtype))
    # the new basis is a perturbation of the old one, as between two optimizer steps
    step = draw(st.floats(0.0, 2.0), label="step")
    u_new, _ = orthonormal_basis(u_old + step * torch.randn(n, r, generator=g, dtype=dtype))
    v = _psd(r, g).to(dtype)
    mom = torch.randn(m, r, generator=g, dtype=dtype)
    return u_old, u_new, v, mom, g


def _rel(x, y) -> float:
    return (torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y).clamp_min(1e-300)).item()


@given(case=bases(), data=st.data())
def test_sign_flips_of_new_basis_are_absorbed(case, data):
    u_old, u_new, v, mom, _ = case
    n, r = u_new.shape
    signs = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=r, max_size=r)), dtype=F64)
    u_flip = u_new * signs  # flip columns of U_new

    p = basis_transport(u_new, u_old)
    p_flip = basis_transport(u_flip, u_old)
    # the rows of P flip with the columns of U_new (a sign flip is exact in IEEE arithmetic)
    assert torch.equal(p_flip, signs[:, None] * p)

    v_t, v_flip = transport_second_moment(v, p), transport_second_moment(v, p_flip)
    m_t, m_flip = transport_first_moment(mom, p), transport_first_moment(mom, p_flip)
    # in the new basis' own coordinates the state flips consistently: D X D and M Pᵀ D ...
    outer = signs[:, None] * signs[None, :]
    torch.testing.assert_close(v_flip, outer * v_t, rtol=0, atol=_tol(n, r) * torch.linalg.matrix_norm(v).item())
    torch.testing.assert_close(m_flip, m_t * signs, rtol=0, atol=_tol(n, r) * torch.linalg.matrix_norm(mom).item())
    # ... so the quantities expressed in ambient coordinates do not change at all
    amb_v = u_new @ v_t @ u_new.mT
    amb_v_flip = u_flip @ v_flip @ u_flip.mT
    assert _rel(amb_v_flip, amb_v) <= _tol(n, r)
    assert _rel(m_flip @ u_flip.mT, m_t @ u_new.mT) <= _tol(n, r)


@given(case=bases(), seed=st.integers(0, 2**31 - 1))
def test_rotations_of_new_basis_are_absorbed(case, seed):
    u_old, u_new, v, mom, _ = case
    n, r = u_new.shape
    rot, _ = torch.linalg.qr(torch.randn(r, r, generator=_gen(seed), dtype=F64))
    u_rot = u_new @ rot
    p, p_rot = basis_transport(u_new, u_old), basis_transport(u_rot, u_old)
    assert _rel(p_rot, rot.mT @ p) <= _tol(n, r)
    v_rot = transport_second_moment(v, p_rot)
    m_rot = transport_first_moment(mom, p_rot)
    assert _rel(u_rot @ v_rot @ u_rot.mT, u_new @ transport_second_moment(v, p) @ u_new.mT) <= _tol(n, r)
    assert _rel(m_rot @ u_rot.mT, transport_first_moment(mom, p) @ u_new.mT) <= _tol(n, r)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@given(data=st.data())
def test_transport_is_a_contraction(dtype, data):
    u_old, u_new, _, _, _ = data.draw(bases(dtype))
    n, r = u_new.shape
    p = basis_transport(u_new, u_old)
    assert p.shape == (r, r)
    # ‖Uᵀ_new U_old‖₂ <= ‖U_new‖₂‖U_old‖₂ = 1 + (orthonormality error of the QR, <= 10·n·r·eps)
    assert torch.linalg.matrix_norm(p.double(), 2).item() <= 1.0 + 2 * _tol(n, r, dtype)


@given(bases())
def test_transport_into_same_basis_is_identity(case):
    u_old, _, v, mom, _ = case
    n, r = u_old.shape
    p = basis_transport(u_old, u_old)
    eye = torch.eye(r, dtype=F64)
    torch.testing.assert_close(p, eye, rtol=0, atol=_tol(n, r))  # = UᵀU, orthonormal to QR accuracy
    assert _rel(transport_second_moment(v, p), v) <= 2 * _tol(n, r)
    assert _rel(transport_first_moment(mom, p), mom) <= 2 * _tol(n, r)


@given(case=bases(), data=st.data())
def test_transported_second_moment_is_symmetric_psd(case, data):
    u_old, u_new, _, _, g = case
    n, r = u_new.shape
    rank = data.draw(st.integers(1, r), label="rank of V")  # singular V included
    v = _psd(r, g, rank)
    v_t = transport_second_moment(v, basis_transport(u_new, u_old))
    assert torch.equal(v_t, v_t.mT)  # symmetrize is exact: (x + y)/2 == (y + x)/2
    # P V Pᵀ is PSD; round-off can only push an eigenvalue below 0 by O(r · eps · ‖V‖) (Weyl)
    assert torch.linalg.eigvalsh(v_t).min().item() >= -_tol(n, r) * torch.linalg.matrix_norm(v, 2).item()
    # a contraction cannot increase the mass: tr(P V Pᵀ) <= tr(V)
    assert torch.trace(v_t).item() <= torch.trace(v).item() * (1 + _tol(n, r))


def test_transport_batched_equals_looped():
    g = _gen(0)
    u_old = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=F64))[0]
    u_new = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=F64))[0]
    v = torch.stack([_psd(4, g) for _ in range(3)])
    mom = torch.randn(3, 5, 4, generator=g, dtype=F64)
    p = basis_transport(u_new, u_old)
    v_t = transport_second_moment(v, p)
    m_t = transport_first_moment(mom, p)
    assert p.shape == (3, 4, 4) and v_t.shape == (3, 4, 4) and m_t.shape == (3, 5, 4)
    for i in range(3):
        pi = basis_transport(u_new[i], u_old[i])
        # batched matmul vs per-slice matmul: round-off level
        torch.testing.assert_close(p[i], pi, rtol=0, atol=1e-14)
        torch.testing.assert_close(v_t[i], transport_second_moment(v[i], pi), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(m_t[i], transport_first_moment(mom[i], pi), rtol=1e-13, atol=1e-13)
