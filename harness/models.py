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



def deepobs_2c2d(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Build DeepOBS's ``2c2d`` for 28×28 inputs (3,274,634 parameters for 1 channel, 10 classes).

    Two 5×5 'same' convolutions (32, 64 channels) with ReLU and 2×2 max-pooling, then fully
    connected layers of 1024 and ``num_classes`` units.
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 32, 5, padding=2),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, 2),
            conv2=nn.Conv2d(32, 64, 5, padding=2),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, 2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(7 * 7 * 64, 1024),
            act3=nn.ReLU(),
            fc2=nn.Linear(1024, num_classes),
        )
    )


def deepobs_3c3d(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """Build DeepOBS's ``3c3d`` for 32×32 inputs (895,210 parameters for 3 channels, 10 classes).

    Convolutions of 64 (5×5, 'valid'), 96 (3×3, 'valid') and 128 (3×3, 'same') channels, each
    followed by ReLU and 3×3 max-pooling with stride 2 and 'same' padding, then fully connected
    layers of 512, 256 and ``num_classes`` units.
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 64, 5),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(3, 2, padding=1),
            conv2=nn.Conv2d(64, 96, 3),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(3, 2, padding=1),
            conv3=nn.Conv2d(96, 128, 3, padding=1),
            act3=nn.ReLU(),
            pool3=nn.MaxPool2d(3, 2, padding=1),
            flatten=nn.Flatten(),
            fc1=nn.Linear(3 * 3 * 128, 512),
            act4=nn.ReLU(),
            fc2=nn.Linear(512, 256),
            act5=nn.ReLU(),
            fc3=nn.Linear(256, num_classes),
        )
    )


def deepobs_allcnnc(in_channels: int = 3, num_classes: int = 100) -> nn.Sequential:
    """Build DeepOBS's ``allcnnc`` (All-CNN-C) for 32×32 inputs (1,387,108 parameters for 100 classes).

    Nine convolutions of 96, 96, 96 (stride 2), 192, 192, 192 (stride 2), 192 (3×3 'valid'), 192
    (1×1) and ``num_classes`` (1×1) channels with ReLU, dropout 0.2 on the input and 0.5 after
    each stride-2 convolution, and 6×6 average pooling to the class scores.
    """
    return nn.Sequential(
        OrderedDict(
            drop1=nn.Dropout(0.2),
            conv1=nn.Conv2d(in_channels, 96, 3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(96, 96, 3, padding=1),
            act2=nn.ReLU(),
            conv3=nn.Conv2d(96, 96, 3, stride=2, padding=1),
            act3=nn.ReLU(),
            drop2=nn.Dropout(0.5),
            conv4=nn.Conv2d(96, 192, 3, padding=1),
            act4=nn.ReLU(),
            conv5=nn.Conv2d(192, 192, 3, padding=1),
            act5=nn.ReLU(),
            conv6=nn.Conv2d(192, 192, 3, stride=2, padding=1),
            act6=nn.ReLU(),
            drop3=nn.Dropout(0.5),
            conv7=nn.Conv2d(192, 192, 3),
            act7=nn.ReLU(),
            conv8=nn.Conv2d(192, 192, 1),
            act8=nn.ReLU(),
            conv9=nn.Conv2d(192, num_classes, 1),
            act9=nn.ReLU(),
            pool=nn.AvgPool2d(6),
            flatten=nn.Flatten(),
        )
    )
