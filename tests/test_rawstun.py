"""The shared WireGuard port without root: the BPF program (decoded and run by a small
classic BPF interpreter), checksums, IPv4/UDP parsing, the owner's stun ops over a fake
raw socket, and OwnerStunTransport over a fake owner."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, ClassVar, cast

import pytest
from aioice import stun
from owner_fakes import FakeNetConfig, MemoryBackend

from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.core.ratelimit import TokenBucket
from kbwg.core.stun import is_stun
from kbwg.negotiation.stun_client import StunClient
from kbwg.owner import server as owner_module
from kbwg.owner.frames import read_frame, write_frame
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import ProtocolError, StunSendArgs, stun_event
from kbwg.owner.rawstun import (
    ACCEPT_ALL,
    BPF_JEQ_K,
    BPF_JSET_K,
    BPF_LD_B_ABS,
    BPF_LD_H_ABS,
    BPF_LD_H_IND,
    BPF_LD_W_IND,
    BPF_LDX_B_MSH,
    BPF_RET_K,
    STUN_COOKIE,
    BpfInsn,
    PacketCallback,
    ParseError,
    RawStunError,
    RawStunSocket,
    UdpDatagram,
    build_udp,
    internet_checksum,
    pack_filter,
    parse_ipv4_udp,
    stun_filter,
    udp_checksum,
    unpack_filter,
)
from kbwg.owner.server import OwnerServer
from kbwg_testing import wait_for

PORT = 51820
SRC = ("192.0.2.7", 3478)
DST = ("198.51.100.9", PORT)


def stun_request() -> bytes:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.add_fingerprint()
    return bytes(message)


def ipv4(
    payload: bytes,
    *,
    proto: int = 17,
    frag: int = 0x4000,
    options: bytes = b"",
    src: str = SRC[0],
    dst: str = DST[0],
) -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1, frag, 64, proto,
        0, socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header + options + payload


def udp_packet(payload: bytes, dport: int = PORT, **kw: Any) -> bytes:
    return ipv4(build_udp(SRC, (DST[0], dport), payload), **kw)


def run_bpf(program: list[BpfInsn], packet: bytes) -> int:
    """Classic BPF, just the opcodes the filter uses; out-of-bounds loads drop, as in Linux."""
    a = x = pc = 0
    while True:
        insn = program[pc]
        pc += 1
        code, k = insn.code, insn.k
        if code in (BPF_LD_B_ABS, BPF_LD_H_ABS, BPF_LD_H_IND, BPF_LD_W_IND):
            size = {BPF_LD_B_ABS: 1, BPF_LD_H_ABS: 2, BPF_LD_H_IND: 2, BPF_LD_W_IND: 4}[code]
            offset = k + (x if code in (BPF_LD_H_IND, BPF_LD_W_IND) else 0)
            if offset + size > len(packet):
                return 0
            a = int.from_bytes(packet[offset : offset + size], "big")
        elif code == BPF_LDX_B_MSH:
            if k >= len(packet):
                return 0
            x = 4 * (packet[k] & 0xF)
        elif code == BPF_JEQ_K:
            pc += insn.jt if a == k else insn.jf
        elif code == BPF_JSET_K:
            pc += insn.jt if a & k else insn.jf
        elif code == BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


# -- the BPF program ---------------------------------------------------------------------


def test_filter_program_decodes_as_written() -> None:
    program = unpack_filter(pack_filter(stun_filter(PORT)))
    assert program == stun_filter(PORT)
    assert len(pack_filter(program)) == 8 * len(program)  # struct sock_filter is 8 bytes
    expected = [
        (BPF_LD_B_ABS, 9),  # IP protocol
        (BPF_JEQ_K, 17),
        (BPF_LD_H_ABS, 6),  # flags + fragment offset
        (BPF_JSET_K, 0x3FFF),
        (BPF_LDX_B_MSH, 0),  # ldxb 4*([0]&0xf)
        (BPF_LD_H_IND, 2),  # UDP destination port
        (BPF_JEQ_K, PORT),
        (BPF_LD_W_IND, 12),  # UDP header + 8 + 4: the cookie
        (BPF_JEQ_K, STUN_COOKIE),
        (BPF_RET_K, ACCEPT_ALL),
        (BPF_RET_K, 0),
    ]
    assert [(i.code, i.k) for i in program] == expected
    drop = len(program) - 1
    for index, insn in enumerate(program):
        if insn.code in (BPF_JEQ_K, BPF_JSET_K):
            # Every failed test ends at the drop instruction, every jump stays inside.
            fail = index + 1 + (insn.jf if insn.code == BPF_JEQ_K else insn.jt)
            assert fail == drop, index
    assert program[8].jt == 0 and program[9].code == BPF_RET_K


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_filter_rejects_bad_ports(port: int) -> None:
    with pytest.raises(ValueError):
        stun_filter(port)


def test_filter_accepts_only_stun_to_the_port() -> None:
    program = stun_filter(PORT)
    request = stun_request()
    assert run_bpf(program, udp_packet(request)) == ACCEPT_ALL
    # IP options move the UDP header: the filter follows the IHL.
    assert run_bpf(program, udp_packet(request, options=b"\x01" * 8)) == ACCEPT_ALL
    rejected = {
        "other port": udp_packet(request, dport=PORT + 1),
        "WireGuard handshake": udp_packet(b"\x01\x00\x00\x00" + bytes(144)),
        "cookie at offset 8": udp_packet(b"\x00\x01\x00\x00wxyz" + STUN_COOKIE.to_bytes(4, "big")),
        "payload too short": udp_packet(request[:7]),
        "TCP": ipv4(build_udp(SRC, DST, request), proto=6),
        "first fragment": udp_packet(request, frag=0x2000),
        "later fragment": udp_packet(request, frag=0x0010),
        "header only": udp_packet(request)[:20],
        "empty": b"",
    }
    for what, packet in rejected.items():
        assert run_bpf(program, packet) == 0, what


# -- checksums ---------------------------------------------------------------------------


def test_internet_checksum_vectors() -> None:
    # RFC 1071's worked example, and the classic IPv4 header example.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert internet_checksum(bytes.fromhex("450000730000400040110000c0a80001c0a800c7")) == 0xB861
    assert internet_checksum(b"\x01") == ~0x0100 & 0xFFFF  # odd length: zero padded


def test_udp_checksum_known_vector() -> None:
    # 152.1.51.27:41103 -> 152.14.94.75:9876, payload "bb": checksum 0x14de.
    datagram = build_udp(("152.1.51.27", 0xA08F), ("152.14.94.75", 0x2694), b"bb")
    assert datagram == bytes.fromhex("a08f2694000a14de6262")


def test_udp_checksum_verifies_and_never_sends_zero() -> None:
    payload = stun_request()
    datagram = build_udp(SRC, DST, payload)
    pseudo = (
        socket.inet_aton(SRC[0])
        + socket.inet_aton(DST[0])
        + struct.pack("!BBH", 0, 17, len(datagram))
    )
    assert internet_checksum(pseudo + datagram) == 0  # what a receiver computes
    # A sum of 0xffff would give 0, which means "no checksum": it goes out as 0xffff.
    zero_sum = struct.pack("!HHHH", 0xFFFF - 17 - 8 - 8, 0, 8, 0)
    assert internet_checksum(bytes(8) + struct.pack("!BBH", 0, 17, 8) + zero_sum) == 0
    assert udp_checksum("0.0.0.0", "0.0.0.0", zero_sum) == 0xFFFF


# -- parsing -----------------------------------------------------------------------------


def test_parse_a_udp_packet() -> None:
    payload = stun_request()
    got = parse_ipv4_udp(udp_packet(payload, options=b"\x01" * 4) + b"trailer")
    assert got == UdpDatagram(SRC, DST, payload)


def test_parse_rejects_every_truncation() -> None:
    packet = udp_packet(stun_request())
    for length in range(len(packet)):
        with pytest.raises(ParseError) as info:
            parse_ipv4_udp(packet[:length])
        assert info.value.reason in ("truncated", "malformed"), length


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"\x60" + bytes(39), "malformed"),  # IPv6
        (b"\x44" + bytes(39), "malformed"),  # IHL 4
        (ipv4(build_udp(SRC, DST, b"x"), proto=6), "malformed"),
        (ipv4(build_udp(SRC, DST, b"x"), frag=0x2000), "fragments"),
        (ipv4(struct.pack("!HHHH", 1, PORT, 7, 0)), "malformed"),  # UDP length < 8
        (ipv4(struct.pack("!HHHH", 1, PORT, 40, 0) + b"short"), "truncated"),
    ],
)
def test_parse_rejects_bad_headers(packet: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_ipv4_udp(packet)
    assert info.value.reason == reason


async def test_receive_path_validates_and_counts() -> None:
    """RawStunSocket's receive side over a datagram socketpair standing in for the raw one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    got: list[UdpDatagram] = []
    raw = RawStunSocket(ours, PORT, got.append)
    request = stun_request()
    full = udp_packet(request)
    for packet in (full[:10], full[:30], udp_packet(b"wireguard data"), udp_packet(request)):
        theirs.send(packet)
    try:
        await wait_for(lambda: raw.counters.received == 4, "the four datagrams", 5)
        assert got == [UdpDatagram(SRC, DST, request)]
        c = raw.counters
        assert (c.truncated, c.unfiltered, c.delivered) == (2, 1, 1)
    finally:
        raw.close()
        theirs.close()
    assert raw.closed
    with pytest.raises(RawStunError):
        raw.send(request, ("203.0.113.5", 3478))


