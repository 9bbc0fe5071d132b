"""Read the finished runs of an experiment and their spectra back from MLflow, for analyses.

Runs, params and metric histories come from the read helpers of :mod:`harness.tracking`; this
module adds the spectra stored as ``spectra/step_<step>.npz`` artifacts.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.tracking import RetryingClient, RunSummary, find_runs, get_experiment_id
from harness.tracking import metric_history as metric_pairs

# Analyses download many small artifacts: a progress bar per file is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.tracking import MlflowClient  # noqa: E402

_SPECTRUM_FILE = re.compile(r"step_(\d+)\.npz$")


@dataclass
class RunResults:
    """One run's params and spectra.

    Attributes:
        run: The run as read from the store.
        spectra: Step to group name to eigenvalues (descending), from ``spectra/step_*.npz``.
    """

    run: RunSummary
    spectra: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """MLflow run id."""
        return self.run.run_id

    @property
    def params(self) -> dict[str, str]:
        """Flattened config, e.g. ``{"optimizer.lr": "0.1"}``."""
        return self.run.params


def load_spectra(uri: str, run_id: str) -> dict[int, dict[str, np.ndarray]]:
    """Return step → group → eigenvalues from a run's ``spectra/`` artifacts."""
    client = RetryingClient(MlflowClient(tracking_uri=uri))
    spectra: dict[int, dict[str, np.ndarray]] = {}
    for artifact in client.list_artifacts(run_id, "spectra"):
        match = _SPECTRUM_FILE.search(artifact.path)
        if match is None:
            continue
        with np.load(client.download_artifacts(run_id, artifact.path)) as archive:
            spectra[int(match.group(1))] = {
                key: archive[key] for key in archive.files if key != "step" and not key.startswith("eigvecs/")
            }
    return dict(sorted(spectra.items()))


def metric_history(uri: str, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the steps and values of metric ``key`` as arrays, sorted by step."""
    pairs = metric_pairs(uri, run_id, key)
    return np.array([step for step, _ in pairs]), np.array([value for _, value in pairs])


def load_results(uri: str, experiment: str, with_spectra: bool = True) -> list[RunResults]:
    """Return the FINISHED training runs of ``experiment`` (sweep parent runs left out).

    Raises:
        ValueError: If the store at ``uri`` has no experiment of that name.
    """
    experiment_id = get_experiment_id(uri, experiment)
    if experiment_id is None:
        raise ValueError(f"Experiment {experiment!r} not found in {uri}: run its sweep first, or check --tracking-uri.")
    runs = [run for run in find_runs(uri, experiment_id) if run.status == "FINISHED" and "param_groups" in run.params]
    return [RunResults(run, load_spectra(uri, run.run_id) if with_spectra else {}) for run in runs]


def study_arguments(description: str, experiments: Sequence[str], script: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the options of a study's analysis: the store, its experiments and the figure to write.

    The figure defaults to ``figure.png`` beside ``script``, where the study's README shows it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store of the sweeps")
    parser.add_argument("--experiment", nargs="+", default=list(experiments), help="MLflow experiments of the sweeps")
    parser.add_argument("--output", type=Path, default=Path(script).with_name("figure.png"), help="PNG to write")
    return parser.parse_args(argv)


def save_figure(figure: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG, creating its folder, and print where it went."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"Wrote {path}")
