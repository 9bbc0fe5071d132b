"""Divergence, interruption by real signals, resume and determinism, read back from real MLflow stores."""

import io
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO
from harness.checkpointing import CHECKPOINT_ARTIFACT, DataOrder, TrainingState, checkpoint_bytes, load_checkpoint
from harness.faults import DivergenceError
from harness.runner import run
from harness.tracking import Tracker, TrackingError

# Seconds per checkpoint differ between runs, so they are left out of the comparisons.
TIMINGS = {"ggn/compute_seconds", "ggn/gradient_seconds", "ggn/cost_in_gradients", "validation/seconds"}
# Monte-Carlo GGN draws random numbers, so identical spectra also show that the generators resume.
RESUMABLE = [
    "train.steps=300",
    "train.log_every=1",
    "train.eval_every=25",
    "curvature.approximation=mc",
    "curvature.mc_samples=2",
    "curvature.batch_size=16",
    "curvature.schedule.kind=every",
    "curvature.schedule.every=100",
]


@pytest.fixture
def one_thread():
    """Run torch on one thread, as the subprocesses do, so results match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def run_in_process(compose_config, folder: Path, overrides: list[str], output_dir: Path | None = None) -> str:
    cfg = compose_config([f"tracking.uri={sqlite_uri(folder)}", *overrides])
    return run(cfg, folder, overrides, output_dir)


def only_run_id(uri: str, experiment: str = "harness") -> str:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0].info.run_id


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Return every metric's (step, value) pairs in step order, timings left out."""
    keys = set(client.get_run(run_id).data.metrics) - TIMINGS
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def spectra(client: MlflowClient, run_id: str) -> dict[str, dict[str, np.ndarray]]:
    result = {}
    for item in client.list_artifacts(run_id, "spectra"):
        with np.load(client.download_artifacts(run_id, item.path)) as archive:
            result[item.path] = {key: archive[key] for key in archive.files}
    return result


def load_last_checkpoint(client: MlflowClient, run_id: str) -> dict:
    data = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT)).read_bytes()
    return torch.load(io.BytesIO(data), weights_only=True)


def assert_same_results(client_a: MlflowClient, run_a: str, client_b: MlflowClient, run_b: str) -> None:
    metrics_a, metrics_b = histories(client_a, run_a), histories(client_b, run_b)
    assert set(metrics_a) == set(metrics_b)
    for key, values in metrics_a.items():
        steps = [step for step, _ in metrics_b[key]]
        assert len(steps) == len(set(steps)), f"duplicate steps of {key}"
        assert metrics_b[key] == values, key

    spectra_a, spectra_b = spectra(client_a, run_a), spectra(client_b, run_b)
    assert list(spectra_a) == list(spectra_b)
    for path, arrays in spectra_a.items():
        assert arrays.keys() == spectra_b[path].keys()
        for group, values in arrays.items():
            np.testing.assert_array_equal(spectra_b[path][group], values, err_msg=f"{path} {group}")


