"""The table of strategies that the generic contract tests run over, built from the registry.

Every discovered strategy is in it (a module of ``lowrank_geom/strategies/`` or an entry point of
the group ``lowrank_geom.strategies``): a new strategy file is checked by every contract test
without editing anything here. A strategy may add entries to ``EXTRAS`` (its own invalid
hyperparameters, the convenience class, options that decouple its pairs) but needs none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowrank_geom import (
    LoRARITE,
    LowRankOptimizer,
    OneSidedAdagrad,
    ScaledAdam,
    ScaledGD,
)
from lowrank_geom.strategies import Strategy, discovered_strategies, get_strategy


@dataclass
class StrategyInfo:
    name: str
    #: builds the optimizer: ``cls(pairs, lr=..., **hyperparameters)``
    cls: Callable[..., LowRankOptimizer]
    strategy: Strategy
    lr: float = 1e-2
    #: (hyperparameters, exception, message regex) the constructor must reject
    errors: list = field(default_factory=list)
    #: extra kwargs making every pair's step independent of the others and never skipped
    #: (LoRA-RITE clips over a whole group and skips factors whose gradient RMS exceeds 1)
    independent: dict = field(default_factory=dict)

    @property
    def has_betas(self) -> bool:
        return "betas" in self.strategy.defaults


#: LoRA-RITE's Algorithm 1 as the paper states it: summed second moment with the escaped mass,
#: no bias correction, row normalisation, clipping or update skipping (the package's safeguards on)
RITE_ALGORITHM_1 = dict(
    escape=True,
    second_moment="sum",
    bias_correction=False,
    row_normalize=False,
    clip_unmagnified_grad=0.0,
    update_skipping=0.0,
)
#: ... and with the package's safeguards off too: the update of the paper's equations, step for step
RITE_ALGORITHM_1_UNGUARDED = dict(RITE_ALGORITHM_1, relative_step_cap=0.0, rebalance=0.0)

COMMON_ERRORS = [
    (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    (dict(not_a_hyperparameter=1), TypeError, r"unexpected hyperparameter"),
]

EXTRAS: dict[str, dict[str, Any]] = {
    "altlora": dict(
        errors=[
            (dict(beta=1.0), ValueError, r"Invalid beta value: 1.0"),
            (dict(delta=-1.0), ValueError, r"Invalid delta value: -1.0"),
            (dict(relative_step_cap=-1.0), ValueError, r"Invalid relative_step_cap value: -1.0"),
            (dict(bias_correction="yes"), ValueError, r"Invalid bias_correction value"),
            (dict(alternate="yes"), ValueError, r"Invalid alternate value"),
        ],
    ),
    "lora_rite": dict(
        cls=LoRARITE,
        errors=[
            (dict(eps=-1e-3), ValueError, r"Invalid epsilon value: -0.001"),
            (dict(betas=(1.0, 0.9)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
            (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0.1"),
            (dict(second_moment="max"), ValueError, r"Invalid second_moment"),
            (dict(basis="svd"), ValueError, r"Invalid basis"),
            (dict(update_skipping=-1.0), ValueError, r"Invalid update_skipping value"),
            (dict(clip_unmagnified_grad=-1.0), ValueError, r"Invalid clip_unmagnified_grad value"),
            (dict(clip_scope="all"), ValueError, r"Invalid clip_scope: 'all'"),
            (dict(escape=1), ValueError, r"Invalid escape: 1"),  # an int is not a flag
        ],
        independent=dict(clip_unmagnified_grad=0.0, update_skipping=0.0),
    ),
    "scaled_gd": dict(
        cls=ScaledGD,
        errors=[
            (dict(momentum=1.0), ValueError, r"Invalid momentum value: 1.0"),
            (dict(delta=-1.0), ValueError, r"Invalid delta value: -1.0"),
        ],
    ),
    "scaled_adam": dict(
        cls=ScaledAdam,
        errors=[
            (dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0"),
            (dict(betas=(0.9, 1.5)), ValueError, r"Invalid beta parameter at index 1: 1.5"),
            (dict(reference="authors"), ValueError, r"Invalid reference: 'authors'"),
            (dict(bias_correction=0), ValueError, r"Invalid bias_correction: 0"),
        ],
    ),
    "loft": dict(
        errors=[
            (dict(betas=(0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1: 1.0"),
            (dict(eps=-1e-8), ValueError, r"Invalid epsilon value"),
            (dict(alternate="yes"), ValueError, r"Invalid alternate"),
            (dict(reference=1), ValueError, r"Invalid reference"),
        ],
    ),
    "one_sided_adagrad": dict(
        cls=OneSidedAdagrad, errors=[(dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0")]
    ),
}


def _info(name: str) -> StrategyInfo:
    strat = get_strategy(name)
    extra = dict(EXTRAS.get(name, {}))
    errors = list(COMMON_ERRORS) + extra.pop("errors", [])
    if "weight_decay" in strat.defaults:
        errors.append((dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1"))
    cls = extra.pop("cls", functools.partial(LowRankOptimizer, strategy=name))
    return StrategyInfo(name, cls, strat, errors=errors, **extra)


def shipped_strategies() -> list[str]:
    """The strategies found by discovery: this package's modules and installed entry points
    (group ``lowrank_geom.strategies``); not those tests register ad hoc."""
    return list(discovered_strategies())


STRATEGIES = [_info(name) for name in shipped_strategies()]
IDS = [s.name for s in STRATEGIES]


def declared_moves(opt: torch.optim.Optimizer, a: torch.Tensor) -> tuple[bool, bool]:
    """Whether the next step of ``opt`` may move the pair whose A is ``a``, resp. its B, as its
    strategy declares (:meth:`Strategy.moves` at the pair's step count); both for any optimizer
    other than a :class:`LowRankOptimizer` (every ``torch.optim`` one moves every parameter)."""
    if not isinstance(opt, LowRankOptimizer):
        return True, True
    group = next(g for g in opt.param_groups if any(p is a for p in g["params"]))
    step = int(opt.state[a]["step"]) if "step" in opt.state.get(a, {}) else 0
    moves = get_strategy(group["strategy"]).moves(group, step)
    return bool(moves[0]), bool(moves[1])


def switched_values(strat: Strategy, key: str) -> list[Any]:
    """Values to switch hyperparameter ``key`` to mid-run: every other declared choice of a
    string option, the other boolean, and a different valid number (half, or 0.5 from 0)."""
    value = strat.defaults[key]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, str):
        # a string option must declare its values (Strategy.choices) so all of them are tested
        return [c for c in strat.choices[key] if c != value]
    if isinstance(value, tuple):
        return [tuple(v / 2 for v in value)]
    if isinstance(value, (int, float)):
        return [value / 2 if value else 0.5]
    raise TypeError(f"{strat.name}: no rule to switch hyperparameter {key}={value!r}; extend switched_values")
