"""Eigenpairs, subsampling, MC and directional derivatives against torch.func references in float64."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from harness.curvature import compute_curvature, exact_ggn
from harness.curvature.exact import _without_hooks
from harness.curvature.lanczos import lanczos_density
from harness.curvature.memory import MemoryBudgetError, estimate_memory


def conv_problem(seed: int = 0, num_samples: int = 5):
    """Conv2d 2→3 (3×3, same) + ReLU + Linear 75→4 on 5×5 inputs, CrossEntropyLoss(mean)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    inputs = torch.randn(num_samples, 2, 5, 5, dtype=torch.float64)
    labels = torch.randint(0, 4, (num_samples,))
    return model, nn.CrossEntropyLoss(), inputs, labels


def exact_eigh(model, loss_func, inputs, targets, params):
    """Eigenvalues (descending) and eigenvectors of the exact GGN block."""
    eigvals, eigvecs = torch.linalg.eigh(exact_ggn(model, loss_func, inputs, targets, params))
    return eigvals.flip(0), eigvecs.flip(1)


def flat_eigvecs(eigvecs):
    """Concatenate per-parameter eigenvectors [K, *shape] to [K, D]."""
    return torch.cat([piece.flatten(start_dim=1) for piece in eigvecs], dim=1)


def per_sample_gradients(model, loss_func, inputs, targets, params):
    """Gradients of the single-sample losses ℓ_n as [N, D], with torch.func."""
    wanted = {id(p) for p in params}
    group_names = [name for name, p in model.named_parameters() if id(p) in wanted]
    model, loss_func = _without_hooks(model), _without_hooks(loss_func)
    frozen = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(group, x, y):
        return loss_func(functional_call(model, {**frozen, **group}, (x[None],)), y[None])

    selected = {name: frozen[name] for name in group_names}
    gradients = vmap(grad(sample_loss), in_dims=(None, 0, 0))(selected, inputs, targets)
    return torch.cat([gradients[name].flatten(start_dim=1) for name in group_names], dim=1)


@pytest.mark.parametrize("path", ["structured", "chunked", "materialized"])
def test_eigvecs_match_exact_up_to_sign(path):
    model, loss_func, inputs, labels = conv_problem()
    params = list(model.parameters())

    result = compute_curvature(model, loss_func, inputs, labels, {"all": params}, top_k=5, eigvecs=True, path=path)["all"]
    exact_values, exact_vectors = exact_eigh(model, loss_func, inputs, labels, params)
    vectors = flat_eigvecs(result.eigvecs)

    torch.testing.assert_close(result.selected, exact_values[:5], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5, dtype=torch.float64))
    overlaps = (vectors @ exact_vectors[:, :5]).diagonal().abs()
    torch.testing.assert_close(overlaps, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)


def test_eigvecs_in_chunks_match_unchunked(monkeypatch):
    model, loss_func, inputs, labels = conv_problem(seed=7)
    groups = {"all": list(model.parameters())}
    whole = compute_curvature(model, loss_func, inputs, labels, groups, top_k=4, eigvecs=True, path="structured")
    # N·L·O = 5·25·3 entries per eigenvector for the convolution: a limit of 100 maps one at a time.
    monkeypatch.setattr("harness.curvature.structured.CHUNK_ENTRIES", 100)

    chunked = compute_curvature(model, loss_func, inputs, labels, groups, top_k=4, eigvecs=True, path="structured")

    for piece, reference in zip(chunked["all"].eigvecs, whole["all"].eigvecs):
        torch.testing.assert_close(piece, reference, rtol=1e-9, atol=1e-12)


