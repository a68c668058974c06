"""What `status` and `diag` answer about a running agent (the control socket's replies;
`ping`'s are in ping.py).

`status --json` and `diag --json` keys are documented in the README and only ever
added to. The agent's state is read, never changed, here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kbwg.agent.claims import ClaimBook
from kbwg.agent.connectivity import Connectivity
from kbwg.agent.control import Handler
from kbwg.agent.device_stats import StatsPoll
from kbwg.agent.keybase_link import KeybaseLink
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.agent.ping import PingReplies
from kbwg.agent.runtime_state import AgentState, PeerState
from kbwg.agent.teamconfig import TeamConfig
from kbwg.negotiation.session import Negotiator

DIAG_TIMEOUT_S = 5.0
DIAG_TIMEOUT_MAX_S = 60.0


def _sorted_peers(state: AgentState) -> list[PeerState]:
    return sorted(state.peers.values(), key=lambda p: (p.spec.overlay_ip, p.spec.device.username))


def _negotiation(negotiator: Negotiator | None, peer: PeerState,
                 paths: Connectivity | None = None) -> dict[str, Any]:
    snapshot = negotiator.snapshot(peer.spec.device) if negotiator is not None else {}
    early = paths.early_view if paths is not None else None
    return early(peer.spec.device, snapshot) if early is not None else snapshot


def _peer_json(peer: PeerState, negotiation: dict[str, Any]) -> dict[str, Any]:
    extra = {"early_checks": negotiation["early_checks"]} \
        if "early_checks" in negotiation else {}
    return {**peer.to_json(negotiation), **extra}


def status_report(team: str, state: AgentState, config: TeamConfig, paths: Connectivity,
                  claims: ClaimBook, negotiator: Negotiator | None,
                  keybase: KeybaseLink | None = None) -> dict[str, Any]:
    report = {
        "team": team,
        "username": state.me.username,
        "device": state.me.device,
        "overlay_ip": str(state.overlay_ip),
        "dynamic": not state.listed,
        "policy": str(config.policy),
        "public_key": state.public_key,
        "interface": state.interface,
        "backend": state.backend,
        "listen_port": state.listen_port,
        "endpoint": state.announced_endpoint,
        "started_at": state.started_at,
        "candidates": paths.local.to_json(),
        "relays": paths.relays.to_json(),
        "portmap": paths.portmap.to_json(),
        "claims": [c.to_json() for c in claims.live_claims(time.time())],
        "peers": [_peer_json(p, _negotiation(negotiator, p, paths))
                  for p in _sorted_peers(state)],
    }
    if keybase is not None:
        report["keybase"] = keybase.to_json()
    return report


def diag_timeout(request: dict[str, Any]) -> float:
    """The request's `diag_timeout`: the default when it is not a positive number (NaN
    included), at most `DIAG_TIMEOUT_MAX_S` (a day would hold the shared port's STUN
    clients that long)."""
    timeout = request.get("diag_timeout", DIAG_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        return DIAG_TIMEOUT_S
    return float(min(timeout, DIAG_TIMEOUT_MAX_S))


async def diag_report(request: dict[str, Any], team: str, state: AgentState,
                      config: TeamConfig, paths: Connectivity, claims: ClaimBook,
                      negotiator: Negotiator | None,
                      shared_port: OwnerStunTransport | None = None) -> dict[str, Any]:
    """`diag` run from the live WireGuard port, plus what is known of each peer and
    what the owner's shared-port filter passed and dropped (`shared_port`)."""
    # diag (and pystun3) is not part of `join`'s start: imported by the first request.
    from kbwg.agent.diag import DiagOptions, diagnose

    options = DiagOptions(
        stun=list(config.stun), relays=list(config.relays), port=state.listen_port,
        timeout=diag_timeout(request), interface_exclude=list(config.interface_exclude),
        overlay=config.overlay, classic=bool(request.get("classic", True)),
        config_source=f"team {team} kbwg.json",
    )
    report = await diagnose(options, paths.client_for(None), state.listen_port,
                            paths.stun_counters, client_for=paths.client_for, mode="agent")
    data = report.to_json()
    # The probe maps nothing: the agent's own mapping is the live one.
    mapping = paths.portmap.mapping
    data["portmap"]["mapping"] = mapping.to_json() if mapping is not None else None
    data["peers"] = [_peer_diag(p, negotiator, paths) for p in _sorted_peers(state)]
    # The live allocations: which transport each uses and why (UDP, or a fallback).
    data["relay_allocations"] = paths.relays.to_json()
    data["claims"] = [c.to_json() for c in claims.live_claims(time.time())]
    data["shared_port"] = await shared_port.filter_report() if shared_port is not None else {}
    return data


def _peer_diag(peer: PeerState, negotiator: Negotiator | None,
               paths: Connectivity | None = None) -> dict[str, Any]:
    negotiation = _negotiation(negotiator, peer, paths)
    ann = peer.spec.announcement
    session = negotiator.sessions.get(peer.spec.device) if negotiator is not None else None
    remote = getattr(session.checker, "remote_candidates", []) if session else []
    candidates = [{"type": c.type, "ip": c.ip, "port": c.port} for c in remote]
    if ann is not None:
        candidates.append({"type": "announced", "ip": ann.endpoint_ip,
                           "port": ann.endpoint_port})
    pairs = [{"local": a.get("local"), "remote": a.get("remote"), "state": a.get("state"),
              "rtt_ms": a.get("rtt_ms"), "base_rtt_ms": a.get("base_rtt_ms")}
             for a in negotiation.get("alternatives", [])]
    if negotiation.get("local_candidate"):
        pairs.insert(0, {"local": negotiation["local_candidate"],
                         "remote": negotiation["remote_candidate"],
                         "state": "selected", "rtt_ms": negotiation.get("rtt_ms"),
                         "base_rtt_ms": negotiation.get("base_rtt_ms")})
    return {**_peer_json(peer, negotiation), "candidates": candidates, "pairs": pairs}


@dataclass
class ControlReplies:
    """The control socket's `status`, `diag` and `ping`, for one joined device."""

    team: str
    state: AgentState
    config: TeamConfig
    paths: Connectivity
    claims: ClaimBook
    negotiator: Negotiator | None
    stats: StatsPoll
    keybase: KeybaseLink | None = None

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "diag": self.diag,
                "ping": PingReplies(self.state, self.negotiator).ping}

    async def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        await self.stats.poll()
        return status_report(self.team, self.state, self.config, self.paths, self.claims,
                             self.negotiator, self.keybase)

    async def diag(self, request: dict[str, Any]) -> dict[str, Any]:
        return await diag_report(request, self.team, self.state, self.config, self.paths,
                                 self.claims, self.negotiator, self.paths.shared_port)
