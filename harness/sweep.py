"""Sweeps: one MLflow parent run per multirun, one child run per job.

``python -m harness -m key=a,b ...`` runs one job per combination of the swept values. The
Hydra callback :class:`MlflowSweepCallback` (listed under ``hydra.callbacks`` in
``conf/config.yaml``) creates the parent run before the first job starts and, after the last one,
counts how its children ended. Jobs may run in other processes (the joblib and submitit
launchers), so the parent's id reaches them through the file ``mlflow_sweep.json`` in the sweep
folder. :func:`run_sweep_job` is the task of every job: it runs the experiment as a child run and
records a failure instead of raising it, so the remaining jobs still run.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from harness.tracking import Tracker, end_run, find_runs, resolve_tracking_uri

log = logging.getLogger(__name__)

CONTEXT_FILE = "mlflow_sweep.json"
PARENT_TAG = "mlflow.parentRunId"
JOB_TAG = "harness.sweep.job"

# The parent run of the sweep that this process started and has not ended yet. ``__main__``
# ends it if the sweep stops early (Ctrl-C, or an error that Hydra raises between jobs).
_open_sweep: SweepContext | None = None


@dataclass(frozen=True)
class SweepContext:
    """Store, experiment and parent run of a sweep, which every job needs to log its child run."""

    uri: str
    experiment: str
    parent_run_id: str
    swept_keys: list[str]

    def save(self, sweep_dir: Path) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / CONTEXT_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepContext | None:
        path = sweep_dir / CONTEXT_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


class SweepFailedError(SystemExit):
    """Ends the command with exit status 1 after a sweep in which some jobs failed or were killed.

    It is a ``SystemExit`` because Hydra turns any other exception of a callback into a warning.
    """


def swept_keys(overrides: list[str]) -> list[str]:
    """Return the keys of the overrides that sweep over several values, such as ``seed=0,1,2``."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [override.get_key_element() for override in parsed if override.is_sweep_override()]


def child_run_name(job_overrides: list[str], keys: list[str], job_num: int) -> str:
    """Name a job's run by its values of the swept keys, for example ``seed=1,optimizer.lr=0.1``."""
    parsed = OverridesParser.create().parse_overrides(job_overrides)
    parts = [override.input_line for override in parsed if override.get_key_element() in keys]
    return ",".join(part for part in parts if part) or f"job {job_num}"


