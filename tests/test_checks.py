"""PeerChecker against an in-memory network: LANs, NATs, delay, cuts.

The checker's real asyncio timers run on a virtual clock (virtual_clock.py): delays,
RTTs and timeouts come out exact, whatever the load on the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from aioice import stun
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.negotiation.candidate_pairs import (
    BASE_RTT_WINDOW_S,
    GUESSED_FOUNDATION,
    CandidatePair,
    form_pairs,
)
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.checks import CheckTimers, PeerChecker
from kbwg.negotiation.mux import CheckMux
from kbwg.negotiation.wire import CandidateInfo

Address = tuple[str, int]
PORT = 51820
PWD_A = "alicepasswordalicepassword"
PWD_B = "bobpasswordbobpasswordbob"

pytestmark = VIRTUAL_CLOCK

FAST = CheckTimers(
    pacing=0.002, rto=0.03, max_rto=0.12, max_transmissions=4, settle=0.05,
    consent_interval=0.1, consent_timeout=0.08, consent_failures=3,
    consent_min_timeout=0.08, consent_max_timeout=0.08,
    keepalive_interval=0.1, reprobe_min=0.1, reprobe_max=0.4, jitter=0.1,
)
# For paths up to ~100 ms RTT: liveness checks must outwait them.
SLOW_PATHS = CheckTimers(
    pacing=0.002, rto=0.2, max_rto=0.4, max_transmissions=4, settle=0.05,
    consent_interval=0.1, consent_timeout=0.25, consent_failures=3,
    consent_min_timeout=0.25, consent_max_timeout=0.25,
    keepalive_interval=0.1, reprobe_min=0.1, reprobe_max=0.4, jitter=0.1,
)


class Nat:
    """Endpoint-independent mapping (port-preserving) with address+port-dependent
    filtering, like masquerade; or symmetric: a new port per destination."""

    def __init__(self, public_ip: str, symmetric: bool = False) -> None:
        self.public_ip = public_ip
        self.symmetric = symmetric
        self._out: dict[tuple[Address, Address | None], int] = {}
        self._in: dict[int, Address] = {}
        self._allowed: set[tuple[int, Address]] = set()
        self._next = 40001

    def outbound(self, internal: Address, dest: Address) -> Address:
        key = (internal, dest if self.symmetric else None)
        port = self._out.get(key)
        if port is None:
            if not self.symmetric and internal[1] not in self._in:
                port = internal[1]
            else:
                port, self._next = self._next, self._next + 1
            self._out[key] = port
            self._in[port] = internal
        self._allowed.add((port, dest))
        return (self.public_ip, port)

    def inbound(self, src: Address, port: int) -> Address | None:
        return self._in.get(port) if (port, src) in self._allowed else None


@dataclass(eq=False)
class Iface:
    address: Address
    node: Node
    lan: str | None  # None: directly on the internet
    nat: Nat | None
    delay: float  # one way, added to every packet sent or received here


@dataclass(eq=False)
class Node:
    net: SimNet
    name: str
    candidates: list[Candidate] = field(default_factory=list)
    mux: CheckMux = field(default_factory=CheckMux)
    checker: PeerChecker | None = None
    selections: list[tuple[CandidatePair | None, str]] = field(default_factory=list)
    selected_at: list[float] = field(default_factory=list)  # loop time of each selection

    def host(self, ip: str, lan: str | None = None, nat: Nat | None = None,
             delay: float = 0.0, rank: int = 0, prefixlen: int | None = None) -> Iface:
        cand = Candidate("host", ip, PORT, f"eth{rank}",
                         candidate_priority("host", 65535 - rank), f"interface eth{rank}",
                         prefixlen=prefixlen)
        self.candidates.append(cand)
        iface = Iface((ip, PORT), self, lan, nat, delay)
        self.net.ifaces[iface.address] = iface
        return iface

    def srflx(self, public: Address, base: Iface) -> None:
        self.candidates.append(Candidate(
            "srflx", public[0], public[1], None, candidate_priority("srflx"), "stun",
            f"{base.address[0]}:{base.address[1]}"))

    def relay(self, ip: str, port: int, delay: float = 0.0) -> Iface:
        """A relayed candidate: an allocation on a relay on the internet, which passes
        what comes to it (permissions are not modelled)."""
        self.candidates.append(Candidate("relay", ip, port, None, candidate_priority("relay"),
                                         "turn"))
        iface = Iface((ip, port), self, None, None, delay)
        self.net.ifaces[iface.address] = iface
        return iface

    def send(self, data: bytes, dest: Address, local: Candidate) -> None:
        self.net.send(data, (local.address, local.port), dest)

    def receive(self, data: bytes, src: Address, local: Address) -> None:
        cand = next(c for c in self.candidates
                    if c.type in ("host", "relay") and (c.address, c.port) == local)
        self.mux.datagram_received(data, src, cand)

    def on_selected(self, pair: CandidatePair | None, reason: str) -> None:
        self.selections.append((pair, reason))
        self.selected_at.append(now())

    @property
    def c(self) -> PeerChecker:
        assert self.checker is not None
        return self.checker


class SimNet:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ifaces: dict[Address, Iface] = {}
        self.nats: dict[str, Nat] = {}
        self.cut: set[frozenset[str]] = set()
        self.dropped = 0

    def node(self, name: str) -> Node:
        return Node(self, name)

    def nat(self, public_ip: str, symmetric: bool = False) -> Nat:
        nat = self.nats[public_ip] = Nat(public_ip, symmetric)
        return nat

    def send(self, data: bytes, src_addr: Address, dest: Address) -> None:
        src = self.ifaces[src_addr]
        dst = self.ifaces.get(dest)
        if dst is not None and dst.lan is not None and dst.lan == src.lan:
            self._deliver(data, src, dst, src.address)
            return
        if src.lan is not None and src.nat is None:
            self.dropped += 1  # an isolated LAN
            return
        seen = src.nat.outbound(src.address, dest) if src.nat else src.address
        if dst is not None and dst.lan is None:
            self._deliver(data, src, dst, seen)
            return
        nat = self.nats.get(dest[0])
        internal = nat.inbound(seen, dest[1]) if nat is not None else None
        if internal is None:
            self.dropped += 1  # a private address elsewhere, or filtered by the NAT
            return
        self._deliver(data, src, self.ifaces[internal], seen)

    def _deliver(self, data: bytes, src: Iface, dst: Iface, seen: Address) -> None:
        if frozenset((src.address[0], dst.address[0])) in self.cut:
            self.dropped += 1
            return
        self.loop.call_later(src.delay + dst.delay, dst.node.receive, data, seen, dst.address)


def infos(candidates: list[Candidate]) -> list[CandidateInfo]:
    return [CandidateInfo(c.type, c.address, c.port, c.priority, f"f{i}")
            for i, c in enumerate(candidates)]


async def connect(a: Node, b: Node, timers: CheckTimers = FAST, *,
                  b_controlling: bool = False,
                  on_relay_quiet: Callable[[], None] | None = None) -> None:
    """A offers (controlling), B answers: B knows A first, as over chat."""
    a.checker = PeerChecker(a.candidates, "aliceufrag", PWD_A, controlling=True,
                            tie_breaker=2**63 + 7, send=a.send, on_selected=a.on_selected,
                            timers=timers, name="alice", on_relay_quiet=on_relay_quiet)
    b.checker = PeerChecker(b.candidates, "bobufrag", PWD_B, controlling=b_controlling,
                            tie_breaker=12345, send=b.send, on_selected=b.on_selected,
                            timers=timers, name="bob")
    a.mux.register("aliceufrag", a.checker)
    b.mux.register("bobufrag", b.checker)
    b.checker.set_remote("aliceufrag", PWD_A, infos(a.candidates))
    await asyncio.sleep(0.01)  # B's checks reach A before A has the answer
    a.checker.set_remote("bobufrag", PWD_B, infos(b.candidates))


def mirrored(a: Node, b: Node) -> bool:
    """Both sides use the same path: each one's remote is where the other is seen."""
    pa, pb = a.c.selected, b.c.selected
    if pa is None or pb is None:
        return False
    seen_a, seen_b = pa.shown_local, pb.shown_local
    return (pa.remote_address == (seen_b.address, seen_b.port)
            and pb.remote_address == (seen_a.address, seen_a.port))


