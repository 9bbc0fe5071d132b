"""End-to-end runs of `python -m harness` in a subprocess, read back from a real SQLite store."""

import io
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

FAST = ["train.steps=20", "curvature.schedule.kind=every", "curvature.schedule.every=10", "curvature.batch_size=8"]


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def load_npz(client: MlflowClient, run_id: str, path: str) -> dict:
    local = client.download_artifacts(run_id, path)
    with np.load(local) as archive:
        return {key: archive[key] for key in archive.files}


def test_main_job_logs_validated_spectra(tmp_path):
    result = run_cli(["experiment=mlp_mse", "grouping=per_layer", *FAST], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in result.stdout
    client, run = only_run(uri, "mlp_mse")
    assert run.info.status == "FINISHED"

    metrics = run.data.metrics
    for group in ["fc1", "fc2"]:
        for key in ["eigval_max", "eigval_1", "eigval_10", "trace", "num_eigvals_above"]:
            assert f"ggn/{group}/{key}" in metrics
        assert metrics[f"validation/{group}/passed"] == 1.0
        assert metrics[f"validation/{group}/max_rel_err"] < 1e-3
    for key in ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "ggn/compute_seconds"]:
        assert key in metrics
    history = client.get_metric_history(run.info.run_id, "ggn/fc1/eigval_max")
    assert [m.step for m in history] == [0, 10, 20]

    spectra = [a.path for a in client.list_artifacts(run.info.run_id, "spectra")]
    assert spectra == ["spectra/step_0000000.npz", "spectra/step_0000010.npz", "spectra/step_0000020.npz"]
    for path in spectra:
        arrays = load_npz(client, run.info.run_id, path)
        assert arrays["fc1"].shape == (8 * 10,)
        assert arrays["fc2"].shape == (8 * 10,)
        assert np.all(np.diff(arrays["fc1"]) <= 0)
    final = load_npz(client, run.info.run_id, spectra[-1])
    assert final["fc1"][0] == pytest.approx(metrics["ggn/fc1/eigval_max"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "spectra"} <= artifacts
    assert run.data.params["grouping.name"] == "per_layer"
    assert run.data.params["tracking.uri"] == uri
    assert "experiment=mlp_mse" in run.data.tags["harness.overrides"]


def test_cross_entropy_and_overrides(tmp_path):
    args = ["experiment=mlp_ce", "grouping=weights_biases", "model.hidden=[16,16]", "optimizer.lr=0.05", "device=cpu", "seed=3"]
    result = run_cli([*args, *FAST], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    _, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlp_ce")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["validation/weights/passed"] == 1.0
    assert run.data.metrics["validation/biases/passed"] == 1.0
    assert run.data.params["model.hidden"] == "[16, 16]"


def test_tracking_uri_from_environment(tmp_path):
    store = tmp_path / "elsewhere" / "store.db"
    store.parent.mkdir()
    result = run_cli(FAST, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})

    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    _, run = only_run(f"sqlite:///{store}", "harness")
    assert run.info.status == "FINISHED"


def test_help_lists_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)

    assert result.returncode == 0
    assert "grouping: all, per_layer, per_param, regex, weights_biases" in result.stdout
    assert "experiment: cifar100_allcnnc, cifar10_3c3d, cifar10_resnet, diabetes_mlp, digits_cnn, fmnist_2c2d, mlp_ce, mlp_mse" in result.stdout
    assert "model: deepobs_2c2d, deepobs_3c3d, deepobs_allcnnc, digits_cnn, mlp, resnet, torchvision" in result.stdout


def test_cfg_job_prints_config(tmp_path):
    result = run_cli(["--cfg", "job", "experiment=mlp_ce"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "name: cross_entropy" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_typo_rejected_before_run(tmp_path):
    result = run_cli(["curvature.batchsize=8"], cwd=tmp_path)

    assert result.returncode != 0
    assert "batchsize" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_configs_found_in_regular_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target), str(REPO)],
        check=True,
        capture_output=True,
    )
    shipped = {path.relative_to(REPO / "conf") for path in (REPO / "conf").rglob("*.yaml")}
    installed = {path.relative_to(target / "harness" / "conf") for path in (target / "harness" / "conf").rglob("*.yaml")}
    assert installed == shipped

    result = subprocess.run(
        [sys.executable, "-m", "harness", "--cfg", "job", "experiment=mlp_ce"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert "name: cross_entropy" in result.stdout
