"""Bad input is rejected before training starts, with an error that names the value and the fix."""

import logging
import socket
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from harness.curvature.memory import MemoryBudgetError
from harness.groups import build_param_groups
from harness.models import mlp
from harness.runner import check_sizes, run
from harness.tracking import TrackingError

QUICK = ["train.steps=2", "curvature.schedule.kind=steps", "curvature.batch_size=4", "curvature.validate.enabled=false"]


def start_run(compose_config, tmp_path: Path, overrides: list[str], uri: str | None = None) -> str:
    """Compose the real configs with ``overrides`` and run them against a store in ``tmp_path``."""
    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([f"tracking.uri={uri}", *QUICK, *overrides])
    return run(cfg, tmp_path, overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=0", "Invalid train.steps=0"),
        ("train.batch_size=-1", "Invalid train.batch_size=-1"),
        ("train.eval_every=0", "Invalid train.eval_every=0"),
        ("curvature.batch_size=0", "Invalid curvature.batch_size=0"),
        ("curvature.mc_samples=0", "Invalid curvature.mc_samples=0"),
        ("curvature.top_k=-3", "Invalid curvature.top_k=-3"),
        ("model.hidden=[16,0]", r"Invalid model.hidden=\[16, 0\]"),
        ("optimizer.lr=0", "Invalid optimizer.lr=0"),
        ("dataset.val_fraction=1.5", "Invalid dataset.val_fraction=1.5"),
        ("curvature.batch_size=5000", "Invalid curvature.batch_size=5000.*use a value from 1 to 1438"),
        ("curvature.schedule.steps=[1,7]", r"Invalid curvature.schedule.steps \[7\].*train.steps=2"),
    ],
)
def test_invalid_size_rejected_before_store(compose_config, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        start_run(compose_config, tmp_path, [override])

    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["curvature.memory_budget_gb=0"], "Invalid curvature.memory_budget_gb=0.0: use null"),
        (["curvature.density_probes=-1"], "Invalid curvature.density_probes=-1: use 0"),
        (["curvature.density_steps=0"], "Invalid curvature.density_steps=0: it must be at least 1"),
        (
            ["curvature=mc", "curvature.on_budget_exceeded=chunked"],
            "Invalid curvature.on_budget_exceeded=chunked with curvature.approximation=mc.*Use on_budget_exceeded=mc",
        ),
        (
            ["curvature=vivit", "curvature.on_budget_exceeded=lanczos"],
            "Invalid curvature.on_budget_exceeded=lanczos with curvature.directional_derivatives=true",
        ),
    ],
)
def test_conflicting_curvature_options_rejected(compose_config, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        start_run(compose_config, tmp_path, overrides)

    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("error", "needs an estimated .* above the memory budget of 1e-06 GB"),
        ("chunked", "chunked fallback needs an estimated"),
    ],
)
def test_memory_budget_exceeded_before_store(compose_config, tmp_path, action, message):
    overrides = ["curvature.memory_budget_gb=1e-6", f"curvature.on_budget_exceeded={action}"]
    with pytest.raises(MemoryBudgetError, match=message):
        start_run(compose_config, tmp_path, overrides)

    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("override", "options"),
    [
        ("loss.reduction=none", ["mean", "sum"]),
        ("loss.name=huber", ["mse", "cross_entropy"]),
        ("model.activation=gelu_inplace", ["relu", "tanh", "sigmoid"]),
        ("tracking.resume=always", ["auto", "never"]),
        ("grouping.unmatched=drop", ["rest", "ignore"]),
    ],
)
def test_value_outside_options_names_them(compose_config, override, options):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])

    message = str(error.value.__cause__)
    assert override.split("=")[1] in message
    for option in options:
        assert option in message


def test_unknown_group_option_names_group(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["loss=hinge"])

    message = str(error.value)
    assert "loss/hinge" in message
    assert "cross_entropy" in message


@pytest.mark.parametrize("override", ["train.steps=1.5", "seed=abc", "model.hidden=16", "curvature.validate.strict=maybe"])
def test_wrong_type_rejected(compose_config, override):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])

    assert override.split("=")[0].split(".")[-1] in str(error.value.__cause__)


# --- Parameter groups from regular expressions -------------------------------------------------


def test_regex_groups_and_rest():
    model = mlp(4, [3, 3], 2, "relu")

    groups = build_param_groups(model, "regex", {"first": r"fc1\..*", "weights": r"fc[23]\.weight"})

    assert list(groups) == ["first", "weights", "rest"]
    assert groups["first"] == [model.fc1.weight, model.fc1.bias]
    assert groups["weights"] == [model.fc2.weight, model.fc3.weight]
    assert groups["rest"] == [model.fc2.bias, model.fc3.bias]


