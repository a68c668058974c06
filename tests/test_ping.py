"""`kbwg-agent ping`: the sealed probe, peer resolution, the agent's reply and the CLI loop.

Timers run on a virtual clock (virtual_clock.py): RTTs, timeouts and intervals are exact.
The checkers run against test_checks' in-memory network (NATs, delays).
"""

from __future__ import annotations

import asyncio
import io
import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import pytest
from aioice import stun
from test_checks import PORT, SimNet, close, connect, mirrored
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until, now

from kbwg.agent import cli
from kbwg.agent.control import ControlError, ControlServer, RequestRefused, call
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.ping import PingReplies, resolve_peer
from kbwg.agent.ping_command import PingOptions, run_ping
from kbwg.agent.runtime_state import ANNOUNCED, AgentState, PeerState
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.probe import PairProbe, ProbeResult, ProbingReceiver
from kbwg.negotiation.session import Negotiator
from kbwg.negotiation.wire import CandidateInfo

pytestmark = VIRTUAL_CLOCK

PEER_PWD = "peerpasswordpeerpassword"
LOCAL = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"),
                  "interface eth0")
REMOTE = CandidateInfo("srflx", "203.0.113.9", 40001, candidate_priority("srflx"), "f0")


# -- the probe on real checkers -----------------------------------------------------------


async def test_ping_over_a_punched_pair_times_the_signed_answer() -> None:
    net = SimNet()
    nat_a, nat_b = net.nat("203.0.113.1"), net.nat("198.51.100.1")
    a, b = net.node("a"), net.node("b")
    ia = a.host("198.18.1.2", lan="home-a", nat=nat_a, delay=0.004)
    ib = b.host("198.18.2.2", lan="home-b", nat=nat_b, delay=0.006)
    a.srflx(("203.0.113.1", PORT), ia)
    b.srflx(("198.51.100.1", PORT), ib)
    await connect(a, b)
    probe = PairProbe("aliceufrag", a.send)
    probe.set_remote("bobufrag", "bobpasswordbobpasswordbob")
    a.mux.unregister("aliceufrag")
    a.mux.register("aliceufrag", ProbingReceiver(a.c, probe))
    try:
        await advance_until(lambda: mirrored(a, b))
        pair = a.c.selected
        assert pair is not None and pair.path == "direct"
        b_before = (b.c.selected, b.c.counters.role_conflicts)
        results = [await probe.ping(pair, timeout=1.0) for _ in range(3)]
        for result in results:
            # One way is 4 + 6 ms of interface delay: the RTT is exactly 20 ms.
            assert result.rtt_ms == pytest.approx(20.0, abs=0.01)
            assert result.pair is pair
            assert result.seen_as == ("203.0.113.1", PORT)
        assert probe.counters.pongs == 3 and probe.counters.forged == 0
        # The peer answered as to a consent check and changed nothing.
        assert (b.c.selected, b.c.counters.role_conflicts) == b_before
        # The checker's own transactions still reach it through the wrapper.
        answered = a.c.counters.responses
        await advance_until(lambda: a.c.counters.responses > answered)
    finally:
        probe.close()
        close(a, b)


async def test_ping_over_a_dead_pair_times_out_exactly() -> None:
    net = SimNet()
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.002)
    b.host("198.18.1.20", lan="lan1", delay=0.002)
    await connect(a, b)
    probe = PairProbe("aliceufrag", a.send)
    probe.set_remote("bobufrag", "bobpasswordbobpasswordbob")
    try:
        await advance_until(lambda: a.c.selected is not None)
        pair = a.c.selected
        assert pair is not None
        net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
        start = now()
        result = await probe.ping(pair, timeout=2.5)
        assert now() - start == pytest.approx(2.5)
        assert result.rtt_ms is None and not result.answered
        assert probe.counters.timeouts == 1
    finally:
        probe.close()
        close(a, b)


# -- pong authentication ------------------------------------------------------------------


