"""The model check before training: supported layers, conversions, and errors that name the layer."""

import logging
from collections import OrderedDict

import pytest
import torch
from backpack import extend
from torch import nn
from torch.fx import GraphModule

from harness.curvature import compute_grams
from harness.models import build_model
from harness.support import UnsupportedModelError, prepare_model, supported_layers


def grams_of(model: nn.Module, inputs: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = torch.arange(len(inputs)) % num_classes
    model.eval()
    grams = compute_grams(model, extend(nn.CrossEntropyLoss()), inputs, labels, {"all": list(model.parameters())})
    return grams["all"]


def test_registry_read_from_backpack():
    supported = supported_layers()

    for layer in (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.MSELoss, nn.CrossEntropyLoss):
        assert layer in supported
    for layer in (nn.AdaptiveAvgPool2d, nn.GELU, nn.LayerNorm):
        assert layer not in supported


def test_unsupported_layers_named_with_alternatives():
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 8), body=nn.Sequential(OrderedDict(act=nn.GELU(), norm=nn.LayerNorm(8))), fc2=nn.Linear(8, 3))
    )

    with pytest.raises(UnsupportedModelError) as error:
        prepare_model(model, (4,), 3)

    message = str(error.value)
    assert "layer 'body.act' of type GELU" in message
    assert "layer 'body.norm' of type LayerNorm" in message
    assert "ReLU, LeakyReLU" in message
    assert "BatchNorm1d/2d/3d" in message
    assert "Supported layers:" in message
    assert "Conv2d" in message


class Custom(nn.Module):
    def __init__(self, operation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.operation = operation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.operation == "sin":
            return torch.sin(hidden)
        return hidden * hidden


def test_function_in_forward_rejected():
    with pytest.raises(UnsupportedModelError, match=r"operation sin \(call_function sin\) in forward: express it with modules"):
        prepare_model(Custom("sin"), (4,), 3)


def test_unconvertible_forward_rejected():
    with pytest.raises(UnsupportedModelError, match=r"converter .* cannot convert Custom: Expecting types \[float, Node\]"):
        prepare_model(Custom("square"), (4,), 3)


def test_inplace_made_out_of_place(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    with caplog.at_level(logging.INFO, logger="harness.support"):
        prepared = prepare_model(model, (4,), 3)

    assert prepared[1].inplace is False
    assert "Made 1 in-place modules out-of-place" in caplog.text
    # 5 samples with C − 1 = 2 factor columns each (the reduced cross-entropy factor).
    assert grams_of(prepared, torch.randn(5, 4), 3).shape == (10, 10)


def test_adaptive_pool_replaced_by_equal_avgpool(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    inputs = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        before = model(inputs)

    with caplog.at_level(logging.INFO, logger="harness.support"):
        prepared = prepare_model(model, (2, 6, 6), 3)

    assert type(prepared[2]) is nn.AvgPool2d
    assert prepared[2].kernel_size == (3, 3)
    assert "Replaced AdaptiveAvgPool2d 2 (input 6×6, output 2×2)" in caplog.text
    with torch.no_grad():
        assert torch.allclose(prepared(inputs), before, atol=1e-6)


def test_adaptive_pool_kept_when_sizes_do_not_divide():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))

    with pytest.raises(UnsupportedModelError, match="layer '0' of type AdaptiveAvgPool2d: use AvgPool2d"):
        prepare_model(model, (2, 5, 5), 3)


def test_wrong_input_size_rejected():
    with pytest.raises(UnsupportedModelError, match=r"inputs of shape \(1, 8, 8\).*deepobs_2c2d takes 28×28"):
        prepare_model(build_model("deepobs_2c2d", (1, 8, 8), 10), (1, 8, 8), 10)


def test_wrong_output_size_rejected():
    with pytest.raises(UnsupportedModelError, match=r"outputs of shape \(2, 5\).*must have 3 outputs"):
        prepare_model(nn.Linear(4, 5), (4,), 3)


def test_sequential_model_kept():
    model = build_model("digits_cnn", (1, 8, 8), 10)

    assert prepare_model(model, (1, 8, 8), 10) is model


def test_torchvision_resnet18_converted(caplog):
    model = build_model("torchvision", (3, 32, 32), 10, arch="resnet18")

    with caplog.at_level(logging.INFO, logger="harness.support"):
        prepared = prepare_model(model, (3, 32, 32), 10)

    assert isinstance(prepared, GraphModule)
    types = {type(module) for module in prepared.modules()}
    assert nn.AdaptiveAvgPool2d not in types
    assert not any(getattr(module, "inplace", False) for module in prepared.modules())
    assert "Converted ResNet" in caplog.text
    assert "BatchNorm layers" in caplog.text


@pytest.mark.parametrize(
    ("name", "input_shape", "num_outputs"),
    [
        ("mlp", (10,), 1),
        ("digits_cnn", (1, 8, 8), 10),
        ("deepobs_2c2d", (1, 28, 28), 10),
        ("deepobs_3c3d", (3, 32, 32), 10),
        ("deepobs_allcnnc", (3, 32, 32), 100),
        ("resnet", (3, 32, 32), 10),
    ],
)
def test_experiment_models_supported(name, input_shape, num_outputs):
    prepared = prepare_model(build_model(name, input_shape, num_outputs), input_shape, num_outputs)

    supported = supported_layers()
    called = [type(module) for module in prepared.modules() if not list(module.children())]
    assert all(layer in supported for layer in called)
