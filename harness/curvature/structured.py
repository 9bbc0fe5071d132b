"""Per-layer contributions to the Gram matrix and to V-vector products, with and without V.

Consider a layer that maps an input X of shape [N, L, I] to an output with O features at each of
L positions (the leading dimensions of a Linear layer, the output pixels of an unfolded
convolution). Let S of shape [R, N, L, O] be the factor that BackPACK backpropagates to the
output, with R columns per sample (C classes, or M Monte-Carlo samples). The layer's slice of V, column (r, n), is
V_W[r, n] = Σ_l S[r, n, l] ⊗ X[n, l], so its Gram matrix is

    Gram_W[(r, n), (r', n')] = Σ_{l, l'} (S[r, n, l] · S[r', n', l']) (X[n, l] · X[n', l']),

which for L = 1 is (S Sᵀ) ⊙ (X Xᵀ) and never needs the [R·N, O·I] slice V_W itself. The bias
slice is V_b[r, n] = Σ_l S[r, n, l].

The chunked path builds V_W for a few output features o at a time and adds V_W,o V_W,oᵀ: the
Gram matrix is a sum over parameter entries, so any split of them works, and memory stays bounded
by ``CHUNK_ENTRIES``. The materialized path is BackPACK's: the whole slice V_W at once.
``choose_path`` picks the structured or the chunked path, whichever needs fewer FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from backpack.utils.conv import unfold_by_conv

PATHS = ("auto", "structured", "chunked", "materialized")
# Entries of one chunk: factor products [rows, N, L, R·N, L] in the structured weight Gram, or
# a slice of V_W in the chunked path (64 MiB in float32).
CHUNK_ENTRIES = 2**24
CONVOLUTIONS = (Conv1d, Conv2d, Conv3d)


@dataclass(frozen=True)
class PathCost:
    """Estimated cost of one layer's weight Gram contribution.

    Attributes:
        flops: Multiply-adds.
        memory: Peak number of extra tensor entries, besides the Gram matrix itself.
    """

    flops: float
    memory: float


def structured_cost(rows: int, num_samples: int, positions: int, out_features: int, in_features: int) -> PathCost:
    """Estimate the structured weight Gram of a layer with ``rows = R·N`` factor columns."""
    pairs = float(positions) ** 2
    flops = rows**2 * pairs * (out_features + 1) + num_samples**2 * pairs * in_features
    chunk = min(rows**2 * pairs, max(CHUNK_ENTRIES, rows * num_samples * pairs))
    memory = num_samples**2 * pairs + chunk
    return PathCost(flops, memory)


def materialized_cost(rows: int, positions: int, out_features: int, in_features: int) -> PathCost:
    """Estimate building V_W of shape [rows, O·I] at once and contracting it to V_W V_Wᵀ."""
    weight_size = float(out_features) * in_features
    flops = rows * positions * weight_size + rows**2 * weight_size
    return PathCost(flops, rows * weight_size)


def chunked_cost(rows: int, positions: int, out_features: int, in_features: int) -> PathCost:
    """Estimate the chunked path: the materialized FLOPs, at most one chunk of V_W in memory."""
    cost = materialized_cost(rows, positions, out_features, in_features)
    return PathCost(cost.flops, min(cost.memory, max(CHUNK_ENTRIES, rows * in_features)))


def choose_path(structured: PathCost, chunked: PathCost) -> str:
    """Pick the structured path when it needs fewer FLOPs and no more memory, else the chunked one."""
    if structured.flops <= chunked.flops and structured.memory <= max(chunked.memory, CHUNK_ENTRIES):
        return "structured"
    return "chunked"


def layer_input_and_factor(module: Module, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape a Linear or convolution layer's input to X [N, L, I] and its factor to S [R, N, L, O].

    For a convolution, X is the unfolded input (I = in_channels · kernel size), so the layer is
    a Linear layer applied at each of the L output positions.
    """
    num_rows, num_samples = factor.shape[:2]
    if isinstance(module, Linear):
        inputs = module.input0.reshape(module.input0.shape[0], -1, module.in_features)
        factor = factor.reshape(num_rows, num_samples, -1, module.out_features)
        return inputs, factor

    inputs = unfold_by_conv(module.input0, module).transpose(1, 2)
    factor = factor.flatten(start_dim=3).transpose(2, 3)
    return inputs, factor


