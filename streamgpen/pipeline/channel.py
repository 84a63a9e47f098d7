"""The one hand-off between threads: bounded, stop-aware on both ends, optionally leaky.

Every pair of pipeline threads is joined by a :class:`Channel`. ``put`` blocks while the channel
is full (a file: every frame is processed) unless the channel is *leaky* (a live source: the oldest
waiting item is dropped instead, so the capture never stalls and stale frames are not enhanced).
Both ``put`` and ``get`` return as soon as the run's :class:`threading.Event` ``stop`` is set, so a
thread that fails can never leave another blocked forever on a full or empty channel. ``close()``
marks the end of the stream: ``get`` drains what is left, then raises :class:`Closed`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# How often a blocked put/get looks at the stop event (a Condition cannot wait on two things).
POLL_S = 0.05


class Closed(Exception):
    """The channel was closed and is empty, or the run was stopped."""


class Channel(Generic[T]):
    """A bounded queue between two threads of one run.

    ``on_drop(item)`` is called (by the putting thread) for each item a leaky channel drops;
    ``on_put()`` after each item delivered or the channel closed (a consumer of several channels
    waits on one event that every producer sets).
    """

    def __init__(
        self,
        maxsize: int,
        *,
        stop: threading.Event,
        leaky: bool = False,
        on_drop: Callable[[T], None] | None = None,
        on_put: Callable[[], None] | None = None,
    ):
        if maxsize < 1:
            raise ValueError("a channel holds at least one item")
        self.maxsize = maxsize
        self.leaky = leaky
        self._stop = stop
        self._on_drop = on_drop
        self._on_put = on_put
        self._items: deque[T] = deque()
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T) -> bool:
        """Hand ``item`` over; False when the run stopped (the item is not delivered)."""
        dropped: list[T] = []
        with self._cond:
            while len(self._items) >= self.maxsize and not self._stop.is_set():
                if self.leaky:
                    dropped.append(self._items.popleft())
                    break
                self._cond.wait(POLL_S)
            if self._stop.is_set():
                return False
            self._items.append(item)
            self._cond.notify_all()
        for old in dropped:
            if self._on_drop is not None:
                self._on_drop(old)
        if self._on_put is not None:
            self._on_put()
        return True

    def get(self, timeout: float | None = None) -> T:
        """The oldest item; waits up to ``timeout`` seconds (None: until one comes).

        Raises :class:`Closed` when the run stopped or the channel is closed and drained, and
        :class:`TimeoutError` when ``timeout`` passed with nothing to take.
        """
        deadline = None if timeout is None else _now() + timeout
        with self._cond:
            while not self._items:
                if self._stop.is_set() or self._closed:
                    raise Closed
                left = POLL_S if deadline is None else min(POLL_S, deadline - _now())
                if left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            if self._stop.is_set():
                raise Closed
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def offer(self, item: T) -> bool:
        """Hand ``item`` over only if there is room now; False (nothing waits, nothing is
        dropped) when the channel is full or the run stopped: the caller refuses the work."""
        with self._cond:
            if len(self._items) >= self.maxsize or self._stop.is_set():
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get_many(self, limit: int, *, wait_for_more: bool) -> list[T]:
        """One item (waiting for it), then up to ``limit`` in all: those already waiting, or,
        with ``wait_for_more``, waiting for each (a file fills whole chunks; a live source takes
        what is there). Raises :class:`Closed` only when not even the first item comes."""
        items = [self.get()]
        while len(items) < limit:
            try:
                items.append(self.get(timeout=None if wait_for_more else 0))
            except (Closed, TimeoutError):
                break
        return items

    def take(self, limit: int, *, whole: bool) -> list[T]:
        """Up to ``limit`` items waiting now, without waiting; with ``whole``, none unless
        ``limit`` are waiting or the channel is closed (a file's chunks stay whole). Raises
        :class:`Closed` when the run stopped, or the channel is closed and drained."""
        with self._cond:
            if self._stop.is_set() or (self._closed and not self._items):
                raise Closed
            if whole and len(self._items) < limit and not self._closed:
                return []
            items = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._cond.notify_all()
            return items

    def drain(self) -> list[T]:
        """Take every item waiting, without waiting (what a stopped consumer leaves behind)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def close(self) -> None:
        """No more items will come; ``get`` raises :class:`Closed` once the rest is taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._on_put is not None:
            self._on_put()


def _now() -> float:
    return time.monotonic()
