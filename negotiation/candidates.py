"""Local candidates: host addresses from the interfaces, server-reflexive from STUN.

Host candidates come from every up interface's IPv4 and IPv6 addresses (an
`InterfaceSource` gives them: kbwg.negotiation.host_addresses), minus loopback,
link-local, addresses inside the overlay, and interfaces matching the exclude globs
(the WireGuard device and other tunnels/virtual bridges: a peer reaching us through
another overlay would be routing WireGuard inside a tunnel it may not keep). IPv6
addresses that are still tentative (duplicate address detection), failed it, or are
deprecated are left out too: the kernel will not send from them, or not for long.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kbwg.negotiation.host_addresses import (
    InterfaceAddress,
    InterfaceSource,
)
from kbwg.negotiation.interface_defaults import DEFAULT_INTERFACE_EXCLUDE
from kbwg.negotiation.priority import LOCAL_PREFERENCE_MAX as _LOCAL_PREFERENCE_MAX
from kbwg.negotiation.priority import TYPE_PREFERENCE, candidate_priority
from kbwg.negotiation.stun_client import (
    Address,
    BindingResult,
    StunClient,
    StunError,
    format_address,
)

__all__ = ["TYPE_PREFERENCE", "Candidate", "CandidateType", "InterfaceAddress",
           "InterfaceSource", "StunServerResult", "candidate_priority", "excluded_interface",
           "gather_host_candidates", "gather_srflx", "host_address_problem",
           "mapped_candidate"]

log = logging.getLogger(__name__)

CandidateType = Literal["host", "srflx", "relay", "prflx", "mapped"]


@dataclass
class Candidate:
    type: CandidateType
    address: str
    port: int
    interface: str | None
    priority: int
    source: str
    # The local address:port the candidate is sent from (RFC 8445's base); None for host.
    base: str | None = None
    # A host candidate's on-link prefix length (its interface address's); None when not
    # known. Local only: never sent to peers.
    prefixlen: int | None = None

    def on_link(self, ip: str) -> bool | None:
        """Whether `ip` is in this host candidate's subnet; None when that is unknown."""
        if self.type != "host" or self.prefixlen is None:
            return None
        try:
            network = ipaddress.ip_network(f"{self.address}/{self.prefixlen}", strict=False)
            return ipaddress.ip_address(ip) in network
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type, "address": self.address, "port": self.port,
            "interface": self.interface, "priority": self.priority, "source": self.source,
            "base": self.base,
        }


def excluded_interface(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def host_address_problem(
    entry: InterfaceAddress, exclude_patterns: Iterable[str],
    exclude_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str | None:
    """Why this address is not a host candidate, or None when it is one."""
    if not entry.up:
        return "interface down"
    if excluded_interface(entry.interface, exclude_patterns):
        return "excluded interface"
    try:
        addr = ipaddress.ip_address(entry.address)
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return "IPv4-mapped"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast or addr.is_unspecified:
        return "not unicast"
    if any(addr in network for network in exclude_networks):
        return "overlay address"
    return None


def gather_host_candidates(
    port: int,
    exclude_patterns: Iterable[str] = DEFAULT_INTERFACE_EXCLUDE,
    exclude_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    *,
    addresses: Sequence[InterfaceAddress],
) -> list[Candidate]:
    """Host candidates for `port`, best first: the default-route interface leads, IPv4
    before IPv6 on each interface (pairs only join one family, so this orders checks,
    not the choice: choice.py weighs paths, not families).

    `addresses` are the host's, as an `InterfaceSource` gave them.
    """
    patterns = list(exclude_patterns)
    networks = list(exclude_networks)
    entries = list(addresses)
    usable = [e for e in entries if host_address_problem(e, patterns, networks) is None]
    usable.sort(key=lambda e: (not e.default_route, e.index,
                               ipaddress.ip_address(e.address).version,
                               ipaddress.ip_address(e.address).packed))
    candidates = []
    for rank, entry in enumerate(usable):
        # Distinct local preferences keep priorities unique on multi-homed hosts.
        local_pref = max(0, _LOCAL_PREFERENCE_MAX - rank)
        candidates.append(Candidate(
            type="host", address=entry.address, port=port, interface=entry.interface,
            priority=candidate_priority("host", local_pref),
            source=f"interface {entry.interface}", prefixlen=entry.prefixlen,
        ))
    return candidates


@dataclass
class StunServerResult:
    """One configured STUN server as seen from the gathering socket."""

    server: str
    address: Address | None
    binding: BindingResult | None = None
    error: str | None = None


async def gather_srflx(
    client: StunClient,
    servers: Sequence[tuple[str, Address | None]],
    base: Address,
    *,
    timeout: float = 3.0,
    rto: float = 0.5,
) -> tuple[list[Candidate], list[StunServerResult]]:
    """Ask every STUN server at once; one srflx candidate per distinct mapped address.

    `servers` pairs each server as configured (for reports) with its resolved address
    (None when it could not be resolved). `base` is the local address of the socket.
    """
    async def one(name: str, address: Address | None) -> StunServerResult:
        if address is None:
            return StunServerResult(name, None, error="cannot resolve")
        try:
            binding = await client.binding(address, timeout=timeout, rto=rto)
        except StunError as exc:
            return StunServerResult(name, address, error=str(exc))
        return StunServerResult(name, address, binding=binding)

    results = list(await asyncio.gather(*(one(name, addr) for name, addr in servers)))
    candidates: list[Candidate] = []
    seen: set[Address] = set()
    for result in results:
        if result.binding is None or result.binding.mapped in seen:
            continue
        mapped = result.binding.mapped
        seen.add(mapped)
        candidates.append(Candidate(
            type="srflx", address=mapped[0], port=mapped[1], interface=None,
            priority=candidate_priority("srflx", _LOCAL_PREFERENCE_MAX - len(candidates)),
            source=f"stun {result.server}", base=format_address(base),
        ))
    return candidates, results


def mapped_candidate(address: str, port: int, interface: str | None, source: str,
                     base: str) -> Candidate:
    """The port the gateway maps for us (kbwg.portmap); `base` is the WireGuard port's
    local address:port it leads to, where checks to it arrive."""
    return Candidate(type="mapped", address=address, port=port, interface=interface,
                     priority=candidate_priority("mapped"), source=source, base=base)
