"""Request/reply vocabulary between the agent and the device owner, shared by both sides.

Request: ``{"id": int, "op": str, ...args}``.
Reply: ``{"id": int, "ok": True, ...result}`` or ``{"id": int | None, "ok": False,
"error": str}``. Unsolicited events: ``{"event": str, ...}``.

Ops (args → result):

- ``hello`` () → ``version``, ``pid``. Handshake; allowed before ``create``.
- ``create`` (``ifname`` kbwg<N>, ``private_key`` b64, ``listen_port`` 0 = pick or
  1024 and above, ``address`` "ip/prefix" inside the locally allowed overlay,
  ``backend`` "auto"|"kernel"|"userspace", optional ``mtu``) → ``backend``,
  ``listen_port``, ``public_key`` b64, ``ifname``.
- ``set_peer`` (``public_key`` b64, ``endpoint`` "ip:port"|None, not inside the overlay,
  ``allowed_ips`` list of at most 64 /32s inside the device's overlay network,
  ``keepalive`` seconds 0..3600) → {}. A peer may hold this device's own address (an
  address conflict settling). A new key is refused while the device has 4096 peers.
- ``remove_peer`` (``public_key``) → {}.
- ``stats`` () → ``listen_port``, ``peers`` [{public_key, endpoint, last_handshake,
  rx_bytes, tx_bytes, allowed_ips, keepalive}], ``refusals`` {reason key: count},
  ``stun_filter`` {counter: count} (what the shared port passed and dropped, by
  budget and reason; ``events_dropped``: passed but the agent was not reading).
  Allowed before ``create`` (empty, without ``stun_filter``).
- ``add_route`` (``destination`` "ip/32", the endpoint address of a current peer, outside
  the overlay; ``ifname`` the uplink it must leave through) → ``via`` (the gateway the
  owner found on that uplink in the main table, or None), ``ifname``. The agent never
  names a gateway: a request carrying ``via`` is refused. Never through loopback or the
  WireGuard interface.
- ``remove_route`` (``destination``) → {}: only a route this owner added.
- ``set_address`` (``address`` "ip/prefix") → {}: replaces the overlay address (a
  self-assigned address that lost a conflict moves) within the same overlay network.
- ``shutdown`` () → {}; the owner then removes everything and exits 0.
- ``stun_open`` () → ``port``. After ``create``: opens the raw socket that shares the
  WireGuard listen port with STUN (kbwg.owner.rawstun); again is a no-op.
- ``stun_send`` (``dest`` "ip:port", ``data`` bytes: one STUN message of at most 1500
  bytes, optional ``source`` local ip) → ``source`` "ip:port" it left from. Refused when
  over the owner's rate limit. IPv4 or IPv6 ("[ip]:port"; ``source`` of the same
  family). The transaction id of a request is remembered
  for a while: its answers pass the shared port's filter in a reserved budget.
- ``stun_ufrags`` (``ufrags`` list of at most 1024 strings of 1-256 printable ASCII
  characters without ':') → ``ufrags`` (how many). After ``create``. The agent's
  current local ICE ufrags, replacing the previous list: Binding requests whose USERNAME
  starts with one of them and ':' pass the filter in that ufrag's reserved budget.

- ``interfaces`` () → ``addresses`` [{interface, index, address, prefixlen, up,
  default_route}]: every IPv4 and usable IPv6 address of the host (kbwg.owner.interfaces),
  ``default_route`` when its interface holds a default route of its family. Allowed
  before ``create`` (gathering starts early). Read-only, as are the three below: the
  owner reads netlink so that the agent never loads pyroute2.
- ``default_gateway`` () → ``gateway`` {address, local_ip, interface} of the main
  table's default IPv4 gateway, or None. Allowed before ``create``.
- ``host_routes`` (``exclude_ifname``) → ``destinations`` ["ip/prefix"]: the host's
  IPv4 route destinations in every table, apart from default routes and routes through
  ``exclude_ifname`` (the agent checks the team's overlay against them before
  ``create``). Allowed before ``create``.
- ``egress`` (``destination`` ip, optional ``ifname``) → ``route`` {ifname, via} or None:
  how the main table reaches ``destination`` (through ``ifname`` only, when given),
  leaving out the host routes this owner added. Allowed before ``create``.
- ``watch_network`` () → {}: from then on, ``network`` events (below); again is a
  no-op. Allowed before ``create``.

These ops take no other arguments than those listed: an unknown one is an error.

Requests that are well formed but outside what the owner allows (kbwg.owner.guard) get
an error reply whose message starts with ``refused:``; each is counted by reason key.

Events: ``stun`` (``src`` "ip:port", ``dst`` "ip:port" = the local address and the
WireGuard port, ``data`` bytes), one per datagram to the WireGuard port carrying the STUN
cookie that passes the owner's filter (kbwg.owner.stunfilter: well formed, a right
FINGERPRINT where checks need one, then within the budget of its kind: answers to our
own requests, checks for a declared ufrag, and everything else per source and overall),
after ``stun_open``. The rest is dropped and counted: ``stats`` answers the counts as
``stun_filter``.

``network`` (``change`` the netlink message, e.g. "RTM_NEWADDR", or "RESUBSCRIBED" when
the owner's netlink watch failed and was opened again; ``ifname`` or None; ``count`` how
many changes it stands for), after ``watch_network``: the host's IPv4 addresses or
routes or its links changed (kbwg.owner.netlink_watch). Changes on the
owner's WireGuard device and host routes (/32) are left out, and events are coalesced:
at most one per fifth of a second, the latest change.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from typing import Any

from kbwg.core.addresses import format_endpoint, parse_ip
from kbwg.core.addresses import parse_endpoint as core_parse_endpoint
from kbwg.core.stun import is_stun
from kbwg.owner.rawstun import MAX_STUN_PAYLOAD, is_usable_unicast

PROTOCOL_VERSION = 1

OP_HELLO = "hello"
OP_CREATE = "create"
OP_SET_PEER = "set_peer"
OP_REMOVE_PEER = "remove_peer"
OP_STATS = "stats"
OP_ADD_ROUTE = "add_route"
OP_REMOVE_ROUTE = "remove_route"
OP_SHUTDOWN = "shutdown"
OP_STUN_OPEN = "stun_open"
OP_STUN_SEND = "stun_send"
OP_SET_ADDRESS = "set_address"
OP_STUN_UFRAGS = "stun_ufrags"
OP_INTERFACES = "interfaces"
OP_DEFAULT_GATEWAY = "default_gateway"
OP_HOST_ROUTES = "host_routes"
OP_EGRESS = "egress"
OP_WATCH_NETWORK = "watch_network"

EVENT_STUN = "stun"
EVENT_NETWORK = "network"

# Ops that make sense before a device exists.
OPS_WITHOUT_DEVICE = frozenset({OP_HELLO, OP_STATS, OP_SHUTDOWN, OP_CREATE, OP_INTERFACES,
                                OP_DEFAULT_GATEWAY, OP_HOST_ROUTES, OP_EGRESS,
                                OP_WATCH_NETWORK})

BACKENDS = ("auto", "kernel", "userspace")
DEFAULT_MTU = 1420
KEY_LEN = 32
IFNAME_MAX = 15

ERR_NO_DEVICE = "no device yet"
ERR_NO_STUN = "no STUN socket yet (stun_open first)"

# ICE ufrags: 4 to 256 ice-chars (RFC 8445 section 5.3); any printable ASCII but ':'
# goes here, as the owner only compares them. One per negotiation session.
MAX_UFRAGS = 1024
# A peer's allowed IPs in one set_peer: the agent gives each peer one address.
MAX_ALLOWED_IPS = 64
MAX_UFRAG_LEN = 256


class ProtocolError(Exception):
    """A frame that is not a valid request, or a request with bad arguments."""


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


def parse_request(obj: dict[str, Any]) -> Request:
    rid = obj.get("id")
    # bool is an int subclass; a True id is a client bug, not an id.
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("request needs an integer 'id'")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("request needs a string 'op'")
    args = {k: v for k, v in obj.items() if k not in ("id", "op")}
    return Request(rid, op, args)


def ok_reply(rid: int, **result: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, **result}


def error_reply(rid: int | None, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": message}


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"'{field}' must be a base64 string")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"'{field}' is not valid base64") from exc
    if len(key) != KEY_LEN:
        raise ProtocolError(f"'{field}' must decode to {KEY_LEN} bytes, not {len(key)}")
    return key


def _get(args: dict[str, Any], field: str, kind: type | tuple[type, ...], name: str) -> Any:
    if field not in args:
        raise ProtocolError(f"missing '{field}'")
    value = args[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"'{field}' must be {name}")
    return value


def _get_int(args: dict[str, Any], field: str, low: int, high: int) -> int:
    value = _get(args, field, int, "an integer")
    if not low <= value <= high:
        raise ProtocolError(f"'{field}' must be between {low} and {high}")
    return int(value)


def _get_ifname(args: dict[str, Any], field: str = "ifname") -> str:
    value = _get(args, field, str, "a string")
    if not 0 < len(value) <= IFNAME_MAX or "/" in value or value.strip() != value:
        raise ProtocolError(f"'{field}' is not a valid interface name")
    return str(value)


def parse_endpoint(value: str, field: str = "endpoint") -> tuple[str, int]:
    """'ip:port' or '[ipv6]:port' → (ip, port). No scoped IPv6 address: its scope is any
    text but '%' (newlines included), and the endpoint goes into wireguard-go's line-based
    UAPI as text, where it would add lines of the agent's choosing."""
    try:
        host, port = core_parse_endpoint(value)
    except ValueError as exc:
        raise ProtocolError(f"'{field}': {exc}") from exc
    if "%" in host:
        raise ProtocolError(f"'{field}': a scoped IPv6 address is not an endpoint")
    return host, port


