import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aioice import stun
from stun_test_server import Address, StunTestServer

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
from kbwg.negotiation.stun_client import StunClient, StunCounters, open_udp_client


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


async def _probe(server: StunTestServer, *, fresh: bool = True, classic: bool = False,
                 servers: int = 1) -> NatBehaviour:
    counters = StunCounters()

    @contextlib.asynccontextmanager
    async def fresh_client() -> AsyncIterator[StunClient]:
        async with open_udp_client("127.0.0.1", counters=counters) as (other, _):
            yield other

    async with open_udp_client("127.0.0.1", counters=counters) as (client, udp):
        answers = [await client.binding(server.address, timeout=1, rto=0.2)]
        if servers == 2:
            answers.append(await client.binding(("127.0.0.2", server.port), timeout=1))
        return await probe_nat(
            client, answers, servers_tried=servers, local_addresses={"127.0.0.1"},
            local_port=udp.local_address[1], fresh_client=fresh_client if fresh else None,
            timeout=1.2, classic=classic,
        )


@pytest.mark.parametrize("filtering", [
    ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT,
])
@pytest.mark.parametrize("mapping", [ENDPOINT_INDEPENDENT, ENDPOINT_DEPENDENT])
async def test_rfc5780_verdicts_against_a_simulated_nat(mapping: str, filtering: str) -> None:
    async with StunTestServer(mapped_ip="127.0.0.9", mapping=mapping,
                              filtering=filtering) as server:
        nat = await _probe(server)
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
    async with StunTestServer(mapped_ip="127.0.0.9",
                              filtering=ADDRESS_DEPENDENT) as server:
        nat = await _probe(server, fresh=False)
    assert nat.filtering == ADDRESS_DEPENDENT
    assert nat.mapping == ENDPOINT_INDEPENDENT


async def test_two_plain_servers_give_mapping_but_not_filtering() -> None:
    async with StunTestServer(rfc5780=False, mapping=ENDPOINT_DEPENDENT,
                              mapped_ip="127.0.0.9") as server:
        nat = await _probe(server, servers=2)
    assert nat.mapping == ENDPOINT_DEPENDENT
    assert nat.mapping_method == "two servers"
    assert nat.filtering == UNKNOWN
    assert any("RFC 5780" in n for n in nat.notes)


async def test_single_plain_server_leaves_mapping_unknown() -> None:
    async with StunTestServer(alt_ip=None) as server:
        nat = await _probe(server)
    assert nat.mapping == UNKNOWN
    assert nat.filtering == UNKNOWN
    assert nat.behind_nat is False
    # No NAT on loopback: our request to our own address comes straight back.
    assert nat.hairpin is True


async def test_blocked_and_unconfigured() -> None:
    async with open_udp_client("127.0.0.1") as (client, _):
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

    async with StunTestServer(override=same_address) as server, \
            open_udp_client("127.0.0.1") as (client, _):
        verdict, note = await probe_filtering(client, server.address, timeout=0.6)
    assert verdict == UNKNOWN
    assert note is not None and "CHANGE-REQUEST" in note


@pytest.mark.parametrize(("filtering", "expected"), [
    (ENDPOINT_INDEPENDENT, "full-cone"),
    (ADDRESS_DEPENDENT, "restricted-cone"),
    (ADDRESS_AND_PORT_DEPENDENT, "port-restricted-cone"),
])
async def test_classic_type_from_pystun3(filtering: str, expected: str) -> None:
    async with StunTestServer(mapped_ip="127.0.0.9", filtering=filtering) as server:
        kind = await asyncio.to_thread(classic_nat_type, server.address, "127.0.0.1", 0.1)
    assert kind == expected


async def test_classic_type_symmetric_and_open() -> None:
    async with StunTestServer(mapped_ip="127.0.0.9", mapping=ENDPOINT_DEPENDENT,
                              filtering=ADDRESS_AND_PORT_DEPENDENT) as server:
        assert await asyncio.to_thread(
            classic_nat_type, server.address, "127.0.0.1", 0.1) == "symmetric"
    async with StunTestServer() as server:
        assert await asyncio.to_thread(
            classic_nat_type, server.address, "127.0.0.1", 0.1) == "open-internet"


def test_classic_type_never_runs_without_a_server() -> None:
    with pytest.raises(ValueError, match="public"):
        classic_nat_type(("", 3478), "127.0.0.1", 0.1)
