"""Sweeps (`python -m harness -m`): parent and child runs, failing jobs, launchers, the report."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_SWEEP, REPO, run_cli
from harness.report import build_report
from harness.sweep import JOB_TAG, PARENT_TAG, SweepContext, _record_failed_job, child_run_name, swept_keys
from harness.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_runs(uri: str, experiment: str = "harness"):
    """Return the MLflow client, the sweep's parent run and its child runs by name."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = {run.info.run_name: run for run in runs if run.data.tags.get(PARENT_TAG) == parents[0].info.run_id}
    return client, parents[0], children


def test_swept_keys_and_child_names():
    overrides = ["seed=0,1", "optimizer.lr=0.1", "grouping=all,per_layer", "train.steps=range(1,3)"]

    assert swept_keys(overrides) == ["seed", "grouping", "train.steps"]
    assert child_run_name(["seed=1", "optimizer.lr=0.1", "grouping=all"], ["seed", "grouping"], 3) == "seed=1,grouping=all"
    assert child_run_name(["optimizer.lr=0.1"], [], 3) == "job 3"


def test_failed_job_recorded_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "sweeps")
    parent_id = parent.start("sweep", {})
    context = SweepContext(uri, "sweeps", parent_id, ["seed"])
    tags = {PARENT_TAG: parent_id, JOB_TAG: "3", "mlflow.runName": "seed=3"}

    _record_failed_job(context, 3, tags, ["seed=3"], ValueError("Invalid optimizer.lr=-1.0"))
    _record_failed_job(context, 3, tags, ["seed=3"], ValueError("Invalid optimizer.lr=-1.0"))

    children = parent.child_runs()
    assert len(children) == 1
    assert children[0].status == "FAILED"
    assert children[0].name == "seed=3"
    assert children[0].tags["harness.error"] == "ValueError: Invalid optimizer.lr=-1.0"


@pytest.mark.slow
def test_sweep_goes_on_after_failures(tmp_path):
    # atol=-1 fails the strict validation at the first checkpoint, after the run started;
    # lr=-1 fails before the runner creates a run.
    args = ["-m", "optimizer.lr=0.1,-1", "curvature.validate.atol=0.001,-1", "curvature.validate.strict=true", *FAST_SWEEP]
    result = run_cli(args, cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    assert "Sweep ended with 3 FAILED and 0 KILLED of 4 jobs" in result.stderr
    client, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")

    assert parent.info.status == "FAILED"
    assert parent.data.metrics == {"sweep/jobs": 4, "sweep/jobs_finished": 1, "sweep/jobs_failed": 3, "sweep/jobs_killed": 0}
    assert parent.data.params["optimizer.lr"] == "0.1,-1"
    assert parent.data.params["train.steps"] == "6"
    assert parent.data.tags["harness.sweep.launcher"] == "BasicLauncher"
    assert (tmp_path / parent.data.tags["harness.sweep.dir"] / "mlflow_sweep.json").is_file()

    assert sorted(children) == [
        "optimizer.lr=-1,curvature.validate.atol=-1",
        "optimizer.lr=-1,curvature.validate.atol=0.001",
        "optimizer.lr=0.1,curvature.validate.atol=-1",
        "optimizer.lr=0.1,curvature.validate.atol=0.001",
    ]
    assert sorted(run.data.tags[JOB_TAG] for run in children.values()) == ["0", "1", "2", "3"]
    finished = children["optimizer.lr=0.1,curvature.validate.atol=0.001"]
    assert finished.info.status == "FINISHED"
    assert "ggn/all/eigval_max" in finished.data.metrics

    mid_run = children["optimizer.lr=0.1,curvature.validate.atol=-1"]
    assert mid_run.info.status == "FAILED"
    assert "ggn/all/eigval_max" in mid_run.data.metrics
    for atol in ("0.001", "-1"):
        before_start = children[f"optimizer.lr=-1,curvature.validate.atol={atol}"]
        assert before_start.info.status == "FAILED"
        assert "Invalid optimizer.lr=-1.0" in before_start.data.tags["harness.error"]


@pytest.mark.slow
def test_parallel_sweep_loses_nothing(parallel_sweep):
    result, folder = parallel_sweep

    assert result.returncode == 0, result.stderr
    assert "database is locked" not in result.stderr
    client, parent, children = sweep_runs(f"sqlite:///{folder / 'mlflow.db'}")

    assert parent.info.status == "FINISHED"
    assert parent.data.tags["harness.sweep.launcher"] == "JoblibLauncher"
    assert parent.data.metrics["sweep/jobs_finished"] == 4
    assert sorted(children) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    for name, run in children.items():
        run_id = run.info.run_id
        assert run.info.status == "FINISHED", name
        for key in ["ggn/all/eigval_max", "ggn/all/eigval_10", "ggn/all/trace", "validation/all/passed"]:
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 3, 6], (name, key)
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0]
        assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [0, 6]

        spectra = [a.path for a in client.list_artifacts(run_id, "spectra")]
        assert spectra == ["spectra/step_0000000.npz", "spectra/step_0000003.npz", "spectra/step_0000006.npz"], name
        plots = sorted(a.path for a in client.list_artifacts(run_id, "plots/all"))
        assert plots == [f"plots/all/{kind}.png" for kind in ["density", "spectrogram", "top_eigvals", "validation"]], name
        for path in ["config.yaml", "model/state_dict.pt", *spectra, *plots]:
            assert (folder / "mlartifacts" / "harness" / run_id / "artifacts" / path).stat().st_size > 0, (name, path)


