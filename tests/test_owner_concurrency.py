"""The device owner answers requests concurrently: a read (stats, stun_send) does not wait
behind a state change held up in the backend, state changes still run one after another
in arrival order, the number in flight is bounded, every way out cancels what is still in
flight, and `stats` reads the device once. The server runs in-process on in-memory streams
on the virtual clock (a wait for something that must not happen costs no real time); the
agent's side of out-of-order replies runs against a stand-in owner process."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioice import stun
from owner_fakes import FakeNetConfig, MemoryBackend
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until

from kbwg.agent.owner_client import DeviceOwner
from kbwg.owner.frames import FrameDecoder, encode_frame
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.rawstun import PacketCallback
from kbwg.owner.server import (
    CONCURRENT_OPS,
    EXIT_OK,
    EXIT_STREAM_BROKEN,
    MAX_IN_FLIGHT,
    OwnerServer,
)
from kbwg.owner.wg_backend import DeviceStats, PeerConfig, PeerStats

pytestmark = VIRTUAL_CLOCK

CREATE = {"op": "create", "ifname": "kbwg0", "private_key": "A" * 43 + "=",
          "listen_port": 0, "address": "100.64.0.1/10", "backend": "auto"}  # fmt: skip


def key(n: int) -> bytes:
    return bytes([n]) * 32


def set_peer(n: int) -> dict[str, Any]:
    return {"op": "set_peer", "public_key": base64.b64encode(key(n)).decode(),
            "endpoint": f"198.18.0.{n}:51820", "allowed_ips": [f"100.64.1.{n}/32"],
            "keepalive": 25}


def binding_request() -> bytes:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.add_fingerprint()
    return bytes(message)


class GatedBackend(MemoryBackend):
    """MemoryBackend whose set_peer of chosen keys, and whose reads, wait for a gate;
    it logs every call and every cancellation."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[bytes, asyncio.Event] = {}
        self.read_gate: asyncio.Event | None = None
        self.calls: list[str] = []
        self.cancelled: list[str] = []

    async def _wait(self, gate: asyncio.Event, what: str) -> None:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(what)
            raise

    async def set_peer(self, peer: PeerConfig) -> None:
        what = f"set_peer {peer.public_key[0]}"
        self.calls.append(what)
        gate = self.gates.get(peer.public_key)
        if gate is not None:
            await self._wait(gate, what)
        await super().set_peer(peer)
        self.calls.append(f"{what} done")

    async def remove_peer(self, public_key: bytes) -> None:
        self.calls.append(f"remove_peer {public_key[0]}")
        await super().remove_peer(public_key)

    async def peers(self) -> list[PeerStats]:
        self.calls.append("peers")
        return await super().peers()

    async def listen_port(self) -> int:
        self.calls.append("listen_port")
        return await super().listen_port()

    async def stats(self) -> DeviceStats:
        self.calls.append("stats")
        if self.read_gate is not None:
            await self._wait(self.read_gate, "stats")
        return DeviceStats(self._port, await super().peers())


class Raw:
    """A stand-in raw STUN socket that records what it sends."""

    def __init__(self, port: int, on_packet: PacketCallback) -> None:
        self.port = port
        self.sent: list[tuple[str, int]] = []

    def send(self, payload: bytes, dest: tuple[str, int], source: str | None
             ) -> tuple[str, int]:  # fmt: skip
        self.sent.append(dest)
        return ("198.18.1.2", self.port)

    def close(self) -> None:
        pass


class Output(asyncio.Transport):
    """The owner's stdout in memory: decodes every write as it comes (so a write that is
    not whole frames fails the test) and can be closed under the owner."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = FrameDecoder()
        self.frames: list[dict[str, Any]] = []
        self.writes = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self.writes += 1
        self.frames.extend(self._decoder.feed(bytes(data)))
        assert self._decoder.pending == 0, "a write that is not whole frames"

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class CountingReader(asyncio.StreamReader):
    """The owner's stdin, counting the bytes the owner has taken from it."""

    consumed = 0

    async def readexactly(self, n: int) -> bytes:
        data = await super().readexactly(n)
        self.consumed += len(data)
        return data


@dataclass
class Owner:
    server: OwnerServer
    backend: GatedBackend
    reader: CountingReader
    output: Output
    protocol: asyncio.streams.FlowControlMixin
    stop: asyncio.Event
    serving: asyncio.Task[int]
    next_id: int = 1
    sent: dict[int, str] = field(default_factory=dict)

    def send(self, request: dict[str, Any]) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.sent[rid] = request["op"]
        self.reader.feed_data(encode_frame({"id": rid, **request}))
        return rid

    def replied(self) -> list[int]:
        return [f["id"] for f in self.output.frames if "id" in f]

    def reply(self, rid: int) -> dict[str, Any]:
        (frame,) = (f for f in self.output.frames if f.get("id") == rid)
        return frame

    async def answered(self, *rids: int) -> None:
        await advance_until(lambda: set(rids) <= set(self.replied()), 5.0,
                            f"replies to {rids}")  # fmt: skip

    async def exit_code(self) -> int:
        await advance_until(self.serving.done, 5.0, "the owner's return")
        return self.serving.result()

    def close_output(self) -> None:
        self.output.closed = True
        self.protocol.connection_lost(BrokenPipeError(32, "Broken pipe"))


