"""Figures of GGN spectra: pure functions from arrays to matplotlib figures.

Nothing here logs or saves: the runner logs the figures of :func:`run_figures` to MLflow, and
``python -m harness.report`` saves its comparison figure to a file. The Agg backend is used, so
no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness.spectrum import Spectrum  # noqa: E402

# Eigenvalues at or below this are left out of the log-scaled axes; the figures state how many.
MIN_POSITIVE = 1e-12
BINS = 40


def log_bins(eigvals: Sequence[np.ndarray], num: int = BINS) -> np.ndarray:
    """Return ``num + 1`` log-spaced bin edges covering the positive values of all ``eigvals``."""
    positive = np.concatenate([values[values > MIN_POSITIVE] for values in eigvals] + [np.empty(0)])
    if positive.size == 0:
        return np.logspace(-6, 0, num + 1)
    low, high = positive.min(), positive.max()
    if high <= low * 1.01:
        low, high = low / 2, high * 2
    return np.logspace(np.log10(low), np.log10(high), num + 1)


def log_density(values: np.ndarray, edges: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Return the fraction of all ``values`` per unit of log10(eigenvalue) in each bin.

    The densities integrate (over log10 of the eigenvalue) to the fraction of values above
    :data:`MIN_POSITIVE`, so spectra with different numbers of zero eigenvalues stay comparable.
    ``weights`` (summing to 1) replace the equal shares, for the nodes of a Lanczos quadrature.
    """
    if weights is None:
        weights = np.full(values.shape, 1.0 / max(values.size, 1))
    positive = values > MIN_POSITIVE
    counts, _ = np.histogram(values[positive], bins=edges, weights=weights[positive])
    widths = np.diff(np.log10(edges))
    return counts / widths


def plot_density(
    steps: Sequence[int], eigvals: Sequence[np.ndarray], title: str, weights: Sequence[np.ndarray | None] | None = None
) -> Figure:
    """Plot the eigenvalue density of each checkpoint, one line per step, on a log eigenvalue axis.

    A step with ``weights`` is a Lanczos quadrature (nodes in ``eigvals``), labelled as such.
    """
    weights = weights or [None] * len(steps)
    edges = log_bins(eigvals)
    centers = np.sqrt(edges[:-1] * edges[1:])
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(steps), 1)))

    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for step, values, shares, color in zip(steps, eigvals, weights, colors):
        if shares is None:
            label = f"step {step} ({int((values <= MIN_POSITIVE).sum())} ≤ {MIN_POSITIVE:g})"
        else:
            label = f"step {step} (Lanczos quadrature)"
        axes.step(centers, log_density(values, edges, shares), where="mid", color=color, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("GGN eigenvalue")
    axes.set_ylabel("density per decade")
    axes.set_title(title)
    axes.legend(fontsize="small", ncols=2 if len(steps) > 6 else 1)
    return figure


def plot_top_eigvals(steps: Sequence[int], eigvals: Sequence[np.ndarray], top_k: int, title: str) -> Figure:
    """Plot the ``top_k`` largest eigenvalues against the training step, log-scaled."""
    ranks = min(top_k, min((values.size for values in eigvals), default=0))
    top = np.array([np.sort(values)[::-1][:ranks] for values in eigvals]).reshape(len(steps), ranks)
    colors = plt.get_cmap("plasma")(np.linspace(0, 0.9, max(ranks, 1)))

    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for rank in range(ranks):
        values = np.where(top[:, rank] > MIN_POSITIVE, top[:, rank], np.nan)
        axes.plot(steps, values, marker="o", markersize=3, color=colors[rank], label=f"λ{rank + 1}")
    axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel("GGN eigenvalue")
    axes.set_title(title)
    axes.legend(fontsize="small", ncols=2)
    return figure


def plot_spectrogram(
    steps: Sequence[int], eigvals: Sequence[np.ndarray], title: str, weights: Sequence[np.ndarray | None] | None = None
) -> Figure:
    """Plot the eigenvalue density as colour over checkpoint (x) and log eigenvalue (y)."""
    weights = weights or [None] * len(steps)
    edges = log_bins(eigvals)
    density = np.array([log_density(values, edges, shares) for values, shares in zip(eigvals, weights)]).T

    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    # One column per checkpoint: log-spaced checkpoints would be slivers on a linear step axis.
    columns = np.arange(len(steps) + 1) - 0.5
    mesh = axes.pcolormesh(columns, edges, density, cmap="magma", shading="flat", vmin=0)
    axes.set_yscale("log")
    labels = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    axes.set_xticks(labels, [str(steps[i]) for i in labels])
    axes.set_xlabel("training step (one column per checkpoint)")
    axes.set_ylabel("GGN eigenvalue")
    axes.set_title(title)
    figure.colorbar(mesh, ax=axes, label="density per decade")
    return figure


def plot_validation(steps: Sequence[int], gram: Sequence[np.ndarray], exact: Sequence[np.ndarray], rtol: float, atol: float, title: str) -> Figure:
    """Compare Gram eigenvalues with the exact GGN's, one colour per checkpoint.

    Left: Gram against exact eigenvalue, where agreement is the diagonal. Right: the error
    |Gram − exact| against the exact eigenvalue, with the tolerance atol + rtol·|exact| as a line,
    because errors near float32 round-off are invisible on the left.
    """
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(steps), 1)))
    all_exact = np.concatenate([values for values in exact] + [np.empty(0)])
    positive = all_exact[all_exact > MIN_POSITIVE]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
    line = np.logspace(np.log10(low) - 0.5, np.log10(high) + 0.5, 100)

    figure, (scatter, errors) = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
    scatter.plot(line, line, color="0.4", linewidth=0.8)
    errors.plot(line, atol + rtol * line, color="0.4", linewidth=0.8, label="tolerance")
    for step, gram_values, exact_values, color in zip(steps, gram, exact, colors):
        on_log_axes = (exact_values > MIN_POSITIVE) & (gram_values > MIN_POSITIVE)
        scatter.scatter(exact_values[on_log_axes], gram_values[on_log_axes], s=8, color=color, label=f"step {step}")
        error = np.abs(gram_values - exact_values)
        # Exact agreement has no place on a log axis, so it is drawn at the axis floor.
        errors.scatter(exact_values[on_log_axes], np.maximum(error[on_log_axes], 1e-18), s=8, color=color)
    for axes in (scatter, errors):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("exact GGN eigenvalue (torch.func)")
    scatter.set_ylabel("Gram eigenvalue (BackPACK)")
    errors.set_ylabel("|Gram − exact|")
    scatter.legend(fontsize="small", ncols=2 if len(steps) > 6 else 1)
    errors.legend(fontsize="small")
    figure.suptitle(title)
    return figure


