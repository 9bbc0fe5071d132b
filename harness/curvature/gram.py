"""Gram matrices of the GGN's symmetric factor, accumulated during one BackPACK backward pass.

The generalized Gauss-Newton matrix of a loss averaged or summed over N samples with C model
outputs factorizes as G = V Vᵀ with V of shape [D, N·C]. Its nonzero eigenvalues are those of the
Gram matrix Vᵀ V of shape [N·C, N·C], which is small when D is large. BackPACK's ``SqrtGGNExact``
and ``SqrtGGNMC`` extensions backpropagate V; the extension hook here contracts each parameter's
slice of V into its group's Gram matrix and deletes the slice at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from backpack import backpack, extend
from backpack.extensions import SqrtGGNExact, SqrtGGNMC
from torch import Tensor
from torch.nn import Module, Parameter

APPROXIMATIONS = ("exact", "mc")


class GramAccumulator:
    """Per-group Gram matrices Vᵀ V of the GGN factor, filled by a BackPACK extension hook.

    Use ``extension`` and ``hook`` in one ``backpack(...)`` context around ``loss.backward()``.
    Each parameter's factor V_p (BackPACK stores it as ``[C, N, *p.shape]``) is flattened to
    ``[C·N, D_p]``, its Gram matrix V_p V_pᵀ is added to the group's matrix, and V_p is deleted,
    so the factor of the whole net never exists in memory.

    Args:
        param_groups: Group name to the parameters of that group. A parameter may be in one
            group at most.
        approximation: ``"exact"`` (``SqrtGGNExact``) or ``"mc"`` (``SqrtGGNMC``).
        mc_samples: Number of Monte-Carlo samples per datum when ``approximation="mc"``.
        dtype: Precision of the Gram matrices. The factor is cast to it before contraction.

    Raises:
        ValueError: If the approximation is unknown, ``mc_samples < 1``, a group is empty, or
            a parameter is in two groups.
    """

    def __init__(
        self,
        param_groups: Mapping[str, Sequence[Parameter]],
        approximation: str = "exact",
        mc_samples: int = 1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if approximation not in APPROXIMATIONS:
            raise ValueError(
                f"Invalid approximation {approximation!r}: use one of {APPROXIMATIONS}."
            )
        if mc_samples < 1:
            raise ValueError(f"Invalid mc_samples={mc_samples}: it must be at least 1.")

        self._group_of: dict[int, str] = {}
        for name, params in param_groups.items():
            if len(params) == 0:
                raise ValueError(f"Parameter group {name!r} is empty: remove it or add parameters.")
            for param in params:
                if id(param) in self._group_of:
                    raise ValueError(
                        f"A parameter of shape {tuple(param.shape)} is in groups "
                        f"{self._group_of[id(param)]!r} and {name!r}: put it in one group only."
                    )
                self._group_of[id(param)] = name

        self.group_names = list(param_groups)
        self.approximation = approximation
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.grams: dict[str, Tensor] = {}

    @property
    def savefield(self) -> str:
        """Name of the parameter attribute where BackPACK stores the factor."""
        return "sqrt_ggn_exact" if self.approximation == "exact" else "sqrt_ggn_mc"

    def extension(self) -> SqrtGGNExact | SqrtGGNMC:
        """Return the BackPACK extension that backpropagates the GGN factor."""
        if self.approximation == "exact":
            return SqrtGGNExact()
        return SqrtGGNMC(mc_samples=self.mc_samples)

    def hook(self, module: Module) -> None:
        """Contract the factors of ``module``'s own parameters into their groups, then free them."""
        for param in module.parameters(recurse=False):
            factor = getattr(param, self.savefield, None)
            if factor is None:
                continue
            delattr(param, self.savefield)

            group = self._group_of.get(id(param))
            if group is None:
                continue
            flat = factor.flatten(start_dim=2).flatten(end_dim=1).to(self.dtype)
            gram = flat @ flat.T
            if group in self.grams:
                self.grams[group] += gram
            else:
                self.grams[group] = gram

    def reset(self) -> None:
        """Drop the Gram matrices of the previous backward pass."""
        self.grams = {}


def compute_grams(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    approximation: str = "exact",
    mc_samples: int = 1,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """Compute each group's GGN Gram matrix Vᵀ V in one forward and one BackPACK backward pass.

    ``model`` and ``loss_func`` are extended with BackPACK in place if they are not yet. The
    parameters' ``.grad`` fields are overwritten with the gradient of this batch.

    Returns:
        Group name to its Gram matrix of shape ``[C·N, C·N]`` (``M·N`` for ``mc_samples=M``),
        in the order of ``param_groups``.
    """
    extend(model)
    extend(loss_func)
    accumulator = GramAccumulator(param_groups, approximation, mc_samples, dtype)

    model.zero_grad(set_to_none=True)
    loss = loss_func(model(inputs), targets)
    with backpack(accumulator.extension(), extension_hook=accumulator.hook):
        loss.backward()

    missing = [name for name in accumulator.group_names if name not in accumulator.grams]
    if missing:
        raise RuntimeError(
            f"BackPACK computed no GGN factor for groups {missing}: their parameters are not "
            "used in the forward pass or belong to modules that were not extended."
        )
    return {name: accumulator.grams[name] for name in accumulator.group_names}


def gram_eigvals(gram: Tensor) -> Tensor:
    """Return the eigenvalues of a symmetric PSD Gram matrix, descending, with noise set to zero.

    Eigenvalues with magnitude at most ``n · eps · λ_max`` (n the matrix size, eps the machine
    precision of its dtype) are rounding noise of a rank-deficient matrix: they are returned as
    exactly zero, so that noise never shows up as negative curvature. The GGN is positive
    semi-definite, so any remaining negative value is noise too and is clipped to zero.
    """
    eigvals = torch.linalg.eigvalsh(gram).flip(0)
    scale = eigvals.abs().max() if eigvals.numel() > 0 else torch.zeros((), dtype=gram.dtype)
    tolerance = gram.shape[0] * torch.finfo(gram.dtype).eps * scale
    return torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))
