"""Loss targets and evaluation for class labels and real-valued regression targets."""

import pytest
import torch
from torch import nn

from harness import runner
from harness.runner import accuracy_of, evaluate, targets_for


def test_class_labels_one_hot_for_mse():
    targets = targets_for("mse", torch.tensor([2, 0]), 3)

    assert torch.equal(targets, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_labels_kept_for_cross_entropy():
    labels = torch.tensor([2, 0])

    assert targets_for("cross_entropy", labels, 3) is labels


def test_regression_targets_kept_for_mse():
    values = torch.tensor([[0.5], [-1.5]])

    assert targets_for("mse", values, 1) is values


def test_accuracy_only_for_class_labels():
    outputs = torch.tensor([[0.1, 0.9], [0.8, 0.2]])

    assert accuracy_of(outputs, torch.tensor([1, 1])) == {"accuracy": 0.5}
    assert accuracy_of(outputs, torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == {}


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_evaluation_matches_one_pass(monkeypatch, loss_name, reduction):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    inputs, labels = torch.randn(23, 5), torch.randint(0, 3, (23,))
    loss_func = nn.MSELoss(reduction=reduction) if loss_name == "mse" else nn.CrossEntropyLoss(reduction=reduction)
    with torch.no_grad():
        outputs = model(inputs)
        expected = loss_func(outputs, targets_for(loss_name, labels, 3)).item()
    monkeypatch.setattr(runner, "EVAL_CHUNK", 4)

    metrics = evaluate(model, loss_func, inputs, labels, loss_name, 3)

    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx((outputs.argmax(dim=1) == labels).float().mean().item())


def test_regression_evaluation_has_no_accuracy():
    model = nn.Linear(4, 2)
    inputs, values = torch.randn(9, 4), torch.randn(9, 2)
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(inputs), values).item()

    metrics = evaluate(model, nn.MSELoss(), inputs, values, "mse", 2)

    assert metrics == {"loss": pytest.approx(expected, rel=1e-5)}