class Harness:
    """``python -m harness`` in a subprocess whose output lines are read by a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return
        self.process.kill()
        raise AssertionError(f"{text!r} not in the output:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 240) -> int:
        returncode = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def test_divergence_fails_run_and_keeps_checkpoint(compose_config, tmp_path, sqlite_store):
    overrides = ["optimizer.lr=1e5", "train.steps=50", "train.log_every=1", "curvature.schedule.kind=every",
                 "curvature.schedule.every=1", "curvature.batch_size=8", "curvature.validate.enabled=false"]

    with pytest.raises(DivergenceError) as error:
        run_in_process(compose_config, tmp_path, overrides)

    client = MlflowClient(sqlite_uri(tmp_path))
    run_id = only_run_id(sqlite_uri(tmp_path))
    run_info = client.get_run(run_id)
    step = error.value.step
    assert 0 < step < 50
    assert run_info.info.status == "FAILED"
    assert run_info.data.tags["harness.end_step"] == str(step)
    assert f"Training diverged at step {step}" in run_info.data.tags["harness.end_reason"]

    checkpoint = load_last_checkpoint(client, run_id)
    # The last checkpoint is that of the failing step if its parameters were still finite.
    assert checkpoint["step"] in (step - 1, step)
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert [m.step for m in client.get_metric_history(run_id, "ggn/all/eigval_max")] == list(range(checkpoint["step"] + 1))
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == list(range(len(losses)))
    assert len(losses) >= step


def test_same_seed_gives_identical_spectra(compose_config, tmp_path, sqlite_store, one_thread):
    overrides = ["train.steps=30", "curvature.approximation=mc", "curvature.batch_size=16",
                 "curvature.schedule.kind=every", "curvature.schedule.every=10", "curvature.validate.enabled=false"]

    first = run_in_process(compose_config, tmp_path, overrides)
    second = run_in_process(compose_config, tmp_path, overrides)

    client = MlflowClient(sqlite_uri(tmp_path))
    assert first != second
    assert len(spectra(client, first)) == 4
    assert_same_results(client, first, client, second)


def test_resume_finished_run_rejected(compose_config, tmp_path, sqlite_store):
    overrides = ["train.steps=2", "curvature.schedule.kind=steps", "curvature.batch_size=4", "curvature.validate.enabled=false"]
    run_id = run_in_process(compose_config, tmp_path, overrides)

    with pytest.raises(TrackingError, match=f"Run {run_id} is FINISHED, so there is nothing to resume"):
        run_in_process(compose_config, tmp_path, [*overrides, f"tracking.resume_run_id={run_id}"])


def test_resume_unknown_run_rejected(compose_config, tmp_path, sqlite_store):
    with pytest.raises(TrackingError, match="No run with id 'f00' in sqlite:///.*check tracking.resume_run_id"):
        run_in_process(compose_config, tmp_path, ["train.steps=2", "tracking.resume_run_id=f00"])


@pytest.mark.slow
def test_sigterm_during_checkpoint_kills_and_resumes(compose_config, tmp_path, sqlite_store, one_thread):
    # 200 samples × 10 classes make a 2000 × 2000 Gram matrix: about a second to diagonalize.
    overrides = ["train.steps=5", "curvature.schedule.kind=steps", "curvature.batch_size=200", "curvature.validate.enabled=false"]
    harness = Harness([f"tracking.uri={sqlite_uri(tmp_path)}", *overrides], tmp_path)

    harness.wait_for("Computing the GGN spectrum at step 0")
    harness.process.send_signal(signal.SIGTERM)
    returncode = harness.finish()

    assert returncode == 128 + signal.SIGTERM, harness.output
    assert "Checkpoint step 0:" not in harness.output
    assert "Interrupted by SIGTERM at step 0" in harness.output
    client = MlflowClient(sqlite_uri(tmp_path))
    run_id = only_run_id(sqlite_uri(tmp_path))
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["harness.end_step"] == "0"
    assert "ggn/all/eigval_max" not in killed.data.metrics
    checkpoint = load_last_checkpoint(client, run_id)
    assert checkpoint["step"] == 0
    assert checkpoint["checkpoint_done"] is False

    assert run_in_process(compose_config, tmp_path, [*overrides, f"tracking.resume_run_id={run_id}"]) == run_id

    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["harness.resumed_at_step"] == "0"
    assert resumed.data.tags["harness.end_reason"] == "finished"
    assert [m.step for m in client.get_metric_history(run_id, "ggn/all/eigval_max")] == [0, 5]
    assert list(spectra(client, run_id)) == ["spectra/step_0000000.npz", "spectra/step_0000005.npz"]


@pytest.mark.slow
def test_sigint_during_training_then_auto_resume_matches(compose_config, tmp_path, empty_store, one_thread):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    for folder in (interrupted, reference):
        folder.mkdir()
        shutil.copyfile(empty_store, folder / "mlflow.db")
    output_dir = interrupted / "outputs"
    harness = Harness([f"tracking.uri={sqlite_uri(interrupted)}", f"hydra.run.dir={output_dir}", *RESUMABLE], interrupted)

    harness.wait_for("Checkpoint step 100:")
    harness.process.send_signal(signal.SIGINT)
    returncode = harness.finish()

    assert returncode == 128 + signal.SIGINT, harness.output
    client = MlflowClient(sqlite_uri(interrupted))
    run_id = only_run_id(sqlite_uri(interrupted))
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    stopped_at = int(killed.data.tags["harness.end_step"])
    assert 100 <= stopped_at < 300
    assert f"Interrupted by SIGINT at step {stopped_at}" in killed.data.tags["harness.end_reason"]
    assert load_last_checkpoint(client, run_id)["step"] == stopped_at

    # Rerunning into the same output folder continues the run (tracking.resume=auto).
    assert run_in_process(compose_config, interrupted, RESUMABLE, output_dir) == run_id
    reference_id = run_in_process(compose_config, reference, RESUMABLE)

    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["harness.resumed_at_step"] == str(stopped_at)
    assert_same_results(MlflowClient(sqlite_uri(reference)), reference_id, client, run_id)


def test_resume_with_changed_config_rejected(compose_config, tmp_path, sqlite_store):
    overrides = ["optimizer.lr=1e5", "train.steps=50", "curvature.schedule.kind=steps", "curvature.batch_size=4",
                 "curvature.validate.enabled=false"]
    with pytest.raises(DivergenceError):
        run_in_process(compose_config, tmp_path, overrides)
    run_id = only_run_id(sqlite_store)

    changed = [*overrides, "optimizer.lr=0.1", f"tracking.resume_run_id={run_id}"]
    with pytest.raises(TrackingError, match=rf"Cannot resume run {run_id}: its config differs in optimizer.lr: '100000.0' -> '0.1'"):
        run_in_process(compose_config, tmp_path, changed)

    assert MlflowClient(sqlite_store).get_run(run_id).info.status == "FAILED"


def test_resumed_tracker_skips_stored_steps(sqlite_store):
    first = Tracker(sqlite_store, "harness")
    run_id = first.start(None, {})
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.end("KILLED")

    second = Tracker(sqlite_store, "harness")
    second.resume(second.find_run(run_id))
    second.log_metrics({"train/loss": 2.0, "eval/loss": 5.0}, step=1)
    second.log_metrics({"train/loss": 3.0}, step=2)
    second.end("FINISHED")

    client = MlflowClient(sqlite_store)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss")] == [(1, 5.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sigkill_leaves_running_run_resumable_by_id(compose_config, tmp_path, sqlite_store, one_thread):
    output_dir = tmp_path / "outputs"
    harness = Harness([f"tracking.uri={sqlite_store}", f"hydra.run.dir={output_dir}", *RESUMABLE], tmp_path)

    harness.wait_for("Checkpoint step 200:")
    harness.process.send_signal(signal.SIGKILL)
    harness.finish()

    client = MlflowClient(sqlite_store)
    run_id = only_run_id(sqlite_store)
    assert client.get_run(run_id).info.status == "RUNNING"

    # The same output folder does not resume a RUNNING run, whose process might still be alive.
    other_id = run_in_process(compose_config, tmp_path, [*RESUMABLE, "train.steps=2"], output_dir)
    assert other_id != run_id

    assert run_in_process(compose_config, tmp_path, [*RESUMABLE, f"tracking.resume_run_id={run_id}"]) == run_id
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert int(resumed.data.tags["harness.resumed_at_step"]) in (100, 200)
    for key, values in histories(client, run_id).items():
        steps = [step for step, _ in values]
        assert steps == sorted(set(steps)), f"duplicate steps of {key}"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(300))


class Payload:
    """A class that ``torch.load(..., weights_only=True)`` must refuse to unpickle."""


def test_checkpoint_loader_rejects_pickled_objects():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    order = DataOrder.start(10, 2, seed=0)
    valid = checkpoint_bytes(TrainingState(3, True, order), model, optimizer)
    payload = torch.load(io.BytesIO(valid), weights_only=True)
    buffer = io.BytesIO()
    torch.save({**payload, "extra": Payload()}, buffer)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(buffer.getvalue(), model, optimizer, order)
    assert load_checkpoint(valid, model, optimizer, order).step == 3
