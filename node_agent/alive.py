"""One timer per event loop for every node's periodic ``alive`` lifecycle event.

go-choria publishes ``alive`` every 30 minutes. A simulated fleet runs thousands of nodes in one
event loop; a ``call_later`` per node puts thousands of long-lived handles in the loop's timer
heap, and every other timer the loop schedules (request timeouts, connect deadlines, sleeps) pays
for them in Python-level comparisons. :class:`AliveClock` keeps the nodes' due times in its own
heap of tuples and holds a single loop timer for the earliest one. Cancelling is lazy: an entry
whose ticket no longer matches its node's is skipped when it comes due. The request
dispatcher keeps its action deadlines here too (a tuple in this heap rather than a loop timer
made and cancelled per request).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import weakref
from collections.abc import Callable

__all__ = ["AliveClock", "alive_clock"]

log = logging.getLogger(__name__)


class AliveClock:
    """Calls each scheduled callback once at its due time (loop time), from one loop timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._tickets = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        """Callbacks scheduled and not cancelled."""
        return len(self._live)

    def schedule(self, delay: float, callback: Callable[[], None]) -> int:
        """Call ``callback`` after ``delay`` seconds; returns a ticket for :meth:`cancel`."""
        ticket = next(self._tickets)
        due = self.loop.time() + max(0.0, delay)
        heapq.heappush(self._heap, (due, ticket, callback))
        self._live.add(ticket)
        if due < self._timer_at:
            self._arm(due)
        return ticket

    def cancel(self, ticket: int) -> None:
        """Forget a scheduled callback (its heap entry is dropped when it comes due)."""
        self._live.discard(ticket)
        if not self._live:
            self._heap.clear()
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        heap, live = self._heap, self._live
        now = self.loop.time()
        while heap and heap[0][0] <= now:
            _, ticket, callback = heapq.heappop(heap)
            if ticket not in live:
                continue
            live.discard(ticket)
            try:
                callback()
            except Exception:  # one node's failure must not stop the others' events
                log.exception("alive event callback failed")
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AliveClock] = (
    weakref.WeakKeyDictionary()
)


def alive_clock(loop: asyncio.AbstractEventLoop | None = None) -> AliveClock:
    """The running loop's clock (made on first use); ``loop`` if the caller has it at hand."""
    if loop is None:
        loop = asyncio.get_running_loop()
    clock = _CLOCKS.get(loop)
    if clock is None:
        clock = _CLOCKS[loop] = AliveClock(loop)
    return clock