def test_regex_unmatched_ignored():
    model = mlp(4, [3], 2, "relu")

    groups = build_param_groups(model, "regex", {"first": r"fc1\..*"}, unmatched="ignore")

    assert list(groups) == ["first"]


def test_regex_must_match_whole_name():
    model = mlp(4, [3], 2, "relu")

    with pytest.raises(ValueError, match=r"'fc1' of group 'a' matches no trainable parameter.*fc1.weight, fc1.bias"):
        build_param_groups(model, "regex", {"a": "fc1"})


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ({"a": r"fc1\..*", "b": r".*\.bias"}, "Parameter 'fc1.bias' matches the patterns of groups 'a' and 'b'"),
        ({"a": r"fc1\..*", "empty": "conv.*"}, r"'conv\.\*' of group 'empty' matches no trainable parameter"),
        ({"a": "fc1[.weight"}, r"Invalid regular expression 'fc1\[.weight' for group 'a'"),
        ({"rest": r"fc1\..*"}, "group named 'rest'.*grouping.unmatched=ignore"),
        ({}, "grouping=regex needs grouping.patterns"),
    ],
)
def test_invalid_regex_groups_rejected(patterns, message):
    model = mlp(4, [3], 2, "relu")

    with pytest.raises(ValueError, match=message):
        build_param_groups(model, "regex", patterns)


def test_patterns_without_regex_grouping_rejected():
    with pytest.raises(ValueError, match="grouping=per_layer ignores it: use grouping=regex"):
        build_param_groups(mlp(4, [3], 2, "relu"), "per_layer", {"a": r"fc1\..*"})


def test_regex_grouping_from_command_line(compose_config, tmp_path, sqlite_store):
    overrides = ["grouping=regex", r"+grouping.patterns={hidden:'fc1\..*'}"]

    run_id = start_run(compose_config, tmp_path, overrides)

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.data.params["param_groups"] == "hidden,rest"
    assert run.data.params["grouping.patterns.hidden"] == r"fc1\..*"
    assert "ggn/hidden/eigval_max" in run.data.metrics
    assert "ggn/rest/eigval_max" in run.data.metrics


def test_overlapping_patterns_rejected_before_store(compose_config, tmp_path):
    overrides = ["grouping=regex", r"+grouping.patterns={a:'fc.\.weight',b:'fc1\..*'}"]

    with pytest.raises(ValueError, match="'fc1.weight' matches the patterns of groups 'a' and 'b'"):
        start_run(compose_config, tmp_path, overrides)

    assert not (tmp_path / "mlflow.db").exists()


# --- Tracking store and artifact location ------------------------------------------------------


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_rejected(compose_config, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"

    with pytest.raises(TrackingError, match=rf"Cannot reach the MLflow tracking server at tracking.uri={uri}.*mlflow server"):
        start_run(compose_config, tmp_path, [], uri=uri)


def test_sqlite_folder_missing_rejected(compose_config, tmp_path):
    store = tmp_path / "missing" / "mlflow.db"

    with pytest.raises(TrackingError, match=rf"folder {tmp_path / 'missing'} of tracking.uri=sqlite:///{store} does not exist"):
        start_run(compose_config, tmp_path, [], uri=f"sqlite:///{store}")


def test_sqlite_store_not_writable_rejected(compose_config, tmp_path):
    # A folder in place of the database file cannot be opened as a database, even by root.
    store = tmp_path / "mlflow.db"
    store.mkdir()

    with pytest.raises(TrackingError, match=rf"Cannot write the SQLite database of tracking.uri=sqlite:///{store}"):
        start_run(compose_config, tmp_path, [], uri=f"sqlite:///{store}")


def test_unwritable_artifact_location_rejected(compose_config, tmp_path, sqlite_store):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so no folder can be created below it")
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("harness", artifact_location=(blocker / "artifacts").as_uri())

    with pytest.raises(TrackingError, match=rf"Cannot write to {blocker / 'artifacts'}, the location of the artifacts of experiment 'harness'"):
        start_run(compose_config, tmp_path, [], uri=uri)

    assert client.search_runs([experiment_id]) == []


def test_unknown_key_added_with_plus_rejected(compose_config, tmp_path):
    cfg = compose_config(["+optimizer.lrr=5"])

    with pytest.raises(ValueError, match="Unknown config key 'optimizer.lrr'"):
        run(cfg, tmp_path, [])
    assert not (tmp_path / "mlflow.db").exists()


def test_fallback_without_budget_warns(compose_config, caplog):
    cfg = compose_config(["curvature.on_budget_exceeded=lanczos"])

    with caplog.at_level(logging.WARNING, logger="harness.runner"):
        check_sizes(cfg)

    assert "curvature.on_budget_exceeded=lanczos has no effect without curvature.memory_budget_gb" in caplog.text
