"""Which local address the kernel's routing table picks towards a destination."""

from __future__ import annotations

import socket


def route_source(dst_ip: str) -> str:
    """The local IPv4 address the routing table picks for `dst_ip`: connecting a UDP
    socket sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((dst_ip, 9))
        return str(probe.getsockname()[0])
