"""The device owner's operations as typed calls: one method per op, typed replies.

`DeviceOwner.request(op, **args)` (owner_client) is the transport: it frames a request
and returns the reply as a dict. `OwnerCalls` is what the agent calls: each method
names its op's arguments, and each reply is checked here, so a malformed reply is an
`OwnerError` (like a refusal) instead of a KeyError deep in the agent.

Keys stay in the base64 text the agent's books and the owner's stats use: a key's
spelling is how the agent recognises it in a stats reply, so it is sent as given.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

from kbwg.agent.owner_client import DeviceOwner, OwnerError
from kbwg.negotiation.host_addresses import InterfaceAddress
from kbwg.owner.protocol import (
    OP_ADD_ROUTE,
    OP_CREATE,
    OP_DEFAULT_GATEWAY,
    OP_EGRESS,
    OP_HELLO,
    OP_HOST_ROUTES,
    OP_INTERFACES,
    OP_REMOVE_PEER,
    OP_REMOVE_ROUTE,
    OP_SET_ADDRESS,
    OP_SET_PEER,
    OP_SHUTDOWN,
    OP_STATS,
    OP_STUN_OPEN,
    OP_STUN_SEND,
    OP_STUN_UFRAGS,
    OP_WATCH_NETWORK,
)

if TYPE_CHECKING:
    from kbwg.portmap.gateway import Gateway


@dataclass(frozen=True)
class Hello:
    version: int
    pid: int


@dataclass(frozen=True)
class Created:
    """The device as the owner made it (the port it chose when asked for 0)."""

    listen_port: int
    backend: str
    ifname: str
    public_key: str | None


@dataclass(frozen=True)
class PeerCounters:
    """One WireGuard peer as the device reports it."""

    public_key: str
    endpoint: str | None
    last_handshake: float
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class DeviceStats:
    peers: list[PeerCounters]
    listen_port: int | None
    refusals: dict[str, int]

    def by_key(self) -> dict[str, PeerCounters]:
        return {p.public_key: p for p in self.peers}


@dataclass(frozen=True)
class RouteAdded:
    via: str | None
    ifname: str


@dataclass(frozen=True)
class Uplink:
    """How the main table reaches an address: the interface, and its gateway (None:
    on-link)."""

    ifname: str
    via: str | None


def _bad(op: str, what: str, reply: dict[str, Any]) -> OwnerError:
    return OwnerError(f"malformed {op} reply from the device owner ({what}): {reply!r}"[:500])


def _int(op: str, reply: dict[str, Any], field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(op, f"'{field}' is not an integer", reply)
    return value


def _number(op: str, reply: dict[str, Any], field: str, value: object) -> float:
    # Absent or null counters mean "none yet", as the owner reports a fresh peer.
    if value is None:
        return 0.0
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(op, f"'{field}' is not a number", reply)
    return float(value)


def _text(op: str, reply: dict[str, Any], field: str, value: object,
          default: str | None = None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(op, f"'{field}' is not a string", reply)
    return value


def _object(op: str, reply: dict[str, Any], field: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(op, f"'{field}' is not an object", reply)
    return value


def _list(op: str, reply: dict[str, Any], field: str) -> list[Any]:
    value = reply.get(field)
    if not isinstance(value, list):
        raise _bad(op, f"'{field}' is not a list", reply)
    return value


def _bool(op: str, reply: dict[str, Any], field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(op, f"'{field}' is not true or false", reply)
    return value


def _ip(op: str, reply: dict[str, Any], field: str, value: object) -> str:
    text = _text(op, reply, field, value)
    try:
        return str(ipaddress.ip_address(text or ""))
    except ValueError:
        raise _bad(op, f"'{field}' is not an IP address", reply) from None


def _required_text(op: str, reply: dict[str, Any], field: str, value: object) -> str:
    text = _text(op, reply, field, value)
    if not text:
        raise _bad(op, f"'{field}' is missing or empty", reply)
    return text


def _address(reply: dict[str, Any], raw: object) -> InterfaceAddress:
    item = _object(OP_INTERFACES, reply, "addresses", raw)
    address = _ip(OP_INTERFACES, reply, "address", item.get("address"))
    prefixlen = _int(OP_INTERFACES, reply, "prefixlen", item.get("prefixlen"))
    if not 0 <= prefixlen <= (128 if ":" in address else 32):
        raise _bad(OP_INTERFACES, "'prefixlen' is out of range", reply)
    return InterfaceAddress(
        interface=_required_text(OP_INTERFACES, reply, "interface", item.get("interface")),
        index=_int(OP_INTERFACES, reply, "index", item.get("index")),
        address=address,
        prefixlen=prefixlen,
        up=_bool(OP_INTERFACES, reply, "up", item.get("up")),
        default_route=_bool(OP_INTERFACES, reply, "default_route", item.get("default_route")),
    )


def _peer(reply: dict[str, Any], raw: object) -> PeerCounters:
    if not isinstance(raw, dict):
        raise _bad(OP_STATS, "a peer is not an object", reply)
    key = _text(OP_STATS, reply, "public_key", raw.get("public_key"))
    if key is None:
        raise _bad(OP_STATS, "a peer has no 'public_key'", reply)
    return PeerCounters(
        public_key=key,
        endpoint=_text(OP_STATS, reply, "endpoint", raw.get("endpoint")) or None,
        last_handshake=_number(OP_STATS, reply, "last_handshake", raw.get("last_handshake")),
        rx_bytes=int(_number(OP_STATS, reply, "rx_bytes", raw.get("rx_bytes"))),
        tx_bytes=int(_number(OP_STATS, reply, "tx_bytes", raw.get("tx_bytes"))),
    )


class OwnerCalls:
    """The device owner, one typed method per op (kbwg.owner.protocol lists them)."""

    def __init__(self, transport: DeviceOwner) -> None:
        self.transport = transport

    async def hello(self) -> Hello:
        reply = await self.transport.request(OP_HELLO)
        return Hello(_int(OP_HELLO, reply, "version", reply.get("version")),
                     _int(OP_HELLO, reply, "pid", reply.get("pid")))

    async def create(self, ifname: str, private_key: bytes, listen_port: int,
                     address: IPv4Interface, backend: str) -> Created:
        reply = await self.transport.request(
            OP_CREATE, ifname=ifname, private_key=base64.b64encode(private_key).decode(),
            listen_port=listen_port, address=str(address), backend=backend)
        return Created(
            listen_port=_int(OP_CREATE, reply, "listen_port", reply.get("listen_port")),
            backend=_text(OP_CREATE, reply, "backend", reply.get("backend"), backend) or backend,
            ifname=_text(OP_CREATE, reply, "ifname", reply.get("ifname"), ifname) or ifname,
            public_key=_text(OP_CREATE, reply, "public_key", reply.get("public_key")),
        )

    async def set_peer(self, public_key: str, endpoint: str | None, allowed_ips: list[str],
                       keepalive: int) -> None:
        await self.transport.request(OP_SET_PEER, public_key=public_key, endpoint=endpoint,
                                     allowed_ips=allowed_ips, keepalive=keepalive)

    async def remove_peer(self, public_key: str) -> None:
        await self.transport.request(OP_REMOVE_PEER, public_key=public_key)

    async def stats(self) -> DeviceStats:
        reply = await self.transport.request(OP_STATS)
        peers = reply.get("peers", [])
        if not isinstance(peers, list):
            raise _bad(OP_STATS, "'peers' is not a list", reply)
        port = reply.get("listen_port")
        refusals = reply.get("refusals", {})
        if not isinstance(refusals, dict):
            raise _bad(OP_STATS, "'refusals' is not an object", reply)
        return DeviceStats(
            peers=[_peer(reply, p) for p in peers],
            listen_port=None if port is None else _int(OP_STATS, reply, "listen_port", port),
            refusals={str(k): _int(OP_STATS, reply, "refusals", v) for k, v in refusals.items()},
        )

    async def add_route(self, destination: IPv4Network | IPv6Network,
                        ifname: str) -> RouteAdded:
        reply = await self.transport.request(OP_ADD_ROUTE, destination=str(destination),
                                             ifname=ifname)
        return RouteAdded(
            via=_text(OP_ADD_ROUTE, reply, "via", reply.get("via")),
            ifname=_text(OP_ADD_ROUTE, reply, "ifname", reply.get("ifname"), ifname) or ifname,
        )

    async def remove_route(self, destination: IPv4Network | IPv6Network) -> None:
        await self.transport.request(OP_REMOVE_ROUTE, destination=str(destination))

    async def set_address(self, address: IPv4Interface) -> None:
        await self.transport.request(OP_SET_ADDRESS, address=str(address))

    async def stun_open(self) -> int:
        reply = await self.transport.request(OP_STUN_OPEN)
        return _int(OP_STUN_OPEN, reply, "port", reply.get("port"))

    async def stun_send(self, dest: str, data: bytes, source: str | None = None) -> str | None:
        args: dict[str, Any] = {"dest": dest, "data": data}
        if source is not None:
            args["source"] = source
        reply = await self.transport.request(OP_STUN_SEND, **args)
        return _text(OP_STUN_SEND, reply, "source", reply.get("source"))

    async def stun_ufrags(self, ufrags: list[str]) -> None:
        await self.transport.request(OP_STUN_UFRAGS, ufrags=ufrags)

    async def interfaces(self) -> list[InterfaceAddress]:
        """The host's interface addresses (negotiation's `InterfaceSource`)."""
        reply = await self.transport.request(OP_INTERFACES)
        return [_address(reply, raw) for raw in _list(OP_INTERFACES, reply, "addresses")]

    async def default_gateway(self) -> Gateway | None:
        """The default IPv4 gateway (kbwg.portmap's `find_gateway`), or None."""
        from kbwg.portmap.gateway import Gateway

        reply = await self.transport.request(OP_DEFAULT_GATEWAY)
        raw = reply.get("gateway")
        if raw is None:
            return None
        item = _object(OP_DEFAULT_GATEWAY, reply, "gateway", raw)
        return Gateway(
            address=_ip(OP_DEFAULT_GATEWAY, reply, "address", item.get("address")),
            local_ip=_ip(OP_DEFAULT_GATEWAY, reply, "local_ip", item.get("local_ip")),
            interface=_text(OP_DEFAULT_GATEWAY, reply, "interface", item.get("interface")),
        )

    async def host_routes(self, exclude_ifname: str) -> list[IPv4Network]:
        """The host's IPv4 route destinations in every table, apart from default routes
        and routes through `exclude_ifname` (kbwg.agent.overlaycheck's `RoutesReader`)."""
        reply = await self.transport.request(OP_HOST_ROUTES, exclude_ifname=exclude_ifname)
        found = []
        for raw in _list(OP_HOST_ROUTES, reply, "destinations"):
            try:
                found.append(IPv4Network(str(raw) if isinstance(raw, str) else ""))
            except ValueError:
                raise _bad(OP_HOST_ROUTES, "a destination is not an IPv4 network",
                           reply) from None
        return found

    async def egress(self, destination: str, ifname: str | None = None) -> Uplink | None:
        """How the main table reaches `destination` (through `ifname` only, when given),
        without the host routes the owner added; None when it does not."""
        args: dict[str, Any] = {"destination": destination}
        if ifname is not None:
            args["ifname"] = ifname
        reply = await self.transport.request(OP_EGRESS, **args)
        raw = reply.get("route")
        if raw is None:
            return None
        item = _object(OP_EGRESS, reply, "route", raw)
        via = item.get("via")
        return Uplink(ifname=_required_text(OP_EGRESS, reply, "ifname", item.get("ifname")),
                      via=None if via is None else _ip(OP_EGRESS, reply, "via", via))

    async def watch_network(self) -> None:
        """From now on the owner sends `network` events (kbwg.agent.netwatch)."""
        await self.transport.request(OP_WATCH_NETWORK)

    async def shutdown(self) -> None:
        await self.transport.request(OP_SHUTDOWN)

    async def close(self) -> None:
        """Stop the owner (it removes the device and everything it added)."""
        await self.transport.close()
