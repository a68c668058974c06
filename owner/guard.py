"""What the owner refuses, whatever the frame's syntax: the judge of every parsed request
against the local policy (kbwg.owner.policy) and live facts (the host's routes, the
device's address and peers).

A refusal names a stable key (counted in the `stats` reply under `refusals`) and a
reason the agent's log can show as it is.

IPv6 endpoints and host routes are judged as IPv4 ones are: the overlay is IPv4 (a v6
address can never be inside it), and unspecified, loopback (routes only) and multicast
addresses are refused in both families; IPv6 link-local ones too, since they mean
nothing without a scope, which neither WireGuard's endpoint nor a host route here
carries. Documentation ranges (192.0.2.0/24 and friends, 2001:db8::/32) are accepted
in both: no real network uses them, and test worlds use them as their internet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address

from kbwg.owner.netconfig import Egress, IPInterface, NetConfig
from kbwg.owner.policy import (
    OwnerPolicy,
    check_allowed_ip,
    check_interface_name,
    check_listen_port,
    check_overlay,
)
from kbwg.owner.protocol import (
    AddRouteArgs,
    CreateArgs,
    ProtocolError,
    SetPeerArgs,
    parse_endpoint,
)
from kbwg.owner.wg_backend import PeerStats

# Keys of the `refusals` counters in the stats reply (add, never rename).
R_INTERFACE_NAME = "interface_name"
R_LISTEN_PORT = "listen_port"
R_OVERLAY = "overlay"
R_ADDRESS = "address"
R_OVERLAY_CHANGE = "overlay_change"
R_ALLOWED_IP = "allowed_ip"
R_ENDPOINT = "endpoint"
R_KEEPALIVE = "keepalive"
R_ROUTE_VIA = "route_via"
R_ROUTE_DESTINATION = "route_destination"
R_ROUTE_NOT_PEER = "route_not_peer"
R_ROUTE_INTERFACE = "route_interface"
R_ROUTE_EGRESS = "route_egress"
R_ROUTE_NOT_OURS = "route_not_ours"
R_PEERS = "peers"

# WireGuard takes up to 65535 s; beyond an hour a keepalive keeps no NAT mapping open.
MAX_KEEPALIVE = 3600

REFUSED_PREFIX = "refused: "


class Refusal(Exception):
    """A well-formed request the owner will not carry out."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return REFUSED_PREFIX + self.reason


def _refuse_if(key: str, problem: str | None) -> None:
    if problem is not None:
        raise Refusal(key, problem)


