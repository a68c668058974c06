"""The order in which a chosen direct pair reaches WireGuard and the routing table.

wireguard-go sends a keepalive (so its handshake) as soon as a peer has an endpoint and
a keepalive. Sent before the host route of a multi-homed choice exists, it leaves
through the default uplink; the peer then answers there and wireguard-go pins that
uplink as its source, overriding the route. So the endpoint goes in quietly, the route
next, the keepalive last. And only one end starts at once: initiations sent by both ends
together cross and each side rejects the answer to its own, so the end with the higher
key holds its endpoint back a moment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kbwg.agent import peer_sync as peer_sync_module
from kbwg.agent.connectivity import Route
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.runtime_state import NEGOTIATED, PeerState
from kbwg.core.identity import DeviceId

KEY = "bob-key"
# Ours sorts before the peer's: this end starts the handshake at once.
FIRST_KEY, SECOND_KEY = "alice-key", "carol-key"
ENDPOINT = "203.0.113.12:51820"
KEEPALIVE = 25


@dataclass
class Recorder:
    """The device owner and the connectivity layer, writing to one log of calls."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    relayed: bool = False
    route_sentence: str | None = "host route 203.0.113.12/32 via 198.18.2.1 dev eth1"
    pin_fails: bool = False

    async def set_peer(self, public_key: str, endpoint: str | None, allowed_ips: list[str],
                       keepalive: int) -> None:
        self.calls.append(("set_peer", (endpoint, keepalive)))

    async def remove_peer(self, public_key: str) -> None:
        self.calls.append(("remove_peer", public_key))

    async def stats(self) -> Any:
        return SimpleNamespace(peers=[])  # no session yet

    async def route(self, peer: str, pair: Any) -> Route:
        return Route(ENDPOINT if not self.relayed else "127.0.0.1:40000",
                     relayed=self.relayed)

    async def pin(self, peer: str, pair: Any, route: Route) -> str | None:
        self.calls.append(("pin", route.endpoint))
        if self.pin_fails:
            raise RuntimeError("owner went away")
        return None if route.relayed else self.route_sentence


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
    await sync.path_chosen(device, cast(Any, object()), "chosen")
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
    await sync.path_chosen(device, cast(Any, object()), "chosen")
    assert rec.calls[-1] == ("set_peer", (ENDPOINT, KEEPALIVE)), rec.calls


async def test_a_failed_pin_still_turns_the_keepalive_on() -> None:
    rec = Recorder(pin_fails=True)
    sync, _, device = make_sync(rec)
    with pytest.raises(RuntimeError):
        await sync.path_chosen(device, cast(Any, object()), "chosen")
    assert rec.calls[-1] == ("set_peer", (ENDPOINT, KEEPALIVE)), rec.calls


async def test_a_relayed_endpoint_gets_its_keepalive_at_once() -> None:
    rec = Recorder(relayed=True)
    sync, _, device = make_sync(rec)
    await sync.path_chosen(device, cast(Any, object()), "chosen")
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
    await sync.path_chosen(device, cast(Any, object()), "chosen")
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
    await sync.path_chosen(device, cast(Any, object()), "chosen")
    peer.configured_key = "another-key"  # re-keyed while held
    monkeypatch.setattr(peer_sync_module, "FIRST_HANDSHAKE_HOLD_S", 0.0)
    calls = len(rec.calls)
    await spawned[0]
    assert len(rec.calls) == calls, rec.calls


@pytest.mark.parametrize(("session_state", "restarts"),
                         [("checking", 1), ("offering", 0), ("unanswered", 0)])
async def test_a_moved_announcement_renegotiates_unless_our_offer_is_out(
        session_state: str, restarts: int) -> None:
    from kbwg.agent.announce import Announcement
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