def close(*nodes: Node) -> None:
    for node in nodes:
        if node.checker is not None:
            node.checker.close()


async def test_same_lan_host_pair_is_chosen_with_rtt() -> None:
    net = SimNet()
    nat = net.nat("203.0.113.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("198.18.1.10", lan="lan1", nat=nat, delay=0.002)
    ib = b.host("198.18.1.20", lan="lan1", nat=nat, delay=0.002)
    a.srflx(("203.0.113.1", PORT), ia)
    b.srflx(("203.0.113.1", 40001), ib)
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected")
        await advance_until(lambda: mirrored(a, b))
        snap = a.c.snapshot()
        assert snap["path"] == "direct-lan"
        assert snap["local_candidate"] == "host 198.18.1.10:51820"
        assert snap["remote_candidate"] == "host 198.18.1.20:51820"
        assert snap["reason"].startswith("same LAN: host candidates answer each other (")
        assert snap["connected_at"] is not None
        assert snap["rtt_ms"] == pytest.approx(8.0)  # 4 ms each way
        bsnap = b.c.snapshot()
        assert bsnap["path"] == "direct-lan"
        assert bsnap["remote_candidate"] == "host 198.18.1.10:51820"
        assert b.selections[0][1].startswith("nominated by the peer: same LAN")
        # One choice each, no flapping afterwards.
        await asyncio.sleep(0.3)
        assert len(a.selections) == 1 and len(b.selections) == 1
        assert a.c.counters.ignored == 0 and b.c.counters.ignored == 0
    finally:
        close(a, b)


async def test_behind_nat_each_srflx_pair_works() -> None:
    net = SimNet()
    nat_a, nat_b = net.nat("203.0.113.1"), net.nat("198.51.100.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("10.1.0.2", lan="home-a", nat=nat_a, delay=0.003)
    ib = b.host("10.2.0.2", lan="home-b", nat=nat_b, delay=0.003)
    a.srflx(("203.0.113.1", PORT), ia)
    b.srflx(("198.51.100.1", PORT), ib)
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected")
        await advance_until(lambda: mirrored(a, b))
        snap = a.c.snapshot()
        assert snap["path"] == "direct"
        assert snap["local_candidate"] == "srflx 203.0.113.1:51820"
        assert snap["remote_candidate"] == "srflx 198.51.100.1:51820"
        assert "server-reflexive" in snap["reason"] and "no LAN path" in snap["reason"]
        assert b.c.snapshot()["remote_candidate"] == "srflx 203.0.113.1:51820"
        # The host pairs cannot work across two homes.
        host_pair = next(p for p in a.c.pairs if p.remote.type == "host")
        await advance_until(lambda: host_pair.state == "failed")
        alternatives = a.c.snapshot()["alternatives"]
        assert {"local": "host 10.1.0.2:51820", "remote": "host 10.2.0.2:51820",
                "state": "failed", "path": "direct-lan", "rtt_ms": None,
                "base_rtt_ms": None, "interface": "eth0"} in alternatives
    finally:
        close(a, b)


async def test_symmetric_nat_peer_reflexive_candidate_learned() -> None:
    net = SimNet()
    nat_a = net.nat("203.0.113.1", symmetric=True)
    a, b = net.node("a"), net.node("b")
    ia = a.host("10.1.0.2", lan="home-a", nat=nat_a, delay=0.002)
    a.srflx(("203.0.113.1", 40000), ia)  # toward the STUN server: useless toward B
    b.host("192.0.2.10", delay=0.002)  # public, no NAT
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected")
        assert b.c.counters.prflx_learned >= 1
        bsnap = b.c.snapshot()
        assert bsnap["remote_candidate"].startswith("prflx 203.0.113.1:4")
        assert bsnap["remote_candidate"] != "prflx 203.0.113.1:40000"
        assert bsnap["path"] == "direct"
        asnap = a.c.snapshot()
        # A learns its own peer-reflexive address from B's answers.
        assert asnap["local_candidate"] == bsnap["remote_candidate"]
        assert asnap["remote_candidate"] == "host 192.0.2.10:51820"
        assert asnap["path"] == "direct"
        assert "peer-reflexive" in asnap["reason"]
    finally:
        close(a, b)


async def test_multihomed_faster_interface_wins() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    # The slow interface has the higher priority, so it is checked first.
    a.host("198.18.3.10", lan="lan1", delay=0.040, rank=0)
    a.host("198.18.1.10", lan="lan1", delay=0.005, rank=1)
    b.host("198.18.1.20", lan="lan1")
    await connect(a, b, SLOW_PATHS)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        selected = a.c.selected
        assert selected is not None
        assert selected.local.address == "198.18.1.10" and selected.local.interface == "eth1"
        slow = next(p for p in a.c.pairs if p.local.address == "198.18.3.10")
        await advance_until(lambda: slow.state == "succeeded")
        await asyncio.sleep(0.3)  # a few keepalives: exact RTT samples on both
        fast_rtt, slow_rtt = selected.rtt_ms, slow.rtt_ms
        assert fast_rtt is not None and slow_rtt is not None
        assert fast_rtt == pytest.approx(10.0) and slow_rtt == pytest.approx(80.0)
        assert a.c.selected is selected
        assert [p.local.address for p in a.c.valid_pairs] == ["198.18.1.10", "198.18.3.10"]
        alternatives = a.c.snapshot()["alternatives"]
        assert [alt["local"] for alt in alternatives] == ["host 198.18.3.10:51820"]
    finally:
        close(a, b)


async def test_hysteresis_ignores_jitter_and_follows_a_big_change() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    if1 = a.host("198.18.1.10", lan="lan1", delay=0.010, rank=0)
    a.host("198.18.3.10", lan="lan1", delay=0.012, rank=1)
    b.host("198.18.1.20", lan="lan1")
    # Active throughout (as under a transfer): consent at its RTT pace, not idle.
    await connect(a, b, replace(SLOW_PATHS, active_window=120.0))
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        assert a.c.selected is not None and a.c.selected.local.address == "198.18.1.10"
        await asyncio.sleep(0.3)
        # 26 ms against 24 ms: faster, but inside the margin.
        if1.delay = 0.013
        await asyncio.sleep(0.8)
        assert a.c.selected.local.address == "198.18.1.10"
        assert len(a.selections) == 1
        # 90 ms against 24 ms. For a window that could be the queue our own traffic
        # builds on the selected path: kept while its base RTT is still the idle 20 ms.
        if1.delay = 0.045
        raised_at = now()
        await asyncio.sleep(BASE_RTT_WINDOW_S - 1.0)
        assert a.c.selected.local.address == "198.18.1.10"
        snap = a.c.snapshot()
        assert snap["rtt_ms"] == pytest.approx(90.0) and snap["base_rtt_ms"] <= 26.0
        # Longer than the window: the path is slower. Switch, and the peer follows the
        # renomination.
        await advance_until(lambda: a.c.selected is not None
                    and a.c.selected.local.address == "198.18.3.10", timeout=3.0)
        assert now() - raised_at == pytest.approx(BASE_RTT_WINDOW_S, abs=0.5)
        assert len(a.selections) == 2
        reason = a.selections[-1][1]
        assert reason.startswith("switched from host 198.18.1.10:51820 -> host "
                                 "198.18.1.20:51820 to host 198.18.3.10:51820")
        assert reason.endswith(" ms")
        await advance_until(lambda: b.c.selected is not None
                    and b.c.selected.remote.ip == "198.18.3.10")
    finally:
        close(a, b)


async def test_controlled_side_follows_renomination_after_reprobe() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.001, rank=0)
    a.host("198.18.3.10", lan="lan1", delay=0.030, rank=1)
    b.host("198.18.1.20", lan="lan1")
    net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
    await connect(a, b, SLOW_PATHS)
    try:
        await advance_until(lambda: b.c.selected is not None
                    and b.c.selected.remote.ip == "198.18.3.10")
        net.cut.clear()  # the fast interface comes back: found by re-probing
        await advance_until(lambda: b.c.selected is not None
                    and b.c.selected.remote.ip == "198.18.1.10", timeout=3.0)
        assert a.c.selected is not None and a.c.selected.local.address == "198.18.1.10"
        assert "switched from" in a.c.reason
        # The controlled side only ever follows nominations: slow pair, then fast pair.
        assert [p.remote.ip for p, _ in b.selections if p] == ["198.18.3.10", "198.18.1.10"]
        assert all(reason.startswith("nominated by the peer") for _, reason in b.selections)
    finally:
        close(a, b)


async def test_consent_failure_falls_back_then_fails_then_recovers() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.001, rank=0)
    a.host("198.18.3.10", lan="lan1", delay=0.003, rank=1)
    b.host("198.18.1.20", lan="lan1")
    timers = replace(FAST, jitter=0.0)  # consent exactly every consent_interval
    # The checks A sends on the path once it is cut: (loop time, transaction id).
    lost: list[tuple[float, bytes]] = []
    send_a = a.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        cut = frozenset(("198.18.1.10", "198.18.1.20"))
        message = stun.parse_message(data)
        if (message.message_class == stun.Class.REQUEST and local.address == "198.18.1.10"
                and (cut in net.cut or armed)):
            net.cut.add(cut)  # the first check after arming is the first one lost
            lost.append((now(), message.transaction_id))
        send_a(data, dest, local)

    armed = False
    a.send = spy  # type: ignore[method-assign]
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        await advance_until(lambda: len(a.c.valid_pairs) == 2)
        assert a.c.selected is not None and a.c.selected.local.address == "198.18.1.10"

        armed = True  # cut the path just as A's next consent check leaves
        await advance_until(lambda: a.c.selected is not None
                    and a.c.selected.local.address == "198.18.3.10")
        armed = False
        # Exactly consent_failures checks went unanswered, each sent as the one before
        # was missed (consent_timeout apart, not the interval), and A switched
        # consent_timeout after the last one: 3 * 0.08 s after the cut.
        misses = [when for when, _ in lost][:timers.consent_failures]
        assert len(misses) == timers.consent_failures
        gaps = [later - earlier for earlier, later in itertools.pairwise(misses)]
        assert gaps == pytest.approx([timers.consent_timeout] * 2, abs=timers.pacing)
        assert a.selected_at[-1] == pytest.approx(misses[-1] + timers.consent_timeout)
        assert a.selected_at[-1] - misses[0] == pytest.approx(0.24, abs=timers.pacing)
        assert "stopped answering; switched to" in a.c.reason
        # The controlled side moves too, on its own consent or by the nomination.
        await advance_until(lambda: b.c.selected is not None
                    and b.c.selected.remote.ip == "198.18.3.10", timeout=1.0)

        net.cut.add(frozenset(("198.18.3.10", "198.18.1.20")))
        await advance_until(lambda: a.c.state == "failed" and b.c.state == "failed", timeout=2.0)
        assert a.selections[-1][0] is None
        assert "stopped answering" in a.selections[-1][1]
        assert a.c.snapshot()["path"] == "none" and a.c.snapshot()["connected_at"] is None

        net.cut.clear()  # re-probing finds the paths again (backoff capped at 0.4 s)
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected",
                    timeout=2.0)
        await advance_until(lambda: a.c.selected is not None
                    and a.c.selected.local.address == "198.18.1.10", timeout=2.0)
        await advance_until(lambda: mirrored(a, b))
    finally:
        close(a, b)


