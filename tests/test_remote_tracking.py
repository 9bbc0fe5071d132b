"""A sweep against `mlflow server` with a PostgreSQL backend, both started here on 127.0.0.1."""

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_SWEEP, free_port, mlflow_server, run_cli

pytestmark = pytest.mark.slow


def postgres_bin_dir() -> Path | None:
    """Return the folder of PostgreSQL's server programs (Debian keeps them off PATH), or None."""
    on_path = shutil.which("pg_ctl")
    candidates = ([str(Path(on_path).resolve().parent)] if on_path else []) + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Run a throwaway PostgreSQL cluster on a free 127.0.0.1 port and yield a database URI.

    PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user that
    Debian's package creates.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL's initdb and pg_ctl were not found: apt-get install -y postgresql"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs it)")
        pytest.skip(message)

    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="harness-postgres-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, user="postgres")
    data, log_path, port = folder / "data", folder / "server.log", free_port()

    def as_postgres(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True, timeout=120)

    try:
        as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-o", options, "-w", "start")
        try:
            as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
            # The driver is named because SQLAlchemy 2.1 picks psycopg 3 for plain postgresql://.
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        finally:
            as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    except subprocess.CalledProcessError as error:
        log = log_path.read_text() if log_path.exists() else ""
        pytest.fail(f"{error.cmd} failed: {error.stderr}\n{log[-2000:]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_sweep_against_mlflow_server_on_postgres(tmp_path):
    psycopg2 = pytest.importorskip("psycopg2", reason="pip install 'harness[test]' installs psycopg2-binary")

    with postgres_cluster() as database, mlflow_server(database, tmp_path) as url:
        result = run_cli(["-m", f"tracking.uri={url}", "tracking.experiment=remote", "seed=0,1", *FAST_SWEEP], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not (tmp_path / "mlflow.db").exists()

        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
        (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
        children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}

        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["sweep/jobs_finished"] == 2
        assert sorted(children) == ["seed=0", "seed=1"]
        for run in children.values():
            assert run.info.status == "FINISHED"
            assert run.data.params["tracking.uri"] == url
            assert [m.step for m in client.get_metric_history(run.info.run_id, "ggn/all/eigval_max")] == [0, 3, 6]
            local = client.download_artifacts(run.info.run_id, "spectra/step_0000006.npz", str(tmp_path))
            with np.load(local) as archive:
                assert archive["all"][0] == pytest.approx(run.data.metrics["ggn/all/eigval_max"])
            plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots/all")}
            assert "plots/all/spectrogram.png" in plots

        # The runs are rows of the PostgreSQL database behind the server.
        with psycopg2.connect(database.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid, status FROM runs")
            rows = dict(cursor.fetchall())
        assert rows == {run.info.run_id: "FINISHED" for run in runs}
