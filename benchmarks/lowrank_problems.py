r"""Problem generators and exact reference quantities shared by the ``convex`` and ``regret`` suites.

Everything is float64 by default and seeded through explicit ``torch.Generator`` objects, so the
same seed gives the same numbers.

**Convex suite** (Tong, Ma & Chi, JMLR 2021, "Accelerating ill-conditioned low-rank matrix
estimation via scaled gradient descent"; set-up as in the authors' MATLAB scripts
``matrix/MS.m`` / ``matrix/MC.m`` of github.com/Titan-Tong/ScaledGD):

* planted target ``X⋆ = U⋆ diag(σ) V⋆ᵀ`` with ``U⋆, V⋆`` orthonormal bases of random ±1 matrices
  and ``σ`` **linearly** spaced from 1 to ``1/κ`` (the authors' ``linspace(1, 1/kappa, r)``), so
  ``σ_max(X⋆) = 1`` and the condition number is exactly ``κ``. (The authors' scripts draw
  ``V⋆`` from the same seed matrix as ``U⋆`` — a typo that makes ``X⋆`` symmetric; we draw it
  independently.) ``spacing="log"`` gives geometric spacing instead.
* matrix sensing: ``y_i = ⟨A_i, X⋆⟩`` with ``A_i`` i.i.d. ``N(0, 1/m)`` entries (so
  ``E[𝒜*𝒜] = I``), loss ``f(X) = ½‖𝒜(X) − y‖²``; spectral initialization from ``𝒜*(y)``.
* matrix completion: each entry observed independently with probability ``p``, loss
  ``f(X) = (1/2p)‖P_Ω(X − X⋆)‖_F²``; spectral initialization from ``P_Ω(X⋆)/p``.
* spectral initialization ``A₀ = U₀Σ₀^{1/2}``, ``B₀ = V₀Σ₀^{1/2}`` from the top-``r`` SVD.

With these normalizations the paper's step sizes apply unchanged: ScaledGD ``η = 0.5`` and
vanilla GD ``η = 0.5/σ_max(X⋆)`` (= 0.5 here).

**Regret suite** (LoRA-RITE paper §3.3): online losses over ``Z = A Bᵀ`` with the constraint set
``𝒦 = {A Bᵀ : ‖A‖_F ≤ D_A, ‖B‖_F ≤ D_B}``, which equals ``{Z : rank Z ≤ r, ‖Z‖_* ≤ D_A D_B}``
(``‖A Bᵀ‖_* ≤ ‖A‖_F‖B‖_F`` by Cauchy–Schwarz; conversely ``A = cUΣ^{1/2}``,
``B = VΣ^{1/2}/c`` with ``c² = D_A/D_B`` is feasible whenever ``‖Z‖_* ≤ D_A D_B``). So

* linear losses ``f_t(Z) = ⟨G_t, Z⟩``: ``min_𝒦 ⟨S, Z⟩ = −D_A D_B σ₁(S)`` for ``S = Σ_t G_t``
  (:func:`linear_comparator`);
* quadratic losses ``f_t(Z) = ½‖Z − C_t‖_F²``: ``Σ_t f_t(Z) = (T/2)‖Z − M_T‖² + const`` with
  ``M_T`` the mean of the ``C_t``, minimized over 𝒦 by projecting the top-``r`` singular values
  of ``M_T`` onto the ℓ₁ ball of radius ``D_A D_B`` (:func:`project_rank_nuclear`; for
  nonnegative sorted values the best ``r``-sparse point of the ℓ₁ ball keeps the ``r`` largest
  entries). Both comparators are exact, so the reported regret is exact.

:func:`fit_loglog_slope` fits the slope of ``log y`` against ``log T`` (see its docstring for the
confidence interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.common import torch_threads  # noqa: F401  (the suites call it as lp.torch_threads)

DTYPE = torch.float64


def json_safe(x):
    """``x`` with every non-finite float (and NumPy scalar) made strict-JSON safe: inf/NaN → None."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


