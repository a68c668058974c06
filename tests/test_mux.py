import os
import random

from aioice import stun

from kbwg.negotiation.candidates import Candidate
from kbwg.negotiation.mux import CheckMux

Address = tuple[str, int]
SRC = ("198.18.2.20", 51820)


class FakeChecker:
    def __init__(self, transactions: set[bytes] | None = None) -> None:
        self.got: list[tuple[bytes, Address, Candidate | None]] = []
        self.transactions = transactions or set()

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        self.got.append((data, src, local))
        return True

    def has_transaction(self, transaction_id: bytes) -> bool:
        return transaction_id in self.transactions


def request(username: str | None) -> stun.Message:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    if username is not None:
        message.attributes["USERNAME"] = username
        message.add_message_integrity(b"x" * 22)
    else:
        message.add_fingerprint()
    return message


def response(txid: bytes, cls: stun.Class = stun.Class.RESPONSE) -> bytes:
    message = stun.Message(stun.Method.BINDING, cls, transaction_id=txid)
    message.attributes["XOR-MAPPED-ADDRESS"] = SRC
    message.add_fingerprint()
    return bytes(message)


def host(address: str) -> Candidate:
    return Candidate("host", address, 51820, "eth0", 2130706431, "interface eth0")


def test_requests_route_by_local_ufrag() -> None:
    alice, bob = FakeChecker(), FakeChecker()
    mux = CheckMux()
    mux.register("aliceufrag", alice)
    mux.register("bobufrag", bob)
    data = bytes(request("bobufrag:peerufrag"))
    local = host("198.18.1.10")
    assert mux.datagram_received(data, SRC, local)
    assert bob.got == [(data, SRC, local)] and alice.got == []
    assert mux.counters.requests == 1


def test_unknown_ufrag_is_counted_and_dropped() -> None:
    fallback: list[bytes] = []
    mux = CheckMux(fallback=lambda data, src: fallback.append(data))
    mux.register("aliceufrag", FakeChecker())
    assert not mux.datagram_received(bytes(request("nobody:peer")), SRC)
    assert mux.counters.unknown_ufrag == 1
    assert fallback == []
    mux.unregister("aliceufrag")
    assert not mux.datagram_received(bytes(request("aliceufrag:peer")), SRC)
    assert mux.counters.unknown_ufrag == 2


def test_responses_route_by_transaction_id() -> None:
    txid = os.urandom(12)
    owner, other = FakeChecker({txid}), FakeChecker()
    fallback: list[bytes] = []

    def aside(data: bytes, src: Address) -> bool:
        fallback.append(data)
        return False

    mux = CheckMux(fallback=aside)
    mux.register("owner", owner)
    mux.register("other", other)
    data = response(txid)
    assert mux.datagram_received(data, SRC)
    error = response(txid, stun.Class.ERROR)
    assert mux.datagram_received(error, SRC)
    assert [g[0] for g in owner.got] == [data, error] and other.got == []
    # An answer nobody registered (e.g. to the srflx gathering client) goes aside.
    stray = response(os.urandom(12))
    assert not mux.datagram_received(stray, SRC)
    assert fallback == [stray]
    assert mux.counters.responses == 2 and mux.counters.fallback == 1


def test_non_checks_go_to_the_fallback() -> None:
    got: list[bytes] = []
    mux = CheckMux(fallback=lambda data, src: got.append(data))
    mux.register("alice", FakeChecker())
    hairpin = bytes(request(None))  # no USERNAME: the gathering client's own probe
    assert mux.datagram_received(hairpin, SRC)
    assert mux.datagram_received(b"\x01\x00garbage", SRC)
    assert got == [hairpin, b"\x01\x00garbage"]
    assert mux.counters.fallback == 2


def test_garbage_without_fallback_is_counted_never_raised() -> None:
    mux = CheckMux()
    mux.register("alice", FakeChecker())
    rng = random.Random(7)
    valid = bytes(request("alice:peer"))
    samples = [b"", b"\x00" * 19, b"\xff" * 40, response(os.urandom(12)),
               valid[:25], valid[:-4]]
    for _ in range(300):
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        samples.append(bytes(mutated))
        samples.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))))
    for sample in samples:
        assert isinstance(mux.datagram_received(sample, SRC), bool)
    assert mux.counters.unroutable > 0 and mux.counters.malformed > 0
    assert mux.counters.errors == 0


def test_checker_exception_is_contained() -> None:
    class Broken(FakeChecker):
        def datagram_received(self, data: bytes, src: Address,
                              local: Candidate | None = None) -> bool:
            raise RuntimeError("bug")

    mux = CheckMux()
    mux.register("alice", Broken())
    assert not mux.datagram_received(bytes(request("alice:peer")), SRC)
    assert mux.counters.errors == 1


def test_receiver_for_matches_the_local_candidate() -> None:
    checker = FakeChecker()
    lan, wifi = host("198.18.1.10"), host("198.18.3.10")
    srflx = Candidate("srflx", "203.0.113.5", 51820, None, 1, "stun", "198.18.1.10:51820")
    mux = CheckMux(local_candidates=[srflx, lan, wifi])
    mux.register("alice", checker)
    data = bytes(request("alice:peer"))
    assert mux.receiver_for("198.18.3.10")(data, SRC)
    assert mux.receiver_for("192.0.2.99")(data, SRC)  # unknown address: local None
    assert [g[2] for g in checker.got] == [wifi, None]


def test_register_rejects_duplicates() -> None:
    mux = CheckMux()
    checker = FakeChecker()
    mux.register("alice", checker)
    mux.register("alice", checker)  # idempotent
    try:
        mux.register("alice", FakeChecker())
    except ValueError:
        pass
    else:
        raise AssertionError("a second checker under one ufrag was accepted")
