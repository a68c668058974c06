"""The first WireGuard handshake of a freshly chosen path, with traffic already flowing
both ways, on a model of wireguard-go's handshake rules (virtual clock).

wireguard-go starts a handshake for any packet to a peer without a session (once a peer
has an endpoint), sends at most one initiation per 5 s (REKEY_TIMEOUT; an attempt
without an endpoint counts too), retries after 5 s, answers any initiation from a
configured key at the address it came from, and rejects the answer to its own
initiation once it has answered the peer's (crossed initiations). A peer entry removed
and added again starts afresh, and drops what arrives in between. If both ends give
WireGuard the endpoint at about the same time, their initiations cross and the first
handshake waits for the 5 s retry: only the lower-keyed end may start at once. That
goes for a chosen path and for the announced endpoint given for want of one alike; a
peer running an older agent (the prototype) sets the announced endpoint at once,
whatever the keys, and the held end still connects to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any, cast

import pytest
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.agent import peer_sync as peer_sync_module
from kbwg.agent.announce import Announcement
from kbwg.agent.connectivity import Route
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.peer_sync import CHECKS_AGAIN, NEW_RUN, PeerSync
from kbwg.agent.runtime_state import ANNOUNCED, PeerState
from kbwg.core.identity import DeviceId

pytestmark = VIRTUAL_CLOCK

REKEY_TIMEOUT = 5.0
ONE_WAY_S = 0.004  # the link, each way
OWNER_CALL_S = 0.002  # one request to the device owner and its answer
TRAFFIC_S = 0.02  # a packet to the peer this often (bench/reach.py's pings)
KEEPALIVE = 25


@dataclass
class ModelPeer:
    endpoint: str | None
    keepalive: int
    last_sent: float | None = None  # the last initiation (attempt), for the rate limit
    initiated: bool = False  # an initiation of ours is out (handshakeInitiationCreated)
    responded: bool = False  # we answered the peer's and wait for its first data
    current: bool = False  # a session: data can go
    last_handshake: float = 0.0
    retry: asyncio.TimerHandle | None = None


@dataclass
class ModelWireGuard:
    """One end's wireguard-go, as far as the first handshake goes, and its owner."""

    key: str
    address: str
    retry_jitter: float
    other: ModelWireGuard | None = None
    peers: dict[str, ModelPeer] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    initiations: int = 0
    mute: bool = False  # sends nothing (a peer whose packets never arrive)

    # The device owner (OwnerCalls) ------------------------------------------------------
    async def set_peer(self, public_key: str, endpoint: str | None, allowed_ips: list[str],
                       keepalive: int) -> None:
        await asyncio.sleep(OWNER_CALL_S)
        peer = self.peers.get(public_key)
        if peer is None:
            peer = self.peers[public_key] = ModelPeer(endpoint, 0)
        if endpoint is not None:
            peer.endpoint = endpoint
        turned_on = keepalive and not peer.keepalive
        peer.keepalive = keepalive
        if turned_on and peer.endpoint is not None:
            self.send(public_key)  # wireguard-go sends a keepalive at once

    async def remove_peer(self, public_key: str) -> None:
        await asyncio.sleep(OWNER_CALL_S)
        peer = self.peers.pop(public_key, None)
        if peer is not None and peer.retry is not None:
            peer.retry.cancel()

    async def stats(self) -> Any:
        await asyncio.sleep(OWNER_CALL_S)
        return SimpleNamespace(peers=[
            SimpleNamespace(public_key=k, last_handshake=p.last_handshake, endpoint=p.endpoint)
            for k, p in self.peers.items()])

    # wireguard-go ------------------------------------------------------------------------
    def send(self, public_key: str) -> None:
        """A packet for the peer: without a session, it starts a handshake."""
        peer = self.peers.get(public_key)
        if peer is not None and not peer.current:
            self.initiate(public_key, peer)

    def initiate(self, public_key: str, peer: ModelPeer) -> None:
        t = now()
        if peer.last_sent is not None and t - peer.last_sent < REKEY_TIMEOUT:
            return
        peer.last_sent = t
        if peer.retry is not None:
            peer.retry.cancel()
        peer.retry = asyncio.get_running_loop().call_later(
            REKEY_TIMEOUT + self.retry_jitter, self.send, public_key)
        if peer.endpoint is None:
            return  # "no known endpoint for peer": counted all the same
        peer.initiated, peer.responded = True, False
        self.initiations += 1
        self.deliver("initiation")

    def deliver(self, kind: str) -> None:
        other = self.other
        assert other is not None
        if self.mute:
            return
        asyncio.get_running_loop().call_later(ONE_WAY_S, other.receive, kind, self)

    def receive(self, kind: str, sender: ModelWireGuard) -> None:
        peer = self.peers.get(sender.key)
        if peer is None:
            self.dropped.append(f"{kind} from an unknown key")
            return
        if kind == "initiation":
            peer.endpoint = sender.address  # roaming: answers go where it came from
            peer.initiated, peer.responded = False, True
            self.deliver("response")
        elif kind == "response":
            if not peer.initiated:
                self.dropped.append("response to an initiation no longer ours")
                return
            peer.initiated = False
            self.session(peer)
            self.deliver("data")
        elif kind == "data" and peer.responded:
            peer.responded = False
            self.session(peer)

    def session(self, peer: ModelPeer) -> None:
        peer.current, peer.last_handshake = True, now() + 1.0
        if peer.retry is not None:
            peer.retry.cancel()

    def other_address(self) -> str:
        assert self.other is not None
        return self.other.address

    def connected(self, public_key: str) -> bool:
        peer = self.peers.get(public_key)
        return peer is not None and peer.current