async def test_all_pairs_failing_reports_failed_once() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("10.1.0.2", lan="home-a")
    b.host("10.2.0.2", lan="home-b")
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "failed", timeout=2.0)
        assert a.selections == [(None, "no pair answered (tried 1)")]
        await asyncio.sleep(0.5)  # re-probes go on, the report does not repeat
        assert len(a.selections) == 1 and a.c.counters.checks > 1
    finally:
        close(a, b)


async def test_role_conflict_is_resolved() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.001)
    b.host("198.18.1.20", lan="lan1", delay=0.001)
    await connect(a, b, b_controlling=True)  # crossed offers: both think they control
    try:
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected")
        assert a.c.controlling and not b.c.controlling  # A has the larger tie-breaker
        assert a.c.counters.role_conflicts + b.c.counters.role_conflicts >= 1
        await advance_until(lambda: mirrored(a, b))
    finally:
        close(a, b)


async def test_checks_are_paced_and_retransmitted() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    for i in range(3):
        a.host(f"10.1.{i}.2", lan=f"a{i}", rank=i)
        b.host(f"10.2.{i}.2", lan=f"b{i}", rank=i)
    sent: list[tuple[float, bytes]] = []
    loop = asyncio.get_running_loop()
    send_a = a.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        message = stun.parse_message(data)
        if message.message_class == stun.Class.REQUEST:
            sent.append((loop.time(), message.transaction_id))
        send_a(data, dest, local)

    a.send = spy  # type: ignore[method-assign]
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "failed", timeout=2.0)
        first: dict[bytes, float] = {}
        for when, txid in sent:
            first.setdefault(txid, when)
        starts = sorted(first.values())[:9]
        assert len(starts) == 9  # 3 x 3 pairs
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert min(gaps) >= FAST.pacing * 0.9
        # Each transaction went out max_transmissions times before failing.
        copies = [sum(1 for _, t in sent if t == txid) for txid in list(first)[:9]]
        assert copies == [FAST.max_transmissions] * 9
    finally:
        close(a, b)


def _request(username: str, key: bytes, **attrs: object) -> stun.Message:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.attributes["USERNAME"] = username
    message.attributes.update(attrs)
    message.add_message_integrity(key)
    return message


