"""Shared fixtures: composed configs and a temporary MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
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
