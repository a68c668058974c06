"""Transport addresses: the `(ip, port)` tuple every socket API uses, its text form
`ip:port` / `[ipv6]:port`, and a host-and-port pair from configuration."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Address = tuple[str, int]


def format_endpoint(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> Address:
    """'ip:port' or '[ipv6]:port' -> (ip, port) with the address in canonical form;
    ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    # isdigit() alone also passes "²" and other digits int() refuses, and any length.
    if not sep or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"{text[:80]!r} is not 'ip:port'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{text[:80]!r} has an invalid address") from exc
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{text[:80]!r} has an invalid port {port}")
    return str(ip), port


@dataclass(frozen=True)
class HostPort:
    """A server named in configuration: a host (name or address) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_endpoint((self.host, self.port))

    def as_tuple(self) -> Address:
        return (self.host, self.port)
