"""A peer's path choices reach WireGuard in the order they were made.

Choices come as separate tasks (one per selection), and applying one awaits the relay
proxy, the device owner and the host route. A renomination a few ms after the last
choice (the controlling side switching and switching back, or the early checks then the
session) must not be undone by the older choice finishing last: WireGuard then sends to
a path the peer has left, while the proxy of the one it uses is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from test_path_pinning import Recorder, make_sync

from kbwg.agent.connectivity import Route

ENDPOINTS = {"A": "203.0.113.12:51820", "B": "203.0.113.13:51820",
             "C": "203.0.113.14:51820"}


@dataclass
class SlowRoutes(Recorder):
    """Routes pair A only once `release` is set (its relay proxy opening slowly)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    routed: list[str] = field(default_factory=list)

    async def route(self, peer: str, pair: Any) -> Route:
        self.routed.append(pair.name)
        if pair.name == "A":
            await self.release.wait()
        return Route(ENDPOINTS[pair.name], relayed=False)


def pair(name: str) -> Any:
    return cast(Any, SimpleNamespace(name=name, rtt_ms=None))


async def behind_a(sync: Any, device: Any, *names: str) -> list[asyncio.Task[None]]:
    """Choice A, routing (until `release`), then a choice per name, all waiting on it."""
    tasks = [asyncio.create_task(sync.path_chosen(device, pair("A"), "chosen A"))]
    await asyncio.sleep(0)  # A is routing
    tasks += [asyncio.create_task(sync.path_chosen(device, pair(name), f"switched to {name}"))
              for name in names]
    for _ in range(5):
        await asyncio.sleep(0)
    return tasks


async def test_a_later_choice_is_not_undone_by_an_earlier_one_finishing_last() -> None:
    rec = SlowRoutes()
    sync, peer, device = make_sync(rec)
    tasks = await behind_a(sync, device, "B")
    rec.release.set()
    await asyncio.gather(*tasks)
    assert rec.routed == ["A", "B"]
    assert peer.endpoint == ENDPOINTS["B"] and rec.wg_endpoint == ENDPOINTS["B"]


async def test_a_choice_overtaken_while_it_waited_is_skipped() -> None:
    rec = SlowRoutes()
    sync, peer, device = make_sync(rec)
    tasks = await behind_a(sync, device, "B", "C")
    rec.release.set()
    await asyncio.gather(*tasks)
    assert rec.routed == ["A", "C"]  # B's relay proxy is never opened only to close
    assert peer.endpoint == ENDPOINTS["C"] and rec.wg_endpoint == ENDPOINTS["C"]


@dataclass
class ForgettingRoutes(SlowRoutes):
    forgotten: list[str] = field(default_factory=list)

    async def forget(self, peer: str) -> None:
        self.forgotten.append(peer)


async def test_a_peer_dropped_while_its_choices_wait_gets_none_of_them() -> None:
    rec = ForgettingRoutes()
    sync, peer, device = make_sync(rec)
    tasks = await behind_a(sync, device, "B")
    state = cast(Any, sync)._state
    await cast(Any, sync)._drop(state.peers.pop(device), "no longer a peer")
    rec.release.set()
    await asyncio.gather(*tasks)
    assert rec.routed == ["A"]  # B waited and is for nobody now
    # The drop forgot the peer's paths, and A's route, done after it, is undone too
    # (a relay proxy it opened would stay open for nobody).
    assert rec.forgotten == [peer.name, peer.name]
    assert rec.wg_endpoint is None
