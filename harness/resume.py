"""Finding the run to resume and restoring its training state from ``checkpoints/last.pt``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from mlflow.entities import Run
from torch import nn

from harness.checkpointing import CHECKPOINT_ARTIFACT, DataOrder, TrainingState, load_checkpoint
from harness.tracking import Tracker, TrackingError

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
RESUMABLE_STATUSES = ("RUNNING", "KILLED", "FAILED")


def find_resumable_run(tracker: Tracker, run_id: str | None, mode: str, output_dir: Path | None) -> Run | None:
    """Return the run to continue, or None to start a new one.

    ``run_id`` (``tracking.resume_run_id``) names a KILLED, FAILED or RUNNING run (RUNNING is
    left behind by a process that died without ending its run). Otherwise, with ``mode="auto"``,
    a KILLED or FAILED run whose id a previous job wrote into ``output_dir`` is continued. A
    RUNNING run there is not, since its process may still be alive: two jobs started in the same
    second share Hydra's default output folder.

    Raises:
        TrackingError: If ``run_id`` is not found, is in another experiment or already FINISHED.
    """
    if run_id:
        run = tracker.find_run(run_id)
        if run.info.status not in RESUMABLE_STATUSES:
            raise TrackingError(
                f"Run {run_id} is {run.info.status}, so there is nothing to resume: drop "
                "tracking.resume_run_id to start a new run."
            )
        return run

    record = output_dir / RUN_ID_FILE if output_dir is not None else None
    if mode != "auto" or record is None or not record.is_file():
        return None
    recorded = record.read_text().strip()
    try:
        run = tracker.find_run(recorded)
    except TrackingError as error:
        log.warning("Not resuming run %s recorded in %s: %s", recorded, record, error)
        return None
    if run.info.status == "RUNNING":
        log.warning(
            "Run %s recorded in %s is RUNNING, so another process may own it: starting a new run. "
            "If its process died, resume it with tracking.resume_run_id=%s.", recorded, output_dir, recorded,
        )
        return None
    if run.info.status not in RESUMABLE_STATUSES:
        log.info("Run %s recorded in %s is %s: starting a new run.", recorded, output_dir, run.info.status)
        return None
    log.info("Resuming run %s (%s) recorded in %s; set tracking.resume=never to start a new run.", recorded, run.info.status, output_dir)
    return run


def restore_training_state(
    tracker: Tracker, run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, data_order: DataOrder
) -> TrainingState:
    """Load the ``checkpoints/last.pt`` of run ``run_id`` into the model, optimizer and data order.

    A run interrupted before its first checkpoint has none: it restarts at step 0 from the seed,
    which gives the same results.
    """
    data = tracker.download_bytes(CHECKPOINT_ARTIFACT, run_id)
    if data is None:
        log.warning("Run %s has no %s: restarting it from step 0.", run_id, CHECKPOINT_ARTIFACT)
        return TrainingState(0, False, data_order)
    return load_checkpoint(data, model, optimizer, data_order)