@dataclass(frozen=True)
class Guard:
    policy: OwnerPolicy
    net: NetConfig

    async def create(self, spec: CreateArgs) -> None:
        _refuse_if(R_INTERFACE_NAME, check_interface_name(spec.ifname))
        _refuse_if(R_LISTEN_PORT, check_listen_port(spec.listen_port))
        await self._overlay_address(spec.address, spec.ifname)

    async def set_address(self, address: IPInterface, overlay: IPv4Network,
                          ifname: str) -> None:
        await self._overlay_address(address, ifname)
        if address.network != overlay:
            raise Refusal(R_OVERLAY_CHANGE,
                          f"{address} is not in the device's overlay {overlay}")

    async def _overlay_address(self, address: IPInterface, ifname: str) -> None:
        if not isinstance(address, IPv4Interface):
            raise Refusal(R_OVERLAY, f"overlay address {address} is not IPv4")
        network = address.network
        routes = await self.net.route_destinations(exclude_ifname=ifname)
        _refuse_if(R_OVERLAY, check_overlay(network, self.policy, routes))
        if network.prefixlen < 31 and address.ip in (network.network_address,
                                                     network.broadcast_address):
            raise Refusal(R_ADDRESS, f"{address} is the network or broadcast address of "
                                     f"{network}")

    def set_peer(self, spec: SetPeerArgs, overlay: IPv4Network) -> None:
        for cidr in spec.allowed_ips:
            # Our own address is not refused: while two devices settle an address
            # conflict the other one holds it for a moment, and the host's local route
            # keeps that address's traffic here anyway.
            _refuse_if(R_ALLOWED_IP, check_allowed_ip(ipaddress.ip_network(cidr), overlay))
        if spec.endpoint is not None:
            _refuse_if(R_ENDPOINT, _endpoint_problem(ipaddress.ip_address(spec.endpoint[0]),
                                                     overlay))
        if spec.keepalive > MAX_KEEPALIVE:
            raise Refusal(R_KEEPALIVE,
                          f"keepalive {spec.keepalive} s is above {MAX_KEEPALIVE} s")

    async def add_route(self, spec: AddRouteArgs, has_via: bool, wg_ifname: str,
                        overlay: IPv4Network, peers: Iterable[PeerStats]) -> Egress:
        """The egress (the agent's uplink and the gateway the owner found on it) for a
        host route the owner may add."""
        if has_via:
            raise Refusal(R_ROUTE_VIA, "add_route takes no 'via': name the uplink (ifname) "
                                       "and the owner finds its gateway")
        destination = spec.destination
        dst = destination.network_address
        _refuse_if(R_ROUTE_DESTINATION, _unroutable(dst))
        if isinstance(dst, IPv6Address) and dst.is_link_local:
            raise Refusal(R_ROUTE_DESTINATION,
                          f"route destination {dst} is link-local: it needs no route")
        if dst.version == 4 and dst in overlay:
            raise Refusal(R_ROUTE_DESTINATION,
                          f"route destination {dst} is inside the overlay {overlay}")
        if dst not in _peer_endpoint_addresses(peers):
            raise Refusal(R_ROUTE_NOT_PEER,
                          f"route destination {dst} is not the endpoint of a current peer")
        if spec.ifname == wg_ifname:
            raise Refusal(R_ROUTE_INTERFACE, f"{spec.ifname} is the WireGuard interface")
        try:
            loopback = await self.net.is_loopback(spec.ifname)
        except Exception as exc:
            raise Refusal(R_ROUTE_INTERFACE, f"no usable interface {spec.ifname}: {exc}") from exc
        if loopback:
            raise Refusal(R_ROUTE_INTERFACE, f"{spec.ifname} is a loopback interface")
        egress = await self.net.egress(dst, spec.ifname)
        if egress is None or egress.ifname != spec.ifname:
            raise Refusal(R_ROUTE_EGRESS, f"the host has no route to {dst} through "
                                          f"{spec.ifname}")
        if egress.gateway is not None:
            gateway = ipaddress.ip_address(egress.gateway)
            if (gateway.version == 4 and gateway in overlay) or _unroutable(gateway):
                raise Refusal(R_ROUTE_EGRESS, f"the gateway towards {dst} on {spec.ifname} "
                                              f"is {gateway}, which is not usable")
        return egress


def _unroutable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        return f"{address} is an unspecified, loopback or multicast address"
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return f"{address} is an IPv4-mapped address: use the IPv4 address"
    if isinstance(address, IPv4Address) and address == IPv4Address("255.255.255.255"):
        return f"{address} is the broadcast address"
    return None


def _endpoint_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                      overlay: IPv4Network) -> str | None:
    # An IPv4-mapped address is judged as the IPv4 address it reaches: Python's
    # is_multicast and is_unspecified say False for ::ffff:224.0.0.1 and ::ffff:0.0.0.0.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # Loopback stays allowed: a relayed path's endpoint is the agent's local proxy.
    if address.is_unspecified or address.is_multicast:
        return f"endpoint {address} is an unspecified or multicast address"
    if isinstance(address, IPv6Address) and address.is_link_local:
        return f"endpoint {address} is link-local: WireGuard cannot use it without a scope"
    if address.version == 4 and address in overlay:
        return f"endpoint {address} is inside the overlay {overlay}"
    return None


def _peer_endpoint_addresses(peers: Iterable[PeerStats]) -> set[ipaddress.IPv4Address
                                                                 | ipaddress.IPv6Address]:
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for peer in peers:
        if peer.endpoint is None:
            continue
        try:
            host, _port = parse_endpoint(peer.endpoint)
        except ProtocolError:
            continue
        found.add(ipaddress.ip_address(host))
    return found
