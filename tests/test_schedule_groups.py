"""Checkpoint schedules and parameter groupings."""

import pytest
from torch import nn

from harness.groups import build_param_groups
from harness.models import mlp
from harness.schedule import checkpoint_steps


def test_every_includes_first_and_last():
    assert checkpoint_steps(105, "every", every=50) == [0, 50, 100, 105]


def test_listed_steps_sorted_with_ends():
    assert checkpoint_steps(100, "steps", steps=[30, 10, 10]) == [0, 10, 30, 100]


def test_log_spacing_is_dense_early():
    steps = checkpoint_steps(1000, "log", num=5)

    assert steps[0] == 0
    assert steps[-1] == 1000
    assert steps == sorted(set(steps))
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps)


def test_step_beyond_training_rejected():
    with pytest.raises(ValueError, match=r"\[500\].*train.steps=300"):
        checkpoint_steps(300, "steps", steps=[100, 500])


@pytest.mark.parametrize(("kind", "kwargs"), [("every", {"every": 0}), ("log", {"num": 1})])
def test_nonpositive_schedule_sizes_rejected(kind, kwargs):
    with pytest.raises(ValueError, match="Invalid curvature.schedule"):
        checkpoint_steps(100, kind, **kwargs)


@pytest.mark.parametrize(
    ("grouping", "names"),
    [
        ("all", ["all"]),
        ("per_layer", ["fc1", "fc2", "fc3"]),
        ("per_param", ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]),
        ("weights_biases", ["weights", "biases"]),
    ],
)
def test_grouping_names(grouping, names):
    model = mlp(4, [3, 3], 2, "relu")

    groups = build_param_groups(model, grouping)

    assert list(groups) == names
    assert sum(p.numel() for params in groups.values() for p in params) == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_left_out():
    model = mlp(4, [3], 2, "tanh")
    model.fc1.weight.requires_grad_(False)

    groups = build_param_groups(model, "per_param")

    assert list(groups) == ["fc1.bias", "fc2.weight", "fc2.bias"]


def test_unknown_grouping_rejected():
    with pytest.raises(ValueError, match="per_neuron"):
        build_param_groups(nn.Linear(2, 2), "per_neuron")