class CapturingPeer:
    """A send function that keeps what the probe sent; the test plays the network."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int], Candidate]] = []

    def __call__(self, data: bytes, dest: tuple[str, int], local: Candidate) -> None:
        self.sent.append((data, dest, local))

    def request(self) -> stun.Message:
        return stun.parse_message(self.sent[-1][0])


def answer(request: stun.Message, key: bytes | None, *, error: bool = False,
           fingerprint_only: bool = False) -> bytes:
    response = stun.Message(stun.Method.BINDING,
                            stun.Class.ERROR if error else stun.Class.RESPONSE,
                            transaction_id=request.transaction_id)
    if error:
        response.attributes["ERROR-CODE"] = (400, "Bad Request")
    else:
        response.attributes["XOR-MAPPED-ADDRESS"] = ("203.0.113.1", 51820)
    if key is not None:
        response.add_message_integrity(key)
    elif fingerprint_only:
        response.add_fingerprint()
    return bytes(response)


class ChecklessReceiver:
    """The peer's checker behind the probe: takes nothing, and counts what it got."""

    def __init__(self) -> None:
        self.got = 0

    def has_transaction(self, transaction_id: bytes) -> bool:
        return False

    def datagram_received(self, data: bytes, src: tuple[str, int],
                          local: Candidate | None = None) -> bool:
        self.got += 1
        return False


async def test_the_request_is_signed_with_the_peers_password() -> None:
    peer = CapturingPeer()
    probe = PairProbe("ours", peer)
    probe.set_remote("theirs", PEER_PWD)
    pair = CandidatePair(LOCAL, REMOTE, 1)
    task = asyncio.create_task(probe.ping(pair, timeout=1.0))
    await asyncio.sleep(0)  # the ping task sends at once
    assert peer.sent
    data, dest, local = peer.sent[0]
    request = stun.parse_message(data)
    assert dest == ("203.0.113.9", 40001) and local is LOCAL
    assert request.attributes["USERNAME"] == "theirs:ours"
    assert request.check_message_integrity(PEER_PWD.encode())
    assert "FINGERPRINT" in request.attributes
    # No role and no nomination: the peer's checker changes nothing on a ping.
    for attr in ("USE-CANDIDATE", "ICE-CONTROLLING", "ICE-CONTROLLED"):
        assert attr not in request.attributes
    assert (await task).rtt_ms is None


async def test_forged_and_misdirected_pongs_are_not_counted() -> None:
    peer = CapturingPeer()
    probe = PairProbe("ours", peer)
    probe.set_remote("theirs", PEER_PWD)
    checker = ChecklessReceiver()
    receiver = ProbingReceiver(checker, probe)
    pair = CandidatePair(LOCAL, REMOTE, 1)
    start = now()
    task = asyncio.create_task(probe.ping(pair, timeout=1.0))
    await asyncio.sleep(0)  # the ping task sends at once
    assert peer.sent
    request = peer.request()
    tid = request.transaction_id
    assert receiver.has_transaction(tid)
    src = ("203.0.113.9", 40001)
    await asyncio.sleep(0.010)
    # A third party that saw the request: no key, a guessed key, no integrity at all.
    assert receiver.datagram_received(answer(request, b"guessed"), src)
    assert receiver.datagram_received(answer(request, None, fingerprint_only=True), src)
    assert receiver.datagram_received(answer(request, None), src)
    # Signed, but from somewhere else than the pair's remote (RFC 8445 7.2.5.2.1).
    assert receiver.datagram_received(answer(request, PEER_PWD.encode()),
                                      ("203.0.113.66", 40001))
    assert not task.done()
    assert probe.counters.forged == 3 and probe.counters.wrong_source == 1
    await asyncio.sleep(0.030)
    assert receiver.datagram_received(answer(request, PEER_PWD.encode()), src)
    result = await task
    assert result.rtt_ms == pytest.approx(40.0, abs=0.01)
    assert now() - start == pytest.approx(0.040, abs=0.001)
    assert result.seen_as == ("203.0.113.1", 51820)
    # The real answer repeated after the ping ended is late, not a second pong.
    assert receiver.datagram_received(answer(request, PEER_PWD.encode()), src)
    assert probe.counters.late == 1 and probe.counters.pongs == 1
    assert checker.got == 0, "answers to pings never reach the checker"
    # Requests and answers to other transactions go to the checker.
    other = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
    other.add_message_integrity(PEER_PWD.encode())
    assert not receiver.has_transaction(other.transaction_id)
    receiver.datagram_received(bytes(other), src)
    receiver.datagram_received(b"\x00garbage", src)
    assert checker.got == 2


