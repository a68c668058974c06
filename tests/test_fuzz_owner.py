"""Fuzzing the device owner's input, the frames the agent sends it, with a bounded budget.

The owner runs as root and its only input is the agent's frame stream; a compromised or
buggy agent can send anything. Whatever it sends: the frame reader gives a map, a
FrameBodyError (stream still in sync) or a FrameError (cannot resynchronise), never
hangs; the request parsers raise ProtocolError and nothing else; `OwnerServer.handle`
answers every map with `ok` true or false and an error string, without reaching its
catch-all for unexpected exceptions; and the owner still works afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any, ClassVar

import fuzzing
import msgpack
import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from owner_fakes import FakeNetConfig, MemoryBackend

from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.core.interface_address import InterfaceAddress
from kbwg.owner.frames import (
    FrameBodyError,
    FrameDecoder,
    FrameError,
    encode_frame,
    read_frame,
)
from kbwg.owner.interfaces import GatewayRecord
from kbwg.owner.netconfig import Egress
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import (
    AddRouteArgs,
    CreateArgs,
    EgressArgs,
    HostRoutesArgs,
    ProtocolError,
    RemovePeerArgs,
    RemoveRouteArgs,
    SetPeerArgs,
    StunSendArgs,
    StunUfragsArgs,
    parse_endpoint,
    parse_interface,
    parse_request,
)
from kbwg.owner.rawstun import PacketCallback
from kbwg.owner.server import EXIT_OK, EXIT_STREAM_BROKEN, OwnerServer

FUZZ = fuzzing.FUZZ
# Every read of a fed, closed stream completes at once; this only turns a hang into a
# failure instead of a stuck suite.
READ_TIMEOUT_S = 2.0

PRIVATE = base64.b64encode(bytes(PrivateKey(bytes(range(1, 33))))).decode()
PUBLIC = base64.b64encode(bytes(PrivateKey(bytes(range(33, 65))).public_key)).decode()
BINDING = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST,
                             transaction_id=b"\x01" * 12))


class FakeStunSocket:
    """The raw STUN socket, sending nowhere."""

    sent: ClassVar[list[bytes]] = []

    def __init__(self, port: int, on_packet: PacketCallback) -> None:
        self.port = port

    def send(self, payload: bytes, dest: tuple[str, int], source: str | None
             ) -> tuple[str, int]:
        return (source or "198.18.1.2", self.port)

    def close(self) -> None:
        pass


class FakeHost:
    """The host's network as the read-only ops see it: fixed answers, and a watch that
    waits (stopped with the server)."""

    async def interfaces(self) -> list[InterfaceAddress]:
        return [InterfaceAddress("eth9", 2, "198.18.1.2", 24, True, True)]

    async def default_gateway(self) -> GatewayRecord | None:
        return GatewayRecord("198.18.1.1", "198.18.1.2", "eth9")

    async def route_destinations(self, exclude_ifname: str) -> list[Any]:
        return []

    async def egress(self, dst: Any, via_ifname: str | None, ignore: Any) -> Egress | None:
        return Egress(via_ifname or "eth9", "198.18.1.1")

    async def watch(self, on_change: Any, own_ifname: Any) -> None:
        await asyncio.Event().wait()


def _server() -> OwnerServer:
    return OwnerServer(FakeNetConfig(), lambda _name: MemoryBackend(), OwnerPolicy(),
                       FakeStunSocket, host=FakeHost())


# --- strategies ---

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.text(max_size=30), st.binary(max_size=30))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=15)
endpoints = st.one_of(
    st.sampled_from(["198.18.0.2:51820", "198.18.0.2:0", "198.18.0.2:65536", "198.18.0.2:",
                     "198.18.0.2", ":51820", "[2001:db8::1]:51820", "2001:db8::1:51820",
                     "[198.18.0.2]:1", "100.64.0.2:51820", "0.0.0.0:1", "224.0.0.1:1",
                     "255.255.255.255:1", "127.0.0.1:1", "fe80::1%eth0:1",
                     "198.18.0.2:\u00b2", "198.18.0.2:\u0665", "198.18.0.2:" + "1" * 5000,
                     "198.18.0.2:-1", "198.18.0.2:+1", "198.18.0.2: 1"]),
    st.text(max_size=30))
cidrs = st.one_of(
    st.sampled_from(["100.64.0.2/32", "100.64.0.0/10", "0.0.0.0/0", "100.64.0.1/32",
                     "2001:db8::/32", "100.64.0.2", "100.64.0.2/33", "/32", "::/0",
                     "100.64.0.0/24", "198.18.0.2/32", "100.64.0.2/32\n"]),
    st.text(max_size=20))
ifnames = st.one_of(st.sampled_from(["kbwg0", "kbwg1", "eth9", "eth8", "lo", "kbwg",
                                     "kbwg0x", "a/b", " kbwg0", "x" * 16, "", "nosuch"]),
                    st.text(max_size=20))
keys = st.one_of(st.just(PUBLIC), st.just(PRIVATE), st.just(PUBLIC[:-2] + "x="),
                 st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                 st.text(max_size=50))
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "ifname": ifnames,
    "private_key": keys,
    "public_key": keys,
    "listen_port": st.one_of(st.integers(-1, 70000), st.sampled_from([0, 1023, 1024])),
    "address": st.one_of(st.sampled_from(["100.64.0.1/10", "100.64.0.5/10", "100.64.0.0/10",
                                          "100.64.0.1", "2001:db8::1/64", "8.8.8.8/0",
                                          "100.64.0.1/33", "100.64.0.1/16"]), cidrs),
    "backend": st.sampled_from(["auto", "kernel", "userspace", "fake", ""]),
    "mtu": st.integers(0, 70000),
    "endpoint": st.one_of(st.none(), endpoints),
    "allowed_ips": st.lists(st.one_of(cidrs, scalars), max_size=3),
    "keepalive": st.integers(-1, 70000),
    "destination": st.one_of(st.sampled_from(["198.18.0.2/32", "198.18.0.2", "100.64.0.2/32",
                                              "2001:db8::1/128", "0.0.0.0/32",
                                              "198.18.0.0/24"]), cidrs),
    "via": st.one_of(st.none(), st.text(max_size=10)),
    "dest": endpoints,
    "data": st.one_of(st.just(BINDING), st.binary(max_size=64), st.binary(min_size=1501,
                                                                       max_size=1600)),
    "source": st.one_of(st.none(), st.sampled_from(["198.18.1.2", "0.0.0.0", "::1",
                                                    "224.0.0.1", "198.18.1.2 "])),
    "ufrags": st.lists(st.one_of(st.text(max_size=10), scalars), max_size=5),
    "exclude_ifname": ifnames,
}
VALID: dict[str, dict[str, Any]] = {
    "hello": {},
    "stats": {},
    "create": {"ifname": "kbwg0", "private_key": PRIVATE, "listen_port": 0,
               "address": "100.64.0.1/10", "backend": "auto"},
    "set_peer": {"public_key": PUBLIC, "endpoint": "198.18.0.2:51820",
                 "allowed_ips": ["100.64.0.2/32"], "keepalive": 25},
    "remove_peer": {"public_key": PUBLIC},
    "add_route": {"destination": "198.18.0.2/32", "ifname": "eth9"},
    "remove_route": {"destination": "198.18.0.2/32"},
    "set_address": {"address": "100.64.0.5/10"},
    "stun_open": {},
    "stun_send": {"dest": "198.18.0.2:3478", "data": BINDING},
    "stun_ufrags": {"ufrags": ["abcd", "wxyz"]},
    "interfaces": {},
    "default_gateway": {},
    "host_routes": {"exclude_ifname": "kbwg0"},
    "egress": {"destination": "198.18.0.2", "ifname": "eth9"},
    "watch_network": {},
}
PARSERS = {"create": CreateArgs.parse, "set_peer": SetPeerArgs.parse,
           "remove_peer": RemovePeerArgs.parse, "add_route": AddRouteArgs.parse,
           "remove_route": RemoveRouteArgs.parse, "set_address": parse_interface,
           "stun_send": StunSendArgs.parse, "stun_ufrags": StunUfragsArgs.parse,
           "host_routes": HostRoutesArgs.parse, "egress": EgressArgs.parse}


@st.composite
def near_args(draw: st.DrawFn, op: str) -> dict[str, Any]:
    """The op's valid arguments with a few replaced by near or wrong values, or left out."""
    args = dict(VALID[op])
    names = sorted({*args, *draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=1))})
    for name in draw(st.sets(st.sampled_from(names), max_size=2)) if names else ():
        choice = draw(st.integers(0, 5))
        if choice == 0:
            args.pop(name, None)
        elif choice == 1:
            args[name] = draw(values)
        else:
            args[name] = draw(FIELDS.get(name, values))
    return args