def test_eigvecs_of_several_groups_match_their_blocks():
    model, loss_func, inputs, labels = conv_problem(seed=1)
    groups = {"conv": list(model[0].parameters()), "fc": list(model[3].parameters())}

    results = compute_curvature(model, loss_func, inputs, labels, groups, top_k=3, eigvecs=True)

    for name, params in groups.items():
        exact_values, exact_vectors = exact_eigh(model, loss_func, inputs, labels, params)
        vectors = flat_eigvecs(results[name].eigvecs)
        torch.testing.assert_close(results[name].selected, exact_values[:3], rtol=1e-9, atol=1e-12)
        overlaps = (vectors @ exact_vectors[:, :3]).diagonal().abs()
        torch.testing.assert_close(overlaps, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_repeated_eigvals_span_matches_exact():
    # Linear without bias under MSE: G = 2/(N·C) XᵀX ⊗ I_C, so every eigenvalue repeats C = 3 times.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.randn(6, 3, dtype=torch.float64)
    loss_func = nn.MSELoss()
    params = list(model.parameters())

    result = compute_curvature(model, loss_func, inputs, targets, {"all": params}, top_k=3, eigvecs=True)["all"]
    exact_values, exact_vectors = exact_eigh(model, loss_func, inputs, targets, params)
    vectors = flat_eigvecs(result.eigvecs)

    torch.testing.assert_close(result.selected, exact_values[0].expand(3), rtol=1e-10, atol=0)
    assert exact_values[2] - exact_values[3] > 1e-3 * exact_values[0]
    projector = vectors.T @ vectors
    exact_projector = exact_vectors[:, :3] @ exact_vectors[:, :3].T
    torch.testing.assert_close(projector, exact_projector, rtol=0, atol=1e-10)


def test_threshold_selects_eigvals_above_it():
    model, loss_func, inputs, labels = conv_problem()
    params = list(model.parameters())
    exact_values, _ = exact_eigh(model, loss_func, inputs, labels, params)
    threshold = (exact_values[2] + exact_values[3]).item() / 2

    result = compute_curvature(model, loss_func, inputs, labels, {"all": params}, min_eigval=threshold)["all"]

    assert result.selected.numel() == 3
    assert result.gram_eigvecs is None


def test_small_selected_eigval_warns():
    # Linear without bias under MSE has the eigenvalues of 2/(N·C) XᵀX (each C times): singular
    # values 1 and 1e-5 of X give λ_min / λ_max = 1e-10, below sqrt(eps_float64) ≈ 1.5e-8.
    model = nn.Sequential(nn.Linear(2, 3, bias=False)).double()
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1e-5], [0.0, 0.0]], dtype=torch.float64)
    targets = torch.zeros(3, 3, dtype=torch.float64)
    params = list(model.parameters())

    with pytest.warns(UserWarning, match="3 selected eigenvalues are below .* eigenvectors are unreliable"):
        result = compute_curvature(model, nn.MSELoss(), inputs, targets, {"all": params}, eigvecs=True)["all"]
    assert result.selected.numel() == 6


def test_small_eigval_quiet_without_eigvecs(recwarn):
    model = nn.Sequential(nn.Linear(2, 3, bias=False)).double()
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1e-5], [0.0, 0.0]], dtype=torch.float64)
    params = list(model.parameters())

    compute_curvature(model, nn.MSELoss(), inputs, torch.zeros(3, 3, dtype=torch.float64), {"all": params})

    assert not [warning for warning in recwarn if "unreliable" in str(warning.message)]


@pytest.mark.parametrize("subsampling", [None, [0, 2, 3]])
def test_directional_derivatives_match_autograd(subsampling):
    model, loss_func, inputs, labels = conv_problem(seed=2)
    params = list(model.parameters())
    indices = list(range(5)) if subsampling is None else subsampling

    result = compute_curvature(
        model, loss_func, inputs, labels, {"all": params}, subsampling=subsampling, top_k=4,
        eigvecs=True, directional_derivatives=True,
    )["all"]
    vectors = flat_eigvecs(result.eigvecs)
    gradients = per_sample_gradients(model, loss_func, inputs[indices], labels[indices], params)
    sample_ggns = [exact_ggn(model, loss_func, inputs[n : n + 1], labels[n : n + 1], params) for n in indices]

    expected_first = gradients @ vectors.T
    expected_second = torch.stack([torch.einsum("kd,de,ke->k", vectors, ggn, vectors) for ggn in sample_ggns])
    torch.testing.assert_close(result.first_derivatives, expected_first, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.second_derivatives, expected_second, rtol=1e-9, atol=1e-12)

    mean_gradient = gradients.mean(dim=0)
    expected_overlap = (vectors @ mean_gradient).square().sum() / mean_gradient.square().sum()
    assert result.grad_overlap == pytest.approx(expected_overlap.item(), rel=1e-9)
    expected_snr = expected_second.mean(dim=0).square() / expected_second.var(dim=0)
    torch.testing.assert_close(result.snr(), expected_snr, rtol=1e-8, atol=0)


def test_subsampled_ggn_is_mean_ggn_of_subset():
    model, loss_func, inputs, labels = conv_problem(seed=4, num_samples=6)
    params = list(model.parameters())
    subset = [5, 1, 2]

    result = compute_curvature(model, loss_func, inputs, labels, {"all": params}, subsampling=subset)["all"]
    exact_values, _ = exact_eigh(model, loss_func, inputs[subset], labels[subset], params)

    torch.testing.assert_close(result.eigvals, exact_values[: 4 * 3], rtol=1e-9, atol=1e-12)