@pytest.fixture
async def owner() -> AsyncIterator[Owner]:
    backend = GatedBackend()
    server = OwnerServer(FakeNetConfig(), lambda _name: backend, OwnerPolicy(), Raw)
    reader = CountingReader()
    output = Output()
    protocol = asyncio.streams.FlowControlMixin()
    protocol.connection_made(output)
    writer = asyncio.StreamWriter(output, protocol, None, asyncio.get_running_loop())
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(reader, writer, stop))
    fake = Owner(server, backend, reader, output, protocol, stop, serving)
    created = fake.send(CREATE)
    opened = fake.send({"op": "stun_open"})
    await fake.answered(created, opened)
    assert fake.reply(created)["ok"] and fake.reply(opened)["ok"]
    try:
        yield fake
    finally:
        for gate in backend.gates.values():
            gate.set()
        if backend.read_gate is not None:
            backend.read_gate.set()
        stop.set()
        await asyncio.wait_for(serving, 5)
        await server.cleanup()


async def settle() -> None:
    """Let the owner do all it can: the virtual clock moves only when nothing is ready
    to run, so after these seconds every step that could happen has happened."""
    await asyncio.sleep(5)


def block(owner: Owner, n: int) -> asyncio.Event:
    gate = owner.backend.gates[key(n)] = asyncio.Event()
    return gate


async def test_reads_are_answered_while_a_state_change_waits_in_the_backend(
        owner: Owner) -> None:
    gate = block(owner, 1)
    blocked = owner.send(set_peer(1))
    stun_send = owner.send({"op": "stun_send", "dest": "198.18.0.2:3478",
                            "data": binding_request()})  # fmt: skip
    stats = owner.send({"op": "stats"})
    hello = owner.send({"op": "hello"})
    await owner.answered(stun_send, stats, hello)
    assert owner.reply(stun_send)["ok"] and owner.reply(stun_send)["source"]
    assert owner.reply(stats)["peers"] == []  # the change is still in flight
    assert blocked not in owner.replied()
    assert owner.backend.calls[-2:] == ["set_peer 1", "stats"]

    gate.set()
    await owner.answered(blocked)
    assert owner.reply(blocked)["ok"]


async def test_state_changes_run_one_at_a_time_in_arrival_order(owner: Owner) -> None:
    gate = block(owner, 1)
    first = owner.send(set_peer(1))
    second = owner.send(set_peer(2))  # not gated: it would finish first if it could start
    removal = owner.send({"op": "remove_peer", "public_key": base64.b64encode(key(1)).decode()})
    stats = owner.send({"op": "stats"})
    await owner.answered(stats)  # reads go past the queue...
    # ...which has not moved: the second set_peer waits for the first to finish.
    assert owner.backend.calls[-2:] == ["set_peer 1", "stats"]
    assert not {first, second, removal} & set(owner.replied())

    gate.set()
    await owner.answered(first, second, removal)
    assert all(owner.reply(rid)["ok"] for rid in (first, second, removal))
    changes = [c for c in owner.backend.calls if c not in ("stats", "peers", "listen_port")]
    assert changes == ["set_peer 1", "set_peer 1 done", "set_peer 2", "set_peer 2 done",
                       "remove_peer 1"]  # fmt: skip
    replies = [rid for rid in owner.replied() if rid in (first, second, removal)]
    assert replies == [first, second, removal]
    assert [p.public_key for p in await owner.backend.peers()] == [key(2)]


def test_the_concurrent_ops_are_the_reads_and_the_synchronous_ones() -> None:
    # Any op not named here (a new one included) waits its turn: listing one is a choice.
    assert sorted(CONCURRENT_OPS) == ["default_gateway", "egress", "hello", "host_routes",
                                      "interfaces", "stats", "stun_send", "stun_ufrags"]


async def test_reading_pauses_while_the_requests_in_flight_are_at_the_bound(
        owner: Owner) -> None:
    gate = block(owner, 1)
    before = owner.reader.consumed
    queued = [owner.send(set_peer(n)) for n in range(1, MAX_IN_FLIGHT + 1)]
    stats = owner.send({"op": "stats"})
    await settle()
    # The first set_peer is in the backend, the others wait their turn, and the stats
    # request after them is still unread in the pipe: not a byte of it was taken.
    frames = sum(len(encode_frame({"id": rid, **set_peer(n)}))
                 for n, rid in enumerate(queued, start=1))  # fmt: skip
    assert owner.reader.consumed - before == frames, "the owner read past its bound"
    assert stats not in owner.replied()
    assert owner.backend.calls[-1] == "set_peer 1"

    gate.set()
    await owner.answered(stats, *queued)
    assert all(owner.reply(rid)["ok"] for rid in (stats, *queued))


