"""Compare the top eigenvalues of the MC and subsampled GGN with the exact GGN, and their cost.

Reads the runs of the ``study_approximation`` sweeps from MLflow. The reference of a run is the
exact, not subsampled run with the same seed: runs with the same seed train identically, so
their spectra at one step belong to the same model. The error at a step is the mean over the
top-k eigenvalues of |λ̃_i − λ_i| / λ_i; the cost is ``ggn/cost_in_gradients``.
"""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.results import RunResults, load_results, metric_history, save_figure, study_arguments  # noqa: E402

TOP_K = 10


def variant(result: RunResults) -> str:
    """Return a run's GGN approximation as a label, e.g. ``mc (M=8), |S|=16``."""
    params = result.params
    label = "exact" if params["curvature.approximation"] == "exact" else f"mc (M={params['curvature.mc_samples']})"
    if params.get("curvature.subsampling", "None") not in ("None", "null"):
        label += f", |S|={params['curvature.subsampling']}"
    return label


def relative_errors(approx: np.ndarray, exact: np.ndarray, top_k: int = TOP_K) -> np.ndarray:
    """Return |λ̃_i − λ_i| / λ_i for the ``top_k`` largest eigenvalues with λ_i > 0."""
    k = min(top_k, len(approx), len(exact))
    exact_top, approx_top = exact[:k], approx[:k]
    keep = exact_top > 0
    return np.abs(approx_top[keep] - exact_top[keep]) / exact_top[keep]


def analyze(uri: str, experiment: str) -> tuple[dict[str, dict[int, list[float]]], dict[str, list[float]]]:
    """Return variant → step → mean relative errors (one per seed), and variant → costs."""
    results = load_results(uri, experiment)
    references = {}
    for result in results:
        if variant(result) == "exact":
            seed = result.params["seed"]
            if seed in references:
                # Two exact runs of one seed (the sweep varies mc_samples, which exact ignores)
                # must give the same spectra: a check of determinism.
                for step, groups in result.spectra.items():
                    np.testing.assert_array_equal(groups["all"], references[seed].spectra[step]["all"])
            references[seed] = result

    errors: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    costs: dict[str, list[float]] = defaultdict(list)
    for result in results:
        label = variant(result)
        _, cost = metric_history(uri, result.run_id, "ggn/cost_in_gradients")
        costs[label].extend(cost.tolist())
        if label == "exact":
            continue
        reference = references[result.params["seed"]]
        for step, groups in result.spectra.items():
            errors[label][step].append(float(np.mean(relative_errors(groups["all"], reference.spectra[step]["all"]))))
    return errors, costs


def main(argv: list[str] | None = None) -> None:
    """Draw error over steps and cost per variant for each experiment, and print a table."""
    args = study_arguments(__doc__, ["study_approximation", "study_approximation_3c3d"], __file__, argv)

    figure, axes = plt.subplots(len(args.experiment), 2, figsize=(11, 3.6 * len(args.experiment)), squeeze=False)
    print("experiment                  variant              mean rel. error of top-10   cost [gradients]")
    for row, experiment in enumerate(args.experiment):
        errors, costs = analyze(args.tracking_uri, experiment)
        if not costs:
            raise SystemExit(f"No finished runs in experiment {experiment!r}: run its sweep first.")
        error_axis, cost_axis = axes[row]
        labels = sorted(costs)
        for index, label in enumerate(labels):
            if label in errors:
                steps = sorted(errors[label])
                error_axis.plot(steps, [np.mean(errors[label][s]) for s in steps], marker="o", color=f"C{index}", label=label)
                mean_error = np.mean([e for values in errors[label].values() for e in values])
            else:
                mean_error = 0.0
            print(f"{experiment:<27} {label:<20} {mean_error:<27.3g} {np.median(costs[label]):.1f}")
        error_axis.set(yscale="log", xlabel="step", ylabel=f"mean rel. error, top-{TOP_K}", title=f"{experiment}: accuracy")
        error_axis.set_xscale("symlog", linthresh=1)
        error_axis.set_xlim(left=0)
        error_axis.legend(fontsize=7)
        cost_axis.bar(range(len(labels)), [np.median(costs[label]) for label in labels], color=[f"C{i}" for i in range(len(labels))])
        cost_axis.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        cost_axis.set(ylabel="median cost [gradient evaluations]", title=f"{experiment}: cost")
    save_figure(figure, args.output)


if __name__ == "__main__":
    main()
