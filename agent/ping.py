"""The agent's side of `kbwg-agent ping`: which peer is meant, and one sealed ping to it.

The control socket's `ping` request is `{"cmd": "ping", "peer": NAME, "ping_timeout":
SECONDS}`; NAME is what `status` shows: `user/device`, a device name alone (when only
one peer has it) or the peer's overlay address. The reply is one ping's outcome
(`PingReply.to_json`). The ping itself is negotiation's (kbwg.negotiation.probe): a
STUN Binding over the selected pair, signed with the pair's check credentials, so only
the peer can answer it.

A peer that only announces (an agent without negotiation) shares no check credentials,
and nothing else it runs would answer a sealed message: its reply says so (`no-path`)
rather than pretending with an unsigned probe.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from kbwg.agent.control import RequestRefused
from kbwg.agent.runtime_state import ANNOUNCED, AgentState, PeerState
from kbwg.core.addresses import format_endpoint
from kbwg.core.identity import DeviceId
from kbwg.negotiation.probe import ProbeResult
from kbwg.negotiation.session import Negotiator

DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0

PingStatus = Literal["pong", "timeout", "no-path"]


@runtime_checkable
class Pingable(Protocol):
    """A peer's checker that can ping its selected pair (connectivity.RegisteredChecker)."""

    async def ping(self, timeout: float) -> ProbeResult | None: ...


def _name(peer: PeerState) -> str:
    return f"{peer.name} ({peer.spec.overlay_ip})"


def known_peers(peers: Iterable[PeerState]) -> str:
    names = sorted(_name(p) for p in peers)
    return ", ".join(names) if names else "none yet (see `kbwg-agent status`)"


def resolve_peer(name: str, peers: Iterable[PeerState], me: DeviceId | None = None,
                 my_ip: str | None = None) -> PeerState:
    """The peer `name` means: `user/device`, a device name or an overlay address, as
    `status` shows them (names compare case-insensitively); RequestRefused says why not
    and lists the known peers."""
    peers = list(peers)
    wanted = name.strip()
    folded = wanted.casefold()
    if me is not None and (folded in (str(me).casefold(), me.device.casefold())
                           or wanted == my_ip):
        raise RequestRefused(f"{wanted} is this device; ping one of its peers: "
                             f"{known_peers(peers)}")
    try:
        ip = str(ipaddress.ip_address(wanted))
    except ValueError:
        ip = None
    if ip is not None:
        matches = [p for p in peers if str(p.spec.overlay_ip) == ip]
    elif "/" in wanted:
        matches = [p for p in peers if p.name.casefold() == folded]
    else:
        matches = [p for p in peers if p.spec.device.device.casefold() == folded]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RequestRefused(
            f"several peers have a device named {wanted!r}: "
            f"{', '.join(sorted(_name(p) for p in matches))}; say which with user/device")
    raise RequestRefused(f"no peer {wanted!r} in this team; known peers: {known_peers(peers)}")


def _timeout(request: dict[str, Any]) -> float:
    value = request.get("ping_timeout", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value <= MAX_TIMEOUT_S):
        raise RequestRefused(f"the ping timeout must be a number of seconds in "
                             f"(0, {MAX_TIMEOUT_S:g}]")
    return float(value)


@dataclass(frozen=True)
class PingReply:
    """One ping's outcome, as the control socket sends it."""

    peer: PeerState
    status: PingStatus
    result: ProbeResult | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        pair = self.result.pair if self.result is not None else None
        rtt = self.result.rtt_ms if self.result is not None else None
        seen = self.result.seen_as if self.result is not None else None
        return {
            "peer": self.peer.name,
            "overlay_ip": str(self.peer.spec.overlay_ip),
            "status": self.status,
            "path": pair.path if pair is not None else "none",
            "local_candidate": pair.local_label() if pair is not None else None,
            "remote_candidate": pair.remote_label() if pair is not None else None,
            "interface": pair.local.interface if pair is not None else None,
            "endpoint": format_endpoint(pair.remote_address) if pair is not None else None,
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "seen_as": None if seen is None else format_endpoint(seen),
            "reason": self.reason,
        }


@dataclass
class PingReplies:
    """The control socket's `ping` for one joined device."""

    state: AgentState
    negotiator: Negotiator | None

    async def ping(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("peer")
        if not isinstance(name, str) or not name.strip():
            raise RequestRefused("say which peer to ping: user/device, a device name or "
                                 "an overlay address, as `kbwg-agent status` shows them")
        timeout = _timeout(request)
        peer = resolve_peer(name, self.state.peers.values(), self.state.me,
                            str(self.state.overlay_ip))
        return (await self.ping_peer(peer, timeout)).to_json()

    async def ping_peer(self, peer: PeerState, timeout: float) -> PingReply:
        if self.negotiator is None:
            return PingReply(peer, "no-path", reason="negotiation is off in this agent: "
                             "there are no check credentials to seal a ping with")
        session = self.negotiator.sessions.get(peer.spec.device)
        # While a renegotiation has no path yet, the retired checker carries the path.
        for checker in (session.checker, session.retired) if session is not None else ():
            if not isinstance(checker, Pingable):
                continue
            result = await checker.ping(timeout)
            if result is not None:
                if result.answered:
                    return PingReply(peer, "pong", result)
                return PingReply(peer, "timeout", result, result.error
                                 or f"no authenticated answer within {timeout:g} s")
        return PingReply(peer, "no-path", reason=self._why_no_path(peer))

    def _why_no_path(self, peer: PeerState) -> str:
        assert self.negotiator is not None
        view = peer.to_json(self.negotiator.snapshot(peer.spec.device))
        if peer.endpoint_source == ANNOUNCED:
            return (f"{peer.name} only announces an endpoint (an agent without "
                    "negotiation): no check credentials are shared with it, so no sealed "
                    "ping; `kbwg-agent status` shows its last WireGuard handshake")
        return f"no path yet: {view['reason']}"
