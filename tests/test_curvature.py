"""Gram eigenvalues against the exact GGN built with torch.func, independent of BackPACK."""

import pytest
import torch
from torch.nn import CrossEntropyLoss, Linear, MSELoss, ReLU, Sequential, Sigmoid

from harness.curvature import compare_eigvals, compute_grams, exact_ggn, gram_eigvals
from harness.curvature.gram import reduced_cross_entropy_factor
from harness.groups import build_param_groups


def reference_problem(seed: int, dtype: torch.dtype = torch.float32):
    """MLP 7→5→5→3 (88 parameters), N=4 uniform inputs and targets, MSELoss(mean)."""
    torch.manual_seed(seed)
    inputs = torch.rand(4, 7, dtype=dtype)
    targets = torch.rand(4, 3, dtype=dtype)
    model = Sequential(Linear(7, 5), Linear(5, 5), Linear(5, 3)).to(dtype)
    return model, MSELoss(reduction="mean"), inputs, targets


def test_reference_case_matches_exact_ggn():
    model, loss_func, inputs, targets = reference_problem(seed=0)
    params = list(model.parameters())

    eigvals = gram_eigvals(compute_grams(model, loss_func, inputs, targets, {"all": params})["all"])
    ggn = exact_ggn(model, loss_func, inputs, targets, params)
    result = compare_eigvals(eigvals, ggn, rtol=1e-4, atol=1e-7)

    assert sum(p.numel() for p in params) == 88
    assert ggn.shape == (88, 88)
    assert eigvals.numel() == 12
    assert result.num_compared == 12
    assert result.passed, (result.gram_eigvals, result.exact_eigvals)


@pytest.mark.parametrize("seed", range(5))
def test_reference_case_float64_tight(seed):
    model, loss_func, inputs, targets = reference_problem(seed, torch.float64)
    params = list(model.parameters())

    eigvals = gram_eigvals(compute_grams(model, loss_func, inputs, targets, {"all": params})["all"])
    exact = torch.linalg.eigvalsh(exact_ggn(model, loss_func, inputs, targets, params)).flip(0)[:12]

    torch.testing.assert_close(eigvals, exact, rtol=1e-9, atol=1e-12)


def test_wrong_scaling_fails_validation():
    model, loss_func, inputs, targets = reference_problem(seed=0, dtype=torch.float64)
    params = list(model.parameters())
    eigvals = gram_eigvals(compute_grams(model, loss_func, inputs, targets, {"all": params})["all"])
    ggn = exact_ggn(model, loss_func, inputs, targets, params)

    assert not compare_eigvals(eigvals * 4, ggn, rtol=1e-4, atol=1e-7).passed


@pytest.mark.parametrize("reduced_factor", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_exact_ggn(reduction, reduced_factor):
    torch.manual_seed(1)
    inputs = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    model = Sequential(Linear(4, 6), Sigmoid(), Linear(6, 5)).double()
    loss_func = CrossEntropyLoss(reduction=reduction)
    params = list(model.parameters())

    grams = compute_grams(model, loss_func, inputs, labels, {"all": params}, reduced_factor=reduced_factor)
    eigvals = gram_eigvals(grams["all"])
    ggn = exact_ggn(model, loss_func, inputs, labels, params)
    result = compare_eigvals(eigvals, ggn, rtol=1e-8, atol=1e-12)

    # BackPACK's factor has C = 5 columns per sample, the reduced one C - 1 = 4.
    assert eigvals.numel() == 6 * (4 if reduced_factor else 5)
    assert result.passed, (result.gram_eigvals, result.exact_eigvals)
    # Softmax's loss Hessian has the all-ones null vector, so each sample adds at most C-1 = 4.
    assert int((eigvals > 1e-10).sum()) <= 6 * 4


@pytest.mark.parametrize("scale", [0.0, 1.0, 40.0])
def test_reduced_factor_squares_to_hessian(scale):
    """S Sᵀ per sample equals the autograd Hessian of CE in the logits, also for p near one-hot."""
    torch.manual_seed(3)
    logits = scale * torch.randn(5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (5,))

    factor = reduced_cross_entropy_factor(logits, "mean", batch_size=5)

    assert factor.shape == (6, 5, 7)
    for sample in range(5):
        hessian = torch.autograd.functional.hessian(
            lambda z: torch.nn.functional.cross_entropy(z.unsqueeze(0), labels[sample : sample + 1]), logits[sample]
        )
        square = factor[:, sample].T @ factor[:, sample]
        torch.testing.assert_close(5 * square, hessian, rtol=1e-10, atol=1e-13)


def test_per_layer_groups_match_blocks_and_traces():
    torch.manual_seed(2)
    inputs = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (5,))
    model = Sequential(Linear(6, 8), ReLU(), Linear(8, 8), ReLU(), Linear(8, 4)).double()
    loss_func = CrossEntropyLoss()
    groups = build_param_groups(model, "per_layer")
    all_params = list(model.parameters())

    grams = compute_grams(model, loss_func, inputs, labels, groups)
    full_ggn = exact_ggn(model, loss_func, inputs, labels, all_params)

    assert list(grams) == ["0", "2", "4"]
    for name, params in groups.items():
        block = exact_ggn(model, loss_func, inputs, labels, params)
        result = compare_eigvals(gram_eigvals(grams[name]), block, rtol=1e-8, atol=1e-12)
        assert result.passed, name
    group_traces = sum(torch.trace(gram) for gram in grams.values())
    torch.testing.assert_close(group_traces, torch.trace(full_ggn), rtol=1e-10, atol=0.0)


def test_gram_eigvals_reports_rank_deficiency_as_zero():
    factor = torch.randn(3, 10, dtype=torch.float64)
    eigvals = gram_eigvals(factor.T @ factor)

    assert (eigvals >= 0).all()
    assert int((eigvals > 0).sum()) == 3
    torch.testing.assert_close(eigvals[:3], torch.linalg.eigvalsh(factor @ factor.T).flip(0))


def test_parameter_in_two_groups_rejected():
    model = Sequential(Linear(2, 2))
    params = list(model.parameters())
    with pytest.raises(ValueError, match="in groups 'a' and 'b'"):
        compute_grams(model, MSELoss(), torch.randn(3, 2), torch.randn(3, 2), {"a": params, "b": params[:1]})


def test_empty_group_rejected():
    model = Sequential(Linear(2, 2))
    with pytest.raises(ValueError, match="group 'a' is empty"):
        compute_grams(model, MSELoss(), torch.randn(3, 2), torch.randn(3, 2), {"a": []})