# ------------------------------------------------------------------------------ planted targets
def singular_values(r: int, kappa: float, spacing: str = "linear", dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """``σ`` from 1 down to ``1/κ``: ``"linear"`` (Tong et al.'s ``linspace(1, 1/κ, r)``) or ``"log"``."""
    if kappa < 1:
        raise ValueError(f"condition number must be >= 1, got {kappa}")
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    if r == 1 and kappa != 1:
        raise ValueError("a rank-1 target has condition number 1")
    if spacing == "linear":
        return torch.linspace(1.0, 1.0 / kappa, r, dtype=dtype)
    if spacing == "log":
        return torch.logspace(0.0, -math.log10(kappa), r, dtype=dtype)
    raise ValueError(f"spacing must be 'linear' or 'log', got {spacing!r}")


def random_sign_basis(n: int, r: int, gen: torch.Generator, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """An orthonormal basis of the span of a random ±1 ``n×r`` matrix (the authors' ``svds(sign(rand−½))``)."""
    s = torch.randint(0, 2, (n, r), generator=gen, dtype=torch.int64).to(dtype) * 2 - 1
    q, rr = torch.linalg.qr(s)
    return q * torch.sign(torch.diagonal(rr))


def planted_target(
    n1: int,
    n2: int,
    r: int,
    kappa: float,
    gen: torch.Generator,
    *,
    spacing: str = "linear",
    dtype: torch.dtype = DTYPE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X⋆, U⋆, σ, V⋆)`` with ``X⋆ = U⋆ diag(σ) V⋆ᵀ`` of rank ``r`` and condition number ``κ``."""
    u = random_sign_basis(n1, r, gen, dtype)
    v = random_sign_basis(n2, r, gen, dtype)
    sigma = singular_values(r, kappa, spacing, dtype)
    return (u * sigma) @ v.T, u, sigma, v


# --------------------------------------------------------------------------- convex problems
@dataclass
class LowRankEstimation:
    """Base of the two estimation problems: a planted ``X⋆`` and a quadratic loss ``f(X)``."""

    x_star: torch.Tensor
    sigma: torch.Tensor
    r: int
    kappa: float

    def loss(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def grad(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spectral_matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        return float(self.sigma.max())

    def rel_error(self, z: torch.Tensor) -> float:
        """``‖Z − X⋆‖_F / ‖X⋆‖_F``."""
        return float(torch.linalg.matrix_norm(z.detach() - self.x_star) / torch.linalg.matrix_norm(self.x_star))

    def spectral_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A₀ = U₀Σ₀^{1/2}``, ``B₀ = V₀Σ₀^{1/2}`` from the top-``r`` SVD of the spectral matrix."""
        u, s, vh = torch.linalg.svd(self.spectral_matrix(), full_matrices=False)
        root = s[: self.r].sqrt()
        return u[:, : self.r] * root, vh[: self.r].T * root


@dataclass
class MatrixSensing(LowRankEstimation):
    """``y = 𝒜(X⋆)``, ``𝒜(X)_i = ⟨A_i, X⟩`` with ``A_i`` i.i.d. ``N(0, 1/m)``; ``f(X) = ½‖𝒜(X) − y‖²``.

    The operator is stored densely as an ``m × n₁n₂`` matrix (row ``i`` is ``vec(A_i)``, row-major).
    """

    ops: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    y: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]

    @classmethod
    def generate(
        cls,
        n1: int,
        n2: int,
        r: int,
        kappa: float,
        *,
        m: int | None = None,
        seed: int = 0,
        spacing: str = "linear",
        dtype: torch.dtype = DTYPE,
    ) -> MatrixSensing:
        """``m`` defaults to the paper's ``5 n r`` (``n = max(n₁, n₂)``)."""
        gen = generator(seed)
        x, _, sigma, _ = planted_target(n1, n2, r, kappa, gen, spacing=spacing, dtype=dtype)
        m = 5 * max(n1, n2) * r if m is None else int(m)
        ops = torch.randn(m, n1 * n2, generator=gen, dtype=dtype).div_(math.sqrt(m))  # in place: 6.4 GB at full size
        return cls(x_star=x, sigma=sigma, r=r, kappa=kappa, ops=ops, y=ops @ x.reshape(-1))

    @property
    def m(self) -> int:
        return self.ops.shape[0]

    def measure(self, z: torch.Tensor) -> torch.Tensor:
        """``𝒜(Z)`` (differentiable)."""
        return self.ops @ z.reshape(-1)

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """``𝒜*(v) = Σ_i v_i A_i``."""
        return (self.ops.T @ v).reshape(self.x_star.shape)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.measure(z) - self.y).pow(2).sum()

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.measure(z) - self.y)

    def spectral_matrix(self) -> torch.Tensor:
        return self.adjoint(self.y)


