"""SIGTERM handled like SIGINT: a killed run (``kill``, a scheduler's time limit, torchrun stopping its
workers) unwinds through the same cleanup as Ctrl-C: no temporary folder, no half-claimed run folder, the
last checkpoint kept."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process gets SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def terminate_as_interrupt():
    """Inside the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt); the old handler after."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
