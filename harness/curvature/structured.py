"""Per-layer contributions to the Gram matrix and to V-vector products, with and without V.

Consider a layer that maps an input X of shape [N, L, I] to an output with O features at each of
L positions (the leading dimensions of a Linear layer, the output pixels of an unfolded
convolution). Let S of shape [R, N, L, O] be the factor that BackPACK backpropagates to the
output, with R columns per sample (C classes, or M Monte-Carlo samples). The layer's slice of V, column (r, n), is
V_W[r, n] = Σ_l S[r, n, l] ⊗ X[n, l], so its Gram matrix is

    Gram_W[(r, n), (r', m)] = Σ_{l, l'} (S[r, n, l] · S[r', m, l']) (X[n, l] · X[m, l']),

which for L = 1 is (S Sᵀ) ⊙ (X Xᵀ) and never needs the [R·N, O·I] slice V_W itself. For L > 1
the structured path contracts in the order that keeps the FLOPs low: the input kernel
K[n, l, m, l'] = X[n, l] · X[m, l'], then T = K S over l' (N²·L²·R·O), then S with T over (l, o)
(N²·R²·L·O). The bias slice is V_b[r, n] = Σ_l S[r, n, l].

The chunked path builds V_W for a few output features o at a time and adds V_W,o V_W,oᵀ: the
Gram matrix is a sum over parameter entries, so any split of them works, and memory stays bounded
by ``CHUNK_ENTRIES``. The materialized path is BackPACK's: the whole slice V_W at once.
``choose_path`` picks the structured or the chunked path, whichever needs fewer FLOPs.

Both paths compute only the blocks of the symmetric Gram matrix on and above the diagonal (by
sample on the structured path, by row blocks on the chunked path) and mirror the rest, which
saves close to half of the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from backpack.utils.conv import unfold_by_conv

PATHS = ("auto", "structured", "chunked", "materialized")
# Entries of one chunk of V_W on the chunked path (64 MiB in float32). On the structured path,
# one block of the input kernel K has at most a quarter of it.
CHUNK_ENTRIES = 2**24
# Entries of one piece of the intermediate T on the structured path (8 MiB in float32). For
# cifar10_3c3d on 2 cores, pieces of 2**20 to 2**24 entries ran equally fast and smaller ones slower.
GROUP_ENTRIES = 2**21
# Row blocks of the chunked path: it computes the ROW_BLOCKS·(ROW_BLOCKS + 1)/2 blocks on and
# above the diagonal.
ROW_BLOCKS = 4
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
    if positions == 1:
        flops = rows**2 * (out_features + 1) + num_samples**2 * in_features
        return PathCost(flops, float(num_samples) ** 2 + rows**2)
    columns = rows // num_samples
    pairs = num_samples * (num_samples + 1) / 2
    flops = pairs * positions * (positions * in_features + positions * columns * out_features + columns**2 * out_features)
    kernel_block = num_samples * positions**2 * _kernel_block_samples(num_samples, positions)
    piece = min(num_samples, _group_samples(positions, out_features, columns)) * positions * out_features * columns
    return PathCost(flops, kernel_block + 2 * piece)


def materialized_cost(rows: int, positions: int, out_features: int, in_features: int) -> PathCost:
    """Estimate building V_W of shape [rows, O·I] at once and contracting it to V_W V_Wᵀ."""
    weight_size = float(out_features) * in_features
    flops = rows * positions * weight_size + rows**2 * weight_size
    return PathCost(flops, rows * weight_size)


def chunked_cost(rows: int, positions: int, out_features: int, in_features: int) -> PathCost:
    """Estimate the chunked path: only the upper row blocks of V_W V_Wᵀ, one chunk of V_W in memory."""
    weight_size = float(out_features) * in_features
    blocks = min(ROW_BLOCKS, rows)
    flops = rows * positions * weight_size + rows**2 * weight_size * (blocks + 1) / (2 * blocks)
    return PathCost(flops, min(rows * weight_size, max(CHUNK_ENTRIES, rows * in_features)))


def _kernel_block_samples(num_samples: int, positions: int) -> int:
    """Samples m per block of the input kernel K[:, :, m, :] on the structured path."""
    return max(1, min(num_samples, CHUNK_ENTRIES // (4 * num_samples * positions**2)))


def _group_samples(positions: int, out_features: int, columns: int) -> int:
    """Samples n per piece of T[n, (l, o), r'] on the structured path, at most ``GROUP_ENTRIES`` entries."""
    return max(1, GROUP_ENTRIES // (positions * out_features * columns))


def choose_path(structured: PathCost, chunked: PathCost) -> str:
    """Pick the structured path when it needs fewer FLOPs and no more memory, else the chunked one."""
    if structured.flops <= chunked.flops and structured.memory <= max(chunked.memory, CHUNK_ENTRIES):
        return "structured"
    return "chunked"


def layer_factor(module: Module, factor: Tensor) -> Tensor:
    """Reshape the factor at a Linear or convolution layer's output to S [R, N, L, O]."""
    num_rows, num_samples = factor.shape[:2]
    if isinstance(module, Linear):
        return factor.reshape(num_rows, num_samples, -1, module.out_features)
    return factor.flatten(start_dim=3).transpose(2, 3)


def layer_input_and_factor(module: Module, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape a Linear or convolution layer's input to X [N, L, I] and its factor to S [R, N, L, O].

    For a convolution, X is the unfolded input (I = in_channels · kernel size), so the layer is
    a Linear layer applied at each of the L output positions.
    """
    if isinstance(module, Linear):
        inputs = module.input0.reshape(module.input0.shape[0], -1, module.in_features)
    else:
        inputs = unfold_by_conv(module.input0, module).transpose(1, 2)
    return inputs, layer_factor(module, factor)


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


def structured_weight_gram(inputs: Tensor, factor: Tensor) -> Tensor:
    """Contract X [N, L, I] and S [R, N, L, O] into the weight Gram matrix [R·N, R·N].

    Args:
        inputs: The layer input X, in the Gram matrix's dtype.
        factor: The backpropagated factor S, in the same dtype.
    """
    num_rows, num_samples, positions, out_features = factor.shape
    if positions == 1:
        flat = factor.reshape(num_rows * num_samples, out_features)
        input_gram = inputs[:, 0] @ inputs[:, 0].T
        return (flat @ flat.T) * input_gram.repeat(num_rows, num_rows)

    in_features = inputs.shape[2]
    flat_inputs = inputs.reshape(num_samples * positions, in_features)
    # left[n] = S[:, n] as [R, (l, o)]; right[m] = S[:, m] as [l', (o, r')].
    left = factor.transpose(0, 1).reshape(num_samples, num_rows, positions * out_features)
    right = factor.permute(1, 2, 3, 0).reshape(num_samples, positions, out_features * num_rows)
    block = _kernel_block_samples(num_samples, positions)
    group = _group_samples(positions, out_features, num_rows)

    # gram[n, r, m, r'] for n <= m; the blocks below are mirrored at the end.
    gram = factor.new_zeros(num_samples, num_rows, num_samples, num_rows)
    for start in range(0, num_samples, block):
        stop = min(num_samples, start + block)
        # kernel[n, l, j, l'] = X[n, l] · X[start + j, l'] for n < stop.
        kernel = flat_inputs[: stop * positions] @ flat_inputs[start * positions : stop * positions].T
        kernel = kernel.reshape(stop, positions, stop - start, positions)
        for sample in range(start, stop):
            for first in range(0, sample + 1, group):
                last = min(sample + 1, first + group)
                piece = kernel[first:last, :, sample - start].reshape(-1, positions) @ right[sample]
                piece = piece.reshape(last - first, positions * out_features, num_rows)
                gram[first:last, :, sample] = torch.bmm(left[first:last], piece)

    gram = gram.permute(1, 0, 3, 2).reshape(num_rows * num_samples, num_rows * num_samples)
    sample_of_row = torch.arange(num_rows * num_samples, device=gram.device) % num_samples
    return torch.where(sample_of_row[:, None] <= sample_of_row[None, :], gram, gram.T)


def chunked_weight_gram(inputs: Tensor, factor: Tensor) -> Tensor:
    """Contract X [N, L, I] and S [R, N, L, O] into the weight Gram matrix, building V_W by output features."""
    num_rows, num_samples, _, out_features = factor.shape
    rows = num_rows * num_samples
    features_per_chunk = max(1, CHUNK_ENTRIES // (rows * inputs.shape[2]))
    blocks = min(ROW_BLOCKS, rows)
    edges = [round(index * rows / blocks) for index in range(blocks + 1)]

    gram = factor.new_zeros(rows, rows)
    for start in range(0, out_features, features_per_chunk):
        block = factor[..., start : start + features_per_chunk]
        slice_of_v = torch.einsum("anlo,nli->anoi", block, inputs).reshape(rows, -1)
        for first, last in zip(edges[:-1], edges[1:]):
            gram[first:last, first:].addmm_(slice_of_v[first:last], slice_of_v[first:].T)
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


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
