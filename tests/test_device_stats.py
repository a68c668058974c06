"""The stats poll's word on traffic: keepalives and handshakes are not traffic, a ping
is, in either direction; and traffic that starts between two polls is polled for at
once (the interface's own counters moved while a peer was idle), so that peer's checks
speed up within about half a second rather than at the next 5 s poll."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace

import pytest
from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent import device_stats
from kbwg.agent.device_stats import StatsPoll, interface_packets
from kbwg.agent.owner_calls import DeviceStats, PeerCounters
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.runtime_state import AgentState, PeerState
from kbwg.core.identity import DeviceId

pytestmark = VIRTUAL_CLOCK

KEY = "k" * 43 + "="
BOB = DeviceId("bob", "laptop")
WINDOW = 30.0
NET_DEV = """Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs
    lo: 100 {lo} 0 0 0 0 0 0 100 {lo} 0 0 0 0 0 0
 kbwg0: 5000 {rx} 0 0 0 0 0 0 6000 {tx} 0 0 0 0 0 0
"""


class CountingOwner:
    """Answers `stats` with counters the test moves."""

    def __init__(self) -> None:
        self.rx = self.tx = 0
        self.handshake = 1.0
        self.polls = 0

    async def stats(self) -> DeviceStats:
        self.polls += 1
        return DeviceStats([PeerCounters(KEY, None, self.handshake, self.rx, self.tx)],
                           51820, {})

    async def remove_peer(self, key: str) -> None:  # pragma: no cover - not reached
        raise AssertionError(key)


def agent_state() -> AgentState:
    state = AgentState(me=DeviceId("alice", "pc"), listed=True,
                       overlay_ip=IPv4Address("100.64.0.1"), public_key="x", listen_port=51820,
                       interface="kbwg0", backend="userspace", announced_endpoint="")
    state.peers[BOB] = PeerState(PeerSpec(BOB, IPv4Address("100.64.0.2"), None),
                                 configured_key=KEY, endpoint="203.0.113.20:51820")
    return state


@pytest.fixture
def loop_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll's time.monotonic is the virtual loop's clock."""
    monkeypatch.setattr(device_stats, "time", SimpleNamespace(
        monotonic=lambda: asyncio.get_running_loop().time()))


async def test_traffic_either_way_is_told_and_keepalives_and_handshakes_are_not(
        loop_monotonic: None) -> None:
    owner = CountingOwner()
    told: list[tuple[float, DeviceId]] = []
    poll = StatsPoll(owner, agent_state(), 25, asyncio.Lock(),  # type: ignore[arg-type]
                     lambda device: told.append((now(), device)), WINDOW)

    async def step(rx: int, tx: int, seconds: float = 5.0, handshake: bool = False) -> bool:
        owner.rx += rx
        owner.tx += tx
        owner.handshake += 120.0 if handshake else 0.0
        await asyncio.sleep(seconds)
        count = len(told)
        await poll.poll()
        return len(told) > count

    assert await step(500, 500) is False  # the first look: no earlier counters to compare
    assert await step(32, 32) is False  # a keepalive each way
    assert await step(148 + 32, 92, handshake=True) is False  # a handshake
    assert await step(64, 0) is False  # no more than a keepalive each way could be
    assert await step(128, 128) is True  # one ping exchange
    assert await step(0, 3 * 128) is True  # sending only
    assert await step(3 * 128, 0) is True  # receiving only
    assert await step(32 * 4, 32 * 4, seconds=40.0) is False  # keepalives over 40 s
    assert {device for _, device in told} == {BOB}


async def test_traffic_between_polls_is_polled_for_at_once(
        tmp_path: Path, loop_monotonic: None) -> None:
    net_dev = tmp_path / "dev"
    counters = {"rx": 10, "tx": 10}

    def interface_moves(rx: int = 0, tx: int = 0) -> None:
        counters["rx"] += rx
        counters["tx"] += tx
        net_dev.write_text(NET_DEV.format(lo=7, **counters))

    interface_moves()
    assert interface_packets("kbwg0", str(net_dev)) == 20
    assert interface_packets("kbwg1", str(net_dev)) is None
    assert interface_packets("kbwg0", str(tmp_path / "missing")) is None

    owner = CountingOwner()
    state = agent_state()
    told: list[float] = []
    poll = StatsPoll(owner, state, 25, asyncio.Lock(),  # type: ignore[arg-type]
                     lambda _device: told.append(now()), WINDOW, str(net_dev))
    runner = asyncio.create_task(poll.run(5.0))
    try:
        await asyncio.sleep(12.0)
        assert owner.polls == 3  # every 5 s while nothing moves
        assert poll.early_polls == 0

        # Bob starts pinging us at 12.2 s: the interface moves, the poll comes at once
        # (the next look at the interface, within WATCH_S) instead of at 15 s.
        await asyncio.sleep(0.2)
        owner.rx += 128
        owner.tx += 128
        interface_moves(rx=1, tx=1)
        await asyncio.sleep(0.6)
        assert poll.early_polls == 1 and owner.polls == 4
        assert told and told[-1] - 12.2 <= device_stats.WATCH_S + 0.01

        # While bob is busy, more packets make no early polls: only the regular ones.
        polls = owner.polls
        for _ in range(20):
            owner.rx += 128
            owner.tx += 128
            interface_moves(rx=1, tx=1)
            await asyncio.sleep(0.5)
        assert owner.polls == polls + 2
        assert poll.early_polls == 1

        # Quiet for a window: bob is idle again, and the next packet is news, polled for
        # within a second (early polls come at least EARLY_MIN_S after the last poll).
        await asyncio.sleep(WINDOW + 5.0)
        before, moved_at = len(told), now()
        owner.tx += 128 * 2
        interface_moves(tx=2)
        await asyncio.sleep(device_stats.EARLY_MIN_S + 0.1)
        assert len(told) == before + 1
        assert told[-1] - moved_at <= device_stats.EARLY_MIN_S + 0.01
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_interface_noise_that_is_no_peers_traffic_backs_off(
        tmp_path: Path, loop_monotonic: None) -> None:
    """Packets on the interface that no peer's counters show (the host's own multicast,
    say) make early polls at most every 1, 2, 4, 5 s, not at every look."""
    net_dev = tmp_path / "dev"
    owner = CountingOwner()
    poll = StatsPoll(owner, agent_state(), 25, asyncio.Lock(),  # type: ignore[arg-type]
                     None, WINDOW, str(net_dev))
    packets = [0]

    async def noise() -> None:
        while True:
            packets[0] += 1
            net_dev.write_text(NET_DEV.format(lo=1, rx=packets[0], tx=0))
            await asyncio.sleep(0.25)

    noisy = asyncio.create_task(noise())
    runner = asyncio.create_task(poll.run(5.0))
    try:
        await asyncio.sleep(30.0)
        # Without the back-off: an early poll every second or so (~30).
        assert poll.early_polls <= 9, poll.early_polls
        assert owner.polls <= 15, owner.polls
    finally:
        runner.cancel()
        noisy.cancel()
        await asyncio.gather(runner, noisy, return_exceptions=True)


def test_a_peer_with_no_traffic_seen_is_not_busy() -> None:
    peer = PeerState(PeerSpec(BOB, IPv4Address("100.64.0.2"), None))
    assert not peer.busy(0.0, WINDOW)
    peer.traffic_at = 10.0
    assert peer.busy(39.0, WINDOW) and not peer.busy(40.0, WINDOW)