@dataclass
class Paths:
    """Connectivity: the route is the other end's address, direct, nothing to pin."""

    endpoint: str

    async def route(self, peer: str, pair: Any) -> Route:
        return Route(self.endpoint, relayed=False)

    async def pin(self, peer: str, pair: Any, route: Route) -> str | None:
        await asyncio.sleep(OWNER_CALL_S)
        return None


@dataclass
class End:
    wg: ModelWireGuard
    sync: PeerSync
    device: DeviceId
    peer_key: str
    tasks: list[asyncio.Future[Any]]


def make_end(wg: ModelWireGuard, peer_wg: ModelWireGuard) -> End:
    device = DeviceId(peer_wg.key, "dev")
    ip, _, port = peer_wg.address.rpartition(":")
    ann = Announcement(device, ip, int(port), peer_wg.key, msg_id=1, sent_at=0.0)
    peer = PeerState(PeerSpec(device, IPv4Address("100.64.0.2"), ann),
                     configured_key=peer_wg.key, configured_ip="100.64.0.2/32")
    state = SimpleNamespace(peers={device: peer}, public_key=wg.key)
    options = SimpleNamespace(keepalive_s=KEEPALIVE)
    tasks: list[asyncio.Future[Any]] = []
    sync = PeerSync(cast(Any, wg), cast(Any, state), cast(Any, None),
                    cast(Any, Paths(peer_wg.address)), None, cast(Any, None),
                    cast(Any, options), asyncio.Lock(),
                    lambda c: tasks.append(asyncio.ensure_future(c)))
    return End(wg, sync, device, peer_wg.key, tasks)


async def traffic(wg: ModelWireGuard, public_key: str, offset: float) -> None:
    await asyncio.sleep(offset)
    while True:
        wg.send(public_key)
        await asyncio.sleep(TRAFFIC_S)


Choose = Callable[[End], Awaitable[None]]


async def choose_path(end: End) -> None:
    """Negotiation chose the pair (the route is the peer's address), RTT not measured."""
    await end.sync.path_chosen(end.device, cast(Any, SimpleNamespace(rtt_ms=None)), "chosen")


async def choose_measured_path(end: End) -> None:
    """The same, a pair whose RTT the checks measured (the link's round trip)."""
    pair = SimpleNamespace(rtt_ms=2 * ONE_WAY_S * 1000.0)
    await end.sync.path_chosen(end.device, cast(Any, pair), "chosen")


async def announced_fallback(end: End) -> None:
    """No path chosen in time (or no negotiation): the announced endpoint."""
    await end.sync._announced_fallback(end.device, end.peer_key)


