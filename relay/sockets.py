"""Non-blocking UDP sockets for the relay, with buffers sized for bursts."""

from __future__ import annotations

import contextlib
import logging
import socket

from kbwg.core.addresses import Address

log = logging.getLogger(__name__)


# Not exported by Python's socket module on every version.
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_EVEN_PORT_TRIES = 32


def set_buffers(sock: socket.socket, size: int) -> None:
    """As root the FORCE options pass net.core.[rw]mem_max; otherwise the kernel caps."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF),
                         (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp(address: Address, buffer: int) -> socket.socket:
    """IPv4, or IPv6 for an address with a colon: IPv6 only, so a relay listening on
    both families sees each client under one address, never IPv4-mapped."""
    ipv6 = ":" in address[0]
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_buffers(sock, buffer)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def open_relayed(ip: str, buffer: int, *, even_port: bool = False,
                 dont_fragment: bool = False) -> socket.socket:
    """A relayed transport address on a kernel-chosen port (even when asked)."""
    for _ in range(_EVEN_PORT_TRIES if even_port else 1):
        sock = open_udp((ip, 0), buffer)
        if not even_port or sock.getsockname()[1] % 2 == 0:
            break
        sock.close()
    else:
        raise OSError("no even port found")
    if dont_fragment:
        try:
            if ":" in ip:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
        except OSError:
            sock.close()
            raise
    return sock


def open_even_pair(ip: str, buffer: int) -> tuple[socket.socket, socket.socket]:
    """Sockets on an even port and the next one (EVEN-PORT with its R bit: RTP+RTCP)."""
    for _ in range(_EVEN_PORT_TRIES):
        even = open_relayed(ip, buffer, even_port=True)
        try:
            odd = open_udp((ip, even.getsockname()[1] + 1), buffer)
        except OSError:
            even.close()
            continue
        return even, odd
    raise OSError("no free pair of ports")


def local_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return (str(host), int(port))
