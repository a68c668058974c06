"""One device owner `stats` request shared by callers that can live with a reply a
request's round trip old: a caller that comes while a request is in flight waits for
its reply instead of sending another.

The peers that PeerSync holds back each poll for the session the peer's handshake made
(peer_sync.HOLD_POLL_S); on a busy host, where a reply takes about a poll's interval,
one request per held peer and poll crowds the owner pipe the connectivity checks'
`stun_send` requests go through. Shared, N held peers cost about one request per poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kbwg.agent.owner_calls import DeviceStats


@dataclass
class _InFlight:
    task: asyncio.Task[DeviceStats]
    waiters: int = 0


@dataclass
class SharedStats:
    """`get()` joins the request in flight, if any, else sends one (through `fetch`).

    Each waiter gets that request's outcome as a direct call would have: its reply, or
    its exception raised to every waiter alike. A finished request, answered or failed,
    is never handed to a later `get()`, which sends a fresh one. A waiter cancelled
    leaves the request to the others; cancelled by the last one, it is dropped.
    """

    fetch: Callable[[], Awaitable[DeviceStats]]
    _in_flight: _InFlight | None = field(default=None, init=False, repr=False)

    async def get(self) -> DeviceStats:
        current = self._in_flight
        if current is None or current.task.done():
            current = self._in_flight = _InFlight(asyncio.create_task(self._request()))
        current.waiters += 1
        try:
            return await asyncio.shield(current.task)
        finally:
            current.waiters -= 1
            # Cleared at once, not when a cancelled request gets round to ending: a
            # later caller must not join it.
            if self._in_flight is current and (current.task.done() or not current.waiters):
                self._in_flight = None
            if not current.waiters and not current.task.done():
                current.task.cancel()

    async def _request(self) -> DeviceStats:
        return await self.fetch()
