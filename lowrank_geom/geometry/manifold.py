r"""The fixed-rank quotient manifold of LoRA pairs as a :class:`geoopt.Manifold`.

``(R^{m×r}_* × R^{n×r}_*) / GL(r)``: pairs of full-rank factors ``(A, B)``, ``A: m×r``,
``B: n×r``, identified when they give the same ``Z = A Bᵀ`` (paper orientation). ``G ∈ GL(r)``
acts by ``(A, B) ↦ (A G, B G⁻ᵀ)``.

A point is one tensor, the pair stacked along rows, ``x = [A; B]`` of shape ``(..., m+n, r)``;
leading dims broadcast (geoopt's ``ndim = 2`` convention). Tangent vectors ``ξ = [ξ_A; ξ_B]`` have
the same layout. Tangent vectors of the quotient are represented by their *horizontal lifts*:
vectors of the total space orthogonal (under the chosen metric) to the vertical space

.. math::

    \mathcal V_x = \{(A Ω, −B Ωᵀ) : Ω ∈ R^{r×r}\},

the tangent space of the orbit ``{(A G, B G⁻ᵀ)}`` (differentiate ``(A e^{tΩ}, B e^{−tΩᵀ})``).

Two metrics on the total space:

* ``"euclidean"``: ``g(ξ, η) = tr(ξ_Aᵀ η_A) + tr(ξ_Bᵀ η_B)``. Invariant under orthogonal
  gauges only.
* ``"preconditioned"`` (Mishra & Sepulchre, *Riemannian preconditioning*, SIAM J. Optim. 2016):
  ``g(ξ, η) = tr(BᵀB ξ_Aᵀ η_A) + tr(AᵀA ξ_Bᵀ η_B)``. Invariant under all of ``GL(r)``; its
  Riemannian gradient of ``f(A Bᵀ)`` is the ScaledGD direction ``(∇_A (BᵀB)⁻¹, ∇_B (AᵀA)⁻¹)``.

This is the only module of the package that imports :mod:`geoopt`.
"""

from __future__ import annotations

from typing import Literal

import geoopt
import torch
from geoopt.utils import size2shape

from lowrank_geom.geometry.factors import orthonormal_basis
from lowrank_geom.geometry.psd import compute_dtype

__all__ = ["FixedRankQuotient", "RankDeficientError"]

Metric = Literal["euclidean", "preconditioned"]
_METRICS = ("euclidean", "preconditioned")

# (left singular vectors L (..., rows, r), singular values s (..., r) descending, V (..., r, r))
# of one factor F = L diag(s) Vᵀ.
_Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RankDeficientError(ValueError):
    """A factor of the pair is (numerically) rank-deficient or not finite.

    The quotient geometry needs ``AᵀA`` and ``BᵀB`` invertible; a zero factor (PEFT's default
    LoRA initialization) is never a point of the manifold. Subclass of :class:`ValueError`.
    """


def _rank_tol(rows: int, r: int, dtype: torch.dtype) -> float:
    """Relative singular-value cutoff ``max(rows, r) · eps`` (``torch.linalg.matrix_rank``'s)."""
    return max(rows, r) * torch.finfo(dtype).eps


def _deficient(s: torch.Tensor, tol: float) -> torch.Tensor:
    """``(...,)`` mask: ``not σ_min > tol · σ_max`` (so NaN counts as deficient, and so does 0)."""
    return ~(s[..., -1] > tol * s[..., 0])