@dataclass
class MatrixCompletion(LowRankEstimation):
    """Entries observed i.i.d. with probability ``p``; ``f(X) = (1/2p)‖P_Ω(X − X⋆)‖_F²``."""

    mask: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    p: float = 0.2

    @classmethod
    def generate(
        cls,
        n1: int,
        n2: int,
        r: int,
        kappa: float,
        *,
        p: float = 0.2,
        seed: int = 0,
        spacing: str = "linear",
        dtype: torch.dtype = DTYPE,
    ) -> MatrixCompletion:
        gen = generator(seed)
        x, _, sigma, _ = planted_target(n1, n2, r, kappa, gen, spacing=spacing, dtype=dtype)
        mask = (torch.rand(n1, n2, generator=gen, dtype=torch.float64) < p).to(dtype)
        return cls(x_star=x, sigma=sigma, r=r, kappa=kappa, mask=mask, p=p)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 / self.p) * (self.mask * (z - self.x_star)).pow(2).sum()

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        return self.mask * (z - self.x_star) / self.p

    def spectral_matrix(self) -> torch.Tensor:
        return self.mask * self.x_star / self.p


def make_estimation_problem(kind: str, n: int, r: int, kappa: float, *, seed: int = 0, **kw) -> LowRankEstimation:
    """``kind`` ``"sensing"`` (``m`` keyword, default ``5nr``) or ``"completion"`` (``p`` keyword)."""
    if kind == "sensing":
        return MatrixSensing.generate(n, n, r, kappa, seed=seed, **kw)
    if kind == "completion":
        return MatrixCompletion.generate(n, n, r, kappa, seed=seed, **kw)
    raise ValueError(f"unknown problem kind {kind!r}")


def iterations_to_target(errors: list[float] | np.ndarray, target: float) -> int | None:
    """The first iteration index ``t`` with ``errors[t] ≤ target`` (``errors[0]`` is the start), or None."""
    e = np.asarray(errors, dtype=float)
    hit = np.nonzero(e <= target)[0]
    return int(hit[0]) if hit.size else None


def extrapolate_iterations(errors: list[float] | np.ndarray, target: float, window: int = 200) -> float | None:
    """Iterations to ``target`` extrapolated from the last ``window`` iterations' linear rate.

    For a run stopped at the cap: ``t_cap + log(e_cap / target) / r`` where ``r`` is the least-squares
    slope of ``−log e_t`` over the last ``window`` iterations (a linearly convergent method's
    asymptotic rate). ``None`` when the error is not decreasing there (a plateau or divergence).
    """
    e = np.asarray(errors, dtype=float)
    hit = iterations_to_target(e, target)
    if hit is not None:
        return float(hit)
    w = min(window, e.size - 1)
    if w < 10 or not np.all(np.isfinite(e[-w:])) or np.any(e[-w:] <= 0):
        return None
    t = np.arange(e.size - w, e.size, dtype=float)
    rate = -np.polyfit(t, np.log(e[-w:]), 1)[0]
    if not rate > 1e-12:
        return None
    return float(e.size - 1 + math.log(e[-1] / target) / rate)