async def prototype(end: End) -> None:
    """An older agent: the peer entry made when it reads the announcement, with the
    announced endpoint and the keepalive, whatever the keys (its PeerSync is not used):
    a fresh entry, whose handshake goes at once."""
    await end.wg.remove_peer(end.peer_key)
    await end.wg.set_peer(end.peer_key, end.wg.other_address(), ["100.64.0.2/32"],
                          KEEPALIVE)


async def first_handshake(offsets: tuple[float, float], chosen_gap: float,
                          peer_answers: bool = True,
                          choose: tuple[Choose, Choose] = (choose_path, choose_path),
                          ) -> tuple[float, End, End]:
    """Both ends configured without an endpoint (as sync does), their traffic already
    running; then both choose the path (`chosen_gap` apart; `choose`: how, for the lower-
    and the higher-keyed end): the seconds until both have a session, and the ends."""
    low = ModelWireGuard("alice-key", "198.18.1.10:51820", retry_jitter=0.11)
    high = ModelWireGuard("carol-key", "198.18.1.12:51820", retry_jitter=0.23)
    low.other, high.other = high, low
    a, b = make_end(low, high), make_end(high, low)
    await low.set_peer(high.key, None, ["100.64.0.3/32"], 0)
    await high.set_peer(low.key, None, ["100.64.0.2/32"], 0)
    low.mute = not peer_answers
    runners = [asyncio.ensure_future(traffic(low, high.key, offsets[0])),
               asyncio.ensure_future(traffic(high, low.key, offsets[1]))]
    await asyncio.sleep(0.5)
    start = now()
    try:
        await asyncio.gather(choose[0](a), _later(chosen_gap, choose[1](b)))
        if not peer_answers:
            await advance_until(lambda: high.initiations > 0, timeout=10.0,
                                what="the higher end's own handshake")
            return now() - start, a, b
        await advance_until(lambda: low.connected(high.key) and high.connected(low.key),
                            timeout=30.0, what="a session at both ends")
        took = now() - start
        await advance_until(lambda: all(t.done() for t in b.tasks), timeout=5.0,
                            what="the held path set")
        return took, a, b
    finally:
        for task in [*runners, *a.tasks, *b.tasks]:
            task.cancel()
        await asyncio.gather(*runners, *a.tasks, *b.tasks, return_exceptions=True)
        for wg in (low, high):
            for peer in wg.peers.values():
                if peer.retry is not None:
                    peer.retry.cancel()


async def _later(delay: float, coro: Any) -> None:
    await asyncio.sleep(delay)
    await coro


@pytest.mark.parametrize("chosen_gap", [0.0, 0.001, 0.003, 0.006, 0.02, 0.05])
@pytest.mark.parametrize("offsets", [(0.0, 0.0), (0.0, 0.007), (0.013, 0.002)])
async def test_paths_chosen_together_make_a_session_without_waiting_for_a_retry(
        offsets: tuple[float, float], chosen_gap: float) -> None:
    took, a, b = await first_handshake(offsets, chosen_gap)
    assert took < 1.0, (took, a.wg.dropped, b.wg.dropped)
    # The first end's initiation did it: none crossed, none met a removed entry.
    assert not a.wg.dropped and not b.wg.dropped, (a.wg.dropped, b.wg.dropped)


async def test_the_higher_keyed_end_takes_the_session_as_it_is() -> None:
    """Once the first end's handshake made the session, the held end sets its endpoint
    on the entry it has (a removal would end that session) and turns its keepalive on."""
    took, a, b = await first_handshake((0.0, 0.0), 0.0)
    assert b.sync.held == {}
    peer = b.sync._state.peers[b.device]
    assert peer.endpoint == a.wg.address
    wg_peer = b.wg.peers[a.wg.key]
    assert (wg_peer.endpoint, wg_peer.current) == (a.wg.address, True)
    # Held at most until about a poll after the session; never the whole hold.
    assert took < peer_sync_module.FIRST_HANDSHAKE_HOLD_S
    assert wg_peer.keepalive == KEEPALIVE


