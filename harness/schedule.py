"""Checkpoint schedules: the training steps at which the GGN spectrum is computed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def checkpoint_steps(
    total_steps: int, kind: str, every: int = 50, steps: Sequence[int] = (), num: int = 8
) -> list[int]:
    """Return the sorted checkpoint steps, always including step 0 and ``total_steps``.

    Step s means "after s optimizer updates", so 0 is the initial model.

    Args:
        total_steps: Number of optimizer updates of the run.
        kind: ``"steps"`` (the listed ``steps``), ``"every"`` (multiples of ``every``) or
            ``"log"`` (``num`` steps spaced evenly in log(1 + step)).

    Raises:
        ValueError: If a size is not positive, a listed step is outside [0, total_steps], or
            the kind is unknown.
    """
    if total_steps < 1:
        raise ValueError(f"Invalid train.steps={total_steps}: it must be at least 1.")

    if kind == "steps":
        outside = [s for s in steps if not 0 <= s <= total_steps]
        if outside:
            raise ValueError(
                f"Invalid curvature.schedule.steps {outside}: steps must lie in "
                f"[0, train.steps={total_steps}]. Remove them or increase train.steps."
            )
        chosen = set(steps)
    elif kind == "every":
        if every < 1:
            raise ValueError(f"Invalid curvature.schedule.every={every}: it must be at least 1.")
        chosen = set(range(0, total_steps + 1, every))
    elif kind == "log":
        if num < 2:
            raise ValueError(f"Invalid curvature.schedule.num={num}: it must be at least 2.")
        spaced = np.expm1(np.linspace(0.0, np.log1p(total_steps), num))
        chosen = {int(round(s)) for s in spaced}
    else:
        raise ValueError(f"Invalid curvature.schedule.kind={kind!r}: use steps, every or log.")

    return sorted(chosen | {0, total_steps})
