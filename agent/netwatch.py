"""Address, route and link changes from netlink, debounced into one callback.

A network change (a new DHCP lease, an uplink going away) makes our candidates stale:
the agent re-gathers and renegotiates. Changes on the WireGuard device itself (and our
own host routes) are ignored, or every path switch would trigger the next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_LINK

log = logging.getLogger(__name__)

_EVENTS = {"RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWROUTE", "RTM_DELROUTE", "RTM_NEWLINK",
           "RTM_DELLINK"}  # fmt: skip


class NetworkWatcher:
    def __init__(
        self,
        on_change: Callable[[], Awaitable[None]],
        ignore_ifnames: Iterable[str] = (),
        debounce_s: float = 0.5,
    ) -> None:
        self._on_change = on_change
        self._ignore = set(ignore_ifnames)
        self._debounce = debounce_s
        self._names: dict[int, str] = {}

    async def run(self) -> None:
        async with AsyncIPRoute() as ipr:
            await ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_LINK)
            self._names = {link["index"]: link.get("ifname")
                           async for link in await ipr.get_links()}
            dirty = asyncio.Event()
            notifier = asyncio.create_task(self._notify(dirty))
            try:
                while True:  # get() ends after each batch of messages
                    async for msg in ipr.get():
                        if self._relevant(msg):
                            dirty.set()
            finally:
                notifier.cancel()

    def _relevant(self, msg: object) -> bool:
        get = getattr(msg, "get", None)
        event = get("event") if get is not None else None
        if get is None or event not in _EVENTS:
            return False
        is_route = event in ("RTM_NEWROUTE", "RTM_DELROUTE")
        if not is_route and event.endswith("LINK"):
            self._names[get("index")] = get("ifname")
        index = get("oif") if is_route else get("index")
        name = self._names.get(index) if index is not None else None
        if name in self._ignore:
            return False
        if is_route and get("dst_len") == 32:
            return False  # host routes: ours (multi-homed choices) or a peer's
        log.debug("network change: %s on %s", event, name or index)
        return True

    async def _notify(self, dirty: asyncio.Event) -> None:
        while True:
            await dirty.wait()
            # Changes come in bursts (address, then routes): wait for quiet.
            while True:
                dirty.clear()
                await asyncio.sleep(self._debounce)
                if not dirty.is_set():
                    break
            try:
                await self._on_change()
            except Exception:
                log.exception("handling a network change failed")
