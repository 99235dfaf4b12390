"""Self-checks of the NumPy reference optimizers against facts that do not involve the library.

Invariance of the Z trajectory under (A, B) -> (A G, B G^-T), closed forms of first steps computed
differently (linear solves, scipy.linalg.sqrtm), the LoRA-RITE / one-sided Adagrad coincidence for a
fixed orthonormal B, and internal consistency of the recorded state.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from .loft import run_loft
from .lora_rite import run_lora_rite
from .one_sided_adagrad import run_one_sided_adagrad
from .problems import linear_problem, quadratic_problem, zero_init_problem
from .scaled import run_scaled_adam, run_scaled_gd


def _rel(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def _transform(As, Bs, seed, scale=3.0):
    """(A G, B G^-T) for a random, well-conditioned, non-orthogonal G (one per pair)."""
    rng = np.random.default_rng(seed)
    A2, B2 = [], []
    for a, b in zip(As, Bs):
        r = a.shape[1]
        G = scale * (np.eye(r) + 0.4 * rng.standard_normal((r, r)))
        A2.append(a @ G)
        B2.append(b @ np.linalg.inv(G).T)
    return A2, B2


def _zs(records):
    return [[p["Z"] for p in rec] for rec in records]


def _assert_same_z(rec1, rec2, tol):
    for z1s, z2s in zip(_zs(rec1), _zs(rec2)):
        for z1, z2 in zip(z1s, z2s):
            assert _rel(z2, z1) <= tol


RITE_OPTIONS = [
    dict(),
    dict(clip_unmagnified_grad=0.0, update_skipping=0.0, escape=True),
    dict(escape=True, second_moment="sum", bias_correction=False, row_normalize=False, clip_unmagnified_grad=0.5),
    dict(escape=True, update_capping=0.05, balance=True, betas=(0.5, 0.9)),
]


@pytest.mark.parametrize("basis", ["qr", "polar"])
@pytest.mark.parametrize("opts", RITE_OPTIONS)
def test_lora_rite_transformation_invariance(basis, opts):
    As, Bs, grad_fn = quadratic_problem(7, 5, 2, seed=1)
    A2, B2 = _transform(As, Bs, seed=2)
    lr = lambda t: 0.05 / (1 + 0.1 * t)
    r1 = run_lora_rite(As, Bs, grad_fn, 12, lr, basis=basis, **opts)
    r2 = run_lora_rite(A2, B2, grad_fn, 12, lr, basis=basis, **opts)
    _assert_same_z(r1, r2, 1e-10)
    # the step is not trivial
    assert _rel(r1[-1][0]["Z"], As[0] @ Bs[0].T) > 1e-2


def test_lora_rite_qr_and_polar_give_same_z():
    As, Bs, grad_fn = quadratic_problem(6, 6, 3, seed=3)
    opts = dict(escape=True, update_capping=0.1)
    _assert_same_z(
        run_lora_rite(As, Bs, grad_fn, 10, 0.05, basis="qr", **opts),
        run_lora_rite(As, Bs, grad_fn, 10, 0.05, basis="polar", **opts),
        1e-10,
    )


def test_lora_rite_first_step_closed_form():
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=4)
    eps, lr = 1e-14, 0.1
    # the paper's step: the library's relative-change cap (which a step of lr = 0.1 reaches here)
    # and rebalancing (a change of factorization the closed form does not write) off
    rec = run_lora_rite(
        As,
        Bs,
        grad_fn,
        1,
        lr,
        eps=eps,
        clip_unmagnified_grad=0.0,
        update_skipping=0.0,
        relative_step_cap=0.0,
        rebalance=0.0,
    )[0]
    gA, _ = grad_fn(As, Bs)
    for i, (a, b) in enumerate(zip(As, Bs)):
        m = a.shape[0]
        dZ = a @ b.T - grad_fn.targets[i]
        UB, RB = np.linalg.qr(b)
        sgn = np.sign(np.diag(RB))  # make diag(R_B) > 0
        UB, RB = UB * sgn, RB * sgn[:, None]
        gbar = gA[i] @ np.linalg.inv(RB)
        assert _rel(gbar, dZ @ UB) < 1e-12  # gbar = dZ U_B
        V = gbar.T @ gbar / m  # bias-corrected EMA, first step: V = S
        Sbar = gbar @ np.linalg.inv(np.real(scipy.linalg.sqrtm(V)))
        p = rec[i]
        assert _rel(p["V_A"], V) < 1e-12
        assert _rel(p["M_A"], p["Sbar_A"]) == 0.0
        assert _rel(p["delta_A"] @ b.T, -lr * Sbar @ np.linalg.inv(RB).T @ b.T) < 1e-10
        # the Z-update of the A side is -lr (dZ U_B)(U_B^T dZ^T dZ U_B / m)^{-1/2} U_B^T
        G = dZ @ UB
        ref = -lr * G @ np.linalg.inv(np.real(scipy.linalg.sqrtm(G.T @ G / m))) @ UB.T
        assert _rel(p["delta_A"] @ b.T, ref) < 1e-10
        assert p["rho_A"] == 0.0 and not np.any(p["P_A"])


def test_lora_rite_clipping_and_skipping():
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=5, target_scale=3.0)
    rec = run_lora_rite(As, Bs, grad_fn, 1, 0.1, clip_unmagnified_grad=0.3, update_skipping=0.0)[0]
    total = sum(np.sum(p["gbar_A"] ** 2) + np.sum(p["gbar_B"] ** 2) for p in rec)
    assert abs(np.sqrt(total) - 0.3) < 1e-12
    # skipping: a threshold below every rms zeroes every unmagnified gradient -> no move at all
    rec = run_lora_rite(As, Bs, grad_fn, 1, 0.1, update_skipping=1e-6)[0]
    for p, a, b in zip(rec, As, Bs):
        assert not np.any(p["gbar_A"]) and not np.any(p["gbar_B"])
        assert np.array_equal(p["A"], a) and np.array_equal(p["B"], b)


def test_lora_rite_matches_one_sided_adagrad_with_fixed_orthonormal_b():
    """B fixed with orthonormal columns (R_B = I, P_A = I, no escaped mass): RITE(sum) == one-sided Adagrad on A."""
    As, Bs, grad_fn = quadratic_problem(8, 6, 3, seed=6)
    Bs = [np.linalg.qr(b)[0] for b in Bs]

    def grad_a_only(A, B):
        gA, gB = grad_fn(A, B)
        return gA, [np.zeros_like(g) for g in gB]

    opts = dict(
        betas=(0.0, 0.5),
        eps=1e-14,
        escape=True,
        second_moment="sum",
        bias_correction=False,
        row_normalize=False,
        clip_unmagnified_grad=0.0,
        update_skipping=0.0,
    )
    rite = run_lora_rite(As, Bs, grad_a_only, 8, 0.1, **opts)
    ada = run_one_sided_adagrad(As, Bs, grad_a_only, 8, 0.1, eps=1e-14)
    for r1, r2 in zip(rite, ada):
        for p1, p2, b in zip(r1, r2, Bs):
            assert np.array_equal(p1["B"], b)
            assert _rel(p1["A"], p2["A"]) < 1e-10
            assert p1["rho_A"] < 1e-12


def test_lora_rite_recorded_state_is_consistent():
    As, Bs, grad_fn = quadratic_problem(6, 5, 2, seed=7)
    for sm in ("sum", "ema"):
        recs = run_lora_rite(As, Bs, grad_fn, 6, 0.2, escape=True, second_moment=sm, bias_correction=False)
        b2 = 0.999
        for t in range(1, len(recs)):
            for prev, cur in zip(recs[t - 1], recs[t]):
                P = cur["U_B"].T @ prev["U_B"]
                assert _rel(cur["P_A"], P) < 1e-14
                Vt = P @ prev["V_A"] @ P.T
                d = max(0.0, np.max(np.linalg.eigvalsh(prev["V_A"]) - np.linalg.eigvalsh(Vt)))
                rho = prev["rho_A"] + d
                if sm == "ema":
                    rho *= b2
                    assert _rel(cur["V_A"], b2 * Vt + (1 - b2) * cur["S_A"]) < 1e-12
                else:
                    assert _rel(cur["V_A"], Vt + cur["S_A"]) < 1e-12
                    assert cur["rho_A"] >= prev["rho_A"] >= 0.0
                assert abs(cur["rho_A"] - rho) <= 1e-12 * max(1.0, rho)
                assert _rel(cur["A"], prev["A"] + cur["delta_A"]) < 1e-14


def test_lora_rite_zero_init_and_balance():
    As, Bs, grad_fn = zero_init_problem(8, 6, 2, seed=8)
    rec = run_lora_rite(As, Bs, grad_fn, 1, 0.1)[0]
    for p, b in zip(rec, Bs):
        assert np.array_equal(p["B"], b) and not np.any(p["delta_B"])
        assert np.any(p["A"]) and np.all(np.isfinite(p["A"]))
        assert not np.any(p["R_A"])
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=9, init_scale=0.3)
    As = [5.0 * a for a in As]
    Bs = [0.2 * b for b in Bs]
    r0 = run_lora_rite(As, Bs, grad_fn, 5, 0.05)
    r1 = run_lora_rite(As, Bs, grad_fn, 5, 0.05, balance=True)
    _assert_same_z(r0, r1, 1e-10)
    for p in r1[-1]:
        assert abs(np.linalg.norm(p["A"]) - np.linalg.norm(p["B"])) < 1e-12 * np.linalg.norm(p["A"])


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_scaled_gd_first_step_closed_form(delta):
    As, Bs, grad_fn = quadratic_problem(8, 6, 3, seed=10)
    lr = 0.2
    # the paper's step: the library's relative-change cap (which lr = 0.2 reaches here) off
    rec = run_scaled_gd(As, Bs, grad_fn, 1, lr, delta=delta, relative_step_cap=0.0)[0]
    gA, gB = grad_fn(As, Bs)
    for p, a, b, ga, gb in zip(rec, As, Bs, gA, gB):
        r = a.shape[1]
        DA = np.linalg.solve(b.T @ b + delta * np.eye(r), ga.T).T
        DB = np.linalg.solve(a.T @ a + delta * np.eye(r), gb.T).T
        assert _rel(p["D_A"], DA) < 1e-12 and _rel(p["D_B"], DB) < 1e-12
        assert _rel(p["A"], a - lr * DA) < 1e-13 and _rel(p["B"], b - lr * DB) < 1e-13


def test_scaled_gd_momentum_weight_decay_and_invariance():
    As, Bs, grad_fn = quadratic_problem(7, 5, 2, seed=11)
    mom, wd = 0.7, 0.01
    recs = run_scaled_gd(As, Bs, grad_fn, 3, 0.1, momentum=mom, weight_decay=wd)
    for t, rec in enumerate(recs):
        for i, p in enumerate(rec):
            prevA = As[i] if t == 0 else recs[t - 1][i]["A"]
            prevB = Bs[i] if t == 0 else recs[t - 1][i]["B"]
            ga, _ = grad_fn([r["A"] for r in recs[t - 1]] if t else As, [r["B"] for r in recs[t - 1]] if t else Bs)
            DA = ga[i] @ np.linalg.pinv(prevB.T @ prevB) + wd * prevA
            assert _rel(p["D_A"], DA) < 1e-11
            buf = DA if t == 0 else mom * recs[t - 1][i]["buf_A"] + DA
            assert _rel(p["buf_A"], buf) < 1e-12
            assert _rel(p["A"], prevA - 0.1 * buf) < 1e-13
    # Riemannian / scaled GD (delta = 0, no weight decay) is transformation invariant, momentum included
    A2, B2 = _transform(As, Bs, seed=12)
    _assert_same_z(
        run_scaled_gd(As, Bs, grad_fn, 10, 0.1, momentum=0.5),
        run_scaled_gd(A2, B2, grad_fn, 10, 0.1, momentum=0.5),
        1e-10,
    )


def test_scaled_gd_zero_factor():
    As, Bs, grad_fn = zero_init_problem(8, 6, 2, seed=13)
    rec = run_scaled_gd(As, Bs, grad_fn, 2, 0.1)
    for p, b in zip(rec[0], Bs):
        assert not np.any(p["D_B"]) and np.array_equal(p["B"], b)
        assert np.all(np.isfinite(p["A"])) and np.any(p["A"])


def test_scaled_adam_first_steps():
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=14)
    lr, wd, eps = 0.01, 0.1, 1e-8
    recs = run_scaled_adam(As, Bs, grad_fn, 2, lr, eps=eps, weight_decay=wd)
    gA, _ = grad_fn(As, Bs)
    for p, a, b, ga in zip(recs[0], As, Bs, gA):
        D = ga @ np.linalg.inv(b.T @ b)
        assert _rel(p["D_A"], D) < 1e-12
        assert _rel(p["A"], a * (1 - lr * wd) - lr * D / (np.abs(D) + eps)) < 1e-12
    # second step: bias-corrected Adam moments
    b1, b2 = 0.9, 0.999
    for p0, p1 in zip(recs[0], recs[1]):
        m = b1 * (1 - b1) * p0["D_A"] + (1 - b1) * p1["D_A"]
        v = b2 * (1 - b2) * p0["D_A"] ** 2 + (1 - b2) * p1["D_A"] ** 2
        assert _rel(p1["m_A"], m) < 1e-14 and _rel(p1["v_A"], v) < 1e-14
        step = (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
        assert _rel(p1["A"], p0["A"] * (1 - lr * wd) - lr * step) < 1e-12


def test_one_sided_adagrad_first_step_sqrtm():
    As, Bs, grad_fn = quadratic_problem(8, 6, 3, seed=15)
    eps, lr = 1e-3, 0.1
    recs = run_one_sided_adagrad(As, Bs, grad_fn, 3, lr, eps=eps)
    gA, gB = grad_fn(As, Bs)
    for p, a, b, ga, gb in zip(recs[0], As, Bs, gA, gB):
        r = a.shape[1]
        for g, x, key in ((ga, a, "A"), (gb, b, "B")):
            root = np.real(scipy.linalg.sqrtm(g.T @ g + eps * np.eye(r)))
            ref = g @ np.linalg.inv(root)
            assert _rel(-p["delta_" + key] / lr, ref) < 1e-9
            assert _rel(p[key], x - lr * ref) < 1e-9
    # the accumulator is the running sum of g^T g
    H = [np.zeros((a.shape[1],) * 2) for a in As]
    A, B = As, Bs
    for rec in recs:
        gA, _ = grad_fn(A, B)
        H = [h + g.T @ g for h, g in zip(H, gA)]
        for p, h in zip(rec, H):
            assert _rel(p["H_A"], h) < 1e-12
        A, B = [p["A"] for p in rec], [p["B"] for p in rec]


def _adamw_on_z(Z0, grad_z, steps, lr, betas, eps, wd):
    """Plain AdamW (Loshchilov & Hutter, Alg. 2) on the full matrix, for the LoFT checks."""
    b1, b2 = betas
    Z, m, v, out = Z0.copy(), np.zeros_like(Z0), np.zeros_like(Z0), []
    for k in range(steps):
        g = grad_z(Z)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        Z = Z * (1 - lr * wd) - lr * (m / (1 - b1 ** (k + 1))) / (np.sqrt(v / (1 - b2 ** (k + 1))) + eps)
        out.append(Z)
    return out


@pytest.mark.parametrize("alternate", [True, False])
def test_loft_at_full_rank_is_adamw_on_z(alternate):
    # r = m = n: the projections are the identity, so LoFT's Z is AdamW's W step for step (the paper's
    # claim); with alternate=False both factors move by the full update and the claim does not hold
    As, Bs, grad_fn = quadratic_problem(5, 5, 5, seed=17)
    As, Bs, targets = As[:1], Bs[:1], grad_fn.targets[:1]
    As[0] = As[0] + 2 * np.eye(5)  # well-conditioned factors (cond < 10)
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    recs = run_loft(As, Bs, grad_fn, 30, alternate=alternate, **kw)
    adamw = _adamw_on_z(
        As[0] @ Bs[0].T, lambda z: z - targets[0], 30, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"]
    )
    gaps = [_rel(rec[0]["Z"], z) for rec, z in zip(recs, adamw)]
    if alternate:
        assert max(gaps) < 1e-11
    else:
        assert max(gaps) > 1e-3


def test_loft_first_step_closed_form_and_alternation():
    As, Bs, grad_fn = quadratic_problem(8, 6, 3, seed=18)
    lr, eps = 0.01, 1e-8
    recs = run_loft(As, Bs, grad_fn, 2, lr, eps=eps)
    for p, a, b, zt in zip(recs[0], As, Bs, grad_fn.targets):
        P = b @ np.linalg.solve(b.T @ b, b.T)  # projector onto the columns of B
        GP = (a @ b.T - zt) @ P
        # first step: m̂ = GP, √v̂ = |GP| entrywise, then projected onto B's columns; B does not move
        assert _rel(p["Z"], a @ b.T - lr * (GP / (np.abs(GP) + eps)) @ P) < 1e-12
        assert np.array_equal(p["B"], b)
    for p0, p1 in zip(recs[0], recs[1]):
        assert np.array_equal(p1["A"], p0["A"]) and not np.array_equal(p1["B"], p0["B"])


@pytest.mark.parametrize("reference", [False, True])
def test_loft_transformation_invariance(reference):
    # the paper's equations are GL(r)-invariant; the authors' code (absolute Tikhonov terms, the
    # transposed calibration C p Cᵀ) is not, so the same check must fail for it
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=19)
    A2, B2 = _transform(As, Bs, seed=20)
    r1 = run_loft(As, Bs, grad_fn, 10, 0.01, reference=reference)
    r2 = run_loft(A2, B2, grad_fn, 10, 0.01, reference=reference)
    gap = max(_rel(p2["Z"], p1["Z"]) for rec1, rec2 in zip(r1, r2) for p1, p2 in zip(rec1, rec2))
    assert (gap > 1e-4) if reference else (gap < 1e-10)


def test_linear_problem_reset_and_determinism():
    As, Bs, grad_fn = linear_problem(6, 5, 2, seed=16)
    r1 = run_lora_rite(As, Bs, grad_fn, 4, 0.1, escape=True)
    assert grad_fn.calls == 4
    grad_fn.reset()
    r2 = run_lora_rite(As, Bs, grad_fn, 4, 0.1, escape=True)
    _assert_same_z(r1, r2, 0.0)
    g0, g1 = grad_fn.G(0), grad_fn.G(1)
    assert not np.allclose(g0[0], g1[0])
    assert g0[1].shape == (As[1].shape[0], Bs[1].shape[0])
    # inputs are never mutated
    As2, Bs2, _ = linear_problem(6, 5, 2, seed=16)
    assert all(np.array_equal(x, y) for x, y in zip(As, As2))
    assert all(np.array_equal(x, y) for x, y in zip(Bs, Bs2))


@pytest.mark.parametrize("scope", ["global", "group"])
def test_lora_rite_clipping_scope_over_groups(scope):
    """One step, pairs in two groups: the clipped norm is ``c`` over both groups (global) or per group."""
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=5, target_scale=3.0)
    clips = [0.3, 0.2]
    rec = run_lora_rite(
        As, Bs, grad_fn, 1, 0.1, clip_unmagnified_grad=clips, update_skipping=0.0, clip_scope=scope, groups=[[1], [0]]
    )[0]
    sq = [float(np.sum(p["gbar_A"] ** 2) + np.sum(p["gbar_B"] ** 2)) for p in rec]
    if scope == "group":  # pair 1 in group 0 (c = 0.3), pair 0 in group 1 (c = 0.2): each at its own c
        assert abs(np.sqrt(sq[1]) - 0.3) < 1e-12 and abs(np.sqrt(sq[0]) - 0.2) < 1e-12
    else:  # one norm: pair 1's share of it clipped at 0.3, pair 0's at 0.2, in the unclipped ratio
        unclipped = run_lora_rite(As, Bs, grad_fn, 1, 0.1, clip_unmagnified_grad=0.0, update_skipping=0.0)[0]
        sq0 = [float(np.sum(p["gbar_A"] ** 2) + np.sum(p["gbar_B"] ** 2)) for p in unclipped]
        norm = np.sqrt(sum(sq0))
        assert abs(np.sqrt(sq[1]) - 0.3 * np.sqrt(sq0[1]) / norm) < 1e-12
        assert abs(np.sqrt(sq[0]) - 0.2 * np.sqrt(sq0[0]) / norm) < 1e-12


@pytest.mark.parametrize("correct_bias", [False, True])
def test_adamwr_first_step(correct_bias):
    """The authors' AdamWr, first step by hand: ``B`` (``lora_A``) from ``A_0``'s Gram, then ``A``
    from the Gram of the ``B_1`` just written (linear solves here, ``inv`` there)."""
    As, Bs, grad_fn = quadratic_problem(8, 6, 2, seed=14)
    lr, wd, eps, reg, b1, b2 = 0.01, 0.1, 1e-6, 1e-3, 0.9, 0.98
    rec = run_scaled_adam(As, Bs, grad_fn, 1, lr, (b1, b2), eps, reg, wd, bias_correction=correct_bias, reference=True)[
        0
    ]
    gA, gB = grad_fn(As, Bs)
    size = lr * np.sqrt(1 - b2) / (1 - b1) if correct_bias else lr
    for p, a, b, ga, gb in zip(rec, As, Bs, gA, gB):
        r = a.shape[1]
        d_b = np.linalg.solve(a.T @ a + reg * np.eye(r), gb.T).T
        u = (1 - b1) * d_b / (np.sqrt(1 - b2) * np.abs(d_b) + eps)
        b_new = (b - size * u) * (1 - lr * wd)
        d_a = np.linalg.solve(b_new.T @ b_new + reg * np.eye(r), ga.T).T
        a_new = (a - size * (1 - b1) * d_a / (np.sqrt(1 - b2) * np.abs(d_a) + eps)) * (1 - lr * wd)
        assert _rel(p["D_B"], d_b) < 1e-12 and _rel(p["D_A"], d_a) < 1e-12
        assert _rel(p["B"], b_new) < 1e-12 and _rel(p["A"], a_new) < 1e-12
