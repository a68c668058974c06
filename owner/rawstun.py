"""STUN on the WireGuard port: raw IPv4 and IPv6 sockets behind classic BPF filters
(device owner).

WireGuard (the kernel module or wireguard-go) owns UDP port P. A raw IPPROTO_UDP socket
gets a copy of every UDP datagram delivered to this namespace, so the filter keeps only
datagrams to port P whose payload carries the STUN magic cookie at offset 4; everything
else (WireGuard's own traffic included) never leaves the kernel. WireGuard still receives
the STUN answers too and discards them as junk. STUN leaves from P through the same raw
socket, so checks and WireGuard share one NAT mapping.

Sending: the kernel writes the IP header (no IP_HDRINCL); we write the UDP header and its
checksum, which covers the source address. The source address is either given per send
(IP_PKTINFO's ipi_spec_dst, which the kernel refuses unless it is local, so a multi-homed
host can send checks from each of its addresses) or the one the routing table picks for
the destination. Either way the routing table still picks the outgoing interface: a
check that must leave through another one needs a host route (the owner's `add_route`).

IPv6 works the same way through a second raw socket, with two differences the kernel
makes: an IPv6 raw socket sees the datagram from its UDP header on (no IP header, so
its filter reads the port at offset 2), and the local address it arrived at comes from
IPV6_PKTINFO ancillary data. A host without IPv6 (the socket cannot be opened) runs with
IPv4 alone. Needs CAP_NET_RAW (the device owner runs as root).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import logging
import math
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kbwg.core.addresses import Address, ip_family, parse_ip
from kbwg.core.loglimit import LimitedLog
from kbwg.core.routing import route_source
from kbwg.core.stun import MAX_STUN_MESSAGE, STUN_COOKIE

logger = logging.getLogger(__name__)


MAX_STUN_PAYLOAD = MAX_STUN_MESSAGE
LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

# Not exported by Python 3.11's socket module; values from linux/socket.h and linux/in.h.
SO_ATTACH_FILTER = 26
IP_PKTINFO = 8
SIOCGIFADDR = 0x8915
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
BPF_LD_B_ABS = 0x30
BPF_LD_H_ABS = 0x28
BPF_LD_W_ABS = 0x20
BPF_LD_H_IND = 0x48
BPF_LD_W_IND = 0x40
BPF_LDX_B_MSH = 0xB1
BPF_JEQ_K = 0x15
BPF_JSET_K = 0x45
BPF_RET_K = 0x06

IPPROTO_UDP = 17
# The "more fragments" flag and the fragment offset: a packet with any of them set is a
# piece. Raw sockets see reassembled packets, so this only guards against surprises.
IP_FRAGMENT_MASK = 0x3FFF
ACCEPT_ALL = 0xFFFF

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_SOCK_FILTER = struct.Struct("=HBBI")
_IN_PKTINFO = struct.Struct("=I4s4s")
_IN6_PKTINFO = struct.Struct("=16sI")

# Bounded work per readiness callback, so a flood cannot starve the owner's frame loop.
_READS_PER_WAKEUP = 64
_RECV_SIZE = 65535
# Room to queue a burst while the owner is busy (a flood, a slow netlink call): what the
# kernel drops for want of room is dropped before our filter can tell a check from junk.
# The owner is root, so SO_RCVBUFFORCE passes net.core.rmem_max.
_RCVBUF = 1 << 20
SO_RCVBUFFORCE = 33


class RawStunError(Exception):
    """The raw socket could not be opened, or a datagram could not be sent."""


@dataclass(frozen=True)
class BpfInsn:
    code: int
    jt: int
    jf: int
    k: int


def stun_filter(port: int) -> list[BpfInsn]:
    """Accept IPv4 UDP to `port`, not a fragment, with the STUN cookie at payload offset 4."""
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    # Jump offsets count from the next instruction; drop is the last one, index 10.
    return [
        BpfInsn(BPF_LD_B_ABS, 0, 0, 9),  # 0: A = IP protocol
        BpfInsn(BPF_JEQ_K, 0, 8, IPPROTO_UDP),  # 1: UDP, else drop
        BpfInsn(BPF_LD_H_ABS, 0, 0, 6),  # 2: A = flags + fragment offset
        BpfInsn(BPF_JSET_K, 6, 0, IP_FRAGMENT_MASK),  # 3: a fragment: drop
        BpfInsn(BPF_LDX_B_MSH, 0, 0, 0),  # 4: X = 4 * IHL, where UDP starts
        BpfInsn(BPF_LD_H_IND, 0, 0, 2),  # 5: A = UDP destination port
        BpfInsn(BPF_JEQ_K, 0, 3, port),  # 6: port P, else drop
        BpfInsn(BPF_LD_W_IND, 0, 0, 8 + 4),  # 7: A = payload word 4 (beyond the end: drop)
        BpfInsn(BPF_JEQ_K, 0, 1, STUN_COOKIE),  # 8: the cookie: accept, else drop
        BpfInsn(BPF_RET_K, 0, 0, ACCEPT_ALL),  # 9: accept (the whole packet)
        BpfInsn(BPF_RET_K, 0, 0, 0),  # 10: drop
    ]


def stun_filter6(port: int) -> list[BpfInsn]:
    """The IPv6 socket's filter: UDP to `port` with the STUN cookie at payload offset 4.

    An IPv6 raw IPPROTO_UDP socket only gets UDP (after any extension headers, and
    reassembled), and its filter sees the UDP header at offset 0.
    """
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    return [
        BpfInsn(BPF_LD_H_ABS, 0, 0, 2),  # 0: A = UDP destination port
        BpfInsn(BPF_JEQ_K, 0, 3, port),  # 1: port P, else drop
        BpfInsn(BPF_LD_W_ABS, 0, 0, 8 + 4),  # 2: A = payload word 4 (beyond the end: drop)
        BpfInsn(BPF_JEQ_K, 0, 1, STUN_COOKIE),  # 3: the cookie: accept, else drop
        BpfInsn(BPF_RET_K, 0, 0, ACCEPT_ALL),  # 4: accept
        BpfInsn(BPF_RET_K, 0, 0, 0),  # 5: drop
    ]


def pack_filter(program: list[BpfInsn]) -> bytes:
    """The program as an array of `struct sock_filter` (native byte order)."""
    return b"".join(_SOCK_FILTER.pack(i.code, i.jt, i.jf, i.k) for i in program)


def unpack_filter(data: bytes) -> list[BpfInsn]:
    return [BpfInsn(*fields) for fields in _SOCK_FILTER.iter_unpack(data)]


def attach_filter(sock: socket.socket, program: list[BpfInsn]) -> None:
    code = ctypes.create_string_buffer(pack_filter(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: the pointer
    # stays valid for the call, the kernel copies the program.
    fprog = struct.pack("HP", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's complement checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF


def _pseudo_header(src_ip: str, dst_ip: str, udp_length: int) -> bytes:
    if ":" in src_ip or ":" in dst_ip:
        # RFC 8200 section 8.1: addresses, a 32-bit length, zeros, the next header.
        return (socket.inet_pton(socket.AF_INET6, src_ip)
                + socket.inet_pton(socket.AF_INET6, dst_ip)
                + struct.pack("!I3xB", udp_length, IPPROTO_UDP))
    return (
        socket.inet_aton(src_ip)
        + socket.inet_aton(dst_ip)
        + struct.pack("!BBH", 0, IPPROTO_UDP, udp_length)
    )


def udp_checksum(src_ip: str, dst_ip: str, segment: bytes) -> int:
    """Checksum of a UDP header + payload (checksum field zeroed) with its pseudo-header."""
    value = internet_checksum(_pseudo_header(src_ip, dst_ip, len(segment)) + segment)
    # 0 on the wire means "no checksum"; a computed 0 is sent as its other form.
    return value or 0xFFFF


def build_udp(src: Address, dst: Address, payload: bytes) -> bytes:
    """UDP header + payload with a correct checksum for these addresses."""
    length = _UDP.size + len(payload)
    header = _UDP.pack(src[1], dst[1], length, 0)
    checksum = udp_checksum(src[0], dst[0], header + payload)
    return _UDP.pack(src[1], dst[1], length, checksum) + payload


@dataclass(frozen=True)
class UdpDatagram:
    src: Address
    dst: Address
    payload: bytes


class ParseError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        # One of the RawStunCounters field names.
        self.reason = reason


def parse_ipv4_udp(packet: bytes) -> UdpDatagram:
    """Validate an IPv4 packet carrying UDP and split it; raises ParseError."""
    if len(packet) < _IPV4.size:
        raise ParseError("truncated", f"{len(packet)} bytes, no IPv4 header")
    ver_ihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    ihl = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or ihl < _IPV4.size:
        raise ParseError("malformed", f"version/IHL byte {ver_ihl:#x}")
    if proto != IPPROTO_UDP:
        raise ParseError("malformed", f"protocol {proto}, not UDP")
    if frag & IP_FRAGMENT_MASK:
        raise ParseError("fragments", "a fragment")
    if total < ihl + _UDP.size:
        raise ParseError("malformed", f"total length {total} leaves no UDP header")
    if len(packet) < total:
        raise ParseError("truncated", f"{len(packet)} of {total} bytes")
    sport, dport, udp_len, _ = _UDP.unpack_from(packet, ihl)
    if udp_len < _UDP.size:
        raise ParseError("malformed", f"UDP length {udp_len}")
    if udp_len > total - ihl:
        raise ParseError("truncated", f"UDP length {udp_len} beyond the packet")
    # The UDP checksum is not checked: a raw socket sees packets before UDP does, and one
    # that came over a veth from a local socket still carries the partial checksum of
    # checksum offload. STUN's FINGERPRINT and MESSAGE-INTEGRITY cover the payload.
    src_ip, dst_ip = socket.inet_ntoa(src), socket.inet_ntoa(dst)
    return UdpDatagram((src_ip, sport), (dst_ip, dport), packet[ihl + _UDP.size : ihl + udp_len])


def parse_udp6(segment: bytes, src_ip: str, dst_ip: str) -> UdpDatagram:
    """Validate what an IPv6 raw socket received (the UDP header on) and split it."""
    if len(segment) < _UDP.size:
        raise ParseError("truncated", f"{len(segment)} bytes, no UDP header")
    sport, dport, udp_len, _ = _UDP.unpack_from(segment)
    if udp_len < _UDP.size:
        raise ParseError("malformed", f"UDP length {udp_len}")
    if udp_len > len(segment):
        raise ParseError("truncated", f"UDP length {udp_len} beyond the datagram")
    return UdpDatagram((src_ip, sport), (dst_ip, dport), segment[_UDP.size : udp_len])


def _pktinfo6_destination(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return None


def interface_index_of6(ip: str, if_inet6: str = "/proc/net/if_inet6") -> int:
    """The index of the interface holding IPv6 address `ip`, 0 if none (or unreadable)."""
    try:
        wanted = socket.inet_pton(socket.AF_INET6, ip).hex()
        with open(if_inet6, encoding="ascii") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == wanted:
                    return int(fields[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def interface_index_of(ip: str) -> int:
    """The index of the interface whose primary address is `ip`, 0 if none.

    Pinning the interface (IP_PKTINFO's ipi_ifindex) makes a check from a second uplink
    really leave through that uplink: the kernel then routes by that interface's own
    routes (for example its higher-metric default route) instead of the main choice.
    """
    if ":" in ip:
        return interface_index_of6(ip)
    packed = socket.inet_aton(ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in socket.if_nameindex():
            request = struct.pack("16s16x", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on that interface
            if reply[20:24] == packed:
                return index
    return 0


@dataclass
class RawStunCounters:
    received: int = 0
    delivered: int = 0
    drained: int = 0
    truncated: int = 0
    malformed: int = 0
    fragments: int = 0
    # Passed the kernel filter but not our own check (should stay 0).
    unfiltered: int = 0
    sent: int = 0
    send_errors: int = 0
    # Delivered datagrams whose callback raised (a bug): logged, with a limit.
    callback_errors: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


PacketCallback = Callable[[UdpDatagram], None]


def _filtered_socket(family: int, program: list[BpfInsn]) -> tuple[socket.socket, int]:
    """A non-blocking raw UDP socket of `family` behind `program`, and how many
    unfiltered packets were drained from it; RawStunError when it cannot be had."""
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except OSError as exc:
        raise RawStunError(f"cannot open a raw UDP socket: {exc}") from exc
    try:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        attach_filter(sock, program)
        # Whatever arrived between socket() and the filter went in unfiltered.
        return sock, _drain(sock)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise RawStunError(f"cannot attach the STUN filter: {exc}") from exc
        raise


IFINDEX_MEMORY = 1.0  # seconds an address's interface index is reused


class RawStunSocket:
    """The raw sockets of one WireGuard port (IPv4, and IPv6 when the host has it),
    feeding `on_packet` from the event loop."""

    def __init__(self, sock: socket.socket, port: int, on_packet: PacketCallback,
                 sock6: socket.socket | None = None) -> None:
        self._sock: socket.socket | None = sock
        self._sock6: socket.socket | None = sock6
        self.port = port
        self._on_packet = on_packet
        self.counters = RawStunCounters()
        # Whoever trips a bug in the callback can send the same datagram at line rate.
        self._notes = LimitedLog(logger)
        # Asking every interface for its address on each check cost the owner two thirds
        # of its busy time with 20 peers; an address moves rarely, so a second's memory
        # is enough (bench/resources.py).
        self._ifindex_seen: dict[str, tuple[float, int]] = {}
        # When each source refused by the kernel was last looked up afresh.
        self._rechecked: dict[str, float] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)
        if sock6 is not None:
            self._loop.add_reader(sock6.fileno(), self._on_readable6)

    @classmethod
    def open(cls, port: int, on_packet: PacketCallback) -> RawStunSocket:
        sock, drained = _filtered_socket(socket.AF_INET, stun_filter(port))
        sock6: socket.socket | None = None
        try:
            sock6, drained6 = _filtered_socket(socket.AF_INET6, stun_filter6(port))
            drained += drained6
        except RawStunError as exc:
            logger.info("no IPv6 STUN on port %d (%s): IPv4 only", port, exc)
        except BaseException:
            sock.close()
            raise
        try:
            raw = cls(sock, port, on_packet, sock6)
        except BaseException:
            sock.close()
            if sock6 is not None:
                sock6.close()
            raise
        raw.counters.drained = drained
        logger.info("raw STUN socket on port %d, %s (%d unfiltered packets drained)", port,
                    "IPv4 and IPv6" if sock6 is not None else "IPv4", drained)
        return raw

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def ipv6(self) -> bool:
        """Whether STUN also goes over IPv6."""
        return self._sock6 is not None

    def _on_readable(self) -> None:
        sock = self._sock
        for _ in range(_READS_PER_WAKEUP):
            if sock is None or self._sock is None:
                return
            try:
                packet = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("raw STUN socket receive failed: %s", exc)
                return
            self._handle(packet)

    def _on_readable6(self) -> None:
        sock = self._sock6
        for _ in range(_READS_PER_WAKEUP):
            if sock is None or self._sock6 is None:
                return
            try:
                segment, ancdata, _flags, addr = sock.recvmsg(
                    _RECV_SIZE, socket.CMSG_SPACE(_IN6_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("raw IPv6 STUN socket receive failed: %s", exc)
                return
            self._handle6(segment, ancdata, str(addr[0]))

    def _handle6(self, segment: bytes, ancdata: list[tuple[int, int, bytes]],
                 src_ip: str) -> None:
        self.counters.received += 1
        dst_ip = _pktinfo6_destination(ancdata)
        if dst_ip is None:
            self.counters.malformed += 1
            logger.debug("ignored IPv6 raw packet from %s: no destination address", src_ip)
            return
        try:
            datagram = parse_udp6(segment, src_ip.partition("%")[0], dst_ip)
        except ParseError as exc:
            setattr(self.counters, exc.reason, getattr(self.counters, exc.reason) + 1)
            logger.debug("ignored IPv6 raw packet: %s", exc)
            return
        self._deliver(datagram)

    def _handle(self, packet: bytes) -> None:
        counters = self.counters
        counters.received += 1
        try:
            datagram = parse_ipv4_udp(packet)
        except ParseError as exc:
            setattr(counters, exc.reason, getattr(counters, exc.reason) + 1)
            logger.debug("ignored raw packet: %s", exc)
            return
        self._deliver(datagram)

    def _deliver(self, datagram: UdpDatagram) -> None:
        counters = self.counters
        payload = datagram.payload
        if (
            datagram.dst[1] != self.port
            or len(payload) < 8
            or struct.unpack_from("!I", payload, 4)[0] != STUN_COOKIE
        ):
            counters.unfiltered += 1
            return
        counters.delivered += 1
        try:
            self._on_packet(datagram)
        except Exception:
            counters.callback_errors += 1
            self._notes.log(logging.ERROR, "STUN packet callback failed", exc_info=True)

    def send(self, payload: bytes, dest: Address, source: str | None = None) -> Address:
        """Send `payload` from port P to `dest`; returns the (source ip, P) it left from."""
        if self._sock is None:
            raise RawStunError("the raw STUN socket is closed")
        dst_ip, dst_port = dest
        family = ip_family(dst_ip)
        if family == 6 and self._sock6 is None:
            self.counters.send_errors += 1
            raise RawStunError(f"cannot send to {dst_ip}: this host has no IPv6 STUN socket")
        if source is not None and ip_family(source) != family:
            self.counters.send_errors += 1
            raise RawStunError(f"source {source} and destination {dst_ip} differ in family")
        try:
            src_ip = source if source is not None else route_source(dst_ip)
            ifindex = self._interface_index(src_ip) if source is not None else 0
            udp = build_udp((src_ip, self.port), dest, payload)
            if family == 6 and self._sock6 is not None:
                pktinfo = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, src_ip), ifindex)
                self._sock6.sendmsg([udp], [(socket.IPPROTO_IPV6, IPV6_PKTINFO, pktinfo)], 0,
                                    (dst_ip, 0, 0, 0))
            else:
                pktinfo = _IN_PKTINFO.pack(ifindex, socket.inet_aton(src_ip), bytes(4))
                self._sock.sendmsg([udp], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0,
                                   (dst_ip, 0))
        except OSError as exc:
            self.counters.send_errors += 1
            if (source is not None and exc.errno in (errno.EINVAL, errno.ENODEV)
                    and self._source_gone(source)):
                # Linux refuses an IPv6 source that is no longer ours with EINVAL (and
                # an interface that went, pinned from the last second, with ENODEV): the
                # host just left that network, which is routine, unlike EINVAL itself.
                raise RawStunError(
                    f"sending to {dst_ip}:{dst_port} failed: {exc} (source {source} is no "
                    "longer an address of this host)") from OSError(
                        errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
            raise RawStunError(f"sending to {dst_ip}:{dst_port} failed: {exc}") from exc
        self.counters.sent += 1
        return (src_ip, self.port)

    def _source_gone(self, ip: str) -> bool:
        """Whether `ip` is no longer an address of this host: looked up afresh, at most
        once per IFINDEX_MEMORY (refused sends come in bursts)."""
        now = self._loop.time()
        if now - self._rechecked.get(ip, -math.inf) >= IFINDEX_MEMORY:
            if len(self._rechecked) >= 64:
                self._rechecked.clear()
            self._rechecked[ip] = now
            self._ifindex_seen.pop(ip, None)
        return self._interface_index(ip) == 0

    def _interface_index(self, ip: str) -> int:
        now = self._loop.time()
        seen = self._ifindex_seen.get(ip)
        if seen is not None and now - seen[0] < IFINDEX_MEMORY:
            return seen[1]
        if len(self._ifindex_seen) >= 64:
            self._ifindex_seen.clear()  # a host has few addresses; bound it anyway
        index = interface_index_of(ip)
        self._ifindex_seen[ip] = (now, index)
        return index

    def close(self) -> None:
        sock, self._sock = self._sock, None
        sock6, self._sock6 = self._sock6, None
        if sock6 is not None:
            self._loop.remove_reader(sock6.fileno())
            sock6.close()
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        sock.close()
        logger.info("closed the raw STUN socket on port %d (%s)", self.port, self.counters)


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return count
        count += 1


def is_usable_unicast(ip: str) -> bool:
    """An IPv4 or IPv6 address a STUN datagram may be sent to or from.

    IPv6 link-local addresses are not: they mean nothing without an interface (a scope)
    and are never candidates. Nor are IPv4-mapped ones: IPv4 goes over the IPv4 socket.
    """
    try:
        addr = parse_ip(ip)
    except ValueError:
        return False
    if addr.is_multicast or addr.is_unspecified:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        return not (addr.is_link_local or addr.ipv4_mapped is not None or "%" in ip)
    return addr != LIMITED_BROADCAST