async def test_only_forged_pongs_time_out() -> None:
    peer = CapturingPeer()
    probe = PairProbe("ours", peer)
    probe.set_remote("theirs", PEER_PWD)
    pair = CandidatePair(LOCAL, REMOTE, 1)
    task = asyncio.create_task(probe.ping(pair, timeout=3.0))
    await asyncio.sleep(0)  # the ping task sends at once
    assert peer.sent
    for key in (b"not-the-password", None):
        probe.datagram_received(answer(peer.request(), key), ("203.0.113.9", 40001))
    result = await task
    assert result.rtt_ms is None
    assert probe.counters.forged == 2 and probe.counters.pongs == 0
    assert probe.counters.timeouts == 1


async def test_signed_error_answer_ends_the_ping_without_rtt() -> None:
    peer = CapturingPeer()
    probe = PairProbe("ours", peer)
    probe.set_remote("theirs", PEER_PWD)
    task = asyncio.create_task(probe.ping(CandidatePair(LOCAL, REMOTE, 1), timeout=3.0))
    await asyncio.sleep(0)  # the ping task sends at once
    assert peer.sent
    probe.datagram_received(answer(peer.request(), PEER_PWD.encode(), error=True),
                            ("203.0.113.9", 40001))
    result = await task
    assert result.rtt_ms is None and result.error is not None and "400" in result.error


async def test_probe_without_credentials_or_closed() -> None:
    probe = PairProbe("ours", CapturingPeer())
    assert not probe.ready
    pair = CandidatePair(LOCAL, REMOTE, 1)
    with pytest.raises(Exception, match="credentials"):
        await probe.ping(pair, 1.0)
    probe.set_remote("theirs", PEER_PWD)
    task = asyncio.create_task(probe.ping(pair, 5.0))
    await asyncio.sleep(0.1)
    probe.close()
    result = await task
    assert result.rtt_ms is None and "restarted" in str(result.error)
    assert not probe.ready


# -- peer resolution and the agent's reply ------------------------------------------------


def peer_state(user: str, device: str, ip: str) -> PeerState:
    return PeerState(PeerSpec(DeviceId(user, device), IPv4Address(ip), None))


PEERS = [peer_state("alice", "laptop", "100.64.0.1"), peer_state("bob", "desk", "100.64.0.2"),
         peer_state("carol", "desk", "100.64.0.3"), peer_state("bob", "Phone", "100.64.0.5")]
ME = DeviceId("dave", "nas")


@pytest.mark.parametrize(("name", "expected"), [
    ("alice/laptop", "alice/laptop"), ("laptop", "alice/laptop"),
    ("100.64.0.2", "bob/desk"), ("Bob/Desk", "bob/desk"), ("phone", "bob/Phone"),
    (" carol/desk ", "carol/desk"),
])
def test_peer_names_as_status_shows_them(name: str, expected: str) -> None:
    assert resolve_peer(name, PEERS, ME, "100.64.0.4").name == expected


def test_unknown_ambiguous_and_own_names_say_what_to_do() -> None:
    with pytest.raises(RequestRefused, match=r"no peer 'erin' in this team; known peers: "
                       r"alice/laptop \(100.64.0.1\), bob/Phone \(100.64.0.5\), bob/desk"):
        resolve_peer("erin", PEERS, ME)
    with pytest.raises(RequestRefused, match=r"no peer '100\.64\.0\.9'"):
        resolve_peer("100.64.0.9", PEERS, ME)
    with pytest.raises(RequestRefused, match=r"several peers have a device named 'desk': "
                       r"bob/desk \(100.64.0.2\), carol/desk \(100.64.0.3\); say which"):
        resolve_peer("desk", PEERS, ME)
    with pytest.raises(RequestRefused, match="is this device"):
        resolve_peer("dave/nas", PEERS, ME)
    with pytest.raises(RequestRefused, match="is this device"):
        resolve_peer("100.64.0.4", PEERS, ME, "100.64.0.4")
    with pytest.raises(RequestRefused, match=r"none yet \(see `kbwg-agent status`\)"):
        resolve_peer("bob/desk", [], ME)


