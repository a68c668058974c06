"""The higher-keyed end holding several peers back at once (peer_sync's hold) polls the
device owner's `stats` for their sessions with one request per poll interval, not one
per held peer: on a busy host those requests queue on the owner pipe ahead of the
connectivity checks' `stun_send` (virtual clock). And SharedStats on its own: joined
waiters share one request's reply or failure, and nothing outlives it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any, cast

import pytest
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.agent import peer_sync as peer_sync_module
from kbwg.agent.announce import Announcement
from kbwg.agent.connectivity import Route
from kbwg.agent.owner_calls import DeviceStats
from kbwg.agent.owner_client import OwnerError
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.peer_sync import FIRST_HANDSHAKE_HOLD_S, PeerSync
from kbwg.agent.runtime_state import NEGOTIATED, PeerState
from kbwg.agent.shared_stats import SharedStats
from kbwg.core.identity import DeviceId

pytestmark = VIRTUAL_CLOCK

MY_KEY = "zed-key"  # higher than every peer's: this end holds back
PEER_KEYS = ["alice-key", "bob-key", "carol-key"]
KEEPALIVE = 25
OWNER_CALL_S = 0.002  # set_peer, remove_peer, pin
TICK = peer_sync_module.HOLD_POLL_S
HOLD = peer_sync_module.FIRST_HANDSHAKE_HOLD_S
# The three peers' paths are chosen this far apart: their holds start out of step.
CHOSEN_AT = [0.0, 0.037, 0.071]


@dataclass
class Owner:
    """The device owner's side of the held end: a `stats` reply takes `reply_s` (on the
    busy host of bench/connect.py's six-device case, about a poll's interval)."""

    reply_s: float
    sessions: dict[str, float] = field(default_factory=dict)  # key -> last handshake
    endpoints: dict[str, str | None] = field(default_factory=dict)
    requests: list[tuple[float, float]] = field(default_factory=list)  # sent, answered
    fail_after: float | None = None  # the first request sent from then on fails
    failed: list[float] = field(default_factory=list)
    set_at: dict[str, float] = field(default_factory=dict)  # key -> endpoint set

    async def stats(self) -> Any:
        sent = now()
        index = len(self.requests)
        self.requests.append((sent, float("inf")))
        await asyncio.sleep(self.reply_s)
        self.requests[index] = (sent, now())
        if self.fail_after is not None and sent >= self.fail_after and not self.failed:
            self.failed.append(sent)
            raise OwnerError("stats: the interface is gone")
        return SimpleNamespace(peers=[
            SimpleNamespace(public_key=k, last_handshake=self.sessions.get(k, 0.0),
                            endpoint=e) for k, e in self.endpoints.items()])

    async def set_peer(self, public_key: str, endpoint: str | None, allowed_ips: list[str],
                       keepalive: int) -> None:
        await asyncio.sleep(OWNER_CALL_S)
        if endpoint is not None:
            self.endpoints[public_key] = endpoint
            self.set_at.setdefault(public_key, now())
        else:
            self.endpoints.setdefault(public_key, None)

    async def remove_peer(self, public_key: str) -> None:
        await asyncio.sleep(OWNER_CALL_S)
        self.endpoints.pop(public_key, None)

    def handshake(self, key: str, endpoint: str) -> None:
        """The peer's handshake made a session (WireGuard roamed to its address)."""
        self.sessions[key], self.endpoints[key] = now() + 1.0, endpoint

    def sent_between(self, start: float, end: float) -> list[tuple[float, float]]:
        return [r for r in self.requests if start <= r[0] < end]


@dataclass
class Paths:
    """Connectivity: each peer's route is its address, direct, nothing to pin."""

    endpoints: dict[str, str]

    async def route(self, peer: str, pair: Any) -> Route:
        return Route(self.endpoints[peer], relayed=False)

    async def pin(self, peer: str, pair: Any, route: Route) -> str | None:
        await asyncio.sleep(OWNER_CALL_S)
        return None


@dataclass
class HeldEnd:
    owner: Owner
    sync: PeerSync
    devices: dict[str, DeviceId]  # key -> device
    endpoints: dict[str, str]  # key -> the peer's address
    tasks: list[asyncio.Task[Any]]

    async def choose(self, key: str) -> None:
        """The checks chose the path to `key`'s device (RTT not measured)."""
        await self.sync.path_chosen(self.devices[key], cast(Any, SimpleNamespace(rtt_ms=None)),
                                    "chosen")

    def endpoint_of(self, key: str) -> str | None:
        return self.sync._state.peers[self.devices[key]].endpoint


