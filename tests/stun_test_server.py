"""A STUN Binding server for loopback tests, with a simulated NAT in front of the client.

It listens on two IPs x two ports (RFC 5780: OTHER-ADDRESS, RESPONSE-ORIGIN,
CHANGE-REQUEST) and also answers RFC 3489 requests (no magic cookie) the way pystun3
expects. The "NAT" is simulated by the server itself: `mapped_ip` and `mapping` choose
the address it reports, and `filtering` decides whether an answer from an address the
client never sent to would have passed the client's NAT.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from aioice import stun

Address = tuple[str, int]
# Given (request, client address, local address), the datagrams to send instead of the
# normal answer; None for the normal answer.
Override = Callable[[stun.Message, Address, Address], list[bytes] | None]


@dataclass
class ServerState:
    requests: list[tuple[Address, Address]] = field(default_factory=list)
    contacted: set[tuple[Address, Address]] = field(default_factory=set)
    dropped: int = 0


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, server: StunTestServer, local: Address) -> None:
        self.server = server
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.handle(self, data, (addr[0], addr[1]))


class StunTestServer:
    def __init__(self, ip: str = "127.0.0.1", alt_ip: str | None = "127.0.0.2", *,
                 mapped_ip: str | None = None, mapping: str = "endpoint-independent",
                 filtering: str = "endpoint-independent", rfc5780: bool = True,
                 drop_first: int = 0, silent: bool = False,
                 override: Override | None = None) -> None:
        self.ip, self.alt_ip = ip, alt_ip
        self.mapped_ip = mapped_ip
        self.mapping = mapping
        self.filtering = filtering
        self.rfc5780 = rfc5780 and alt_ip is not None
        self.drop_first = drop_first
        self.silent = silent
        self.override = override
        self.state = ServerState()
        self.sockets: dict[Address, _Socket] = {}
        self.port = 0
        self.alt_port = 0

    @property
    def address(self) -> Address:
        return (self.ip, self.port)

    @property
    def other_address(self) -> Address | None:
        return (self.alt_ip, self.alt_port) if self.rfc5780 and self.alt_ip else None

    async def start(self) -> StunTestServer:
        loop = asyncio.get_running_loop()
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((self.ip, 0))
                port = probe.getsockname()[1]
            ips = [self.ip] + ([self.alt_ip] if self.alt_ip else [])
            wanted = [(ip, p) for ip in ips for p in (port, port + 1)] if port < 65535 else []
            opened: dict[Address, _Socket] = {}
            try:
                for local in wanted:
                    _, proto = await loop.create_datagram_endpoint(
                        functools.partial(_Socket, self, local), local_addr=local)
                    opened[local] = proto
            except OSError:
                for proto in opened.values():
                    assert proto.transport is not None
                    proto.transport.close()
                continue
            if not wanted:
                continue
            self.sockets, self.port, self.alt_port = opened, port, port + 1
            return self
        raise RuntimeError("no free port pair on loopback")

    def close(self) -> None:
        for proto in self.sockets.values():
            if proto.transport is not None:
                proto.transport.close()
        self.sockets = {}

    async def __aenter__(self) -> StunTestServer:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def _mapped(self, client: Address, local: Address) -> Address:
        ip = self.mapped_ip or client[0]
        if self.mapping == "endpoint-independent":
            return (ip, client[1])
        index = sorted(self.sockets).index(local)
        return (ip, (client[1] + 1000 + index) % 60000 + 1024)

    def _passes_filter(self, client: Address, source: Address) -> bool:
        if self.filtering == "endpoint-independent":
            return True
        if self.filtering == "address-dependent":
            return any(c == client and s[0] == source[0] for c, s in self.state.contacted)
        return (client, source) in self.state.contacted

    def handle(self, sock: _Socket, data: bytes, client: Address) -> None:
        if len(data) < 20:
            return
        self.state.contacted.add((client, sock.local))
        self.state.requests.append((client, sock.local))
        if self.silent:
            return
        if self.drop_first > 0:
            self.drop_first -= 1
            self.state.dropped += 1
            return
        classic = struct.unpack_from("!I", data, 4)[0] != stun.COOKIE
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if request.message_class != stun.Class.REQUEST:
            return
        if self.override is not None and not classic:
            datagrams = self.override(request, client, sock.local)
            if datagrams is not None:
                assert sock.transport is not None
                for datagram in datagrams:
                    sock.transport.sendto(datagram, client)
                return
        change = request.attributes.get("CHANGE-REQUEST", 0) if self.rfc5780 else 0
        source = sock.local
        if change and self.alt_ip:
            ip = (self.alt_ip if source[0] == self.ip else self.ip) if change & 4 else source[0]
            port = (self.alt_port if source[1] == self.port else self.port) if change & 2 \
                else source[1]
            source = (ip, port)
        out = self.sockets[source]
        if not self._passes_filter(client, source):
            return
        mapped = self._mapped(client, sock.local)
        other = None
        if self.rfc5780 and self.alt_ip:
            other = (self.alt_ip if source[0] == self.ip else self.ip,
                     self.alt_port if source[1] == self.port else self.port)
        assert out.transport is not None
        if classic:
            out.transport.sendto(_classic_response(data, mapped, source, other), client)
            return
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = mapped
        if self.rfc5780:
            response.attributes["RESPONSE-ORIGIN"] = source
        if other:
            response.attributes["OTHER-ADDRESS"] = other
        response.add_fingerprint()
        out.transport.sendto(bytes(response), client)


def _classic_address(attr_type: int, addr: Address) -> bytes:
    return struct.pack("!HHBBH4s", attr_type, 8, 0, 1, addr[1], socket.inet_aton(addr[0]))


def _classic_response(request: bytes, mapped: Address, source: Address,
                      changed: Address | None) -> bytes:
    """RFC 3489 answer: MAPPED-, SOURCE- and CHANGED-ADDRESS, the 16-byte id echoed."""
    body = _classic_address(0x0001, mapped) + _classic_address(0x0004, source)
    if changed:
        body += _classic_address(0x0005, changed)
    return struct.pack("!HH", 0x0101, len(body)) + request[4:20] + body