def test_mc_ggn_is_unbiased():
    model, loss_func, inputs, labels = conv_problem(seed=5, num_samples=3)
    params = list(model[3].parameters())
    exact = exact_ggn(model, loss_func, inputs, labels, params)
    torch.manual_seed(0)

    draws = []
    for _ in range(30):
        result = compute_curvature(
            model, loss_func, inputs, labels, {"fc": params}, approximation="mc", mc_samples=30, eigvecs=True
        )["fc"]
        vectors = flat_eigvecs(result.eigvecs)
        draws.append(vectors.T @ torch.diag(result.selected) @ vectors)
    draws = torch.stack(draws)

    # Each entry's mean over T = 30 independent draws has standard error std/sqrt(T). With the
    # std estimated, the deviation over it is t-distributed with 29 degrees of freedom if the
    # draws are normal (each averages 3·30 sampled outer products): P(|t| > 8) ≈ 1e-8 per entry,
    # so all 304² entries pass with probability about 0.999.
    standard_error = draws.std(dim=0) / len(draws) ** 0.5
    deviation = (draws.mean(dim=0) - exact).abs()
    assert bool((deviation <= 8 * standard_error + 1e-12).all()), (deviation / standard_error).max()
    biased = (draws.mean(dim=0) - 1.2 * exact).abs()
    assert not bool((biased <= 8 * standard_error + 1e-12).all())


def test_sum_reduction_rejected_for_subsampling():
    model, _, inputs, labels = conv_problem()
    with pytest.raises(ValueError, match="Invalid loss reduction 'sum'.*reduction='mean'"):
        compute_curvature(model, nn.CrossEntropyLoss(reduction="sum"), inputs, labels, {"all": list(model.parameters())}, subsampling=[0, 1])


def test_batch_axis_mismatch_rejected():
    model, loss_func, inputs, labels = conv_problem()
    with pytest.raises(ValueError, match="batch axis must come first"):
        compute_curvature(model, loss_func, inputs, labels[:4], {"all": list(model.parameters())})


@pytest.mark.parametrize("subsampling", [[0, 0], [0, 9], []])
def test_invalid_subsampling_rejected(subsampling):
    model, loss_func, inputs, labels = conv_problem()
    with pytest.raises(ValueError, match="Invalid subsampling"):
        compute_curvature(model, loss_func, inputs, labels, {"all": list(model.parameters())}, subsampling=subsampling)


def test_memory_budget_error_names_estimate_and_options():
    model, loss_func, inputs, labels = conv_problem()
    with pytest.raises(MemoryBudgetError, match=r"estimated .* GB .*above the memory budget of 1e-06 GB.*batch_size"):
        compute_curvature(model, loss_func, inputs, labels, {"all": list(model.parameters())}, memory_budget_gb=1e-6)


def test_memory_estimate_grows_with_batch():
    model, _, inputs, _ = conv_problem()
    groups = {"all": list(model.parameters())}
    small = estimate_memory(model, inputs, groups, factor_columns=4, subset_size=5)
    large = estimate_memory(model, torch.cat([inputs] * 4), groups, factor_columns=4, subset_size=20)

    # The two Gram matrices plus one eigendecomposition: 3 · (4·N)² float64 entries.
    assert small.grams == 3 * 20**2 * 8
    assert large.grams == 16 * small.grams
    assert large.total > small.total


def half_the_gram_budget(model, inputs, groups, columns):
    """A budget in GB of half the Gram computation's estimate: with 40 samples the Lanczos vectors fit."""
    return estimate_memory(model, inputs, groups, columns, len(inputs)).total / 2 / 1e9


def test_lanczos_fallback_matches_exact_top_k():
    model, loss_func, inputs, labels = conv_problem(seed=6, num_samples=40)
    groups = {"conv": list(model[0].parameters()), "fc": list(model[3].parameters())}
    budget = half_the_gram_budget(model, inputs, groups, columns=3)

    results = compute_curvature(
        model, loss_func, inputs, labels, groups, top_k=3, eigvecs=True, memory_budget_gb=budget, on_budget_exceeded="lanczos"
    )

    for name, params in groups.items():
        exact_values, exact_vectors = exact_eigh(model, loss_func, inputs, labels, params)
        assert results[name].method == "lanczos"
        torch.testing.assert_close(results[name].selected, exact_values[:3], rtol=1e-6, atol=1e-10)
        overlaps = (flat_eigvecs(results[name].eigvecs) @ exact_vectors[:, :3]).diagonal().abs()
        torch.testing.assert_close(overlaps, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)


