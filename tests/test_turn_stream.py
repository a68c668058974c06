"""TURN over TCP and TLS: relay URLs in kbwg.json, the agent's client (aioice's stream
framing) against our relay server on loopback, the fallback from UDP, and a relay that
meets garbage on a stream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import fuzzing
import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st
from test_relay_protocol import SECRET, Endpoint, _config

from kbwg.agent.relay_paths import RelayPaths, relay_groups
from kbwg.agent.teamconfig import (
    RelayConfig,
    UnsupportedRelayUrl,
    parse_relay_url,
    parse_team_config,
    tls_context,
)
from kbwg.relay import main as relay_main
from kbwg.relay.server import RelayServer
from kbwg.turn.client import AllocationTimers, RelayAllocation
from kbwg_testing import wait_for
from kbwg_testing.certs import RelayCertificates, make_certificates

Address = tuple[str, int]

# --- relay URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host", "port", "transport"), [
    ("turn:192.0.2.1", "192.0.2.1", 3478, "udp"),
    ("turn:192.0.2.1:3479?transport=udp", "192.0.2.1", 3479, "udp"),
    ("turn:relay.example.org?transport=tcp", "relay.example.org", 3478, "tcp"),
    ("turn:192.0.2.1:80?transport=TCP", "192.0.2.1", 80, "tcp"),
    ("turns:relay.example.org", "relay.example.org", 5349, "tls"),
    ("turns:192.0.2.1:443?transport=tcp", "192.0.2.1", 443, "tls"),
    ("TURNS:[2001:db8::1]:443", "2001:db8::1", 443, "tls"),
])
def test_relay_urls(url: str, host: str, port: int, transport: str) -> None:
    address, parsed = parse_relay_url(url)
    assert (address.host, address.port, parsed) == (host, port, transport)


@pytest.mark.parametrize(("url", "says"), [
    ("stun:192.0.2.1", "not a turn: or turns: URL"),
    ("http://192.0.2.1", "not a turn: or turns: URL"),
    ("turn:192.0.2.1?transport=sctp", "transport=sctp is not supported"),
    ("turns:192.0.2.1?transport=udp", "transport=udp is not supported"),
])
def test_unsupported_relay_urls_say_what_to_write(url: str, says: str) -> None:
    with pytest.raises(UnsupportedRelayUrl, match=says) as raised:
        parse_relay_url(url)
    assert "turns:HOST" in str(raised.value) or "without it" in str(raised.value)


def test_a_relay_with_an_unknown_scheme_or_transport_is_skipped_not_fatal(
        caplog: pytest.LogCaptureFixture) -> None:
    doc = {"relays": [
        {"url": "turn:192.0.2.1?transport=sctp", "secret": "s"},
        {"url": "turn:192.0.2.2?transport=tcp", "secret": "s"},
        {"url": "stuns:192.0.2.3", "secret": "s"},
        {"url": "turns:192.0.2.4", "secret": "s", "ca_file": "/etc/kbwg/relay-ca.pem"},
    ]}
    with caplog.at_level(logging.WARNING):
        config = parse_team_config(json.dumps(doc))
    assert [(r.host, r.transport, r.ca_file) for r in config.relays] == [
        ("192.0.2.2", "tcp", None), ("192.0.2.4", "tls", "/etc/kbwg/relay-ca.pem")]
    assert "'relays' item 1: 'url'" in caplog.text and "transport=sctp" in caplog.text
    assert "'relays' item 3: 'url'" in caplog.text and "skipped" in caplog.text


def test_ca_file_on_a_plain_turn_url_is_ignored_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    doc = {"relays": [{"url": "turn:192.0.2.1", "secret": "s", "ca_file": "/x.pem"}]}
    with caplog.at_level(logging.WARNING):
        [relay] = parse_team_config(json.dumps(doc)).relays
    assert relay.ca_file is None and "'ca_file' only matters for turns:" in caplog.text


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_unusable_ca_file_names_the_key_and_what_to_do(tmp_path: Path,
                                                       content: bytes | None) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    relay = RelayConfig("turns:192.0.2.1", "192.0.2.1", 5349, "s", "tls", ca_file=str(path))
    with pytest.raises(ValueError, match="'ca_file'") as raised:
        tls_context(relay)
    assert str(path) in str(raised.value) and "PEM file" in str(raised.value)


def test_entries_for_one_relay_are_one_group_tried_udp_first() -> None:
    def relay(url: str, host: str, transport: str, secret: str = "s") -> RelayConfig:
        return RelayConfig(url, host, 1, secret, transport)

    relays = [relay("turns:a", "a", "tls"), relay("turn:b", "b", "udp"),
              relay("turn:A?transport=tcp", "A", "tcp"), relay("turn:a", "a", "udp"),
              relay("turn:a:9", "a", "udp", secret="other")]
    groups = relay_groups(relays)
    assert [(g.key, [o.url for o in g.options]) for g in groups] == [
        ("turns:a", ["turn:a", "turn:A?transport=tcp", "turns:a"]),
        ("turn:b", ["turn:b"]),
        ("turn:a:9", ["turn:a:9"]),
    ]


# --- the relay's stream listeners and the client ---------------------------------------


@contextlib.asynccontextmanager
async def stream_relay(**overrides: Any) -> AsyncIterator[RelayServer]:
    config = _config(tcp_listen=("127.0.0.1", 0), sweep_interval=0.05, **overrides)
    async with RelayServer(config) as server:
        yield server


def stream_address(server: RelayServer, kind: str) -> Address:
    assert server.streams is not None
    return server.streams.addresses[kind]


async def round_trip(alloc: RelayAllocation, got: asyncio.Queue[tuple[bytes, Address]],
                     ) -> None:
    """Both ways through the relay, odd lengths included: ChannelData on a stream is
    padded to 4 bytes and the padding must not reach the peer, nor come back."""
    peer = await Endpoint.open()
    try:
        for payload in (b"first", b"abc", b"x" * 1201, b"four"):
            alloc.send(payload, peer.address)
            assert await peer.receive() == (payload, alloc.relayed)
        for payload in (b"reply", b"ab", b"y" * 999):
            peer.send(payload, alloc.relayed)
            assert await asyncio.wait_for(got.get(), 2.0) == (payload, peer.address)
        assert (alloc.counters.sent, alloc.counters.received) == (4, 3)
    finally:
        peer.close()


@contextlib.asynccontextmanager
async def allocation(address: Address, transport: str, tls: ssl.SSLContext | None = None,
                     **timers: float) -> AsyncIterator[
        tuple[RelayAllocation, asyncio.Queue[tuple[bytes, Address]], asyncio.Event]]:
    alloc = await RelayAllocation.open(f"turn:test?transport={transport}", address,
                                       "alice", SECRET, timers=AllocationTimers(**timers),
                                       transport=transport, tls=tls)
    got: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
    lost = asyncio.Event()
    alloc.receiver = lambda data, peer: got.put_nowait((data, peer))
    alloc.on_lost = lambda _a: lost.set()
    try:
        yield alloc, got, lost
    finally:
        await alloc.close()


async def test_allocation_over_tcp_carries_channel_data_both_ways() -> None:
    async with stream_relay() as server:
        async with allocation(stream_address(server, "tcp"), "tcp") as (alloc, got, _):
            assert alloc.transport == "tcp"
            assert alloc.local_ip == "127.0.0.1"
            [entry] = server.table.allocations.values()
            assert entry.stream is not None  # made over the stream, not over UDP
            await round_trip(alloc, got)
            assert server.counters.channel_data_in >= 3  # the fast path, not Send
        await wait_for(lambda: not server.table.allocations, "the allocation to go")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> RelayCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"), "127.0.0.1")


async def test_allocation_over_tls_with_a_self_signed_ca(
        certificates: RelayCertificates) -> None:
    overrides = {"tls_listen": ("127.0.0.1", 0), "cert_file": str(certificates.cert),
                 "key_file": str(certificates.key)}
    relay = RelayConfig("turns:127.0.0.1", "127.0.0.1", 0, SECRET, "tls",
                        ca_file=str(certificates.ca))
    async with stream_relay(**overrides) as server:
        address = stream_address(server, "tls")
        async with allocation(address, "tls", tls_context(relay)) as (alloc, got, _):
            assert alloc.transport == "tls"
            await round_trip(alloc, got)
        # Without the team's CA the relay's certificate is refused, as it must be.
        with pytest.raises(ssl.SSLCertVerificationError):
            await RelayAllocation.open("turns:x", address, "alice", SECRET,
                                       transport="tls", tls=ssl.create_default_context())


async def test_closing_the_connection_deletes_its_allocation_and_the_relay_notices_it(
        ) -> None:
    async with stream_relay() as server:
        async with allocation(stream_address(server, "tcp"), "tcp",
                              watch_interval=60.0) as (alloc, _, lost):
            assert server.streams is not None
            [connection] = server.streams.connections
            connection.close()  # the relay hangs up: the agent hears it at once
            await asyncio.wait_for(lost.wait(), 2.0)
            assert alloc.closed
        assert not server.table.allocations
        assert server.counters.allocations_deleted == 1


async def test_udp_datagrams_cannot_use_a_stream_allocation() -> None:
    async with stream_relay() as server, allocation(
            stream_address(server, "tcp"), "tcp") as (alloc, _, _lost):
        peer = await Endpoint.open()
        try:
            alloc.send(b"bind", peer.address)
            await peer.receive()
            assert not server.table.routes and len(server.table.stream_routes) == 1
        finally:
            peer.close()


# --- bad input on a stream ---------------------------------------------------------------


async def _closed_by_relay(address: Address, data: bytes, timeout: float = 3.0) -> bytes:
    """What the relay answers to `data` before it closes the connection."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)  # up to EOF: closed
    finally:
        writer.close()