async def test_bad_input_is_ignored_and_counted() -> None:
    sent: list[tuple[bytes, Address, Candidate]] = []
    local = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    checker = PeerChecker([local], "aliceufrag", PWD_A, controlling=False, tie_breaker=1,
                          send=lambda d, a, c: sent.append((d, a, c)), timers=FAST)
    mux = CheckMux()
    mux.register("aliceufrag", checker)
    peer = ("198.18.1.20", PORT)
    try:
        checker.set_remote("bobufrag", PWD_B, infos([Candidate(
            "host", "198.18.1.20", PORT, None, candidate_priority("host"), "if")]))
        await advance_until(lambda: bool(sent))
        request = stun.parse_message(sent[0][0])
        counters = checker.counters

        assert not checker.datagram_received(b"garbage", peer, local)
        assert not checker.datagram_received(sent[0][0][:30], peer, local)  # truncated
        assert counters.malformed == 2
        wrong_key = _request("aliceufrag:bobufrag", b"not the password at all")
        assert not checker.datagram_received(bytes(wrong_key), peer, local)
        assert counters.bad_integrity == 1
        wrong_user = _request("aliceufrag:mallory", PWD_A.encode())
        assert not checker.datagram_received(bytes(wrong_user), peer, local)
        assert counters.bad_username == 1
        assert not mux.datagram_received(bytes(_request("nobody:bob", b"k" * 22)), peer)
        assert mux.counters.unknown_ufrag == 1

        stray = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
        stray.attributes["XOR-MAPPED-ADDRESS"] = ("198.18.1.10", PORT)
        stray.add_message_integrity(PWD_B.encode())
        assert not checker.datagram_received(bytes(stray), peer, local)
        assert counters.unknown_transaction == 1

        # A forged answer to a real transaction: ignored, and the check goes on.
        forged = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                              transaction_id=request.transaction_id)
        forged.attributes["XOR-MAPPED-ADDRESS"] = ("198.18.1.10", PORT)
        forged.add_message_integrity(b"guessed password guessed")
        assert not checker.datagram_received(bytes(forged), peer, local)
        assert counters.bad_integrity == 2
        assert checker.has_transaction(request.transaction_id)
        assert checker.pairs[0].state == "in-progress"
        assert not any(p.state == "succeeded" for p in checker.pairs)
        # ... and nothing of it was answered.
        assert all(stun.parse_message(d).message_class == stun.Class.REQUEST
                   for d, _, _ in sent)

        # Fuzz: mutations of a valid request never raise.
        valid = bytes(_request("aliceufrag:bobufrag", PWD_A.encode(), PRIORITY=1))
        rng = random.Random(3)
        for _ in range(500):
            mutated = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            assert isinstance(checker.datagram_received(bytes(mutated), peer, local), bool)
            assert isinstance(mux.datagram_received(bytes(mutated), peer), bool)
        assert counters.errors == 0 and mux.counters.errors == 0

        # A valid request is answered: XOR-MAPPED-ADDRESS, signed with our password.
        before = len(sent)
        assert checker.datagram_received(valid, ("192.0.2.77", 4000), local)
        answer = next(stun.parse_message(d) for d, _, _ in sent[before:]
                      if stun.parse_message(d).message_class == stun.Class.RESPONSE)
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == ("192.0.2.77", 4000)
        assert answer.check_message_integrity(PWD_A.encode())
        assert counters.prflx_learned == 1  # an address the peer did not list
    finally:
        checker.close()


async def test_requests_before_the_answer_are_answered_and_replayed() -> None:
    sent: list[tuple[bytes, Address]] = []
    local = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    checker = PeerChecker([local], "aliceufrag", PWD_A, controlling=True, tie_breaker=9,
                          send=lambda d, a, c: sent.append((d, a)), timers=FAST)
    try:
        early = _request("aliceufrag:bobufrag", PWD_A.encode(),
                         PRIORITY=candidate_priority("prflx"), **{"ICE-CONTROLLED": 1})
        assert checker.datagram_received(bytes(early), ("198.18.1.20", PORT), local)
        assert len(sent) == 1  # answered at once
        assert checker.pairs == []
        checker.set_remote("bobufrag", PWD_B, [])
        # The early check left a (peer-reflexive) pair, checked right away.
        assert [p.remote_label() for p in checker.pairs] == ["prflx 198.18.1.20:51820"]
        await advance_until(lambda: len(sent) >= 2)
        assert stun.parse_message(sent[1][0]).message_class == stun.Class.REQUEST
    finally:
        checker.close()


async def test_close_stops_everything() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1")
    b.host("198.18.1.20", lan="lan1")
    await connect(a, b)
    await advance_until(lambda: a.c.state == "connected")
    close(a, b)
    checks = a.c.counters.checks
    await asyncio.sleep(0.3)
    assert a.c.counters.checks == checks
    assert a.c.state == "closed"


def _settle_world(net: SimNet) -> tuple[Node, Node]:
    """A LAN path that answers slowly (60 ms RTT) and a fast path through A's NAT."""
    nat_a = net.nat("203.0.113.1")
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.030, rank=0)
    a.host("10.1.0.2", lan="home-a", nat=nat_a, delay=0.001, rank=1)
    b.host("198.18.1.20", lan="lan1", rank=0)
    b.host("192.0.2.10", rank=1)  # also directly on the internet
    return a, b


async def test_settle_waits_for_a_slower_better_class_pair() -> None:
    net = SimNet()
    a, b = _settle_world(net)
    timers = replace(SLOW_PATHS, settle=0.15)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected")
        await asyncio.sleep(0.3)
        # The fast NAT path answered first, but the LAN pair was still being checked:
        # nominating at once would have meant a second switch right after.
        assert len(a.selections) == 1
        assert a.c.snapshot()["path"] == "direct-lan"
    finally:
        close(a, b)


async def test_settle_window_is_bounded() -> None:
    net = SimNet()
    a, b = _settle_world(net)
    net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
    timers = replace(SLOW_PATHS, settle=0.1)
    await connect(a, b, timers)
    try:
        # A LAN check gives up only after ~1.4 s; the choice does not wait for it.
        await advance_until(lambda: a.c.state == "connected")
        assert a.c.snapshot()["path"] == "direct"
        lan = next(p for p in a.c.pairs if p.local.address == "198.18.1.10"
                   and p.remote.ip == "198.18.1.20")
        assert lan.state == "in-progress"
        # Chosen once `settle` after the first pair worked is over, not when the LAN
        # check ends: then still waiting (at most `contend_max`) for the LAN interface's
        # pair to the same public address, sent once and unanswered (another uplink),
        # until its retransmit could have been answered.
        first_success = min(p.succeeded_at for p in a.c.pairs if p.succeeded_at is not None)
        other = next(p for p in a.c.pairs if p.local.address == "198.18.1.10"
                     and p.remote.ip == "192.0.2.10")
        assert other.state == "in-progress"
        [selected_at] = a.selected_at
        assert first_success + timers.settle <= selected_at
        assert selected_at <= first_success + timers.contend_max < 1.0
    finally:
        close(a, b)