def test_memory_estimate_accepts_batchnorm_in_training():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    inputs = torch.randn(8, 4, dtype=torch.float64)

    estimate = estimate_memory(model, inputs, {"all": list(model.parameters())}, factor_columns=3, subset_size=8)

    # Both Linear layers take the structured path: X Xᵀ (8²) and S Sᵀ ((3·8)²) float64 entries,
    # more than BatchNorm's slices of V (3·8 · 6 entries each).
    assert estimate.layer == (8**2 + 24**2) * 8
    assert estimate.total > estimate.grams


def test_batch_axis_not_first_in_output_rejected():
    torch.manual_seed(0)
    # The model reshapes its [5, 4] output to [4, 5], so the first axis is no longer the batch.
    model = nn.Sequential(nn.Linear(3, 4), nn.Flatten(start_dim=0), nn.Unflatten(0, (4, 5))).double()
    inputs = torch.randn(5, 3, dtype=torch.float64)

    with pytest.raises(ValueError, match=r"Invalid model output shape \(4, 5\) .* batch axis first"):
        compute_curvature(model, nn.MSELoss(), inputs, torch.zeros(5, 4, dtype=torch.float64), {"all": list(model.parameters())})


def test_results_follow_group_order():
    model, loss_func, inputs, labels = conv_problem()
    # BackPACK visits the last layer first, so the Gram matrices are filled in reverse order.
    groups = {"conv": list(model[0].parameters()), "fc": list(model[3].parameters())}

    results = compute_curvature(model, loss_func, inputs, labels, groups)

    assert list(results) == ["conv", "fc"]


def budget_between(model, inputs, groups, columns, pass_samples, total_samples):
    """A budget in GB that fits passes over ``pass_samples`` samples but not one over all of them."""
    fits = estimate_memory(model, inputs, groups, columns, pass_samples, total_samples=total_samples).total
    whole = estimate_memory(model, inputs, groups, columns, total_samples).total
    assert fits < whole
    return (fits + 1) / 1e9


def test_chunked_fallback_matches_one_pass():
    model, loss_func, inputs, labels = conv_problem(seed=7, num_samples=6)
    groups = {"conv": list(model[0].parameters()), "fc": list(model[3].parameters())}
    options = dict(top_k=4, eigvecs=True, directional_derivatives=True, subsampling=[5, 0, 2, 3, 1])
    # 5 samples in 3 chunks of at most 2: every pass covers 4 samples. R = C - 1 + 1 columns.
    budget = budget_between(model, inputs, groups, columns=4, pass_samples=4, total_samples=5)

    reference = compute_curvature(model, loss_func, inputs, labels, groups, **options)
    chunked = compute_curvature(
        model, loss_func, inputs, labels, groups, memory_budget_gb=budget, on_budget_exceeded="chunked", **options
    )

    for name in groups:
        assert chunked[name].method == "chunked"
        assert chunked[name].detail == 3
        torch.testing.assert_close(chunked[name].eigvals, reference[name].eigvals, rtol=1e-10, atol=1e-14)
        signs = torch.sign((flat_eigvecs(chunked[name].eigvecs) * flat_eigvecs(reference[name].eigvecs)).sum(dim=1))
        torch.testing.assert_close(
            flat_eigvecs(chunked[name].eigvecs) * signs[:, None], flat_eigvecs(reference[name].eigvecs), rtol=1e-8, atol=1e-10
        )
        torch.testing.assert_close(
            chunked[name].second_derivatives, reference[name].second_derivatives, rtol=1e-8, atol=1e-12
        )
        torch.testing.assert_close(
            chunked[name].first_derivatives.abs(), reference[name].first_derivatives.abs(), rtol=1e-8, atol=1e-12
        )
        torch.testing.assert_close(chunked[name].gradient_norm, reference[name].gradient_norm, rtol=1e-10, atol=0)