def layer_dims(module: Module) -> tuple[int, int, int]:
    """Return (L, O, I) of a Linear or convolution layer after its forward pass."""
    if isinstance(module, Linear):
        positions = module.input0[0].numel() // module.in_features
        return positions, module.out_features, module.in_features
    positions = module.output[0, 0].numel()
    in_features = module.weight.shape[1:].numel() * module.groups
    return positions, module.out_channels, in_features


def supports_structured(module: Module) -> bool:
    """Check whether the structured weight path applies: Linear, or a convolution without groups."""
    return isinstance(module, Linear) or (isinstance(module, CONVOLUTIONS) and module.groups == 1)


def structured_weight_gram(inputs: Tensor, factor: Tensor, rows_per_chunk: int = 0) -> Tensor:
    """Contract X [N, L, I] and S [R, N, L, O] into the weight Gram matrix [R·N, R·N].

    Args:
        inputs: The layer input X, in the Gram matrix's dtype.
        factor: The backpropagated factor S, in the same dtype.
        rows_per_chunk: Factor rows r processed at once to bound memory; 0 chooses from L.
    """
    num_rows, num_samples, positions, _ = factor.shape
    flat = factor.reshape(num_rows * num_samples, positions, -1)
    if positions == 1:
        input_gram = inputs[:, 0] @ inputs[:, 0].T
        return (flat[:, 0] @ flat[:, 0].T) * input_gram.repeat(num_rows, num_rows)

    input_gram = torch.einsum("nli,pmi->nlpm", inputs, inputs)
    if rows_per_chunk <= 0:
        rows_per_chunk = max(1, CHUNK_ENTRIES // (num_rows * (num_samples * positions) ** 2))

    gram = factor.new_empty(num_rows, num_samples, num_rows * num_samples)
    for start in range(0, num_rows, rows_per_chunk):
        block = factor[start : start + rows_per_chunk]
        factor_gram = torch.einsum("anlo,qmo->anlqm", block, flat)
        factor_gram = factor_gram.unflatten(3, (num_rows, num_samples))
        gram[start : start + rows_per_chunk] = torch.einsum(
            "anlbpm,nlpm->anbp", factor_gram, input_gram
        ).flatten(start_dim=2)
    return gram.reshape(num_rows * num_samples, num_rows * num_samples)


def chunked_weight_gram(inputs: Tensor, factor: Tensor) -> Tensor:
    """Contract X [N, L, I] and S [R, N, L, O] into the weight Gram matrix, building V_W by output features."""
    num_rows, num_samples, _, out_features = factor.shape
    rows = num_rows * num_samples
    features_per_chunk = max(1, CHUNK_ENTRIES // (rows * inputs.shape[2]))

    gram = factor.new_zeros(rows, rows)
    for start in range(0, out_features, features_per_chunk):
        block = factor[..., start : start + features_per_chunk]
        slice_of_v = torch.einsum("anlo,nli->anoi", block, inputs).reshape(rows, -1)
        gram.addmm_(slice_of_v, slice_of_v.T)
    return gram


def structured_bias_factor(factor: Tensor) -> Tensor:
    """Return the bias slice of V, Σ_l S[r, n, l], as [R·N, O]."""
    return factor.sum(dim=2).flatten(end_dim=1)


def structured_weight_vjp(inputs: Tensor, factor: Tensor, coefficients: Tensor) -> Tensor:
    """Return V_Wᵀ U as [K, O, I] for U of shape [R·N, K], without building V_W."""
    num_rows, num_samples, positions, out_features = factor.shape
    coefficients = coefficients.reshape(num_rows, num_samples, -1)
    vectors_per_chunk = max(1, CHUNK_ENTRIES // (num_samples * positions * out_features))

    pieces = []
    for start in range(0, coefficients.shape[2], vectors_per_chunk):
        block = coefficients[..., start : start + vectors_per_chunk]
        mixed = torch.einsum("ank,anlo->knlo", block, factor)
        pieces.append(torch.einsum("knlo,nli->koi", mixed, inputs))
    if not pieces:
        return factor.new_zeros(0, out_features, inputs.shape[2])
    return torch.cat(pieces)
