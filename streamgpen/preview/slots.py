"""Bounded admission: connections and MJPEG streams, where a stalled client yields its place.

Every connection has a handler thread, so their number is capped (``Connections``). A client
that is slow to send its request (slowloris) is cut at a deadline, and when the cap is reached a
new connection takes the place of the one that has been reading its request the longest: a
flood of half-sent requests can neither pin threads nor lock out a real request.

Open streams are capped too (``Streams``). A viewer that stops reading blocks its thread in a
send; when every stream slot is taken, a new viewer takes the place of the one whose send has
been blocked the longest (at least ``evict_after_s``), so viewers that never read cannot keep
real ones out. A viewer merely waiting for the next frame is never evicted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


def cut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways: a thread blocked reading or writing it wakes at once."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    accepted: float = field(default_factory=time.monotonic)
    reading: bool = True  # until its response begins
    cut: bool = False


class Connections:
    """The open connections; at most ``limit`` of them count, each with a handler thread.

    A cut connection no longer counts: its thread sees the shutdown and ends at once.
    """

    def __init__(self, *, limit: int, read_deadline_s: float):
        self.limit = limit
        self.read_deadline_s = read_deadline_s
        self._changed = threading.Condition()
        self._open: dict[socket.socket, _Connection] = {}

    def admit(self, sock: socket.socket) -> bool:
        """Count ``sock`` in; at the limit, cut the longest-reading connection to make room.

        False (nothing counted) when the limit is reached and every connection is responding.
        """
        with self._changed:
            live = [c for c in self._open.values() if not c.cut]
            if len(live) >= self.limit:
                reading = [c for c in live if c.reading]
                if not reading:
                    return False
                self._cut(min(reading, key=lambda c: c.accepted))
            self._open[sock] = _Connection(sock)
            return True

    def responding(self, sock: socket.socket) -> bool:
        """Mark the request on ``sock`` read; False if the connection was cut meanwhile."""
        with self._changed:
            connection = self._open.get(sock)
            if connection is None or connection.cut:
                return False
            connection.reading = False
            return True

    def is_cut(self, sock: socket.socket) -> bool:
        """Whether ``sock`` was cut (or is not counted at all)."""
        with self._changed:
            connection = self._open.get(sock)
            return connection is None or connection.cut

    def closed(self, sock: socket.socket) -> None:
        """Forget ``sock``: its handler thread is done."""
        with self._changed:
            self._open.pop(sock, None)
            self._changed.notify_all()

    def reap(self) -> None:
        """Cut every connection still reading its request past the deadline."""
        deadline = time.monotonic() - self.read_deadline_s
        with self._changed:
            for connection in self._open.values():
                if connection.reading and not connection.cut and connection.accepted < deadline:
                    self._cut(connection)

    def cut_all(self, grace_s: float) -> None:
        """Cut every connection and wait up to ``grace_s`` for their threads to end."""
        with self._changed:
            for connection in self._open.values():
                self._cut(connection)
            self._changed.wait_for(lambda: not self._open, timeout=grace_s)

    def __len__(self) -> int:
        with self._changed:
            return sum(not c.cut for c in self._open.values())

    @staticmethod
    def _cut(connection: _Connection) -> None:
        connection.cut = True
        cut(connection.sock)


@dataclass(eq=False)
class Stream:
    """One open MJPEG stream: its socket and since when its current send is blocked."""

    sock: socket.socket
    sending_since: float | None = field(default_factory=time.monotonic)  # the head is a send


class Streams:
    """The open streams, at most ``limit``; a stalled one yields its slot to a new viewer."""

    def __init__(self, *, limit: int, evict_after_s: float):
        self.limit = limit
        self.evict_after_s = evict_after_s
        self._lock = threading.Lock()
        self._open: set[Stream] = set()

    def open(self, sock: socket.socket) -> Stream | None:
        """A slot for a stream on ``sock``; None when all are taken by viewers that read."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = self._most_stalled()
                if victim is None:
                    return None
                self._open.discard(victim)
                cut(victim.sock)
            stream = Stream(sock)
            self._open.add(stream)
            return stream

    def sending(self, stream: Stream) -> None:
        """``stream`` starts a send that may block on its viewer."""
        with self._lock:
            stream.sending_since = time.monotonic()

    def sent(self, stream: Stream) -> None:
        """``stream``'s viewer took the send: it is reading."""
        with self._lock:
            stream.sending_since = None

    def close(self, stream: Stream) -> None:
        """Free ``stream``'s slot (nothing if it was evicted)."""
        with self._lock:
            self._open.discard(stream)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _most_stalled(self) -> Stream | None:
        blocked_before = time.monotonic() - self.evict_after_s
        stalled = [
            s
            for s in self._open
            if s.sending_since is not None and s.sending_since <= blocked_before
        ]
        return min(stalled, key=lambda s: s.sending_since, default=None)
