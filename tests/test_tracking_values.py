"""Names and values that MLflow rejects or cannot store as they are, sent to real MLflow stores."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.faults import DivergenceError
from harness.runner import run
from harness.tracking import Tracker, metric_key

# A pattern of over 6000 characters, MLflow's limit for a param value, that matches fc1's parameters.
LONG_PATTERN = r"fc1\.(weight|bias)" + "".join(f"|unused{i}" for i in range(800))


def test_metric_key_replaces_invalid_characters():
    assert metric_key("ggn", "block[0]:w", "eigval_max") == "ggn/block_0__w/eigval_max"
    assert metric_key("ggn", "fc1.weight", "trace") == "ggn/fc1.weight/trace"


def test_long_param_stored_as_artifact(tmp_path, sqlite_store):
    tracker = Tracker(sqlite_store, "values")
    run_id = tracker.start(None, {})

    tracker.log_params({"short": 1, "grouping.patterns.first": LONG_PATTERN})

    run = tracker.client.get_run(run_id)
    assert run.data.params == {"short": "1"}
    stored = Path(tracker.client.download_artifacts(run_id, "params/grouping.patterns.first.txt", str(tmp_path))).read_text()
    assert stored == f"grouping.patterns.first\n{LONG_PATTERN}\n"


def test_non_finite_metrics_kept_in_sqlite(sqlite_store):
    tracker = Tracker(sqlite_store, "values")
    run_id = tracker.start(None, {})

    tracker.log_metrics({"a": math.nan, "b": math.inf, "c": -math.inf}, step=3)
    tracker.end("FINISHED")

    history = {key: tracker.client.get_metric_history(run_id, key) for key in "abc"}
    assert math.isnan(history["a"][0].value)
    assert history["b"][0].value == sys.float_info.max
    assert history["c"][0].value == -sys.float_info.max
    assert all(values[0].step == 3 for values in history.values())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, sqlite_store):
    """Start ``mlflow server`` on 127.0.0.1 with a SQLite store in ``tmp_path``; yield its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_file = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", sqlite_store, "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                os.killpg(process.pid, signal.SIGKILL)
                raise AssertionError((tmp_path / "server.log").read_text())
            time.sleep(0.5)

    yield uri

    # The server runs uvicorn in a child process: stop the whole process group it leads.
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    log_file.close()


def get_json(uri: str, endpoint: str, **query: str) -> dict:
    """GET an MLflow REST endpoint and parse it as strict JSON, as a browser's JSON.parse would."""

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON: a browser could not parse this response")

    with urllib.request.urlopen(f"{uri}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read(), parse_constant=reject)


@pytest.mark.slow
def test_server_run_with_odd_values_readable(compose_config, mlflow_server, tmp_path):
    cfg = compose_config(
        [f"tracking.uri={mlflow_server}", "optimizer.lr=1e5", "train.steps=20", "train.log_every=1",
         "curvature.batch_size=8", "curvature.schedule.kind=steps", "curvature.validate.enabled=false", "grouping=regex"]
    )
    cfg.grouping.patterns = {"block[0]: fc1": LONG_PATTERN}

    with pytest.raises(DivergenceError):
        run(cfg, tmp_path, [])

    run_id = MlflowClient(mlflow_server).search_runs(["1"])[0].info.run_id
    stored = get_json(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert stored["info"]["status"] == "FAILED"
    metrics = {metric["key"] for metric in stored["data"]["metrics"]}
    assert {"ggn/block_0__ fc1/eigval_max", "ggn/rest/eigval_max"} <= metrics
    params = {param["key"]: param["value"] for param in stored["data"]["params"]}
    assert params["param_groups"] == "block[0]: fc1,rest"
    assert "grouping.patterns.block[0]: fc1" not in params

    losses = get_json(mlflow_server, "/ajax-api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    last = losses[-1]["value"]
    assert last in ("NaN", "Infinity", "-Infinity") or abs(last) == sys.float_info.max
    artifacts = get_json(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="params")["files"]
    assert [item["path"] for item in artifacts] == ["params/grouping.patterns.block_0__ fc1.txt"]