async def test_without_the_first_ends_handshake_the_held_end_starts_its_own() -> None:
    took, a, b = await first_handshake((0.0, 0.0), 0.0, peer_answers=False)
    hold = peer_sync_module.FIRST_HANDSHAKE_HOLD_S
    # After the hold, and not after wireguard-go's 5 s rate limit of its failed attempt
    # without an endpoint: the entry is fresh.
    assert hold <= took < hold + 0.5, took
    assert b.sync.held == {}
    assert b.wg.peers[a.wg.key].keepalive == KEEPALIVE


async def test_on_a_measured_path_the_hold_is_a_floor_and_a_few_rtts() -> None:
    """The first end's initiation was lost (a relayed side's proxy came up just after
    it arrived): the held end starts its own after about a second, not the whole hold."""
    took, _, _ = await first_handshake((0.0, 0.0), 0.0, peer_answers=False,
                                       choose=(choose_measured_path, choose_measured_path))
    hold = peer_sync_module.HOLD_FLOOR_S + peer_sync_module.HOLD_RTTS * 2 * ONE_WAY_S
    assert hold < peer_sync_module.FIRST_HANDSHAKE_HOLD_S
    assert hold <= took < hold + 0.5, took
    # A slow path waits longer, never past the bound.
    slow = SimpleNamespace(rtt_ms=600.0)
    assert peer_sync_module.HeldPath("k", cast(Any, slow), None, "").hold_s() == \
        peer_sync_module.FIRST_HANDSHAKE_HOLD_S


@pytest.mark.parametrize("gap", [0.0, 0.001, 0.003, 0.006, 0.02, 0.05])
@pytest.mark.parametrize("offsets", [(0.0, 0.0), (0.0, 0.007), (0.013, 0.002)])
async def test_announced_endpoints_given_together_make_a_session_without_a_retry(
        offsets: tuple[float, float], gap: float) -> None:
    """Both fallbacks at about the same time (both peers configured together; at once
    without negotiation): only the lower-keyed end starts."""
    took, a, b = await first_handshake(offsets, gap,
                                       choose=(announced_fallback, announced_fallback))
    assert took < 1.0, (took, a.wg.dropped, b.wg.dropped)
    assert not a.wg.dropped and not b.wg.dropped, (a.wg.dropped, b.wg.dropped)
    held_end = b.sync._state.peers[b.device]
    assert (held_end.endpoint, held_end.endpoint_source) == (a.wg.address, ANNOUNCED)
    assert b.wg.peers[a.wg.key].keepalive == KEEPALIVE


@pytest.mark.parametrize("gap", [0.0, 0.003, 3.0])
async def test_a_prototype_peer_that_starts_at_once_is_answered_not_crossed(
        gap: float) -> None:
    """The lower-keyed peer runs an older agent: it sets our announced endpoint as soon
    as it reads it. Ours (higher-keyed) falls back at about the same time (without
    negotiation) or the grace period later, and takes the session its handshake made."""
    took, a, b = await first_handshake((0.0, 0.0), gap,
                                       choose=(prototype, announced_fallback))
    assert took < 1.0 + (gap if gap > 1.0 else 0.0), (took, a.wg.dropped, b.wg.dropped)
    assert not a.wg.dropped and not b.wg.dropped, (a.wg.dropped, b.wg.dropped)
    assert b.wg.initiations == 0  # the session was the peer's; ours never crossed it
    assert b.sync._state.peers[b.device].endpoint == a.wg.address


@pytest.mark.parametrize("lower", [announced_fallback, prototype])
async def test_without_the_peers_handshake_the_held_fallback_starts_its_own(
        lower: Choose) -> None:
    """The hold is bounded: a peer whose handshakes never arrive (an older agent behind
    a NAT, say) still gets ours, a fresh entry's, right after it."""
    took, a, b = await first_handshake((0.0, 0.0), 0.0, peer_answers=False,
                                       choose=(lower, announced_fallback))
    hold = peer_sync_module.FIRST_HANDSHAKE_HOLD_S
    assert hold <= took < hold + 0.5, took
    assert b.sync.held == {}
    assert b.wg.peers[a.wg.key].keepalive == KEEPALIVE


