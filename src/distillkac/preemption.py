"""Stopping cleanly on request: SIGTERM and SIGUSR1 (what cluster schedulers send before they kill a job).

Inside :func:`preemptible` the two signals only set a flag; the long loops (training steps, distillation
stages, evaluation batches) look at it at their next safe point, save their state and raise
:class:`Preempted`, which the command line turns into exit code :data:`EXIT_CODE` (143, as for a
process ended by SIGTERM). Rerunning the same command resumes from the saved state.

Ctrl-C (SIGINT) is left alone: it stops at once; a loop that knows what it had saved re-raises it as
:class:`Interrupted` carrying that, so the message says truthfully what is kept.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_CODE = 143
"""Exit code of a command stopped by SIGTERM or SIGUSR1 after saving its state (128 + SIGTERM)."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _State:
    """How many :func:`preemptible` blocks are open, and the stop signal received in them."""

    depth = 0
    received: str | None = None


class Preempted(Exception):
    """A command stopped on SIGTERM/SIGUSR1 at a safe point; the message says what was saved."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a run; the message says what was kept (e.g. the last checkpoint, or nothing yet)."""


def _on_signal(number: int, frame: object) -> None:
    _State.received = signal.Signals(number).name


@contextlib.contextmanager
def preemptible() -> Iterator[None]:
    """Within this block SIGTERM and SIGUSR1 set the flag that :func:`requested` reports instead of ending
    the process. Nested blocks share the outermost one's handlers; the previous handlers come back on exit.
    Outside the main thread (where handlers cannot be set) the block does nothing."""
    outermost = _State.depth == 0
    if outermost and threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _on_signal) for number in SIGNALS} if outermost else {}
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if outermost:
            for number, handler in previous.items():
                signal.signal(number, handler)
            _State.received = None


def requested() -> str | None:
    """The name of the stop signal received inside :func:`preemptible` ("SIGTERM", "SIGUSR1"), else None."""
    return _State.received
