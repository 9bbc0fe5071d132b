"""Network architectures, built as ``torch.nn.Sequential`` with readable module names.

The module names become parameter-group names, for example ``fc1`` with ``grouping=per_layer``.
Models whose ``forward`` is not a chain of modules (``resnet``, torchvision models) are converted
by BackPACK before use, see ``harness.support``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, activation: str, flatten: bool = False
) -> nn.Sequential:
    """Build an MLP ``in → hidden[0] → … → out`` with modules ``fc1, act1, fc2, …``.

    With ``flatten``, a first module ``flatten`` turns image inputs into vectors.

    Raises:
        ValueError: If a layer size is not positive or the activation is unknown.
    """
    sizes = [in_features, *hidden, out_features]
    if any(size < 1 for size in sizes):
        raise ValueError(f"Invalid MLP layer sizes {sizes}: every size must be at least 1.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Invalid activation {activation!r}: use one of {sorted(ACTIVATIONS)}.")

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if flatten:
        layers["flatten"] = nn.Flatten()
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

    Nine convolutions with ReLU: 96, 96 and 96 (stride 2) channels, then 192, 192 and 192
    (stride 2), then 192 (3×3 'valid'), 192 (1×1) and ``num_classes`` (1×1). Dropout of 0.2 acts
    on the input and of 0.5 after each stride-2 convolution, and 6×6 average pooling gives the
    class scores.
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


def digits_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Build a small CNN for 8×8 images (1,898 parameters for 1 channel, 10 classes).

    Two 3×3 'same' convolutions (8, 16 channels) with ReLU and 2×2 max-pooling (8×8 → 4×4 → 2×2),
    then a fully connected layer to ``num_classes`` units. It is small enough that the GGN of
    the whole net is validated against the exact GGN with the default
    ``curvature.validate.max_params``.
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 8, 3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, 2),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, 2),
            flatten=nn.Flatten(),
            fc=nn.Linear(16 * 2 * 2, num_classes),
        )
    )


class ResidualBlock(nn.Module):
    """Basic residual block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` of two 3×3 convolutions.

    The shortcut is the identity, or a strided 1×1 convolution (with batch norm) where the
    block changes the number of channels or the resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            self.shortcut = nn.Sequential(*layers)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(residual + self.shortcut(x))


def resnet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    widths: Sequence[int] = (16, 32, 64),
    blocks: int = 3,
    batchnorm: bool = True,
) -> nn.Sequential:
    """Build a ResNet for small images such as CIFAR-10's.

    A 3×3 convolution to ``widths[0]`` channels, then one stage of ``blocks`` residual blocks per
    entry of ``widths``, each stage after the first halving the resolution. Average pooling over
    the remaining image and a fully connected layer follow. ``widths=(16, 32, 64)`` with
    ``blocks=3`` has 20 layers with weights outside the shortcuts (ResNet-20), and its shortcuts
    are 1×1 projections where the shape changes. The residual sums are not modules, so BackPACK
    needs the model converted with ``extend(model, use_converter=True)``.

    Raises:
        ValueError: If a width or ``blocks`` is not positive.
    """
    if not widths or any(width < 1 for width in widths) or blocks < 1:
        raise ValueError(
            f"Invalid ResNet widths={list(widths)}, blocks={blocks}: give at least one width, "
            "and every width and blocks must be at least 1."
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batchnorm),
        bn=nn.BatchNorm2d(widths[0]) if batchnorm else nn.Identity(),
        act=nn.ReLU(),
    )
    height, width = image_size
    channels = widths[0]
    for stage, stage_width in enumerate(widths, start=1):
        stage_blocks = []
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            stage_blocks.append(ResidualBlock(channels, stage_width, stride, batchnorm))
            channels = stage_width
        layers[f"stage{stage}"] = nn.Sequential(*stage_blocks)
        if stage > 1:
            # A 3×3 convolution with padding 1 and stride 2 maps a size s to ceil(s / 2).
            height, width = (height + 1) // 2, (width + 1) // 2

    # BackPACK has no GGN factor for AdaptiveAvgPool2d, so global pooling is a fixed-size AvgPool2d.
    layers["pool"] = nn.AvgPool2d((height, width))
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def torchvision_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """Build torchvision's ``arch`` with random weights and ``num_classes`` outputs.

    Raises:
        ValueError: If the architecture is unknown, or the inputs do not have 3 channels.
    """
    import torchvision.models

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"Invalid torchvision model {arch!r}: it is not in torchvision.models.list_models().")
    if in_channels != 3:
        raise ValueError(
            f"torchvision's {arch} takes images of 3 channels, but the data has {in_channels}: "
            "use a 3-channel data set such as cifar10, or a model of this harness."
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


MODELS = ("mlp", "digits_cnn", "deepobs_2c2d", "deepobs_3c3d", "deepobs_allcnnc", "resnet", "torchvision")


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    hidden: Sequence[int] = (32,),
    activation: str = "relu",
    widths: Sequence[int] = (16, 32, 64),
    blocks: int = 3,
    batchnorm: bool = True,
    arch: str = "resnet18",
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` and ``num_outputs`` outputs.

    ``hidden`` and ``activation`` set the ``mlp``, ``widths``, ``blocks`` and ``batchnorm`` the
    ``resnet``, and ``arch`` names the torchvision model of ``torchvision``. The other models have
    fixed layouts.

    Raises:
        ValueError: If the name is unknown, or a model for images gets flat inputs.
    """
    if name not in MODELS:
        raise ValueError(f"Invalid model {name!r}: use one of {MODELS}.")
    if name == "mlp":
        in_features = 1
        for size in input_shape:
            in_features *= size
        return mlp(in_features, hidden, num_outputs, activation, flatten=len(input_shape) > 1)

    if len(input_shape) != 3:
        raise ValueError(
            f"Model {name} takes images [channels, height, width], but the data has inputs of "
            f"shape {tuple(input_shape)}: for digits set dataset.images=true, or use model=mlp."
        )
    channels, height, width = input_shape
    if name == "digits_cnn":
        return digits_cnn(channels, num_outputs)
    if name == "deepobs_2c2d":
        return deepobs_2c2d(channels, num_outputs)
    if name == "deepobs_3c3d":
        return deepobs_3c3d(channels, num_outputs)
    if name == "deepobs_allcnnc":
        return deepobs_allcnnc(channels, num_outputs)
    if name == "resnet":
        return resnet(channels, num_outputs, (height, width), widths, blocks, batchnorm)
    return torchvision_model(arch, channels, num_outputs)