def held_end(reply_s: float, keys: list[str]) -> HeldEnd:
    owner = Owner(reply_s)
    peers: dict[DeviceId, PeerState] = {}
    devices: dict[str, DeviceId] = {}
    endpoints: dict[str, str] = {}
    for n, key in enumerate(keys):
        device = devices[key] = DeviceId(key.removesuffix("-key"), "dev")
        endpoints[key] = f"198.18.1.{10 + n}:51820"
        ip, _, port = endpoints[key].rpartition(":")
        ann = Announcement(device, ip, int(port), key, msg_id=1, sent_at=0.0)
        overlay = f"100.64.0.{2 + n}"
        peers[device] = PeerState(PeerSpec(device, IPv4Address(overlay), ann),
                                  configured_key=key, configured_ip=f"{overlay}/32")
        owner.endpoints[key] = None  # configured without an endpoint, as sync does
    state = SimpleNamespace(peers=peers, public_key=MY_KEY)
    tasks: list[asyncio.Task[Any]] = []
    paths = Paths({str(d): endpoints[k] for k, d in devices.items()})
    sync = PeerSync(cast(Any, owner), cast(Any, state), cast(Any, None), cast(Any, paths),
                    None, cast(Any, None), cast(Any, SimpleNamespace(keepalive_s=KEEPALIVE)),
                    asyncio.Lock(), lambda c: tasks.append(asyncio.ensure_future(c)))
    return HeldEnd(owner, sync, devices, endpoints, tasks)


async def hold_three(end: HeldEnd) -> float:
    """The three paths chosen out of step, each held; when the last hold began."""
    start = now()
    for key, at in zip(PEER_KEYS, CHOSEN_AT, strict=True):
        await asyncio.sleep(start + at - now())
        await end.choose(key)
    assert set(end.sync.held) == {end.devices[k] for k in PEER_KEYS}
    assert len(end.tasks) == 3
    return now()


async def finish(end: HeldEnd) -> None:
    for task in end.tasks:
        task.cancel()
    await asyncio.gather(*end.tasks, return_exceptions=True)


async def endpoint_set(end: HeldEnd, key: str) -> None:
    await advance_until(lambda: end.owner.set_at.get(key) is not None, timeout=HOLD,
                        what=f"{key}'s endpoint set")


