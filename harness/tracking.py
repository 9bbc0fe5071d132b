"""MLflow tracking: every MLflow call of the harness goes through this module."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

# MLflow 3 sends usage telemetry to its vendor's servers unless MLFLOW_DISABLE_TELEMETRY is set.
# A research harness should not send data out by default; set it to false to allow telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import sqlalchemy.exc  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
METRICS_PER_BATCH = 500
# Retries of a call that found the SQLite store locked, and the first wait in seconds (doubled
# after each retry). MLflow already waits up to 20 s for the lock inside each call.
LOCKED_RETRIES = 6
LOCKED_FIRST_WAIT = 0.5
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


class TrackingError(RuntimeError):
    """Raised when the tracking store or the artifact location cannot be used."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Check that a run can be stored at ``uri`` before anything is trained.

    - ``http(s)://``: a server must respond at that address, with any HTTP status.
    - ``sqlite:///PATH``: the folder of PATH must exist, and the file must open as a database.
    - ``file://PATH``: the folder must be creatable and writable.
    Other schemes are passed to MLflow unchecked.

    Raises:
        TrackingError: Naming the URI, the cause and how to fix it.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file":
        _check_writable_folder(Path(unquote(urlparse(uri).path)), f"tracking.uri={uri}")


def _check_server(uri: str, timeout: float) -> None:
    """Raise TrackingError unless an HTTP server responds at ``uri``."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # The server responded, if only with an error status, so it is reachable.
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"Cannot reach the MLflow tracking server at tracking.uri={uri} ({reason}). Start it "
            "(for example 'mlflow server --host 127.0.0.1 --port 5000'), fix the address, or "
            "store runs in a local file with tracking.uri=sqlite:///mlflow.db."
        ) from error


def _check_sqlite(uri: str) -> None:
    """Raise TrackingError unless the SQLite database of ``uri`` can be opened for writing."""
    path = Path(uri[len("sqlite:///") :])
    if not path.parent.is_dir():
        raise TrackingError(
            f"The folder {path.parent} of tracking.uri={uri} does not exist: create it "
            f"(mkdir -p {path.parent}) or point tracking.uri to a database in an existing folder."
        )
    try:
        connection = sqlite3.connect(path, timeout=30)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise TrackingError(
            f"Cannot write the SQLite database of tracking.uri={uri} ({error}): make {path} and "
            "its folder writable, or point tracking.uri to a writable location."
        ) from error


def _check_writable_folder(folder: Path, description: str) -> None:
    """Raise TrackingError unless ``folder`` can be created and a file written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".harness-write-check-"):
            pass
    except OSError as error:
        raise TrackingError(
            f"Cannot write to {folder}, the location of {description} ({error.strerror or error}): make "
            "it writable, or use another tracking.experiment or tracking.uri."
        ) from error


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
        self.experiment_name = experiment
        # MlflowClient creates the store's tables when it is constructed.
        with store_lock(uri):
            self.client = RetryingClient(MlflowClient(tracking_uri=uri))
            self.experiment_id = self._experiment_id(experiment)
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        # Steps already stored per metric key, filled when a run is resumed: a resumed run
        # repeats the steps since its last checkpoint, and MLflow would store them twice.
        self._logged_steps: dict[str, set[int]] = {}

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

    def check_artifact_location(self) -> None:
        """Raise TrackingError unless the experiment's local artifact folder is writable.

        Artifacts on a server (``mlflow-artifacts:``) or in cloud storage are not checked here.
        """
        location = self.client.get_experiment(self.experiment_id).artifact_location
        parsed = urlparse(location)
        if parsed.scheme in ("", "file"):
            folder = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(location)
            _check_writable_folder(folder, f"the artifacts of experiment {self.experiment_name!r}")

    def start(self, run_name: str | None, tags: Mapping[str, str]) -> str:
        """Start a run and return its id."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        return self.run_id

    def find_run(self, run_id: str) -> Run:
        """Return the run ``run_id`` of this tracker's experiment.

        Raises:
            TrackingError: If the run does not exist or belongs to another experiment.
        """
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"No run with id {run_id!r} in {self.uri}: check tracking.resume_run_id and "
                "tracking.uri (the run must be in the same store)."
            ) from error
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(
                f"Run {run_id} belongs to experiment id {run.info.experiment_id}, not to "
                f"{self.experiment_name!r}: set tracking.experiment to the run's experiment."
            )
        return run

    def resume(self, run: Run) -> None:
        """Continue ``run``: mark it RUNNING again and skip metric steps it already stored."""
        self.run_id = run.info.run_id
        for key in run.data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_steps[key] = {metric.step for metric in history}
        self.client.update_run(self.run_id, status="RUNNING")

    def changed_params(self, run: Run, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Return ``{key: (stored, new)}`` for params whose value differs from those stored in ``run``."""
        stored = run.data.params
        changed = {}
        for key, value in params.items():
            key = metric_key(key)
            if key in stored and stored[key] != str(value):
                changed[key] = (stored[key], str(value))
        return changed

    def download_bytes(self, artifact_file: str, run_id: str | None = None) -> bytes | None:
        """Return the content of the artifact ``artifact_file`` of run ``run_id`` (default: this
        tracker's run), or None if it does not exist."""
        run_id = run_id or self.run_id
        folder, _, _ = artifact_file.rpartition("/")
        listed = {item.path for item in self.client.list_artifacts(run_id, folder or None)}
        if artifact_file not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = self.client.download_artifacts(run_id, artifact_file, tmp)
            return Path(local).read_bytes()

    def attach(self, run_id: str) -> None:
        """Log to the existing run ``run_id`` from now on, for example a sweep's parent run."""
        self.run_id = run_id

    def child_runs(self) -> list[RunSummary]:
        """Return the runs whose tag ``mlflow.parentRunId`` is this run, oldest first."""
        return find_runs(self.uri, self.experiment_id, parent_run_id=self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params. A key or value longer than MLflow's limits is stored as the artifact
        ``params/<key>.txt`` instead, since MLflow would reject the whole batch."""
        entries = []
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH or len(key) > MAX_ENTITY_KEY_LENGTH:
                artifact = f"params/{metric_key(key)[:200].replace('/', '_')}.txt"
                log.warning(
                    "Param %s (key %d, value %d characters) exceeds MLflow's limits (key %d, "
                    "value %d): it is stored as the artifact %s.",
                    key[:80], len(key), len(text), MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, artifact,
                )
                self.log_text(f"{key}\n{text}\n", artifact)
                continue
            entries.append(Param(metric_key(key), text))
        if entries:
            # A resumed run has its params already, checked by changed_params, and MLflow
            # rejects a param that is logged again with another string form.
            stored = self.client.get_run(self.run_id).data.params
            entries = [entry for entry in entries if entry.key not in stored]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        entries = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        self.client.log_batch(self.run_id, tags=entries)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics of ``step``; they are sent in batches by :meth:`flush`.

        Non-finite values are sent as they are. MLflow's SQL store (3.x) keeps NaN and stores
        ±inf as ±1.7976931348623157e308, the largest float64. A step that a resumed run already
        stored for a key is skipped.
        """
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if step in self._logged_steps.get(key, ()):
                continue
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


@dataclass(frozen=True)
class RunSummary:
    """A finished or running MLflow run as read back from the store."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]


def _summary(run: Any) -> RunSummary:
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        experiment_id=run.info.experiment_id,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )


def find_runs(uri: str, experiment_id: str, parent_run_id: str | None = None) -> list[RunSummary]:
    """Return the runs of an experiment, or only the children of ``parent_run_id``, oldest first."""
    client = RetryingClient(MlflowClient(tracking_uri=uri))
    filter_string = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1000, order_by=["attributes.start_time ASC"], page_token=token
        )
        runs.extend(_summary(run) for run in page)
        token = page.token
        if not token:
            return runs


def get_run(uri: str, run_id: str) -> RunSummary:
    """Return the run ``run_id``.

    Raises:
        MlflowException: If there is no such run in the store at ``uri``.
    """
    return _summary(RetryingClient(MlflowClient(tracking_uri=uri)).get_run(run_id))


def get_experiment_id(uri: str, name: str) -> str | None:
    """Return the id of experiment ``name``, or None if the store at ``uri`` has none of that name."""
    experiment = RetryingClient(MlflowClient(tracking_uri=uri)).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def experiment_name(uri: str, experiment_id: str) -> str:
    """Return the name of the experiment ``experiment_id``."""
    return RetryingClient(MlflowClient(tracking_uri=uri)).get_experiment(experiment_id).name


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Return the ``(step, value)`` pairs of metric ``key`` of a run, by step."""
    history = RetryingClient(MlflowClient(tracking_uri=uri)).get_metric_history(run_id, key)
    return sorted((metric.step, metric.value) for metric in history)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Set the final status of a run that its own process did not end (it crashed or was killed)."""
    RetryingClient(MlflowClient(tracking_uri=uri)).set_terminated(run_id, status=status)


def is_database_locked(error: BaseException) -> bool:
    """Return whether ``error`` is SQLite's "database is locked", as raised directly or by MLflow."""
    return "database is locked" in str(error)


def call_with_retries(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``function``, retrying with exponential backoff while the SQLite store is locked.

    Several jobs of a parallel sweep write to one SQLite file, and a write that waited longer
    than SQLite's busy timeout fails with "database is locked". The failed transaction is rolled
    back, so the call is repeated as a whole. Each retry is logged; the last error is re-raised.
    """
    wait = LOCKED_FIRST_WAIT
    for attempt in range(1, LOCKED_RETRIES + 1):
        try:
            return function(*args, **kwargs)
        except (MlflowException, sqlite3.OperationalError, sqlalchemy.exc.OperationalError) as error:
            if not is_database_locked(error) or attempt == LOCKED_RETRIES:
                raise
            name = getattr(function, "__name__", repr(function))
            log.warning(
                "Tracking store locked in %s (attempt %d of %d), retrying in %.1f s",
                name, attempt, LOCKED_RETRIES, wait,
            )
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


class RetryingClient:
    """An ``MlflowClient`` whose methods retry while the SQLite store is locked.

    See :func:`call_with_retries`. Attributes that are not methods pass through unchanged.
    """

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return functools.partial(call_with_retries, attribute)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite store; do nothing for other stores.

    MLflow creates the tables of a new SQLite store, and then the experiment, on first use. Two
    processes doing that at once can both find no tables and fail, so processes that open the
    same store take turns here. The lock file ``<store>.lock`` stays beside the store.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    store = Path(uri[len("sqlite:///") :])
    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock", timeout=300):
        yield


def tensor_bytes(save: Any, obj: Any) -> bytes:
    """Serialize ``obj`` with ``save`` (for example ``torch.save``) into bytes."""
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()
