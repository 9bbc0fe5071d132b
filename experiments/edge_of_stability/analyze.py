"""Plot the largest GGN eigenvalue over full-batch gradient descent steps against 2/lr.

Reads the runs of the ``study_eos`` sweep from MLflow and writes the figure and a summary table.
"""

from __future__ import annotations


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.results import load_results, metric_history, save_figure, study_arguments  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Draw λ_max and the training loss per learning rate, and print λ_max / (2/lr)."""
    args = study_arguments(__doc__, ["study_eos"], __file__, argv)
    results = sorted(
        (result for experiment in args.experiment for result in load_results(args.tracking_uri, experiment, with_spectra=False)),
        key=lambda result: float(result.params["optimizer.lr"]),
    )
    if not results:
        raise SystemExit(f"No finished runs in experiments {args.experiment}: run the sweep first.")

    figure, (sharpness_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    print("lr     2/lr    mean eigval_max over the last half   ratio")
    for index, result in enumerate(results):
        lr = float(result.params["optimizer.lr"])
        color = f"C{index}"
        steps, sharpness = metric_history(args.tracking_uri, result.run_id, "ggn/all/eigval_max")
        sharpness_axis.plot(steps, sharpness, color=color, label=f"lr = {lr:g}")
        sharpness_axis.axhline(2 / lr, color=color, linestyle="--", linewidth=1)
        loss_steps, loss = metric_history(args.tracking_uri, result.run_id, "train/loss")
        loss_axis.semilogy(loss_steps, loss, color=color, linewidth=0.8)

        late = sharpness[steps >= steps.max() / 2]
        print(f"{lr:<6g} {2 / lr:<7.3f} {np.mean(late):<36.3f} {np.mean(late) * lr / 2:.3f}")

    sharpness_axis.set(xlabel="step", ylabel="largest GGN eigenvalue", title="Sharpness (dashed: 2 / lr)")
    sharpness_axis.legend()
    loss_axis.set(xlabel="step", ylabel="training loss (full batch)", title="Loss")
    save_figure(figure, args.output)


if __name__ == "__main__":
    main()