async def test_a_path_chosen_while_the_announced_endpoint_is_held_takes_its_place(
) -> None:
    """One hold per peer: the negotiated path replaces the held announced endpoint,
    and goes to WireGuard once the peer's handshake made a session."""
    took, a, b = await first_handshake(
        (0.0, 0.0), 0.01, choose=(choose_path, _fallback_then_path))
    assert took < 1.0, (took, a.wg.dropped, b.wg.dropped)
    assert len(b.tasks) == 1, b.tasks  # one hold, not one per choice
    peer = b.sync._state.peers[b.device]
    assert (peer.endpoint, peer.endpoint_source) == (a.wg.address, "negotiated")


async def _fallback_then_path(end: End) -> None:
    await announced_fallback(end)
    assert end.device in end.sync.held
    await choose_path(end)


def _both_connected(x: ModelWireGuard, y: ModelWireGuard) -> bool:
    return x.connected(y.key) and y.connected(x.key)


async def test_a_peer_killed_and_started_again_gets_our_handshake_on_its_new_run() -> None:
    """The higher-keyed end is killed and starts again (no bye): the lower-keyed end's
    WireGuard still has a session with its old run and never starts a handshake, so
    the new run, holding its endpoint for ours, waited out the hold. Told of the new
    run (its first sealed message), the lower end renews its entry: its handshake goes
    at once. The same restart's other sign (its early checks) renews nothing more once
    that handshake came; a restart after it renews again."""
    _took, a, b = await first_handshake((0.0, 0.0), 0.0)
    low, old_high = a.wg, b.wg
    wgs, ends, runners = [old_high], [b], []
    try:
        for sign, other_sign in ((NEW_RUN, CHECKS_AGAIN), (CHECKS_AGAIN, NEW_RUN)):
            assert low.connected(old_high.key)
            high = ModelWireGuard(old_high.key, old_high.address, retry_jitter=0.23)
            low.other, high.other = high, low
            wgs.append(high)
            reborn = make_end(high, low)
            ends.append(reborn)
            await high.set_peer(low.key, None, ["100.64.0.2/32"], 0)
            runners += [asyncio.ensure_future(traffic(low, high.key, 0.0)),
                        asyncio.ensure_future(traffic(high, low.key, 0.0))]
            start = now()
            await choose_measured_path(reborn)
            assert reborn.sync.held  # the new run holds its endpoint for ours
            await a.sync.peer_checks_again(a.device, sign)
            await advance_until(partial(_both_connected, low, high),
                                timeout=10.0, what="a session with the new run")
            assert now() - start < peer_sync_module.HOLD_FLOOR_S
            assert high.initiations == 0  # ours did it, not the new run's after its hold
            made = low.initiations
            await a.sync.peer_checks_again(a.device, other_sign)
            assert low.connected(high.key) and low.initiations == made
            old_high = high
    finally:
        for task in [*runners, *a.tasks, *(t for e in ends for t in e.tasks)]:
            task.cancel()
        await asyncio.gather(*runners, *a.tasks, *(t for e in ends for t in e.tasks),
                             return_exceptions=True)
        for wg in (low, *wgs):
            for peer in wg.peers.values():
                if peer.retry is not None:
                    peer.retry.cancel()


async def test_a_session_without_a_path_asks_the_early_checks_for_theirs() -> None:
    low = ModelWireGuard("alice-key", "198.18.1.10:51820", retry_jitter=0.11)
    high = ModelWireGuard("carol-key", "198.18.1.12:51820", retry_jitter=0.23)
    low.other, high.other = high, low
    end = make_end(low, high)
    lost: list[DeviceId] = []
    end.sync.early = cast(Any, SimpleNamespace(session_lost=lost.append,
                                               accepts=lambda _d, _e: True))
    await end.sync.path_chosen(end.device, None, "no pair answered")
    assert lost == [end.device]
    # The early checks' own loss is theirs to handle.
    await end.sync.path_chosen(end.device, None, "no pair answered", early=True)
    assert lost == [end.device]