def parse_interface(args: dict[str, Any]) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    address_text = _get(args, "address", str, "a string 'ip/prefix'")
    if "/" not in address_text:
        raise ProtocolError("'address' must be 'ip/prefix'")
    try:
        return ipaddress.ip_interface(address_text)
    except ValueError as exc:
        raise ProtocolError(f"'address' is invalid: {address_text!r}") from exc


@dataclass(frozen=True)
class CreateArgs:
    ifname: str
    private_key: bytes
    listen_port: int
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    backend: str
    mtu: int = DEFAULT_MTU

    @classmethod
    def parse(cls, args: dict[str, Any]) -> CreateArgs:
        address = parse_interface(args)
        backend = _get(args, "backend", str, "a string")
        if backend not in BACKENDS:
            raise ProtocolError(f"'backend' must be one of {', '.join(BACKENDS)}")
        mtu = _get_int(args, "mtu", 576, 65535) if "mtu" in args else DEFAULT_MTU
        return cls(
            ifname=_get_ifname(args),
            private_key=decode_key(args.get("private_key"), "private_key"),
            listen_port=_get_int(args, "listen_port", 0, 65535),
            address=address,
            backend=backend,
            mtu=mtu,
        )


@dataclass(frozen=True)
class SetPeerArgs:
    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: list[str]
    keepalive: int

    @classmethod
    def parse(cls, args: dict[str, Any]) -> SetPeerArgs:
        if "endpoint" not in args:
            raise ProtocolError("missing 'endpoint'")
        raw_endpoint = args["endpoint"]
        if raw_endpoint is not None and not isinstance(raw_endpoint, str):
            raise ProtocolError("'endpoint' must be 'ip:port' or None")
        raw_ips = _get(args, "allowed_ips", list, "a list of CIDR strings")
        if len(raw_ips) > MAX_ALLOWED_IPS:
            raise ProtocolError(
                f"'allowed_ips' has {len(raw_ips)} items, more than {MAX_ALLOWED_IPS}")
        allowed: list[str] = []
        for item in raw_ips:
            if not isinstance(item, str) or "/" not in item:
                raise ProtocolError(f"'allowed_ips' has a non-CIDR item {item!r}")
            try:
                allowed.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError as exc:
                raise ProtocolError(f"'allowed_ips' has an invalid CIDR {item!r}") from exc
        return cls(
            public_key=decode_key(args.get("public_key"), "public_key"),
            endpoint=None if raw_endpoint is None else parse_endpoint(raw_endpoint),
            allowed_ips=allowed,
            keepalive=_get_int(args, "keepalive", 0, 65535),
        )


