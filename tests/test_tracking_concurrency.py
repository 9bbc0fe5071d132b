"""Several processes on one SQLite store: a locked database is retried, a fresh one created once."""

import logging
import multiprocessing
import sqlite3
import threading

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness import tracking


def hold_exclusive_lock(path, seconds: float, locked: threading.Event) -> None:
    connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN EXCLUSIVE")
    locked.set()
    threading.Event().wait(seconds)
    connection.execute("COMMIT")
    connection.close()


def test_locked_store_retried(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "LOCKED_FIRST_WAIT", 0.2)
    path = tmp_path / "store.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    locked = threading.Event()
    holder = threading.Thread(target=hold_exclusive_lock, args=(path, 1.0, locked))
    holder.start()
    locked.wait()

    def insert() -> int:
        with sqlite3.connect(path, timeout=0) as connection:
            connection.execute("INSERT INTO t VALUES (1)")
        return 7

    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        assert tracking.call_with_retries(insert) == 7
    holder.join()

    retries = [record for record in caplog.records if "Tracking store locked in insert" in record.getMessage()]
    assert 1 <= len(retries) < tracking.LOCKED_RETRIES
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM t").fetchone() == (1,)


def test_lock_retries_exhausted(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "LOCKED_FIRST_WAIT", 0.01)
    path = tmp_path / "store.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    locked = threading.Event()
    holder = threading.Thread(target=hold_exclusive_lock, args=(path, 3.0, locked))
    holder.start()
    locked.wait()
    calls = []

    def insert() -> None:
        calls.append(1)
        with sqlite3.connect(path, timeout=0) as connection:
            connection.execute("INSERT INTO t VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        tracking.call_with_retries(insert)
    holder.join()
    assert len(calls) == tracking.LOCKED_RETRIES


def test_other_errors_not_retried():
    calls = []

    def fail() -> None:
        calls.append(1)
        raise MlflowException("Run 'abc' not found")

    with pytest.raises(MlflowException, match="not found"):
        tracking.call_with_retries(fail)
    assert calls == [1]


def open_store_and_log(uri: str, barrier, index: int) -> str:
    barrier.wait()
    tracker = tracking.Tracker(uri, "race")
    tracker.start(f"run {index}", {})
    tracker.log_metrics({"x": float(index)}, step=0)
    tracker.end("FINISHED")
    return tracker.experiment_id


@pytest.mark.slow
def test_fresh_store_opened_by_four_processes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(4)
        with context.Pool(4) as pool:
            experiment_ids = pool.starmap(open_store_and_log, [(uri, barrier, index) for index in range(4)])

    assert len(set(experiment_ids)) == 1
    client = MlflowClient(uri)
    runs = client.search_runs(experiment_ids[:1])
    assert sorted(run.info.run_name for run in runs) == ["run 0", "run 1", "run 2", "run 3"]
    assert sorted(run.data.metrics["x"] for run in runs) == [0.0, 1.0, 2.0, 3.0]
    assert all(run.info.status == "FINISHED" for run in runs)