class FakeChecker:
    def __init__(self, result: ProbeResult | None) -> None:
        self.result = result
        self.timeouts: list[float] = []

    async def ping(self, timeout: float) -> ProbeResult | None:
        self.timeouts.append(timeout)
        return self.result

    def snapshot(self) -> dict[str, Any]:
        return {"path": "none", "reason": "checking 4 candidate pairs"}


class FakeSession:
    def __init__(self, checker: FakeChecker | None,
                 retired: FakeChecker | None = None) -> None:
        self.checker = checker
        self.retired = retired


class FakeNegotiator:
    def __init__(self, sessions: dict[DeviceId, FakeSession]) -> None:
        self.sessions = sessions

    def snapshot(self, peer: DeviceId) -> dict[str, Any]:
        session = self.sessions.get(peer)
        if session is None or session.checker is None:
            return {}
        return {**session.checker.snapshot(), "negotiation": "checking"}


def replies(sessions: dict[DeviceId, FakeSession] | None) -> PingReplies:
    state = AgentState(me=ME, listed=True, overlay_ip=IPv4Address("100.64.0.4"),
                       public_key="k", listen_port=PORT, interface="kbwg0",
                       backend="userspace", announced_endpoint="198.18.1.4:51820")
    state.peers = {p.spec.device: p for p in PEERS}
    negotiator = None if sessions is None else cast(Negotiator, FakeNegotiator(sessions))
    return PingReplies(state, negotiator)


async def test_agent_reply_for_a_pong_names_path_and_pair() -> None:
    pair = CandidatePair(LOCAL, REMOTE, 1)
    checker = FakeChecker(ProbeResult(pair, 12.3456, ("203.0.113.1", 51820)))
    reply = await replies({DeviceId("bob", "desk"): FakeSession(checker)}).ping(
        {"peer": "bob/desk", "ping_timeout": 2})
    assert checker.timeouts == [2.0]
    assert reply == {
        "peer": "bob/desk", "overlay_ip": "100.64.0.2", "status": "pong", "path": "direct",
        "local_candidate": "host 198.18.1.10:51820",
        "remote_candidate": "srflx 203.0.113.9:40001", "interface": "eth0",
        "endpoint": "203.0.113.9:40001", "rtt_ms": 12.346, "seen_as": "203.0.113.1:51820",
        "reason": None,
    }
    timed_out = await replies({DeviceId("bob", "desk"): FakeSession(FakeChecker(
        ProbeResult(pair, None)))}).ping({"peer": "desk", "ping_timeout": 1.5} | {
            "peer": "100.64.0.2"})
    assert timed_out["status"] == "timeout" and timed_out["rtt_ms"] is None
    assert timed_out["reason"] == "no authenticated answer within 1.5 s"


async def test_while_renegotiating_the_retired_checker_answers_the_ping() -> None:
    pair = CandidatePair(LOCAL, REMOTE, 1)
    new, retired = FakeChecker(None), FakeChecker(ProbeResult(pair, 7.0, None))
    reply = await replies({DeviceId("bob", "desk"): FakeSession(new, retired)}).ping(
        {"peer": "bob/desk"})
    assert reply["status"] == "pong" and reply["rtt_ms"] == 7.0
    assert new.timeouts and retired.timeouts, "the new checker is asked first"


async def test_agent_reply_without_a_path_says_why() -> None:
    bob = DeviceId("bob", "desk")
    no_pair = await replies({bob: FakeSession(FakeChecker(None))}).ping({"peer": "bob/desk"})
    assert no_pair["status"] == "no-path" and no_pair["path"] == "none"
    assert no_pair["reason"] == "no path yet: checking 4 candidate pairs"
    unknown = await replies({}).ping({"peer": "bob/desk"})
    assert unknown["reason"] == "no path yet: waiting for the peer's announcement"
    off = await replies(None).ping({"peer": "bob/desk"})
    assert "negotiation is off" in off["reason"]
    PEERS[1].endpoint_source = ANNOUNCED
    try:
        announced = await replies({}).ping({"peer": "bob/desk"})
    finally:
        PEERS[1].endpoint_source = None
    assert "only announces an endpoint" in announced["reason"]


