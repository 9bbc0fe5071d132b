"""Estimate of the peak memory of one Gram backward pass, and the budget check before it runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from harness.curvature import structured

BUDGET_ACTIONS = ("error", "chunked", "mc", "lanczos")


class MemoryBudgetError(RuntimeError):
    """The estimated memory of the Gram computation exceeds the configured budget."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a Gram backward pass, by part.

    Attributes:
        activations: Layer inputs and outputs kept by autograd and BackPACK for the batch.
        factor: The backpropagated factor at the input and output of the widest module.
        layer: The largest per-layer working memory (a parameter's slice of V, or the
            structured contraction's temporaries).
        grams: The groups' Gram matrices and one eigendecomposition.
    """

    activations: int
    factor: int
    layer: int
    grams: int

    @property
    def total(self) -> int:
        """Sum of the parts, in bytes."""
        return self.activations + self.factor + self.layer + self.grams

    def describe(self) -> str:
        """Return the estimate in GB with its parts, for messages."""
        parts = ", ".join(
            f"{name} {getattr(self, name) / 1e9:.3g}" for name in ("activations", "factor", "layer", "grams")
        )
        return f"{self.total / 1e9:.3g} GB ({parts})"


def estimate_memory(
    model: Module,
    inputs: Tensor,
    param_groups: Mapping[str, Sequence[Parameter]],
    factor_columns: int,
    subset_size: int,
    dtype: torch.dtype = torch.float64,
    path: str = "auto",
    total_samples: int | None = None,
    sizes: list[tuple[Module, int, torch.Size]] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of ``compute_curvature``'s backward pass from a forward pass of 2 samples.

    NOTE: The parts are the tensors that the passes keep alive at once by construction. Their sum
    has not been compared with measured peak memory.

    Args:
        model: The network.
        inputs: The batch; only its first two samples are run, without gradients.
        param_groups: Group name to parameters.
        factor_columns: Factor columns per sample R: the number of outputs C for the exact
            GGN, ``mc_samples`` for MC, plus 1 with the gradient column.
        subset_size: Number of samples whose factor is computed in the pass.
        dtype: Precision of the Gram matrices.
        path: Gram path of Linear and convolution weights.
        total_samples: For the chunked fallback, the samples of the whole Gram matrix that is
            assembled from passes over ``subset_size`` samples each; None: ``subset_size``.
        sizes: The result of ``module_sizes(model, inputs)``, to skip its forward pass.
    """
    if sizes is None:
        sizes = module_sizes(model, inputs)
    model_bytes = next(model.parameters()).element_size()
    gram_bytes = torch.empty((), dtype=dtype).element_size()
    rows = factor_columns * subset_size
    grouped = {id(p) for params in param_groups.values() for p in params}

    activations = sum(out_shape.numel() for _, _, out_shape in sizes) * inputs.shape[0] * model_bytes
    widest = max(in_size + out_shape.numel() for _, in_size, out_shape in sizes)
    factor = rows * widest * model_bytes

    layer = 0
    for module, in_size, out_shape in sizes:
        for param in module.parameters(recurse=False):
            if id(param) in grouped:
                entries = _layer_entries(module, param, in_size, out_shape, rows, subset_size, path)
                layer = max(layer, entries * gram_bytes)
    total_rows = rows if total_samples is None else factor_columns * total_samples
    grams = len(param_groups) * rows**2 * gram_bytes + 2 * total_rows**2 * gram_bytes
    if total_rows != rows:
        grams += len(param_groups) * total_rows**2 * gram_bytes
    return MemoryEstimate(int(activations), int(factor), int(layer), int(grams))


def check_budget(estimate: MemoryEstimate, budget_gb: float | None) -> bool:
    """Return whether ``estimate`` fits into ``budget_gb`` (None: no budget)."""
    return budget_gb is None or estimate.total <= budget_gb * 1e9


def budget_error(estimate: MemoryEstimate, budget_gb: float) -> MemoryBudgetError:
    """Build the error for an estimate above the budget, with the options that lower it."""
    return MemoryBudgetError(
        f"The Gram computation needs an estimated {estimate.describe()}, above the memory budget of "
        f"{budget_gb} GB. Lower curvature.batch_size, set curvature.subsampling to fewer samples, use "
        "curvature.approximation=mc with mc_samples below the number of classes, raise "
        "curvature.memory_budget_gb, or set curvature.on_budget_exceeded to chunked (the same Gram "
        "matrix from passes over parts of the batch), mc (fewer Monte-Carlo samples) or lanczos "
        "(top-k eigenvalues and a spectral density from GGN-vector products)."
    )


def module_sizes(model: Module, inputs: Tensor) -> list[tuple[Module, int, torch.Size]]:
    """Run two samples of ``inputs``; return (module, input numel, output shape) per sample for every leaf module.

    Two samples, not one, because BatchNorm in training mode rejects a batch of one.
    """
    samples = inputs[:2]
    sizes: list[tuple[Module, int, torch.Size]] = []

    def record(module: Module, args: tuple, output: Tensor) -> None:
        sizes.append((module, args[0][0].numel(), output.shape[1:]))

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        with torch.no_grad():
            model(samples)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _layer_entries(
    module: Module, param: Parameter, in_size: int, output_shape: torch.Size, rows: int, num_samples: int, path: str
) -> float:
    """Entries of the working memory for one parameter's Gram contribution."""
    is_weight = param is getattr(module, "weight", None)
    if not is_weight or not structured.supports_structured(module) or path == "materialized":
        return rows * param.numel()
    if isinstance(module, torch.nn.Linear):
        positions = in_size // module.in_features
        out_features, in_features = module.out_features, module.in_features
    else:
        positions = output_shape[1:].numel()
        out_features, in_features = module.out_channels, param.shape[1:].numel()
    structured_cost = structured.structured_cost(rows, num_samples, positions, out_features, in_features)
    chunked_cost = structured.chunked_cost(rows, positions, out_features, in_features)
    if path == "auto":
        path = structured.choose_path(structured_cost, chunked_cost)
    return structured_cost.memory if path == "structured" else chunked_cost.memory
