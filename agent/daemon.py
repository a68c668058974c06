"""`kbwg-agent join`: keeps this device's WireGuard peers in step with the team.

peers.json, `#announce` (ANNOUNCE and CLAIM lines) and the team's dev channel
(negotiation) are the inputs; the device owner's WireGuard device is the output.

Start-up order matters for time to first packet: the chat listener starts first, and
history is read once it is subscribed (nothing falls between the two); the device
owner starts while Keybase is still being asked who we are; local candidates are
gathered from the WireGuard port itself before our offers go out. A peer's WireGuard
endpoint is set only once a pair is chosen (or, for a peer that does not negotiate,
its announced endpoint after a grace period), together with the persistent
keepalive: that makes WireGuard start its handshake at once, towards the right place.

Team input is checked before it is applied: kbwg.json's overlay must pass the device
owner's own rule on this host before the device is created (overlaycheck); each key
belongs to one device (keyowners); a newer announcement never moves an endpoint that
works (only a sealed negotiation or WireGuard's authenticated roaming does); and each
stats poll reconciles the device's peers with what this agent configured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from kbwg.agent.announce import (
    ANNOUNCE_TTL_S,
    AnnounceBook,
    Announcement,
    format_announce,
)
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import (
    Claim,
    ClaimBook,
    ClaimError,
    check_range_against_peers,
    format_claim,
    load_previous,
    pick_free_address,
    save_previous,
)
from kbwg.agent.connectivity import Connectivity, RegisteredChecker
from kbwg.agent.control import ControlServer
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient, KeybaseError
from kbwg.agent.keyowners import KeyBook
from kbwg.agent.netwatch import NetworkWatcher
from kbwg.agent.overlaycheck import OverlayError, RoutesReader, check_team_overlay, host_routes
from kbwg.agent.owner_calls import OwnerCalls, PeerCounters
from kbwg.agent.owner_client import DeviceOwner, OwnerError
from kbwg.agent.peer_selection import desired_peers
from kbwg.agent.peers_file import PeerEntry, PeersError, parse_peers
from kbwg.agent.reports import diag_report, status_report
from kbwg.agent.runtime_state import ANNOUNCED, NEGOTIATED, AgentState, PeerState
from kbwg.agent.teamconfig import (
    TeamConfig,
    TeamConfigError,
    load_team_config,
    team_config_path,
)
from kbwg.core.background import Background
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidates import gather_host_candidates, interface_addresses
from kbwg.negotiation.pairs import CandidatePair
from kbwg.negotiation.session import CheckerSpec, Negotiator
from kbwg.negotiation.wire import CandidateInfo
from kbwg.owner.policy import DEFAULT_POLICY_PATH
from kbwg.turn.client import RelayAllocation

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3.0

LISTENER_READY_TIMEOUT_S = 5.0
# A peer that has not got a negotiated path by then gets its announced endpoint.
ANNOUNCED_FALLBACK_S = 3.0
GATHER_WAIT_S = 2.0
ANNOUNCE_GATHER_WAIT_S = 1.0
ENV_DYNAMIC_SEED = "KBWG_DYNAMIC_SEED"


class JoinError(RuntimeError):
    """A condition that stops `join`, with a message saying what to do."""


@dataclass
class JoinOptions:
    team: str
    state_dir: Path
    interface: str = "kbwg0"
    listen_port: int = 51820
    endpoint: str | None = None
    backend: str = "auto"
    keepalive_s: int = 25
    owner_command: list[str] | None = None
    refresh_s: float = 30.0
    reannounce_s: float = ANNOUNCE_TTL_S / 2
    stats_s: float = 5.0
    negotiate: bool = True
    announced_fallback_s: float = ANNOUNCED_FALLBACK_S
    # The machine's own rule for the overlay (root's file, read-only for the agent).
    policy_path: Path = DEFAULT_POLICY_PATH


OwnerFactory = Callable[[list[str] | None], Coroutine[Any, Any, DeviceOwner]]


class Agent:
    def __init__(
        self,
        options: JoinOptions,
        keybase: KeybaseClient,
        owner_factory: OwnerFactory = DeviceOwner.start,
        routes: RoutesReader = host_routes,
    ) -> None:
        self.options = options
        self.keybase = keybase
        self._owner_factory = owner_factory
        self._routes = routes
        self._owner: OwnerCalls | None = None
        self._owner_task: asyncio.Task[DeviceOwner] | None = None
        self.paths: Connectivity | None = None
        self._negotiator: Negotiator | None = None
        self._announcements = AnnounceBook()
        self._claims = ClaimBook()
        self._keys = KeyBook()
        # Held by every change of WireGuard peers, so the reconciliation in
        # _poll_stats never sees a change half made.
        self._lock = asyncio.Lock()
        self._state_ready = asyncio.Event()
        self._peers_raw: bytes | None = None
        self._entries: list[PeerEntry] = []
        self._private: PrivateKey | None = None
        self._my_announce_id: int | None = None
        self._tasks = Background(log, "background step")
        self._spawn = self._tasks.spawn
        self.state: AgentState | None = None
        self.config = TeamConfig()
        self.announce_channel = Channel(options.team, self.config.announce_channel, "chat")
        self.negotiation_channel = Channel(options.team, self.config.negotiation_channel, "dev")

    @property
    def peers_path(self) -> str:
        return f"/keybase/team/{self.options.team}/peers.json"

    # -- life cycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; start-up problems raise JoinError and clean up."""
        listener_ready = asyncio.Event()
        stopper = asyncio.create_task(stop.wait(), name="stop")
        tasks = [asyncio.create_task(self._follow(listener_ready), name="listen")]
        try:
            starting = asyncio.create_task(self._start(listener_ready), name="start")
            await asyncio.wait([starting, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                self._raise_failures(tasks)
                return
            starting.result()
            tasks += [
                asyncio.create_task(self._refresh_loop(), name="refresh"),
                asyncio.create_task(self._stats_loop(), name="stats"),
                asyncio.create_task(self._watch_network(), name="netwatch"),
            ]
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            self._raise_failures(tasks)
        finally:
            for task in [stopper, *tasks]:
                task.cancel()
            # Bounded: a library that swallows a cancellation must not hang the exit.
            _, stuck = await asyncio.wait([stopper, *tasks], timeout=SHUTDOWN_GRACE_S)
            for task in stuck:
                log.warning("the %s task did not stop within %.0fs; exiting without it",
                            task.get_name(), SHUTDOWN_GRACE_S)
            await self._shutdown()

    @staticmethod
    def _raise_failures(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled():
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                raise RuntimeError(f"internal error: the {task.get_name()} task ended")

    async def _start(self, listener_ready: asyncio.Event) -> None:
        # The device owner (a process, then wireguard-go) is the slowest step, so it
        # starts while Keybase is asked who we are and what the team's files say.
        self._owner_task = asyncio.create_task(self._owner_factory(self.options.owner_command))
        identity, self.config = await asyncio.gather(
            self.keybase.whoami(), self._load_config()
        )
        me = DeviceId(identity.username, identity.device)
        # Before anything is created: the owner has started, but `create` waits for this.
        await self._check_overlay()
        self.announce_channel = Channel(self.options.team, self.config.announce_channel, "chat")
        self.negotiation_channel = Channel(
            self.options.team, self.config.negotiation_channel, "dev")
        self._entries = await self._load_peers(strict=True)
        mine = next((e for e in self._entries if e.device_id == me), None)
        if mine is None and self.config.dynamic_range is None:
            raise JoinError(
                f"this device ({me}) is not listed in {self.peers_path} and the team's "
                f"kbwg.json sets no dynamic_range; ask a team admin to add "
                f'{{"username": "{me.username}", "device": "{me.device}", '
                f'"ip": "<free address in {self.config.overlay}>"}} to peers.json, '
                "or a dynamic_range to kbwg.json"
            )
        if self.config.dynamic_range is not None:
            for problem in check_range_against_peers(self.config.dynamic_range, self._entries):
                log.warning("kbwg.json dynamic_range: %s", problem)
        await asyncio.gather(*(self._join_channel(c)
                               for c in (self.announce_channel, self.negotiation_channel)))
        try:
            await asyncio.wait_for(listener_ready.wait(), LISTENER_READY_TIMEOUT_S)
        except TimeoutError:
            log.warning("chat listener not confirmed after %.0fs; reading history anyway",
                        LISTENER_READY_TIMEOUT_S)
        # History first (into the books only): a dynamic address needs the live claims.
        await self._read_history(me, first=True)
        overlay_ip = mine.ip if mine is not None else self._pick_dynamic(me)

        self._private = PrivateKey.generate()
        public_key = base64.b64encode(bytes(self._private.public_key)).decode()
        announce_ip, announce_port = await self._announce_target()
        self._owner = OwnerCalls(await self._owner_task)
        created = await self._owner.create(
            self.options.interface, bytes(self._private), self.options.listen_port,
            IPv4Interface(f"{overlay_ip}/{self.config.overlay.prefixlen}"), self.options.backend)
        port = created.listen_port
        self.state = AgentState(
            me=me, listed=mine is not None, overlay_ip=overlay_ip, public_key=public_key,
            listen_port=port, interface=self.options.interface,
            backend=created.backend,
            announced_endpoint=f"{announce_ip}:{announce_port or port}",
        )
        log.info("%s is %s%s on %s (%s backend, port %d)", me, overlay_ip,
                 "" if mine else " (self-assigned)", self.options.interface,
                 self.state.backend, port)
        self.paths = await Connectivity.open(self._owner, port, me.username, self.config,
                                             self._on_relay_lost)
        self.paths.start_gathering()
        if self.options.negotiate:
            self._negotiator = Negotiator(
                me, self._private, self._post_negotiation, self._make_checker,
                self._offer_candidates, port)
        self._control = ControlServer(
            self.options.state_dir, {"status": self._status, "diag": self._diag})
        await self._control.start()
        self._state_ready.set()
        if self.options.endpoint is None:
            # With STUN, the NAT's public mapping of the WireGuard port is what a peer
            # elsewhere can reach (and can punch towards before our offer arrives).
            await self.paths.gathered(ANNOUNCE_GATHER_WAIT_S)
            self.state.announced_endpoint = (self.paths.public_endpoint()
                                             or self.state.announced_endpoint)
        await self._announce()
        await self._sync()

    async def _shutdown(self) -> None:
        if getattr(self, "_control", None) is not None:
            await self._control.close()
        self._tasks.cancel()
        if self._negotiator is not None:
            await self._negotiator.close()
        if self.state is not None:
            for peer in self.state.peers.values():
                if peer.fallback is not None:
                    peer.fallback.cancel()
        if self.paths is not None:
            await self.paths.close()
        if self._owner is None and self._owner_task is not None:
            # Start-up failed while the owner was starting: it must still be stopped.
            if not self._owner_task.done():
                self._owner_task.cancel()
            with contextlib.suppress(BaseException):
                self._owner = OwnerCalls(await self._owner_task)
        if self._owner is not None:
            with contextlib.suppress(Exception):
                await self._owner.close()
            log.info("device %s removed", self.options.interface)
        await self.keybase.close()

    # -- team files -------------------------------------------------------------------

    async def _load_config(self) -> TeamConfig:
        try:
            return await load_team_config(self.keybase, self.options.team)
        except (TeamConfigError, KeybaseError) as exc:
            raise JoinError(
                f"cannot use {team_config_path(self.options.team)}: {exc}; fix the file "
                "or remove it (without it: no STUN or relay servers)"
            ) from exc

    async def _check_overlay(self) -> None:
        try:
            await check_team_overlay(self.config.overlay, team_config_path(self.options.team),
                                     self.options.interface, self.options.policy_path,
                                     self._routes)
        except OverlayError as exc:
            raise JoinError(str(exc)) from exc

    async def _load_peers(self, strict: bool) -> list[PeerEntry]:
        """Read peers.json. At start-up a problem stops `join`; later the last good
        version stays in force and the problem is logged."""
        try:
            raw = await self.keybase.fs_read(self.peers_path)
            entries = parse_peers(raw, self.config.overlay)
        except (PeersError, KeybaseError) as exc:
            if strict:
                raise JoinError(f"cannot use {self.peers_path}: {exc}") from exc
            log.warning("keeping the previous peer list: %s", exc)
            return self._entries
        self._peers_raw = raw
        return entries

    async def _join_channel(self, channel: Channel) -> None:
        """Keybase notifies only members of a conversation: be one before listening."""
        try:
            await self.keybase.newconv(channel)
        except KeybaseError as exc:
            log.debug("newconv %s: %s; joining instead", channel, exc)
            try:
                await self.keybase.join(channel)
            except KeybaseError as exc2:
                log.warning("cannot join %s (%s); new messages may arrive only with the "
                            "periodic history read", channel, exc2)

    async def _announce_target(self) -> tuple[str, int]:
        """(ip, port) to announce; port 0 means the WireGuard listen port."""
        given = self.options.endpoint
        if given:
            host, sep, port = given.rpartition(":")
            if sep and port.isdigit():
                return host, int(port)
            return given, 0
        # The first host candidate: the default route's interface, by the same rule
        # that chooses candidates (the WireGuard device and tunnels excluded).
        hosts = gather_host_candidates(0, self.config.interface_exclude, [self.config.overlay],
                                       addresses=await interface_addresses())
        ip = hosts[0].address if hosts else None
        if ip is None:
            raise JoinError(
                "found no IPv4 address to announce; bring up a network interface "
                "or pass --endpoint IP[:PORT]"
            )
        return ip, 0

    # -- our own address and announcements ----------------------------------------------

    def _pick_dynamic(self, me: DeviceId, previous: IPv4Address | None = None) -> IPv4Address:
        assert self.config.dynamic_range is not None
        seed = os.environ.get(ENV_DYNAMIC_SEED)
        # Test-only: seeded by the value alone, so devices sharing a seed draw the same
        # sequence and their first picks collide (tests force conflicts this way).
        rng = random.Random(seed) if seed else random.Random()
        taken = self._claims.taken(time.time(), besides=me) | {e.ip for e in self._entries}
        if previous is None:
            previous = load_previous(self.options.state_dir)
        try:
            return pick_free_address(self.config.dynamic_range, taken, rng, previous)
        except ClaimError as exc:
            raise JoinError(f"no free address in {self.config.dynamic_range}: {exc}; "
                            "ask a team admin for a larger dynamic_range") from exc

    async def _announce(self) -> None:
        assert self.state is not None
        s = self.state
        if not s.listed:
            msg_id = await self.keybase.send(
                self.announce_channel, format_claim(s.overlay_ip, s.public_key))
            s.my_claim = Claim(s.me, s.overlay_ip, s.public_key, msg_id, time.time())
            save_previous(self.options.state_dir, s.overlay_ip)
            log.info("claimed %s (message %d)", s.overlay_ip, msg_id)
        ip, _, port = s.announced_endpoint.rpartition(":")
        self._my_announce_id = await self.keybase.send(
            self.announce_channel, format_announce(ip, int(port), s.public_key))
        log.info("announced %s in #%s", s.announced_endpoint, self.announce_channel.topic_name)

    async def _check_my_claim(self) -> None:
        """A self-assigned address that lost a conflict moves; the winner does nothing."""
        # Under the peer lock: the chat listener and the refresh loop both call this, and
        # without it both would see the lost claim (mine changes only after the send) and
        # move twice. _sync takes the same lock but is never called from here.
        async with self._lock:
            s = self.state
            if s is None or s.my_claim is None:
                return
            rival = self._claims.lost(s.my_claim, time.time())
            if rival is None:
                return
            old = s.overlay_ip
            new = self._pick_dynamic(s.me, previous=None if rival.ip == old else old)
            log.warning("%s also claimed %s, first (message %d < %d): moving to %s",
                        rival.sender, old, rival.msg_id, s.my_claim.msg_id, new)
            assert self._owner is not None
            await self._owner.set_address(IPv4Interface(f"{new}/{self.config.overlay.prefixlen}"))
            s.overlay_ip = new
            msg_id = await self.keybase.send(self.announce_channel,
                                             format_claim(new, s.public_key))
            s.my_claim = Claim(s.me, new, s.public_key, msg_id, time.time())
            save_previous(self.options.state_dir, new)

    # -- chat -----------------------------------------------------------------------------

    async def _follow(self, ready: asyncio.Event) -> None:
        async for msg in self.keybase.listen(dev=True, ready=ready):
            # Messages that arrive during start-up wait here until peers are known.
            await self._state_ready.wait()
            try:
                await self._on_chat(msg)
            except Exception:
                # One bad or unlucky message must not stop the agent.
                log.exception("handling message %d from %s/%s failed", msg.id,
                              msg.sender_username, msg.sender_device)

    async def _on_chat(self, msg: ChatMessage) -> None:
        ch = msg.channel
        if ch.name != self.options.team:
            return
        if ch.topic_type == "chat" and ch.topic_name == self.announce_channel.topic_name:
            if self._take_announce_channel(msg, self.state.me if self.state else None):
                await self._check_my_claim()
                await self._sync()
        elif (ch.topic_type == "dev" and ch.topic_name == self.negotiation_channel.topic_name
              and self._negotiator is not None and self.state is not None):
            sender = DeviceId(msg.sender_username, msg.sender_device)
            if sender == self.state.me:
                return
            if sender not in self.state.peers:
                log.info("ignoring negotiation message %d from %s: not a peer of this "
                         "device (not in peers.json, no live claim, or policy)", msg.id, sender)
                return
            await self._negotiator.handle(msg)

    def _take_announce_channel(self, msg: ChatMessage, me: DeviceId | None) -> bool:
        return take_announce_message(msg, me, self._announcements, self._claims,
                                     self._entries, self.config.dynamic_range, time.time(),
                                     self._keys)

    async def _read_history(self, me: DeviceId, first: bool = False) -> None:
        # The first read goes back two lifetimes: a device re-announces its key within
        # every lifetime, so the key's first use is seen before any live copy of it.
        since = time.time() - ANNOUNCE_TTL_S * (2 if first else 1)
        try:
            async for msg in self.keybase.read_history(self.announce_channel, since=since):
                self._take_announce_channel(msg, me)
        except KeybaseError as exc:
            # A team that never announced has no #announce yet; our send creates it.
            log.info("no announcement history read: %s", exc)

    # -- peers ------------------------------------------------------------------------------

    async def _sync(self) -> None:
        """Bring the WireGuard peers in line with peers.json, announcements and claims."""
        assert self.state is not None
        async with self._lock:
            s = self.state
            now = time.time()
            self._keys.prune(now)
            desired = desired_peers(s.me, self._entries, self._announcements, self._claims,
                                    self.config.policy, now, self._keys, s.public_key)
            for refusal in desired.refusals:
                if self._keys.should_log(refusal.msg_id):
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

    async def _guarded(self, peer: PeerState, step: Coroutine[Any, Any, None]) -> None:
        """One peer's step; a refusal by the device owner (team input its policy does not
        allow) leaves that peer as it is instead of stopping the agent."""
        try:
            await step
        except OwnerError as exc:
            log.warning("%s: the device owner refused to configure it (%s); retrying at the "
                        "next refresh", peer.name, exc)

    async def _configure(self, peer: PeerState) -> None:
        assert self._owner is not None and self.state is not None
        ann = peer.spec.announcement
        if ann is None:
            return
        key, ip = ann.public_key, f"{peer.spec.overlay_ip}/32"
        if peer.configured_key == key:
            if peer.configured_ip != ip:
                await self._owner.set_peer(
                    key, peer.endpoint, [ip], self.options.keepalive_s if peer.endpoint else 0)
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
            joined_later = (self._my_announce_id is not None
                            and ann.msg_id > self._my_announce_id)
            self._negotiator.peer_key(peer.spec.device, key, joined_later)
            self._punch(ann.endpoint)
        if peer.fallback is not None:
            peer.fallback.cancel()
        delay = self.options.announced_fallback_s if self._negotiator is not None else 0.0
        device = peer.spec.device
        peer.fallback = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._announced_fallback(device, key)))

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
            session = (self._negotiator.sessions.get(peer.spec.device)
                       if self._negotiator is not None else None)
            if self._negotiator is not None and session is not None \
                    and session.state != "unanswered":
                self._spawn(self._negotiator.offer(session, kind="restart"))
        elif peer.endpoint_source == ANNOUNCED:
            # Nothing works yet: the newest announcement is the best guess.
            await self._set_endpoint(peer, ann.endpoint, ANNOUNCED)
        # Without an endpoint, the pending fallback takes the newest announcement.

    async def _announced_fallback(self, device: DeviceId, key: str) -> None:
        assert self.state is not None
        async with self._lock:
            peer = self.state.peers.get(device)
            ann = peer.spec.announcement if peer is not None else None
            if peer is None or ann is None or peer.configured_key != key or peer.endpoint:
                return
            log.info("%s: no negotiated path yet; using its announced endpoint %s",
                     peer.name, ann.endpoint)
            await self._set_endpoint(peer, ann.endpoint, ANNOUNCED)

    async def _set_endpoint(self, peer: PeerState, endpoint: str, source: str) -> None:
        """Under the peer lock."""
        assert self._owner is not None and peer.configured_key is not None
        if peer.endpoint == endpoint:
            peer.endpoint_source = source
            return
        if not await self._has_session(peer.configured_key):
            # WireGuard counts a handshake it could not send (no endpoint yet) against
            # its 5 s rate limit; a fresh peer entry starts its handshake at once.
            await self._owner.remove_peer(peer.configured_key)
        await self._owner.set_peer(peer.configured_key, endpoint, [peer.configured_ip or ""],
                                   self.options.keepalive_s)
        peer.endpoint, peer.endpoint_source = endpoint, source
        peer.path_since, peer.connected_at = time.time(), None

    async def _has_session(self, public_key: str) -> bool:
        assert self._owner is not None
        stats = await self._owner.stats()
        return any(p.public_key == public_key and p.last_handshake for p in stats.peers)

    async def _remove_key(self, peer: PeerState) -> None:
        """Remove the key configured for this peer, and only for it."""
        assert self._owner is not None and self.state is not None
        key = peer.configured_key
        if key is None:
            return
        peer.configured_key = peer.configured_ip = None
        if any(p.configured_key == key for p in self.state.peers.values() if p is not peer):
            # Cannot happen while keys are judged one per device; never undo another's.
            log.warning("key %s… of %s is also configured for another peer; keeping it",
                        key[:8], peer.name)
            return
        await self._owner.remove_peer(key)

    async def _release(self, peer: PeerState, why: str) -> None:
        log.info("%s %s; old peer entry removed", peer.name, why)
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
        if peer.fallback is not None:
            peer.fallback.cancel()
        if self._negotiator is not None:
            self._negotiator.forget(peer.spec.device)
        if self.paths is not None:
            await self.paths.forget(peer.name)
        await self._remove_key(peer)

    # -- candidates and checks ----------------------------------------------------------

    def _punch(self, endpoint: str) -> None:
        if self.paths is not None and self.options.endpoint is None:
            self.paths.punch(endpoint)

    async def _offer_candidates(self) -> list[CandidateInfo]:
        assert self.paths is not None
        return await self.paths.offer_candidates(GATHER_WAIT_S)

    def _on_relay_lost(self, allocation: RelayAllocation) -> None:
        # Consent checks move each peer off it within seconds; a fresh allocation
        # (this relay or another) and a renegotiation bring a relayed path back.
        self._spawn(self._on_network_change())

    def _make_checker(self, spec: CheckerSpec) -> RegisteredChecker:
        assert self.paths is not None
        device = spec.peer
        return self.paths.make_checker(spec, lambda pair, reason: self._spawn(
            self._on_selected(device, pair, reason)))

    async def _post_negotiation(self, text: str) -> None:
        await self.keybase.send(self.negotiation_channel, text)

    async def _on_selected(self, device: DeviceId, pair: CandidatePair | None,
                           reason: str) -> None:
        assert self.state is not None and self.paths is not None
        peer = self.state.peers.get(device)
        if peer is None or peer.configured_key is None:
            return
        if pair is None:
            log.warning("%s: %s", peer.name, reason)
            return
        route = await self.paths.route(peer.name, pair)
        async with self._lock:
            if peer.configured_key is None or self.state.peers.get(device) is not peer:
                return  # dropped or re-keyed while the route was made
            await self._set_endpoint(peer, route.endpoint, NEGOTIATED)
        previous, peer.route = peer.route, await self.paths.pin(peer.name, pair, route)
        if peer.route is not None and peer.route != previous:
            async with self._lock:
                if (self._owner is not None and peer.configured_key is not None
                        and peer.endpoint == route.endpoint):
                    # WireGuard keeps sending from the source address (and interface)
                    # it last used; the endpoint set again makes it choose both anew,
                    # through the new host route.
                    await self._owner.set_peer(
                        peer.configured_key, route.endpoint, [peer.configured_ip or ""],
                        self.options.keepalive_s)
        log.info("%s: %s", peer.name, reason)

    # -- background loops -------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        """Safety net for missed notifications, peers.json edits and announcement expiry."""
        assert self.state is not None
        last_announce = time.monotonic()
        # One early pass covers messages sent while the listener was still starting.
        delays = [2.0]
        while True:
            await asyncio.sleep(delays.pop() if delays else self.options.refresh_s)
            self._entries = await self._load_peers(strict=False)
            await self._read_history(self.state.me)
            if time.monotonic() - last_announce >= self.options.reannounce_s:
                await self._announce()
                last_announce = time.monotonic()
            await self._check_my_claim()
            await self._sync()
            if self.paths is not None and self.paths.relays_missing():
                # A relay that was down (or forgot our allocation) may be back.
                await self._on_network_change()

    async def _stats_loop(self) -> None:
        while True:
            await self._poll_stats()
            await asyncio.sleep(self.options.stats_s)

    async def _poll_stats(self) -> None:
        assert self.state is not None and self._owner is not None
        async with self._lock:
            by_key = (await self._owner.stats()).by_key()
            for peer in self.state.peers.values():
                current = by_key.get(peer.configured_key or "")
                if current is None:
                    continue
                if peer.observe(current.last_handshake, current.rx_bytes, current.tx_bytes):
                    log.info("handshake with %s (%s) over %s", peer.name,
                             peer.spec.overlay_ip, peer.endpoint)
                if peer.endpoint_source == ANNOUNCED and current.endpoint:
                    # WireGuard roams to where the peer's authenticated packets come from.
                    peer.endpoint = current.endpoint
            await self._reconcile(by_key)

    async def _reconcile(self, actual: dict[str, PeerCounters]) -> None:
        """Make the device's peers the ones this agent configured: whatever removed or
        added one by mistake (a bug, a hand-run `wg set`), nothing stays that way."""
        assert self.state is not None and self._owner is not None
        configured = {p.configured_key: p for p in self.state.peers.values()
                      if p.configured_key is not None}
        for key in [k for k in actual if k not in configured]:
            log.warning("the device has a peer with key %s… that this agent did not "
                        "configure; removing it", key[:8])
            await self._owner.remove_peer(key)
        for key, peer in configured.items():
            if key in actual:
                continue
            log.warning("%s's peer entry (key %s…) is missing from the device; adding it "
                        "again", peer.name, key[:8])
            await self._owner.set_peer(
                key, peer.endpoint, [peer.configured_ip or ""],
                self.options.keepalive_s if peer.endpoint else 0)

    async def _watch_network(self) -> None:
        watcher = NetworkWatcher(self._on_network_change,
                                 ignore_ifnames=[self.options.interface])
        await watcher.run()

    async def _on_network_change(self) -> None:
        assert self.state is not None and self.paths is not None
        if not await self.paths.regather():
            return
        log.info("network changed: candidates now %s; renegotiating", ", ".join(sorted(
            f"{c.type} {c.address}:{c.port}" for c in self.paths.local.candidates)) or "none")
        if self.options.endpoint is None:
            ip, _ = await self._announce_target()
            endpoint = f"{ip}:{self.state.listen_port}"
            if endpoint != self.state.announced_endpoint:
                self.state.announced_endpoint = endpoint
                await self._announce()
        if self._negotiator is not None:
            await self._negotiator.restart_all()

    # -- control --------------------------------------------------------------------------

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None and self.paths is not None
        await self._poll_stats()
        return status_report(self.options.team, self.state, self.config, self.paths,
                             self._claims, self._negotiator)

    async def _diag(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None and self.paths is not None
        return await diag_report(request, self.options.team, self.state, self.config,
                                 self.paths, self._claims, self._negotiator)
