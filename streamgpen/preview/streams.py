"""The open MJPEG streams, at most ``limit``, where a viewer that stopped reading yields its slot.

A viewer that stops reading leaves its stream blocked in a send. When every slot is taken, a new
viewer takes the place of the one whose send has been blocked the longest (at least
``evict_after_s``), so viewers that never read cannot keep real ones out; a viewer merely
waiting for the next frame is never evicted. (The server cuts any connection that takes nothing
for ``web.server.SEND_STALL_TIMEOUT_S`` anyway; this frees a slot sooner when slots are short.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Stream:
    """One open stream: how to end it (on its loop), and since when its current send blocks."""

    end: Callable[[], None]
    loop: asyncio.AbstractEventLoop
    sending_since: float | None = field(default_factory=time.monotonic)  # the head is a send

    def end_soon(self) -> None:
        """End the stream from any thread: ``end`` runs on the stream's loop."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: so has the stream
            self.loop.call_soon_threadsafe(self.end)


class Streams:
    """The open streams, at most ``limit``; a stalled one yields its slot to a new viewer."""

    def __init__(self, *, limit: int, evict_after_s: float):
        self.limit = limit
        self.evict_after_s = evict_after_s
        self._lock = threading.Lock()
        self._open: set[Stream] = set()

    def open(self, end: Callable[[], None]) -> Stream | None:
        """A slot for a stream on the running loop, ended by ``end``; None when every slot is
        taken by viewers that read."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = self._most_stalled()
                if victim is None:
                    return None
                self._open.discard(victim)
                victim.end_soon()
            stream = Stream(end, asyncio.get_running_loop())
            self._open.add(stream)
            return stream

    def sending(self, stream: Stream) -> None:
        """``stream`` starts a send that may block on its viewer."""
        stream.sending_since = time.monotonic()

    def sent(self, stream: Stream) -> None:
        """``stream``'s viewer took the send: it is reading."""
        stream.sending_since = None

    def close(self, stream: Stream) -> None:
        """Free ``stream``'s slot (nothing if it was evicted)."""
        with self._lock:
            self._open.discard(stream)

    def end_stalled(self) -> None:
        """End every stream blocked in a send now (the others end when told there is no more)."""
        with self._lock:
            stalled = [stream for stream in self._open if stream.sending_since is not None]
        for stream in stalled:
            stream.end_soon()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _most_stalled(self) -> Stream | None:
        blocked_before = time.monotonic() - self.evict_after_s
        # Read once each: another thread's loop may be changing it.
        since = [(stream.sending_since, stream) for stream in self._open]
        stalled = [(t, stream) for t, stream in since if t is not None and t <= blocked_before]
        return min(stalled, key=lambda item: item[0], default=(None, None))[1]
