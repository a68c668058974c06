"""Which local address the kernel's routing table picks towards a destination."""

from __future__ import annotations

import socket


def route_source(dst_ip: str) -> str:
    """The local address the routing table picks for `dst_ip` (IPv4 or IPv6):
    connecting a UDP socket sends nothing."""
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((dst_ip, 9))
        return str(probe.getsockname()[0])
