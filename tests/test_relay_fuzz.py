"""Fuzzing the relay's receive paths with a bounded, deterministic budget.

Every datagram a hostile client can send must be either answered as the protocol says
or dropped and counted; no exception may escape the handler, nothing may hang, and no
answer to an unauthenticated request may be much larger than the request. Hypothesis
generates raw bytes, well-framed STUN with random attributes, correctly signed TURN
requests with random values, mutations of all of these, and ChannelData.

The budget is fixed (`derandomize`, no example database), so the suite is the same on
every run and takes a few seconds.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field, replace

import fuzzing
import pytest
from aioice import stun
from aioice.turn import UDP_TRANSPORT, make_integrity_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbwg.core.turnrest import rest_password, rest_username
from kbwg.relay import wire
from kbwg.relay.config import ServerConfig
from kbwg.relay.control import ControlPlane
from kbwg.relay.limits import Counters, Quotas, parse_networks
from kbwg.relay.server import RelayServer
from kbwg_testing import wait_for

Address = tuple[str, int]
SECRET = "fuzz-secret"
REALM = "kbwg"
MAIN: Address = ("127.0.0.1", 3478)
# RFC 5780: the other three sockets, each with the OTHER-ADDRESS differing in both parts.
ALTERNATES: dict[Address, Address] = {
    MAIN: ("127.0.0.2", 3479), ("127.0.0.2", 3479): MAIN,
    ("127.0.0.1", 3479): ("127.0.0.2", 3478), ("127.0.0.2", 3478): ("127.0.0.1", 3479)}
CLIENT: Address = ("127.0.0.1", 40000)
# An answer to an unauthenticated request: ERROR-CODE, REALM, NONCE and FINGERPRINT fit
# in this; a 420 lists the unknown attributes, which the request paid for.
UNAUTHENTICATED_MAX = 96

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _config(**overrides: object) -> ServerConfig:
    # Only loopback peers can ever be permitted: whatever the fuzzer asks for, the
    # relay sends nothing off this machine.
    base = ServerConfig(listen=("127.0.0.1", 0), secret=SECRET, realm=REALM,
                        allow_peers=parse_networks(["127.0.0.0/8"]),
                        deny_peers=parse_networks(["0.0.0.0/0", "::/0"]),
                        quotas=Quotas(unauthenticated_per_source=0,
                                      unauthenticated_total=0))
    return replace(base, **overrides)  # type: ignore[arg-type]


def accounted(counters: Counters) -> int:
    """Datagrams on the main socket, each counted under exactly one of these names."""
    return (counters.channel_data_in + counters.stun_requests + counters.stun_indications
            + counters.truncated + counters.not_stun + counters.bad_fingerprint
            + counters.malformed + counters.handler_errors)


@dataclass
class Harness:
    """The control plane without sockets of its own: answers are collected."""

    server: RelayServer = field(default_factory=lambda: RelayServer(_config()))
    sent: list[tuple[bytes, Address]] = field(default_factory=list)
    control: ControlPlane | None = None
    username: str = field(default_factory=lambda: rest_username("fuzz", 600))
    nonce: bytes = b""

    def __post_init__(self) -> None:
        self.control = ControlPlane(self.server.config, self.server.table,
                                    self.server.counters,
                                    lambda data, to, local: self.sent.append((data, to)),
                                    MAIN, ALTERNATES)
        self.feed(bytes(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)))
        self.nonce = stun.parse_message(self.sent.pop()[0]).attributes["NONCE"]

    @property
    def key(self) -> bytes:
        return make_integrity_key(self.username, REALM,
                                  rest_password(SECRET, self.username))

    def feed(self, data: bytes, client: Address = CLIENT, local: Address = MAIN
             ) -> list[bytes]:
        assert self.control is not None
        before = len(self.sent)
        self.control.datagram_received(data, client, local)
        return [answer for answer, _ in self.sent[before:]]

    def sign(self, message: stun.Message) -> bytes:
        message.attributes.update(USERNAME=self.username, REALM=REALM, NONCE=self.nonce)
        message.add_message_integrity(self.key)
        return bytes(message)

    def close(self) -> None:
        self.server.table.close()


def _is_signed(answer: bytes) -> bool:
    return any(attribute.type == wire.MESSAGE_INTEGRITY
               for attribute in wire.scan_attributes(answer))


def _check_answers(request: bytes, answers: list[bytes]) -> None:
    for answer in answers:
        wire.check_header(answer)  # every answer is well-formed STUN
        if not _is_signed(answer):
            assert len(answer) <= max(UNAUTHENTICATED_MAX, len(request)), (request, answer)


# --- strategies ---

KNOWN_TYPES = [*sorted(stun.ATTRIBUTES_BY_TYPE), wire.REQUESTED_ADDRESS_FAMILY,
               wire.EVEN_PORT, wire.DONT_FRAGMENT, wire.RESERVATION_TOKEN,
               wire.MESSAGE_INTEGRITY_SHA256]
METHODS = [int(method) for method in stun.Method]
CLASSES = [int(message_class) for message_class in stun.Class]

attribute_types = st.one_of(st.sampled_from(KNOWN_TYPES), st.integers(0, 0xFFFF))
attributes = st.lists(st.tuples(attribute_types, st.binary(max_size=40)), max_size=8)
message_types = st.one_of(
    st.builds(lambda m, c: m | c, st.sampled_from(METHODS), st.sampled_from(CLASSES)),
    st.integers(0, 0x3FFF))


def _frame(msg_type: int, transaction_id: bytes,
           attrs: list[tuple[int, bytes]], fingerprint: bool) -> bytes:
    body = b"".join(wire.raw_attribute(t, v) for t, v in attrs)
    data = struct.pack("!HHI", msg_type, len(body), stun.COOKIE) + transaction_id + body
    if fingerprint:
        data = stun.set_body_length(data, len(data) - 20 + 8)
        data += struct.pack("!HHI", wire.FINGERPRINT, 4, stun.message_fingerprint(data))
    return data


stun_frames = st.builds(_frame, message_types, st.binary(min_size=12, max_size=12),
                        attributes, st.booleans())

peers = st.tuples(st.sampled_from(["127.0.0.2", "127.0.0.3", "10.0.0.2", "192.0.2.1",
                                   "224.0.0.1", "0.0.0.0", "255.255.255.255"]),
                  st.integers(0, 65535))
turn_attributes = st.fixed_dictionaries({}, optional={
    "REQUESTED-TRANSPORT": st.one_of(st.just(UDP_TRANSPORT), st.integers(0, 2**32 - 1)),
    "LIFETIME": st.integers(0, 2**32 - 1),
    "XOR-PEER-ADDRESS": peers,
    "CHANNEL-NUMBER": st.one_of(st.integers(0x4000, 0x4003), st.integers(0, 0xFFFF)),
    "DATA": st.binary(max_size=64),
})
turn_methods = st.sampled_from([stun.Method.ALLOCATE, stun.Method.REFRESH,
                                stun.Method.CREATE_PERMISSION, stun.Method.CHANNEL_BIND,
                                stun.Method.BINDING])


def _encoded(method: stun.Method, message_class: stun.Class, attrs: dict[str, object],
             fingerprint: bool) -> bytes:
    message = stun.Message(method, message_class, attributes=dict(attrs))
    if fingerprint:
        message.add_fingerprint()
    return bytes(message)


# Well-formed messages aioice can encode, with odd but valid values: they get past the
# framing checks into the methods.
encoded_messages = st.builds(
    _encoded, st.sampled_from(list(stun.Method)), st.sampled_from(list(stun.Class)),
    st.fixed_dictionaries({}, optional={
        "CHANGE-REQUEST": st.integers(0, 2**32 - 1),
        "SOFTWARE": st.text(max_size=20),
        "USERNAME": st.text(max_size=20),
        "REALM": st.text(max_size=10),
        "NONCE": st.binary(max_size=20),
        "REQUESTED-TRANSPORT": st.integers(0, 2**32 - 1),
        "XOR-PEER-ADDRESS": peers,
        "DATA": st.binary(max_size=40),
        "LIFETIME": st.integers(0, 2**32 - 1),
    }), st.booleans())


def relay_mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """Up to 3 changes, none at all included: the unchanged datagram is an example too."""
    return fuzzing.mutated(data, at_least=0)


# --- the control plane ---

@pytest.mark.timeout(120)
@FUZZ
@given(datagrams=st.lists(st.tuples(
    st.one_of(st.binary(max_size=200), stun_frames, stun_frames.flatmap(relay_mutated),
              encoded_messages, encoded_messages.flatmap(relay_mutated)),
    st.sampled_from(sorted(ALTERNATES))), min_size=1, max_size=8))
def test_control_plane_survives_any_datagram(datagrams: list[tuple[bytes, Address]]) -> None:
    harness = Harness()
    try:
        start = accounted(harness.server.counters)
        for datagram, local in datagrams:
            _check_answers(datagram, harness.feed(datagram, local=local))
        counters = harness.server.counters
        assert counters.handler_errors == 0
        assert accounted(counters) - start == len(datagrams)
    finally:
        harness.close()


@pytest.mark.timeout(120)
@FUZZ
@given(requests=st.lists(st.tuples(turn_methods, turn_attributes, st.booleans()),
                         min_size=1, max_size=6),
       mutation=st.data())
def test_signed_turn_requests_with_random_values(
        requests: list[tuple[stun.Method, dict[str, object], bool]],
        mutation: st.DataObject) -> None:
    harness = Harness()
    try:
        # Most requests are about an allocation: have one, so they reach the table.
        allocate = harness.sign(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                                             attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT}))
        assert stun.parse_message(harness.feed(allocate)[0]).message_class == \
            stun.Class.RESPONSE
        start = accounted(harness.server.counters)
        for method, attrs, mutate in requests:
            message = stun.Message(method, stun.Class.REQUEST, attributes=dict(attrs))
            data = harness.sign(message)
            if mutate:
                data = mutation.draw(relay_mutated(data))
            answers = harness.feed(data)
            _check_answers(data, answers)
            if not mutate:
                assert len(answers) == 1  # a well-formed request is always answered
        counters = harness.server.counters
        assert counters.handler_errors == 0
        assert accounted(counters) - start == len(requests)
        for allocation in harness.server.table.allocations.values():
            # Whatever was asked, nothing beyond loopback was ever permitted.
            assert all(ip.startswith("127.") for ip in allocation.permissions)
    finally:
        harness.close()


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=60)
@given(sources=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 65535)),
                        min_size=1, max_size=60),
       request=st.one_of(stun_frames, st.just(bytes(stun.Message(
           stun.Method.ALLOCATE, stun.Class.REQUEST)))))
def test_unauthenticated_answers_stay_within_the_limits(
        sources: list[tuple[int, int]], request: bytes) -> None:
    quotas = Quotas(unauthenticated_per_source=3, unauthenticated_total=20)
    harness = Harness(server=RelayServer(_config(quotas=quotas)))
    try:
        answered: dict[str, int] = {}
        before = len(harness.sent)
        for host, port in sources:
            client = (f"198.18.0.{host}", port)
            for answer in harness.feed(request, client):
                answered[client[0]] = answered.get(client[0], 0) + 1
                _check_answers(request, [answer])
        # Bursts: 2 s per source, 1 s in total, and a little refill while the loop runs.
        assert all(count <= 2 * 3 + 1 for count in answered.values())
        assert len(harness.sent) - before <= 20 + 2
        assert harness.server.counters.handler_errors == 0
    finally:
        harness.close()


# --- the data path, through real sockets ---

channel_datagrams = st.one_of(
    st.builds(lambda channel, length, payload: struct.pack("!HH", channel, length) + payload,
              st.one_of(st.just(0x4000), st.integers(0x4000, 0x7FFF)),
              st.integers(0, 0xFFFF), st.binary(max_size=80)),
    st.builds(lambda first, rest: bytes([first]) + rest, st.integers(0x40, 0x7F),
              st.binary(max_size=3)),
    st.binary(min_size=1, max_size=60),
    stun_frames,
)


def _expected_at_peer(datagrams: list[bytes]) -> list[bytes]:
    """What the relay must forward: ChannelData on the bound channel, cut to its length."""
    out = []
    for data in datagrams:
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
            channel, length = struct.unpack_from("!HH", data)
            if channel == 0x4000 and length <= len(data) - 4:
                out.append(data[4:4 + length])
    return out


async def _through_the_relay(datagrams: list[bytes]) -> None:
    server = RelayServer(_config(quotas=Quotas()))
    await server.start()
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (client, peer):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        client.connect(server.address)

        async def transact(data: bytes) -> stun.Message:
            """The answer to `data`, skipping answers to fuzzed requests before it."""
            await loop.sock_sendall(client, data)
            async with asyncio.timeout(2):
                while True:
                    answer = stun.parse_message(await loop.sock_recv(client, 2048))
                    if answer.transaction_id == data[8:20]:
                        return answer

        challenge = await transact(bytes(stun.Message(
            stun.Method.ALLOCATE, stun.Class.REQUEST,
            attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT})))
        username = rest_username("fuzz", 600)
        key = make_integrity_key(username, REALM, rest_password(SECRET, username))
        auth = {"USERNAME": username, "REALM": REALM, "NONCE": challenge.attributes["NONCE"]}
        for method, attrs in ((stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP_TRANSPORT}),
                              (stun.Method.CHANNEL_BIND, {
                                  "CHANNEL-NUMBER": 0x4000,
                                  "XOR-PEER-ADDRESS": peer.getsockname()})):
            message = stun.Message(method, stun.Class.REQUEST, attributes={**attrs, **auth})
            message.add_message_integrity(key)
            answer = await transact(bytes(message))
            assert answer.message_class == stun.Class.RESPONSE, answer
        start = accounted(server.counters)
        for data in datagrams:
            client.send(data)
        # Everything sent is accounted for before long; that is the "nothing hangs".
        await wait_for(lambda: accounted(server.counters) - start >= len(datagrams),
                       "every datagram to be accounted for", interval=0.005)
        assert accounted(server.counters) - start == len(datagrams)
        assert server.counters.handler_errors == 0
        received = []
        for _ in _expected_at_peer(datagrams):
            received.append(await asyncio.wait_for(loop.sock_recv(peer, 70000), 2))
        assert received == _expected_at_peer(datagrams)
        # And the relay still serves.
        binding = await transact(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)))
        assert binding.message_class == stun.Class.RESPONSE
    finally:
        client.close()
        peer.close()
        server.close()


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=30)
@given(datagrams=st.lists(channel_datagrams, min_size=1, max_size=20))
def test_data_path_survives_any_datagram(datagrams: list[bytes]) -> None:
    asyncio.run(_through_the_relay(datagrams))