# ---------------------------------------------------------------------------- online problems
def frob(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two dims."""
    return torch.linalg.matrix_norm(x)


def project_frobenius_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    """``x · min(1, radius/‖x‖_F)`` over the last two dims (batched)."""
    n = frob(x).unsqueeze(-1).unsqueeze(-1)
    return x * torch.clamp(radius / torch.clamp(n, min=torch.finfo(x.dtype).tiny), max=1.0)


def linear_comparator(
    s: torch.Tensor, d_a: float, d_b: float, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``min_{‖A‖_F≤D_A, ‖B‖_F≤D_B} ⟨S, A Bᵀ⟩ = −D_A D_B σ₁(S)`` and a minimizer ``(A⋆, B⋆)``.

    ``|tr(Aᵀ S B)| ≤ σ₁(S)‖A‖_F‖B‖_F``, attained by the rank-1 ``A⋆ = D_A u₁e₁ᵀ``,
    ``B⋆ = −D_B v₁e₁ᵀ`` (``u₁, v₁`` the top singular pair of ``S``). Batched over leading dims.
    Returns ``(value, A⋆, B⋆)``.
    """
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)
    value = -d_a * d_b * sv[..., 0]
    a = torch.zeros(s.shape[:-1] + (r,), dtype=s.dtype)
    b = torch.zeros(s.shape[:-2] + (s.shape[-1], r), dtype=s.dtype)
    a[..., 0] = d_a * u[..., :, 0]
    b[..., 0] = -d_b * vh[..., 0, :]
    return value, a, b


