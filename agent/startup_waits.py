"""What `join` waits for, instead of failing, while the machine is still booting.

A service manager may start `join` before the Keybase service answers, or
before the network has an IPv4 address. Failing there cost a user the unit's restart
delay (10 s) on top of the boot. So start-up retries those reads: Keybase's quickly
at first, then every few seconds, and all at once when any call finds the service back;
the address every second. Each wait is said once in the log, with what would end it.
What no wait can fix (no keybase binary, a logged-out device, a broken team file) still
ends `join` at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kbwg.agent.join_options import NoAddressToAnnounce
from kbwg.agent.keybase import KeybaseServiceDown
from kbwg.agent.keybase_link import Backoff, KeybaseLink

log = logging.getLogger(__name__)

T = TypeVar("T")

# A service starting at boot answers within seconds: retry soon, then every few seconds.
KEYBASE_RETRY_S = (0.5, 5.0)
ADDRESS_POLL_S = 1.0


@dataclass
class StartupWaits:
    link: KeybaseLink
    _told_keybase: bool = False

    async def keybase(self, read: Callable[[], Awaitable[T]]) -> T:
        """`read()`, again until the Keybase service answers it."""
        backoff = Backoff(*KEYBASE_RETRY_S)
        while True:
            try:
                return await read()
            except KeybaseServiceDown:
                if not self._told_keybase:
                    self._told_keybase = True
                    log.warning("waiting for the Keybase service before joining: start it "
                                "(`run_keybase`, or `systemctl --user start keybase kbfs`), "
                                "or stop with Ctrl-C")
                await self.link.until_back(backoff.next())

    @staticmethod
    async def address(find: Callable[[], Awaitable[T]]) -> T:
        """`find()`, again every ADDRESS_POLL_S until the host has an address to announce."""
        loop = asyncio.get_running_loop()
        since: float | None = None
        while True:
            try:
                found = await find()
            except NoAddressToAnnounce as exc:
                if since is None:
                    since = loop.time()
                    log.warning("%s; waiting for one (or stop with Ctrl-C)", exc)
                await asyncio.sleep(ADDRESS_POLL_S)
                continue
            if since is not None:
                log.warning("an IPv4 address to announce came up after %.0fs; joining",
                            loop.time() - since)
            return found
