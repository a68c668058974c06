"""The device owner's `network` events, debounced into one callback.

A network change (a new DHCP lease, an uplink going away) makes our candidates stale:
the agent re-gathers and renegotiates. The device owner reads netlink (the agent never
loads pyroute2) and sends a `network` event per change after `watch_network`, already
without changes on the WireGuard device itself and host routes (or every path switch
would trigger the next) and coalesced (kbwg.owner.netlink_watch). Changes come in bursts
(an address, then its routes): the callback runs once things have been quiet for
`debounce_s`. That an address went is also told at once (`on_address_gone`): what
sends from it must stop doing so before the network settles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kbwg.owner.protocol import EVENT_NETWORK

log = logging.getLogger(__name__)

MAX_FIELD_LEN = 64
# The netlink message of an address removed (the owner names changes by them).
ADDRESS_GONE = "RTM_DELADDR"


class NetworkWatcher:
    def __init__(self, on_change: Callable[[], Awaitable[None]],
                 debounce_s: float = 0.5,
                 on_address_gone: Callable[[], None] | None = None) -> None:
        self._on_change = on_change
        self._debounce = debounce_s
        self._on_address_gone = on_address_gone
        self._dirty = asyncio.Event()
        self.changes = 0
        self.bad_events = 0

    def on_event(self, event: dict[str, Any]) -> None:
        """An unsolicited frame from the device owner: `network` ones count, others are
        not ours and are ignored."""
        if event.get("event") != EVENT_NETWORK:
            return
        change, ifname = event.get("change"), event.get("ifname")
        if not isinstance(change, str) or len(change) > MAX_FIELD_LEN or not (
                ifname is None or (isinstance(ifname, str) and len(ifname) <= MAX_FIELD_LEN)):
            self.bad_events += 1
            if self.bad_events in (1, 100):
                log.warning("ignoring a malformed network event from the device owner: %r",
                            event)
            return
        log.debug("network change: %s on %s", change, ifname or "?")
        self.changes += 1
        self._dirty.set()
        if change == ADDRESS_GONE and self._on_address_gone is not None:
            self._on_address_gone()

    async def run(self, subscribe: Callable[[], Awaitable[None]]) -> None:
        """Ask for the events (`subscribe`: the owner's `watch_network`), then call back
        after each quiet burst until cancelled."""
        await subscribe()
        while True:
            await self._dirty.wait()
            # Changes come in bursts (address, then routes): wait for quiet.
            while True:
                self._dirty.clear()
                await asyncio.sleep(self._debounce)
                if not self._dirty.is_set():
                    break
            try:
                await self._on_change()
            except Exception:
                log.exception("handling a network change failed")