@pytest.mark.parametrize(("prefixlen", "waits"), [(24, False), (8, True), (None, True)])
async def test_a_nat_path_waits_only_for_a_lan_pair_that_may_answer(
        prefixlen: int | None, waits: bool) -> None:
    # Two NATs' private networks, 10.1.0.0/24 and 10.2.0.0/24, that nothing routes
    # between: the host pair never answers. Off our subnet (/24) the NAT path is
    # nominated at its first success; within it (/8), or with the subnet unknown, it
    # waits `settle` as for any LAN pair still being checked.
    net = SimNet()
    nat_a, nat_b = net.nat("203.0.113.1"), net.nat("198.51.100.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("10.1.0.2", lan="home-a", nat=nat_a, prefixlen=prefixlen)
    ib = b.host("10.2.0.2", lan="home-b", nat=nat_b, prefixlen=prefixlen)
    a.srflx(("203.0.113.1", PORT), ia)
    b.srflx(("198.51.100.1", PORT), ib)
    timers = replace(SLOW_PATHS, settle=0.3)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected")
        lan = next(p for p in a.c.pairs if p.remote.ip == "10.2.0.2")
        assert lan.state != "succeeded"
        first_success = min(p.succeeded_at for p in a.c.pairs if p.succeeded_at is not None)
        expected = first_success + (timers.settle if waits else 0.0)
        assert a.selected_at == [pytest.approx(expected, abs=timers.pacing)]
        assert a.c.snapshot()["path"] == "direct"
    finally:
        close(a, b)


async def test_a_relayed_path_is_used_at_once_and_a_direct_one_replaces_it() -> None:
    # Two NATs whose direct path is slow (120 ms RTT) and a relay beside A that answers
    # in a few ms. Waiting `settle` would hold the relayed path back for a direct one
    # that replaces it anyway (a better class always does, at once).
    net = SimNet()
    nat_a, nat_b = net.nat("203.0.113.1"), net.nat("198.51.100.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("10.1.0.2", lan="home-a", nat=nat_a, delay=0.06)
    ib = b.host("10.2.0.2", lan="home-b", nat=nat_b)
    a.srflx(("203.0.113.1", PORT), ia)
    b.srflx(("198.51.100.1", PORT), ib)
    a.relay("203.0.113.5", 50000, delay=0.001)
    timers = replace(SLOW_PATHS, settle=0.5)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected")
        first, _ = a.selections[0]
        assert first is not None and first.local.type == "relay"
        await advance_until(lambda: a.c.snapshot()["path"] == "direct", timeout=2.0)
        direct = a.c.selected
        assert direct is not None and direct.succeeded_at is not None
        # Chosen before the direct pair had answered (not `settle` after the first
        # success), then replaced by it as soon as it did.
        assert a.selected_at[0] < direct.succeeded_at
        assert len(a.selections) == 2
        await advance_until(lambda: mirrored(a, b))
    finally:
        close(a, b)


@pytest.mark.parametrize("relayed", [True, False])
async def test_a_relayed_pair_going_quiet_is_told_for_the_allocation(relayed: bool) -> None:
    """A relay that restarted drops our traffic without a word: the agent has its
    allocations confirmed when a relayed pair that worked stops answering."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    if relayed:
        a.relay("203.0.113.5", 50000)
        ends = ("203.0.113.5", "198.51.100.20")
    else:
        a.host("203.0.113.10")
        ends = ("203.0.113.10", "198.51.100.20")
    b.host("198.51.100.20")
    quiet: list[float] = []
    await connect(a, b, on_relay_quiet=lambda: quiet.append(now()))
    try:
        await advance_until(lambda: a.c.state == "connected")
        assert (a.c.snapshot()["path"] == "relay") is relayed
        net.cut.add(frozenset(ends))
        await advance_until(lambda: a.c.state == "failed", timeout=5.0)
        assert len(quiet) == (1 if relayed else 0)
    finally:
        close(a, b)


async def test_retired_checkers_follow_a_peer_that_moved_and_report_no_loss() -> None:
    """A renegotiation retires the checkers of the old session while the new one waits
    for the chat: they must still carry the path to a device that moved (it checks
    from its new address at once) without telling the agent of a loss or a failure,
    which the new session owns."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("203.0.113.10")
    b.host("198.51.100.20")
    await connect(a, b)
    try:
        await advance_until(lambda: mirrored(a, b))
        told: list[str] = []
        for node in (a, b):
            node.c.on_lost = lambda pair, _fell_back, n=node.name: told.append(n)
            node.c.retire()
        before = len(a.selections), len(b.selections)
        a.host("203.0.113.11", rank=1)  # a new network; the old address is gone
        net.cut.add(frozenset(("203.0.113.10", "198.51.100.20")))
        a.c.add_local(a.candidates, complete=True)
        for node in (a, b):
            node.c.note_traffic()
        await advance_until(lambda: mirrored(a, b) and a.c.selected is not None
                            and a.c.selected.local.address == "203.0.113.11", timeout=10.0)
        assert b.c.selected is not None and b.c.selected.remote_address[0] == "203.0.113.11"
        assert told == []
        new = a.selections[before[0]:] + b.selections[before[1]:]
        assert new and all(pair is not None for pair, _ in new), new
        assert a.c.name == "alice (previous session)"
    finally:
        close(a, b)


def test_rtt_from_a_retransmitted_check_is_only_a_stand_in() -> None:
    local = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    remote = CandidateInfo("host", "198.18.1.20", PORT, candidate_priority("host"), "f0")
    pair = CandidatePair(local, remote, 1)
    pair.add_rtt(130.0, exact=False, at=0.0)  # first copy lost: timed from it, an upper bound
    assert pair.rtt_ms == 130.0
    pair.add_rtt(30.0, exact=True, at=0.0)
    assert pair.rtt_ms == 30.0  # replaced at once, not averaged in
    pair.add_rtt(500.0, exact=False, at=0.0)
    assert pair.rtt_ms == 30.0  # ambiguous samples never displace exact ones
    for sample in (31.0, 29.0, 400.0):
        pair.add_rtt(sample, exact=True, at=0.0)
    assert pair.rtt_ms == 30.5  # median: one late answer does not move it


def test_relay_base_skips_remote_host_candidates_behind_a_nat() -> None:
    host = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    relay = Candidate("relay", "203.0.113.5", 50000, None, candidate_priority("relay"), "turn")
    natted = [
        CandidateInfo("host", "198.18.2.10", PORT, candidate_priority("host"), "h"),
        CandidateInfo("srflx", "203.0.113.11", 40001, candidate_priority("srflx"), "s"),
        CandidateInfo("relay", "203.0.113.5", 50001, candidate_priority("relay"), "r"),
    ]
    pairs = {(p.local.type, p.remote.type) for p in form_pairs([host, relay], natted, True)}
    # A relay cannot reach a private address; coturn drops the allocation on trying.
    assert pairs == {("host", "host"), ("host", "srflx"), ("host", "relay"),
                     ("relay", "srflx"), ("relay", "relay")}

    public = [CandidateInfo("host", "203.0.113.20", PORT, candidate_priority("host"), "h"),
              CandidateInfo("srflx", "203.0.113.20", PORT, candidate_priority("srflx"), "s")]
    pairs = {(p.local.type, p.remote.type) for p in form_pairs([relay], public, True)}
    assert pairs == {("relay", "host")}  # no NAT: the host address is public

    # No STUN server answered the peer (a network that lets no UDP out, or STUN down):
    # nothing says its host address is public, so the relay does not send there.
    unknown = [CandidateInfo("host", "198.18.2.10", PORT, candidate_priority("host"), "h")]
    assert form_pairs([relay], unknown, True) == []
    assert len(form_pairs([host], unknown, True)) == 1


async def test_a_relay_checks_a_host_candidate_only_once_its_srflx_says_it_is_public() -> None:
    """A peer's host candidate comes first, its srflx once STUN answered (and never, in a
    network that lets no UDP out): pairing our relay candidate with the host address
    before would send the relay to what may be a private address, and coturn then
    closes the allocation's relay socket (every relayed path on it goes)."""
    relay = Candidate("relay", "203.0.113.5", 50000, None, candidate_priority("relay"), "turn")
    host = CandidateInfo("host", "198.18.2.10", PORT, candidate_priority("host"), "h")
    srflx = CandidateInfo("srflx", "203.0.113.11", 40001, candidate_priority("srflx"), "s")

    def checker() -> PeerChecker:
        return PeerChecker([relay], "aliceufrag", PWD_A, controlling=True, tie_breaker=1,
                           send=lambda d, a, c: None, timers=FAST)

    def remotes(c: PeerChecker) -> set[str]:
        return {p.remote.type for p in c.pairs}

    natted = checker()
    natted.set_remote("bobufrag", PWD_B, [host], complete=False)
    assert remotes(natted) == set()
    natted.add_remote([srflx], complete=True)
    assert remotes(natted) == {"srflx"}  # the host address is behind the NAT
    natted.close()

    silent = checker()
    silent.set_remote("bobufrag", PWD_B, [host], complete=False)
    silent.add_remote([], complete=True)  # the end, no srflx: maybe a NAT letting no UDP out
    assert remotes(silent) == set()
    silent.close()

    public = checker()
    own = replace(srflx, ip=host.ip, port=host.port)  # no NAT: the same address twice
    public.set_remote("bobufrag", PWD_B, [host, own], complete=True)
    assert {(p.remote.ip, p.remote.port) for p in public.pairs} == {(host.ip, host.port)}
    public.close()

    # The announced endpoint, taken for srflx, is the peer's own address when it
    # announced before its STUN answer: a guess waits like a host candidate.
    announced = CandidateInfo("srflx", "198.18.2.10", PORT, candidate_priority("srflx"),
                              GUESSED_FOUNDATION)
    early = checker()
    early.set_remote("bobufrag", PWD_B, [announced], complete=True)
    assert remotes(early) == set()
    early.add_remote([srflx], complete=True)  # its CANDIDATES line says where it is
    assert {(p.remote.ip, p.remote.port) for p in early.pairs} == {("203.0.113.11", 40001)}
    early.close()

    # A guess that was right: told as srflx at the same address, it is paired then.
    early = checker()
    early.set_remote("bobufrag", PWD_B, [replace(srflx, foundation=GUESSED_FOUNDATION)],
                     complete=True)
    assert remotes(early) == set()
    early.add_remote([srflx], complete=True, replace=True)  # as EarlyPeer passes it
    assert remotes(early) == {"srflx"}
    early.close()


def test_pair_view_marks_an_rtt_without_exact_samples_as_a_bound() -> None:
    local = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    remote = CandidateInfo("host", "198.18.1.20", PORT, candidate_priority("host"), "f0")
    pair = CandidatePair(local, remote, 1)
    pair.add_rtt(130.0, exact=False, at=0.0)
    assert pair.view().rtt_bound
    pair.add_rtt(30.0, exact=True, at=0.0)
    assert not pair.view().rtt_bound


@pytest.mark.parametrize(("one_way", "interval", "timeout"), [
    (0.005, 0.25, 0.3),  # 10 ms RTT: the floors of both
    (0.05, 0.4, 0.3),  # 100 ms RTT: four RTTs apart; a steady RTO under the floor
])
async def test_consent_follows_the_rtt_and_a_lost_path_is_noticed_in_about_a_second(
        one_way: float, interval: float, timeout: float) -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=one_way / 2)
    b.host("198.18.1.20", lan="lan1", delay=one_way / 2)
    timers = replace(CheckTimers(), jitter=0.0)  # the defaults, consent exactly on time
    assert timers.consent_interval_for(None) == timers.consent_interval  # unmeasured: 2 s
    consents: list[float] = []
    send_a = a.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        message = stun.parse_message(data)
        if message.message_class == stun.Class.REQUEST and a.c.selected is not None:
            consents.append(now())
        send_a(data, dest, local)

    a.send = spy  # type: ignore[method-assign]
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        await advance_until(lambda: len(consents) >= 10, timeout=10.0)
        gaps = [later - earlier for earlier, later in itertools.pairwise(consents[-4:])]
        assert gaps == pytest.approx([interval] * 3, abs=0.02)
        pair = a.c.selected
        assert timers.consent_timeout_for(pair.rto_ms(10.0), pair.rtt_ms) == pytest.approx(
            timeout)

        lost: list[tuple[CandidatePair, bool]] = []
        a.c.on_lost = lambda pair, fell_back: lost.append((pair, fell_back))
        chosen = a.c.selected
        cut_at = now()
        net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
        await advance_until(lambda: a.c.state == "failed", timeout=5.0)
        assert lost == [(chosen, False)], "told once: the path went quiet, none took over"
        # Three misses in a row: the next check at most an interval after the cut, each
        # miss followed by the next check at once (RFC 7675's defaults took 6 s or more).
        assert now() - cut_at <= interval + 3 * timeout + 0.02
        assert now() - cut_at <= 1.5
    finally:
        close(a, b)


async def test_trickled_candidates_are_checked_and_failure_waits_for_the_last() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1")
    b.host("198.18.1.20", lan="lan1")
    a.checker = PeerChecker(a.candidates, "aliceufrag", PWD_A, controlling=True,
                            tie_breaker=2**63 + 7, send=a.send, on_selected=a.on_selected,
                            timers=FAST, name="alice")
    b.checker = PeerChecker(b.candidates, "bobufrag", PWD_B, controlling=False,
                            tie_breaker=12345, send=b.send, on_selected=b.on_selected,
                            timers=FAST, name="bob")
    a.mux.register("aliceufrag", a.checker)
    b.mux.register("bobufrag", b.checker)
    nowhere = CandidateInfo("srflx", "203.0.113.77", PORT, candidate_priority("srflx"), "s9")
    try:
        # Bob's answer carried only an address that never answers, more to come (Bob
        # does not check yet, or his checks would teach Alice his address).
        a.checker.set_remote("bobufrag", PWD_B, [nowhere], complete=False)
        await advance_until(lambda: all(p.tried for p in a.c.pairs), timeout=2.0)
        await asyncio.sleep(1.0)
        assert a.c.state == "checking", "not failed while candidates may still come"
        assert a.selections == []

        b.checker.set_remote("aliceufrag", PWD_A, infos(a.candidates))
        a.c.add_remote(infos(b.candidates), complete=True)
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b), timeout=2.0)
        assert a.c.selected is not None and a.c.selected.remote.ip == "198.18.1.20"
    finally:
        close(a, b)


