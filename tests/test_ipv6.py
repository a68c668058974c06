"""IPv6 candidates without root: endpoint text, the IPv6 raw socket's filter, checksum
and parsing, host candidates, family-aware pairing, the wire form, path choice, the
owner's policy for IPv6 endpoints and routes, and two checkers reaching each other
over IPv6 while their IPv4 sits behind symmetric NATs. Addresses from 2001:db8::/32."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any, cast

import pytest
from aioice import stun
from owner_fakes import UPLINK
from test_checks import FAST, PORT, SimNet, close, connect
from test_owner_policy import Owner, _pub, assert_refused
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until

from kbwg.agent.diag import DiagOptions, Ipv6Report, os_has_ipv6, render_report, run_diag
from kbwg.agent.teamconfig import HostPort
from kbwg.core.addresses import format_endpoint, ip_family, parse_endpoint
from kbwg.negotiation.candidate_pairs import (
    CandidatePair,
    check_bases,
    form_pairs,
    unique_remotes,
)
from kbwg.negotiation.candidates import (
    Candidate,
    InterfaceAddress,
    candidate_priority,
    gather_host_candidates,
    host_address_problem,
)
from kbwg.negotiation.check_config import CheckCounters
from kbwg.negotiation.choice import PairView, choose, path_class
from kbwg.negotiation.pair_table import PairTable
from kbwg.negotiation.wire import Answer, CandidateInfo, InvalidField, Offer
from kbwg.owner.netconfig import MainRoute, choose_egress
from kbwg.owner.rawstun import (
    ACCEPT_ALL,
    BPF_JEQ_K,
    BPF_LD_H_ABS,
    BPF_LD_W_ABS,
    BPF_RET_K,
    IPV6_PKTINFO,
    BpfInsn,
    ParseError,
    RawStunSocket,
    UdpDatagram,
    build_udp,
    interface_index_of6,
    internet_checksum,
    is_usable_unicast,
    parse_udp6,
    stun_filter6,
)

pytestmark = VIRTUAL_CLOCK

A6 = "2001:db8:a::10"
B6 = "2001:db8:b::10"
OVERLAY_PEER = "100.64.0.2/32"


# -- endpoints ---------------------------------------------------------------------------


def test_endpoints_with_ipv6_round_trip() -> None:
    assert format_endpoint((A6, 51820)) == "[2001:db8:a::10]:51820"
    assert parse_endpoint("[2001:DB8:A:0::10]:51820") == (A6, 51820)
    assert parse_endpoint(format_endpoint(("2001:db8::1", 1))) == ("2001:db8::1", 1)
    assert format_endpoint(("198.51.100.7", 3478)) == "198.51.100.7:3478"
    assert ip_family(A6) == 6 and ip_family("192.0.2.1") == 4 and ip_family("x") is None


@pytest.mark.parametrize("text", [
    "2001:db8::1:51820",  # the port cannot be told from the address
    "[192.0.2.1]:51820",  # brackets are for IPv6
    "[2001:db8::1]",
    "[2001:db8::1]:0",
    "[2001:db8::1]:65536",
    "[2001:db8::g]:1",
    "[[2001:db8::1]]:1",
])
def test_bad_ipv6_endpoints_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


# -- the IPv6 raw socket -----------------------------------------------------------------


def run_bpf(program: list[BpfInsn], data: bytes) -> int:
    """Classic BPF for the absolute loads the IPv6 filter uses; out of bounds drops."""
    a = pc = 0
    while True:
        insn = program[pc]
        pc += 1
        if insn.code in (BPF_LD_H_ABS, BPF_LD_W_ABS):
            size = 2 if insn.code == BPF_LD_H_ABS else 4
            if insn.k + size > len(data):
                return 0
            a = int.from_bytes(data[insn.k : insn.k + size], "big")
        elif insn.code == BPF_JEQ_K:
            pc += insn.jt if a == insn.k else insn.jf
        elif insn.code == BPF_RET_K:
            return insn.k
        else:
            raise AssertionError(f"unexpected opcode {insn.code:#x}")


def stun_request() -> bytes:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.add_fingerprint()
    return bytes(message)


def test_ipv6_filter_passes_only_stun_to_the_port() -> None:
    program = stun_filter6(PORT)
    request = stun_request()
    src, dst = (B6, 3478), (A6, PORT)
    assert run_bpf(program, build_udp(src, dst, request)) == ACCEPT_ALL
    rejected = {
        "other port": build_udp(src, (A6, PORT + 1), request),
        "WireGuard": build_udp(src, dst, b"\x01\x00\x00\x00" + bytes(144)),
        "short": build_udp(src, dst, request[:7]),
        "header only": build_udp(src, dst, b""),
        "empty": b"",
    }
    for what, data in rejected.items():
        assert run_bpf(program, data) == 0, what
    with pytest.raises(ValueError):
        stun_filter6(0)


def test_ipv6_udp_checksum_covers_the_pseudo_header() -> None:
    segment = build_udp((A6, PORT), (B6, 3478), stun_request())
    pseudo = (socket.inet_pton(socket.AF_INET6, A6) + socket.inet_pton(socket.AF_INET6, B6)
              + struct.pack("!I3xB", len(segment), 17))
    assert internet_checksum(pseudo + segment) == 0
    # Another source address makes it wrong: the checksum is IPv6's, not IPv4's.
    other = socket.inet_pton(socket.AF_INET6, "2001:db8:a::11")
    assert internet_checksum(other + pseudo[16:] + segment) != 0


def test_parse_udp6() -> None:
    request = stun_request()
    segment = build_udp((B6, 3478), (A6, PORT), request)
    assert parse_udp6(segment, B6, A6) == UdpDatagram((B6, 3478), (A6, PORT), request)
    for cut, reason in ((4, "truncated"), (len(segment) - 1, "truncated")):
        with pytest.raises(ParseError) as info:
            parse_udp6(segment[:cut], B6, A6)
        assert info.value.reason == reason
    with pytest.raises(ParseError, match="UDP length 3"):
        parse_udp6(segment[:4] + b"\x00\x03" + segment[6:], B6, A6)


@REAL_CLOCK
async def test_ipv6_receive_path_needs_the_destination_address() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    got: list[UdpDatagram] = []
    raw = RawStunSocket(ours, PORT, got.append)
    try:
        request = stun_request()
        segment = build_udp((B6, 3478), (A6, PORT), request)
        pktinfo = socket.inet_pton(socket.AF_INET6, A6) + struct.pack("=I", 2)
        raw._handle6(segment, [(socket.IPPROTO_IPV6, IPV6_PKTINFO, pktinfo)], B6)
        raw._handle6(segment, [], B6)
        raw._handle6(build_udp((B6, 3478), (A6, PORT), b"not stun at all"),
                     [(socket.IPPROTO_IPV6, IPV6_PKTINFO, pktinfo)], B6)
        assert got == [UdpDatagram((B6, 3478), (A6, PORT), request)]
        c = raw.counters
        assert (c.received, c.delivered, c.malformed, c.unfiltered) == (3, 1, 1, 1)
        assert not raw.ipv6
        # Without an IPv6 socket, IPv6 cannot be sent, and families never mix.
        with pytest.raises(Exception, match="no IPv6"):
            raw.send(request, (B6, 3478))
        with pytest.raises(Exception, match="differ in family"):
            raw.send(request, ("192.0.2.1", 3478), source=A6)
        assert c.send_errors == 2
    finally:
        raw.close()
        theirs.close()


def test_is_usable_unicast_for_ipv6() -> None:
    assert is_usable_unicast(A6) and is_usable_unicast("fd00::1")
    for bad in ("fe80::1", "ff02::1", "::", "::ffff:192.0.2.1", "fe80::1%eth0", "nonsense"):
        assert not is_usable_unicast(bad), bad


def test_interface_index_of6_reads_the_kernel_table(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000a00000000000000000010 07 40 00 80     eth0\n")
    assert interface_index_of6(A6, str(table)) == 7
    assert interface_index_of6(B6, str(table)) == 0
    assert interface_index_of6(A6, str(tmp_path / "missing")) == 0


# -- host candidates ---------------------------------------------------------------------


def addr(address: str, interface: str = "eth0", index: int = 2,
         default_route: bool = True) -> InterfaceAddress:
    return InterfaceAddress(interface, index, address, 64, True, default_route)


def test_ipv6_host_addresses_are_candidates_unless_unusable() -> None:
    for usable in (A6, "fd12:3456::1", "2001:db8::1"):
        assert host_address_problem(addr(usable), ()) is None, usable
    problems = {
        "fe80::1": "link-local", "::1": "loopback", "ff02::1": "not unicast",
        "::ffff:192.0.2.1": "IPv4-mapped",
    }
    for address, problem in problems.items():
        assert host_address_problem(addr(address), ()) == problem


def test_host_candidates_are_dual_stack_ipv4_first_per_interface() -> None:
    ipv4 = InterfaceAddress("eth0", 2, "198.18.1.10", 24, True, True)
    entries = [addr("fe80::1"), addr(A6), ipv4,
               addr("2001:db8:c::1", "eth1", 3, default_route=False)]
    cands = gather_host_candidates(PORT, (), (), addresses=entries)
    assert [c.address for c in cands] == ["198.18.1.10", A6, "2001:db8:c::1"]
    assert len({c.priority for c in cands}) == 3
    # Each knows its interface address's subnet (whether a LAN pair may answer).
    assert [c.prefixlen for c in cands] == [24, 64, 64]
    assert cands[0].on_link("198.18.1.77") is True
    assert cands[0].on_link("198.18.2.10") is False
    assert cand("srflx", "203.0.113.9").on_link("203.0.113.10") is None


# -- pairing ---------------------------------------------------------------------------


def cand(type_: str, address: str, port: int = PORT, rank: int = 0) -> Candidate:
    return Candidate(type_, address, port, "eth0", candidate_priority(type_, 65535 - rank),
                     "test")


def info(type_: str, ip: str, port: int = PORT) -> CandidateInfo:
    return CandidateInfo(type_, ip, port, candidate_priority(type_), f"{type_}{port}")


def test_pairs_join_only_one_family() -> None:
    bases = check_bases([cand("host", "198.18.1.10"), cand("host", A6, rank=1),
                         cand("relay", "203.0.113.5", 50000), cand("host", "fe80::1")])
    assert [b.address for b in bases] == ["198.18.1.10", A6, "203.0.113.5"]
    remotes = [info("host", "198.18.2.10"), info("srflx", "198.51.100.20"),
               info("host", B6), info("host", "fe80::2"), info("relay", "203.0.113.6", 50001)]
    assert {r.ip for r in unique_remotes(remotes)} == {
        "198.18.2.10", "198.51.100.20", B6, "203.0.113.6"}
    pairs = form_pairs(bases, remotes, controlling=True)
    assert pairs, "no pairs"
    for pair in pairs:
        assert ip_family(pair.local.address) == ip_family(pair.remote.ip), pair.describe()
    v6 = [p for p in pairs if ip_family(p.remote.ip) == 6]
    assert [(p.local.address, p.remote.ip) for p in v6] == [(A6, B6)]
    # Nothing pairs our relay (an IPv4 allocation) with the peer's IPv6 address.
    assert not any(p.local.type == "relay" and p.remote.ip == B6 for p in pairs)
    (pair,) = v6
    assert pair.key == "[2001:db8:a::10]:51820>[2001:db8:b::10]:51820"
    assert pair.describe() == "host [2001:db8:a::10]:51820 -> host [2001:db8:b::10]:51820"
    assert pair.path == "direct"


def test_a_check_from_an_unknown_local_address_gets_a_base_of_its_family() -> None:
    table = PairTable([cand("host", "198.18.1.10"), cand("host", A6, rank=1)], FAST,
                      CheckCounters(), "t")
    base = table.base_for(None, (B6, PORT), None)
    assert base is not None and base.address == A6
    base = table.base_for(None, ("198.51.100.20", PORT), None)
    assert base is not None and base.address == "198.18.1.10"
    only_v4 = PairTable([cand("host", "198.18.1.10")], FAST, CheckCounters(), "t")
    assert only_v4.base_for(None, (B6, PORT), None) is None


# -- the wire ------------------------------------------------------------------------------


def test_offers_carry_ipv6_candidates_apart_for_older_agents() -> None:
    cands = [info("host", "198.18.1.10"), info("host", A6)]
    offer = Offer("ufragA", "p" * 22, 7, cands, PORT)
    wire = offer.to_wire()
    # An agent from before IPv6 reads "candidates" only, and refuses IPv6 in it.
    assert [c["ip"] for c in wire["candidates"]] == ["198.18.1.10"]
    assert [c["ip"] for c in wire["candidates6"]] == [A6]
    assert Offer.from_wire(wire) == offer
    answer = Answer("ufragB", "q" * 22, [info("host", "198.18.2.10")])
    assert "candidates6" not in answer.to_wire()
    assert Answer.from_wire(answer.to_wire()) == answer
    assert Answer.from_wire({**answer.to_wire(), "candidates6": [info("host", B6).to_wire()]}
                            ).candidates[-1].ip == B6
    with pytest.raises(InvalidField, match="canonical"):
        info("host", "2001:DB8::1")
    with pytest.raises(InvalidField):
        Answer.from_wire({**answer.to_wire(), "candidates6": "nope"})


# -- path choice ---------------------------------------------------------------------------


def view(key: str, local: tuple[str, str], remote: tuple[str, str], rtt: float) -> PairView:
    return PairView(key=key, local_type=local[0], local_address=local[1],
                    remote_type=remote[0], remote_address=remote[1], rtt_ms=rtt)


def test_routed_ipv6_host_pair_is_direct_not_lan() -> None:
    assert path_class("host", "host", A6, B6) == "direct"
    assert path_class("host", "host", A6, "2001:db8:a::11") == "direct-lan"  # one /64
    assert path_class("host", "host", "198.18.1.10", "198.51.100.20") == "direct-lan"
    assert path_class("relay", "host", A6, B6) == "relay"


def test_a_direct_ipv6_pair_beats_any_relayed_one() -> None:
    v6 = view("v6", ("host", f"[{A6}]:{PORT}"), ("host", f"[{B6}]:{PORT}"), rtt=40.0)
    relay = view("relay", ("relay", "203.0.113.5:50000"), ("srflx", "198.51.100.2:4000"),
                 rtt=2.0)
    best, reason = choose(None, [relay, v6])
    assert best == v6
    assert reason == "direct over IPv6, no NAT between (40.0 ms)"
    # Already relayed: the IPv6 pair takes over as soon as it answers.
    best, reason = choose(relay, [relay, v6])
    assert best == v6 and reason.startswith("switched from relay")


async def test_checkers_reach_each_other_over_ipv6_behind_symmetric_ipv4_nats() -> None:
    """Each side: IPv4 behind a symmetric NAT, global IPv6 without NAT. The checks over
    IPv4 find nothing direct; the IPv6 host pair answers and is chosen."""
    net = SimNet()
    nat_a = net.nat("203.0.113.1", symmetric=True)
    nat_b = net.nat("198.51.100.1", symmetric=True)
    a, b = net.node("a"), net.node("b")
    ia = a.host("198.18.1.10", lan="home-a", nat=nat_a, delay=0.003)
    ib = b.host("198.18.2.10", lan="home-b", nat=nat_b, delay=0.003)
    a.host(A6, delay=0.004, rank=1)
    b.host(B6, delay=0.004, rank=1)
    a.srflx(("203.0.113.1", 40000), ia)
    b.srflx(("198.51.100.1", 40000), ib)
    await connect(a, b)
    try:
        await advance_until(lambda: a.c.state == "connected" and b.c.state == "connected")
        await advance_until(lambda: (b.c.selected is not None and a.c.selected is not None
                                     and a.c.selected.remote.ip == B6))
        snap = b.c.snapshot()
        assert snap["path"] == "direct"
        assert snap["local_candidate"] == f"host [{B6}]:{PORT}"
        assert snap["remote_candidate"] == f"host [{A6}]:{PORT}"
        assert snap["rtt_ms"] == pytest.approx(16.0)
        assert a.c.selected is not None and a.c.selected.remote_address == (B6, PORT)
        assert isinstance(a.c.selected, CandidatePair)
    finally:
        close(a, b)


# -- the owner's policy --------------------------------------------------------------------


async def test_owner_accepts_ipv6_endpoints_where_it_accepts_ipv4_ones() -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    for endpoint in (f"[{B6}]:51820", "[fd00::2]:51820"):
        reply = await owner.call("set_peer", public_key=_pub(), endpoint=endpoint,
                                 allowed_ips=[], keepalive=25)
        assert reply["ok"], (endpoint, reply)
    stats = await owner.call("stats")
    assert {p["endpoint"] for p in stats["peers"]} == {f"[{B6}]:51820", "[fd00::2]:51820"}


@pytest.mark.parametrize(("endpoint", "needle"), [
    ("[::]:51820", "unspecified or multicast"),
    ("[ff02::1]:51820", "unspecified or multicast"),
    ("[fe80::1]:51820", "link-local"),
    ("[::ffff:100.64.0.2]:51820", "inside the overlay"),
])
async def test_owner_refuses_ipv6_endpoints_in_the_spirit_of_ipv4(endpoint: str,
                                                                   needle: str) -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    reply = await owner.call("set_peer", public_key=_pub(), endpoint=endpoint,
                             allowed_ips=[OVERLAY_PEER], keepalive=25)
    assert_refused(reply, needle)
    assert await owner.refusals() == {"endpoint": 1}


async def test_owner_adds_an_ipv6_host_route_to_a_peer_endpoint_only() -> None:
    owner = Owner()
    await owner.device_with_peer(f"[{B6}]:51820")
    added = await owner.call("add_route", destination=f"{B6}/128", ifname=UPLINK)
    assert added["ok"], added
    assert [r.destination for r in owner.net.added_routes] == [f"{B6}/128"]
    refusals: dict[str, Any] = {
        "2001:db8:b::11/128": "not the endpoint of a current peer",
        "::1/128": "loopback",
        "ff02::1/128": "multicast",
        "fe80::1/128": "link-local",
        "::ffff:198.18.0.2/128": "IPv4-mapped",
    }
    for destination, needle in refusals.items():
        assert_refused(await owner.call("add_route", destination=destination, ifname=UPLINK),
                       needle)
    assert len(owner.net.added_routes) == 1


def test_egress_choice_for_ipv6_routes() -> None:
    routes = [
        MainRoute(ipaddress.ip_network("::/0"), "eth0", "fe80::1", 1024, True),
        MainRoute(ipaddress.ip_network("2001:db8:b::/48"), "eth1", None, 256, True),
        MainRoute(ipaddress.ip_network("0.0.0.0/0"), "eth2", "192.0.2.1", 0, True),
    ]
    dst = ipaddress.ip_address(B6)
    egress = choose_egress(routes, dst)
    assert egress is not None and egress.ifname == "eth1"
    egress = choose_egress(routes, dst, via_ifname="eth0")
    assert egress is not None and egress.gateway == "fe80::1"
    assert choose_egress(routes, dst, via_ifname="eth2") is None


# -- diag ----------------------------------------------------------------------------------


class _Ipv6StunServer(asyncio.DatagramProtocol):
    """Answers Binding requests with the source address, on [::1]."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        request = stun.parse_message(data)
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        response.add_fingerprint()
        self.transport.sendto(bytes(response), addr)


