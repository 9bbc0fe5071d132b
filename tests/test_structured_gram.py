"""Structured and materialized Gram paths of Linear and convolution layers against the exact GGN."""

import pytest
import torch
from torch import nn

from harness.curvature import compute_grams, exact_ggn, gram_eigvals
from harness.curvature.gram import GramAccumulator, check_all_groups_computed, run_backward


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4))


def conv2d_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(2 * 3 * 3, 4)
    )


def sequence_net():
    """Linear layers on inputs with a leading sequence dimension of length 3."""
    return nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(3 * 2, 4))


CASES = {
    "conv1d": (conv1d_net, (2, 6)),
    "conv2d": (conv2d_net, (2, 7, 7)),
    "linear_leading_dims": (sequence_net, (3, 5)),
}


def problem(case: str, seed: int = 0, num_samples: int = 3):
    build, input_shape = CASES[case]
    torch.manual_seed(seed)
    model = build().double()
    inputs = torch.randn(num_samples, *input_shape, dtype=torch.float64)
    labels = torch.randint(0, 4, (num_samples,))
    return model, nn.CrossEntropyLoss(), inputs, labels


@pytest.mark.parametrize("path", ["structured", "chunked", "materialized"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_path_matches_exact_per_layer(case, path):
    model, loss_func, inputs, labels = problem(case)
    groups = {name: list(module.parameters()) for name, module in model.named_children() if list(module.parameters())}

    grams = compute_grams(model, loss_func, inputs, labels, groups, path=path)

    for name, params in groups.items():
        exact = torch.linalg.eigvalsh(exact_ggn(model, loss_func, inputs, labels, params)).flip(0)
        eigvals = gram_eigvals(grams[name])
        num = min(eigvals.numel(), exact.numel())
        torch.testing.assert_close(eigvals[:num], exact[:num], rtol=1e-9, atol=1e-12, msg=f"group {name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_paths_give_same_gram(case):
    model, loss_func, inputs, labels = problem(case, seed=1)
    groups = {"all": list(model.parameters())}

    structured = compute_grams(model, loss_func, inputs, labels, groups, path="structured")["all"]
    chunked = compute_grams(model, loss_func, inputs, labels, groups, path="chunked")["all"]
    materialized = compute_grams(model, loss_func, inputs, labels, groups, path="materialized")["all"]

    torch.testing.assert_close(structured, materialized, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(chunked, materialized, rtol=1e-10, atol=1e-13)


def test_auto_path_chosen_per_layer():
    model, loss_func, inputs, labels = problem("conv2d")
    params = list(model.parameters())
    accumulator = GramAccumulator({"all": params})

    run_backward(model, loss_func, inputs, labels, accumulator)
    check_all_groups_computed(accumulator)

    assert accumulator.paths[id(model[4].weight)] == "structured"
    # conv1 has L = 4·4 output positions: the structured path contracts an L×L input kernel
    # per pair of samples, more work than the 3·2·9 weights per pair of rows on the chunked path.
    assert accumulator.paths[id(model[0].weight)] == "chunked"


def test_unknown_path_rejected():
    model, loss_func, inputs, labels = problem("conv1d")
    with pytest.raises(ValueError, match="Invalid Gram path 'fast'"):
        compute_grams(model, loss_func, inputs, labels, {"all": list(model.parameters())}, path="fast")


def test_chunked_path_splits_output_features(monkeypatch):
    model, loss_func, inputs, labels = problem("conv2d", seed=2)
    groups = {"all": list(model.parameters())}
    reference = compute_grams(model, loss_func, inputs, labels, groups, path="materialized")["all"]
    # conv1's slice of V has rows·I = 12·18 = 216 entries per output feature, so a limit of 200
    # gives one feature per chunk.
    monkeypatch.setattr("harness.curvature.structured.CHUNK_ENTRIES", 200)

    chunked = compute_grams(model, loss_func, inputs, labels, groups, path="chunked")["all"]

    torch.testing.assert_close(chunked, reference, rtol=1e-10, atol=1e-13)


def test_structured_path_one_sample_blocks(monkeypatch):
    model, loss_func, inputs, labels = problem("conv2d", seed=3, num_samples=5)
    groups = {"all": list(model.parameters())}
    reference = compute_grams(model, loss_func, inputs, labels, groups, path="materialized")["all"]
    # One sample per kernel block and per piece of T: every loop of the structured path runs.
    monkeypatch.setattr("harness.curvature.structured.CHUNK_ENTRIES", 1)
    monkeypatch.setattr("harness.curvature.structured.GROUP_ENTRIES", 1)

    structured = compute_grams(model, loss_func, inputs, labels, groups, path="structured")["all"]

    torch.testing.assert_close(structured, reference, rtol=1e-10, atol=1e-13)


def test_no_factor_left_on_parameters():
    model, loss_func, inputs, labels = problem("conv2d")

    compute_grams(model, loss_func, inputs, labels, {"all": list(model.parameters())})

    for name, param in model.named_parameters():
        assert not hasattr(param, "sqrt_ggn_exact"), name