def _stun_header(length: int, cookie: int = stun.COOKIE, method: int = 0x0001) -> bytes:
    return struct.pack("!HHI", method, length, cookie) + bytes(12)


@pytest.mark.parametrize(("data", "says"), [
    (b"\xff" * 32, "neither STUN nor ChannelData"),
    (_stun_header(8, cookie=0xDEADBEEF) + bytes(8), "no STUN magic cookie"),
    (_stun_header(6) + bytes(8), "STUN length not a multiple of 4"),
    # A good Binding, then garbage in the same read: the first is answered, then closed.
    (_stun_header(0) + b"\x80garbage", "neither STUN nor ChannelData"),
])
async def test_garbage_closes_the_connection_with_a_log_line(
        data: bytes, says: str, caplog: pytest.LogCaptureFixture) -> None:
    async with stream_relay() as server:
        with caplog.at_level(logging.INFO, logger="kbwg.relay.streams"):
            answer = await _closed_by_relay(stream_address(server, "tcp"), data)
        if data.startswith(_stun_header(0)):
            assert stun.parse_message(answer).message_class == stun.Class.RESPONSE
        else:
            assert answer == b""
        assert server.counters.stream_bad_input == 1
        assert says in caplog.text and "tcp client 127.0.0.1:" in caplog.text
        async with allocation(stream_address(server, "tcp"), "tcp") as (alloc, got, _):
            await round_trip(alloc, got)  # and the relay serves the next client