@pytest.mark.parametrize("request_", [{}, {"peer": ""}, {"peer": 3},
                                      {"peer": "bob/desk", "ping_timeout": 0},
                                      {"peer": "bob/desk", "ping_timeout": "5"},
                                      {"peer": "bob/desk", "ping_timeout": 61},
                                      {"peer": "bob/desk", "ping_timeout": True}])
async def test_bad_requests_are_refused(request_: dict[str, Any]) -> None:
    with pytest.raises(RequestRefused):
        await replies({}).ping(request_)


@REAL_CLOCK
async def test_refusals_reach_the_client_verbatim(tmp_path: Path) -> None:
    server = ControlServer(tmp_path, {"ping": replies({}).ping})
    await server.start()
    try:
        with pytest.raises(ControlError) as info:
            await call(tmp_path, "ping", peer="erin", ping_timeout=1.0)
        assert str(info.value).startswith("no peer 'erin' in this team; known peers: ")
        reply = await call(tmp_path, "ping", peer="bob/desk", ping_timeout=1.0)
        assert reply["status"] == "no-path"
    finally:
        await server.close()


# -- the command's loop -------------------------------------------------------------------


def pong(path: str, rtt: float = 3.0) -> dict[str, Any]:
    local = "relay 203.0.113.5:40000" if path == "relay" else "srflx 203.0.113.1:51820"
    return {"peer": "bob/desk", "overlay_ip": "100.64.0.2", "status": "pong", "path": path,
            "local_candidate": local, "remote_candidate": "srflx 198.51.100.1:51820",
            "rtt_ms": rtt, "reason": None}


class ScriptedAgent:
    """The control socket as the command sees it: replies in order, call times noted."""

    def __init__(self, *replies: dict[str, Any] | Exception) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[str, float, float]] = []

    async def __call__(self, peer: str, timeout: float) -> dict[str, Any]:
        self.calls.append((peer, timeout, now()))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


