"""Compare the runs of a sweep or an experiment in one figure: ``python -m harness.report``.

Runs that differ only in ``--over`` (default ``seed``) form one line, the mean over them with a
band of ± one standard deviation. Each line is labelled by the params that differ between lines.

Examples::

    python -m harness.report --sweep PARENT_RUN_ID --log
    python -m harness.report --experiment mlp_ce --metric ggn/fc1/eigval_max --output fc1.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.tracking import (
    RunSummary,
    Tracker,
    experiment_name,
    find_runs,
    get_experiment_id,
    get_run,
    metric_history,
    metric_key,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

# Params that differ between runs without describing the experiment.
IGNORED_PARAMS = {"tracking.run_name", "tracking.uri"}


@dataclass
class Report:
    """The curves of a comparison: label to the ``(steps, values)`` of each of its runs."""

    metric: str
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]]
    num_runs: int


def select_runs(uri: str, experiment: str | None, sweep: str | None) -> list[RunSummary]:
    """Return the FINISHED runs of a sweep (its child runs) or of an experiment (without sweep parents).

    Raises:
        ValueError: If the experiment does not exist or nothing finished in it.
    """
    if sweep:
        parent = get_run(uri, sweep)
        runs = find_runs(uri, parent.experiment_id, parent_run_id=sweep)
        source = f"sweep run {sweep}"
    else:
        experiment_id = get_experiment_id(uri, experiment)
        if experiment_id is None:
            raise ValueError(f"No experiment named {experiment!r} in {uri}: check --experiment and --uri.")
        runs = [run for run in find_runs(uri, experiment_id) if "harness.sweep.overrides" not in run.tags]
        source = f"experiment {experiment!r}"

    finished = [run for run in runs if run.status == "FINISHED"]
    if len(finished) < len(runs):
        log.info("Leaving out %d of %d runs of %s that did not finish", len(runs) - len(finished), len(runs), source)
    if not finished:
        raise ValueError(f"No FINISHED runs in {source} at {uri}.")
    return finished


def label_runs(runs: Sequence[RunSummary], over: str) -> dict[str, list[RunSummary]]:
    """Group runs by the values of the params that differ between them, except ``over``."""
    keys = sorted(
        key
        for key in set().union(*(run.params for run in runs))
        if key != over and key not in IGNORED_PARAMS and len({run.params.get(key) for run in runs}) > 1
    )
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for run in runs:
        label = ", ".join(f"{key}={run.params.get(key)}" for key in keys) or "all runs"
        groups[label].append(run)
    return dict(groups)


def build_report(uri: str, metric: str, experiment: str | None = None, sweep: str | None = None, over: str = "seed") -> Report:
    """Read the history of ``metric`` of each selected run, grouped into lines.

    Raises:
        ValueError: If no selected run has logged ``metric``.
    """
    runs = select_runs(uri, experiment, sweep)
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    num_runs = 0
    for label, members in label_runs(runs, over).items():
        for run in members:
            history = metric_history(uri, run.run_id, metric)
            if not history:
                continue
            steps, values = zip(*history)
            curves.setdefault(label, []).append((np.array(steps), np.array(values)))
            num_runs += 1
    if not curves:
        raise ValueError(
            f"None of the {len(runs)} runs logged the metric {metric!r}: use a key of the form "
            "ggn/<group>/eigval_max as listed in the README, with a group of these runs."
        )
    return Report(metric, curves, num_runs)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", metavar="RUN_ID", help="the parent run of a sweep: compare its child runs")
    source.add_argument("--experiment", metavar="NAME", help="compare the runs of this experiment")
    parser.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    parser.add_argument("--metric", default="ggn/all/eigval_max", help="metric key to plot (default: %(default)s)")
    parser.add_argument("--over", default="seed", help="param whose runs are averaged into one line (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="PNG file to write (default: report_<metric>.png here)")
    parser.add_argument("--log", action="store_true", help="also log the figure to the sweep's parent run under plots/report/")
    args = parser.parse_args(argv)
    if args.log and not args.sweep:
        parser.error("--log needs --sweep: the figure is logged to the sweep's parent run.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the comparison figure, save it, and optionally log it to the sweep's parent run."""
    from harness import plots

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    uri = resolve_tracking_uri(args.uri, Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        print(f"error: No MLflow store at {uri}: pass --uri or run the command where mlflow.db is.", file=sys.stderr)
        return 1
    try:
        report = build_report(uri, args.metric, args.experiment, args.sweep, args.over)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    title = f"{args.metric}: sweep {args.sweep}" if args.sweep else f"{args.metric}: experiment {args.experiment}"
    figure = plots.plot_comparison(report.curves, args.metric, title)
    file_name = metric_key(args.metric).replace("/", "_")
    output = args.output or Path(f"report_{file_name}.png")
    figure.savefig(output, dpi=120)
    lines = len(report.curves)
    print(f"Saved {output}: {report.num_runs} runs in {lines} {'line' if lines == 1 else 'lines'}")

    if args.log:
        parent = get_run(uri, args.sweep)
        tracker = Tracker(uri, experiment_name(uri, parent.experiment_id))
        tracker.attach(args.sweep)
        tracker.log_figure(figure, f"plots/report/{file_name}.png")
        print(f"Logged it to run {args.sweep} as plots/report/{file_name}.png")
    plots.close(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
