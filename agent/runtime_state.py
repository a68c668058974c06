"""What the agent knows and has configured: about this device once `join` has started
(`AgentState`), and about each peer (`PeerState`, and how `status` shows it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from kbwg.agent.claims import Claim
from kbwg.agent.peer_selection import PeerSpec
from kbwg.core.identity import DeviceId

# How the WireGuard endpoint of a peer was chosen.
NEGOTIATED = "negotiated"
ANNOUNCED = "announced"
# A handshake this recent means the endpoint works: WireGuard rejects a session older
# than 180 s (REJECT_AFTER_TIME), and keepalives renew it well within that.
WORKING_HANDSHAKE_S = 180.0
# What WireGuard sends on an idle path, which is not traffic: a keepalive is 32 bytes
# (persistent ones every 25 s each way), a handshake 148 + 92 bytes and the initiator's
# keepalive after it. A data packet is at least 64 bytes (a ping exchange 256 on each
# side). Between two polls of an idle peer the counters move by at most one keepalive
# each way per 10 s and a handshake; anything beyond is traffic.
KEEPALIVE_NOISE_BYTES = 64
NOISE_PER_S = 10.0
HANDSHAKE_BYTES = 148 + 92 + 32


@dataclass
class PeerState:
    spec: PeerSpec
    configured_key: str | None = None
    configured_ip: str | None = None
    # The announcement the current configuration follows (message id, endpoint).
    announcement_id: int | None = None
    announcement_endpoint: str | None = None
    endpoint: str | None = None
    endpoint_source: str | None = None
    # When the current endpoint was set; the first handshake after it is `connected_at`.
    path_since: float | None = None
    connected_at: float | None = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    # When (time.monotonic) the counters were last read, and last moved by more than
    # keepalives and handshakes do.
    observed_at: float | None = None
    traffic_at: float | None = None
    fallback: asyncio.TimerHandle | None = None
    route: str | None = None
    # The peer's last sign of a restart that renewed WireGuard's entry, and when
    # (time.monotonic), until its other sign pairs with it (peer_sync.peer_checks_again).
    restart_sign: tuple[str, float] | None = None

    @property
    def name(self) -> str:
        return str(self.spec.device)

    def reset_counters(self) -> None:
        self.last_handshake, self.rx_bytes, self.tx_bytes = 0.0, 0, 0
        self.connected_at = None
        self.observed_at = None

    def busy(self, now: float, window: float) -> bool:
        """Whether traffic flowed to or from this peer in the last `window` seconds."""
        return self.traffic_at is not None and now - self.traffic_at < window

    def working(self, now: float) -> bool:
        """Whether the current endpoint is known to work: chosen by a sealed negotiation,
        or confirmed by a recent authenticated WireGuard handshake."""
        if self.endpoint is None:
            return False
        return (self.endpoint_source == NEGOTIATED
                or (self.last_handshake > 0 and now - self.last_handshake < WORKING_HANDSHAKE_S))

    def observe(self, last_handshake: float, rx: int, tx: int, now: float = 0.0) -> bool:
        """Take the device owner's counters (read at `now`, monotonic); True on the
        first handshake of a path. Sets `traffic_at` when they moved by more than an
        idle path's keepalives and handshakes (receiving or sending alike)."""
        if self.observed_at is not None:
            noise = KEEPALIVE_NOISE_BYTES * (1 + int(max(0.0, now - self.observed_at)
                                                     // NOISE_PER_S))
            if last_handshake != self.last_handshake:
                noise += HANDSHAKE_BYTES
            if (rx - self.rx_bytes) + (tx - self.tx_bytes) > noise:
                self.traffic_at = now
        self.observed_at = now
        self.last_handshake, self.rx_bytes, self.tx_bytes = last_handshake, rx, tx
        if (self.connected_at is None and last_handshake and self.path_since is not None
                and last_handshake >= self.path_since - 1.0):
            self.connected_at = last_handshake
            return True
        return False

    def to_json(self, negotiation: dict[str, Any]) -> dict[str, Any]:
        spec, ann = self.spec, self.spec.announcement
        path = negotiation.get("path") or "none"
        reason = negotiation.get("reason")
        if self.endpoint_source == ANNOUNCED:
            path = "direct" if self.last_handshake else "none"
            reason = (f"announced endpoint {self.endpoint}: "
                      f"{negotiation.get('negotiation', 'no')} negotiation")
        return {
            "username": spec.device.username,
            "device": spec.device.device,
            "overlay_ip": str(spec.overlay_ip),
            "dynamic": spec.dynamic,
            "claim": None if spec.claim is None else {
                "ip": str(spec.claim.ip), "msg_id": spec.claim.msg_id,
                "sent_at": spec.claim.sent_at},
            "public_key": ann.public_key if ann else None,
            "endpoint": self.endpoint,
            "endpoint_source": self.endpoint_source,
            "announced_endpoint": ann.endpoint if ann else None,
            "announced_at": ann.sent_at if ann else None,
            "path": path,
            "local_candidate": negotiation.get("local_candidate"),
            "remote_candidate": negotiation.get("remote_candidate"),
            "interface": negotiation.get("interface"),
            "rtt_ms": negotiation.get("rtt_ms"),
            # The lowest RTT of the last 30 s: what path choice compares.
            "base_rtt_ms": negotiation.get("base_rtt_ms"),
            # "active": consent at the path's RTT pace (new path, or traffic within
            # CheckTimers.active_window); "idle": CheckTimers.consent_idle_interval (15 s).
            "consent_pace": negotiation.get("consent_pace"),
            "reason": reason or spec.refused or "waiting for the peer's announcement",
            "negotiation": negotiation.get("negotiation", "none"),
            "host_route": self.route,
            "connected_at": self.connected_at,
            "last_handshake": self.last_handshake or None,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
        }


@dataclass
class AgentState:
    """This device in the mesh, once `join` has started: the subject of `status`."""

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