class MlflowSweepCallback(Callback):
    """Create the parent run of a sweep and record how its jobs ended."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _open_sweep

        launch_dir = Path(config.hydra.runtime.cwd or os.getcwd())
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_absolute():
            sweep_dir = launch_dir / sweep_dir
        overrides = list(config.hydra.overrides.task)
        uri = resolve_tracking_uri(config.tracking.uri, launch_dir)
        experiment = config.tracking.experiment
        launcher = config.hydra.launcher._target_.rsplit(".", 1)[-1]

        # Creating the store, its tables and the experiment here, once, before any job starts,
        # keeps parallel jobs from racing to do it.
        tracker = Tracker(uri, experiment)
        tags = {
            "harness.sweep.overrides": " ".join(overrides) or "(none)",
            "harness.sweep.dir": str(sweep_dir),
            "harness.sweep.launcher": launcher,
            "mlflow.source.name": "python -m harness -m",
        }
        run_id = tracker.start(config.tracking.run_name or f"sweep {sweep_dir.name}", tags)
        tracker.log_params({override.split("=", 1)[0]: override.split("=", 1)[-1] for override in overrides})

        context = SweepContext(uri, experiment, run_id, swept_keys(overrides))
        context.save(sweep_dir)
        _open_sweep = context
        log.info("Sweep: parent MLflow run %s in experiment %r at %s, jobs in %s", run_id, experiment, uri, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        context = _open_sweep
        if context is None:
            return
        counts = end_sweep(context, None)
        failed = counts["FAILED"] + counts["KILLED"]
        if failed:
            raise SweepFailedError(
                f"Sweep ended with {counts['FAILED']} FAILED and {counts['KILLED']} KILLED of "
                f"{sum(counts.values())} jobs: see the child runs of MLflow run {context.parent_run_id} "
                f"and the job logs in {config.hydra.sweep.dir}."
            )


def end_sweep(context: SweepContext, status: str | None) -> Counter[str]:
    """End the parent run with the counts of its children's statuses and return the counts.

    A child still RUNNING belongs to a job whose process died without ending it, and is ended
    KILLED. ``status`` is the parent's status; None means FINISHED if every job finished, else
    FAILED.
    """
    global _open_sweep
    _open_sweep = None

    tracker = Tracker(context.uri, context.experiment)
    tracker.attach(context.parent_run_id)
    counts: Counter[str] = Counter({"FINISHED": 0, "FAILED": 0, "KILLED": 0})
    for child in tracker.child_runs():
        child_status = child.status
        if child_status in ("RUNNING", "SCHEDULED"):
            log.warning("Sweep job run %s (%s) was left %s by its process: ending it KILLED", child.run_id, child.name, child_status)
            end_run(context.uri, child.run_id, "KILLED")
            child_status = "KILLED"
        counts[child_status] += 1

    if status is None:
        status = "FINISHED" if counts["FAILED"] == counts["KILLED"] == 0 else "FAILED"
    tracker.log_metrics(
        {
            "sweep/jobs": sum(counts.values()),
            "sweep/jobs_finished": counts["FINISHED"],
            "sweep/jobs_failed": counts["FAILED"],
            "sweep/jobs_killed": counts["KILLED"],
        },
        step=0,
    )
    tracker.end(status)
    log.info(
        "Sweep run %s ended %s: %d FINISHED, %d FAILED, %d KILLED jobs",
        context.parent_run_id, status, counts["FINISHED"], counts["FAILED"], counts["KILLED"],
    )
    return counts


def end_open_sweep(error: BaseException) -> None:
    """End the parent run of a sweep that stopped early: KILLED on Ctrl-C, else FAILED."""
    context = _open_sweep
    if context is None:
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        end_sweep(context, status)
    except MlflowException as tracking_error:
        log.error("Could not end sweep run %s: %s", context.parent_run_id, tracking_error)


def run_sweep_job(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Run one job of a sweep as a child run of the sweep's parent run.

    Every job logs to the sweep's store and experiment, so that the MLflow UI can nest the
    children under the parent. A job whose ``tracking.experiment`` differs is moved there, with a
    log line. An error of the job is logged and recorded as a FAILED child run (created here if
    the job failed before its run started). It is not re-raised, so the other jobs still run.
    """
    from harness.runner import run

    launch_dir = Path(hydra_cfg.runtime.cwd)
    overrides = list(hydra_cfg.overrides.task)
    job_num = int(hydra_cfg.job.num)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    if not sweep_dir.is_absolute():
        sweep_dir = launch_dir / sweep_dir
    context = SweepContext.load(sweep_dir)
    if context is None:
        log.warning("No %s in %s: job %d runs as a plain run without a parent", CONTEXT_FILE, sweep_dir, job_num)
        run(cfg, launch_dir, overrides, Path(hydra_cfg.runtime.output_dir))
        return

    if cfg.tracking.experiment != context.experiment:
        log.info(
            "Job %d logs to the sweep's experiment %r instead of %r, so that it is nested under the parent run",
            job_num, context.experiment, cfg.tracking.experiment,
        )
    cfg.tracking.uri = context.uri
    cfg.tracking.experiment = context.experiment
    name = cfg.tracking.run_name or child_run_name(overrides, context.swept_keys, job_num)
    tags = {PARENT_TAG: context.parent_run_id, JOB_TAG: str(job_num), "mlflow.runName": name}

    try:
        run(cfg, launch_dir, overrides, Path(hydra_cfg.runtime.output_dir), extra_tags=tags)
    except Exception as error:
        log.exception("Sweep job %d (%s) failed: %s", job_num, name, error)
        _record_failed_job(context, job_num, tags, overrides, error)


def _record_failed_job(context: SweepContext, job_num: int, tags: dict[str, str], overrides: list[str], error: Exception) -> None:
    """Create a FAILED child run for a job that failed before the runner started its run."""
    try:
        tracker = Tracker(context.uri, context.experiment)
        children = find_runs(context.uri, tracker.experiment_id, parent_run_id=context.parent_run_id)
        if any(child.tags.get(JOB_TAG) == str(job_num) for child in children):
            return
        failure_tags = {**tags, "harness.overrides": " ".join(overrides) or "(none)", "harness.error": f"{type(error).__name__}: {error}"}
        tracker.start(None, failure_tags)
        tracker.end("FAILED")
    except MlflowException as tracking_error:
        log.error("Could not record the failure of sweep job %d in MLflow: %s", job_num, tracking_error)
