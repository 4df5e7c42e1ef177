"""SIGINT/SIGTERM on local runs (``handler.py --test_input``, ``demucs-separate``).

Inside :func:`interruptible`, either signal raises :class:`Interrupted` in the main thread,
so every ``finally`` and context manager on the way out runs: the job's folder (downloaded
input, partial outputs) is removed before the process exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). A repeated signal while that cleanup runs is ignored: the
cleanup is short (a job stops at its next chunk or network read), and cutting it off is what
left files behind. SIGKILL still ends everything at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the first SIGINT/SIGTERM; a KeyboardInterrupt, so ``except Exception``
    blocks do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`Interrupted` (once) while inside. Main thread only
    (Python runs signal handlers there); elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal fired
        if fired:
            return  # already cleaning up
        fired = True
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