async def test_a_local_base_gathered_later_gets_pairs() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    late = a.host("198.18.1.10", lan="lan1")
    a.candidates.clear()  # not gathered yet when the checker starts
    b.host("198.18.1.20", lan="lan1")
    await connect(a, b)
    try:
        await asyncio.sleep(0.5)
        assert a.c.pairs == [] and a.c.state == "failed"
        a.candidates.append(Candidate("host", *late.address, "eth0",
                                      candidate_priority("host", 65535), "interface eth0"))
        a.c.add_local(a.candidates, complete=True)
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b), timeout=2.0)
    finally:
        close(a, b)


async def test_first_nomination_waits_for_a_faster_pair_still_in_flight() -> None:
    """The slow uplink's check leaves first and answers first; the fast one, one pacing
    interval later, answers 2 ms after it. The first choice is already the fast one."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.010, rank=0)  # 20 ms RTT, checked first
    a.host("198.18.3.10", lan="lan1", delay=0.006, rank=1)  # 12 ms RTT, 10 ms later
    b.host("198.18.1.20", lan="lan1")
    timers = replace(FAST, pacing=0.010, rto=0.1)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        first, reason = a.selections[0]
        assert first is not None and first.local.address == "198.18.3.10", reason
        assert len([p for p, _ in a.selections if p is not None]) == 1, "no switch needed"
        assert first.rtt_ms == pytest.approx(12.0)
    finally:
        close(a, b)


async def test_the_controlling_side_follows_a_peer_whose_nat_moved_at_its_first_miss() -> None:
    """A's NAT gets a new public address. B (public, controlling) sees A's checks come
    from it, authenticated, while its consent to the old one goes unanswered: it moves
    after that first miss, not after `consent_failures` of them."""
    net = SimNet()
    nat_a = net.nat("203.0.113.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("10.1.0.2", lan="home-a", nat=nat_a, delay=0.002)
    a.srflx(("203.0.113.1", PORT), ia)
    b.host("192.0.2.10", delay=0.002)
    timers = replace(CheckTimers(), jitter=0.0)
    # B answered A's offer, so B controls.
    a.checker = PeerChecker(a.candidates, "aliceufrag", PWD_A, controlling=False,
                            tie_breaker=1, send=a.send, on_selected=a.on_selected,
                            timers=timers, name="alice")
    b.checker = PeerChecker(b.candidates, "bobufrag", PWD_B, controlling=True,
                            tie_breaker=2, send=b.send, on_selected=b.on_selected,
                            timers=timers, name="bob")
    a.mux.register("aliceufrag", a.checker)
    b.mux.register("bobufrag", b.checker)
    b.checker.set_remote("aliceufrag", PWD_A, infos(a.candidates))
    a.checker.set_remote("bobufrag", PWD_B, infos(b.candidates))
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b), timeout=5.0)
        assert b.c.selected is not None and b.c.selected.remote.ip == "203.0.113.1"

        # The NAT moves: a new public address, every mapping gone.
        moved = Nat("203.0.113.9")
        del net.nats["203.0.113.1"]
        net.nats["203.0.113.9"] = moved
        net.ifaces[ia.address].nat = moved
        changed_at = now()
        await advance_until(lambda: b.c.selected is not None
                            and b.c.selected.remote.ip == "203.0.113.9", timeout=5.0)
        took = now() - changed_at
        assert "now checks from prflx 203.0.113.9" in b.c.reason, b.c.reason
        # Three misses would take three consent intervals (0.75 s on this path).
        assert took < 2 * timers.consent_min_interval + timers.consent_min_timeout, took
    finally:
        close(a, b)


# The defaults (RTT pace 0.25 s on a LAN, checks missed after 0.3 s), with the idle
# window and paces shortened so that the virtual clock has less to poll through.
IDLE_SOON = replace(CheckTimers(), jitter=0.0, active_window=4.0, consent_idle_interval=2.0,
                    keepalive_idle_interval=6.0, reprobe_max=4.0, reprobe_idle_max=40.0)


def spy_consents(node: Node) -> list[float]:
    """When `node` sends a check on its selected pair (consent), from now on."""
    sent: list[float] = []
    send = node.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        message = stun.parse_message(data)
        pair = node.c.selected
        if (message.message_class == stun.Class.REQUEST and pair is not None
                and dest == pair.remote_address):
            sent.append(now())
        send(data, dest, local)

    node.send = spy  # type: ignore[method-assign]
    return sent


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_consent_at_rtt_pace_while_active_rfc_pace_when_idle_and_at_once_on_traffic(
        ) -> None:
    """A new path is checked at its RTT pace for `active_window`, then every
    `consent_idle_interval` (RTT-paced checks of idle peers cost an idle host with 20
    peers 5 % of a core); traffic sends a check at once and brings the RTT pace back
    for another window."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.005)
    b.host("198.18.1.20", lan="lan1", delay=0.005)
    timers = IDLE_SOON
    consents = spy_consents(a)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        selected = now()
        await advance_until(lambda: len(consents) >= 6)
        assert a.c.active and a.c.snapshot()["consent_pace"] == "active"
        assert gaps(consents[-4:]) == pytest.approx([0.25] * 3, abs=0.02)

        await advance_until(lambda: not a.c.active, timeout=timers.active_window + 1)
        assert now() - selected == pytest.approx(timers.active_window, abs=0.01)
        idle_from = len(consents)
        await advance_until(lambda: len(consents) >= idle_from + 3,
                            timeout=3 * timers.consent_idle_interval)
        # (the first check after the window was scheduled before it ended)
        assert gaps(consents[idle_from:]) == pytest.approx(
            [timers.consent_idle_interval] * 2, abs=0.01)
        assert a.c.snapshot()["consent_pace"] == "idle"
        assert a.c.state == "connected"

        await asyncio.sleep(1.0)  # between two idle checks
        before, told = len(consents), now()
        a.c.note_traffic()
        await advance_until(lambda: len(consents) > before, timeout=0.05)
        assert consents[before] - told < 0.02  # at once, not at the next idle tick
        await advance_until(lambda: len(consents) >= before + 5, timeout=2.0)
        assert gaps(consents[before:before + 5]) == pytest.approx([0.25] * 4, abs=0.02)
        assert a.c.active

        # Traffic within the window keeps it active; none for a window makes it idle.
        await asyncio.sleep(timers.active_window - 1)
        a.c.note_traffic()
        await asyncio.sleep(timers.active_window - 1)
        assert a.c.active
        await asyncio.sleep(2)
        assert not a.c.active
    finally:
        close(a, b)