@dataclass(frozen=True)
class RemovePeerArgs:
    public_key: bytes

    @classmethod
    def parse(cls, args: dict[str, Any]) -> RemovePeerArgs:
        return cls(public_key=decode_key(args.get("public_key"), "public_key"))


def _parse_host_destination(args: dict[str, Any]) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _get(args, "destination", str, "a string 'ip/32'")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ProtocolError(f"'destination' is invalid: {text!r}") from exc
    if network.prefixlen != network.max_prefixlen:
        raise ProtocolError("'destination' must be a host route (/32 or /128)")
    return network


@dataclass(frozen=True)
class AddRouteArgs:
    destination: ipaddress.IPv4Network | ipaddress.IPv6Network
    ifname: str

    @classmethod
    def parse(cls, args: dict[str, Any]) -> AddRouteArgs:
        # A `via` is refused by the owner's guard, not parsed: the gateway is the owner's
        # to find.
        return cls(destination=_parse_host_destination(args), ifname=_get_ifname(args))


@dataclass(frozen=True)
class RemoveRouteArgs:
    destination: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, args: dict[str, Any]) -> RemoveRouteArgs:
        return cls(destination=_parse_host_destination(args))


def stun_event(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> dict[str, Any]:
    return {"event": EVENT_STUN, "src": format_endpoint(src), "dst": format_endpoint(dst),
            "data": data}  # fmt: skip


@dataclass(frozen=True)
class StunSendArgs:
    dest: tuple[str, int]
    data: bytes
    source: str | None

    @classmethod
    def parse(cls, args: dict[str, Any]) -> StunSendArgs:
        dest = parse_endpoint(_get(args, "dest", str, "a string 'ip:port'"), "dest")
        if not is_usable_unicast(dest[0]):
            raise ProtocolError(f"'dest' must be a unicast IPv4 or IPv6 address, not {dest[0]}")
        data = _get(args, "data", bytes, "bytes")
        if len(data) > MAX_STUN_PAYLOAD:
            raise ProtocolError(f"'data' is {len(data)} bytes, more than {MAX_STUN_PAYLOAD}")
        # The privileged owner sends STUN from the WireGuard port, nothing else.
        if not is_stun(data):
            raise ProtocolError("'data' is not a STUN message")
        source = args.get("source")
        if source is not None and (not isinstance(source, str) or not is_usable_unicast(source)):
            raise ProtocolError("'source' must be a unicast IPv4 or IPv6 address or None")
        if source is not None:
            source = str(parse_ip(source))
            if (":" in source) != (":" in dest[0]):
                raise ProtocolError("'source' and 'dest' must be of one family")
        return cls(dest=dest, data=bytes(data), source=source)


@dataclass(frozen=True)
class StunUfragsArgs:
    ufrags: tuple[str, ...]

    @classmethod
    def parse(cls, args: dict[str, Any]) -> StunUfragsArgs:
        raw = _get(args, "ufrags", list, "a list of strings")
        if len(raw) > MAX_UFRAGS:
            raise ProtocolError(f"'ufrags' has {len(raw)} items, more than {MAX_UFRAGS}")
        for item in raw:
            if not isinstance(item, str):
                raise ProtocolError(f"'ufrags' has a non-string item {item!r}")
            if not 0 < len(item) <= MAX_UFRAG_LEN:
                raise ProtocolError(
                    f"'ufrags' item {item[:40]!r} must be 1 to {MAX_UFRAG_LEN} characters")
            if not item.isascii() or not item.isprintable() or ":" in item or " " in item:
                raise ProtocolError(
                    f"'ufrags' item {item[:40]!r} must be printable ASCII without ':' or space")
        return cls(ufrags=tuple(dict.fromkeys(raw)))


def no_arguments(args: dict[str, Any], op: str) -> None:
    """For ops that take none: an argument is a client bug, not something to ignore."""
    if args:
        raise ProtocolError(f"'{op}' takes no arguments, not {', '.join(sorted(map(str, args)))}")


def _only(args: dict[str, Any], op: str, fields: set[str]) -> None:
    extra = set(args) - fields
    if extra:
        raise ProtocolError(f"'{op}' does not take {', '.join(sorted(map(str, extra)))}")


@dataclass(frozen=True)
class HostRoutesArgs:
    exclude_ifname: str

    @classmethod
    def parse(cls, args: dict[str, Any]) -> HostRoutesArgs:
        _only(args, OP_HOST_ROUTES, {"exclude_ifname"})
        return cls(exclude_ifname=_get_ifname(args, "exclude_ifname"))


@dataclass(frozen=True)
class EgressArgs:
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    ifname: str | None

    @classmethod
    def parse(cls, args: dict[str, Any]) -> EgressArgs:
        _only(args, OP_EGRESS, {"destination", "ifname"})
        text = _get(args, "destination", str, "a string (an IP address)")
        try:
            destination = ipaddress.ip_address(text)
        except ValueError as exc:
            raise ProtocolError(f"'destination' is not an IP address: {text[:60]!r}") from exc
        ifname = _get_ifname(args) if args.get("ifname") is not None else None
        return cls(destination=destination, ifname=ifname)


def network_event(change: str, ifname: str | None, count: int) -> dict[str, Any]:
    return {"event": EVENT_NETWORK, "change": change, "ifname": ifname, "count": count}