async def test_shutdown_cancels_a_read_in_flight_and_returns_ok(owner: Owner) -> None:
    owner.backend.read_gate = asyncio.Event()
    stats = owner.send({"op": "stats"})
    await advance_until(lambda: "stats" in owner.backend.calls)
    shutdown = owner.send({"op": "shutdown"})
    assert await owner.exit_code() == EXIT_OK
    assert owner.reply(shutdown)["ok"]
    assert stats not in owner.replied()
    assert owner.backend.cancelled == ["stats"]  # cancelled, and gone before the return


async def test_stop_cancels_a_change_in_flight_and_returns_ok(owner: Owner) -> None:
    block(owner, 1)
    blocked = owner.send(set_peer(1))
    queued = owner.send(set_peer(2))
    await advance_until(lambda: "set_peer 1" in owner.backend.calls)
    owner.stop.set()
    assert await owner.exit_code() == EXIT_OK
    assert owner.backend.cancelled == ["set_peer 1"]
    assert "set_peer 2" not in owner.backend.calls
    assert not {blocked, queued} & set(owner.replied())


async def test_closed_output_cancels_what_is_in_flight(owner: Owner) -> None:
    block(owner, 1)
    owner.send(set_peer(1))
    await advance_until(lambda: "set_peer 1" in owner.backend.calls)
    owner.close_output()
    owner.send({"op": "hello"})  # its reply finds the output closed
    assert await owner.exit_code() == EXIT_OK
    assert owner.backend.cancelled == ["set_peer 1"]


async def test_a_broken_stream_returns_its_code_after_the_requests_before_it(
        owner: Owner) -> None:
    gate = block(owner, 1)
    blocked = owner.send(set_peer(1))
    owner.reader.feed_data(b"\x00\x00\x01")  # a truncated length prefix, then the end
    owner.reader.feed_eof()
    await advance_until(lambda: "set_peer 1" in owner.backend.calls)
    gate.set()
    assert await owner.exit_code() == EXIT_STREAM_BROKEN
    assert owner.reply(blocked)["ok"]


async def test_end_of_input_answers_what_was_read_before_it(owner: Owner) -> None:
    gate = block(owner, 1)
    blocked = owner.send(set_peer(1))
    owner.reader.feed_eof()
    await advance_until(lambda: "set_peer 1" in owner.backend.calls)
    assert not owner.serving.done()
    gate.set()
    assert await owner.exit_code() == EXIT_OK
    assert owner.reply(blocked)["ok"]


async def test_a_bad_frame_still_gets_its_error_reply(owner: Owner) -> None:
    writes = owner.output.writes
    body = b"\xc1"  # never valid msgpack
    owner.reader.feed_data(len(body).to_bytes(4, "big") + body)
    hello = owner.send({"op": "hello"})
    await owner.answered(hello)
    errors = [f for f in owner.output.frames if f.get("id") is None]
    assert len(errors) == 1 and not errors[0]["ok"] and "undecodable" in errors[0]["error"]
    assert owner.output.writes == writes + 2  # one whole frame per write


async def test_stats_reads_the_device_once(owner: Owner) -> None:
    owner.backend.calls.clear()
    added = owner.send(set_peer(3))
    await owner.answered(added)
    assert owner.reply(added)["ok"]
    owner.backend.calls.clear()
    stats = owner.send({"op": "stats"})
    await owner.answered(stats)
    assert owner.backend.calls == ["stats"]
    reply = owner.reply(stats)
    assert reply["listen_port"] == 51820
    assert [p["public_key"] for p in reply["peers"]] == [base64.b64encode(key(3)).decode()]


# The agent's side: replies matched by id, whatever their order.

STANDIN = """
import sys
from kbwg.owner.frames import encode_frame, FrameDecoder
out, dec, held = sys.stdout.buffer, FrameDecoder(), []
def reply(f):
    out.write(encode_frame({'id': f['id'], 'ok': True, 'op': f['op']}))
    out.flush()
while data := sys.stdin.buffer.read1(65536):
    for f in dec.feed(data):
        if f['op'] in ('hello', 'shutdown'):
            reply(f)
            if f['op'] == 'shutdown':
                sys.exit(0)
            continue
        held.append(f)
        if len(held) == 3:  # answered last first
            for g in reversed(held):
                reply(g)
            held.clear()
"""


@REAL_CLOCK
async def test_the_agent_matches_replies_that_come_out_of_order() -> None:
    owner = await DeviceOwner.start([sys.executable, "-c", STANDIN])
    try:
        requests = [owner.request(op) for op in ("first", "second", "third")]
        results = await asyncio.wait_for(asyncio.gather(*requests), 10)
        assert [r["op"] for r in results] == ["first", "second", "third"]
    finally:
        assert await owner.close() == 0

