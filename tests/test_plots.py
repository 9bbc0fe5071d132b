"""Figures of spectra: the data drawn is checked against NumPy computations of the same arrays."""

import numpy as np
import pytest
import torch
from backpack import extend
from torch.nn import Linear, MSELoss, Sequential, Tanh

from harness import plots
from harness.curvature.memory import estimate_memory
from harness.spectrum import SpectrumProbe


@pytest.fixture
def spectra():
    """Spectra of a real 5→4→3 MLP at three checkpoints, both layers validated."""
    torch.manual_seed(0)
    model = extend(Sequential(Linear(5, 4), Tanh(), Linear(4, 3)))
    loss_func = extend(MSELoss())
    inputs, targets = torch.randn(6, 5), torch.randn(6, 3)
    groups = {"first": list(model[0].parameters()), "last": list(model[2].parameters())}
    probe = SpectrumProbe(groups, loss_func, inputs, targets, validate_max_params=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    result = []
    for step in range(3):
        result.append(probe.compute(model, step))
        optimizer.zero_grad()
        loss_func(model(inputs), targets).backward()
        optimizer.step()
    return result


def test_log_density_integrates_to_positive_fraction():
    values = np.array([0.0, 0.0, 1e-3, 2e-3, 0.1, 0.5, 3.0, 10.0])
    edges = plots.log_bins([values], num=7)

    density = plots.log_density(values, edges)

    assert edges[0] == pytest.approx(1e-3)
    assert edges[-1] == pytest.approx(10.0)
    assert np.sum(density * np.diff(np.log10(edges))) == pytest.approx(6 / 8)


def test_run_figures_paths(spectra):
    figures = plots.run_figures(spectra, top_k=3)

    kinds = ["density", "top_eigvals", "spectrogram", "validation"]
    assert sorted(figures) == sorted(f"plots/{group}/{kind}.png" for group in ["first", "last"] for kind in kinds)
    for figure in figures.values():
        plots.close(figure)


def test_top_eigvals_lines_match_spectra(spectra):
    steps = [spectrum.step for spectrum in spectra]
    eigvals = [spectrum.eigvals["first"].numpy() for spectrum in spectra]

    figure = plots.plot_top_eigvals(steps, eigvals, top_k=3, title="t")

    lines = figure.axes[0].get_lines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert list(line.get_xdata()) == steps
        expected = [np.sort(values)[::-1][rank] for values in eigvals]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=0)
    plots.close(figure)


def test_density_one_line_per_checkpoint(spectra):
    eigvals = [spectrum.eigvals["last"].numpy() for spectrum in spectra]

    figure = plots.plot_density([0, 1, 2], eigvals, title="t")

    lines = figure.axes[0].get_lines()
    assert len(lines) == 3
    assert figure.axes[0].get_xscale() == "log"
    edges = plots.log_bins(eigvals)
    np.testing.assert_allclose(lines[1].get_ydata(), plots.log_density(eigvals[1], edges))
    plots.close(figure)


def test_spectrogram_columns_are_densities(spectra):
    eigvals = [spectrum.eigvals["first"].numpy() for spectrum in spectra]

    figure = plots.plot_spectrogram([0, 1, 2], eigvals, title="t")

    mesh = figure.axes[0].collections[0]
    edges = plots.log_bins(eigvals)
    expected = np.array([plots.log_density(values, edges) for values in eigvals]).T
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    plots.close(figure)


def test_validation_scatter_errors(spectra):
    results = [spectrum.validation["first"] for spectrum in spectra]
    gram = [result.gram_eigvals.numpy() for result in results]
    exact = [result.exact_eigvals.numpy() for result in results]

    figure = plots.plot_validation([0, 1, 2], gram, exact, rtol=1e-3, atol=1e-6, title="t")

    scatter, errors = figure.axes[:2]
    points = errors.collections[-1].get_offsets()
    on_log_axes = (exact[-1] > plots.MIN_POSITIVE) & (gram[-1] > plots.MIN_POSITIVE)
    np.testing.assert_allclose(points[:, 0], exact[-1][on_log_axes])
    np.testing.assert_allclose(points[:, 1], np.maximum(np.abs(gram[-1] - exact[-1])[on_log_axes], 1e-18))
    assert len(scatter.collections) == 3
    plots.close(figure)


def test_comparison_mean_and_band():
    steps = np.array([0, 10, 20])
    runs = [(steps, np.array([1.0, 2.0, 3.0])), (steps, np.array([3.0, 4.0, 7.0])), (np.array([0, 10]), np.array([2.0, 6.0]))]

    figure = plots.plot_comparison({"lr=0.1": runs}, "ggn/all/eigval_max", "t")

    (line,) = figure.axes[0].get_lines()
    assert list(line.get_xdata()) == [0, 10]
    np.testing.assert_allclose(line.get_ydata(), [2.0, 4.0])
    band = figure.axes[0].collections[0].get_paths()[0].vertices
    std = np.std([[1.0, 2.0], [3.0, 4.0], [2.0, 6.0]], axis=0)
    assert band[:, 1].min() == pytest.approx(min(np.array([2.0, 4.0]) - std))
    assert band[:, 1].max() == pytest.approx(max(np.array([2.0, 4.0]) + std))
    plots.close(figure)


def test_weighted_log_density_uses_weights():
    values = np.array([0.0, 1.0, 10.0])
    weights = np.array([0.5, 0.125, 0.375])
    edges = plots.log_bins([values], num=2)

    density = plots.log_density(values, edges, weights)

    np.testing.assert_allclose(density * np.diff(np.log10(edges)), [0.125, 0.375])


def lanczos_spectra(density_probes: int):
    torch.manual_seed(1)
    model = extend(Sequential(Linear(5, 4), Tanh(), Linear(4, 3)))
    loss_func = extend(MSELoss())
    inputs, targets = torch.randn(40, 5), torch.randn(40, 3)
    groups = {"all": list(model.parameters())}
    # Half the Gram computation's estimate (float64 Gram matrices): the Lanczos vectors fit in it.
    budget = estimate_memory(model, inputs, groups, factor_columns=3, subset_size=40).total / 2 / 1e9
    options = dict(top_k=2, memory_budget_gb=budget, on_budget_exceeded="lanczos", density_probes=density_probes)
    probe = SpectrumProbe({"all": list(model.parameters())}, loss_func, inputs, targets, options=options)
    return [probe.compute(model, step) for step in range(2)]


def test_lanczos_density_plot_draws_quadrature():
    spectra = lanczos_spectra(density_probes=2)

    figures = plots.run_figures(spectra, top_k=2)

    lines = figures["plots/all/density.png"].axes[0].get_lines()
    nodes = [spectrum.curvature["all"].density_nodes.numpy() for spectrum in spectra]
    weights = [spectrum.curvature["all"].density_weights.numpy() for spectrum in spectra]
    edges = plots.log_bins(nodes)
    np.testing.assert_allclose(lines[0].get_ydata(), plots.log_density(nodes[0], edges, weights[0]))
    assert lines[0].get_label() == "step 0 (Lanczos quadrature)"
    for figure in figures.values():
        plots.close(figure)


def test_lanczos_without_density_no_plot():
    figures = plots.run_figures(lanczos_spectra(density_probes=0), top_k=2)

    assert sorted(figures) == ["plots/all/top_eigvals.png"]
    for figure in figures.values():
        plots.close(figure)
