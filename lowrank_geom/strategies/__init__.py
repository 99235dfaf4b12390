"""Interchangeable update rules for LoRA pairs, one file each, over the shared geometry.

Every module of this package is imported here (so each ``@register``-ed strategy in it is
registered: a new strategy is one new file), and each strategy class defined in this package is
re-exported under its class name. Other packages add strategies through the entry-point group
``lowrank_geom.strategies``, loaded on the first registry look-up (docs/new_strategy.rst).
"""

from lowrank_geom.strategies.base import (
    _REGISTRY,
    ENTRY_POINT_GROUP,
    PairBatch,
    PairUpdate,
    Strategy,
    available_strategies,
    discovered_strategies,
    get_strategy,
    import_package_modules,
    register,
)

import_package_modules(__name__, __path__)


def _package_classes() -> dict[str, type[Strategy]]:
    # registered before any entry point or run-time registration: exactly this package's own
    return {cls.__name__: cls for cls in _REGISTRY.values() if cls.__module__.startswith(__name__ + ".")}


globals().update(_package_classes())

__all__ = [
    "ENTRY_POINT_GROUP",
    "PairBatch",
    "PairUpdate",
    "Strategy",
    "available_strategies",
    "discovered_strategies",
    "get_strategy",
    "register",
    *sorted(_package_classes()),
]
