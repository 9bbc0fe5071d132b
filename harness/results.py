"""Read finished runs, metric histories and spectra back from MLflow for analysis."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
# Analyses download many small artifacts: a progress bar per file is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

_SPECTRUM_FILE = re.compile(r"step_(\d+)\.npz$")


@dataclass
class RunResults:
    """One run's config params, metric histories and spectra.

    Attributes:
        run: The MLflow run.
        params: Flattened config, e.g. ``{"optimizer.lr": "0.1"}``.
        spectra: Step to group name to eigenvalues (descending), from ``spectra/step_*.npz``.
    """

    run: Run
    params: dict[str, str]
    spectra: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """MLflow run id."""
        return self.run.info.run_id


def finished_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Return the FINISHED runs of ``experiment`` that trained a model (sweep parent runs excluded).

    Raises:
        ValueError: If the experiment does not exist.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"Experiment {experiment!r} not found in {client.tracking_uri}; it has {names}.")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)
    return [run for run in runs if "param_groups" in run.data.params]


def load_spectra(client: MlflowClient, run_id: str) -> dict[int, dict[str, np.ndarray]]:
    """Return step → group → eigenvalues from a run's ``spectra/`` artifacts."""
    spectra: dict[int, dict[str, np.ndarray]] = {}
    for artifact in client.list_artifacts(run_id, "spectra"):
        match = _SPECTRUM_FILE.search(artifact.path)
        if match is None:
            continue
        with np.load(client.download_artifacts(run_id, artifact.path)) as archive:
            spectra[int(match.group(1))] = {key: archive[key] for key in archive.files if key != "step"}
    return dict(sorted(spectra.items()))


def metric_history(client: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the steps and values of metric ``key``, sorted by step."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
    return np.array([m.step for m in history]), np.array([m.value for m in history])


def load_results(uri: str, experiment: str, with_spectra: bool = True) -> list[RunResults]:
    """Return the results of every finished run of ``experiment`` in the store at ``uri``."""
    client = MlflowClient(uri)
    results = []
    for run in finished_runs(client, experiment):
        spectra = load_spectra(client, run.info.run_id) if with_spectra else {}
        results.append(RunResults(run, dict(run.data.params), spectra))
    return results