@REAL_CLOCK
async def test_diag_reports_ipv6_like_netcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBWG_PORTMAP", "off")  # no gateway to ask here
    if not os_has_ipv6():
        pytest.skip("this host has no IPv6 loopback")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Ipv6StunServer, local_addr=("::1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        options = DiagOptions(stun=[HostPort("::1", port)], timeout=2.0, classic=False)
        report = await run_diag(options)
    finally:
        transport.close()
    data = report.to_json()
    assert data["ipv6"]["state"] == "yes"
    assert data["ipv6"]["address"] == f"[::1]:{report.local_port}"
    assert data["ipv6"]["os_support"] is True
    assert [s["mapped"] for s in data["ipv6"]["servers"]] == [f"[::1]:{report.local_port}"]
    # UDP works (over IPv6), though no IPv4 server answered.
    assert data["udp"] is True and data["mapped"] is None
    assert "over IPv6" in " ".join(data["notes"])
    assert f"IPv6            yes, [::1]:{report.local_port}" in render_report(data)
    # Without a server to answer over IPv6, the OS's support is all that can be said.
    none = Ipv6Report(os_support=True)
    assert none.state == "no, but OS has support" and Ipv6Report().state == "no"
    assert render_report({**data, "ipv6": none.to_json()}).count(
        "no, but OS has support (no STUN server with an IPv6 address to test it)") == 1


async def test_the_announced_endpoint_stays_ipv4() -> None:
    """`#announce` carries the prototype's IPv4 'ip:port' even where IPv6 leads."""
    from kbwg.agent import presence
    from kbwg.agent.teamconfig import TeamConfig

    async def addresses() -> list[InterfaceAddress]:
        return [addr(A6, "eth0", 2), addr("198.18.1.10", "eth1", 3, default_route=False)]

    assert await presence.announce_target(None, TeamConfig(), addresses) == ("198.18.1.10", 0)
