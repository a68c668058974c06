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
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from aioice import stun
from nacl.public import PrivateKey

from kbwg.agent.announce import (
    ANNOUNCE_TTL_S,
    AnnounceBook,
    AnnounceError,
    format_announce,
    parse_announce,
)
from kbwg.agent.background import Background
from kbwg.agent.claims import (
    Claim,
    ClaimBook,
    ClaimError,
    check_range_against_peers,
    format_claim,
    is_claim,
    load_previous,
    parse_claim,
    pick_free_address,
    save_previous,
)
from kbwg.agent.control import ControlServer
from kbwg.agent.diag import DiagOptions, diagnose
from kbwg.agent.hostroutes import HostRoutes
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient, KeybaseError
from kbwg.agent.netwatch import NetworkWatcher
from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.peers import DeviceId, PeerEntry, PeersError, parse_peers
from kbwg.agent.peerstate import ANNOUNCED, NEGOTIATED, PeerState
from kbwg.agent.peertable import desired_peers
from kbwg.agent.teamconfig import (
    TeamConfig,
    TeamConfigError,
    load_team_config,
    team_config_path,
)
from kbwg.negotiation.candidates import Candidate, gather_host_candidates, interface_addresses
from kbwg.negotiation.checks import PeerChecker
from kbwg.negotiation.gathering import LocalCandidates, gather_local, resolve_servers
from kbwg.negotiation.mux import CheckMux
from kbwg.negotiation.pairs import CandidatePair
from kbwg.negotiation.session import CheckerSpec, Negotiator
from kbwg.negotiation.shared_port import SharedPortTransport
from kbwg.negotiation.stun_client import Address, StunClient, StunCounters
from kbwg.negotiation.wire import CandidateInfo
from kbwg.relay.client import RelayAllocation
from kbwg.relay.paths import RelayPaths

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


@dataclass
class AgentState:
    me: DeviceId
    listed: bool
    overlay_ip: IPv4Address
    public_key: str
    listen_port: int
    interface: str
    backend: str
    announced_endpoint: str
    my_claim: Claim | None = None
    started_at: float = field(default_factory=time.time)
    peers: dict[DeviceId, PeerState] = field(default_factory=dict)


OwnerFactory = Callable[[list[str] | None], Coroutine[Any, Any, DeviceOwner]]


