"""End-to-end runs with the curvature engine's options, read back from a real SQLite store."""

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from harness.runner import check_sizes

from conftest import run_cli
from test_cli import FAST, load_npz, only_run


@pytest.mark.slow
def test_vivit_preset_logs_overlap_snr_and_eigvecs(tmp_path):
    args = ["experiment=mlp_ce", "curvature=vivit", "curvature.subsampling=6", "curvature.gram_path=structured", *FAST]
    result = run_cli(args, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    client, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlp_ce")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert 0.0 <= metrics["ggn/all/grad_overlap"] <= 1.0
    for rank in range(1, 6):
        assert metrics[f"ggn/all/snr_{rank}"] > 0
    assert metrics["validation/all/passed"] == 1.0

    arrays = load_npz(client, run.info.run_id, "spectra/step_0000020.npz")
    assert arrays["all"].shape == (6 * 10,)
    num_params = int(float(run.data.params["num_params"]))
    assert arrays["eigvecs/all"].shape == (5, num_params)
    np.testing.assert_allclose(np.linalg.norm(arrays["eigvecs/all"], axis=1), 1.0, rtol=1e-5)


def test_sum_reduction_with_directional_derivatives_rejected(compose_config):
    cfg = compose_config(["experiment=mlp_ce", "loss.reduction=sum", "curvature.directional_derivatives=true"])

    with pytest.raises(ValueError, match="Invalid loss.reduction=sum .* need loss.reduction=mean"):
        check_sizes(cfg)


def test_subsampling_above_batch_size_rejected(compose_config):
    cfg = compose_config(["curvature.batch_size=8", "curvature.subsampling=9"])

    with pytest.raises(ValueError, match=r"Invalid curvature.subsampling=9: .*\[2, curvature.batch_size=8\]"):
        check_sizes(cfg)


def test_unknown_gram_path_rejected(compose_config):
    with pytest.raises(ConfigCompositionException):
        compose_config(["curvature.gram_path=fast"])
