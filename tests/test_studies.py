"""Tiny versions of the studies in experiments/: sweep into a temporary store, analysis, figure."""

import subprocess
import sys

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_analysis(study: str, uri: str, output) -> subprocess.CompletedProcess:
    script = REPO / "experiments" / study / "analyze.py"
    return subprocess.run(
        [sys.executable, str(script), "--tracking-uri", uri, "--output", str(output)],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_edge_of_stability_study(tmp_path):
    sweep = ["-m", "experiment=study_eos", "train.steps=10", "curvature.schedule.every=5", "dataset.subset=16", "train.batch_size=16", "curvature.batch_size=16"]
    result = run_cli(sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    figure = tmp_path / "eos.png"
    analysis = run_analysis("edge_of_stability", f"sqlite:///{tmp_path / 'mlflow.db'}", figure)

    assert analysis.returncode == 0, analysis.stderr
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    rows = [line.split() for line in analysis.stdout.splitlines()[1:4]]
    assert [row[0] for row in rows] == ["1.5", "2.5", "3.5"]


def test_outlier_study(tmp_path):
    for experiment in ["study_outliers", "study_outliers_cnn"]:
        sweep = ["-m", f"experiment={experiment}", "train.steps=10", "curvature.schedule.num=3", "curvature.batch_size=8", "hydra.sweeper.params.seed=0"]
        result = run_cli(sweep, cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    figure = tmp_path / "outliers.png"
    analysis = run_analysis("gram_outliers", f"sqlite:///{tmp_path / 'mlflow.db'}", figure)

    assert analysis.returncode == 0, analysis.stderr
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    rows = [line.split() for line in analysis.stdout.splitlines()[1:] if line.startswith(("mlp", "digits_cnn"))]
    assert {row[1] for row in rows if row[0] == "mlp"} == {"all", "fc1", "fc2"}
    assert {row[1] for row in rows if row[0] == "digits_cnn"} == {"all", "conv1", "conv2", "fc"}


def test_approximation_study(tmp_path):
    tiny = ["train.steps=4", "curvature.schedule.num=2", "curvature.batch_size=4", "curvature.subsampling=null,2"]
    for experiment in ["study_approximation", "study_approximation_3c3d"]:
        extra = ["dataset.num_samples=8", "train.batch_size=4"] if experiment.endswith("3c3d") else []
        result = run_cli(["-m", f"experiment={experiment}", *tiny, *extra], cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    figure = tmp_path / "approximation.png"
    analysis = run_analysis("approximation", f"sqlite:///{tmp_path / 'mlflow.db'}", figure)

    assert analysis.returncode == 0, analysis.stderr
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    rows = [line.split(maxsplit=1) for line in analysis.stdout.splitlines()[1:] if line.startswith("study_")]
    assert len(rows) == 12
    exact_rows = [row for row in rows if row[1].startswith("exact  ")]
    assert len(exact_rows) == 2


def test_outlier_count_finds_largest_gap():
    sys.path.insert(0, str(REPO / "experiments" / "gram_outliers"))
    from analyze import count_outliers

    import numpy as np

    eigvals = np.array([50.0, 40.0, 30.0, 0.5, 0.4, 0.3, 0.0])

    assert count_outliers(eigvals, num_classes=3) == 3
    assert count_outliers(np.array([1.0, 0.0]), num_classes=3) == 1
