"""The order in which a chosen direct pair reaches WireGuard and the routing table.

wireguard-go sends a keepalive (so its handshake) as soon as a peer has an endpoint and
a keepalive. Sent before the host route of a multi-homed choice exists, it leaves
through the default uplink; the peer then answers there and wireguard-go pins that
uplink as its source, overriding the route. So the endpoint goes in quietly, the route
next, the keepalive last. And only one end starts at once: initiations sent by both ends
together cross and each side rejects the answer to its own, so the end with the higher
key holds its endpoint back a moment. When that end's WireGuard already sends to the chosen
address (the first end's handshake came from it), the route goes first: setting the
endpoint makes wireguard-go forget its source address, and the device owner routes
towards a current endpoint only, which it then already is.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kbwg.agent import peer_sync as peer_sync_module
from kbwg.agent.announce import Announcement
from kbwg.agent.connectivity import Route
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.runtime_state import ANNOUNCED, NEGOTIATED, PeerState
from kbwg.core.identity import DeviceId

KEY = "bob-key"
# Ours sorts before the peer's: this end starts the handshake at once.
FIRST_KEY, SECOND_KEY = "alice-key", "carol-key"
ENDPOINT = "203.0.113.12:51820"
ANNOUNCED_AT = "198.51.100.7:51820"  # the announced endpoint, where no path was chosen
KEEPALIVE = 25
# A chosen pair whose RTT the checks did not measure: held for the whole bound.
UNMEASURED = SimpleNamespace(rtt_ms=None)


@dataclass
class Recorder:
    """The device owner and the connectivity layer, writing to one log of calls."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    relayed: bool = False
    route_sentence: str | None = "host route 203.0.113.12/32 via 198.18.2.1 dev eth1"
    pin_fails: bool = False
    # WireGuard's entry: where it sends (roaming moves it too) and whether a handshake
    # made a session.
    wg_endpoint: str | None = None
    session: bool = False

    async def set_peer(self, public_key: str, endpoint: str | None, allowed_ips: list[str],
                       keepalive: int) -> None:
        self.calls.append(("set_peer", (endpoint, keepalive)))
        if endpoint is not None:
            self.wg_endpoint = endpoint

    async def remove_peer(self, public_key: str) -> None:
        self.calls.append(("remove_peer", public_key))
        self.wg_endpoint, self.session = None, False

    async def stats(self) -> Any:
        return SimpleNamespace(peers=[SimpleNamespace(
            public_key=KEY, endpoint=self.wg_endpoint, last_handshake=float(self.session))])

    async def route(self, peer: str, pair: Any) -> Route:
        return Route(ENDPOINT if not self.relayed else "127.0.0.1:40000",
                     relayed=self.relayed)

    async def pin(self, peer: str, pair: Any, route: Route) -> str | None:
        if self.pin_fails:
            self.calls.append(("pin", route.endpoint))
            raise RuntimeError("owner went away")
        if route.relayed:
            self.calls.append(("pin", route.endpoint))
            return None
        if self.wg_endpoint is None or host(self.wg_endpoint) != host(route.endpoint):
            # The device owner's rule (owner/guard.py): a current peer endpoint only.
            self.calls.append(("pin refused", route.endpoint))
            return None
        self.calls.append(("pin", route.endpoint))
        return self.route_sentence


def host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


def announced_at(peer: PeerState, device: DeviceId, endpoint: str) -> None:
    """The peer's announcement (message 7) gives `endpoint`."""
    ip, _, port = endpoint.rpartition(":")
    peer.spec = PeerSpec(device, IPv4Address("100.64.0.2"),
                         Announcement(device, ip, int(port), KEY, msg_id=7, sent_at=0.0))


def make_sync(rec: Recorder, our_key: str = FIRST_KEY,
              spawned: list[Any] | None = None) -> tuple[PeerSync, PeerState, DeviceId]:
    device = DeviceId("bob", "desk")
    peer = PeerState(PeerSpec(device, IPv4Address("100.64.0.2"), None),
                     configured_key=KEY, configured_ip="100.64.0.2/32")
    state = SimpleNamespace(peers={device: peer}, public_key=our_key)
    options = SimpleNamespace(keepalive_s=KEEPALIVE)
    spawn = spawned.append if spawned is not None else lambda c: c.close()
    sync = PeerSync(cast(Any, rec), cast(Any, state), cast(Any, None), cast(Any, rec), None,
                    cast(Any, None), cast(Any, options), asyncio.Lock(), spawn)
    return sync, peer, device


