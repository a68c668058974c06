"""Test-only collaborators of kbwg.owner.server.OwnerServer: an in-memory WireGuard
backend and a NetConfig that configures nothing but can report the host's routes and
uplinks. They live here, never in the privileged package."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from kbwg.core.addresses import format_endpoint
from kbwg.owner.netconfig import Egress, HostRoute, IPInterface
from kbwg.owner.wg_backend import BackendError, DeviceStats, PeerConfig, PeerStats

# The fake owner process (tests/fake_owner.py): the real server with these fakes.
FAKE_OWNER = [sys.executable, str(Path(__file__).with_name("fake_owner.py")),
              "--log-level", "DEBUG"]  # fmt: skip

# The uplink every FakeNetConfig has unless told otherwise: a default route via it.
UPLINK, UPLINK_GATEWAY = "eth9", "198.18.0.1"


class MemoryBackend:
    """In-memory WireGuard: no device, no process, no privileges."""

    name = "fake"
    outlives_owner = False

    def __init__(self) -> None:
        self.ifname: str | None = None
        self.private_key: bytes | None = None
        self._port = 0
        self._peers: dict[bytes, PeerConfig] = {}

    async def create(self, ifname: str, private_key: bytes, listen_port: int) -> int:
        if self.ifname is not None:
            raise BackendError(f"device {self.ifname} already exists")
        self.ifname = ifname
        self.private_key = private_key
        # An unused-looking port stands in for the one WireGuard would pick.
        self._port = listen_port or 51820
        return self._port

    async def set_peer(self, peer: PeerConfig) -> None:
        self._require()
        self._peers[peer.public_key] = peer

    async def remove_peer(self, public_key: bytes) -> None:
        self._require()
        self._peers.pop(public_key, None)

    async def peers(self) -> list[PeerStats]:
        self._require()
        return [
            PeerStats(
                public_key=p.public_key,
                endpoint=None if p.endpoint is None else format_endpoint(p.endpoint),
                last_handshake=0.0,
                rx_bytes=0,
                tx_bytes=0,
                allowed_ips=list(p.allowed_ips),
                keepalive=p.keepalive,
            )
            for p in self._peers.values()
        ]

    async def listen_port(self) -> int:
        self._require()
        return self._port

    async def stats(self) -> DeviceStats:
        return DeviceStats(await self.listen_port(), await self.peers())

    async def close(self) -> None:
        self.ifname = None
        self._peers.clear()

    def _require(self) -> None:
        if self.ifname is None:
            raise BackendError("no device")


@dataclass
class FakeNetConfig:
    """Records what it is asked to do. `routes` are the host's existing route
    destinations; `uplinks` maps an interface to its gateway (None: on-link) towards
    anything; `bare` interfaces exist but route nothing; `loopbacks` are loopback
    interfaces."""

    routes: list[IPv4Network] = field(default_factory=list)
    uplinks: dict[str, str | None] = field(
        default_factory=lambda: {UPLINK: UPLINK_GATEWAY, "eth8": None})
    bare: set[str] = field(default_factory=set)
    loopbacks: set[str] = field(default_factory=lambda: {"lo"})
    added_routes: list[HostRoute] = field(default_factory=list)
    addresses: dict[str, list[IPInterface]] = field(default_factory=dict)
    # Devices the owner asked to be removed should it be killed (a kernel backend's).
    reaped_links: list[str] = field(default_factory=list)

    async def set_mtu(self, ifname: str, mtu: int) -> None:
        pass

    async def add_address(self, ifname: str, address: IPInterface) -> None:
        self.addresses.setdefault(ifname, []).append(address)

    async def set_up(self, ifname: str) -> None:
        pass

    async def remove_address(self, ifname: str, address: IPInterface) -> None:
        if address in self.addresses.get(ifname, []):
            self.addresses[ifname].remove(address)

    async def add_route(self, route: HostRoute, replace: bool) -> None:
        self.added_routes = [r for r in self.added_routes if r.destination != route.destination]
        self.added_routes.append(route)

    async def remove_route(self, route: HostRoute) -> None:
        self.added_routes = [r for r in self.added_routes if r != route]

    async def route_destinations(self, exclude_ifname: str | None) -> list[IPv4Network]:
        return list(self.routes)

    async def egress(self, dst: IPv4Address, ifname: str) -> Egress | None:
        if ifname not in self.uplinks:
            return None
        return Egress(ifname, self.uplinks[ifname])

    async def reap_link(self, ifname: str) -> None:
        self.reaped_links.append(ifname)

    def link_removed(self, ifname: str) -> None:
        if ifname in self.reaped_links:  # as ReapedNetConfig: a device never reaped too
            self.reaped_links.remove(ifname)

    async def is_loopback(self, ifname: str) -> bool:
        if ifname not in self.uplinks | dict.fromkeys(self.bare | self.loopbacks):
            raise BackendError(f"no interface named {ifname}")
        return ifname in self.loopbacks
