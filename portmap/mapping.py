"""What a port mapping protocol gives back: a mapping, or an error saying why not."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Protocol = Literal["pcp", "nat-pmp", "upnp"]
PROTOCOLS: tuple[Protocol, ...] = ("pcp", "nat-pmp", "upnp")

# RFC 6887 15: a PCP server's shortest lease SHOULD be 120 s. A shorter one would be
# renewed twice a second (a 1 s lease), each renewal able to move the external port and
# with it every peer's path: anything on the LAN can forge such an answer.
MIN_LEASE_S = 120
# Never the public side of a gateway. Peers refuse the first kinds in an ANNOUNCE or
# CANDIDATES line (the whole line, and with it this device); a private or shared
# (carrier-grade NAT, also the default overlay) address is the gateway's side of another
# NAT, which no peer outside reaches: its STUN address is the one they reach.
_NOT_PUBLIC = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


class PortmapError(Exception):
    """A gateway did not map the port; the message says why, for a log line or `diag`.

    `kind`: "timeout" (no answer), "refused" (ICMP unreachable: nothing listens),
    "garbage" (answers we cannot decode), "error" (a decodable refusal, e.g. NAT-PMP
    result 2, a SOAP fault).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Mapping:
    """One UDP mapping on a gateway: `external_ip:external_port` reaches
    `internal_ip:internal_port`."""

    protocol: Protocol
    gateway: str
    internal_ip: str
    internal_port: int
    external_ip: str
    external_port: int
    lifetime: int  # seconds, as granted
    obtained_at: float  # loop time
    # PCP: the nonce that owns the mapping (renewal and deletion must repeat it).
    nonce: bytes = b""
    # UPnP: the control URL the mapping was made through.
    control: Any = None
    created_at: float = field(default_factory=time.time)

    @property
    def external(self) -> str:
        return f"{self.external_ip}:{self.external_port}"

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "gateway": self.gateway,
                "internal": f"{self.internal_ip}:{self.internal_port}",
                "external": self.external, "lifetime_s": self.lifetime,
                "created_at": round(self.created_at, 3)}


def mapping_problem(mapping: Mapping, lease_asked: int) -> str | None:
    """Why peers could not use what the gateway says it mapped, or None.

    Whoever answers from the gateway's address is believed (NAT-PMP has no nonce, and a
    PCP nonce travels in the clear): this keeps the answer to something peers can use.
    The external address and port are still the answerer's choice; checks and WireGuard
    authenticate the peer on the other end, so what it can cost is wasted checks."""
    try:
        ip = ipaddress.IPv4Address(mapping.external_ip)
    except ValueError:
        return f"external address {mapping.external_ip[:45]!r} is not IPv4"
    if any(ip in network for network in _NOT_PUBLIC):
        return (f"external address {ip} is not a public one (another NAT in front of the "
                "gateway, or a forged answer)")
    if not 0 < mapping.external_port < 65536:
        return f"external port {mapping.external_port} is out of range"
    if mapping.lifetime < min(MIN_LEASE_S, lease_asked):
        return f"a lease of {mapping.lifetime} s is too short to keep"
    return None
