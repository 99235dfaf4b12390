"""lowrank_geom: transformation-invariant, Riemannian optimization of low-rank (LoRA) adapters."""

from lowrank_geom.geometry import (
    PSDNumericsError,
    balance,
    basis_transport,
    eigenvalue_distance,
    gauge_act,
    invariance_gap,
    inverse_root,
    magnitude_pinv,
    norm_balance,
    orthonormal_basis,
    random_gauge,
    scale_gauge,
    symmetrize,
    transport_first_moment,
    transport_second_moment,
)
from lowrank_geom.optim import (
    LoRARITE,
    LowRankOptimizer,
    OneSidedAdagrad,
    ScaledAdam,
    ScaledGD,
)
from lowrank_geom.pairs import LoRAPair
from lowrank_geom.strategies import Strategy, available_strategies, get_strategy, register

__version__ = "0.1.0"

__all__ = [
    "FixedRankQuotient",
    "LoRAPair",
    "LoRARITE",
    "LowRankOptimizer",
    "OneSidedAdagrad",
    "PSDNumericsError",
    "RankDeficientError",
    "ScaledAdam",
    "ScaledGD",
    "Strategy",
    "available_strategies",
    "balance",
    "basis_transport",
    "eigenvalue_distance",
    "gauge_act",
    "get_strategy",
    "invariance_gap",
    "inverse_root",
    "magnitude_pinv",
    "norm_balance",
    "orthonormal_basis",
    "random_gauge",
    "register",
    "scale_gauge",
    "symmetrize",
    "transport_first_moment",
    "transport_second_moment",
]


def __getattr__(name: str):
    # geoopt (and its import-time warnings) is loaded only when the manifold is asked for
    if name in ("FixedRankQuotient", "RankDeficientError"):
        from lowrank_geom.geometry import manifold

        return getattr(manifold, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
