"""Exact GGN blocks from torch.func, independent of BackPACK, to validate the Gram eigenvalues."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, hessian, jacrev
from torch.nn import Module, Parameter


@contextlib.contextmanager
def quiet_forward_ad() -> Iterator[None]:
    """Hide the torch.jit.script deprecation warning that PyTorch's forward-mode AD triggers.

    The first forward-mode product of a process imports torch's own JVP decompositions, which
    call torch.jit.script. A user of the harness cannot act on that warning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        yield


def exact_ggn(
    model: Module,
    loss_func: Module,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Parameter],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Build the exact GGN block G = Jᵀ H J of ``params`` for the loss of one batch.

    J is the Jacobian of the stacked model outputs ``[N·C]`` with respect to ``params`` and H the
    Hessian of the batch loss with respect to those outputs, so the loss's reduction (the 1/N of
    ``"mean"``) is part of H. Model, inputs and targets are copied to ``dtype`` first.

    Returns:
        The ``[D, D]`` GGN block, D the total number of entries of ``params``, ordered as in
        ``model.named_parameters()``.

    Raises:
        ValueError: If a parameter in ``params`` does not belong to ``model``.
    """
    names = _names_of(model, params)
    model = _without_hooks(model).to(dtype)
    loss_func = _without_hooks(loss_func)
    inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    targets = targets.to(dtype) if targets.is_floating_point() else targets

    frozen = {name: p.detach() for name, p in model.named_parameters()}
    group = {name: frozen[name] for name in names}

    def outputs_of(group_params: dict[str, Tensor]) -> Tensor:
        return functional_call(model, {**frozen, **group_params}, (inputs,))

    with torch.no_grad():
        outputs = outputs_of(group)
    jacobians = jacrev(outputs_of)(group)
    jacobian = torch.cat([jacobians[name].flatten(start_dim=outputs.dim()) for name in names], dim=-1)
    jacobian = jacobian.flatten(end_dim=outputs.dim() - 1)

    with quiet_forward_ad():
        loss_hessian = hessian(lambda out: loss_func(out, targets))(outputs)
    loss_hessian = loss_hessian.reshape(outputs.numel(), outputs.numel())
    return jacobian.T @ loss_hessian @ jacobian


def _names_of(model: Module, params: Sequence[Parameter]) -> list[str]:
    """Return the names of ``params`` in ``model``, in the model's parameter order."""
    requested = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in requested]
    if len(names) != len(requested):
        raise ValueError(
            f"{len(requested) - len(names)} of {len(requested)} parameters are not in the model: "
            "pass parameters of the model being validated."
        )
    return names


def _without_hooks(module: Module) -> Module:
    """Return a deep copy of ``module`` with every forward and backward hook removed.

    BackPACK's full backward hooks wrap outputs in an autograd function that torch.func cannot
    transform, and the reference must not depend on BackPACK anyway. PyTorch has no public call
    that removes hooks without their handles, so the copy's hook dictionaries are cleared.
    """
    clone = copy.deepcopy(module)
    for submodule in clone.modules():
        submodule._forward_hooks.clear()
        submodule._forward_pre_hooks.clear()
        submodule._backward_hooks.clear()
        submodule._backward_pre_hooks.clear()
        submodule._is_full_backward_hook = None
    return clone