def _mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]
            ) -> st.SearchStrategy[Any]:
    """`usual` nine times in ten: the rest of the request gets looked at."""
    return st.integers(0, 9).flatmap(lambda n: usual if n else other)


containers = st.one_of(st.lists(scalars, max_size=3),
                       st.dictionaries(st.text(max_size=4), scalars, max_size=3))


def _confused_request(op: str) -> st.SearchStrategy[dict[str, Any]]:
    if not VALID[op]:
        return st.just({"op": op})
    return fuzzing.type_confused(VALID[op], scalars, containers).map(
        lambda args: {"op": op, **args})


ops = st.sampled_from(sorted(VALID))
requests = st.one_of(
    ops.flatmap(lambda op: st.tuples(st.just(op), near_args(op))).map(
        lambda t: {"op": t[0], **t[1]}),
    ops.flatmap(_confused_request),
    st.dictionaries(st.text(max_size=8), values, max_size=4),
).flatmap(lambda request: st.fixed_dictionaries({
    "id": _mostly(st.integers(0, 2**31), st.one_of(
        st.booleans(), st.integers(-(2**63), 2**64 - 1), values)),
    "op": _mostly(st.just(request.get("op", "hello")), st.one_of(ops, values)),
}).map(lambda head: {**request, **head}))


