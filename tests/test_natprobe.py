"""NAT behaviour probes against the STUN test server's simulated NAT.

The RFC 5780 probes run over an in-memory network (memory_udp.py) on a virtual clock:
their verdicts come from timeouts, which are exact there. pystun3 (a thread with
blocking sockets) keeps real loopback sockets and the real clock.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import pytest
from aioice import stun
from memory_udp import MemoryNet, memory_client, serve_in_memory
from stun_test_server import Address, StunTestServer
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, now

from kbwg.negotiation.natprobe import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    UNKNOWN,
    NatBehaviour,
    classic_nat_type,
    filtering_verdict,
    mapping_verdict,
    probe_filtering,
    probe_nat,
)
from kbwg.negotiation.stun_client import StunClient, StunCounters

pytestmark = VIRTUAL_CLOCK
CLIENT_IP = "192.0.2.10"
TIMEOUT = 3.0  # probe_nat's default budget
# pystun3's wait per attempt (4 attempts per test): real time, so not too tight for a
# loaded machine; each expected silence costs 4 of them.
PYSTUN_TIMEOUT = 0.25


def test_mapping_verdict() -> None:
    a, b = ("198.51.100.1", 4000), ("198.51.100.1", 4001)
    assert mapping_verdict([a, a]) == ENDPOINT_INDEPENDENT
    assert mapping_verdict([a, a, b]) == ENDPOINT_DEPENDENT
    assert mapping_verdict([a]) == UNKNOWN
    assert mapping_verdict([]) == UNKNOWN


def test_filtering_verdict() -> None:
    assert filtering_verdict(True, None) == ENDPOINT_INDEPENDENT
    assert filtering_verdict(False, True) == ADDRESS_DEPENDENT
    assert filtering_verdict(False, False) == ADDRESS_AND_PORT_DEPENDENT
    assert filtering_verdict(None, None) == UNKNOWN
    assert filtering_verdict(False, None) == UNKNOWN


async def _probe(server: StunTestServer, *, fresh: bool = True,
                 servers: int = 1) -> NatBehaviour:
    """probe_nat from a client on the in-memory network, after its first Bindings."""
    net = MemoryNet(delay=0.005)
    serve_in_memory(server, net)
    counters = StunCounters()
    ports = itertools.count(40000)

    @contextlib.asynccontextmanager
    async def fresh_client() -> AsyncIterator[StunClient]:
        other, endpoint = memory_client(net, (CLIENT_IP, next(ports)), counters)
        try:
            yield other
        finally:
            endpoint.close()

    client, endpoint = memory_client(net, (CLIENT_IP, next(ports)), counters)
    answers = [await client.binding(server.address, timeout=1, rto=0.2)]
    if servers == 2:
        answers.append(await client.binding(("127.0.0.2", server.port), timeout=1))
    start = now()
    report = await probe_nat(
        client, answers, servers_tried=servers, local_addresses={CLIENT_IP},
        local_port=endpoint.local_address[1], fresh_client=fresh_client if fresh else None,
        timeout=TIMEOUT, classic=False,
    )
    # Timeouts are the verdicts, so the probe must keep to its budget (plus one RTT).
    assert now() - start <= TIMEOUT + 2 * net.delay
    return report


@pytest.mark.parametrize("filtering", [
    ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT,
])
@pytest.mark.parametrize("mapping", [ENDPOINT_INDEPENDENT, ENDPOINT_DEPENDENT])
async def test_rfc5780_verdicts_against_a_simulated_nat(mapping: str, filtering: str) -> None:
    nat = await _probe(StunTestServer(mapped_ip="127.0.0.9", mapping=mapping,
                                      filtering=filtering))
    assert nat.udp is True
    assert nat.behind_nat is True
    assert nat.mapping == mapping
    assert nat.mapping_method == "rfc5780"
    assert nat.filtering == filtering
    # Nothing listens at the simulated public address.
    assert nat.hairpin is False


async def test_filtering_on_the_mapping_socket_runs_first() -> None:
    # Without a fresh socket the filtering test must still not be fooled by the
    # mapping test's request to the other IP.
    nat = await _probe(StunTestServer(mapped_ip="127.0.0.9", filtering=ADDRESS_DEPENDENT),
                       fresh=False)
    assert nat.filtering == ADDRESS_DEPENDENT
    assert nat.mapping == ENDPOINT_INDEPENDENT


async def test_two_plain_servers_give_mapping_but_not_filtering() -> None:
    nat = await _probe(StunTestServer(rfc5780=False, mapping=ENDPOINT_DEPENDENT,
                                      mapped_ip="127.0.0.9"), servers=2)
    assert nat.mapping == ENDPOINT_DEPENDENT
    assert nat.mapping_method == "two servers"
    assert nat.filtering == UNKNOWN
    assert any("RFC 5780" in n for n in nat.notes)


async def test_single_plain_server_leaves_mapping_unknown() -> None:
    nat = await _probe(StunTestServer(alt_ip=None))
    assert nat.mapping == UNKNOWN
    assert nat.filtering == UNKNOWN
    assert nat.behind_nat is False
    # No NAT: our request to our own address comes straight back.
    assert nat.hairpin is True


async def test_blocked_and_unconfigured() -> None:
    client, _ = memory_client(MemoryNet(), (CLIENT_IP, 40000))
    blocked = await probe_nat(client, [], servers_tried=2, local_addresses=set(),
                              local_port=1)
    none = await probe_nat(client, [], servers_tried=0, local_addresses=set(),
                           local_port=1)
    assert blocked.udp is False and blocked.mapping == UNKNOWN
    assert none.udp is None and none.notes == ["no STUN server configured"]


async def test_server_ignoring_change_request_gives_unknown_filtering() -> None:
    def same_address(request: stun.Message, client: Address, _local: Address) -> list[bytes]:
        # Claims RFC 5780 (OTHER-ADDRESS) but answers CHANGE-REQUEST from where it was asked.
        message = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                               transaction_id=request.transaction_id)
        message.attributes["XOR-MAPPED-ADDRESS"] = client
        message.attributes["OTHER-ADDRESS"] = ("127.0.0.2", 3479)
        return [bytes(message)]

    net = MemoryNet()
    server = serve_in_memory(StunTestServer(override=same_address), net)
    client, _ = memory_client(net, (CLIENT_IP, 40000))
    verdict, note = await probe_filtering(client, server.address, timeout=0.6)
    assert verdict == UNKNOWN
    assert note is not None and "CHANGE-REQUEST" in note


@REAL_CLOCK
@pytest.mark.parametrize(("filtering", "expected"), [
    (ENDPOINT_INDEPENDENT, "full-cone"),
    (ADDRESS_DEPENDENT, "restricted-cone"),
    (ADDRESS_AND_PORT_DEPENDENT, "port-restricted-cone"),
])
async def test_classic_type_from_pystun3(filtering: str, expected: str) -> None:
    async with StunTestServer(mapped_ip="127.0.0.9", filtering=filtering) as server:
        kind = await asyncio.to_thread(classic_nat_type, server.address, "127.0.0.1",
                                       PYSTUN_TIMEOUT)
    assert kind == expected


@REAL_CLOCK
async def test_classic_type_symmetric_and_open() -> None:
    async with StunTestServer(mapped_ip="127.0.0.9", mapping=ENDPOINT_DEPENDENT,
                              filtering=ADDRESS_AND_PORT_DEPENDENT) as server:
        assert await asyncio.to_thread(
            classic_nat_type, server.address, "127.0.0.1", PYSTUN_TIMEOUT) == "symmetric"
    async with StunTestServer() as server:
        assert await asyncio.to_thread(
            classic_nat_type, server.address, "127.0.0.1", PYSTUN_TIMEOUT) == "open-internet"


def test_classic_type_never_runs_without_a_server() -> None:
    with pytest.raises(ValueError, match="public"):
        classic_nat_type(("", 3478), "127.0.0.1", 0.1)
