"""Transport addresses: the `(ip, port)` tuple every socket API uses, its text form
`ip:port` / `[ipv6]:port`, and a host-and-port pair from configuration."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    """`ipaddress.ip_address(text)` for text, remembered: every STUN datagram the agent
    and the owner pass along names its addresses as text, a few parses each, and the
    same few peers' addresses come back thousands of times. ValueError for anything
    that is not an address in text form (a failed parse is not remembered)."""
    if not isinstance(text, str):
        raise ValueError(f"{type(text).__name__} is not an IP address in text form")
    return _remembered_ip(text)


# Bounded: a flood of distinct addresses only pushes older ones out.
@lru_cache(maxsize=1024)
def _remembered_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def format_endpoint(addr: Address) -> str:
    """'ip:port', or '[ipv6]:port' (WireGuard's and RFC 3986's form)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> Address:
    """'ip:port' or '[ipv6]:port' -> (ip, port) with the address in canonical form;
    ValueError says what is wrong. An IPv6 address needs its brackets: in
    '2001:db8::1:80' the port cannot be told from the address."""
    host, sep, port_text = text.rpartition(":")
    # isdigit() alone also passes "²" and other digits int() refuses, and any length.
    if not sep or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"{text[:80]!r} is not 'ip:port'")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = parse_ip(host)
    except ValueError as exc:
        raise ValueError(f"{text[:80]!r} has an invalid address") from exc
    if ip.version == 6 and not bracketed:
        raise ValueError(f"{text[:80]!r}: write an IPv6 endpoint as '[address]:port'")
    if ip.version == 4 and bracketed:
        raise ValueError(f"{text[:80]!r}: an IPv4 address takes no brackets")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{text[:80]!r} has an invalid port {port}")
    return str(ip), port


def ip_family(ip: str) -> int | None:
    """4 or 6 for an IP address in text form, None when it is not one."""
    try:
        return parse_ip(ip).version
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPort:
    """A server named in configuration: a host (name or address) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_endpoint((self.host, self.port))

    def as_tuple(self) -> Address:
        return (self.host, self.port)
