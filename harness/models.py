"""Network architectures, built as ``torch.nn.Sequential`` with readable module names."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: str) -> nn.Sequential:
    """Build an MLP ``in → hidden[0] → … → out`` with modules ``fc1, act1, fc2, …``.

    The module names become parameter-group names, for example ``fc1`` with ``per_layer``.

    Raises:
        ValueError: If a layer size is not positive or the activation is unknown.
    """
    sizes = [in_features, *hidden, out_features]
    if any(size < 1 for size in sizes):
        raise ValueError(f"Invalid MLP layer sizes {sizes}: every size must be at least 1.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Invalid activation {activation!r}: use one of {sorted(ACTIVATIONS)}.")

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers[f"fc{index}"] = nn.Linear(size_in, size_out)
        if index < len(sizes) - 1:
            layers[f"act{index}"] = ACTIVATIONS[activation]()
    return nn.Sequential(layers)
