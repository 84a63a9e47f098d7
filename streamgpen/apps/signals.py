"""Ctrl-C and SIGTERM stop a run cleanly, once: the output so far is finalised, exit code 130.

The first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread, where the run stops and
closes everything it opened. Any further signal while that clean stop runs is noted and ignored:
a second Ctrl-C must not kill the process half-way through writing a trailer or a rename. After
the run, :func:`ignore_interrupts` keeps a late Ctrl-C (during interpreter shutdown) from killing
the process by the signal after its work is done.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def clean_interrupts() -> Iterator[None]:
    """Inside the block, SIGINT/SIGTERM raise KeyboardInterrupt once, then are ignored until the
    block is left. Outside the main thread (signals cannot be set there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _first)
    try:
        yield
    except KeyboardInterrupt:
        # Stopping: the process exits with 130 next; a signal now (interpreter shutdown, exit
        # handlers) would kill it by the signal after the clean stop.
        ignore_interrupts()
        raise
    else:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first(signum, frame) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _stopping)
    raise KeyboardInterrupt


def _stopping(signum, frame) -> None:
    print("streamgpen: stopping: finishing the output first", file=sys.stderr, flush=True)


def ignore_interrupts() -> None:
    """From now on SIGINT/SIGTERM are ignored (the work is done; the process is exiting)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
