"""Buffered reads from a TCP socket, for the tests' own protocol clients (DevTools, MJPEG)."""

from __future__ import annotations

import socket


class SocketReader:
    """Reads ``sock`` up to a marker or a byte count; ``error(closed)`` is raised if the peer
    hangs up."""

    def __init__(
        self, sock: socket.socket, error: type[Exception], closed: str, chunk: int = 1 << 16
    ):
        self._sock = sock
        self._error = error
        self._closed = closed
        self._chunk = chunk
        self._buffer = bytearray()

    def until(self, marker: bytes) -> bytes:
        """The bytes before the next ``marker``; the marker is consumed too."""
        while marker not in self._buffer:
            self.fill()
        end = self._buffer.index(marker)
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(marker)]
        return data

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes."""
        while len(self._buffer) < size:
            self.fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def fill(self) -> None:
        """Buffer what the socket has next (waiting for at least one byte)."""
        chunk = self._sock.recv(self._chunk)
        if not chunk:
            raise self._error(self._closed)
        self._buffer += chunk