async def test_send_errors_are_reported_and_counted() -> None:
    # A plain UDP socket refuses the raw socket's destination port 0 before routing
    # anything, so nothing leaves this machine; any OSError will do.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    raw = RawStunSocket(udp, PORT, lambda _d: None)
    try:
        with pytest.raises(RawStunError):
            raw.send(stun_request(), ("192.0.2.1", 3478), source="192.0.2.1")
        assert (raw.counters.sent, raw.counters.send_errors) == (0, 1)
    finally:
        raw.close()


class _Refusing:
    """A socket whose sends the kernel refuses with `code`."""

    def __init__(self, sock: socket.socket, code: int) -> None:
        self._sock = sock
        self._code = code

    def sendmsg(self, *_args: object) -> int:
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


async def test_interface_index_is_looked_up_once_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks from one source reuse its interface index for a second, then look again."""
    from kbwg.owner import rawstun
    lookups: list[str] = []
    monkeypatch.setattr(rawstun, "interface_index_of", lambda ip: lookups.append(ip) or 3)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    raw = RawStunSocket(udp, PORT, lambda _d: None)
    raw._sock = cast(socket.socket, _Refusing(udp, errno.EPERM))
    clock = [100.0]
    monkeypatch.setattr(raw._loop, "time", lambda: clock[0])
    try:
        for _ in range(5):
            with pytest.raises(RawStunError):
                raw.send(stun_request(), ("192.0.2.1", 3478), source="192.0.2.1")
        assert lookups == ["192.0.2.1"]
        clock[0] += rawstun.IFINDEX_MEMORY
        with pytest.raises(RawStunError):
            raw.send(stun_request(), ("192.0.2.1", 3478), source="192.0.2.1")
        assert lookups == ["192.0.2.1"] * 2
    finally:
        raw.close()


def test_is_stun() -> None:
    request = stun_request()
    assert is_stun(request)
    assert not is_stun(request[:-4])  # length field disagrees
    assert not is_stun(b"\x80" + request[1:])  # top bits set
    assert not is_stun(request[:4] + b"\0\0\0\0" + request[8:])  # no cookie
    assert not is_stun(request[:19])


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1
    assert bucket.take() and not bucket.take()
    now[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3


def test_stun_send_args() -> None:
    request = stun_request()
    args = StunSendArgs.parse({"dest": "203.0.113.5:3478", "data": request})
    assert args == StunSendArgs(("203.0.113.5", 3478), request, None)
    assert (
        StunSendArgs.parse(
            {"dest": "203.0.113.5:3478", "data": request, "source": "198.18.1.2"}
        ).source
        == "198.18.1.2"
    )
    v6 = StunSendArgs.parse(
        {"dest": "[2001:db8::1]:3478", "data": request, "source": "2001:DB8:0::2"})
    assert v6 == StunSendArgs(("2001:db8::1", 3478), request, "2001:db8::2")
    big = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    big.attributes["SOFTWARE"] = "x" * 700
    big.attributes["USERNAME"] = "y" * 800
    bad: list[dict[str, Any]] = [
        {"dest": "203.0.113.5:3478", "data": bytes(big)},  # over 1500 bytes
        {"dest": "203.0.113.5:3478", "data": b"hello, not stun, definitely"},
        {"dest": "203.0.113.5:3478", "data": "text"},
        {"dest": "[fe80::1]:3478", "data": request},  # link-local: no scope
        {"dest": "[::ffff:203.0.113.5]:3478", "data": request},  # IPv4 goes as IPv4
        {"dest": "[ff02::1]:3478", "data": request},
        {"dest": "[2001:db8::1]:3478", "data": request, "source": "198.18.1.2"},
        {"dest": "203.0.113.5:3478", "data": request, "source": "2001:db8::2"},
        {"dest": "224.0.0.1:3478", "data": request},
        {"dest": "203.0.113.5", "data": request},
        {"dest": "203.0.113.5:3478", "data": request, "source": "0.0.0.0"},
        {"dest": "203.0.113.5:3478", "data": request, "source": 5},
        {"data": request},
    ]
    assert len(bytes(big)) > 1500
    for item in bad:
        with pytest.raises(ProtocolError):
            StunSendArgs.parse(item)


# -- the owner's stun ops, over a fake raw socket -----------------------------------------


class FakeStunSocket:
    instances: ClassVar[list[FakeStunSocket]] = []

    def __init__(self, port: int, on_packet: PacketCallback) -> None:
        self.port = port
        self.on_packet = on_packet
        self.sent: list[tuple[bytes, tuple[str, int], str | None]] = []
        self.closed = False
        self.fail: OSError | None = None  # what the kernel says to the next sends
        FakeStunSocket.instances.append(self)

    def send(self, payload: bytes, dest: tuple[str, int], source: str | None) -> tuple[str, int]:
        if self.fail is not None:
            raise RawStunError(f"sending to {dest[0]}:{dest[1]} failed: {self.fail}") \
                from self.fail
        self.sent.append((payload, dest, source))
        return (source or "198.18.1.2", self.port)

    def close(self) -> None:
        self.closed = True


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.next_id = 1

    async def frame(self) -> dict[str, Any]:
        frame = await asyncio.wait_for(read_frame(self.reader), 5)
        assert frame is not None
        return frame

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        rid, self.next_id = self.next_id, self.next_id + 1
        await write_frame(self.writer, {"id": rid, "op": op, **args})
        reply = await self.frame()
        assert reply["id"] == rid
        return reply


@contextlib.asynccontextmanager
async def serve_owner() -> AsyncIterator[tuple[OwnerServer, Client]]:
    FakeStunSocket.instances.clear()
    server = OwnerServer(FakeNetConfig(), lambda _name: MemoryBackend(), OwnerPolicy(),
                         FakeStunSocket)
    ours, theirs = socket.socketpair()
    s_reader, s_writer = await asyncio.open_unix_connection(sock=ours)
    c_reader, c_writer = await asyncio.open_unix_connection(sock=theirs)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(s_reader, s_writer, stop))
    try:
        yield server, Client(c_reader, c_writer)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
        await server.cleanup()
        for writer in (s_writer, c_writer):
            writer.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[OwnerServer, Client]]:
    async with serve_owner() as pair:
        yield pair


async def test_a_send_the_changing_network_refuses_is_no_warning(
        served: tuple[OwnerServer, Client], caplog: pytest.LogCaptureFixture) -> None:
    """Moving to another network fails every check for a moment (the address or route
    just went): routine, said by the agent; anything else is worth a warning."""
    _server, client = served
    created = await client.call(
        "create", ifname="kbwg0", private_key="A" * 43 + "=", listen_port=0,
        address="100.64.0.1/10", backend="auto",
    )  # fmt: skip
    assert created["ok"] and (await client.call("stun_open"))["ok"]
    raw = FakeStunSocket.instances[-1]
    request = stun_request()
    with caplog.at_level(logging.DEBUG, logger="kbwg.owner.server"):
        for code in (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EPERM):
            raw.fail = OSError(code, os.strerror(code))
            sent = await client.call("stun_send", dest="203.0.113.5:3478", data=request)
            assert not sent["ok"] and os.strerror(code) in sent["error"]
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if "failed" in r.getMessage()]
    assert [level for level, _ in levels] == [logging.DEBUG, logging.DEBUG, logging.WARNING]


async def test_owner_stun_ops(served: tuple[OwnerServer, Client]) -> None:
    server, client = served
    request = stun_request()
    assert not (await client.call("stun_open"))["ok"]  # no device yet
    created = await client.call(
        "create", ifname="kbwg0", private_key="A" * 43 + "=", listen_port=0,
        address="100.64.0.1/10", backend="auto",
    )  # fmt: skip
    assert created["ok"], created
    refused = await client.call("stun_send", dest="203.0.113.5:3478", data=request)
    assert not refused["ok"] and "stun_open" in refused["error"]

    assert await client.call("stun_open") == {"id": 4, "ok": True, "port": 51820}
    assert (await client.call("stun_open"))["port"] == 51820  # idempotent
    (raw,) = FakeStunSocket.instances
    assert raw.port == 51820

    sent = await client.call("stun_send", dest="203.0.113.5:3478", data=request)
    assert sent == {"id": 6, "ok": True, "source": "198.18.1.2:51820"}
    sent = await client.call(
        "stun_send", dest="203.0.113.5:3478", data=request, source="198.18.1.3"
    )
    assert sent["source"] == "198.18.1.3:51820"
    assert raw.sent == [
        (request, ("203.0.113.5", 3478), None),
        (request, ("203.0.113.5", 3478), "198.18.1.3"),
    ]
    too_big = await client.call("stun_send", dest="203.0.113.5:3478", data=bytes(1501))
    assert not too_big["ok"] and "1500" in too_big["error"]

    # Received packets that pass the owner's filter (here: the answer to the request it
    # sent) become unsolicited events; a stray answer does not.
    tid = stun.parse_message(request).transaction_id
    answer = bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, tid))
    stray = bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE))
    raw.on_packet(UdpDatagram(("203.0.113.5", 3478), ("198.18.1.2", 51820), stray))
    raw.on_packet(UdpDatagram(("203.0.113.5", 3478), ("198.18.1.2", 51820), answer))
    event = await client.frame()
    assert event == stun_event(("203.0.113.5", 3478), ("198.18.1.2", 51820), answer)
    assert event == {"event": "stun", "src": "203.0.113.5:3478", "dst": "198.18.1.2:51820",
                     "data": answer}  # fmt: skip
    stats = (await client.call("stats"))["stun_filter"]
    assert stats["passed_own"] == 1 and stats["unknown_transaction"] == 1

    await server.cleanup()
    assert raw.closed


async def test_owner_stun_send_rate_limit(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(owner_module, "STUN_SEND_RATE", 0.0)  # no refill: exact counts
    caplog.set_level(logging.WARNING, logger="kbwg.owner")
    async with serve_owner() as (server, client):
        await client.call(
            "create", ifname="kbwg0", private_key="A" * 43 + "=", listen_port=0,
            address="100.64.0.1/10", backend="auto",
        )  # fmt: skip
        await client.call("stun_open")
        replies = [
            await client.call("stun_send", dest="203.0.113.5:3478", data=stun_request())
            for _ in range(owner_module.STUN_SEND_BURST + 5)
        ]
        assert sum(r["ok"] for r in replies) == owner_module.STUN_SEND_BURST
        assert all("rate limit" in r["error"] for r in replies if not r["ok"])
        # Said once for the whole episode, and once when sends go through again.
        messages = [r.getMessage() for r in caplog.records]
        assert sum("rate limit" in m for m in messages) == 1, messages
        server._send_bucket = TokenBucket(1.0, 1)
        assert (await client.call("stun_send", dest="203.0.113.5:3478",
                                  data=stun_request()))["ok"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("back under the rate limit (5 sends refused)" in m for m in messages), messages


# -- OwnerStunTransport over a fake owner ------------------------------------------------


class FakeOwner:
    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail = False

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.requests.append((op, args))
        if self.fail:
            raise OSError("owner gone")
        return {"port": 51820} if op == "stun_open" else {"source": "198.18.1.2:51820"}


async def test_shared_port_transport() -> None:
    owner = FakeOwner()
    other: list[dict[str, Any]] = []
    transport = await OwnerStunTransport.open(cast(DeviceOwner, owner))
    transport.on_other_event = other.append
    assert transport.port == 51820 and owner.requests == [("stun_open", {})]

    client = StunClient(transport)
    transport.receiver = client.datagram_received
    lan = transport.from_source("198.18.1.2")
    assert transport.from_source("198.18.1.2") is lan
    lan_got: list[tuple[bytes, tuple[str, int]]] = []
    lan.receiver = lambda data, src: lan_got.append((data, src))

    binding = asyncio.create_task(client.binding(("203.0.113.5", 3478), timeout=2.0))
    await wait_for(lambda: len(owner.requests) > 1, "the binding request at the owner")
    op, args = owner.requests[1]  # [2:] may hold retransmits on a slow machine
    assert op == "stun_send" and args["dest"] == "203.0.113.5:3478" and "source" not in args
    request = stun.parse_message(args["data"])
    answer = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, request.transaction_id)
    answer.attributes["XOR-MAPPED-ADDRESS"] = ("192.0.2.44", 40000)
    # Answers are routed by the local address they arrived at.
    await owner.events.put(stun_event(("203.0.113.5", 3478), ("198.18.9.9", 51820), bytes(answer)))
    result = await binding
    assert result.mapped == ("192.0.2.44", 40000)

    # An answer goes to the transport that asked, whatever local address it reaches.
    check = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    sent_before = len(owner.requests)
    lan.send(bytes(check), ("203.0.113.6", 3478))
    await wait_for(lambda: len(owner.requests) > sent_before, "the check at the owner")
    assert owner.requests[sent_before][1]["source"] == "198.18.1.2"
    reply = bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, check.transaction_id))
    await owner.events.put(stun_event(("203.0.113.6", 3478), ("198.18.9.9", 51820), reply))
    # A request from a peer is nobody's answer: the default receiver gets it.
    incoming = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
    await owner.events.put(stun_event(("203.0.113.7", 51820), ("198.18.1.2", 51820), incoming))
    await owner.events.put({"event": "stun", "src": "nonsense", "dst": "198.18.1.3:1", "data": b""})
    await owner.events.put({"event": "link", "state": "down"})
    # Events are handled in order: once the last one is out, so are the others.
    await wait_for(lambda: other, "the link event to be passed on")
    assert lan_got == [(reply, ("203.0.113.6", 3478))]
    assert client.counters.unknown_transaction == 1, "the peer's request reached the default"
    assert other == [{"event": "link", "state": "down"}]
    assert transport.counters.bad_events == 1 and transport.counters.received == 3

    sends = len(owner.requests) - 1  # all but stun_open (2, or more with retransmits)
    owner.fail = True
    transport.send(b"lost", ("203.0.113.5", 3478))
    await transport.close()
    assert transport.counters.send_failed == 1 and transport.counters.sent == sends >= 2
    with pytest.raises(OSError):
        transport.send(b"late", ("203.0.113.5", 3478))


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENODEV])
async def test_a_source_the_host_no_longer_has_is_the_network_moving(
        monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Linux refuses an IPv6 source address that left the host with EINVAL (ENODEV for
    its interface): like EADDRNOTAVAIL, the network changing, not a fault. The same
    errors with the address still ours stay what they are."""
    from kbwg.owner import rawstun
    held = {"192.0.2.1": 3}
    monkeypatch.setattr(rawstun, "interface_index_of", lambda ip: held.get(ip, 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    raw = RawStunSocket(udp, PORT, lambda _d: None)
    raw._sock = cast(socket.socket, _Refusing(udp, code))
    clock = [100.0]
    monkeypatch.setattr(raw._loop, "time", lambda: clock[0])
    try:
        with pytest.raises(RawStunError) as still_ours:
            raw.send(stun_request(), ("192.0.2.9", 3478), source="192.0.2.1")
        assert isinstance(still_ours.value.__cause__, OSError)
        assert still_ours.value.__cause__.errno == code
        held.clear()  # the host left that network
        clock[0] += rawstun.IFINDEX_MEMORY  # a burst looks again once a second
        with pytest.raises(RawStunError) as gone:
            raw.send(stun_request(), ("192.0.2.9", 3478), source="192.0.2.1")
        assert isinstance(gone.value.__cause__, OSError)
        assert gone.value.__cause__.errno == errno.EADDRNOTAVAIL
        assert "no longer an address of this host" in str(gone.value)
        assert raw.counters.send_errors == 2
    finally:
        raw.close()
