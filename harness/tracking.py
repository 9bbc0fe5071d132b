"""MLflow tracking: every MLflow call of the harness goes through this module."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
METRICS_PER_BATCH = 500
_INVALID_KEY_CHARACTERS = re.compile(r"[^/\w.\- ]")


def resolve_tracking_uri(configured: str | None, launch_dir: Path) -> str:
    """Return the absolute tracking URI of a run.

    The order is: ``configured`` (``tracking.uri``), then ``MLFLOW_TRACKING_URI``, then
    ``sqlite:///mlflow.db`` in ``launch_dir``. A relative SQLite path or plain folder is made
    absolute against ``launch_dir``, so every job of a sweep writes to the same store.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            path = launch_dir / path
        return f"sqlite:///{path.resolve()}"
    if "://" not in uri:
        return (launch_dir / uri).resolve().as_uri()
    return uri


def ui_command(uri: str) -> str:
    """Return the shell command that opens the MLflow UI on the store at ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def metric_key(*parts: str) -> str:
    """Join ``parts`` with ``/`` into a metric key MLflow accepts.

    Characters MLflow rejects in keys are replaced by ``_``, so a group name such as
    ``block[0]`` still yields a valid key (``block_0_``).
    """
    return "/".join(_INVALID_KEY_CHARACTERS.sub("_", part) for part in parts)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``{"a.b.c": value}``, the form of MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(path: Path) -> str | None:
    """Return the commit of the git checkout that contains ``path``, or None outside one."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


class Tracker:
    """One MLflow run: params, metrics (sent in batches), artifacts and the final status.

    Args:
        uri: Absolute tracking URI, see :func:`resolve_tracking_uri`.
        experiment: Experiment name; created if missing.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment_id(experiment)
        self.run_id: str | None = None
        self._pending: list[Metric] = []

    def _experiment_id(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it if it does not exist.

        Two jobs of a sweep may both find no experiment and both create it: the loser of that
        race reads the winner's id.
        """
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_root(name))
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _artifact_root(self, experiment: str) -> str | None:
        """Return an absolute artifact folder next to a SQLite store, else None (server default)."""
        parsed = urlparse(self.uri)
        if parsed.scheme != "sqlite":
            return None
        store = Path(self.uri[len("sqlite:///") :])
        safe_name = _INVALID_KEY_CHARACTERS.sub("_", experiment)
        return (store.parent / "mlartifacts" / safe_name).as_uri()

    def start(self, run_name: str | None, tags: Mapping[str, str]) -> str:
        """Start a run and return its id."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, skipping values longer than MLflow's limit (they stay in the config artifact)."""
        entries = []
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH or len(key) > MAX_ENTITY_KEY_LENGTH:
                log.warning(
                    "Param %s (%d characters) exceeds MLflow's limit of %d: it is stored only "
                    "in the config artifact.",
                    key[:80],
                    len(text),
                    MAX_PARAM_VAL_LENGTH,
                )
                continue
            entries.append(Param(metric_key(key), text))
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        entries = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        self.client.log_batch(self.run_id, tags=entries)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics of ``step``; they are sent in batches by :meth:`flush`.

        Non-finite values are sent as they are: MLflow stores NaN and ±inf.
        """
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(key, float(value), timestamp, step))
        if len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics."""
        while self._pending:
            batch, self._pending = self._pending[:METRICS_PER_BATCH], self._pending[METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Store ``data`` as the artifact ``artifact_file`` (a path inside the run's artifacts)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as a PNG artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def end(self, status: str) -> None:
        """Send the queued metrics and end the run with ``status`` (FINISHED, FAILED, KILLED)."""
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def run_url(self) -> str:
        """Return the run's address in an MLflow UI on the default port."""
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def tensor_bytes(save: Any, obj: Any) -> bytes:
    """Serialize ``obj`` with ``save`` (for example ``torch.save``) into bytes."""
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()
