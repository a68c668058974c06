"""A machine that slept (agent/wake_watch.py): the sleep is told apart from a loaded
machine's noise by the two clocks, and the agent starts over after it: a fresh
WireGuard session with every peer, candidates gathered again, every peer renegotiated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_daemon import FakeOwner, new_key
from test_startup_waits import ANNOUNCE, running_agent
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until

from kbwg.agent import upkeep, wake_watch
from kbwg.agent.wake_watch import CHECK_S, SLEPT_MIN_S, WakeWatch
from kbwg_testing import wait_for

pytestmark = VIRTUAL_CLOCK


class Clocks:
    """CLOCK_MONOTONIC and CLOCK_BOOTTIME as a test moves them."""

    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.slept = 0.0

    def boottime(self) -> float:
        return self.monotonic + 5.0 + self.slept


async def test_a_sleep_is_told_once_and_scheduling_noise_never() -> None:
    clocks = Clocks()
    wakes: list[float] = []

    async def on_wake(slept: float) -> None:
        wakes.append(slept)

    watch = WakeWatch(on_wake, boottime=clocks.boottime, monotonic=lambda: clocks.monotonic)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(CHECK_S * 3)
        # Both clocks move while the machine is awake, however late a look comes.
        clocks.monotonic += 40.0
        clocks.slept += SLEPT_MIN_S - 0.5  # below the threshold: not a sleep
        await asyncio.sleep(CHECK_S * 3)
        assert wakes == []
        clocks.slept += 600.0
        await advance_until(lambda: wakes, timeout=CHECK_S * 2, what="the wake")
        await asyncio.sleep(CHECK_S * 5)
        assert wakes == [600.0]
    finally:
        task.cancel()


async def test_a_failed_start_over_is_logged_and_the_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clocks = Clocks()
    wakes: list[float] = []

    async def on_wake(slept: float) -> None:
        wakes.append(slept)
        if len(wakes) == 1:
            raise RuntimeError("owner gone for a moment")

    watch = WakeWatch(on_wake, boottime=clocks.boottime, monotonic=lambda: clocks.monotonic)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(CHECK_S * 2)
        clocks.slept += 30.0
        await advance_until(lambda: len(wakes) == 1, timeout=CHECK_S * 2, what="a wake")
        clocks.slept += 90.0
        await advance_until(lambda: len(wakes) == 2, timeout=CHECK_S * 2, what="the next")
        assert wakes == [30.0, 90.0] and not task.done()
        assert "starting over after a sleep of 30s failed" in caplog.text
    finally:
        task.cancel()


@REAL_CLOCK
async def test_after_a_sleep_each_peer_gets_a_fresh_session_and_a_new_offer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    # No periodic refresh in the test's time: only the wake reads the team's news.
    monkeypatch.setattr(upkeep, "FIRST_REFRESH_S", 3600.0)
    owner = FakeOwner()
    async with running_agent(tmp_path, owner, "198.18.0.5") as run:
        device = await run.joins()
        key = new_key()
        await run.bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
        await wait_for(lambda: owner.peers.get(key, {}).get("endpoint"), "bob configured",
                       timeout=30)
        endpoint = owner.peers[key]["endpoint"]
        negotiator = device.negotiator
        assert negotiator is not None
        offers: list[bool] = []
        refreshes: list[bool] = []
        monkeypatch.setattr(negotiator, "restart_all", lambda: _record(offers))
        keybase_upkeep = device.upkeep._keybase
        monkeypatch.setattr(keybase_upkeep, "refresh", lambda due: _record(refreshes))
        before = len(owner.calls)

        # The running agent's watch reads the clocks through this module's `time`.
        slept = SimpleNamespace(s=0.0)

        def clock_gettime(clock: int) -> float:
            extra = slept.s if clock == time.CLOCK_BOOTTIME else 0.0
            return time.clock_gettime(clock) + extra

        monkeypatch.setattr(wake_watch, "time", SimpleNamespace(
            clock_gettime=clock_gettime, CLOCK_BOOTTIME=time.CLOCK_BOOTTIME,
            CLOCK_MONOTONIC=time.CLOCK_MONOTONIC))
        slept.s = 300.0
        await wait_for(lambda: refreshes, "the team's news read after the wake", timeout=30)
        assert offers, "every peer renegotiated"
        ops = [(op, args.get("public_key")) for op, args in owner.calls[before:]
               if op in ("remove_peer", "set_peer")]
        assert ops == [("remove_peer", key), ("set_peer", key)], ops
        assert owner.peers[key]["endpoint"] == endpoint
        assert owner.peers[key]["allowed_ips"] == ["100.64.0.2/32"]
        assert "this machine slept for about 300s" in caplog.text


async def _record(calls: list[bool]) -> bool:
    calls.append(True)
    return False