@pytest.mark.slow
def test_report_of_parallel_sweep(parallel_sweep, tmp_path):
    _, folder = parallel_sweep
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client, parent, children = sweep_runs(uri)
    output = tmp_path / "report.png"

    result = subprocess.run(
        [sys.executable, "-m", "harness.report", "--uri", uri, "--sweep", parent.info.run_id, "--output", str(output), "--log"],
        cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert "4 runs in 1 line" in result.stdout
    assert output.read_bytes().startswith(PNG_MAGIC)
    logged = [a.path for a in client.list_artifacts(parent.info.run_id, "plots/report")]
    assert logged == ["plots/report/ggn_all_eigval_max.png"]

    report = build_report(uri, "ggn/all/trace", sweep=parent.info.run_id)
    assert list(report.curves) == ["all runs"]
    expected = {
        run.info.run_id: [m.value for m in sorted(client.get_metric_history(run.info.run_id, "ggn/all/trace"), key=lambda m: m.step)]
        for run in children.values()
    }
    got = sorted(values.tolist() for _, values in report.curves["all runs"])
    assert got == sorted(expected.values())


def test_missing_launcher_names_install_command(tmp_path):
    # A meta path finder that hides the joblib plugin simulates an environment without it.
    code = (
        "import sys, runpy\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('hydra_plugins.hydra_joblib_launcher'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = ['harness', '-m', 'hydra/launcher=joblib', 'seed=0,1']\n"
        "runpy.run_module('harness', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "hydra/launcher=joblib needs the package hydra-joblib-launcher" in result.stderr
    assert "pip install 'harness[joblib]'" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=0,1", *FAST_SWEEP]
    result = run_cli(args, cwd=tmp_path, timeout=600)

    assert result.returncode == 0, result.stderr
    _, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["harness.sweep.launcher"] == "LocalLauncher"
    assert sorted(children) == ["seed=0", "seed=1"]
    assert all(run.info.status == "FINISHED" for run in children.values())


@pytest.mark.slow
def test_interrupted_sweep_ends_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "harness", "-m", "train.steps=1000", "seed=0,1"],
            cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while "Checkpoint step 0" not in log_path.read_text() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)

    assert process.returncode != 0
    _, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "KILLED"
    assert parent.data.metrics["sweep/jobs_killed"] == 1
    assert list(children) == ["seed=0"]
    assert children["seed=0"].info.status == "KILLED"
