"""Noticing that this machine slept (suspend, hibernation), which no other clock says.

The event loop's clock, CLOCK_MONOTONIC, stops while the machine sleeps, and so does
wireguard-go's (Go's monotonic clock): on waking, every timer of the agent and of
WireGuard carries on as if no time had passed. The peers' clocks did not stop. They
gave up on this device's paths, and each refuses a WireGuard session's keys 180 s
after its handshake, so wireguard-go would keep sending under keys its peers dropped
until its own 15 s timeout. Meanwhile this device's NAT may have forgotten its mappings
and its relay allocations may have expired. CLOCK_BOOTTIME counts the sleep: when it has
run ahead of CLOCK_MONOTONIC, the machine slept, and the agent's upkeep starts over
(`Upkeep.on_wake`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# How often the two clocks are compared: a wake is acted on within this.
CHECK_S = 1.0
# A gap this long is a sleep; shorter ones are a loaded machine's scheduling noise
# (the two clocks only part while the machine is suspended).
SLEPT_MIN_S = 3.0


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class WakeWatch:
    on_wake: Callable[[float], Awaitable[None]]
    boottime: Clock = _boottime
    monotonic: Clock = _monotonic
    _offset: float | None = field(default=None, init=False)

    def slept(self) -> float:
        """Seconds slept since the last look (0.0 at the first)."""
        offset = self.boottime() - self.monotonic()
        last, self._offset = self._offset, offset
        return 0.0 if last is None else max(0.0, offset - last)

    async def run(self, every: float = CHECK_S) -> None:
        """Look every `every` seconds until cancelled; `on_wake(seconds slept)` after a
        sleep (a failure is logged, and the watch goes on)."""
        self.slept()
        while True:
            await asyncio.sleep(every)
            slept = self.slept()
            if slept < SLEPT_MIN_S:
                continue
            try:
                await self.on_wake(slept)
            except Exception:
                log.exception("starting over after a sleep of %.0fs failed", slept)