async def test_the_keepalive_starts_only_once_the_host_route_is_in() -> None:
    rec = Recorder()
    sync, peer, device = make_sync(rec)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    sets = [i for i, (op, _) in enumerate(rec.calls) if op == "set_peer"]
    pin = rec.calls.index(("pin", ENDPOINT))
    assert rec.calls[sets[0]] == ("set_peer", (ENDPOINT, 0)), rec.calls
    assert sets[0] < pin < sets[-1], rec.calls
    assert rec.calls[sets[-1]] == ("set_peer", (ENDPOINT, KEEPALIVE))
    assert all(args[1] == 0 for op, args in rec.calls[:pin] if op == "set_peer")
    assert (peer.endpoint, peer.endpoint_source, peer.route) == (
        ENDPOINT, NEGOTIATED, rec.route_sentence)


async def test_without_a_host_route_the_keepalive_is_still_turned_on() -> None:
    rec = Recorder(route_sentence=None)
    sync, _, device = make_sync(rec)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert rec.calls[-1] == ("set_peer", (ENDPOINT, KEEPALIVE)), rec.calls


async def test_a_failed_pin_still_turns_the_keepalive_on() -> None:
    rec = Recorder(pin_fails=True)
    sync, _, device = make_sync(rec)
    with pytest.raises(RuntimeError):
        await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert rec.calls[-1] == ("set_peer", (ENDPOINT, KEEPALIVE)), rec.calls


async def test_a_relayed_endpoint_gets_its_keepalive_at_once() -> None:
    rec = Recorder(relayed=True)
    sync, _, device = make_sync(rec)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    sets = [args for op, args in rec.calls if op == "set_peer"]
    assert sets == [("127.0.0.1:40000", KEEPALIVE)], rec.calls