@pytest.mark.parametrize("data", [
    struct.pack("!HH", 0x4000, 0xFFFF) + b"short",  # ChannelData of the largest length
    _stun_header(0xFFFC)[:20] + bytes(100),  # STUN of the largest length
    _stun_header(0)[:11],  # half a header
])
async def test_a_frame_left_unfinished_closes_the_connection(data: bytes) -> None:
    async with stream_relay(stream_frame_timeout=0.3) as server:
        assert await _closed_by_relay(stream_address(server, "tcp"), data) == b""
        assert server.counters.stream_bad_input == 1
        # Cut short by the client instead: the relay just forgets it.
        _reader, writer = await asyncio.open_connection(*stream_address(server, "tcp"))
        writer.write(data)
        await writer.drain()
        writer.close()
        assert server.streams is not None
        await wait_for(lambda: not server.streams.connections, "the connection to go")
        async with allocation(stream_address(server, "tcp"), "tcp") as (alloc, got, _):
            await round_trip(alloc, got)


async def test_a_connection_without_an_allocation_is_closed_when_idle() -> None:
    async with stream_relay(stream_idle_timeout=0.3) as server:
        assert await _closed_by_relay(stream_address(server, "tcp"), b"") == b""
        assert server.counters.stream_idle == 1


async def test_connections_per_client_ip_are_capped() -> None:
    quotas = _config().quotas
    async with stream_relay(quotas=replace(quotas, allocations_per_address=2)) as server:
        address = stream_address(server, "tcp")
        kept = [await asyncio.open_connection(*address) for _ in range(2)]
        try:
            assert await _closed_by_relay(address, b"") == b""
            assert server.counters.stream_refused == 1
        finally:
            for _, writer in kept:
                writer.close()


