"""Faults that end a run early: divergence and interruption by SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DivergenceError(RuntimeError):
    """Raised when the training loss or a parameter is NaN or infinite; the run ends FAILED.

    Args:
        step: Number of optimizer updates before the non-finite value appeared.
        reason: What is not finite, e.g. "the training loss is nan".
    """

    def __init__(self, step: int, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(
            f"Training diverged at step {step}: {reason}. Start a new run with a lower "
            "optimizer.lr; checkpoints/last.pt holds the last model before the divergence."
        )


class RunInterrupted(KeyboardInterrupt):
    """Raised when SIGINT or SIGTERM arrives during a run; the run ends KILLED.

    It subclasses KeyboardInterrupt so that code which lets Ctrl-C through lets it through too.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"Interrupted by {self.signal_name}")


class SignalGuard:
    """Turn SIGINT and SIGTERM into :class:`RunInterrupted` at points where the state is consistent.

    By default a signal is only recorded, and :meth:`check` raises at the next step boundary, so
    an optimizer update or a metric upload is never cut in half. Inside :meth:`interruptible`
    (a long computation that changes no state, such as the GGN spectrum) the signal raises at
    once. Use it as a context manager: it installs its handlers on entry and restores the
    previous ones on exit. Signal handlers can only be installed from the main thread, so in
    other threads the guard does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("Received %s: the run stops at the next consistent point.", signal.Signals(signum).name)
        if self._interruptible:
            self._interruptible = False
            raise RunInterrupted(signum)

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived since the guard was entered."""
        if self.signum is not None:
            raise RunInterrupted(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Let a signal raise at once inside the block (and raise at entry if one is pending)."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