# --- frames ---

@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Valid frames, frames with bad bodies, bad length prefixes, raw junk, mutated."""
    pieces = draw(st.lists(st.one_of(
        st.dictionaries(st.text(max_size=6), values, max_size=3).map(encode_frame),
        st.binary(max_size=40).map(lambda b: struct.pack(">I", len(b)) + b),
        values.map(lambda v: msgpack.packb(v, use_bin_type=True)).map(
            lambda b: struct.pack(">I", len(b)) + b),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
        st.binary(max_size=20),
    ), max_size=6))
    data = bytearray(b"".join(pieces))
    for _ in range(draw(st.integers(0, 2))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif data:
            del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


async def _read_all(data: bytes) -> list[object]:
    """What read_frame gives, frame after frame, until the stream ends or breaks."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[object] = []
    for _ in range(len(data) // 4 + 2):  # each frame takes 4 bytes at least
        try:
            frame = await asyncio.wait_for(read_frame(reader), READ_TIMEOUT_S)
        except FrameBodyError as exc:
            assert str(exc)
            out.append("body error")
            continue
        except FrameError as exc:
            assert str(exc)
            out.append("broken")
            return out
        if frame is None:
            return out
        assert isinstance(frame, dict)
        out.append(frame)
    raise AssertionError("read_frame kept returning frames past the end of the data")


def _decode_all(data: bytes, cuts: list[int]) -> list[object]:
    """The same stream through FrameDecoder, fed in chunks cut at `cuts`."""
    decoder = FrameDecoder()
    out: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    for chunk in chunks:
        pending = chunk
        while True:
            try:
                out.extend(decoder.feed(pending))
            except FrameBodyError as exc:
                out.extend(exc.frames)
                out.append("body error")
                pending = b""  # the rest stays buffered: go on after the bad frame
                continue
            except FrameError:
                out.append("broken")
                return out
            break
    if decoder.pending:
        out.append("broken")  # end of stream inside a frame
    return out


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=100)
@given(data=frame_streams(), cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_frame_streams_give_maps_or_frame_errors_and_never_hang(data: bytes,
                                                                cuts: list[int]) -> None:
    read = asyncio.run(_read_all(data))
    decoded = _decode_all(data, cuts)
    # The incremental decoder agrees with the stream reader, however the bytes arrive;
    # except that a chunk that breaks the stream loses the frames decoded from it (the
    # decoder is unusable then, as documented).
    if decoded[-1:] == ["broken"]:
        assert read[-1:] == ["broken"]
        decoded, read = decoded[:-1], read[:len(decoded) - 1]
    # Compared packed: a NaN in a frame is not equal to itself.
    assert msgpack.packb(decoded) == msgpack.packb(read)


# --- request parsing ---

@pytest.mark.timeout(60)
@FUZZ
@given(request=requests)
def test_requests_parse_or_give_a_protocol_error(request: dict[str, Any]) -> None:
    try:
        parsed = parse_request(request)
    except ProtocolError as exc:
        assert str(exc)
        return
    parser = PARSERS.get(parsed.op)
    if parser is None:
        return
    try:
        parser(parsed.args)
    except ProtocolError as exc:
        assert str(exc)


@pytest.mark.timeout(60)
@FUZZ
@given(text=endpoints)
def test_endpoints_parse_or_give_a_protocol_error(text: str) -> None:
    try:
        host, port = parse_endpoint(text)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert 1 <= port <= 65535 and host


# --- the server ---

class _Errors(logging.Handler):
    """ERROR records: the server's catch-all for exceptions it did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _catch_all_records() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of the server meanwhile (a fixture would be one per test, not per
    example)."""
    handler, logger = _Errors(), logging.getLogger("kbwg.owner.server")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _check_reply(request: dict[str, Any], reply: dict[str, Any]) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    rid = request.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        assert reply["id"] == rid
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"], reply
    encode_frame(reply)  # every reply goes back as a frame


async def _session(frames: list[dict[str, Any]]) -> None:
    server = _server()
    try:
        for frame in frames:
            _check_reply(frame, await asyncio.wait_for(server.handle(frame), READ_TIMEOUT_S))
        # Still serving: stats answers, and a device can be had and used.
        assert (await server.handle({"id": 1, "op": "stats"}))["ok"]
        if server.state.backend is None:
            reply = await server.handle({"id": 2, "op": "create", **VALID["create"]})
            assert reply["ok"], reply
        reply = await server.handle({"id": 3, "op": "set_peer", **VALID["set_peer"],
                                     "endpoint": "198.18.0.9:51820",
                                     "allowed_ips": ["100.64.0.9/32"]})
        assert reply["ok"] or "refused" in reply["error"], reply
    finally:
        await server.stop_watching()
        await server.cleanup()


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=60)
@given(frames=st.lists(requests, min_size=1, max_size=8),
       create_first=st.booleans())