async def ping_cmd(agent: ScriptedAgent, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_ping(PingOptions(peer="desk", **options), agent, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_pings_are_paced_and_printed_with_path_and_rtt() -> None:
    agent = ScriptedAgent(pong("relay", 14.0), pong("relay", 12.0), pong("relay", 16.0))
    start = now()
    code, out, err = await ping_cmd(agent, count=3, interval=1.0, timeout=2.0)
    assert code == 0 and err == ""
    assert [c[:2] for c in agent.calls] == [("desk", 2.0)] * 3
    assert [round(c[2] - start, 3) for c in agent.calls] == [0.0, 1.0, 2.0]
    lines = out.splitlines()
    assert lines[0] == ("pong from bob/desk (100.64.0.2) via relay (relay 203.0.113.5:40000 "
                        "-> srflx 198.51.100.1:51820) in 14.00 ms")
    assert lines[3] == "--- bob/desk: 3 pings, 3 pongs, rtt min/avg/max 12.00/14.00/16.00 ms"


async def test_until_direct_stops_at_the_first_direct_pong() -> None:
    agent = ScriptedAgent(pong("relay"), pong("direct-lan", 0.4), pong("direct"))
    code, out, _ = await ping_cmd(agent, count=10, until_direct=True)
    assert code == 0 and len(agent.calls) == 2
    assert "via LAN (srflx 203.0.113.1:51820 -> srflx 198.51.100.1:51820) in 0.40 ms" in out


async def test_until_direct_fails_after_count_when_still_relayed() -> None:
    agent = ScriptedAgent(pong("relay"))
    code, out, err = await ping_cmd(agent, count=4, until_direct=True, interval=0.5)
    assert code == 1 and len(agent.calls) == 4
    assert out.count("via relay") == 4
    assert err.strip() == ("kbwg-agent: direct connection not established after 4 pings "
                           "(path: relay)")


async def test_timeouts_and_no_path_fail_without_any_pong() -> None:
    timeout = {**pong("direct"), "status": "timeout", "rtt_ms": None,
               "reason": "no authenticated answer within 2 s"}
    no_path = {"peer": "bob/desk", "overlay_ip": "100.64.0.2", "status": "no-path",
               "path": "none", "local_candidate": None, "remote_candidate": None,
               "rtt_ms": None, "reason": "no path yet: checking 4 candidate pairs"}
    agent = ScriptedAgent(no_path, timeout)
    code, out, _ = await ping_cmd(agent, count=2, timeout=2.0)
    assert code == 1
    assert out.splitlines()[:2] == [
        "no path to bob/desk (100.64.0.2): no path yet: checking 4 candidate pairs",
        "no pong from bob/desk (100.64.0.2) via direct (srflx 203.0.113.1:51820 -> srflx "
        "198.51.100.1:51820) within 2 s (no authenticated answer within 2 s)",
    ]


async def test_slow_pings_are_followed_at_once() -> None:
    class Slow(ScriptedAgent):
        async def __call__(self, peer: str, timeout: float) -> dict[str, Any]:
            reply = await super().__call__(peer, timeout)
            await asyncio.sleep(1.5)
            return reply

    agent = Slow(pong("direct"))
    start = now()
    await ping_cmd(agent, count=3, interval=1.0)
    assert [round(c[2] - start, 3) for c in agent.calls] == [0.0, 1.5, 3.0]


async def test_agent_errors_end_the_command() -> None:
    agent = ScriptedAgent(ControlError("no peer 'desk' in this team; known peers: x"))
    code, out, err = await ping_cmd(agent, count=5)
    assert code == 1 and out == "" and len(agent.calls) == 1
    assert err == "kbwg-agent: error: no peer 'desk' in this team; known peers: x\n"


async def test_json_lines_per_ping_and_a_summary() -> None:
    agent = ScriptedAgent(pong("relay", 10.0), pong("direct", 2.0))
    code, out, _ = await ping_cmd(agent, count=5, until_direct=True, json=True)
    objects = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [o["type"] for o in objects] == ["ping", "ping", "summary"]
    assert objects[0]["seq"] == 1 and objects[0]["path"] == "relay"
    assert objects[2] == {"type": "summary", "peer": "bob/desk", "sent": 2, "pongs": 2,
                          "path": "direct", "direct": True,
                          "rtt_ms": {"min": 2.0, "avg": 6.0, "max": 10.0}, "exit": 0}


# -- the command line ---------------------------------------------------------------------


def test_arguments() -> None:
    args = cli.build_parser().parse_args(
        ["ping", "bob/desk", "-c", "3", "--timeout", "2", "--until-direct", "--json",
         "--state-dir", "/tmp/x"])
    assert (args.peer, args.count, args.timeout, args.until_direct, args.json,
            args.state_dir) == ("bob/desk", 3, 2.0, True, True, "/tmp/x")
    defaults = cli.build_parser().parse_args(["ping", "desk"])
    assert (defaults.count, defaults.timeout, defaults.interval, defaults.until_direct) == (
        10, 5.0, 1.0, False)


@REAL_CLOCK
@pytest.mark.parametrize("bad", [["-c", "0"], ["--timeout", "0"], ["--timeout", "61"],
                                 ["--interval", "-1"]])
def test_bad_arguments_are_refused(bad: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ping", "desk", "--state-dir", str(tmp_path), *bad]) == 1
    assert "-c must be at least 1" in capsys.readouterr().err


@REAL_CLOCK
def test_no_agent_running_says_how_to_start_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBWG_STATE_DIR", str(tmp_path))
    assert cli.main(["ping", "bob/desk", "-c", "1"]) == 1
    err = capsys.readouterr().err
    assert f"no agent is running with state dir {tmp_path}" in err
    assert "kbwg-agent join TEAM --state-dir DIR" in err


@REAL_CLOCK
async def test_a_waiting_ping_holds_up_no_other_request(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow_ping(_request: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"status": "pong"}

    async def status(_request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    server = ControlServer(tmp_path, {"ping": slow_ping, "status": status})
    await server.start()
    try:
        pinging = asyncio.create_task(call(tmp_path, "ping", peer="bob/desk"))
        assert await asyncio.wait_for(call(tmp_path, "status"), 5.0) == {"ok": True}
        assert not pinging.done()
        release.set()
        assert await asyncio.wait_for(pinging, 5.0) == {"status": "pong"}
    finally:
        await server.close()