# --- the agent: UDP first, then TCP ------------------------------------------------------


async def test_udp_without_an_answer_falls_back_to_tcp_and_says_why() -> None:
    # The timing of the race between transports is tested on a virtual clock in
    # test_relay_transport_race.py; this is the real thing on loopback.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes UDP, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        async with stream_relay() as server:
            tcp_port = stream_address(server, "tcp")[1]
            udp_port = silent.getsockname()[1]
            relays = [RelayConfig(f"turn:127.0.0.1:{udp_port}", "127.0.0.1", udp_port,
                                  SECRET),
                      RelayConfig(f"turn:127.0.0.1:{tcp_port}?transport=tcp", "127.0.0.1",
                                  tcp_port, SECRET, "tcp")]
            ready: asyncio.Queue[RelayAllocation] = asyncio.Queue()
            paths = RelayPaths("alice", 51820, lambda *_: None, ready.put_nowait)
            try:
                # TCP starts a second after UDP, well within the time-out: gathering
                # has the allocation when ensure returns.
                await paths.ensure(relays, timeout=10.0)
                assert paths.missing(relays) == [] and ready.empty()
                [report] = paths.to_json()
                assert report["transport"] == "tcp"
                assert re.fullmatch(r"udp: no answer in 1\.\d s; using tcp",
                                    report["transport_reason"]), report["transport_reason"]
                assert [c.type for c in paths.candidates()] == ["relay"]
                await paths.ensure(relays, timeout=10.0)  # nothing missing: no second one
                assert len(server.table.allocations) == 1
            finally:
                await paths.close()
    finally:
        silent.close()


async def test_an_unreadable_ca_file_skips_that_transport_only(tmp_path: Path) -> None:
    async with RelayServer(_config()) as server:
        host, port = server.address
        relays = [RelayConfig(f"turns:{host}", host, port, SECRET, "tls",
                              ca_file=str(tmp_path / "missing.pem")),
                  RelayConfig(f"turn:{host}:{port}", host, port, SECRET, "udp")]
        paths = RelayPaths("alice", 51820, lambda *_: None, lambda _a: None)
        try:
            await paths.ensure(relays, timeout=1.0)
            [report] = paths.to_json()
            assert report["transport"] == "udp"
            assert report["transport_reason"] == "udp: first choice"
        finally:
            await paths.close()


# --- the relay's command line ------------------------------------------------------------


def _relay_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    parser = argparse.ArgumentParser()
    relay_main.add_arguments(parser)
    return parser.parse_args(["--listen", "127.0.0.1:3478", "--secret-file", str(secret),
                              *extra])


def test_relay_flags_for_tcp_and_tls(tmp_path: Path, certificates: RelayCertificates) -> None:
    config = relay_main.build_config(_relay_args(
        tmp_path, "--tcp-listen", "127.0.0.1", "--tls-listen", "127.0.0.1",
        "--cert", str(certificates.cert), "--key", str(certificates.key)))
    assert config.tcp_listen == ("127.0.0.1", 3478)
    assert config.tls_listen == ("127.0.0.1", 5349)