@pytest.mark.parametrize("relayed", [False, True])
async def test_the_higher_keyed_end_holds_its_endpoint_back(
    relayed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a session, WireGuard gets nothing to send to until the hold ends (traffic
    would start a handshake as soon as it has an endpoint); then a fresh entry, the
    route, the keepalive (tests/test_first_handshake.py plays it out)."""
    rec = Recorder(relayed=relayed)
    spawned: list[Any] = []
    sync, _, device = make_sync(rec, SECOND_KEY, spawned)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    endpoint = "127.0.0.1:40000" if relayed else ENDPOINT
    assert [op for op, _ in rec.calls if op != "stats"] == [], rec.calls
    (later,) = spawned
    monkeypatch.setattr(peer_sync_module, "FIRST_HANDSHAKE_HOLD_S", 0.0)
    await later
    assert rec.calls[0] == ("remove_peer", KEY), rec.calls
    sets = [args for op, args in rec.calls if op == "set_peer"]
    assert sets[-1] == (endpoint, KEEPALIVE), rec.calls


async def test_a_held_path_of_a_peer_dropped_meanwhile_goes_nowhere(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder()
    spawned: list[Any] = []
    sync, peer, device = make_sync(rec, SECOND_KEY, spawned)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    peer.configured_key = "another-key"  # re-keyed while held
    monkeypatch.setattr(peer_sync_module, "FIRST_HANDSHAKE_HOLD_S", 0.0)
    calls = len(rec.calls)
    await spawned[0]
    assert len(rec.calls) == calls, rec.calls


@pytest.mark.parametrize(("session_state", "restarts"),
                         [("checking", 1), ("offering", 0), ("unanswered", 0)])
async def test_a_moved_announcement_renegotiates_unless_our_offer_is_out(
        session_state: str, restarts: int) -> None:
    from kbwg.negotiation.session import Negotiator as RealNegotiator

    offers: list[str] = []

    class Negotiator:
        """The real restart() rule over a recorded offer()."""

        restart = RealNegotiator.restart

        def __init__(self) -> None:
            self.sessions = {DeviceId("bob", "desk"): SimpleNamespace(state=session_state)}

        async def offer(self, session: Any, kind: str = "offer") -> None:
            offers.append(kind)

    rec = Recorder()
    spawned: list[Any] = []
    sync, peer, device = make_sync(rec, spawned=spawned)
    sync._negotiator = cast(Any, Negotiator())
    sync._options.endpoint = None
    sync._paths = cast(Any, SimpleNamespace(punch=lambda endpoint: None))
    peer.endpoint, peer.endpoint_source = ENDPOINT, NEGOTIATED
    ann = Announcement(device, "203.0.113.99", 51820, KEY, msg_id=7, sent_at=0.0)
    await sync._newer_announcement(peer, ann)
    for coro in spawned:
        await coro
    assert offers == ["restart"] * restarts


@pytest.mark.parametrize("held", [False, True])
async def test_a_session_at_the_chosen_address_gets_its_route_before_the_endpoint(
    held: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The higher-keyed end after the first end's handshake (which came from the chosen
    address): setting the endpoint makes wireguard-go forget the source address of that
    session, so the route is in first; then one call gives endpoint and keepalive (the
    session is kept: no removal)."""
    rec = Recorder()
    spawned: list[Any] = []
    sync, peer, device = make_sync(rec, SECOND_KEY, spawned)

    def first_ends_handshake() -> None:
        rec.wg_endpoint, rec.session = ENDPOINT, True  # WireGuard roamed to it

    if held:
        await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
        assert [op for op, _ in rec.calls] == [], rec.calls
        first_ends_handshake()
        monkeypatch.setattr(peer_sync_module, "HOLD_POLL_S", 0.001)
        await spawned.pop()
    else:
        first_ends_handshake()
        await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert not spawned
    assert rec.calls == [("pin", ENDPOINT), ("set_peer", (ENDPOINT, KEEPALIVE))], rec.calls
    assert (peer.endpoint, peer.endpoint_source, peer.route) == (
        ENDPOINT, NEGOTIATED, rec.route_sentence)


async def test_a_session_elsewhere_gets_the_endpoint_before_the_route() -> None:
    """WireGuard roamed to another address of the peer: the owner would refuse a route
    to the chosen one until it is the endpoint, so the endpoint goes first (quietly)."""
    rec = Recorder(wg_endpoint="198.51.100.7:40000", session=True)
    sync, _, device = make_sync(rec, SECOND_KEY)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert rec.calls == [("set_peer", (ENDPOINT, 0)), ("pin", ENDPOINT),
                         ("set_peer", (ENDPOINT, KEEPALIVE))], rec.calls


async def test_a_moved_route_at_the_same_endpoint_sets_the_endpoint_again() -> None:
    """The pair moved to another uplink, same peer address: the route first, then the
    endpoint set again so WireGuard drops the source address it last used."""
    rec = Recorder(wg_endpoint=ENDPOINT, session=True)
    sync, peer, device = make_sync(rec)
    peer.endpoint, peer.endpoint_source = ENDPOINT, NEGOTIATED
    peer.route = "host route 203.0.113.12/32 via 198.18.3.1 dev eth2"
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert rec.calls == [("pin", ENDPOINT), ("set_peer", (ENDPOINT, KEEPALIVE))], rec.calls
    assert peer.route == rec.route_sentence


async def test_a_held_announced_endpoint_gives_way_to_a_chosen_path(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback and the chosen path share one hold: what goes to WireGuard when it
    ends is the path (tests/test_first_handshake.py plays the handshakes out)."""
    rec = Recorder()
    spawned: list[Any] = []
    sync, peer, device = make_sync(rec, SECOND_KEY, spawned)
    announced_at(peer, device, ANNOUNCED_AT)
    await sync._announced_fallback(device, KEY)
    await sync.path_chosen(device, cast(Any, UNMEASURED), "chosen")
    assert [op for op, _ in rec.calls] == [], rec.calls
    (later,) = spawned
    monkeypatch.setattr(peer_sync_module, "FIRST_HANDSHAKE_HOLD_S", 0.0)
    await later
    assert ("set_peer", (ANNOUNCED_AT, KEEPALIVE)) not in rec.calls, rec.calls
    assert rec.calls[-1] == ("set_peer", (ENDPOINT, KEEPALIVE)), rec.calls
    assert (peer.endpoint, peer.endpoint_source) == (ENDPOINT, NEGOTIATED)


@pytest.mark.parametrize("our_key", [FIRST_KEY, SECOND_KEY])
async def test_a_fallback_after_the_peers_handshake_keeps_where_it_came_from(
    our_key: str
) -> None:
    """The peer's handshake made a session before the fallback (an older agent starts at
    once): WireGuard's endpoint is where it came from, which the announcement need not
    be; it stays, with the source address the session uses (no endpoint in the call),
    and the keepalive goes on."""
    roamed = "198.51.100.9:40001"
    rec = Recorder(wg_endpoint=roamed, session=True)
    spawned: list[Any] = []
    sync, peer, device = make_sync(rec, our_key, spawned)
    announced_at(peer, device, ANNOUNCED_AT)
    await sync._announced_fallback(device, KEY)
    assert not spawned  # no hold: the session is there
    assert rec.calls == [("set_peer", (None, KEEPALIVE))], rec.calls
    assert (peer.endpoint, peer.endpoint_source) == (roamed, ANNOUNCED)


async def test_a_lost_host_address_has_wireguard_pick_its_source_again() -> None:
    """Set again, the endpoint WireGuard has (roamed or not) makes wireguard-go forget
    the source address it used with the peer; a relayed one (our proxy on loopback)
    has no host address to lose."""
    rec = Recorder(wg_endpoint="203.0.113.77:40001")  # roamed away from ours
    sync, peer, _ = make_sync(rec)
    peer.endpoint = ENDPOINT
    await sync.forget_sources()
    assert rec.calls == [("set_peer", ("203.0.113.77:40001", KEEPALIVE))]
    rec.calls.clear()
    rec.wg_endpoint = "127.0.0.1:40000"
    await sync.forget_sources()
    assert rec.calls == []