def _density_of(spectrum: Spectrum, group: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Return the values (and weights) of a group's density at one checkpoint, or None if it has none.

    After a Lanczos fallback the eigenvalues are only the top k, so the density is the Lanczos
    quadrature if one was computed, and none otherwise.
    """
    curvature = spectrum.curvature.get(group)
    if curvature is None or curvature.method != "lanczos":
        return spectrum.eigvals[group].double().cpu().numpy(), None
    if curvature.density_nodes is None:
        return None
    return curvature.density_nodes.double().cpu().numpy(), curvature.density_weights.double().cpu().numpy()


def run_figures(spectra: Sequence[Spectrum], top_k: int) -> dict[str, Figure]:
    """Return the figures of one run by artifact path: four per group, the last where validated.

    ``plots/<group>/density.png``, ``top_eigvals.png``, ``spectrogram.png`` and, for groups
    compared with the exact GGN, ``validation.png``. After a Lanczos fallback the density and the
    spectrogram show its quadrature. Checkpoints without a quadrature are left out of both
    figures, and the figures are left out when no checkpoint has one.
    """
    if not spectra:
        return {}
    figures = {}
    steps = [spectrum.step for spectrum in spectra]
    for group in spectra[0].eigvals:
        eigvals = [spectrum.eigvals[group].double().cpu().numpy() for spectrum in spectra]
        figures[f"plots/{group}/top_eigvals.png"] = plot_top_eigvals(steps, eigvals, top_k, f"Top {top_k} GGN eigenvalues, group {group}")
        densities = [_density_of(spectrum, group) for spectrum in spectra]
        drawn = [index for index, density in enumerate(densities) if density is not None]
        if drawn:
            drawn_steps = [steps[index] for index in drawn]
            values = [densities[index][0] for index in drawn]
            weights = [densities[index][1] for index in drawn]
            figures[f"plots/{group}/density.png"] = plot_density(
                drawn_steps, values, f"GGN eigenvalue density, group {group}", weights
            )
            figures[f"plots/{group}/spectrogram.png"] = plot_spectrogram(
                drawn_steps, values, f"GGN spectrogram, group {group}", weights
            )

        validated = [spectrum for spectrum in spectra if group in spectrum.validation]
        if validated:
            results = [spectrum.validation[group] for spectrum in validated]
            figures[f"plots/{group}/validation.png"] = plot_validation(
                [spectrum.step for spectrum in validated],
                [result.gram_eigvals.cpu().numpy() for result in results],
                [result.exact_eigvals.cpu().numpy() for result in results],
                results[0].rtol,
                results[0].atol,
                f"Gram vs exact GGN eigenvalues, group {group}",
            )
    return figures


def plot_comparison(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], metric: str, title: str) -> Figure:
    """Plot one line per label: the mean over its runs, with a band of ± one standard deviation.

    Args:
        curves: Label to the ``(steps, values)`` of each of its runs, for example one per seed.
            The mean is taken over the steps that all runs of a label logged.
        metric: The metric key, for the y axis.
        title: Figure title.
    """
    figure, axes = plt.subplots(figsize=(8, 5), layout="constrained")
    for label, runs in curves.items():
        steps = sorted(set.intersection(*(set(run_steps.tolist()) for run_steps, _ in runs)))
        values = np.array([[dict(zip(run_steps.tolist(), run_values))[step] for step in steps] for run_steps, run_values in runs])
        mean = values.mean(axis=0)
        (line,) = axes.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            std = values.std(axis=0)
            axes.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if all(value > 0 for runs in curves.values() for _, run_values in runs for value in run_values):
        axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.legend(fontsize="small")
    return figure


def close(figure: Figure) -> None:
    """Release a figure's memory."""
    plt.close(figure)
