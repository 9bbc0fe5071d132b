"""Every experiment in conf/experiment: composed, and run end to end on bundled or tiny on-disk data."""

import pytest
import torchvision
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import REPO, run_cli
from harness import models
from harness.data import DatasetNotFoundError
from harness.runner import run
from harness.support import UnsupportedModelError
from vision_files import cifar_checksums, write_cifar, write_mnist

EXPERIMENTS = {
    "mlp_mse": ("digits", "mlp", "mse"),
    "mlp_ce": ("digits", "mlp", "cross_entropy"),
    "digits_cnn": ("digits", "digits_cnn", "cross_entropy"),
    "diabetes_mlp": ("diabetes", "mlp", "mse"),
    "fmnist_2c2d": ("fashion_mnist", "deepobs_2c2d", "cross_entropy"),
    "cifar10_3c3d": ("cifar10", "deepobs_3c3d", "cross_entropy"),
    "cifar100_allcnnc": ("cifar100", "deepobs_allcnnc", "cross_entropy"),
    "cifar10_resnet": ("cifar10", "resnet", "cross_entropy"),
    # The sweeps of experiments/, run end to end in test_studies.py.
    "study_eos": ("digits", "mlp", "mse"),
    "study_outliers": ("digits", "mlp", "cross_entropy"),
    "study_outliers_cnn": ("digits", "digits_cnn", "cross_entropy"),
    "study_approximation": ("digits", "mlp", "cross_entropy"),
    "study_approximation_3c3d": ("random", "deepobs_3c3d", "cross_entropy"),
}
FAST = ["train.steps=4", "train.eval_every=2", "train.log_every=1", "curvature.schedule.kind=every", "curvature.schedule.every=2"]


def run_in_process(compose_config, tmp_path, overrides: list[str]) -> str:
    """Run the harness in this process on the composed config and return the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*overrides, f"tracking.uri={uri}"]
    run(compose_config(overrides), tmp_path, overrides)
    return uri


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_every_experiment_file_listed():
    files = {path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml")}

    assert files == set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes(compose_config, experiment):
    cfg = compose_config([f"experiment={experiment}"])

    dataset, model, loss = EXPERIMENTS[experiment]
    assert cfg.dataset.name.value == dataset
    assert cfg.model.name.value == model
    assert cfg.loss.name.value == loss
    assert cfg.tracking.experiment == experiment


@pytest.mark.parametrize(
    ("override", "message"),
    [("model=resnt", "resnt"), ("model.name=cnn", "cnn"), ("model.arch=vgg16", "vgg16"), ("dataset.name=cifar11", "cifar11")],
)
def test_misspelled_names_rejected(compose_config, override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    assert message in str(error.value.__cause__ or error.value)


@pytest.mark.slow
def test_digits_cnn_runs_validated(tmp_path):
    result = run_cli(["experiment=digits_cnn", *FAST, "curvature.batch_size=8"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    (found,) = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "digits_cnn")
    assert found.info.status == "FINISHED"
    assert found.data.params["num_params"] == "1898"
    assert found.data.metrics["validation/all/passed"] == 1.0
    assert found.data.metrics["validation/all/max_rel_err"] < 1e-3
    assert "eval/accuracy" in found.data.metrics


@pytest.mark.slow
def test_diabetes_regression_runs(tmp_path, compose_config):
    uri = run_in_process(compose_config, tmp_path, ["experiment=diabetes_mlp", *FAST, "curvature.batch_size=8"])

    (found,) = runs_of(uri, "diabetes_mlp")
    metrics = found.data.metrics
    assert found.info.status == "FINISHED"
    assert metrics["validation/all/passed"] == 1.0
    assert "eval/loss" in metrics
    assert "train/loss" in metrics
    assert not any(key.endswith("accuracy") for key in metrics)
    # One real-valued output per sample: the curvature batch of 8 gives 8 eigenvalues.
    history = MlflowClient(uri).get_metric_history(found.info.run_id, "ggn/all/eigval_8")
    assert len(history) == 3
    assert "ggn/all/eigval_9" not in metrics


@pytest.mark.slow
def test_fmnist_2c2d_runs_on_idx_files(tmp_path, compose_config, monkeypatch):
    write_mnist(tmp_path / "data", "fashion_mnist", num_train=24, num_test=4)
    monkeypatch.chdir(tmp_path)
    overrides = ["experiment=fmnist_2c2d", *FAST, "train.batch_size=4", "curvature.batch_size=2", "grouping=per_layer", "tracking.log_model=false"]

    uri = run_in_process(compose_config, tmp_path, overrides)

    (found,) = runs_of(uri, "fmnist_2c2d")
    metrics = found.data.metrics
    assert found.info.status == "FINISHED"
    assert found.data.params["num_params"] == "3274634"
    assert found.data.params["dataset.root"] == "data"
    for group in ["conv1", "conv2", "fc1", "fc2"]:
        assert metrics[f"ggn/{group}/eigval_max"] > 0
    # conv1 has 832 parameters, so it is small enough to be validated, but fc1 is not.
    assert metrics["validation/conv1/passed"] == 1.0
    assert "validation/fc1/passed" not in metrics


@pytest.mark.slow
def test_cifar10_resnet_runs_on_pickles(tmp_path, monkeypatch, compose_config):
    root = tmp_path / "cifar"
    write_cifar(root, "cifar10", per_batch=4)
    for attribute, value in cifar_checksums(root, torchvision.datasets.CIFAR10).items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, attribute, value)
    overrides = [
        "experiment=cifar10_resnet",
        *FAST,
        f"dataset.root={root}",
        "model.widths=[2,4]",
        "model.blocks=1",
        "train.batch_size=4",
        "curvature.batch_size=2",
    ]

    uri = run_in_process(compose_config, tmp_path, overrides)

    (found,) = runs_of(uri, "cifar10_resnet")
    assert found.info.status == "FINISHED"
    # 436 parameters (widths 2 and 4, one block each) are small enough to be validated.
    assert found.data.metrics["validation/all/passed"] == 1.0
    assert "eval/accuracy" in found.data.metrics


def test_missing_data_stops_before_run(tmp_path, compose_config):
    with pytest.raises(DatasetNotFoundError) as error:
        run_in_process(compose_config, tmp_path, ["experiment=cifar10_3c3d", f"dataset.root={tmp_path / 'data'}", *FAST])

    assert f"Dataset cifar10 not found or corrupted in {tmp_path / 'data' / 'cifar-10-batches-py'}" in str(error.value)
    assert runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "cifar10_3c3d") == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=digits_cnn", "model=deepobs_2c2d"], "does not accept inputs of shape (1, 8, 8)"),
        (["experiment=diabetes_mlp", "loss=cross_entropy"], "regression set with real-valued targets, so use loss=mse"),
    ],
)
def test_mismatch_stops_before_run(tmp_path, compose_config, overrides, message):
    with pytest.raises(ValueError) as error:
        run_in_process(compose_config, tmp_path, [*overrides, *FAST])

    assert message in str(error.value)
    experiment = overrides[0].split("=")[1]
    assert runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment) == []


def test_unsupported_layer_stops_before_run(tmp_path, compose_config, monkeypatch):
    def gelu_mlp(name, input_shape, num_outputs, **options):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, num_outputs))

    monkeypatch.setattr(models, "build_model", gelu_mlp)

    with pytest.raises(UnsupportedModelError, match="layer '2' of type GELU"):
        run_in_process(compose_config, tmp_path, ["experiment=mlp_ce", *FAST])
    assert runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlp_ce") == []