def test_the_owner_answers_every_request(frames: list[dict[str, Any]],
                                         create_first: bool) -> None:
    if create_first:  # most ops need a device to get past the first check
        frames = [{"id": 0, "op": "create", **VALID["create"]},
                  {"id": 0, "op": "stun_open"}, *frames]
    with _catch_all_records() as errors:
        asyncio.run(_session(frames))
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.timeout(60)
@FUZZ
@given(request=ops.flatmap(_confused_request), rid=st.integers(0, 2**31))
def test_the_owner_answers_a_request_with_one_field_wrong(request: dict[str, Any],
                                                          rid: int) -> None:
    # A device first: most ops are judged only once there is one.
    frames = [{"id": 0, "op": "create", **VALID["create"]}, {"id": 0, "op": "stun_open"},
              {"id": 0, "op": "set_peer", **VALID["set_peer"]}, {"id": rid, **request}]
    with _catch_all_records() as errors:
        asyncio.run(_session(frames))
    assert not errors, [r.getMessage() for r in errors]


async def _serve(data: bytes) -> tuple[int, list[dict[str, Any]]]:
    """The owner's whole loop over `data`, with its replies read back."""
    server = _server()
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    ours, theirs = socket.socketpair()
    try:
        _, writer = await asyncio.open_unix_connection(sock=ours)
        replies_reader, replies_writer = await asyncio.open_unix_connection(sock=theirs)
        code = await asyncio.wait_for(server.serve(reader, writer, asyncio.Event()), 5)
        writer.close()
        replies = []
        while (reply := await asyncio.wait_for(read_frame(replies_reader), 5)) is not None:
            replies.append(reply)
        replies_writer.close()
        return code, replies
    finally:
        await server.cleanup()
        ours.close()
        theirs.close()


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=40)
@given(data=st.one_of(frame_streams(),
                      st.lists(requests, max_size=5).map(
                          lambda frames: b"".join(encode_frame(f) for f in frames))))