async def test_an_idle_path_that_misses_goes_back_to_rtt_pace_and_fails_in_about_a_second(
        ) -> None:
    """Lost while idle: the next idle check is missed, the following ones go at once and
    at RTT pace, so the path fails about a second after that first miss; the
    alternatives' keepalives slow down too while idle."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.005)
    a.host("198.18.3.10", lan="lan1", delay=0.007, rank=1)
    b.host("198.18.1.20", lan="lan1", delay=0.005)
    timers = IDLE_SOON
    consents = spy_consents(a)
    keepalives: list[float] = []
    send_a = a.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        message = stun.parse_message(data)
        pair = a.c.selected
        if (message.message_class == stun.Class.REQUEST and pair is not None
                and local.address == "198.18.3.10"):
            keepalives.append(now())
        send_a(data, dest, local)

    a.send = spy  # type: ignore[method-assign]
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b)
                            and len(a.c.valid_pairs) == 2)
        assert a.c.selected is not None and a.c.selected.local.address == "198.18.1.10"
        await advance_until(lambda: not a.c.active, timeout=timers.active_window + 1)
        idle_at = now()
        await asyncio.sleep(4 * timers.keepalive_idle_interval)
        # (the first one after the window was scheduled before it ended)
        idle_keepalives = [t for t in keepalives if t > idle_at][1:]
        assert len(idle_keepalives) >= 3
        assert gaps(idle_keepalives) == pytest.approx(
            [timers.keepalive_idle_interval] * (len(idle_keepalives) - 1), abs=0.05)

        lost: list[tuple[CandidatePair, bool]] = []
        a.c.on_lost = lambda pair, fell_back: lost.append((pair, fell_back))
        cut_at = now()
        net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
        checks_from = len(consents)
        await advance_until(lambda: len(lost) == 1, timeout=3 * timers.consent_idle_interval)
        first_miss = consents[checks_from] + timers.consent_min_timeout
        # Each miss is followed at once by the next check: three in about a second.
        assert now() - first_miss <= 2 * timers.consent_min_timeout + 0.05
        assert now() - cut_at <= timers.consent_idle_interval + 3 * timers.consent_min_timeout + 0.1
        assert a.c.selected is not None and a.c.selected.local.address == "198.18.3.10"
    finally:
        close(a, b)


async def test_failed_pairs_are_reprobed_rarely_while_idle_and_soon_again_on_traffic() -> None:
    """A pair that never answers (the peer's private address from across a NAT) is
    re-probed with backoff up to `reprobe_max` while the path is active, up to
    `reprobe_idle_max` while idle; traffic brings its next re-probe within
    `reprobe_max`."""
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.005)
    b.host("198.18.1.20", lan="lan1", delay=0.005)
    timers = replace(IDLE_SOON, active_window=40.0)
    nowhere = ("203.0.113.77", PORT)
    probes: list[float] = []
    send_a = a.send

    def spy(data: bytes, dest: Address, local: Candidate) -> None:
        if dest == nowhere and len(data) > 0:
            message = stun.parse_message(data)
            if message.message_class == stun.Class.REQUEST:
                probes.append(now())
        send_a(data, dest, local)

    a.send = spy  # type: ignore[method-assign]
    await connect(a, b, timers)
    extra = CandidateInfo("srflx", nowhere[0], PORT, candidate_priority("srflx"), "s9")
    a.c.add_remote([extra], complete=True)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        # A re-probe is a check with retransmits: given up 4.7 s after its first copy
        # (RTO 0.1 s doubling to 1.6 s, six copies), then the next after the backoff.
        given_up = 4.7

        def starts(after: float) -> list[float]:
            return [t for prev, t in itertools.pairwise(probes)
                    if t - prev > timers.max_rto + 0.1 and t > after]

        await asyncio.sleep(timers.active_window)  # active: re-probes 4 s apart at most
        active = starts(0.0)
        assert gaps(active)[-1] == pytest.approx(given_up + timers.reprobe_max, abs=0.05)
        await asyncio.sleep(4 * timers.reprobe_idle_max)  # idle: spaced out to 40 s
        idle = starts(active[-1])
        assert max(gaps(idle)) == pytest.approx(given_up + timers.reprobe_idle_max, abs=0.05)
        traffic_at, count = now(), len(probes)
        a.c.note_traffic()
        await advance_until(lambda: len(probes) > count, timeout=timers.reprobe_max + 0.5)
        assert probes[count] - traffic_at <= timers.reprobe_max + 2 * timers.pacing
    finally:
        close(a, b)


def _uplinks(net: SimNet) -> tuple[Node, Node]:
    """A: a slow default uplink (eth0, 80 ms RTT, checked first) and a fast one (eth1,
    10 ms), each behind its own port-preserving NAT; B: public."""
    a, b = net.node("a"), net.node("b")
    slow = a.host("10.1.0.2", lan="slow", nat=net.nat("203.0.113.10"), delay=0.040, rank=0)
    fast = a.host("10.2.0.2", lan="fast", nat=net.nat("203.0.113.11"), delay=0.005, rank=1)
    a.srflx(("203.0.113.10", PORT), slow)
    a.srflx(("203.0.113.11", PORT), fast)
    b.host("192.0.2.10")
    return a, b


def _checker(node: Node, ufrag: str, pwd: str, controlling: bool,
             timers: CheckTimers) -> PeerChecker:
    node.checker = PeerChecker(node.candidates, ufrag, pwd, controlling=controlling,
                               tie_breaker=2**63 + 7 if controlling else 12345,
                               send=node.send, on_selected=node.on_selected, timers=timers,
                               name=node.name)
    node.mux.register(ufrag, node.checker)
    return node.checker


async def test_a_fast_uplink_whose_first_check_the_peer_dropped_still_wins_the_first_choice(
        ) -> None:
    """Early checks: A checks B before B knows A's key. The fast uplink's first check
    reaches B then and is dropped; the slow one's arrives after B learned the key and is
    answered (80 ms). B's own checks reach A over the fast uplink meanwhile: that
    pair's check goes again at once and answers in 10 ms, before the slow one, so A's
    first nomination is the fast uplink, made before that pair's retransmit would even
    have left (at 110 ms: answered then, its RTT was only a bound of 110 ms)."""
    net = SimNet()
    a, b = _uplinks(net)
    # A short settle: the slow pair looks like a LAN pair until it answers.
    timers = replace(SLOW_PATHS, pacing=0.010, rto=0.1, contend_max=0.5, settle=0.01)
    started = now()
    try:
        _checker(a, "aliceufrag", PWD_A, True, timers).set_remote(
            "bobufrag", PWD_B, infos(b.candidates))
        await asyncio.sleep(0.02)  # the fast check (sent at 10 ms) reached B at 15 ms
        assert b.mux.counters.unknown_ufrag >= 1
        _checker(b, "bobufrag", PWD_B, False, timers).set_remote(
            "aliceufrag", PWD_A, infos(a.candidates))
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        first, reason = a.selections[0]
        assert first is not None and first.local.interface == "eth1", reason
        assert first.rtt_ms == pytest.approx(10.0), reason
        assert a.selected_at[0] - started < 0.1, a.selected_at
        assert b.selections[0][0] is not None
        assert b.selections[0][0].remote_address == ("203.0.113.11", PORT)
        assert len([p for p, _ in a.selections if p is not None]) == 1, a.selections
    finally:
        close(a, b)


async def test_another_uplinks_dropped_first_check_is_retransmitted_before_the_first_choice(
        ) -> None:
    """As above, but no LAN-like pair holds the choice (a short settle) and B never
    checks A: the slow pair answers at 80 ms, when the fast pair's first check (dropped:
    B did not know A yet) was sent longer ago than 80 ms. The fast uplink could still
    answer faster, at its retransmit (110 ms): the first nomination waits for that, and
    for the exact measurement that follows, and is the fast uplink."""
    net = SimNet()
    a, b = _uplinks(net)
    timers = replace(SLOW_PATHS, pacing=0.010, rto=0.1, contend_max=0.5, settle=0.01)
    try:
        _checker(a, "aliceufrag", PWD_A, True, timers).set_remote(
            "bobufrag", PWD_B, infos(b.candidates))
        await asyncio.sleep(0.02)
        assert b.mux.counters.unknown_ufrag >= 1  # the fast uplink's first check
        _checker(b, "bobufrag", PWD_B, False, timers)
        await advance_until(lambda: a.c.state == "connected")
        first, reason = a.selections[0]
        assert first is not None and first.local.interface == "eth1", reason
        assert first.rtt_ms == pytest.approx(10.0), reason
    finally:
        close(a, b)


async def test_a_pair_answered_only_at_its_retransmit_is_measured_again_before_the_first_choice(
        ) -> None:
    """B cannot check A (its checks stay unanswered: B's address filter drops them),
    so nothing triggers the fast pair's check again: it is answered at its retransmit
    (an RTT bound of 110 ms, after the slow pair's exact 80 ms). One more check of it,
    answered in 10 ms, comes before the first nomination."""
    net = SimNet()
    a, b = _uplinks(net)
    timers = replace(SLOW_PATHS, pacing=0.010, rto=0.1, contend_max=0.5)
    try:
        _checker(a, "aliceufrag", PWD_A, True, timers).set_remote(
            "bobufrag", PWD_B, infos(b.candidates))
        await asyncio.sleep(0.02)
        # B answers but never checks A itself (an old or busy peer).
        _checker(b, "bobufrag", PWD_B, False, timers)
        fast = next(p for p in a.c.pairs if p.local.interface == "eth1")
        await advance_until(lambda: fast.state == "succeeded")
        assert fast.view().rtt_bound and fast.rtt_ms == pytest.approx(110.0)
        assert a.selections == [], "no choice while the fast pair's RTT is only a bound"
        await advance_until(lambda: a.c.state == "connected")
        first, reason = a.selections[0]
        assert first is fast and first.rtt_ms == pytest.approx(10.0), reason
    finally:
        close(a, b)
