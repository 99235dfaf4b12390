"""The fixed-rank quotient ``(R^{m×r}_* × R^{n×r}_*) / GL(r)`` as pure functions over batched tensors.

Everything here works on tensors batched over leading dims, ``(..., m, r)``, in the paper's
orientation ``Z = A Bᵀ``. Nothing here keeps optimizer state or imports from a higher layer.
"""

from lowrank_geom.geometry.factors import balance, magnitude_pinv, orthonormal_basis
from lowrank_geom.geometry.gauge import (
    balancing_gauge,
    factorization_excess,
    gauge_act,
    norm_balance,
    random_gauge,
    scale_gauge,
)
from lowrank_geom.geometry.gramian import (
    GRAM_DTYPE,
    gram,
    gram_cutoff,
    gram_pinv,
    gram_relative_change_cap,
    inverse_magnitude,
    magnify,
    relative_change_cap,
    unmagnify,
)
from lowrank_geom.geometry.invariance import invariance_gap
from lowrank_geom.geometry.psd import (
    PSDNumericsError,
    compute_dtype,
    damped_inverse,
    eigenvalue_distance,
    eigh_resolution,
    eigh_safe,
    gradient_resolution,
    inverse_root,
    inverse_root_eig,
    symmetrize,
    unresolved_directions,
)
from lowrank_geom.geometry.transport import (
    basis_transport,
    transport_first_moment,
    transport_second_moment,
)

__all__ = [
    "GRAM_DTYPE",
    "FixedRankQuotient",
    "PSDNumericsError",
    "RankDeficientError",
    "balance",
    "balancing_gauge",
    "basis_transport",
    "compute_dtype",
    "damped_inverse",
    "eigenvalue_distance",
    "eigh_resolution",
    "eigh_safe",
    "factorization_excess",
    "gauge_act",
    "gradient_resolution",
    "gram",
    "gram_cutoff",
    "gram_pinv",
    "gram_relative_change_cap",
    "invariance_gap",
    "inverse_magnitude",
    "inverse_root",
    "inverse_root_eig",
    "magnify",
    "magnitude_pinv",
    "norm_balance",
    "orthonormal_basis",
    "random_gauge",
    "relative_change_cap",
    "scale_gauge",
    "symmetrize",
    "transport_first_moment",
    "transport_second_moment",
    "unmagnify",
    "unresolved_directions",
]


def __getattr__(name: str):
    # geoopt (and its import-time warnings) is loaded only when the manifold is asked for
    if name in ("FixedRankQuotient", "RankDeficientError"):
        from lowrank_geom.geometry import manifold

        return getattr(manifold, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
