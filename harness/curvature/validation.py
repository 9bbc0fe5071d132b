"""Comparison of Gram eigenvalues with the eigenvalues of an exact GGN block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ValidationResult:
    """Agreement of the Gram eigenvalues with the exact GGN's leading eigenvalues.

    Attributes:
        max_abs_err: max |a - b| over the compared pairs (a from the Gram matrix, b exact).
        max_rel_err: max |a - b| / |b| over the pairs with |b| > atol; 0 if there are none.
        passed: Whether |a - b| <= atol + rtol |b| holds for every pair.
        num_compared: Number of compared pairs, min(N·C, D).
        rtol: Relative tolerance used.
        atol: Absolute tolerance used.
        gram_eigvals: The compared Gram eigenvalues, descending.
        exact_eigvals: The compared exact eigenvalues, descending.
    """

    max_abs_err: float
    max_rel_err: float
    passed: bool
    num_compared: int
    rtol: float
    atol: float
    gram_eigvals: Tensor
    exact_eigvals: Tensor


def compare_eigvals(
    gram_eigvals: Tensor, ggn: Tensor, rtol: float = 1e-4, atol: float = 1e-7
) -> ValidationResult:
    """Compare Gram eigenvalues with the largest eigenvalues of the exact GGN block ``ggn``.

    The GGN has rank at most min(N·C, D), so its min(N·C, D) largest eigenvalues are compared,
    in float64, with as many of the largest Gram eigenvalues.
    """
    num = min(gram_eigvals.numel(), ggn.shape[0])
    exact = torch.linalg.eigvalsh(ggn.to(torch.float64)).flip(0)[:num]
    approx = gram_eigvals.to(torch.float64).sort(descending=True).values[:num]

    abs_err = (approx - exact).abs()
    significant = exact.abs() > atol
    rel_err = abs_err[significant] / exact.abs()[significant]
    return ValidationResult(
        max_abs_err=abs_err.max().item() if num > 0 else 0.0,
        max_rel_err=rel_err.max().item() if rel_err.numel() > 0 else 0.0,
        passed=bool((abs_err <= atol + rtol * exact.abs()).all()),
        num_compared=num,
        rtol=rtol,
        atol=atol,
        gram_eigvals=approx,
        exact_eigvals=exact,
    )
