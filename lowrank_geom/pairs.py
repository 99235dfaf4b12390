"""How a LoRA pair is declared: the two factor tensors and where each one keeps its rank dim."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LoRAPair(NamedTuple):
    """One LoRA pair in the paper's orientation, ``Z = A Bᵀ`` with ``A: m×r`` and ``B: n×r``.

    A factor may be stored with its rank dim anywhere (PEFT stores ``B`` as ``lora_A.weight`` of
    shape ``r×n``, a conv ``lora_A`` as ``r×in×kh×kw``): ``a_rank_dim`` / ``b_rank_dim`` say which
    dim holds ``r``; the remaining dims, in order, are flattened into the row dim. The optimizer
    reads and writes the factors through that view and never copies them.

    Args:
        a: the factor ``A`` (rows ``m`` after flattening).
        b: the factor ``B`` (rows ``n`` after flattening).
        a_rank_dim: the dim of ``a`` that has size ``r`` (default: the last).
        b_rank_dim: the dim of ``b`` that has size ``r`` (default: the last).
        name: a label used in error messages and benchmark reports.
    """

    a: torch.Tensor
    b: torch.Tensor
    a_rank_dim: int = -1
    b_rank_dim: int = -1
    name: str | None = None


def factor_view(x: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """The ``(rows, r)`` matrix view of a stored factor (a view for parameters PEFT creates)."""
    if x.ndim == 1:
        raise ValueError(f"a LoRA factor must have at least 2 dims, got shape {tuple(x.shape)}")
    moved = x.movedim(rank_dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def factor_unview(y: torch.Tensor, like: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Inverse of :func:`factor_view`: a ``(rows, r)`` matrix back in the stored layout of ``like``."""
    moved_shape = like.movedim(rank_dim, -1).shape
    return y.reshape(moved_shape).movedim(-1, rank_dim)