def test_the_owner_loop_survives_any_stream(data: bytes) -> None:
    with _catch_all_records() as errors:
        code, replies = asyncio.run(_serve(data))
    assert code in (EXIT_OK, EXIT_STREAM_BROKEN)
    for reply in replies:
        assert isinstance(reply.get("ok"), bool)
        assert reply["ok"] or reply["error"]
    # A broken stream is the one ERROR the loop logs on purpose.
    assert all("input stream broken" in r.getMessage() for r in errors)


# --- the other direction: the owner's events, as the agent takes them ---

stun_events = st.fixed_dictionaries({"event": st.just("stun")}, optional={
    "data": st.one_of(st.binary(max_size=30), st.just(BINDING),
                      st.just(bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                                 transaction_id=b"\x02" * 12))), values),
    "src": st.one_of(st.just("198.18.0.2:3478"), endpoints, values),
    "dst": st.one_of(st.just("198.18.1.2:51820"), endpoints, values),
})


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=80)
@given(events=st.lists(st.one_of(stun_events, st.dictionaries(st.text(max_size=6), values,
                                                               max_size=3)), max_size=6))
def test_the_agent_takes_any_owner_event(events: list[dict[str, Any]]) -> None:
    transport = OwnerStunTransport(None, 51820)  # type: ignore[arg-type]  # no owner needed
    delivered: list[tuple[bytes, tuple[str, int]]] = []
    transport.receiver = lambda data, addr: delivered.append((data, addr))
    stun_count = 0
    for event in events:
        taken = transport.handle_event(event)
        assert taken == (event.get("event") == "stun")
        stun_count += taken
    counters = transport.counters
    # Each stun event is delivered or counted as bad, never lost to an exception.
    assert counters.received + counters.bad_events == stun_count
    assert len(delivered) == counters.received


# --- what the fuzzing found, pinned ---

@pytest.mark.parametrize("port", ["\u00b2", "1" * 5000])
def test_a_port_that_is_not_ascii_digits_is_a_protocol_error(port: str) -> None:
    # "²" passed isdigit() and then raised ValueError in int(), past the ProtocolError
    # handlers; the owner then logged a traceback for a malformed request.
    with pytest.raises(ProtocolError, match="ip:port"):
        parse_endpoint(f"198.18.0.2:{port}")


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01\x01" + b"\x00" * 10])
def test_a_stun_event_shorter_than_a_header_is_counted_as_bad(data: bytes) -> None:
    # b"" raised IndexError in the event pump, which then died: no STUN over the
    # WireGuard port any more for the rest of the run.
    transport = OwnerStunTransport(None, 51820)  # type: ignore[arg-type]
    transport.receiver = lambda data, addr: None
    assert transport.handle_event({"event": "stun", "data": data, "src": "198.18.0.2:3478",
                                   "dst": "198.18.1.2:51820"})
    assert (transport.counters.bad_events, transport.counters.received) == (1, 0)
