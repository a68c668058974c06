"""Local candidates of the WireGuard port: host addresses, and server-reflexive ones
learnt by STUN from each host address through the shared port.

Asking from every host address (not only the default route's) is what lets a
multi-homed host offer one server-reflexive candidate per uplink.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kbwg.core.addresses import HostPort, ip_family
from kbwg.negotiation.candidates import (
    Candidate,
    InterfaceSource,
    StunServerResult,
    gather_host_candidates,
    gather_srflx,
)
from kbwg.negotiation.stun_client import Address, StunClient, resolve

log = logging.getLogger(__name__)


@dataclass
class LocalCandidates:
    candidates: list[Candidate] = field(default_factory=list)
    stun: list[StunServerResult] = field(default_factory=list)
    gathered_at: float = 0.0

    def to_json(self) -> list[dict[str, object]]:
        return [c.to_json() for c in self.candidates]


async def resolve_servers(
    servers: Sequence[HostPort], timeout: float, family: int = socket.AF_INET,
) -> list[tuple[str, Address | None]]:
    """(name as configured, resolved address or None) for each server, IPv4 unless
    `family` says AF_INET6."""

    async def one(server: HostPort) -> tuple[str, Address | None]:
        name = str(server)
        try:
            return name, await asyncio.wait_for(
                resolve(server.host, server.port, family), timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError (UnicodeError among them): a name the resolver cannot encode.
            if family == socket.AF_INET:  # most servers have no IPv6: not worth a line
                log.info("cannot resolve %s: %s", name, exc)
            return name, None

    return list(await asyncio.gather(*(one(s) for s in servers)))


async def resolve_dual(
    servers: Sequence[HostPort], timeout: float
) -> list[tuple[str, Address | None]]:
    """Every server's IPv4 address (or None), then the IPv6 addresses of those that
    have one: STUN from IPv6 host addresses asks those (server-reflexive IPv6)."""
    four, six = await asyncio.gather(resolve_servers(servers, timeout),
                                     resolve_servers(servers, timeout, socket.AF_INET6))
    return four + [(name, addr) for name, addr in six if addr is not None]


def _same_family(servers: Sequence[tuple[str, Address | None]],
                 local_ip: str) -> list[tuple[str, Address | None]]:
    """The servers a STUN request from `local_ip` can reach: those of its family (an
    IPv6 host address asks IPv6 servers only)."""
    family = ip_family(local_ip)
    return [(name, addr) for name, addr in servers
            if (addr is not None and ip_family(addr[0]) == family)
            or (addr is None and family == 4)]


async def gather_local(
    port: int,
    servers: Sequence[tuple[str, Address | None]],
    client_for: Callable[[str], StunClient],
    exclude_patterns: Iterable[str],
    exclude_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
    timeout: float = 2.0,
    *,
    addresses: InterfaceSource,
) -> LocalCandidates:
    """Host candidates, then srflx from each host address at once.

    `client_for(address)` gives a StunClient whose requests leave from that local
    address on the WireGuard port; `addresses` gives the host's interface addresses
    (the agent's asks the device owner).
    """
    hosts = gather_host_candidates(port, exclude_patterns, exclude_networks,
                                   addresses=await addresses())
    result = LocalCandidates(candidates=list(hosts))
    if servers and hosts:
        gathered = await asyncio.gather(*(
            gather_srflx(client_for(h.address), _same_family(servers, h.address),
                         (h.address, port), timeout=timeout, rto=0.2)
            for h in hosts
        ))
        seen: set[tuple[str, int]] = set()
        for host, (srflx, stun) in zip(hosts, gathered, strict=True):
            if host is hosts[0]:
                result.stun = stun
            for cand in srflx:
                if (cand.address, cand.port) in seen:
                    continue
                seen.add((cand.address, cand.port))
                cand.interface = host.interface
                result.candidates.append(cand)
    result.gathered_at = time.time()
    return result
