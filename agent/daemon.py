"""`kbwg-agent join`: the agent that keeps this device's WireGuard peers in step with the
team's peers.json and `#announce` channel.

Start-up order matters for time to first packet: the live listener starts before the
history read (so nothing falls between them), peers from history are configured before
our own announcement goes out, and every peer gets a persistent keepalive so the side
that learns of the other last starts the handshake at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from kbwg.agent.announce import (
    ANNOUNCE_TTL_S,
    AnnounceBook,
    AnnounceError,
    Announcement,
    format_announce,
    parse_announce,
)
from kbwg.agent.control import ControlServer
from kbwg.agent.diag import DiagOptions, diagnose
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient, KeybaseError
from kbwg.agent.localaddr import pick_announce_address
from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.peers import DeviceId, PeerEntry, PeersError, parse_peers
from kbwg.agent.teamconfig import (
    TeamConfig,
    TeamConfigError,
    load_team_config,
    team_config_path,
)
from kbwg.negotiation.gathering import LocalCandidates, gather_local, resolve_servers
from kbwg.negotiation.shared_port import SharedPortTransport
from kbwg.negotiation.stun_client import StunClient, StunCounters

log = logging.getLogger(__name__)

LISTENER_READY_TIMEOUT_S = 5.0


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


@dataclass
class PeerState:
    entry: PeerEntry
    announcement: Announcement | None = None
    configured_key: str | None = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    wg_endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        ann = self.announcement
        return {
            "username": self.entry.username,
            "device": self.entry.device,
            "overlay_ip": str(self.entry.ip),
            "public_key": ann.public_key if ann else None,
            "endpoint": self.wg_endpoint or (ann.endpoint if ann else None),
            "announced_endpoint": ann.endpoint if ann else None,
            "announced_at": ann.sent_at if ann else None,
            "last_handshake": self.last_handshake or None,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
        }


@dataclass
class AgentState:
    me: DeviceId
    overlay_ip: str
    public_key: str
    listen_port: int
    interface: str
    backend: str
    announced_endpoint: str
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
        self._stun_counters = StunCounters()
        self._stun_clients: dict[str | None, StunClient] = {}
        self._gathering: asyncio.Task[None] | None = None
        self.local = LocalCandidates()
        self._state_ready = asyncio.Event()
        self._control: ControlServer | None = None
        self._book = AnnounceBook()
        self._apply_lock = asyncio.Lock()
        self._peers_raw: bytes | None = None
        self.state: AgentState | None = None
        self.config = TeamConfig()
        self.announce_channel = Channel(options.team, self.config.announce_channel, "chat")

    @property
    def peers_path(self) -> str:
        return f"/keybase/team/{self.options.team}/peers.json"

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; start-up problems raise JoinError and clean up."""
        listener_ready = asyncio.Event()
        stopper = asyncio.create_task(stop.wait(), name="stop")
        tasks = [asyncio.create_task(self._follow_announcements(listener_ready), name="listen")]
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
            ]
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            self._raise_failures(tasks)
        finally:
            for task in [stopper, *tasks]:
                task.cancel()
            await asyncio.gather(stopper, *tasks, return_exceptions=True)
            await self._shutdown()

    @staticmethod
    def _raise_failures(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    # -- start-up ---------------------------------------------------------------

    async def _start(self, listener_ready: asyncio.Event) -> None:
        # The device owner (a process start, then wireguard-go) is the slowest step, so
        # it starts while Keybase is asked who we are and what peers.json says.
        self._owner_task = asyncio.create_task(self._owner_factory(self.options.owner_command))
        identity, self.config = await asyncio.gather(
            self.keybase.whoami(), self._load_config()
        )
        self.announce_channel = Channel(self.options.team, self.config.announce_channel, "chat")
        entries = await self._load_peers(strict=True)
        me = DeviceId(identity.username, identity.device)
        mine = next((e for e in entries if e.device_id == me), None)
        if mine is None:
            raise JoinError(
                f"this device ({me}) is not listed in {self.peers_path}; ask a team admin "
                f'to add {{"username": "{me.username}", "device": "{me.device}", '
                f'"ip": "<free address in {self.config.overlay}>"}}'
            )
        key = PrivateKey.generate()
        public_key = base64.b64encode(bytes(key.public_key)).decode()
        announce_ip, announce_port = await self._announce_target()

        self._owner = await self._owner_task
        created = await self._owner.request(
            "create",
            ifname=self.options.interface,
            private_key=base64.b64encode(bytes(key)).decode(),
            listen_port=self.options.listen_port,
            address=f"{mine.ip}/{self.config.overlay.prefixlen}",
            backend=self.options.backend,
        )
        port = int(created["listen_port"])
        self.state = AgentState(
            me=me,
            overlay_ip=str(mine.ip),
            public_key=public_key,
            listen_port=port,
            interface=self.options.interface,
            backend=str(created.get("backend", self.options.backend)),
            announced_endpoint=f"{announce_ip}:{announce_port or port}",
        )
        self._set_entries(entries)
        self._state_ready.set()
        log.info(
            "%s is %s on %s (%s backend, port %d)",
            me, mine.ip, self.options.interface, self.state.backend, port,
        )

        self._port = await SharedPortTransport.open(self._owner)
        self._stun = self._client_for(None)
        self._gathering = asyncio.create_task(self._gather(), name="gather")
        self._control = ControlServer(
            self.options.state_dir, {"status": self._status, "diag": self._diag}
        )
        await self._control.start()
        await self._join_channel(self.announce_channel)
        # History is read only once the listener is subscribed, so that no announcement
        # falls between the two.
        try:
            await asyncio.wait_for(listener_ready.wait(), LISTENER_READY_TIMEOUT_S)
        except TimeoutError:
            log.warning("chat listener not confirmed after %.0fs; reading history anyway",
                        LISTENER_READY_TIMEOUT_S)
        await self._read_history()
        body = format_announce(announce_ip, announce_port or port, public_key)
        await self.keybase.send(self.announce_channel, body)
        log.info("announced %s in #%s", self.state.announced_endpoint,
                 self.announce_channel.topic_name)

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
        assert self.state is not None
        servers = await resolve_servers(self.config.stun, timeout=2.0)
        self.local = await gather_local(
            self.state.listen_port, servers, self._client_for,
            self.config.interface_exclude, [self.config.overlay],
        )
        log.info("local candidates: %s", ", ".join(
            f"{c.type} {c.address}:{c.port}" for c in self.local.candidates) or "none")

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
        ip = await pick_announce_address(exclude_ifnames=[self.options.interface])
        if ip is None:
            raise JoinError(
                "found no IPv4 address to announce; bring up a network interface "
                "or pass --endpoint IP[:PORT]"
            )
        return ip, 0

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
            return []
        self._peers_raw = raw
        return entries

    # -- peers ------------------------------------------------------------------

    def _set_entries(self, entries: list[PeerEntry]) -> list[PeerState]:
        """Adopt a new peer list; returns the states that were dropped."""
        assert self.state is not None
        wanted = {e.device_id: e for e in entries if e.device_id != self.state.me}
        mine = next((e for e in entries if e.device_id == self.state.me), None)
        if mine is not None and str(mine.ip) != self.state.overlay_ip:
            log.warning(
                "peers.json now gives this device %s (running with %s); restart join to use it",
                mine.ip, self.state.overlay_ip,
            )
        dropped = [s for d, s in self.state.peers.items() if d not in wanted]
        for device_id in [d for d in self.state.peers if d not in wanted]:
            del self.state.peers[device_id]
        for device_id, entry in wanted.items():
            current = self.state.peers.get(device_id)
            if current is None:
                self.state.peers[device_id] = PeerState(entry, self._book.latest.get(device_id))
            elif current.entry != entry:
                current.entry = entry
                current.configured_key = None  # allowed IPs must be re-applied
        return dropped

    async def _apply(self, peer: PeerState) -> None:
        assert self._owner is not None
        ann = peer.announcement
        if ann is None:
            return
        if peer.configured_key and peer.configured_key != ann.public_key:
            await self._owner.request("remove_peer", public_key=peer.configured_key)
            log.info("%s has a new key; old peer entry removed", peer.entry.device_id)
        await self._owner.request(
            "set_peer",
            public_key=ann.public_key,
            endpoint=ann.endpoint,
            allowed_ips=[f"{peer.entry.ip}/32"],
            keepalive=self.options.keepalive_s,
        )
        if peer.configured_key != ann.public_key:
            peer.last_handshake, peer.rx_bytes, peer.tx_bytes = 0.0, 0, 0
        peer.configured_key = ann.public_key
        peer.wg_endpoint = ann.endpoint
        log.info("peer %s (%s) at %s", peer.entry.device_id, peer.entry.ip, ann.endpoint)

    async def _handle_message(self, msg: ChatMessage, live: bool) -> None:
        assert self.state is not None
        ch = msg.channel
        if (ch.name, ch.topic_name, ch.topic_type) != (
            self.announce_channel.name, self.announce_channel.topic_name, "chat"
        ) or msg.body is None:
            return
        sender = DeviceId(msg.sender_username, msg.sender_device)
        if sender == self.state.me:
            return
        try:
            ann = parse_announce(msg.body, sender, msg.id, msg.sent_at)
        except AnnounceError as exc:
            log.warning("ignoring message %d from %s in #%s: %s",
                        msg.id, sender, ch.topic_name, exc)
            return
        if live and ann.sent_at < time.time() - ANNOUNCE_TTL_S:
            return
        peer = self.state.peers.get(sender)
        if peer is None:
            log.info("ignoring announcement from %s: not listed in peers.json", sender)
            return
        async with self._apply_lock:
            if not self._book.offer(ann):
                log.debug("ignoring older or repeated announcement %d from %s", msg.id, sender)
                return
            peer.announcement = ann
            await self._apply(peer)

    async def _read_history(self) -> None:
        since = time.time() - ANNOUNCE_TTL_S
        try:
            async for msg in self.keybase.read_history(self.announce_channel, since=since):
                await self._handle_message(msg, live=False)
        except KeybaseError as exc:
            # A team that never announced has no #announce yet; our send creates it.
            log.info("no announcement history read: %s", exc)

    # -- background loops -------------------------------------------------------

    async def _follow_announcements(self, ready: asyncio.Event) -> None:
        async for msg in self.keybase.listen(dev=True, ready=ready):
            # Messages that arrive during start-up wait here until peers are known.
            await self._state_ready.wait()
            await self._handle_message(msg, live=True)

    async def _refresh_loop(self) -> None:
        """Safety net for missed notifications, peers.json edits and announcement expiry."""
        assert self.state is not None
        last_announce = time.monotonic()
        # One early pass covers messages sent while the listener was still starting.
        delays = [2.0]
        while True:
            await asyncio.sleep(delays.pop() if delays else self.options.refresh_s)
            raw_before = self._peers_raw
            entries = await self._load_peers(strict=False)
            if entries and self._peers_raw != raw_before:
                async with self._apply_lock:
                    for dropped in self._set_entries(entries):
                        await self._forget(dropped)
                    for peer in self.state.peers.values():
                        if peer.configured_key is None and peer.announcement is not None:
                            await self._apply(peer)
            await self._read_history()
            if time.monotonic() - last_announce >= self.options.reannounce_s:
                ip, _, port = self.state.announced_endpoint.rpartition(":")
                await self.keybase.send(
                    self.announce_channel, format_announce(ip, int(port), self.state.public_key)
                )
                last_announce = time.monotonic()

    async def _forget(self, peer: PeerState) -> None:
        assert self._owner is not None
        log.info("%s is no longer in peers.json; removing it", peer.entry.device_id)
        self._book.latest.pop(peer.entry.device_id, None)
        if peer.configured_key:
            await self._owner.request("remove_peer", public_key=peer.configured_key)

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
            handshake = float(current.get("last_handshake") or 0.0)
            if handshake and not peer.last_handshake:
                log.info("handshake with %s (%s)", peer.entry.device_id, peer.entry.ip)
            peer.last_handshake = handshake
            peer.rx_bytes = int(current.get("rx_bytes") or 0)
            peer.tx_bytes = int(current.get("tx_bytes") or 0)
            peer.wg_endpoint = current.get("endpoint") or peer.wg_endpoint

    # -- control and shutdown ---------------------------------------------------

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        await self._poll_stats()
        s = self.state
        return {
            "team": self.options.team,
            "username": s.me.username,
            "device": s.me.device,
            "overlay_ip": s.overlay_ip,
            "public_key": s.public_key,
            "interface": s.interface,
            "backend": s.backend,
            "listen_port": s.listen_port,
            "endpoint": s.announced_endpoint,
            "started_at": s.started_at,
            "candidates": self.local.to_json(),
            "peers": [p.to_json() for p in self._sorted_peers()],
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
        return data

    def _peer_diag(self, peer: PeerState) -> dict[str, Any]:
        ann = peer.announcement
        return {
            **peer.to_json(),
            "candidates": [{"type": "announced", "ip": ann.endpoint_ip,
                            "port": ann.endpoint_port}] if ann else [],
            "pairs": [],
        }

    def _sorted_peers(self) -> list[PeerState]:
        assert self.state is not None
        return sorted(self.state.peers.values(), key=lambda p: (p.entry.ip, p.entry.username))

    async def _shutdown(self) -> None:
        if self._control is not None:
            await self._control.close()
        if self._gathering is not None:
            self._gathering.cancel()
            await asyncio.gather(self._gathering, return_exceptions=True)
        if self._port is not None:
            await self._port.close()
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