@pytest.mark.parametrize(("extra", "says"), [
    (["--tls-listen", "127.0.0.1:5349"], "needs --cert FILE and --key FILE"),
    (["--cert", "c.pem", "--key", "k.pem"], "add it"),
    (["--tls-listen", "127.0.0.1", "--cert", "/nonexistent.pem", "--key", "/nonexistent.key"],
     "cannot use --cert /nonexistent.pem"),
])
def test_relay_tls_flags_errors(tmp_path: Path, extra: list[str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        relay_main.build_config(_relay_args(tmp_path, *extra))


# --- diag ----------------------------------------------------------------------------------


async def test_diag_probes_stream_relays_over_their_transport(tmp_path: Path) -> None:
    from kbwg.agent.diag import DiagOptions, render_report, run_diag

    async with stream_relay() as server:
        host, port = stream_address(server, "tcp")
        with socket.socket() as closed:  # a TCP port nothing listens on
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]
        options = DiagOptions(classic=False, timeout=10.0, relays=[
            RelayConfig(f"turn:{host}:{port}?transport=tcp", host, port, SECRET, "tcp"),
            RelayConfig(f"turns:{host}:{dead}", host, dead, SECRET, "tls"),
            RelayConfig(f"turns:{host}:{port}", host, port, SECRET, "tls",
                        ca_file=str(tmp_path / "missing.pem")),
        ])
        data = (await run_diag(options)).to_json()
    tcp, refused, no_ca = data["relays"]
    assert (tcp["transport"], tcp["reachable"]) == ("tcp", True), tcp
    assert tcp["mapped"] is not None and tcp["mapped"].startswith("127.0.0.1:")
    assert (refused["transport"], refused["reachable"]) == ("tls", False)
    assert refused["error"].startswith("tls: ")
    assert no_ca["reachable"] is False and "'ca_file'" in no_ca["error"]
    assert "relay reachable" in data["conclusion"]
    assert f"turn:{host}:{port}?transport=tcp" in render_report(data)


# --- fuzz: any bytes, cut anywhere ----------------------------------------------------------


class FakeStreamTransport:
    """What a stream protocol (StreamConnection, the agent's) uses of its transport, in
    memory; driven by hand."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.written = bytearray()
        self.closed = False
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return len(self.written)

    def close(self) -> None:
        self.closed = True

    abort = close


def _binding() -> bytes:
    return bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))


def _allocate() -> bytes:
    message = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
    message.attributes["REQUESTED-TRANSPORT"] = 0x11000000
    return bytes(message)


_GOOD_STREAM = _binding() + struct.pack("!HH", 0x4000, 3) + b"abc\0" + _allocate()


class HandDrivenStream(NamedTuple):
    server: RelayServer
    streams: Any  # kbwg.relay.streams.StreamListeners
    connection: Any  # kbwg.relay.streams.StreamConnection
    transport: FakeStreamTransport


def stream_connection(client: tuple[str, int] = ("127.0.0.1", 40000)) -> HandDrivenStream:
    """A relay's TCP connection from `client`, driven by hand (no listener, no loop)."""
    from kbwg.relay.control import ControlPlane
    from kbwg.relay.streams import StreamConnection, StreamListeners

    config = _config()
    server = RelayServer(config)
    main = ("127.0.0.1", 3478)
    control = ControlPlane(config, server.table, server.counters, lambda *_: None, main, {})
    streams = StreamListeners(config, server.table, server.counters, control, main)
    connection = StreamConnection(streams, "tcp")
    transport = FakeStreamTransport(client)
    connection.connection_made(cast(asyncio.Transport, transport))
    return HandDrivenStream(server, streams, connection, transport)


@pytest.mark.timeout(120)
@fuzzing.FUZZ
@given(data=st.one_of(st.binary(max_size=300), fuzzing.mutated(_GOOD_STREAM, at_least=0)),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_a_stream_survives_any_bytes_in_any_pieces(data: bytes, cuts: list[int]) -> None:
    server, streams, connection, transport = stream_connection()
    edges = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, end in itertools.pairwise(edges):
        connection.data_received(data[start:end])
    streams.sweep(time.monotonic() + 3600)  # whatever is left unfinished goes
    counters = server.counters
    assert counters.handler_errors == 0
    # A connection still open holds no half frame and has framed everything it got.
    assert transport.closed or not connection.buffer
    if data == _GOOD_STREAM:  # the unchanged stream: answered, never closed as bad
        assert counters.stream_bad_input == 0 and counters.binding_responses == 1
    connection.connection_lost(None)
    assert not streams.connections
    server.close()


def test_status_says_which_relay_fell_back_and_why() -> None:
    from kbwg.agent.status_view import render_status

    relay = {"url": "turn:192.0.2.5?transport=tcp", "relayed": "192.0.2.5:40000",
             "transport": "tcp", "transport_reason": "udp: no answer in 3 s; using tcp",
             "alive": True}
    status = {"username": "alice", "device": "laptop", "team": "t",
              "overlay_ip": "100.64.0.1", "interface": "kbwg0", "backend": "userspace",
              "endpoint": "192.0.2.9:51820", "public_key": "k", "peers": [],
              "relays": [relay, {**relay, "url": "turn:192.0.2.6", "transport": "udp",
                                 "transport_reason": "udp: first choice"}]}
    text = render_status(status)
    assert ("relay turn:192.0.2.5?transport=tcp: 192.0.2.5:40000 over tcp "
            "(udp: no answer in 3 s; using tcp)") in text
    assert "turn:192.0.2.6" not in text  # UDP as first choice needs no line
