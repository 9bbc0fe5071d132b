"""Count the outliers of the GGN spectrum over training and compare them with the class count.

Reads the runs of the ``study_outliers`` and ``study_outliers_cnn`` sweeps from MLflow. The
outliers of a spectrum are the eigenvalues above its largest gap: among the 3·C largest
eigenvalues λ_1 ≥ λ_2 ≥ …, the gap is the largest ratio λ_i / λ_(i+1), and the count is that i.
"""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.results import load_results, save_figure, study_arguments  # noqa: E402

NUM_CLASSES = 10


def count_outliers(eigvals: np.ndarray, num_classes: int = NUM_CLASSES) -> int:
    """Return how many eigenvalues lie above the largest gap among the 3·C largest ones."""
    top = eigvals[: 3 * num_classes + 1]
    top = top[top > 0]
    if len(top) < 2:
        return len(top)
    return int(np.argmax(np.log(top[:-1]) - np.log(top[1:]))) + 1


def main(argv: list[str] | None = None) -> None:
    """Draw the final spectra and the outlier counts over steps, and print the counts."""
    args = study_arguments(__doc__, ["study_outliers", "study_outliers_cnn"], __file__, argv)

    results = [result for experiment in args.experiment for result in load_results(args.tracking_uri, experiment)]
    if not results:
        raise SystemExit(f"No finished runs in experiments {args.experiment}: run the sweeps first.")

    counts: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    final: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for result in results:
        model = result.params.get("model.name", "mlp")
        last_step = max(result.spectra)
        for step, groups in result.spectra.items():
            for group, eigvals in groups.items():
                counts[(model, group)][step].append(count_outliers(eigvals))
                if step == last_step:
                    final[(model, group)].append(eigvals)

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    spectrum_axis, count_axis, whole_axis = axes
    print("model       group  step  outliers (per seed)")
    for index, (key, by_step) in enumerate(sorted(counts.items())):
        label = f"{key[0]} / {key[1]}"
        steps = sorted(by_step)
        means = [np.mean(by_step[step]) for step in steps]
        count_axis.plot(steps, means, marker="o", color=f"C{index}", label=label)
        for step in steps:
            print(f"{key[0]:<11} {key[1]:<6} {step:<5d} {by_step[step]}")
        spectrum = final[key][0][: 4 * NUM_CLASSES]
        spectrum_axis.semilogy(np.arange(1, len(spectrum) + 1), np.maximum(spectrum, 1e-12), ".", color=f"C{index}", label=label)

    # The MLP's whole-net spectrum of the first run at four checkpoints, to show how the top separates.
    whole = next((r for r in results if "all" in next(iter(r.spectra.values())) and r.params.get("model.name") == "mlp"), None)
    if whole is not None:
        steps = sorted(whole.spectra)
        for shade, step in enumerate(steps[:: max(1, len(steps) // 4)]):
            eigvals = whole.spectra[step]["all"][: 4 * NUM_CLASSES]
            whole_axis.semilogy(np.arange(1, len(eigvals) + 1), np.maximum(eigvals, 1e-12), ".-", linewidth=0.6, color=plt.cm.viridis(shade / 4), label=f"step {step}")
        whole_axis.axvline(NUM_CLASSES + 0.5, color="gray", linestyle="--", linewidth=1)
        whole_axis.set(xlabel="rank", ylabel="eigenvalue", title="MLP, whole net, leading eigenvalues over training")
        whole_axis.legend(fontsize=7)

    count_axis.axhline(NUM_CLASSES, color="gray", linestyle="--", linewidth=1, label="C = 10")
    count_axis.set_xscale("symlog", linthresh=1)
    count_axis.set_xlim(left=0)
    count_axis.set(xlabel="step", ylabel="eigenvalues above the largest gap", title="Outliers over training")
    count_axis.legend(fontsize=7)
    spectrum_axis.set(xlabel="rank", ylabel="eigenvalue", title="Leading GGN eigenvalues at the last step (seed 0)")
    spectrum_axis.legend(fontsize=7)
    save_figure(figure, args.output)


if __name__ == "__main__":
    main()
