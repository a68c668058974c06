"""What a port mapping protocol gives back: a mapping, or an error saying why not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Protocol = Literal["pcp", "nat-pmp", "upnp"]
PROTOCOLS: tuple[Protocol, ...] = ("pcp", "nat-pmp", "upnp")


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
