"""``invariance_gap``: does an optimizer give the same ``Z`` trajectory from every factorization?"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from lowrank_geom.geometry.gauge import gauge_act, random_gauge, scale_gauge

StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict],
    tuple[torch.Tensor, torch.Tensor],
]


def _takes_pairs(cls: type) -> bool:
    """Whether the optimizer class ``cls`` is built from ``(A, B)`` pairs rather than a flat list.

    The test is the name of the constructor's first parameter: ``pairs`` (lowrank_geom's
    ``LowRankOptimizer(pairs, ...)`` and its subclasses) versus ``params`` (torch's convention).
    A duck-typed rule, so this bottom layer needs nothing from the driver above it.
    """
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: assume torch's flat form
        return False
    return bool(params) and params[0].name == "pairs"


def _build_optimizer(optimizer: Any, a: torch.Tensor, b: torch.Tensor, kwargs: dict) -> Any:
    """One fresh optimizer over the leaves ``a``, ``b``, from a class or a factory.

    A ``torch.optim.Optimizer`` subclass is built as ``cls([(A, B)], **kwargs)`` when it takes
    pairs (:func:`_takes_pairs`), else as ``cls([A, B], **kwargs)``; any other callable as
    ``optimizer(A, B, **kwargs)``. An optimizer *instance* is refused: it is bound to other
    tensors, and each of the two runs needs its own fresh state.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer= got an instance of {type(optimizer).__name__}; pass its class or a "
            "factory (A, B, **kwargs) -> optimizer: invariance_gap builds a fresh one for each run"
        )
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if _takes_pairs(optimizer):
            opt = optimizer([(a, b)], **kwargs)
        else:
            try:
                opt = optimizer([a, b], **kwargs)
            except TypeError as err:  # most likely a pair-taking class that did not say so
                name = optimizer.__name__
                raise TypeError(
                    f"invariance_gap built {name}([A, B], **kwargs), which failed: {err}. A class "
                    "that takes (A, B) pairs is recognized by its first constructor parameter "
                    "being named `pairs`; otherwise pass a factory, e.g. "
                    f"optimizer=lambda a, b: {name}([(a, b)], ...)"
                ) from err
    elif callable(optimizer):
        opt = optimizer(a, b, **kwargs)
    else:
        raise TypeError(
            "optimizer= must be a torch.optim.Optimizer subclass or a factory (A, B, **kwargs) -> "
            f"optimizer, got {type(optimizer).__name__}"
        )
    if not all(callable(getattr(opt, name, None)) for name in ("zero_grad", "step")):
        raise TypeError(
            f"optimizer= built a {type(opt).__name__}, which has no zero_grad() and step(); "
            "a factory must return an optimizer"
        )
    return opt


def _z_trajectory(
    a: torch.Tensor,
    b: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    optimizer: Any,
    optimizer_kwargs: dict,
    step_fn: StepFn | None,
) -> list[torch.Tensor]:
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    zs = []
    if step_fn is not None:
        state: dict = {}
        for _ in range(steps):
            ga, gb = torch.autograd.grad(loss(a @ b.mT), (a, b))
            with torch.no_grad():
                a_new, b_new = step_fn(a.detach(), b.detach(), ga, gb, state)
            a = a_new.detach().requires_grad_(True)
            b = b_new.detach().requires_grad_(True)
            zs.append((a @ b.mT).detach())
        return zs
    opt = _build_optimizer(optimizer, a, b, optimizer_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss(a @ b.mT).backward()
        opt.step()
        zs.append((a @ b.mT).detach())
    return zs


def invariance_gap(
    a: torch.Tensor,
    b: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    optimizer: Any = None,
    step_fn: StepFn | None = None,
    steps: int = 10,
    gauge: torch.Tensor | float | None = None,
    generator: torch.Generator | None = None,
    return_trajectories: bool = False,
    **optimizer_kwargs: Any,
):
    """Relative gap ``max_t ‖Z_t − Z'_t‖_F / max_t ‖Z_t‖_F`` between runs from ``(A, B)`` and ``(A G, B G⁻ᵀ)``.

    Both runs take ``steps`` steps on the same loss of ``Z = A Bᵀ``; an optimizer that is invariant
    to the gauge gives a gap at round-off level, any other a gap of order one.

    Args:
        a, b: the starting pair, ``(m, r)`` and ``(n, r)`` (copied, never modified).
        loss: a function of ``Z`` (``(m, n)``) returning a scalar tensor.
        optimizer: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``, built as
            ``cls([A, B], **optimizer_kwargs)`` — or as ``cls([(A, B)], **optimizer_kwargs)`` when
            its constructor's first parameter is named ``pairs``, as for ``LowRankOptimizer``,
            ``LoRARITE``, ``ScaledGD``, ``ScaledAdam`` and ``OneSidedAdagrad`` — or a factory
            ``(A, B, **optimizer_kwargs) -> optimizer``. Not an optimizer instance: each run
            builds its own (``TypeError``).
        step_fn: instead of ``optimizer``, a function ``(A, B, ∇A, ∇B, state) -> (A_new, B_new)``
            (``state`` is a dict it may keep across steps).
        steps: number of steps ``k``.
        gauge: ``G`` as an ``(r, r)`` tensor, or a float ``s`` for ``G = s I``; default a random
            gauge with condition number 10 drawn from ``generator``.
        return_trajectories: also return the two lists of ``Z_t``.

    Returns:
        The gap as a float, or ``(gap, zs, zs_gauged)`` with ``return_trajectories=True``.

    Example:
        >>> import torch
        >>> from lowrank_geom.geometry import invariance_gap
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(6, 2, generator=g, dtype=torch.float64)
        >>> b = torch.randn(5, 2, generator=g, dtype=torch.float64)
        >>> target = torch.randn(6, 5, generator=g, dtype=torch.float64)
        >>> loss = lambda z: 0.5 * (z - target).pow(2).sum()
        >>> invariance_gap(a, b, loss, optimizer=torch.optim.Adam, lr=1e-2, gauge=10.0) > 1e-3
        True
    """
    if (optimizer is None) == (step_fn is None):
        raise ValueError("invariance_gap needs exactly one of optimizer= or step_fn=")
    if step_fn is not None and optimizer_kwargs:
        raise ValueError("optimizer keyword arguments given together with step_fn")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    r = a.shape[-1]
    if gauge is None:
        gauge = random_gauge(r, 10.0 if r > 1 else 1.0, generator, dtype=a.dtype, device=a.device)
    elif not isinstance(gauge, torch.Tensor):
        gauge = scale_gauge(float(gauge), r, dtype=a.dtype, device=a.device)
    gauge = gauge.to(dtype=a.dtype, device=a.device)
    a2, b2 = gauge_act(a.detach(), b.detach(), gauge)
    zs = _z_trajectory(a, b, loss, steps, optimizer, optimizer_kwargs, step_fn)
    zs2 = _z_trajectory(a2, b2, loss, steps, optimizer, optimizer_kwargs, step_fn)
    diff = max(torch.linalg.matrix_norm(z - z2).item() for z, z2 in zip(zs, zs2))
    scale = max(torch.linalg.matrix_norm(z).item() for z in zs)
    gap = diff / max(scale, torch.finfo(zs[0].dtype).tiny)
    if return_trajectories:
        return gap, zs, zs2
    return gap