def project_l1_nonneg(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of a nonnegative vector (last dim) onto ``{x ≥ 0, Σx ≤ radius}``."""
    if radius <= 0:
        return torch.zeros_like(v)
    out = []
    for row in v.reshape(-1, v.shape[-1]):
        row = torch.clamp(row, min=0.0)
        if float(row.sum()) <= radius:
            out.append(row)
            continue
        mu, _ = torch.sort(row, descending=True)
        css = torch.cumsum(mu, 0)
        k = torch.arange(1, row.numel() + 1, dtype=row.dtype)
        cond = mu - (css - radius) / k > 0
        rho = int(torch.nonzero(cond)[-1])
        tau = (css[rho] - radius) / (rho + 1)
        out.append(torch.clamp(row - tau, min=0.0))
    return torch.stack(out).reshape(v.shape)


def project_rank_nuclear(
    m: torch.Tensor, r: int, radius: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projection of ``M`` onto ``{rank ≤ r, ‖Z‖_* ≤ radius}`` (``radius=None``: rank only).

    Returns ``(U_r, σ', V_r)`` with ``Z = U_r diag(σ') V_rᵀ``: the top-``r`` singular values of ``M``
    projected onto the nonnegative ℓ₁ ball (unitarily invariant set ⇒ projection acts on the
    singular values; the best ``r``-sparse point of the ℓ₁ ball keeps the ``r`` largest). Batched.
    """
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    s = sv[..., :r]
    if radius is not None:
        s = project_l1_nonneg(s, radius)
    return u[..., :, :r], s, vh[..., :r, :].mT


def balanced_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, d_a: float, d_b: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = c U Σ^{1/2}``, ``B = V Σ^{1/2}/c`` with ``c² = D_A/D_B``: feasible when ``Σσ ≤ D_A D_B``."""
    c = math.sqrt(d_a / d_b)
    root = s.clamp(min=0).sqrt().unsqueeze(-2)
    return c * u * root, v * root / c


def fit_loglog_slope(
    t: np.ndarray | list[float], y: np.ndarray | list[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Least-squares slope of ``log y`` on ``log t`` with a ``level`` confidence interval.

    * ``y`` of shape ``(len(t),)``: one series; ordinary least squares, CI ``slope ± t_{q, k−2}·SE``
      with the usual OLS standard error (``k`` points, residual variance with ``k − 2`` dof).
    * ``y`` of shape ``(seeds, len(t))``: one OLS slope per seed; the point estimate is their mean
      and the CI is the Student-t interval over seeds, ``mean ± t_{q, n−1}·sd/√n``. With a single
      seed this falls back to the OLS interval.

    Points where ``y`` is not finite or not positive (no logarithm) are dropped, per series; a
    series needs at least 3 points. Returns ``(slope, ci_low, ci_high)``.
    """
    from scipy import stats

    tt = np.asarray(t, dtype=float)
    yy = np.asarray(y, dtype=float)
    q = 0.5 + level / 2.0

    def ols(ts: np.ndarray, ys: np.ndarray) -> tuple[float, float, int]:
        ok = np.isfinite(ys) & (ys > 0) & np.isfinite(ts) & (ts > 0)
        x, z = np.log(ts[ok]), np.log(ys[ok])
        k = x.size
        if k < 3:
            raise ValueError(f"fit_loglog_slope needs >= 3 positive points, got {k}")
        xc = x - x.mean()
        sxx = float(xc @ xc)
        slope = float(xc @ (z - z.mean()) / sxx)
        resid = z - z.mean() - slope * xc
        se = math.sqrt(float(resid @ resid) / (k - 2) / sxx) if k > 2 else float("nan")
        return slope, se, k

    if yy.ndim == 1 or (yy.ndim == 2 and yy.shape[0] == 1):
        slope, se, k = ols(tt, yy.reshape(-1))
        half = float(stats.t.ppf(q, k - 2)) * se
        return slope, slope - half, slope + half
    if yy.ndim != 2 or yy.shape[1] != tt.size:
        raise ValueError(f"y must have shape ({tt.size},) or (seeds, {tt.size}), got {yy.shape}")
    slopes = np.array([ols(tt, row)[0] for row in yy])
    n = slopes.size
    mean = float(slopes.mean())
    half = float(stats.t.ppf(q, n - 1)) * float(slopes.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------- online loss streams
class LinearStream:
    r"""Online linear losses ``f_t(Z) = ⟨G_t, Z⟩``: random ±1 entries scaled to ``‖G_t‖_F = G``.

    Entry ``(i, j)`` is ``+1`` with probability ``(1 + β·P_ij)/2`` for a fixed rank-one sign pattern
    ``P = sign(a) sign(b)ᵀ`` (``β = bias``), so ``E[G_t] = G β P/√(mn)`` has ``σ₁ = Gβ``. With
    ``β = 0`` the signs are fair coins: then every algorithm's loss has mean zero and the regret is
    the comparator's ``D_A D_B σ₁(Σ G_t) ~ √T`` alone; ``β > 0`` makes the learner find the
    comparator's direction. One independent stream per seed (``P`` is shared, from ``pattern_seed``),
    drawn in fixed chunks so the sequence depends only on the seed. ``next()`` returns the
    ``(P, m, n)`` batch of ``G_t`` over seeds.
    """

    def __init__(
        self, seeds: list[int], m: int, n: int, g: float, bias: float = 0.0, pattern_seed: int = 0, chunk: int = 512
    ) -> None:
        if not 0.0 <= bias <= 1.0:
            raise ValueError(f"bias must be in [0, 1], got {bias}")
        self.gens = [generator(10_000 + s) for s in seeds]
        self.m, self.n, self.g, self.chunk = m, n, g, chunk
        pg = generator(30_000 + pattern_seed)
        a = torch.randint(0, 2, (m, 1), generator=pg, dtype=torch.int64).to(DTYPE) * 2 - 1
        b = torch.randint(0, 2, (1, n), generator=pg, dtype=torch.int64).to(DTYPE) * 2 - 1
        self.pattern = a * b
        self.prob_plus = 0.5 * (1.0 + bias * self.pattern)
        self.mean = g * bias * self.pattern / math.sqrt(m * n)
        self._buf: torch.Tensor | None = None
        self._i = 0

    def next(self) -> torch.Tensor:
        if self._buf is None or self._i == self.chunk:
            scale = self.g / math.sqrt(self.m * self.n)
            self._buf = torch.stack(
                [
                    (torch.rand(self.chunk, self.m, self.n, generator=gen, dtype=DTYPE) < self.prob_plus).to(DTYPE)
                    * (2 * scale)
                    - scale
                    for gen in self.gens
                ],
                1,
            )
            self._i = 0
        out = self._buf[self._i]
        self._i += 1
        return out


class QuadraticStream:
    r"""Stochastic quadratic tracking ``f_t(Z) = ½‖Z − Z⋆ − ξ_t‖_F²``, ``ξ_t`` i.i.d. ``N(0, σ_ξ²)`` entries.

    ``next()`` returns the ``(P, m, n)`` batch of targets ``C_t = Z⋆ + ξ_t`` (same ``Z⋆`` for every
    stream, independent noise per seed).
    """

    def __init__(self, seeds: list[int], z_star: torch.Tensor, noise: float, chunk: int = 512) -> None:
        self.gens = [generator(20_000 + s) for s in seeds]
        self.z_star, self.noise, self.chunk = z_star, noise, chunk
        self._buf: torch.Tensor | None = None
        self._i = 0

    def next(self) -> torch.Tensor:
        if self._buf is None or self._i == self.chunk:
            m, n = self.z_star.shape
            self._buf = self.z_star + self.noise * torch.stack(
                [torch.randn(self.chunk, m, n, generator=gen, dtype=DTYPE) for gen in self.gens], 1
            )
            self._i = 0
        out = self._buf[self._i]
        self._i += 1
        return out


def worst_case_first_order(
    g_theta: torch.Tensor, sum_ga: torch.Tensor, sum_gb: torch.Tensor, d_a: float, d_b: float
) -> torch.Tensor:
    """``max_{‖A⋆‖_F≤D_A, ‖B⋆‖_F≤D_B} Σ_t ∇θ_tᵀ(θ_t − θ⋆) = Σ_t ∇θ_tᵀθ_t + D_A‖Σ∇A_t‖_F + D_B‖Σ∇B_t‖_F``.

    The theorems' first-order term bounded for every ``θ⋆`` in the set, hence for the worst one:
    the (gauge-free) linearized regret in factor space against the product of Frobenius balls.
    """
    return g_theta + d_a * frob(sum_ga) + d_b * frob(sum_gb)


class LinearRegret:
    """Exact regret and first-order term of online linear losses over 𝒦, batched over ``P`` streams.

    ``observe(G, A, B, ∇A, ∇B)`` is called with the loss revealed at ``Z_t = A_t B_tᵀ`` (before the
    step). ``regret()`` is ``Σ⟨G_t, Z_t⟩ + D_A D_B σ₁(Σ G_t)``; ``first_order()`` is
    :func:`worst_case_first_order` with ``∇A_t = G_t B_t``, ``∇B_t = G_tᵀA_t``.
    """

    def __init__(self, p: int, m: int, n: int, r: int, d_a: float, d_b: float) -> None:
        self.r, self.d_a, self.d_b = r, d_a, d_b
        self.sum_g = torch.zeros(p, m, n, dtype=DTYPE)
        self.sum_ga = torch.zeros(p, m, r, dtype=DTYPE)
        self.sum_gb = torch.zeros(p, n, r, dtype=DTYPE)
        self.loss = torch.zeros(p, dtype=DTYPE)
        self.g_theta = torch.zeros(p, dtype=DTYPE)
        self.max_grad = torch.zeros(p, dtype=DTYPE)

    def observe(self, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor) -> None:
        z = a @ b.mT
        self.loss += (g * z).sum((-2, -1))
        self.sum_g += g
        self.sum_ga += ga
        self.sum_gb += gb
        self.g_theta += (ga * a).sum((-2, -1)) + (gb * b).sum((-2, -1))
        self.max_grad = torch.maximum(self.max_grad, frob(g))

    def regret(self) -> torch.Tensor:
        value, _, _ = linear_comparator(self.sum_g, self.d_a, self.d_b, self.r)
        return self.loss - value

    def first_order(self) -> torch.Tensor:
        return worst_case_first_order(self.g_theta, self.sum_ga, self.sum_gb, self.d_a, self.d_b)


class QuadraticRegret:
    """Exact regret and first-order term of ``f_t(Z) = ½‖Z − C_t‖²`` over 𝒦 (or over rank ≤ r).

    With ``d_a = d_b = None`` the comparator set is all rank-``r`` matrices (unconstrained factors);
    otherwise 𝒦. The first-order term is :func:`worst_case_first_order` over the balls (with no
    constraint: at ``θ⋆`` = the balanced factorization of the comparator, :func:`balanced_factors`).
    """

    def __init__(self, p: int, m: int, n: int, r: int, d_a: float | None, d_b: float | None) -> None:
        self.r, self.d_a, self.d_b = r, d_a, d_b
        self.t = 0
        self.sum_c = torch.zeros(p, m, n, dtype=DTYPE)
        self.sum_c2 = torch.zeros(p, dtype=DTYPE)
        self.sum_ga = torch.zeros(p, m, r, dtype=DTYPE)
        self.sum_gb = torch.zeros(p, n, r, dtype=DTYPE)
        self.loss = torch.zeros(p, dtype=DTYPE)
        self.g_theta = torch.zeros(p, dtype=DTYPE)
        self.max_grad = torch.zeros(p, dtype=DTYPE)

    def observe(
        self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, gz: torch.Tensor
    ) -> None:
        self.t += 1
        self.loss += 0.5 * gz.pow(2).sum((-2, -1))
        self.sum_c += c
        self.sum_c2 += c.pow(2).sum((-2, -1))
        self.sum_ga += ga
        self.sum_gb += gb
        self.g_theta += (ga * a).sum((-2, -1)) + (gb * b).sum((-2, -1))
        self.max_grad = torch.maximum(self.max_grad, frob(gz))

    def _comparator(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = self.sum_c / self.t
        radius = None if self.d_a is None else self.d_a * self.d_b
        return project_rank_nuclear(mean, self.r, radius)

    def comparator_loss(self) -> torch.Tensor:
        """``min Σ_t f_t(Z) = (T/2)‖Z⋆_T − M_T‖² + ½Σ‖C_t‖² − (T/2)‖M_T‖²``."""
        u, s, v = self._comparator()
        mean = self.sum_c / self.t
        z = (u * s.unsqueeze(-2)) @ v.mT
        return (
            0.5 * self.t * (z - mean).pow(2).sum((-2, -1))
            + 0.5 * self.sum_c2
            - 0.5 * self.t * mean.pow(2).sum((-2, -1))
        )

    def regret(self) -> torch.Tensor:
        return self.loss - self.comparator_loss()

    def first_order(self) -> torch.Tensor:
        if self.d_a is not None:
            return worst_case_first_order(self.g_theta, self.sum_ga, self.sum_gb, self.d_a, self.d_b)
        u, s, v = self._comparator()
        a, b = balanced_factors(u, s, v, 1.0, 1.0)
        return self.g_theta - (self.sum_ga * a).sum((-2, -1)) - (self.sum_gb * b).sum((-2, -1))


def checkpoints(t_max: int, per_decade: int = 8, t_min: int = 10) -> list[int]:
    """Log-spaced horizons ``t_min ≤ T ≤ t_max`` (integers, distinct, ``t_max`` included)."""
    k = max(2, round(per_decade * math.log10(t_max / t_min)) + 1)
    pts = sorted({round(x) for x in np.logspace(math.log10(t_min), math.log10(t_max), k)})
    return pts
