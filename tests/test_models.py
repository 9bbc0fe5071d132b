"""The model zoo: layouts, and GGN eigenvalues of converted ResNets against the exact GGN."""

import pytest
import torch
from backpack import extend
from torch import nn
from torch.fx import GraphModule

from harness.curvature import compare_eigvals, compute_grams, exact_ggn, gram_eigvals
from harness.models import build_model
from harness.support import prepare_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "input_shape", "num_outputs", "expected"),
    [
        ("digits_cnn", (1, 8, 8), 10, 1898),
        ("deepobs_2c2d", (1, 28, 28), 10, 3_274_634),
        ("deepobs_3c3d", (3, 32, 32), 10, 895_210),
        ("deepobs_allcnnc", (3, 32, 32), 100, 1_387_108),
    ],
)
def test_fixed_layouts_parameter_counts(name, input_shape, num_outputs, expected):
    model = build_model(name, input_shape, num_outputs)

    assert num_params(model) == expected
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, *input_shape)).shape == (2, num_outputs)


def test_mlp_flattens_images():
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16])

    assert [name for name, _ in model.named_children()] == ["flatten", "fc1", "act1", "fc2"]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_image_model_rejects_vectors():
    with pytest.raises(ValueError, match=r"shape \(64,\): for digits set dataset.images=true"):
        build_model("digits_cnn", (64,), 10)


def test_torchvision_model_rejects_one_channel():
    with pytest.raises(ValueError, match="3 channels, but the data has 1"):
        build_model("torchvision", (1, 28, 28), 10, arch="resnet18")


def test_resnet20_layout():
    model = build_model("resnet", (3, 32, 32), 10, widths=[16, 32, 64], blocks=3)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 3 * 2
    assert model.pool.kernel_size == (8, 8)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_resnet_ggn_matches_exact(batchnorm):
    torch.manual_seed(0)
    model = build_model("resnet", (1, 8, 8), 10, widths=[4, 8], blocks=1, batchnorm=batchnorm)
    # Running statistics away from 0 and 1, so that eval-mode batch norm is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 1)

    model = prepare_model(model, (1, 8, 8), 10)
    model.eval()
    inputs, labels = torch.randn(6, 1, 8, 8), torch.arange(6)
    loss_func = extend(nn.CrossEntropyLoss())
    params = list(model.parameters())
    grams = compute_grams(model, loss_func, inputs, labels, {"all": params})
    reference = exact_ggn(model, loss_func, inputs, labels, params)

    assert isinstance(model, GraphModule)
    assert sum(p.numel() for p in params) < 3000
    result = compare_eigvals(gram_eigvals(grams["all"]), reference, rtol=1e-3, atol=1e-6)
    assert result.passed, (result.max_abs_err, result.max_rel_err)
    # 6 samples with C − 1 = 9 factor columns each (the reduced cross-entropy factor).
    assert result.num_compared == 6 * 9
