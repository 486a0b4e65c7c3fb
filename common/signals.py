"""Stopping on a signal without a lock.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread
is. One that takes a lock — `threading.Event.set()` does — deadlocks when the main thread
already holds that lock, or when a second signal arrives while the first handler holds it: a
cloud worker given SIGTERM twice in a row (its coordinator's lifecycle, then the parent-death
signal) hung forever that way. `StopRequest` only sets an attribute; the serving loops poll it.
"""

from __future__ import annotations

import signal
import threading
import time

_POLL_S = 0.05


class StopRequest:
    """Set by a signal handler or any thread; read by a polling loop. Event-like names."""

    def __init__(self) -> None:
        self._requested = False

    def set(self, *_: object) -> None:
        """Ask to stop (usable as a signal handler: it takes no lock)."""
        self._requested = True

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, returning early once stop is asked for."""
        deadline = time.monotonic() + timeout
        while not self._requested:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, _POLL_S))
        return self._requested

    def signalled(self, signum: int, *_: object) -> None:
        """A signal handler: ask to stop. After a SIGTERM, further SIGTERMs are ignored: the
        stop is under way, and Python restores the default action of the signals it handles
        while the interpreter finalizes, so a late SIGTERM would kill a process that drained
        cleanly (exit -15 instead of 0). SIGINT keeps its handler (a second Ctrl-C is not
        swallowed). Runs in the main thread, as Python signal handlers do."""
        self._requested = True
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_signals(self, *signums: int) -> bool:
        """Install `signalled` for `signums` (SIGTERM, SIGINT by default); only the main thread
        can, so elsewhere (a Ray actor's thread) nothing is installed and False is returned."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.signalled)
        return True