class FixedRankQuotient(geoopt.Manifold):
    r"""The quotient ``(R^{m×r}_* × R^{n×r}_*) / GL(r)`` of LoRA pairs ``Z = A Bᵀ``.

    Horizontal projection (:meth:`proju`) solves an ``r × r`` system for the vertical part
    ``(A Ω, −B Ωᵀ)``; both metrics need ``AᵀA`` and ``BᵀB`` positive definite, so :meth:`proju`,
    :meth:`egrad2rgrad` and :meth:`transp` raise :class:`RankDeficientError` (a ``ValueError``) on
    a pair with a numerically rank-deficient or non-finite factor (singular values with
    ``σ_min ≤ max(rows, r)·eps·σ_max``, the rule of ``torch.linalg.matrix_rank``) instead of
    returning inf/NaN. geoopt's ``check_point_on_manifold`` applies the same rule and says which
    factor failed. :meth:`inner` and :meth:`retr` invert nothing and never raise
    :class:`RankDeficientError`.

    All linear algebra runs in ``promote_types(dtype, float32)`` and results are cast back to the
    inputs' promoted dtype.

    Args:
        m: rows of ``A`` (``m × r``).
        n: rows of ``B`` (``n × r``); a point is ``[A; B]``, ``(..., m+n, r)``.
        r: the rank, ``1 ≤ r ≤ min(m, n)``.
        metric: ``"euclidean"`` or ``"preconditioned"``, the total-space metric (see the module
            docstring). ``"preconditioned"`` makes :class:`geoopt.optim.RiemannianSGD` a ScaledGD
            method.

    Example:
        >>> import geoopt, torch
        >>> from lowrank_geom.geometry.manifold import FixedRankQuotient
        >>> man = FixedRankQuotient(8, 6, 2, metric="preconditioned")
        >>> x = geoopt.ManifoldParameter(man.random(8 + 6, 2), manifold=man)
        >>> opt = geoopt.optim.RiemannianSGD([x], lr=0.5)
        >>> A, B = man.unpack(x)   # views of the packed pair, Z = A Bᵀ
    """

    name = "FixedRankQuotient"
    ndim = 2
    reversible = False

    def __init__(self, m: int, n: int, r: int, metric: Metric = "euclidean"):
        super().__init__()
        for label, val in (("m", m), ("n", n), ("r", r)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Invalid {label}: {val!r} (must be a positive int)")
        if r > min(m, n):
            raise ValueError(f"Invalid rank: r={r} > min(m, n)={min(m, n)}; no full-rank factors exist")
        if metric not in _METRICS:
            raise ValueError(f"Invalid metric: {metric!r} (expected 'euclidean' or 'preconditioned')")
        self.m = m
        self.n = n
        self.r = r
        self.metric = metric

    def extra_repr(self) -> str:
        return f"m={self.m}, n={self.n}, r={self.r}, metric={self.metric!r}"

    # ------------------------------------------------------------------ packing

    def pack(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[A; B]``: ``(..., m, r), (..., n, r)`` → ``(..., m+n, r)``, leading dims broadcast."""
        if a.dim() < 2 or tuple(a.shape[-2:]) != (self.m, self.r):
            raise ValueError(f"A must have shape (..., {self.m}, {self.r}), got {tuple(a.shape)}")
        if b.dim() < 2 or tuple(b.shape[-2:]) != (self.n, self.r):
            raise ValueError(f"B must have shape (..., {self.n}, {self.r}), got {tuple(b.shape)}")
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a = a.expand(*batch, self.m, self.r)
        b = b.expand(*batch, self.n, self.r)
        return torch.cat((a, b), dim=-2)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A; B] ↦ (A, B)``: ``(..., m+n, r)`` → views ``(..., m, r), (..., n, r)``."""
        ok, reason = self._check_shape(x.shape, "x")
        if not ok:
            raise ValueError(reason)
        return x[..., : self.m, :], x[..., self.m :, :]

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return False, reason
        if tuple(shape[-2:]) != (self.m + self.n, self.r):
            return (
                False,
                f"`{name}` should have shape (..., m+n, r) = (..., {self.m + self.n}, {self.r}), got {tuple(shape)}",
            )
        return True, None

    # ------------------------------------------------------------------ internals

    def _spectra(self, a: torch.Tensor, b: torch.Tensor, where: str) -> tuple[_Spectrum, _Spectrum]:
        """Thin SVDs ``A = L_A S_A V_Aᵀ``, ``B = L_B S_B V_Bᵀ``: QR (``orthonormal_basis``), then an
        r×r SVD of the magnitude. Raises :class:`RankDeficientError` on a deficient factor."""
        out = []
        for label, f in (("A", a), ("B", b)):
            try:
                u, mag = orthonormal_basis(f, "qr")
                w, s, vh = torch.linalg.svd(mag)
            except torch.linalg.LinAlgError as err:
                raise RankDeficientError(
                    f"{self.name}.{where}: the SVD of factor {label} failed; it probably has non-finite entries"
                ) from err
            tol = _rank_tol(f.shape[-2], self.r, s.dtype)
            if bool(_deficient(s, tol).any()):
                raise RankDeficientError(
                    f"{self.name}.{where}: factor {label} is rank-deficient or not finite "
                    f"(σ_min ≤ {tol:.3g}·σ_max); the quotient geometry needs full-rank factors "
                    "(a zero factor, PEFT's default LoRA init, is never on the manifold). "
                    "Check points with check_point_on_manifold(x, explain=True)."
                )
            out.append((u @ w, s, vh.mT))
        return out[0], out[1]

    def _omega(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        ua: torch.Tensor,
        ub: torch.Tensor,
        spec_a: _Spectrum,
        spec_b: _Spectrum,
    ) -> torch.Tensor:
        r"""The ``Ω`` (``(..., r, r)``) whose vertical vector ``(AΩ, −BΩᵀ)`` :meth:`proju` removes.

        Euclidean: the Sylvester equation ``(AᵀA) Ω + Ω (BᵀB) = Aᵀξ_A − ξ_BᵀB``, solved in the
        eigenbases ``AᵀA = V_A S_A² V_Aᵀ``, ``BᵀB = V_B S_B² V_Bᵀ``:
        ``Ω = V_A [(V_Aᵀ C V_B)_{ij} / (s_{A,i}² + s_{B,j}²)] V_Bᵀ``.
        Preconditioned: ``Ω = ½ ((AᵀA)⁻¹ Aᵀ ξ_A − ξ_Bᵀ B (BᵀB)⁻¹)``, with
        ``(AᵀA)⁻¹Aᵀ = V_A S_A⁻¹ L_Aᵀ`` (never forming the squared Gram inverse).
        """
        la, sa, va = spec_a
        lb, sb, vb = spec_b
        if self.metric == "euclidean":
            c = a.mT @ ua - ub.mT @ b
            denom = sa.square().unsqueeze(-1) + sb.square().unsqueeze(-2)
            return va @ ((va.mT @ c @ vb) / denom) @ vb.mT
        pa = va @ ((la.mT @ ua) / sa.unsqueeze(-1))  # (AᵀA)⁻¹ Aᵀ ξ_A
        qb = vb @ ((lb.mT @ ub) / sb.unsqueeze(-1))  # (BᵀB)⁻¹ Bᵀ ξ_B
        return 0.5 * (pa - qb.mT)

    def _work(self, *tensors: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        out = tensors[0].dtype
        for t in tensors[1:]:
            out = torch.promote_types(out, t.dtype)
        return out, compute_dtype(out)

    def _inner_batch(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Size:
        """The broadcast batch shape of ``x``, ``u``, ``v`` (each ``(..., m+n, r)``); else ValueError."""
        for name, t in (("x", x), ("u", u), ("v", v)):
            self._assert_check_shape(t.shape, name)
        try:
            return torch.broadcast_shapes(x.shape[:-2], u.shape[:-2], v.shape[:-2])
        except RuntimeError as err:
            raise ValueError(
                f"inner: batch dims of `x` {tuple(x.shape)}, `u` {tuple(u.shape)} and `v` "
                f"{tuple(v.shape)} do not broadcast"
            ) from err

    def _proju(self, x, ua, ub, spec_a, spec_b):
        a, b = self.unpack(x)
        omega = self._omega(a, b, ua, ub, spec_a, spec_b)
        return ua - a @ omega, ub + b @ omega.mT

    # ------------------------------------------------------------------ checks

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        """Finite entries and both factors of full numerical rank.

        Full rank means ``σ_min > max(rows, r) · eps · σ_max`` (``torch.linalg.matrix_rank``'s
        rule, ``eps`` of ``promote_types(dtype, float32)``), for every batch element. ``atol`` and
        ``rtol`` are unused (the manifold is an open set; there is no equation to hold).
        """
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.m + self.n, self.r):
            return self._check_shape(x.shape, "x")
        if not bool(torch.isfinite(x).all()):
            return False, "`x` has non-finite entries"
        work = compute_dtype(x.dtype)
        a, b = self.unpack(x.to(work))
        for label, f in (("A", a), ("B", b)):
            s = torch.linalg.svdvals(f)
            tol = _rank_tol(f.shape[-2], self.r, work)
            bad = _deficient(s, tol)
            if bool(bad.any()):
                ratio = (s[..., -1] / s[..., 0]).masked_fill(s[..., 0] == 0, 0.0)
                worst = float(ratio.min())
                what = "zero" if bool((s[..., 0] == 0).any()) else "rank-deficient"
                return (
                    False,
                    f"factor {label} of `x` is {what}: σ_min/σ_max = {worst:.3g} ≤ {tol:.3g} "
                    f"(numerical rank < r = {self.r}); FixedRankQuotient needs full-rank factors",
                )
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        """Shape, finiteness, and horizontality: ``‖u − proju(x, u)‖_x ≤ atol + rtol · ‖u‖_x``.

        ``u − proju(x, u) = (AΩ, −BΩᵀ)`` is the vertical part of ``u``, measured in the metric;
        checked for every batch element. A rank-deficient ``x`` gives ``(False, reason)``.
        """
        ok, reason = self._check_shape(u.shape, "u")
        if not ok:
            return False, reason
        try:
            torch.broadcast_shapes(x.shape, u.shape)
        except RuntimeError:
            return (
                False,
                f"`u` of shape {tuple(u.shape)} does not broadcast with `x` {tuple(x.shape)}",
            )
        if not bool(torch.isfinite(u).all()):
            return False, "`u` has non-finite entries"
        try:
            vertical = u - self.proju(x, u)
        except RankDeficientError as err:
            return False, str(err)
        nv = self.norm(x, vertical)
        nu = self.norm(x, u)
        bad = ~(nv <= atol + rtol * nu)
        if bool(bad.any()):
            return (
                False,
                f"`u` is not horizontal: its vertical part (AΩ, −BΩᵀ) has {self.metric} norm "
                f"{float(nv.max()):.3g} > atol + rtol·‖u‖ with atol={atol}, rtol={rtol}; "
                "project it with proju(x, u)",
            )
        return True, None

    # ------------------------------------------------------------------ geometry

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Identity on shape-valid points: ``(..., m+n, r)`` → the same tensor.

        The full-rank pairs form an open set, so there is nothing to project a full-rank pair onto,
        and a rank-deficient pair has no nearest full-rank pair (the infimum is not attained): such
        a pair is returned unchanged, and the metric operations reject it with
        :class:`RankDeficientError`. Only the shape is checked (``ValueError``).
        """
        self._assert_check_shape(x.shape, "x")
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Metric-orthogonal projection of ``u`` onto the horizontal space at ``x``.

        Shapes ``(..., m+n, r)`` for both (leading dims broadcast). Returns
        ``(ξ_A − A Ω, ξ_B + B Ωᵀ)``, with ``Ω`` fixed by the horizontal condition
        ``g(proju(u), (AΩ', −BΩ'ᵀ)) = 0`` for all ``Ω'``:

        * Euclidean, the condition is ``Aᵀ ξ_A = ξ_Bᵀ B``, so ``Ω`` solves the Sylvester equation
          ``(AᵀA) Ω + Ω (BᵀB) = Aᵀ ξ_A − ξ_Bᵀ B`` (unique: both Grams are positive definite).
        * Preconditioned, the condition is ``Aᵀ ξ_A (BᵀB) = (AᵀA) ξ_Bᵀ B``, so
          ``2 (AᵀA) Ω (BᵀB) = Aᵀ ξ_A (BᵀB) − (AᵀA) ξ_Bᵀ B``, i.e.
          ``Ω = ½ ((AᵀA)⁻¹ Aᵀ ξ_A − ξ_Bᵀ B (BᵀB)⁻¹)``.

        Raises :class:`RankDeficientError` when a factor of ``x`` is rank-deficient or not finite.
        """
        out, work = self._work(x, u)
        x = x.to(work)
        a, b = self.unpack(x)
        ua, ub = self.unpack(u.to(work))
        spec_a, spec_b = self._spectra(a, b, "proju")
        pa, pb = self._proju(x, ua, ub, spec_a, spec_b)
        return self.pack(pa, pb).to(out)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Riemannian gradient (horizontal lift) from the Euclidean gradient ``u = [∇_A; ∇_B]``.

        Shapes ``(..., m+n, r)``. The total-space Riemannian gradient ``grad`` solves
        ``g(grad, η) = ⟨u, η⟩`` for all ``η``; the result is its horizontal part ``proju(x, grad)``:

        * Euclidean: ``grad = u``, result ``proju(x, u)``. For ``f(A Bᵀ)``,
          ``u = (∇f B, ∇fᵀ A)`` already satisfies ``Aᵀ ξ_A = ξ_Bᵀ B`` (both equal ``Aᵀ ∇f B``),
          so the projection changes nothing (up to round-off).
        * Preconditioned: ``grad = (∇_A (BᵀB)⁻¹, ∇_B (AᵀA)⁻¹)``, the ScaledGD direction. For
          ``f(A Bᵀ)`` it is horizontal (``Aᵀ∇f B`` on both sides of the condition), so the result
          is exactly ScaledGD's direction.

        The projection matters only for losses that are not gauge-invariant (e.g.
        :class:`geoopt.optim.RiemannianSGD`'s ``weight_decay`` adds ``x`` to ``u``): their vertical
        part, which does not change ``Z``, is dropped. For horizontal ``v`` in either case
        ``inner(x, egrad2rgrad(x, u), v) = ⟨u, v⟩``. Raises :class:`RankDeficientError` like
        :meth:`proju`.
        """
        out, work = self._work(x, u)
        x = x.to(work)
        a, b = self.unpack(x)
        ga, gb = self.unpack(u.to(work))
        spec_a, spec_b = self._spectra(a, b, "egrad2rgrad")
        if self.metric == "preconditioned":
            _, sa, va = spec_a
            _, sb, vb = spec_b
            ga = ((ga @ vb) / sb.square().unsqueeze(-2)) @ vb.mT  # ∇_A (BᵀB)⁻¹
            gb = ((gb @ va) / sa.square().unsqueeze(-2)) @ va.mT  # ∇_B (AᵀA)⁻¹
        pa, pb = self._proju(x, ga, gb, spec_a, spec_b)
        return self.pack(pa, pb).to(out)

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        r"""The metric ``g_x(u, v)`` (``v = u`` when omitted).

        Euclidean: ``tr(u_Aᵀ v_A) + tr(u_Bᵀ v_B)``. Preconditioned:
        ``tr(BᵀB u_Aᵀ v_A) + tr(AᵀA u_Bᵀ v_B) = Σ (u_A BᵀB) ⊙ v_A + Σ (u_B AᵀA) ⊙ v_B``.
        Inputs ``(..., m+n, r)`` broadcast, ``x`` included (under either metric); returns the
        broadcast batch shape ``(...)``, or ``(..., 1, 1)`` with ``keepdim=True`` (the point dims
        kept, as geoopt's matrix manifolds do). A wrong-shaped or non-broadcasting ``x``, ``u`` or
        ``v`` raises ``ValueError``. Nothing is inverted: a rank-deficient ``x`` gives a
        degenerate (semi-definite) form, never NaN.
        """
        if v is None:
            v = u
        batch = self._inner_batch(x, u, v)
        out, work = self._work(x, u, v)
        if self.metric == "euclidean":
            res = (u.to(work) * v.to(work)).sum(dim=(-2, -1), keepdim=keepdim)
            # the value does not depend on x, but its batch dims do count, as in geoopt.Euclidean
            return res.expand((*batch, *((1, 1) if keepdim else ()))).to(out)
        a, b = self.unpack(x.to(work))
        ua, ub = self.unpack(u.to(work))
        va, vb = self.unpack(v.to(work))
        res = ((ua @ (b.mT @ b)) * va).sum(dim=(-2, -1), keepdim=keepdim) + ((ub @ (a.mT @ a)) * vb).sum(
            dim=(-2, -1), keepdim=keepdim
        )
        return res.to(out)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The total-space retraction ``R_x(u) = (A + ξ_A, B + ξ_B)``, i.e. ``x + u``.

        Shapes ``(..., m+n, r)``, broadcast. It is a retraction of the total space, and with
        horizontal ``u`` a retraction of the quotient (the map is gauge-equivariant for the
        horizontal lifts of the preconditioned metric). Full rank is kept for small steps
        (``‖ξ_A‖₂ < σ_min(A)`` and likewise for ``B``), not for arbitrary ones.
        """
        return x + u

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`retr` (``x + u``), **not** the exponential map of either metric.

        geoopt requires ``expmap``; the quotient's geodesics have no closed form here, so this is
        the first-order retraction. Shapes ``(..., m+n, r)``.
        """
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projection-based vector transport from ``x`` to ``y``: ``proju(y, v)``.

        Shapes ``(..., m+n, r)``; ``x`` is unused (kept for geoopt's signature). The result is
        horizontal at ``y``. geoopt's default ``retr_transp`` (``y = retr(x, u)``, then this)
        is used as is. Raises :class:`RankDeficientError` when ``y`` is rank-deficient.
        """
        return self.proju(y, v)

    # ------------------------------------------------------------------ sampling

    def _point_shape(self, size) -> tuple[int, ...]:
        shape = size2shape(*size) if size else (self.m + self.n, self.r)
        self._assert_check_shape(shape, "x")
        return tuple(shape)

    def random(
        self,
        *size: int | tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        std: float = 1.0,
    ) -> geoopt.ManifoldTensor:
        """A Gaussian pair, entries ``N(0, std²)``: full rank with probability one.

        ``size`` is the full shape ``(..., m+n, r)``; empty means ``(m+n, r)``. Returns a
        :class:`geoopt.ManifoldTensor` on this manifold.
        """
        shape = self._point_shape(size)
        x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        if std != 1.0:
            x = x * std
        return geoopt.ManifoldTensor(x, manifold=self)

    def origin(
        self,
        *size: int | tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> geoopt.ManifoldTensor:
        """The deterministic pair ``A = [I_r; 0]``, ``B = [I_r; 0]`` (``Z`` = the first ``r`` unit
        diagonal entries), balanced and perfectly conditioned.

        ``size`` is the full shape ``(..., m+n, r)``; empty means ``(m+n, r)``. ``seed`` is ignored.
        """
        shape = self._point_shape(size)
        x = torch.zeros(shape, dtype=dtype, device=device)
        idx = torch.arange(self.r, device=x.device)
        x[..., idx, idx] = 1
        x[..., self.m + idx, idx] = 1
        return geoopt.ManifoldTensor(x, manifold=self)