def test_mc_fallback_largest_fitting_samples():
    model, loss_func, inputs, labels = conv_problem(seed=8, num_samples=6)
    groups = {"all": list(model.parameters())}
    # The exact factor has C - 1 = 3 columns per sample; 2 Monte-Carlo samples fit, 3 do not.
    fits = estimate_memory(model, inputs, groups, factor_columns=2, subset_size=6).total
    assert estimate_memory(model, inputs, groups, factor_columns=3, subset_size=6).total > fits + 1
    budget = (fits + 1) / 1e9

    torch.manual_seed(11)
    fallback = compute_curvature(model, loss_func, inputs, labels, groups, memory_budget_gb=budget, on_budget_exceeded="mc")
    torch.manual_seed(11)
    reference = compute_curvature(model, loss_func, inputs, labels, groups, approximation="mc", mc_samples=2)

    assert fallback["all"].method == "mc"
    assert fallback["all"].detail == 2
    torch.testing.assert_close(fallback["all"].eigvals, reference["all"].eigvals, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        # 5 samples with C − 1 = 3 columns each.
        ("chunked", "chunked fallback .* chunks of one sample.*whole Gram matrix \\(15² entries"),
        ("mc", "MC fallback .* one Monte-Carlo sample .*on_budget_exceeded=lanczos"),
    ],
)
def test_fallback_over_budget_raises(action, message):
    model, loss_func, inputs, labels = conv_problem(seed=9)
    with pytest.raises(MemoryBudgetError, match=message):
        compute_curvature(
            model, loss_func, inputs, labels, {"all": list(model.parameters())}, memory_budget_gb=1e-9,
            on_budget_exceeded=action,
        )


def test_chunked_fallback_rejects_monte_carlo():
    model, loss_func, inputs, labels = conv_problem(seed=9)
    with pytest.raises(ValueError, match="on_budget_exceeded='chunked' with approximation='mc'"):
        compute_curvature(
            model, loss_func, inputs, labels, {"all": list(model.parameters())}, approximation="mc",
            memory_budget_gb=1.0, on_budget_exceeded="chunked",
        )


@pytest.mark.parametrize("steps", [3, 12])
def test_lanczos_density_diagonal_moments(steps):
    """For a diagonal operator every Rademacher probe gives each eigenvalue the weight 1/D."""
    eigvals = torch.linspace(0.0, 2.0, 12, dtype=torch.float64) ** 2

    nodes, weights = lanczos_density(lambda v: eigvals.numpy() * v, 12, probes=3, steps=steps)

    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Gauss quadrature with `steps` nodes is exact for moments below 2·steps.
    for power in range(2 * steps):
        expected = eigvals.pow(power).mean()
        torch.testing.assert_close((weights * nodes.pow(power)).sum(), expected, rtol=1e-8, atol=1e-12)
    if steps == 12:
        torch.testing.assert_close(nodes.reshape(12, 3)[:, 0], eigvals, rtol=1e-8, atol=1e-10)


def test_lanczos_density_spans_exact_spectrum():
    model, loss_func, inputs, labels = conv_problem(seed=10, num_samples=40)
    params = list(model[3].parameters())
    exact = torch.linalg.eigvalsh(exact_ggn(model, loss_func, inputs, labels, params))
    budget = half_the_gram_budget(model, inputs, {"fc": params}, columns=3)

    result = compute_curvature(
        model, loss_func, inputs, labels, {"fc": params}, top_k=2, memory_budget_gb=budget,
        on_budget_exceeded="lanczos", density_probes=2, density_steps=30,
    )["fc"]

    assert result.density_weights.sum().item() == pytest.approx(1.0, abs=1e-10)
    # Lanczos finds the extreme eigenvalues first: the largest node is λ_max.
    assert result.density_nodes.max().item() == pytest.approx(exact.max().item(), rel=1e-8)
    # The mean of the nodes estimates tr(G) / D; two probes give it to within a factor of 2 here.
    mean = (result.density_weights * result.density_nodes).sum().item()
    assert 0.5 < mean / (exact.sum().item() / exact.numel()) < 2.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lanczos_fallback_mse_matches_exact(reduction):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, targets = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    loss_func = nn.MSELoss(reduction=reduction)
    params = list(model.parameters())
    exact = torch.linalg.eigvalsh(exact_ggn(model, loss_func, inputs, targets, params)).flip(0)
    budget = half_the_gram_budget(model, inputs, {"all": params}, columns=3)

    result = compute_curvature(
        model, loss_func, inputs, targets, {"all": params}, top_k=3, memory_budget_gb=budget, on_budget_exceeded="lanczos"
    )["all"]

    torch.testing.assert_close(result.selected, exact[:3], rtol=1e-6, atol=1e-10)
    assert result.density_nodes.max().item() == pytest.approx(exact[0].item(), rel=1e-8)


def test_lanczos_fallback_over_budget_raises():
    model, loss_func, inputs, labels = conv_problem(seed=9)
    # 10 kB: below the Gram computation's estimate, and 20 eigsh vectors and 20 density steps of
    # the 361 parameters alone take 115 kB.
    with pytest.raises(MemoryBudgetError, match=r"Lanczos fallback needs .*\(40 vectors of 361 parameters"):
        compute_curvature(
            model, loss_func, inputs, labels, {"all": list(model.parameters())}, top_k=3, memory_budget_gb=1e-5,
            on_budget_exceeded="lanczos",
        )
