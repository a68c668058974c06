"""The stats poll's word on traffic: keepalives and handshakes are not traffic, pings are,
and a peer stays busy for ACTIVE_WINDOW_S after them (its checks' pace follows)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from typing import Any

import pytest

from kbwg.agent import device_stats
from kbwg.agent.device_stats import StatsPoll
from kbwg.agent.owner_calls import DeviceStats, PeerCounters
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.runtime_state import ACTIVE_WINDOW_S, AgentState, PeerState
from kbwg.core.identity import DeviceId

KEY = "k" * 43 + "="


class CountingOwner:
    """Answers `stats` with counters the test moves."""

    def __init__(self) -> None:
        self.rx = self.tx = 0

    async def stats(self) -> DeviceStats:
        return DeviceStats([PeerCounters(KEY, None, 1.0, self.rx, self.tx)], 51820, {})

    async def remove_peer(self, key: str) -> None:  # pragma: no cover - not reached
        raise AssertionError(key)


async def test_traffic_is_told_and_keepalives_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(device_stats.time, "monotonic", lambda: clock[0])
    bob = DeviceId("bob", "laptop")
    state = AgentState(me=DeviceId("alice", "pc"), listed=True,
                       overlay_ip=IPv4Address("100.64.0.1"), public_key="x", listen_port=51820,
                       interface="kbwg0", backend="userspace", announced_endpoint="")
    state.peers[bob] = PeerState(PeerSpec(bob, IPv4Address("100.64.0.2"), None),
                                 configured_key=KEY)
    owner = CountingOwner()
    told: list[tuple[DeviceId, bool]] = []
    poll = StatsPoll(owner, state, 25, asyncio.Lock(),  # type: ignore[arg-type]
                     lambda device, active: told.append((device, active)))

    async def step(rx: int, tx: int, seconds: float = 5.0) -> bool:
        owner.rx += rx
        owner.tx += tx
        clock[0] += seconds
        await poll.poll()
        return told[-1][1]

    assert await step(0, 0) is False  # nothing yet
    assert await step(32, 32) is False  # a keepalive each way
    assert await step(148, 92) is False  # a handshake
    assert await step(5 * 116, 5 * 116) is True  # a ping a second
    assert await step(32, 0, ACTIVE_WINDOW_S - 1) is True  # still within the window
    assert await step(0, 0, 2) is False  # the window has passed
    assert {device for device, _ in told} == {bob}


def test_a_peer_with_no_traffic_seen_is_not_busy() -> None:
    peer: Any = PeerState(PeerSpec(DeviceId("bob", "laptop"), IPv4Address("100.64.0.2"), None))
    assert not peer.busy(0.0)