def overlapping(requests: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Requests sent while another was still unanswered."""
    ordered = sorted(requests)
    return [b for a, b in itertools.pairwise(ordered) if b[0] < a[1]]


# A reply in a few ms (an idle host), and slower than the poll interval (the busy host:
# 107 ms on average there).
@pytest.mark.parametrize("reply_s", [0.002, 0.04, 0.107])
async def test_three_held_peers_poll_with_one_stats_request_per_tick(reply_s: float) -> None:
    end = held_end(reply_s, PEER_KEYS)
    try:
        held_from = await hold_three(end)
        await asyncio.sleep(1.5)
        polls = end.owner.sent_between(held_from, now())
        assert set(end.sync.held) == set(end.devices.values())  # nobody answered yet
        assert not overlapping(polls), polls
        assert len(polls) <= (now() - held_from) / TICK + 1, len(polls)
        assert len(polls) >= (now() - held_from) / (TICK + reply_s) - 1, len(polls)
    finally:
        await finish(end)


@pytest.mark.parametrize("reply_s", [0.002, 0.107])
async def test_each_hold_still_ends_as_soon_as_its_peers_session_appears(
        reply_s: float) -> None:
    """Sessions made by the peers' handshakes at different moments: each held path goes
    to WireGuard at the next poll, the others stay held, and the polls stay about one
    request per tick throughout."""
    end = held_end(reply_s, PEER_KEYS)
    try:
        held_from = await hold_three(end)
        # Each after the one before has been given (the slowest takes about 0.53 s),
        # the last well within its hold.
        session_at = {"alice-key": 0.7, "bob-key": 1.3, "carol-key": 1.9}
        for key, at in session_at.items():
            await asyncio.sleep(held_from + at - now())
            assert now() == pytest.approx(held_from + at)
            end.owner.handshake(key, end.endpoints[key])
            await endpoint_set(end, key)
            # Seen by the first poll sent after the session (after the tick's request
            # in flight, if any: a reply late), then given after the fresh checks (two
            # more replies), the route and the set_peer.
            late = end.owner.set_at[key] - (held_from + at)
            assert late <= TICK + 4 * reply_s + 2 * OWNER_CALL_S + 0.001, (key, late)
            assert end.endpoint_of(key) == end.endpoints[key]
            assert end.sync._state.peers[end.devices[key]].endpoint_source == NEGOTIATED
            waiting = [k for k in PEER_KEYS if k not in end.owner.set_at]
            assert {end.devices[k] for k in waiting} == set(end.sync.held)
        assert not end.sync.held
        requests = end.owner.sent_between(held_from, now())
        # The holds' polls, one per tick (a reply slower than a tick: at the next one
        # after it), plus the fresh checks of the three paths set (WireGuard's
        # endpoint, then whether a session is there to keep).
        poll_every = TICK * math.ceil(reply_s / TICK)
        polls = (now() - held_from) / poll_every + 1
        assert len(requests) <= polls + 2 * 3, (len(requests), polls)
    finally:
        await finish(end)


async def test_a_failed_stats_request_ends_every_hold_that_shared_it() -> None:
    """The shared request's failure ends every hold waiting on it at once: each path goes
    to WireGuard then (as when a hold runs out), rather than the peers staying held and
    never getting an endpoint. The next request is a fresh one, for a path chosen later."""
    reply_s = 0.02
    end = held_end(reply_s, [*PEER_KEYS, "dave-key"])
    try:
        held_from = await hold_three(end)
        end.owner.fail_after = held_from + 0.5
        await advance_until(lambda: all(t.done() for t in end.tasks), timeout=1.0,
                            what="the holds ended")
        assert len(end.owner.failed) == 1
        failed = end.owner.failed[0]
        # One poll for the three holds; what follows it are the fresh checks of _apply.
        assert [r for r in end.owner.requests if r[0] == failed] == [(failed, failed + reply_s)]
        for task in end.tasks:
            assert task.exception() is None, task
        for key in PEER_KEYS:
            assert end.devices[key] not in end.sync.held
            # Right after the failure (the three _apply runs take their turns under the
            # peer lock), not when the hold would have run out.
            assert end.owner.set_at[key] < failed + 0.5 < held_from + FIRST_HANDSHAKE_HOLD_S
            assert end.endpoint_of(key) == end.endpoints[key]

        # Not kept for later: dave's path, chosen after, polls and gets its session.
        await end.choose("dave-key")
        assert end.devices["dave-key"] in end.sync.held
        await asyncio.sleep(0.3)
        session_at = now()
        end.owner.handshake("dave-key", end.endpoints["dave-key"])
        await endpoint_set(end, "dave-key")
        late = end.owner.set_at["dave-key"] - session_at
        assert late <= TICK + 4 * reply_s + 2 * OWNER_CALL_S + 0.001, late
        assert end.endpoint_of("dave-key") == end.endpoints["dave-key"]
        assert end.tasks[-1].done() and end.tasks[-1].exception() is None
    finally:
        await finish(end)


# SharedStats on its own -------------------------------------------------------------------

STATS = DeviceStats(peers=[], listen_port=51820, refusals={})


@dataclass
class Fetch:
    reply_s: float = 0.05
    sent: int = 0
    fail: list[Exception] = field(default_factory=list)  # raised by the next requests

    async def __call__(self) -> DeviceStats:
        self.sent += 1
        failure = self.fail.pop(0) if self.fail else None
        await asyncio.sleep(self.reply_s)
        if failure is not None:
            raise failure
        return DeviceStats(peers=[], listen_port=self.sent, refusals={})


async def test_callers_while_a_request_is_in_flight_join_it() -> None:
    fetch = Fetch()
    shared = SharedStats(fetch)
    first = asyncio.ensure_future(shared.get())
    await asyncio.sleep(0.01)
    joined = await asyncio.gather(first, shared.get(), shared.get())
    assert fetch.sent == 1
    assert [s.listen_port for s in joined] == [1, 1, 1]
    # Answered: the next caller sends its own.
    assert (await shared.get()).listen_port == 2
    assert fetch.sent == 2


async def test_a_failed_request_fails_each_waiter_and_not_the_next_caller() -> None:
    fetch = Fetch(fail=[OwnerError("stats: malformed reply")])
    shared = SharedStats(fetch)
    outcomes = await asyncio.gather(shared.get(), shared.get(), shared.get(),
                                    return_exceptions=True)
    assert fetch.sent == 1
    assert all(isinstance(o, OwnerError) and str(o) == "stats: malformed reply"
               for o in outcomes), outcomes
    assert (await shared.get()).listen_port == 2


async def test_a_cancelled_waiter_leaves_the_request_to_the_others() -> None:
    fetch = Fetch()
    shared = SharedStats(fetch)
    leaving, staying = asyncio.ensure_future(shared.get()), asyncio.ensure_future(shared.get())
    await asyncio.sleep(0.01)
    leaving.cancel()
    assert (await staying).listen_port == 1
    assert leaving.cancelled()
    assert fetch.sent == 1


async def test_a_request_everyone_left_is_dropped_and_never_joined() -> None:
    fetch = Fetch(reply_s=0.05)
    shared = SharedStats(fetch)
    waiters = [asyncio.ensure_future(shared.get()) for _ in range(2)]
    await asyncio.sleep(0.01)
    for waiter in waiters:
        waiter.cancel()
    # In the same step: a new caller does not join the request being cancelled.
    later = asyncio.ensure_future(shared.get())
    await asyncio.gather(*waiters, return_exceptions=True)
    assert (await later).listen_port == 2
    assert fetch.sent == 2
