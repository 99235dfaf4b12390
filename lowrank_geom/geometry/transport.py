"""Basis transport: carrying r×r and m×r optimizer state from one orthonormal basis to the next."""

from __future__ import annotations

import torch

from lowrank_geom.geometry.psd import symmetrize


def basis_transport(u_new: torch.Tensor, u_old: torch.Tensor) -> torch.Tensor:
    """``P = U_newᵀ U_old`` (paper Alg. 1, ``P_{A,t} = U_{B,t}ᵀ U_{B,t−1}``). ``(..., n, r)`` → ``(..., r, r)``.

    ``P`` is a contraction (``‖P‖₂ ≤ 1``) and absorbs any sign or rotation ambiguity of the bases:
    flipping a column of ``U_new`` flips the matching row of ``P``.
    """
    return u_new.mT @ u_old


def transport_second_moment(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``P V Pᵀ``, symmetrized: an r×r second moment expressed in the new basis. ``(..., r, r)``."""
    return symmetrize(p @ v @ p.mT)


def transport_first_moment(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``M Pᵀ``: an m×r first moment expressed in the new basis. ``(..., m, r)``, ``(..., r, r)``."""
    return m @ p.mT
