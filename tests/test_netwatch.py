"""The agent's network watch: the device owner's `network` events (it reads netlink, the
agent does not), debounced into one re-gathering per burst; other and malformed events
are ignored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.agent.netwatch import NetworkWatcher

pytestmark = VIRTUAL_CLOCK


def network(change: str = "RTM_NEWADDR", ifname: str | None = "eth0") -> dict[str, Any]:
    return {"event": "network", "change": change, "ifname": ifname, "count": 1}


async def test_an_address_gone_is_told_at_once_not_after_the_quiet() -> None:
    gone: list[float] = []
    calls: list[float] = []

    async def on_change() -> None:
        calls.append(now())

    async def subscribe() -> None:
        pass

    watcher = NetworkWatcher(on_change, debounce_s=0.5,
                             on_address_gone=lambda: gone.append(now()))
    task = asyncio.create_task(watcher.run(subscribe))
    start = now()
    watcher.on_event(network("RTM_NEWROUTE"))
    assert gone == []
    watcher.on_event(network("RTM_DELADDR"))
    assert gone == [start]  # before the debounce, which still runs once
    await advance_until(lambda: calls)
    assert calls[0] - start == pytest.approx(0.5, abs=0.01)
    task.cancel()


async def test_a_burst_of_changes_is_one_callback_after_quiet() -> None:
    calls: list[float] = []
    subscribed: list[float] = []

    async def on_change() -> None:
        calls.append(now())

    async def subscribe() -> None:
        subscribed.append(now())

    watcher = NetworkWatcher(on_change, debounce_s=0.5)
    task = asyncio.create_task(watcher.run(subscribe))
    await advance_until(lambda: subscribed)
    start = now()
    for _ in range(3):  # an address, then its routes, 0.2 s apart
        watcher.on_event(network())
        await asyncio.sleep(0.2)
    await advance_until(lambda: calls)
    await asyncio.sleep(2.0)
    # Quiet is looked for every half second: 0.5 s saw changes since, 1.0 s none.
    assert len(calls) == 1 and calls[0] - start == pytest.approx(1.0, abs=0.01)
    # The next change is a new burst.
    watcher.on_event(network("RTM_DELROUTE", None))
    await advance_until(lambda: len(calls) == 2)
    assert watcher.changes == 4
    task.cancel()


async def test_other_and_malformed_events_change_nothing() -> None:
    calls: list[float] = []

    async def on_change() -> None:
        calls.append(now())

    async def subscribe() -> None:
        pass

    watcher = NetworkWatcher(on_change)
    task = asyncio.create_task(watcher.run(subscribe))
    for event in ({"event": "stun", "src": "198.18.0.1:1"}, {"event": "link"},
                  {"event": "network"}, {"event": "network", "change": 5},
                  {"event": "network", "change": "RTM_NEWADDR", "ifname": 3},
                  {"event": "network", "change": "x" * 500, "ifname": None}):
        watcher.on_event(event)
    await asyncio.sleep(5.0)
    assert calls == [] and watcher.changes == 0 and watcher.bad_events == 4
    task.cancel()


async def test_a_failing_callback_does_not_stop_the_watch() -> None:
    calls: list[float] = []

    async def on_change() -> None:
        calls.append(now())
        raise RuntimeError("regathering failed")

    async def subscribe() -> None:
        pass

    watcher = NetworkWatcher(on_change, debounce_s=0.5)
    task = asyncio.create_task(watcher.run(subscribe))
    watcher.on_event(network())
    await advance_until(lambda: len(calls) == 1)
    watcher.on_event(network())
    await advance_until(lambda: len(calls) == 2)
    assert not task.done()
    task.cancel()


async def test_upkeep_subscribes_and_regathers_on_the_owners_events() -> None:
    """Upkeep's netwatch loop: `watch_network` is asked for, and the owner's events
    (through the shared port's pump) lead to a re-gathering."""
    from test_upkeep import FakeNegotiator, FakePaths, FakePresence

    from kbwg.agent.upkeep import Upkeep

    class Port:
        on_other_event: Any = None

    class Owner:
        watching = 0

        async def watch_network(self) -> None:
            self.watching += 1

    class Keybase:
        rereads = 0

        async def reread(self) -> None:
            self.rereads += 1

    paths = FakePaths([True])
    paths.shared_port = Port()  # type: ignore[attr-defined]
    owner = Owner()
    none: Any = None
    options: Any = type("O", (), {"endpoint": None, "interface": "kbwg0"})()
    keeper = Upkeep(options, none, none, FakePresence(), none, none, paths,  # type: ignore[arg-type]
                    FakeNegotiator(), none, owner=owner)  # type: ignore[arg-type]
    keeper._keybase = Keybase()  # type: ignore[assignment]
    loop = asyncio.create_task(keeper._watch_network())
    await advance_until(lambda: owner.watching == 1)
    paths.shared_port.on_other_event(network())  # type: ignore[attr-defined]
    await advance_until(lambda: paths.regathers == 1)
    assert keeper._keybase.rereads == 1  # type: ignore[attr-defined]
    loop.cancel()
