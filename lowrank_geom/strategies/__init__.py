"""Interchangeable update rules for LoRA pairs, one file each, over the shared geometry."""

from lowrank_geom.strategies.base import (
    PairBatch,
    PairUpdate,
    Strategy,
    available_strategies,
    get_strategy,
    register,
)
from lowrank_geom.strategies.lora_rite import LoRARITEStrategy
from lowrank_geom.strategies.one_sided_adagrad import OneSidedAdagradStrategy
from lowrank_geom.strategies.scaled_adam import ScaledAdamStrategy
from lowrank_geom.strategies.scaled_gd import ScaledGDStrategy

__all__ = [
    "LoRARITEStrategy",
    "OneSidedAdagradStrategy",
    "PairBatch",
    "PairUpdate",
    "ScaledAdamStrategy",
    "ScaledGDStrategy",
    "Strategy",
    "available_strategies",
    "get_strategy",
    "register",
]
