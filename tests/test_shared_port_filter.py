"""The device owner's filter of STUN on the shared WireGuard port (kbwg.owner.stunfilter):
cheap checks, FINGERPRINT, reserved budgets for our own transactions and declared ufrags,
per-source and shared budgets for strangers, all on a virtual clock; the `stun_ufrags`
op; and the agent side that declares ufrags (OwnerStunTransport)."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import zlib
from typing import Any, cast

import pytest
from aioice import stun
from owner_fakes import FakeNetConfig, MemoryBackend

from kbwg.agent.diag import DiagReport, render_report
from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.negotiation.natprobe import NatBehaviour
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import MAX_UFRAGS, ProtocolError, StunUfragsArgs
from kbwg.owner.rawstun import PacketCallback, UdpDatagram
from kbwg.owner.server import OwnerServer
from kbwg.owner.stunfilter import (
    FilterLimits,
    SharedPortFilter,
    fingerprint_state,
    username_ufrag,
)

PEER = "192.0.2.10"
FLOODER = "203.0.113.66"
KEY = b"k" * 22


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(limits: FilterLimits | None = None) -> tuple[SharedPortFilter, Clock]:
    clock = Clock()
    return SharedPortFilter(limits or FilterLimits(), clock), clock


def check(username: str, *, integrity: bool = True) -> stun.Message:
    """An ICE connectivity check as check_messages builds it (MI + FINGERPRINT)."""
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1234
    if integrity:
        message.add_message_integrity(KEY)
    else:
        message.add_fingerprint()
    return message


def query() -> stun.Message:
    """A server-reflexive query as StunClient sends it (FINGERPRINT, no MI)."""
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.add_fingerprint()
    return message


def answer(request: stun.Message, *, fingerprint: bool = True,
           klass: stun.Class = stun.Class.RESPONSE) -> bytes:
    message = stun.Message(stun.Method.BINDING, klass, request.transaction_id)
    message.attributes["XOR-MAPPED-ADDRESS"] = ("198.51.100.4", 40000)
    if fingerprint:
        message.add_message_integrity(KEY)
    return bytes(message)


def garbage_check(rng: random.Random) -> bytes:
    """What a flood may send: valid-looking checks with random USERNAMEs."""
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST,
                           transaction_id=rng.randbytes(12))
    message.attributes["USERNAME"] = f"{rng.getrandbits(32):08x}:{rng.getrandbits(32):08x}"
    message.add_fingerprint()
    return bytes(message)


# -- cheap checks -------------------------------------------------------------------------


def test_malformed_datagrams_are_dropped_before_any_budget() -> None:
    flt, _ = make()
    good = bytes(query())
    bad = [
        b"",
        good[:19],
        good[:-4],  # length field now beyond the datagram
        good + b"\0\0\0\0",  # and now short of it
        b"\x80" + good[1:],  # top bits set: not STUN
        good[:4] + b"\x21\x12\xa4\x43" + good[8:],  # wrong cookie
        good[:2] + struct.pack("!H", len(good) - 20 + 2) + good[4:] + b"\0\0",  # not /4
        good[:2] + struct.pack("!H", 1500) + good[4:] + bytes(1500 - len(good) + 20),  # > 1500
    ]
    for data in bad:
        assert not flt.admit(data, PEER), data[:8]
    assert flt.counters.malformed == len(bad)
    assert flt.counters.passed == 0
    assert flt.to_json()["sources"] == 0, "no budget was spent or even looked up"


def test_fingerprint_state_agrees_with_aioice() -> None:
    data = bytes(check("abcd:efgh"))
    assert fingerprint_state(data) is True
    (crc,) = struct.unpack_from("!I", data, len(data) - 4)
    assert crc == zlib.crc32(data[:-8]) ^ 0x5354554E == stun.message_fingerprint(data[:-8])
    flipped = data[:30] + bytes([data[30] ^ 1]) + data[31:]
    assert fingerprint_state(flipped) is False
    no_fp = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    no_fp.attributes["USERNAME"] = "abcd:efgh"
    assert fingerprint_state(bytes(no_fp)) is None


def test_requests_and_indications_need_a_right_fingerprint() -> None:
    flt, _ = make()
    good = bytes(check("abcd:efgh"))
    flipped = good[:30] + bytes([good[30] ^ 1]) + good[31:]
    bare = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    bare.attributes["USERNAME"] = "abcd:efgh"
    indication = bytes(stun.Message(stun.Method.BINDING, stun.Class.INDICATION))
    assert not flt.admit(flipped, PEER)
    assert not flt.admit(bytes(bare), PEER)
    assert not flt.admit(indication, PEER)
    assert flt.counters.bad_fingerprint == 1 and flt.counters.no_fingerprint == 2
    assert flt.admit(good, PEER), "a stranger's well-formed check still has a budget"
    assert flt.counters.passed_other == 1


def test_username_ufrag() -> None:
    assert username_ufrag(bytes(check("abcd:efgh"))) == b"abcd"
    assert username_ufrag(bytes(check("lonely"))) == b"lonely"
    assert username_ufrag(bytes(query())) is None
    # A USERNAME whose length runs past the end is not one.
    data = bytearray(bytes(check("abcd:efgh")))
    struct.pack_into("!H", data, 22, 400)
    assert username_ufrag(bytes(data)) is None


# -- our own transactions -----------------------------------------------------------------


def test_answers_to_our_requests_pass_and_strays_do_not() -> None:
    flt, clock = make()
    ours, ice = query(), check("peer:me")
    flt.note_sent(bytes(ours))
    flt.note_sent(bytes(ice))
    assert flt.admit(answer(ours, fingerprint=False), "203.0.113.2"), "servers need no FP"
    assert flt.admit(answer(ice), PEER)
    assert flt.admit(answer(ice, klass=stun.Class.ERROR), PEER)
    assert not flt.admit(answer(ice, fingerprint=False), PEER), "an ICE answer carries FP"
    assert not flt.admit(answer(query()), PEER), "nobody asked"
    # Our request looped back by a hairpinning NAT is ours too.
    assert flt.admit(bytes(ours), "198.51.100.4")
    assert flt.counters.passed_own == 4
    assert flt.counters.no_fingerprint == 1 and flt.counters.unknown_transaction == 1

    clock.now += FilterLimits().transaction_ttl + 0.1
    assert not flt.admit(answer(ice), PEER), "too late: forgotten"
    assert flt.counters.unknown_transaction == 2


def test_only_requests_are_remembered_and_the_table_is_bounded() -> None:
    flt, _ = make(FilterLimits(max_transactions=8))
    sent = [query() for _ in range(20)]
    for message in sent:
        flt.note_sent(bytes(message))
    flt.note_sent(answer(query()))  # an answer we send expects none back
    assert flt.to_json()["transactions"] == 8
    assert not flt.admit(answer(sent[0]), PEER)
    assert flt.admit(answer(sent[-1]), PEER)


# -- ufrags and strangers -----------------------------------------------------------------


def test_checks_for_a_declared_ufrag_have_their_own_budget() -> None:
    limits = FilterLimits(ufrag_rate=10, ufrag_burst=5, source_rate=1, source_burst=1,
                          shared_rate=1, shared_burst=1)
    flt, clock = make(limits)
    flt.set_ufrags(["mine", "also"])
    assert sum(flt.admit(bytes(check("mine:peer")), PEER) for _ in range(8)) == 5
    assert flt.counters.over_ufrag_budget == 3
    assert flt.admit(bytes(check("also:peer")), PEER), "another ufrag is not starved"
    clock.now += 0.5
    assert sum(flt.admit(bytes(check("mine:peer")), PEER) for _ in range(8)) == 5
    # An undeclared ufrag falls back to the strangers' budgets (one here).
    assert flt.admit(bytes(check("gone:peer")), PEER)
    assert not flt.admit(bytes(check("gone:peer")), PEER)
    assert flt.counters.unknown_ufrag == 2 and flt.counters.over_source_budget == 1
    # A ufrag that stays keeps its (spent) bucket; a dropped one loses its reservation.
    flt.set_ufrags(["mine"])
    assert not flt.admit(bytes(check("mine:peer")), PEER)
    assert flt.to_json()["ufrags"] == 1


def test_strangers_are_budgeted_per_source_and_overall() -> None:
    limits = FilterLimits(source_rate=10, source_burst=10, shared_rate=25, shared_burst=25,
                          max_sources=4)
    flt, clock = make(limits)
    rng = random.Random(1)
    assert sum(flt.admit(garbage_check(rng), FLOODER) for _ in range(100)) == 10
    assert flt.counters.over_source_budget == 90
    # Others still get theirs, until the shared budget runs out.
    assert sum(flt.admit(garbage_check(rng), f"192.0.2.{i}") for i in range(20)) == 15
    assert flt.counters.over_shared_budget == 5
    assert flt.to_json()["sources"] == 4, "the table of sources is bounded"
    clock.now += 1.0
    assert sum(flt.admit(garbage_check(rng), FLOODER) for _ in range(100)) == 10


@pytest.mark.parametrize("spoofed", [False, True])
def test_a_flood_does_not_starve_peers(spoofed: bool) -> None:
    """5000 pps of valid-looking checks with random USERNAMEs for 30 virtual seconds,
    from one address or from random ones, while a peer checks us 20 times a second and
    answers our 20 checks a second, and a STUN server answers our queries: every one of
    those passes, and the strangers get no more than their budgets."""
    flt, clock = make()
    limits = flt.limits
    flt.set_ufrags(["mine"])
    rng = random.Random(7)
    flood_passed = legit = 0
    step = 1 / 5000
    for tick in range(30 * 5000):
        clock.now += step
        src = f"198.18.{rng.randrange(256)}.{rng.randrange(256)}" if spoofed else FLOODER
        flood_passed += flt.admit(garbage_check(rng), src)
        if tick % 250 == 0:  # 20/s each
            ours = check("peer:mine")
            flt.note_sent(bytes(ours))
            clock.now += step / 2
            assert flt.admit(answer(ours), PEER), f"answer lost at {tick}"
            assert flt.admit(bytes(check("mine:peer")), PEER), f"check lost at {tick}"
            legit += 2
        if tick % 5000 == 0:
            server_query = query()
            flt.note_sent(bytes(server_query))
            assert flt.admit(answer(server_query, fingerprint=False), "203.0.113.2")
            legit += 1
    assert flt.counters.passed_own + flt.counters.passed_ufrag == legit
    elapsed = clock.now - 1000.0
    budget = (limits.shared_burst + elapsed * limits.shared_rate if spoofed
              else limits.source_burst + elapsed * limits.source_rate)
    assert 0 < flood_passed <= budget + 1
    assert flt.counters.over_source_budget + flt.counters.over_shared_budget == (
        30 * 5000 - flood_passed)
    if not spoofed:
        assert flt.to_json()["sources"] == 1
    else:
        assert flt.to_json()["sources"] == limits.max_sources


# -- the op and the owner's receive path ---------------------------------------------------


def test_stun_ufrags_args() -> None:
    assert StunUfragsArgs.parse({"ufrags": ["ab12", "ab12", "cd34"]}).ufrags == ("ab12", "cd34")
    assert StunUfragsArgs.parse({"ufrags": []}).ufrags == ()
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "missing 'ufrags'"),
        ({"ufrags": "ab12"}, "must be a list"),
        ({"ufrags": [12]}, "non-string"),
        ({"ufrags": [""]}, "1 to 256"),
        ({"ufrags": ["x" * 257]}, "1 to 256"),
        ({"ufrags": ["ab:12"]}, "without ':'"),
        ({"ufrags": ["ab 12"]}, "without ':' or space"),
        ({"ufrags": ["ab\n12"]}, "printable"),
        ({"ufrags": ["ufrâg"]}, "ASCII"),
        ({"ufrags": [f"u{i}" for i in range(MAX_UFRAGS + 1)]}, "more than"),
    ]
    for args, message in cases:
        with pytest.raises(ProtocolError, match=message):
            StunUfragsArgs.parse(args)


class FakeStunSocket:
    def __init__(self, port: int, on_packet: PacketCallback) -> None:
        self.port, self.on_packet = port, on_packet
        self.sent: list[bytes] = []

    def send(self, payload: bytes, dest: tuple[str, int], source: str | None) -> tuple[str, int]:
        self.sent.append(payload)
        return ("198.18.1.2", self.port)

    def close(self) -> None:
        pass


async def test_owner_op_and_receive_path() -> None:
    sockets: list[FakeStunSocket] = []

    def factory(port: int, on_packet: PacketCallback) -> FakeStunSocket:
        sockets.append(FakeStunSocket(port, on_packet))
        return sockets[-1]

    server = OwnerServer(FakeNetConfig(), lambda _name: MemoryBackend(), OwnerPolicy(), factory)
    emitted: list[dict[str, Any]] = []
    server.emit = emitted.append  # type: ignore[method-assign]
    rid = iter(range(1, 100))

    async def call(op: str, **args: Any) -> dict[str, Any]:
        return await server.handle({"id": next(rid), "op": op, **args})

    assert (await call("stun_ufrags", ufrags=["mine"]))["error"] == "no device yet"
    created = await call("create", ifname="kbwg0", private_key="A" * 43 + "=", listen_port=0,
                         address="100.64.0.1/10", backend="auto")
    assert created["ok"], created
    await call("stun_open")
    (raw,) = sockets
    refused = await call("stun_ufrags", ufrags=["bad:one"])
    assert not refused["ok"] and "without ':'" in refused["error"]
    assert (await call("stun_ufrags", ufrags=["mine"]))["ufrags"] == 1

    ours = check("peer:mine")
    assert (await call("stun_send", dest="192.0.2.10:51820", data=bytes(ours)))["ok"]
    local = ("198.18.1.2", 51820)
    rng = random.Random(3)
    for _ in range(500):
        raw.on_packet(UdpDatagram((FLOODER, rng.randrange(1024, 65536)), local,
                                  garbage_check(rng)))
    raw.on_packet(UdpDatagram((PEER, 51820), local, answer(ours)))
    raw.on_packet(UdpDatagram((PEER, 51820), local, bytes(check("mine:peer"))))
    raw.on_packet(UdpDatagram((PEER, 51820), local, os.urandom(4) + b"\x21\x12\xa4\x42"))
    passed_data = [e["data"] for e in emitted]
    assert answer(ours) in passed_data and bytes(check("mine:peer"))[:4] in {
        d[:4] for d in passed_data}
    stats = (await call("stats"))["stun_filter"]
    assert stats["passed_own"] == 1 and stats["passed_ufrag"] == 1
    assert stats["passed_other"] == FilterLimits().source_burst
    assert stats["over_source_budget"] == 500 - FilterLimits().source_burst
    assert stats["malformed"] == 1 and stats["unknown_ufrag"] == 500
    assert len(emitted) == 2 + FilterLimits().source_burst
    await server.cleanup()


# -- the agent side: declaring ufrags ------------------------------------------------------


class FakeOwner:
    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.requests.append((op, args))
        await self.gate.wait()
        if self.fail:
            raise OSError("owner gone")
        if op == "stun_open":
            return {"port": 51820}
        if op == "stats":
            return {"stun_filter": {"passed_own": 3}}
        return {"ufrags": len(args.get("ufrags", []))}


async def test_transport_declares_ufrags_latest_wins() -> None:
    owner = FakeOwner()
    transport = await OwnerStunTransport.open(cast(DeviceOwner, owner))
    owner.gate.clear()  # the owner is slow: changes pile up behind one request
    transport.add_ufrag("aaaa")
    await asyncio.sleep(0)  # its request is in flight
    transport.add_ufrag("bbbb")
    transport.remove_ufrag("aaaa")
    transport.add_ufrag("cccc")
    await asyncio.sleep(0)
    owner.gate.set()
    await transport.ufrags_declared()
    pushes = [args["ufrags"] for op, args in owner.requests if op == "stun_ufrags"]
    assert pushes == [["aaaa"], ["bbbb", "cccc"]], "one in flight, then only the newest"
    assert transport.ufrags == {"bbbb", "cccc"}
    transport.set_ufrags(["cccc", "bbbb"])  # no change: nothing sent
    await transport.ufrags_declared()
    assert len(owner.requests) == 3

    report = await transport.filter_report()
    assert report["owner"] == {"passed_own": 3} and report["ufrags"] == 2
    assert report["agent"]["ufrag_updates"] == 2

    owner.fail = True
    transport.remove_ufrag("bbbb")
    await transport.ufrags_declared()
    assert transport.counters.ufrag_update_failed == 1
    assert await transport.filter_report() == {}
    await transport.close()


def test_diag_text_notes_what_the_owner_dropped() -> None:
    data = DiagReport(local_port=5, config_source="command line", nat=NatBehaviour()).to_json()
    assert "device owner dropped" not in render_report(data)
    data["shared_port"] = {"owner": {"dropped": 1234, "over_source_budget": 1000,
                                     "over_shared_budget": 200, "malformed": 34}}
    assert ("note: the device owner dropped 1234 STUN datagrams at the WireGuard port "
            "(1200 over a budget: a flood?)") in render_report(data)
