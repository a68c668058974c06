"""The device's WireGuard peers, kept in line with the team: who is a peer (peer
selection over peers.json, announcements and claims), with which key and allowed IP,
and at which endpoint.

A peer's endpoint is set only once a pair is chosen (or, for a peer that does not
negotiate, its announced endpoint after a grace period), together with the persistent
keepalive: that makes WireGuard start its handshake at once, towards the right place (for
a direct pair, the keepalive comes once the pair's host route, if it needs one, is in).
Of the two ends of a fresh negotiated path, only the one with the lower public key gives
WireGuard the endpoint at once; the other (with no session yet) holds its endpoint back
for up to FIRST_HANDSHAKE_HOLD_S (on a path of known RTT, HOLD_FLOOR_S and a few RTTs),
until the first end's handshake has made a session.
Both at once, their handshake initiations cross on any link slower than the gap between
them: each side answers the other's and then rejects the answer to its own ("invalid
response"), and the first handshake waits for WireGuard's 5 s retry, which can cross
again. Holding the keepalive back is not enough: any packet to the peer (traffic already
flowing) starts a handshake once WireGuard has an endpoint. Without one, WireGuard still
answers the first end's initiation, at the address it came from. The held end's entry is
not removed and re-added meanwhile either: an initiation arriving between the two would
be dropped as from an unknown key, and the first end would wait for its 5 s retry.
The announced endpoint given for want of a chosen path is held back the same way: both
ends fall back at about the same time (at once when the peer is configured, without
negotiation). A peer running an older agent sets it at once, whatever the keys: its
handshake makes the session the held end takes, and one that never arrives still gets
the held end's own once the hold runs out.
When WireGuard already sends to the chosen address (the peer's handshake came from it),
the host route goes in before the endpoint is set again: setting it makes wireguard-go
forget the source address it used, and until the route is in, a multi-homed host's
packets would leave through the default uplink. The device owner routes only towards a
current endpoint, so otherwise the endpoint goes first (quietly) and the route next.
A newer announcement never moves an endpoint that works (only a sealed negotiation or
WireGuard's authenticated roaming does). Every change of WireGuard peers holds the peer
lock, so the stats poll's reconciliation (device_stats) never sees one half made.
A peer's choices reach WireGuard one at a time, in the order they were made, and one
overtaken while it waited is skipped (`ChoiceOrder`): a renomination a few ms after the
last choice must not be undone by the older one finishing last. Applied out of order,
WireGuard sent to the path the peer had just left while the relay proxy for the one it
now uses was closed, and a transfer stalled for tens of seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kbwg.agent.announce import Announcement
from kbwg.agent.connectivity import Connectivity, Route
from kbwg.agent.early_checks import EarlyChecks
from kbwg.agent.join_options import JoinOptions
from kbwg.agent.owner_calls import OwnerCalls, PeerCounters
from kbwg.agent.owner_client import OwnerError
from kbwg.agent.peer_selection import desired_peers
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import ANNOUNCED, NEGOTIATED, AgentState, PeerState
from kbwg.agent.shared_stats import SharedStats
from kbwg.agent.team_view import TeamView
from kbwg.core.addresses import parse_endpoint
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, object]], None]

# How long the higher-keyed end of a fresh path keeps quiet at most: past a handshake's
# round trip on a slow path, and apart from the first end's 5 s retry if its handshake
# was lost.
FIRST_HANDSHAKE_HOLD_S = 2.5
# On a path of known RTT, the first end's initiation is due within about a round trip
# of our choice (it chose first and nominated, or chooses on our nomination), plus
# scheduling on a busy host: holding longer only delays the path when that initiation
# was lost (a relayed side whose proxy came up just after it arrived). Initiations
# cross only when both are in flight at once, so a late first end costs little.
HOLD_FLOOR_S = 1.0
HOLD_RTTS = 4
# While holding, how often it looks for the session the first end's handshake made (an
# owner round trip each): the path is pinned and its keepalive on soon after. Every held
# peer looks at the same instants (multiples of this on the loop's clock), sharing one
# `stats` request.
HOLD_POLL_S = 0.1
# A peer that restarted says so twice (`peer_checks_again`), its early checks and its
# new run's first sealed message, at most about a chat delivery apart.
CHECKS_AGAIN = "checks us again (it restarted?)"
NEW_RUN = "started a new agent run"
RESTART_SIGNS_S = 10.0


def _on_loopback(endpoint: str) -> bool:
    try:
        return ipaddress.ip_address(parse_endpoint(endpoint)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class HeldPath:
    """A path the higher-keyed end has not given WireGuard yet (the latest choice, for
    the key configured when it was chosen): a chosen pair and its route, or neither for
    the announced endpoint (the fallback; the newest announcement's when it goes)."""

    key: str
    pair: CandidatePair | None
    route: Route | None
    reason: str

    def hold_s(self) -> float:
        """How long to wait for the first end's handshake."""
        rtt_ms = self.pair.rtt_ms if self.pair is not None else None
        if rtt_ms is None:
            return FIRST_HANDSHAKE_HOLD_S
        return min(FIRST_HANDSHAKE_HOLD_S, HOLD_FLOOR_S + HOLD_RTTS * rtt_ms / 1000.0)


@dataclass
class ChoiceOrder:
    """One peer's path choices in the order they were made: `newest` counts them, and
    `applying` lets one at a time change WireGuard and the relay proxies."""

    newest: int = 0
    applying: asyncio.Lock = field(default_factory=asyncio.Lock)


class PeerSync:
    def __init__(self, owner: OwnerCalls, state: AgentState, team: TeamView,
                 paths: Connectivity, negotiator: Negotiator | None, presence: Presence,
                 options: JoinOptions, lock: asyncio.Lock, spawn: Spawn) -> None:
        self._owner = owner
        self._state = state
        self._team = team
        self._paths = paths
        # None when negotiation is off (`negotiate=False`): announced endpoints only.
        self._negotiator = negotiator
        self._presence = presence
        self._options = options
        self._lock = lock
        self._spawn = spawn
        # Checks before the offer/answer (early_checks.py); set by early_wiring.
        self.early: EarlyChecks | None = None
        # Paths chosen while this end holds back for the peer's first handshake.
        self.held: dict[DeviceId, HeldPath] = {}
        self._choices: dict[DeviceId, ChoiceOrder] = {}
        # The holds' polls only (_hold); the owner looked up when a request goes.
        self._held_stats = SharedStats(lambda: self._owner.stats())

    async def sync(self) -> None:
        """Bring the WireGuard peers in line with peers.json, announcements and claims."""
        async with self._lock:
            s, team = self._state, self._team
            now = time.time()
            team.prune(now)
            desired = desired_peers(s.me, team.entries, team.announcements, team.claims,
                                    team.config.policy, now, team.keys, s.public_key)
            for refusal in desired.refusals:
                if team.keys.should_log(refusal.msg_id):
                    log.warning("%s", refusal.describe())
            wanted = desired.peers
            for device in [d for d in s.peers if d not in wanted]:
                await self._drop(s.peers.pop(device), "no longer a peer")
            for device, spec in wanted.items():
                peer = s.peers.get(device)
                if peer is None:
                    peer = s.peers[device] = PeerState(spec)
                peer.spec = spec
            # WireGuard knows one peer per key: a key leaves its old configuration before
            # any device is configured with it (it may move to another device).
            for peer in list(s.peers.values()):
                ann = peer.spec.announcement
                if peer.configured_key and (ann is None or ann.public_key != peer.configured_key):
                    await self._guarded(peer, self._release(
                        peer, "has a new key" if ann else "has no usable key"))
            for peer in list(s.peers.values()):
                await self._guarded(peer, self._configure(peer))
            if self.early is not None:
                self.early.sync(s.peers.values())

    async def _guarded(self, peer: PeerState, step: Coroutine[Any, Any, None]) -> None:
        """One peer's step; a refusal by the device owner (team input its policy does not
        allow) leaves that peer as it is instead of stopping the agent."""
        try:
            await step
        except OwnerError as exc:
            log.warning("%s: the device owner refused to configure it (%s); retrying at the "
                        "next refresh", peer.name, exc)

    async def _configure(self, peer: PeerState) -> None:
        ann = peer.spec.announcement
        if ann is None:
            return
        key, ip = ann.public_key, f"{peer.spec.overlay_ip}/32"
        if peer.configured_key == key:
            if peer.configured_ip != ip:
                await self._owner.set_peer(key, peer.endpoint, [ip], self._keepalive(peer))
                peer.configured_ip = ip
                log.info("peer %s now at %s", peer.name, peer.spec.overlay_ip)
            if peer.announcement_id != ann.msg_id:
                await self._newer_announcement(peer, ann)
            return
        # No endpoint yet: WireGuard's first handshake goes where negotiation says.
        await self._owner.set_peer(key, None, [ip], 0)
        peer.configured_key, peer.configured_ip = key, ip
        peer.announcement_id, peer.announcement_endpoint = ann.msg_id, ann.endpoint
        log.info("peer %s (%s%s), key %s…", peer.name, peer.spec.overlay_ip,
                 ", dynamic" if peer.spec.dynamic else "", key[:8])
        if self._negotiator is not None:
            # Unknown while our own announcement is still being sent: offer at once (a
            # glare that may cause is settled by key order).
            mine = self._presence.announce_id
            joined_later = mine is not None and ann.msg_id > mine
            self._negotiator.peer_key(peer.spec.device, key, joined_later)
            self._punch(ann.endpoint)
        if peer.fallback is not None:
            peer.fallback.cancel()
        delay = self._options.announced_fallback_s if self._negotiator is not None else 0.0
        device = peer.spec.device
        peer.fallback = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._announced_fallback(device, key)))

    async def renew_sessions(self) -> None:
        """Every configured peer removed and set again as it was, so that WireGuard's
        sessions go with it and the next packet to a peer starts a handshake at once.
        After a sleep wireguard-go still holds keys its peers have refused (wake_watch)
        and would only notice after 15 s without an answer."""
        async with self._lock:
            for peer in self._state.peers.values():
                await self._guarded(peer, self._renew(peer))

    async def _renew(self, peer: PeerState) -> None:
        key, ip = peer.configured_key, peer.configured_ip
        if key is None or ip is None:
            return
        await self._owner.remove_peer(key)
        # Were the set refused, the next sync would configure the peer from scratch.
        peer.configured_key = peer.configured_ip = None
        await self._owner.set_peer(key, peer.endpoint, [ip], self._keepalive(peer))
        peer.configured_key, peer.configured_ip = key, ip
        # The device's counters start over with the peer: the next poll's are no change.
        peer.reset_counters()
        log.info("%s: fresh WireGuard session (endpoint %s)", peer.name,
                 peer.endpoint or "none yet")

    async def forget_sources(self) -> None:
        """The host lost an address (another network). wireguard-go goes on sending to
        each peer from the address it last used with it, and every such packet now
        fails, until the peer, which our checks reach seconds later, answers on the new
        one. Set again, the endpoint WireGuard has makes it pick the source anew: our
        next packet leaves from the new address and the peer roams to it at once."""
        stats = await self._owner.stats()
        current = {p.public_key: p.endpoint for p in stats.peers}
        async with self._lock:
            for peer in self._state.peers.values():
                key, ip = peer.configured_key, peer.configured_ip
                endpoint = current.get(key or "")
                if key is None or ip is None or not endpoint or _on_loopback(endpoint):
                    continue  # a relayed path leaves through our proxy on loopback
                await self._guarded(peer, self._owner.set_peer(
                    key, endpoint, [ip], self._keepalive(peer)))
                log.debug("%s: WireGuard picks its source address anew (endpoint %s)",
                          peer.name, endpoint)

    async def peer_checks_again(self, device: DeviceId, sign: str = CHECKS_AGAIN) -> None:
        """`device` restarted with the same key (or lost our session), as its early
        checks waking ours (`CHECKS_AGAIN`) or its new run's first sealed message
        (`NEW_RUN`) says. WireGuard's session with it is then likely one it no longer
        has, and choosing the path we already give WireGuard changes nothing, so no
        handshake would go until that session times out, while the peer, as the second
        end of a fresh path, holds its own back for ours. As the first end, a fresh
        entry sends our handshake at once; as the second, the peer's comes.

        One restart usually gives both signs, a chat delivery apart: the second, once
        the renewed entry has a session, is the same restart and renews nothing."""
        async with self._lock:
            peer = self._state.peers.get(device)
            key = peer.configured_key if peer is not None else None
            if peer is None or key is None or not peer.endpoint or device in self.held \
                    or self._holds_back(key):
                return
            now = time.monotonic()
            first = peer.restart_sign
            if first is not None and first[0] != sign and now - first[1] < RESTART_SIGNS_S:
                peer.restart_sign = None
                current = await self._wireguard_peer(key)
                if current is not None and current.last_handshake:
                    return
            else:
                peer.restart_sign = (sign, now)
            log.info("%s %s: renewing its WireGuard session", peer.name, sign)
            await self._guarded(peer, self._renew(peer))

    def _keepalive(self, peer: PeerState) -> int:
        return self._options.keepalive_s if peer.endpoint else 0

    async def _newer_announcement(self, peer: PeerState, ann: Announcement) -> None:
        """A newer announcement with the key already configured. The announcement proves
        who sent it, not that the endpoint in it reaches the key's holder: a working
        endpoint moves only by a sealed negotiation or an authenticated handshake."""
        moved = ann.endpoint != peer.announcement_endpoint
        peer.announcement_id, peer.announcement_endpoint = ann.msg_id, ann.endpoint
        if not moved:
            return
        self._punch(ann.endpoint)
        if peer.working(time.time()):
            log.info("%s announced %s; keeping its working endpoint %s, renegotiating",
                     peer.name, ann.endpoint, peer.endpoint)
            negotiator = self._negotiator
            session = negotiator.sessions.get(peer.spec.device) if negotiator else None
            if negotiator is not None and session is not None \
                    and session.state != "unanswered":
                # restart() leaves an offer of ours that is still out alone.
                self._spawn(negotiator.restart(peer.spec.device))
        elif peer.endpoint_source == ANNOUNCED:
            # Nothing works yet: the newest announcement is the best guess.
            await self._set_endpoint(peer, ann.endpoint, ANNOUNCED)
        # Without an endpoint, the pending fallback takes the newest announcement.

    async def _announced_fallback(self, device: DeviceId, key: str) -> None:
        async with self._lock:
            peer = self._state.peers.get(device)
            ann = peer.spec.announcement if peer is not None else None
            if peer is None or ann is None or peer.configured_key != key or peer.endpoint \
                    or device in self.held:
                return
            if self._holds_back(key) and not await self._has_session(key):
                # Both ends fall back at about the same time (module docstring).
                self._hold_back(device, HeldPath(key, None, None, "announced endpoint"))
                log.debug("%s: no negotiated path yet; holding its announced endpoint up "
                          "to %.1f s for the peer's handshake", peer.name,
                          FIRST_HANDSHAKE_HOLD_S)
                return
            await self._use_announced(peer, ann)

    async def _use_announced(self, peer: PeerState, ann: Announcement) -> None:
        """Under the peer lock: the announced endpoint becomes the peer's, unless the
        peer's handshake already made a session. WireGuard then sends where that came
        from (authenticated roaming), which the announcement need not be."""
        key = peer.configured_key
        current = await self._wireguard_peer(key) if key is not None else None
        if current is not None and current.last_handshake and current.endpoint:
            log.info("%s: no negotiated path yet; keeping the endpoint its handshake came "
                     "from, %s (announced %s)", peer.name, current.endpoint, ann.endpoint)
            await self._set_endpoint(peer, current.endpoint, ANNOUNCED, in_wireguard=True)
            return
        log.info("%s: no negotiated path yet; using its announced endpoint %s",
                 peer.name, ann.endpoint)
        await self._set_endpoint(peer, ann.endpoint, ANNOUNCED)

    async def _set_endpoint(self, peer: PeerState, endpoint: str, source: str,
                            quiet: bool = False, in_wireguard: bool = False) -> bool:
        """Under the peer lock, for a configured peer; whether the endpoint changed.
        `quiet` leaves the persistent keepalive off, so a fresh entry sends nothing
        until the caller turns it on. `in_wireguard`: WireGuard's session already has
        this endpoint; it is left as it is (set again, wireguard-go would forget the
        source address the session uses)."""
        key, ip = peer.configured_key, peer.configured_ip
        if key is None or ip is None:
            return False
        if peer.endpoint == endpoint:
            peer.endpoint_source = source
            return False
        session = await self._has_session(key)
        if not session:
            # WireGuard counts a handshake it could not send (no endpoint yet) against
            # its 5 s rate limit; a fresh peer entry starts its handshake at once.
            await self._owner.remove_peer(key)
        keepalive = 0 if quiet else self._options.keepalive_s
        keep = in_wireguard and session
        await self._owner.set_peer(key, None if keep else endpoint, [ip], keepalive)
        peer.endpoint, peer.endpoint_source = endpoint, source
        peer.path_since, peer.connected_at = time.time(), None
        return True

    async def _has_session(self, public_key: str, shared: bool = False) -> bool:
        current = await self._wireguard_peer(public_key, shared)
        return current is not None and bool(current.last_handshake)

    async def _wireguard_peer(self, public_key: str,
                              shared: bool = False) -> PeerCounters | None:
        """WireGuard's own view of the peer entry (its endpoint roams).

        `shared` (the holds' polls only): the reply of a `stats` request already in
        flight will do, though it went out before this call. Every check that decides
        a change of WireGuard's entry asks afresh: a request sent before our own last
        set_peer or remove_peer for the key may be answered with WireGuard as it was
        before that call, showing a session the removal ended or an endpoint since
        replaced. A poll a little late only holds a poll longer, and a hold that ends
        goes through those fresh checks (_apply, _use_announced)."""
        stats = await (self._held_stats.get() if shared else self._owner.stats())
        return next((p for p in stats.peers if p.public_key == public_key), None)

    def _holds_back(self, key: str) -> bool:
        """Whether this end is the second of a fresh path (module docstring)."""
        return self._state.public_key > key

    def _hold_back(self, device: DeviceId, held: HeldPath) -> None:
        """`held` goes to WireGuard when the hold ends (one hold per peer: a later
        choice replaces the path it will give)."""
        first = device not in self.held
        self.held[device] = held
        if first:
            self._spawn(self._hold(device))

    async def _remove_key(self, peer: PeerState) -> None:
        """Remove the key configured for this peer, and only for it."""
        key = peer.configured_key
        if key is None:
            return
        peer.configured_key = peer.configured_ip = None
        if any(p.configured_key == key for p in self._state.peers.values() if p is not peer):
            # Cannot happen while keys are judged one per device; never undo another's.
            log.warning("key %s… of %s is also configured for another peer; keeping it",
                        key[:8], peer.name)
            return
        await self._owner.remove_peer(key)

    async def _release(self, peer: PeerState, why: str) -> None:
        log.info("%s %s; old peer entry removed", peer.name, why)
        self.held.pop(peer.spec.device, None)
        if peer.fallback is not None:
            peer.fallback.cancel()
        if self._negotiator is not None and peer.spec.announcement is None:
            self._negotiator.forget(peer.spec.device)
        await self._remove_key(peer)
        peer.endpoint = peer.endpoint_source = None
        peer.announcement_id = peer.announcement_endpoint = None
        peer.reset_counters()

    async def _drop(self, peer: PeerState, why: str) -> None:
        log.info("%s: %s; removing it", peer.name, why)
        self.held.pop(peer.spec.device, None)
        order = self._choices.pop(peer.spec.device, None)
        if order is not None:
            order.newest += 1  # the choices still waiting to apply are for nobody now
        if peer.fallback is not None:
            peer.fallback.cancel()
        if self._negotiator is not None:
            self._negotiator.forget(peer.spec.device)
        await self._paths.forget(peer.name)
        await self._remove_key(peer)

    def _punch(self, endpoint: str) -> None:
        if self._options.endpoint is None:
            self._paths.punch(endpoint)

    async def path_chosen(self, device: DeviceId, pair: CandidatePair | None,
                          reason: str, early: bool = False) -> None:
        """A peer's checks chose a pair (or gave up): it becomes the WireGuard endpoint.
        `early`: chosen by the early checks, which a connected session overrides."""
        peer = self._state.peers.get(device)
        if peer is None or peer.configured_key is None:
            return
        if pair is None:
            log.warning("%s: %s", peer.name, reason)
            if not early and self.early is not None:
                self.early.session_lost(device)
            return
        if self.early is not None and not self.early.accepts(device, early):
            return
        order = self._choices.setdefault(device, ChoiceOrder())
        order.newest += 1
        this = order.newest
        async with order.applying:
            if order.newest != this:
                log.debug("%s: %s; a newer choice came meanwhile, not applied", peer.name,
                          reason)
                return
            route = await self._paths.route(peer.name, pair)
            key = peer.configured_key
            if device not in self._state.peers:
                # Dropped while the route was made: the relay proxy it may have opened
                # would stay open for nobody.
                await self._paths.forget(peer.name)
                return
            if key is None or self._state.peers.get(device) is not peer:
                return  # re-keyed (or dropped and back) while the route was made
            if self._holds_back(key) and not await self._has_session(key):
                # The second end (module docstring): WireGuard gets the endpoint once the
                # first end's handshake made a session, or the hold ran out.
                self._hold_back(device, HeldPath(key, pair, route, reason))
                log.debug("%s: %s; holding the endpoint up to %.1f s for the peer's "
                          "handshake", peer.name, reason, self.held[device].hold_s())
                return
            self.held.pop(device, None)
            await self._apply(device, peer, pair, route, reason)

    async def _hold(self, device: DeviceId) -> None:
        """The held path goes to WireGuard as soon as the peer's handshake made a session
        (its keepalive then only keeps it), else when the hold runs out (a fresh entry,
        so this end's own handshake goes at once)."""
        loop = asyncio.get_running_loop()
        first = self.held.get(device)
        if first is None:
            return
        started = loop.time()
        deadline = started + first.hold_s()
        ended = "it ran out"
        while (left := deadline - loop.time()) > 0:
            # On the shared tick (HOLD_POLL_S), so the holds' polls join one request.
            await asyncio.sleep(min(HOLD_POLL_S - loop.time() % HOLD_POLL_S, left))
            held = self.held.get(device)
            if held is None:
                return  # dropped, re-keyed, or a session came with a newer choice
            try:
                if await self._has_session(held.key, shared=True):
                    ended = "the peer's handshake came"
                    break
            except OwnerError as exc:
                # Waiting on cannot tell more; left in `held`, the peer would never get
                # an endpoint (no new hold starts for a device already held).
                log.warning("%s: could not read WireGuard's sessions (%s); ending the hold",
                            device, exc)
                break
        log.debug("%s: hold ended after %.2f s: %s", device, loop.time() - started, ended)
        if device not in self._state.peers:
            return  # dropped: the hold went with it
        order = self._choices.setdefault(device, ChoiceOrder())
        async with order.applying:
            # The newest choice is the one held: a later one replaced it or, applied
            # already, took it out.
            held = self.held.pop(device, None)
            peer = self._state.peers.get(device)
            if held is None or peer is None or peer.configured_key != held.key:
                return
            if held.pair is not None and held.route is not None:
                await self._apply(device, peer, held.pair, held.route, held.reason)
                return
            async with self._lock:
                ann = peer.spec.announcement
                if peer.configured_key == held.key and not peer.endpoint and ann is not None:
                    await self._use_announced(peer, ann)

    async def _apply(self, device: DeviceId, peer: PeerState, pair: CandidatePair,
                     route: Route, reason: str) -> None:
        """The chosen pair becomes the peer's endpoint, pinned to its interface."""
        key = peer.configured_key
        if not route.relayed and key is not None \
                and await self._sends_to(key, route.endpoint):
            await self._apply_route_first(device, peer, pair, route, reason)
            return
        async with self._lock:
            if peer.configured_key is None or self._state.peers.get(device) is not peer:
                return  # dropped or re-keyed while the route was made
            # A direct endpoint is set quietly: the keepalive WireGuard would send at once
            # must not leave through the default uplink before the host route below
            # exists. Sent there, the handshake reaches the peer from the wrong NAT
            # address; the peer roams to it and answers there, and wireguard-go then
            # pins that uplink as the packets' source interface (IP_PKTINFO), which
            # overrides the host route; both ends then stay on the slow uplink.
            changed = await self._set_endpoint(peer, route.endpoint, NEGOTIATED,
                                               quiet=not route.relayed)
            quiet = changed and not route.relayed
        previous = peer.route
        try:
            peer.route = await self._paths.pin(peer.name, pair, route)
        finally:
            moved = peer.route is not None and peer.route != previous
            if quiet or moved:
                async with self._lock:
                    key, ip = peer.configured_key, peer.configured_ip
                    if key is not None and ip is not None and peer.endpoint == route.endpoint:
                        # With its keepalive on, WireGuard starts sending, through the
                        # route now in place. For a moved route, the endpoint set again
                        # also makes it drop the source address (and interface) it last
                        # used and choose both anew.
                        await self._owner.set_peer(key, route.endpoint, [ip],
                                                   self._options.keepalive_s)
        log.info("%s: %s", peer.name, reason)

    async def _sends_to(self, key: str, endpoint: str) -> bool:
        """Whether WireGuard's endpoint for `key` is already at `endpoint`'s address
        (the device owner adds a host route only towards a current endpoint)."""
        current = await self._wireguard_peer(key)
        if current is None or current.endpoint is None:
            return False
        try:
            return parse_endpoint(current.endpoint)[0] == parse_endpoint(endpoint)[0]
        except ValueError:
            return False

    async def _apply_route_first(self, device: DeviceId, peer: PeerState,
                                 pair: CandidatePair, route: Route, reason: str) -> None:
        """`_apply` when WireGuard already sends to the chosen address (module
        docstring): the host route, then the endpoint with its keepalive."""
        previous = peer.route
        try:
            peer.route = await self._paths.pin(peer.name, pair, route)
        finally:
            moved = peer.route is not None and peer.route != previous
            async with self._lock:
                if peer.configured_key is not None and self._state.peers.get(device) is peer:
                    changed = await self._set_endpoint(peer, route.endpoint, NEGOTIATED)
                    key, ip = peer.configured_key, peer.configured_ip
                    if moved and not changed and key is not None and ip is not None:
                        # Set again, so WireGuard drops the source address it last
                        # used and chooses it anew, through the route.
                        await self._owner.set_peer(key, route.endpoint, [ip],
                                                   self._options.keepalive_s)
        log.info("%s: %s", peer.name, reason)

    def close(self) -> None:
        """Pending announced-endpoint fallbacks are cancelled (and early checks)."""
        if self.early is not None:
            self.early.close()
        for peer in self._state.peers.values():
            if peer.fallback is not None:
                peer.fallback.cancel()
