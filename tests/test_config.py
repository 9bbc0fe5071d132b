"""Composition of the real configs in conf/ with Hydra's compose API."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from harness.config import Config


def test_defaults_compose(compose_config):
    cfg = compose_config()

    assert cfg.dataset.name.value == "digits"
    assert cfg.loss.name.value == "mse"
    assert cfg.grouping.name.value == "all"
    assert cfg.tracking.uri is None
    assert set(cfg) == set(Config.__dataclass_fields__) - {"defaults"}


@pytest.mark.parametrize(
    ("experiment", "loss", "tracking"),
    [("mlp_mse", "mse", "mlp_mse"), ("mlp_ce", "cross_entropy", "mlp_ce")],
)
def test_experiment_without_plus(compose_config, experiment, loss, tracking):
    cfg = compose_config([f"experiment={experiment}"])

    assert cfg.loss.name.value == loss
    assert cfg.tracking.experiment == tracking


def test_overrides_from_command_line(compose_config):
    cfg = compose_config(
        ["grouping=per_layer", "model.hidden=[64,64]", "optimizer.lr=0.05", "curvature.batch_size=32", "device=cpu", "seed=3"]
    )

    assert cfg.grouping.name.value == "per_layer"
    assert list(cfg.model.hidden) == [64, 64]
    assert cfg.optimizer.lr == 0.05
    assert cfg.seed == 3


def test_experiment_then_override_wins(compose_config):
    cfg = compose_config(["experiment=mlp_mse", "optimizer.lr=0.01"])

    assert cfg.optimizer.lr == 0.01


def test_unknown_key_rejected(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["optimizer.lrr=0.1"])
    assert "lrr" in str(error.value.__cause__ or error.value)


def test_wrong_type_rejected(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["train.steps=many"])
    assert isinstance(error.value.__cause__, ValidationError)
    assert "many" in str(error.value.__cause__)


def test_enum_value_outside_options_rejected(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["curvature.approximation=kfac"])
    message = str(error.value.__cause__)
    assert "kfac" in message
    assert "exact" in message


def test_unknown_group_option_rejected(compose_config):
    with pytest.raises(ConfigCompositionException, match="grouping"):
        compose_config(["grouping=per_neuron"])


def test_typo_in_top_level_key_rejected(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["sed=3"])
    assert isinstance(error.value.__cause__, ConfigAttributeError)
    assert "Key 'sed' not in 'Config'" in str(error.value.__cause__)