class Agent:
    def __init__(
        self,
        options: JoinOptions,
        keybase: KeybaseClient,
        owner_factory: OwnerFactory = DeviceOwner.start,
    ) -> None:
        self.options = options
        self.keybase = keybase
        self._owner_factory = owner_factory
        self._owner: DeviceOwner | None = None
        self._owner_task: asyncio.Task[DeviceOwner] | None = None
        self._port: SharedPortTransport | None = None
        self._mux = CheckMux()
        self._stun_counters = StunCounters()
        self._stun_clients: dict[str | None, StunClient] = {}
        self._gathering: asyncio.Task[None] | None = None
        # Network events, a lost relay and the refresh loop may all ask for a new
        # gathering at once: one at a time, or a relay would get two allocations.
        self._regather = asyncio.Lock()
        self._negotiator: Negotiator | None = None
        self._routes: HostRoutes | None = None
        self._relays: RelayPaths | None = None
        self._announcements = AnnounceBook()
        self._claims = ClaimBook()
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
        self.local = LocalCandidates()
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
        await self._read_history(me)
        overlay_ip = mine.ip if mine is not None else self._pick_dynamic(me)

        self._private = PrivateKey.generate()
        public_key = base64.b64encode(bytes(self._private.public_key)).decode()
        announce_ip, announce_port = await self._announce_target()
        self._owner = await self._owner_task
        created = await self._owner.request(
            "create",
            ifname=self.options.interface,
            private_key=base64.b64encode(bytes(self._private)).decode(),
            listen_port=self.options.listen_port,
            address=f"{overlay_ip}/{self.config.overlay.prefixlen}",
            backend=self.options.backend,
        )
        port = int(created["listen_port"])
        self.state = AgentState(
            me=me, listed=mine is not None, overlay_ip=overlay_ip, public_key=public_key,
            listen_port=port, interface=self.options.interface,
            backend=str(created.get("backend", self.options.backend)),
            announced_endpoint=f"{announce_ip}:{announce_port or port}",
        )
        log.info("%s is %s%s on %s (%s backend, port %d)", me, overlay_ip,
                 "" if mine else " (self-assigned)", self.options.interface,
                 self.state.backend, port)
        self._routes = HostRoutes.new(self._owner)
        self._relays = RelayPaths(me.username, port, self._on_relay_stun,
                                  self._on_relay_lost)
        self._port = await SharedPortTransport.open(self._owner)
        self._port.local_receiver = self._on_port_datagram
        self._mux.fallback = self._client_for(None).datagram_received
        self._gathering = asyncio.create_task(self._gather(), name="gather")
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
            await self._gathered(ANNOUNCE_GATHER_WAIT_S)
            self.state.announced_endpoint = (self._public_endpoint()
                                             or self.state.announced_endpoint)
        await self._announce()
        await self._sync()

    async def _shutdown(self) -> None:
        if getattr(self, "_control", None) is not None:
            await self._control.close()
        self._tasks.cancel()
        if self._gathering is not None:
            self._gathering.cancel()
        if self._negotiator is not None:
            await self._negotiator.close()
        if self.state is not None:
            for peer in self.state.peers.values():
                if peer.fallback is not None:
                    peer.fallback.cancel()
        if self._port is not None:
            await self._port.close()
        if self._relays is not None:
            await self._relays.close()
        if self._owner is None and self._owner_task is not None:
            # Start-up failed while the owner was starting: it must still be stopped.
            if not self._owner_task.done():
                self._owner_task.cancel()
            with contextlib.suppress(BaseException):
                self._owner = await self._owner_task
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
            await self._owner.request("set_address",
                                      address=f"{new}/{self.config.overlay.prefixlen}")
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
        """Feed one #announce message to the books; True when something changed."""
        if msg.body is None:
            return False
        sender = DeviceId(msg.sender_username, msg.sender_device)
        now = time.time()
        if is_claim(msg.body):
            try:
                claim = parse_claim(msg.body, sender, msg.id, msg.sent_at)
            except ClaimError as exc:
                log.warning("ignoring claim %d from %s: %s", msg.id, sender, exc)
                return False
            verdict = self._claims.offer(claim, listed=self._entries,
                                         dynamic_range=self.config.dynamic_range, now=now)
            if not verdict.accepted:
                level = (logging.WARNING if verdict.rejection is not None
                         and verdict.rejection.is_misbehaviour else logging.DEBUG)
                log.log(level, "ignoring claim %d from %s: %s", msg.id, sender, verdict.reason)
                return False
            return True  # our own echo too: a rival may have been seen before it
        if sender == me:
            return False
        try:
            ann = parse_announce(msg.body, sender, msg.id, msg.sent_at)
        except AnnounceError as exc:
            log.warning("ignoring message %d from %s in #%s: %s",
                        msg.id, sender, msg.channel.topic_name, exc)
            return False
        if ann.sent_at < now - ANNOUNCE_TTL_S:
            return False
        if not self._announcements.offer(ann):
            log.debug("ignoring older or repeated announcement %d from %s", msg.id, sender)
            return False
        listed = any(e.device_id == sender for e in self._entries)
        if not listed and self._claims.claim_of(sender, now) is None:
            log.info("ignoring announcement from %s: not listed in peers.json and no "
                     "live claim", sender)
        return True

    async def _read_history(self, me: DeviceId) -> None:
        since = time.time() - ANNOUNCE_TTL_S
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
            wanted = desired_peers(s.me, self._entries, self._announcements, self._claims,
                                   self.config.policy, time.time())
            for device in [d for d in s.peers if d not in wanted]:
                await self._drop(s.peers.pop(device), "no longer a peer")
            for device, spec in wanted.items():
                peer = s.peers.get(device)
                if peer is None:
                    peer = s.peers[device] = PeerState(spec)
                peer.spec = spec
                await self._configure(peer)

    async def _configure(self, peer: PeerState) -> None:
        assert self._owner is not None and self.state is not None
        ann = peer.spec.announcement
        if ann is None:
            return
        key, ip = ann.public_key, f"{peer.spec.overlay_ip}/32"
        if peer.configured_key == key and peer.configured_ip == ip:
            return
        if peer.configured_key and peer.configured_key != key:
            await self._owner.request("remove_peer", public_key=peer.configured_key)
            log.info("%s has a new key; old peer entry removed", peer.name)
            peer.endpoint = peer.endpoint_source = None
            peer.reset_counters()
        # No endpoint yet: WireGuard's first handshake goes where negotiation says.
        await self._owner.request("set_peer", public_key=key, endpoint=peer.endpoint,
                                  allowed_ips=[ip], keepalive=0)
        peer.configured_key, peer.configured_ip = key, ip
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

    async def _announced_fallback(self, device: DeviceId, key: str) -> None:
        assert self.state is not None
        peer = self.state.peers.get(device)
        ann = peer.spec.announcement if peer is not None else None
        if peer is None or ann is None or peer.configured_key != key or peer.endpoint:
            return
        log.info("%s: no negotiated path yet; using its announced endpoint %s",
                 peer.name, ann.endpoint)
        await self._set_endpoint(peer, ann.endpoint, ANNOUNCED)

    async def _set_endpoint(self, peer: PeerState, endpoint: str, source: str) -> None:
        assert self._owner is not None and peer.configured_key is not None
        if peer.endpoint == endpoint:
            peer.endpoint_source = source
            return
        if not await self._has_session(peer.configured_key):
            # WireGuard counts a handshake it could not send (no endpoint yet) against
            # its 5 s rate limit; a fresh peer entry starts its handshake at once.
            await self._owner.request("remove_peer", public_key=peer.configured_key)
        await self._owner.request("set_peer", public_key=peer.configured_key,
                                  endpoint=endpoint, allowed_ips=[peer.configured_ip],
                                  keepalive=self.options.keepalive_s)
        peer.endpoint, peer.endpoint_source = endpoint, source
        peer.path_since, peer.connected_at = time.time(), None

    async def _has_session(self, public_key: str) -> bool:
        assert self._owner is not None
        stats = await self._owner.request("stats")
        return any(p["public_key"] == public_key and p.get("last_handshake")
                   for p in stats.get("peers", []))

    async def _drop(self, peer: PeerState, why: str) -> None:
        assert self._owner is not None
        log.info("%s: %s; removing it", peer.name, why)
        if peer.fallback is not None:
            peer.fallback.cancel()
        if self._negotiator is not None:
            self._negotiator.forget(peer.spec.device)
        if self._routes is not None:
            await self._routes.clear(peer.name)
        if self._relays is not None:
            self._relays.drop(peer.name)
        if peer.configured_key:
            await self._owner.request("remove_peer", public_key=peer.configured_key)

    # -- candidates and checks ----------------------------------------------------------

    def _client_for(self, source: str | None) -> StunClient:
        """A STUN client on the WireGuard port, sending from `source` (None: as routed)."""
        assert self._port is not None
        client = self._stun_clients.get(source)
        if client is None:
            transport = self._port if source is None else self._port.from_source(source)
            client = self._stun_clients[source] = StunClient(transport, self._stun_counters)
            transport.receiver = client.datagram_received
        return client

    async def _gather(self) -> None:
        """Host and srflx candidates from the WireGuard port, relayed ones from the
        relays, at once."""
        assert self.state is not None and self._relays is not None
        servers = await resolve_servers(self.config.stun, timeout=2.0)
        self.local, _ = await asyncio.gather(
            gather_local(self.state.listen_port, servers, self._client_for,
                         self.config.interface_exclude, [self.config.overlay]),
            self._relays.ensure(self.config.relays),
        )
        self.local.candidates += self._relays.candidates()
        self._mux.set_local_candidates(self.local.candidates)
        log.info("local candidates: %s", ", ".join(
            f"{c.type} {c.address}:{c.port}" for c in self.local.candidates) or "none")

    async def _gathered(self, timeout: float) -> None:
        if self._gathering is not None and not self._gathering.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._gathering), timeout)

    def _public_endpoint(self) -> str | None:
        """The server-reflexive address of the default uplink, if STUN found one."""
        hosts = [c for c in self.local.candidates if c.type == "host"]
        for cand in self.local.candidates:
            if cand.type == "srflx" and hosts and cand.interface == hosts[0].interface:
                return f"{cand.address}:{cand.port}"
        return None

    def _punch(self, endpoint: str) -> None:
        """Open our NAT towards a peer's announced (public) endpoint at once, so its
        checks get in before our own checks can start (they wait for its answer)."""
        if self._port is None or self.options.endpoint is not None:
            return
        ip, _, port = endpoint.rpartition(":")
        if any(c.address == ip for c in self.local.candidates):
            return
        indication = stun.Message(stun.Method.BINDING, stun.Class.INDICATION)
        with contextlib.suppress(OSError):
            self._port.send(bytes(indication), (ip, int(port)))

    async def _offer_candidates(self) -> list[CandidateInfo]:
        """Our candidates for an offer or answer, once gathering is done (bounded)."""
        await self._gathered(GATHER_WAIT_S)
        return [CandidateInfo(c.type, c.address, c.port, c.priority, f"{c.type}{i}")
                for i, c in enumerate(self.local.candidates)]

    def _on_port_datagram(self, data: bytes, src: Address, local_ip: str) -> None:
        self._mux.datagram_received(data, src, self._mux.local_candidate(local_ip))

    def _on_relay_stun(self, data: bytes, src: Address, local: Candidate) -> None:
        self._mux.datagram_received(data, src, local)

    def _on_relay_lost(self, allocation: RelayAllocation) -> None:
        # Consent checks move each peer off it within seconds; a fresh allocation
        # (this relay or another) and a renegotiation bring a relayed path back.
        self._spawn(self._on_network_change())

    def _make_checker(self, spec: CheckerSpec) -> _RegisteredChecker:
        device = spec.peer
        checker = PeerChecker(
            self.local.candidates, spec.ufrag, spec.pwd, controlling=spec.controlling,
            tie_breaker=spec.tie_breaker, send=self._send_check,
            on_selected=lambda pair, reason: self._spawn(self._on_selected(device, pair,
                                                                             reason)),
            name=str(device),
        )
        self._mux.register(spec.ufrag, checker)
        return _RegisteredChecker(checker, self._mux)

    def _send_check(self, data: bytes, dest: Address, local: Candidate) -> None:
        assert self._port is not None and self._relays is not None
        if local.type == "relay":
            self._relays.send(data, dest, local)
            return
        try:
            self._port.send(data, dest, source=local.address)
        except OSError as exc:
            log.debug("check to %s:%d not sent: %s", *dest, exc)

    async def _post_negotiation(self, text: str) -> None:
        await self.keybase.send(self.negotiation_channel, text)

    async def _on_selected(self, device: DeviceId, pair: CandidatePair | None,
                           reason: str) -> None:
        assert self.state is not None and self._routes is not None
        peer = self.state.peers.get(device)
        if peer is None or peer.configured_key is None:
            return
        if pair is None:
            log.warning("%s: %s", peer.name, reason)
            return
        assert self._relays is not None
        remote_ip, remote_port = pair.remote_address
        proxy = await self._relays.route(peer.name, pair.local, pair.remote_address)
        if proxy is not None:
            # Relayed by our allocation: WireGuard talks to our loopback proxy.
            await self._routes.clear(peer.name)
            peer.route = None
            await self._set_endpoint(peer, proxy, NEGOTIATED)
        else:
            peer.route = await self._routes.follow(peer.name, remote_ip,
                                                   pair.local.interface)
            await self._set_endpoint(peer, f"{remote_ip}:{remote_port}", NEGOTIATED)
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
            if self._relays is not None and self._relays.missing(self.config.relays):
                # A relay that was down (or forgot our allocation) may be back.
                await self._on_network_change()

    async def _stats_loop(self) -> None:
        while True:
            await self._poll_stats()
            await asyncio.sleep(self.options.stats_s)

    async def _poll_stats(self) -> None:
        assert self.state is not None and self._owner is not None
        stats = await self._owner.request("stats")
        by_key = {p["public_key"]: p for p in stats.get("peers", [])}
        for peer in self.state.peers.values():
            current = by_key.get(peer.configured_key or "")
            if current is None:
                continue
            if peer.observe(float(current.get("last_handshake") or 0.0),
                            int(current.get("rx_bytes") or 0),
                            int(current.get("tx_bytes") or 0)):
                log.info("handshake with %s (%s) over %s", peer.name, peer.spec.overlay_ip,
                         peer.endpoint)
            if peer.endpoint_source == ANNOUNCED and current.get("endpoint"):
                # WireGuard roams to where the peer's packets come from.
                peer.endpoint = current["endpoint"]

    async def _watch_network(self) -> None:
        watcher = NetworkWatcher(self._on_network_change,
                                 ignore_ifnames=[self.options.interface])
        await watcher.run()

    async def _on_network_change(self) -> None:
        assert self.state is not None
        async with self._regather:
            before = {(c.type, c.address, c.port) for c in self.local.candidates}
            self._gathering = asyncio.create_task(self._gather(), name="gather")
            await self._gathering
            after = {(c.type, c.address, c.port) for c in self.local.candidates}
        if after == before:
            return
        log.info("network changed: candidates now %s; renegotiating",
                 ", ".join(sorted(f"{t} {a}:{p}" for t, a, p in after)) or "none")
        if self.options.endpoint is None:
            ip, _ = await self._announce_target()
            endpoint = f"{ip}:{self.state.listen_port}"
            if endpoint != self.state.announced_endpoint:
                self.state.announced_endpoint = endpoint
                await self._announce()
        if self._negotiator is not None:
            await self._negotiator.restart_all()

    # -- control --------------------------------------------------------------------------

    def _sorted_peers(self) -> list[PeerState]:
        assert self.state is not None
        return sorted(self.state.peers.values(),
                      key=lambda p: (p.spec.overlay_ip, p.spec.device.username))

    def _peer_json(self, peer: PeerState) -> dict[str, Any]:
        negotiation = (self._negotiator.snapshot(peer.spec.device)
                       if self._negotiator is not None else {})
        return peer.to_json(negotiation)

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        await self._poll_stats()
        s = self.state
        return {
            "team": self.options.team,
            "username": s.me.username,
            "device": s.me.device,
            "overlay_ip": str(s.overlay_ip),
            "dynamic": not s.listed,
            "policy": str(self.config.policy),
            "public_key": s.public_key,
            "interface": s.interface,
            "backend": s.backend,
            "listen_port": s.listen_port,
            "endpoint": s.announced_endpoint,
            "started_at": s.started_at,
            "candidates": self.local.to_json(),
            "relays": self._relays.to_json() if self._relays is not None else [],
            "claims": [c.to_json() for c in self._claims.live_claims(time.time())],
            "peers": [self._peer_json(p) for p in self._sorted_peers()],
        }

    async def _diag(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        timeout = request.get("diag_timeout", 5.0)
        options = DiagOptions(
            stun=list(self.config.stun), relays=list(self.config.relays),
            port=self.state.listen_port,
            timeout=float(timeout) if isinstance(timeout, int | float) and timeout > 0 else 5.0,
            interface_exclude=list(self.config.interface_exclude),
            overlay=self.config.overlay, classic=bool(request.get("classic", True)),
            config_source=f"team {self.options.team} kbwg.json",
        )
        report = await diagnose(options, self._client_for(None), self.state.listen_port,
                                self._stun_counters, client_for=self._client_for, mode="agent")
        data = report.to_json()
        data["peers"] = [self._peer_diag(p) for p in self._sorted_peers()]
        data["claims"] = [c.to_json() for c in self._claims.live_claims(time.time())]
        return data

    def _peer_diag(self, peer: PeerState) -> dict[str, Any]:
        negotiation = (self._negotiator.snapshot(peer.spec.device)
                       if self._negotiator is not None else {})
        ann = peer.spec.announcement
        session = (self._negotiator.sessions.get(peer.spec.device)
                   if self._negotiator is not None else None)
        remote = getattr(session.checker, "remote_candidates", []) if session else []
        candidates = [{"type": c.type, "ip": c.ip, "port": c.port} for c in remote]
        if ann is not None:
            candidates.append({"type": "announced", "ip": ann.endpoint_ip,
                               "port": ann.endpoint_port})
        pairs = [{"local": a.get("local"), "remote": a.get("remote"), "state": a.get("state"),
                  "rtt_ms": a.get("rtt_ms")}
                 for a in negotiation.get("alternatives", [])]
        if negotiation.get("local_candidate"):
            pairs.insert(0, {"local": negotiation["local_candidate"],
                             "remote": negotiation["remote_candidate"],
                             "state": "selected", "rtt_ms": negotiation.get("rtt_ms")})
        return {**peer.to_json(negotiation), "candidates": candidates, "pairs": pairs}



@dataclass
class _RegisteredChecker:
    """A checker as the negotiator sees it: closing it also unregisters it from the mux."""

    checker: PeerChecker
    mux: CheckMux

    @property
    def remote_candidates(self) -> list[CandidateInfo]:
        seen: dict[tuple[str, int], CandidateInfo] = {}
        for pair in self.checker.pairs:
            seen.setdefault((pair.remote.ip, pair.remote.port), pair.remote)
        return list(seen.values())

    def set_remote(self, ufrag: str, pwd: str, candidates: list[CandidateInfo]) -> None:
        self.checker.set_remote(ufrag, pwd, candidates)

    def snapshot(self) -> dict[str, Any]:
        return self.checker.snapshot()

    def close(self) -> None:
        self.mux.unregister(self.checker.ufrag)
        self.checker.close()
