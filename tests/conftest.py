"""Shared fixtures: composed configs, the command line in a subprocess, sweeps and MLflow servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness.config import config_dir, register_configs

REPO = Path(__file__).resolve().parents[1]

# MLflow 3 sends usage telemetry to its own servers; the tests talk to 127.0.0.1 only.
# Subprocesses (the harness, mlflow server) inherit the setting.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """Return a function that composes ``conf/`` with overrides, as the command line does."""
    register_configs()

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """Return a SQLite file with MLflow's tables, created once: creating them takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_store(empty_store, tmp_path) -> str:
    """Return the URI of a new MLflow SQLite store ``tmp_path/mlflow.db``."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, path)
    return f"sqlite:///{path}"


def run_cli(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m harness ARGS`` in ``cwd`` and return the finished process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    if env and "MLFLOW_TRACKING_URI" in env:
        full_env["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FAST_SWEEP = ["train.steps=6", "model.hidden=[4]", "curvature.schedule.kind=every", "curvature.schedule.every=3", "curvature.batch_size=4"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Wait until ``url`` returns status 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Server exited with {process.returncode} before {url} answered:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path) -> Iterator[str]:
    """Run ``mlflow server`` over ``backend_uri`` on a free 127.0.0.1 port and yield its URL."""
    port = free_port()
    log_path = folder / f"mlflow-server-{port}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(folder / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=folder, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log_path)
        yield url
    finally:
        # The server forks workers into its own process group: stop the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def parallel_sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A sweep of 4 seeds in 4 parallel joblib jobs on a fresh SQLite store; returns the process and its folder."""
    folder = tmp_path_factory.mktemp("parallel_sweep")
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "seed=0,1,2,3", *FAST_SWEEP]
    return run_cli(args, cwd=folder, timeout=600), folder
