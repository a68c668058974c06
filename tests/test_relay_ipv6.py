"""The relay over IPv6 on loopback (::1): --listen6, REQUESTED-ADDRESS-FAMILY (RFC 8656
7.1), IPv6 relayed addresses and peers, 440/443, malformed family attributes; and the
client side (kbwg.turn.family) allocating IPv6 through aioice."""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import UDP_TRANSPORT, TurnClientUdpProtocol
from test_relay_protocol import SECRET, Client, Endpoint, _config, _Queue, running

from kbwg.agent.relay_paths import RelayPaths
from kbwg.agent.teamconfig import RelayConfig
from kbwg.core.turnrest import rest_password, rest_username
from kbwg.relay import main as relay_main
from kbwg.relay.config import ServerConfig
from kbwg.relay.limits import parse_networks
from kbwg.turn import family

ALLOW = parse_networks(["127.0.0.0/8", "::1/128"])


def _config6(**overrides: object) -> ServerConfig:
    return _config(listen6=("::1", 0), allow_peers=ALLOW, **overrides)


async def _client(server_address: tuple[str, int], host: str) -> Client:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Queue, local_addr=(host, 0),
        family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    client = Client(transport, protocol)
    client.server = server_address
    await client.login(rest_username("alice", 600))
    return client


async def _peer6() -> Endpoint:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Queue, local_addr=("::1", 0), family=socket.AF_INET6)
    return Endpoint(transport, protocol)


def _allocate(raw: bytes) -> family.RawMessage:
    return family.RawMessage(stun.Method.ALLOCATE, stun.Class.REQUEST, raw=raw,
                             attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT})


async def _channel_data_round_trip(client: Client, peer: Endpoint) -> None:
    bound = await client.turn(stun.Method.CHANNEL_BIND, **{
        "CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": peer.address})
    assert bound.message_class == stun.Class.RESPONSE, bound
    client.send(struct.pack("!HH", 0x4001, 5) + b"wg-in" + b"\0\0\0", client.server)
    data, relayed = await peer.receive()
    assert data == b"wg-in"
    peer.send(b"wg-reply", relayed)
    raw, source = await client.receive()
    assert raw == struct.pack("!HH", 0x4001, 8) + b"wg-reply"
    assert source[:2] == client.server


async def test_ipv6_client_gets_an_ipv6_relayed_address_and_data_flows() -> None:
    async with running(_config6()) as server:
        assert server.address6 is not None and server.address6[0] == "::1"
        client = await _client(server.address6, "::1")
        answer = await client.request(_allocate(family.family_attribute(family.IPV6)))
        assert answer.message_class == stun.Class.RESPONSE, answer
        relayed = answer.attributes["XOR-RELAYED-ADDRESS"]
        assert relayed[0] == "::1" and relayed[1] > 0
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.address
        peer = await _peer6()
        await _channel_data_round_trip(client, peer)
        # Send and Data indications too.
        peer2 = await _peer6()
        granted = await client.turn(stun.Method.CREATE_PERMISSION,
                                    **{"XOR-PEER-ADDRESS": peer2.address})
        assert granted.message_class == stun.Class.RESPONSE, granted
        client.send(bytes(stun.Message(stun.Method.SEND, stun.Class.INDICATION, attributes={
            "XOR-PEER-ADDRESS": peer2.address, "DATA": b"hello v6"})), client.server)
        data, source = await peer2.receive()
        assert data == b"hello v6" and source[:2] == tuple(relayed)
        for endpoint in (client, peer, peer2):
            endpoint.close()
    assert server.counters.to_peer_packets == 2 and server.counters.to_client_packets == 1


async def test_ipv6_client_without_the_attribute_gets_ipv4() -> None:
    """RFC 8656 7.1: the default family is IPv4, whatever the path to the relay."""
    async with running(_config6()) as server:
        assert server.address6 is not None
        client = await _client(server.address6, "::1")
        answer = await client.allocate()
        client.close()
    assert answer.attributes["XOR-RELAYED-ADDRESS"][0] == "127.0.0.1"


async def test_ipv4_client_asking_for_ipv6_relays_to_ipv6_peers() -> None:
    async with running(_config(relay_ip6="::1", allow_peers=ALLOW)) as server:
        assert server.address6 is None
        client = await _client(server.address, "127.0.0.1")
        answer = await client.request(_allocate(family.family_attribute(family.IPV6)))
        assert answer.attributes["XOR-RELAYED-ADDRESS"][0] == "::1", answer
        peer = await _peer6()
        await _channel_data_round_trip(client, peer)
        client.close()
        peer.close()


async def test_ipv6_unsupported_is_440_and_ipv4_still_allocates() -> None:
    async with running() as server:  # IPv4 only
        client = await _client(server.address, "127.0.0.1")
        refused = await client.request(_allocate(family.family_attribute(family.IPV6)))
        explicit4 = await client.request(_allocate(family.family_attribute(family.IPV4)))
        client.close()
    assert refused.error_code == 440
    assert explicit4.attributes["XOR-RELAYED-ADDRESS"][0] == "127.0.0.1", explicit4
    assert server.counters.address_family == 1
    assert server.counters.allocations_created == 1


@pytest.mark.parametrize("value", [b"\x02", b"\x03\0\0\0", b"\x00\0\0\0", b"\x02\0\0\0\0",
                                   b""])
async def test_malformed_family_is_400_and_the_relay_keeps_serving(value: bytes) -> None:
    async with running(_config6()) as server:
        assert server.address6 is not None
        client = await _client(server.address6, "::1")
        bad = await client.request(_allocate(family.raw_attribute(
            family.REQUESTED_ADDRESS_FAMILY, value)))
        good = await client.request(_allocate(family.family_attribute(family.IPV6)))
        client.close()
    assert bad.error_code == 400
    assert good.attributes["XOR-RELAYED-ADDRESS"][0] == "::1", good
    assert server.counters.handler_errors == 0


async def test_peer_of_the_other_family_and_refresh_of_the_other_family_are_443() -> None:
    async with running(_config6()) as server:
        assert server.address6 is not None
        client = await _client(server.address6, "::1")
        answer = await client.request(_allocate(family.family_attribute(family.IPV6)))
        assert answer.message_class == stun.Class.RESPONSE, answer
        v4_peer = await client.turn(stun.Method.CREATE_PERMISSION,
                                    **{"XOR-PEER-ADDRESS": ("127.0.0.1", 9)})
        v4_channel = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": ("127.0.0.1", 9)})
        refresh4 = await client.request(family.RawMessage(
            stun.Method.REFRESH, stun.Class.REQUEST, raw=family.family_attribute(family.IPV4),
            attributes={"LIFETIME": 600}))
        refresh6 = await client.request(family.RawMessage(
            stun.Method.REFRESH, stun.Class.REQUEST, raw=family.family_attribute(family.IPV6),
            attributes={"LIFETIME": 600}))
        client.close()
    assert v4_peer.error_code == 443 and v4_channel.error_code == 443
    assert refresh4.error_code == 443
    assert refresh6.message_class == stun.Class.RESPONSE, refresh6


async def test_ipv6_peers_follow_the_default_deny_policy() -> None:
    """Loopback ::1 and unique-local space refused unless allowed; the documentation
    range 2001:db8::/32 relayable; the relay's own IPv6 address refused."""
    async with running(_config(listen6=("::1", 0),
                               relay_ip6="2001:DB8:0::7")) as server:
        policy = server.table.policy
        assert policy.refusal("::1") is not None
        assert policy.refusal("fd00::1") is not None
        assert policy.refusal("2001:db8::1") is None
        assert policy.refusal("2001:db8::7") == "the relay's own address"


def test_cli_parses_ipv6_listen_and_relay_address() -> None:
    parser = argparse.ArgumentParser()
    relay_main.add_arguments(parser)
    assert relay_main.parse_address6("[2001:db8::1]:3479") == ("2001:db8::1", 3479)
    assert relay_main.parse_address6("[::1]") == ("::1", 3478)
    assert relay_main.parse_address6("2001:db8::1") == ("2001:db8::1", 3478)
    for bad in ("[2001:db8::1]3478", "192.0.2.1:3478", "[2001:db8::1]:99999", "[nope]:1",
                "[2001:db8::1"):
        with pytest.raises(ValueError):
            relay_main.parse_address6(bad)
    with pytest.raises(ValueError):
        relay_main.parse_ip6("192.0.2.1")


def test_wildcard_ipv6_listen_needs_relay_ip6(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    parser = argparse.ArgumentParser()
    relay_main.add_arguments(parser)
    base = ["--listen", "192.0.2.1:3478", "--secret-file", str(secret)]
    with pytest.raises(ValueError, match="--relay-ip6"):
        relay_main.build_config(parser.parse_args([*base, "--listen6", "[::]:3478"]))
    config = relay_main.build_config(parser.parse_args(
        [*base, "--listen6", "[::]:3478", "--relay-ip6", "2001:db8::1"]))
    assert config.listen6 == ("::", 3478) and config.relayed_ip6 == "2001:db8::1"
    assert relay_main.build_config(parser.parse_args(base)).relayed_ip6 is None


# --- the client side: aioice with kbwg.turn.family ---

class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))


async def _aioice_client(server: tuple[str, int]) -> tuple[
        asyncio.DatagramTransport, TurnClientUdpProtocol]:
    username = rest_username("bob", 600)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(server, username, rest_password(SECRET, username),
                                      600, 240),
        remote_addr=server, family=socket.AF_INET6 if ":" in server[0] else socket.AF_INET)
    return transport, protocol


async def test_aioice_client_allocates_ipv6_over_ipv6_and_relays() -> None:
    async with running(_config6()) as server:
        assert server.address6 is not None
        transport, protocol = await _aioice_client(server.address6)
        try:
            relayed = await asyncio.wait_for(family.allocate(protocol, ipv6=True), 5)
            assert relayed[0] == "::1"
            collect = _Collect()
            protocol.receiver = collect
            peer = await _peer6()
            await protocol.send_data(b"through v6", peer.address)
            data, source = await peer.receive(5)
            assert data == b"through v6" and source[:2] == relayed
            peer.send(b"back", source[:2])
            back, sender = await asyncio.wait_for(collect.queue.get(), 5)
            assert back == b"back" and sender == peer.address
            peer.close()
            await protocol.delete()
        finally:
            transport.close()


async def test_aioice_client_ipv6_from_a_relay_without_it_fails_with_440() -> None:
    async with running() as server:
        transport, protocol = await _aioice_client(server.address)
        try:
            with pytest.raises(stun.TransactionFailed) as failed:
                await asyncio.wait_for(family.allocate(protocol, ipv6=True), 5)
            assert failed.value.response.error_code == 440
            relayed = await asyncio.wait_for(family.allocate(protocol, ipv6=False), 5)
            assert relayed[0] == "127.0.0.1"
            await protocol.delete()
        finally:
            transport.close()


# --- the agent: a relayed candidate per family ---

async def test_agent_offers_an_ipv6_relay_candidate_beside_the_ipv4_one() -> None:
    async with running(_config6()) as server:
        port = server.address[1]
        relays = [RelayConfig(f"turn:127.0.0.1:{port}", "127.0.0.1", port, SECRET)]
        paths = RelayPaths("alice", 51820, lambda *_: None, lambda _a: None)
        try:
            await paths.ensure(relays, timeout=5)
            candidates = sorted(c.address for c in paths.candidates())
            assert candidates == ["127.0.0.1", "::1"]
            assert {r["relayed"][:5] for r in paths.to_json()} == {"127.0", "[::1]"}
            await paths.ensure(relays, timeout=5)  # nothing missing: no third one
            assert len(server.table.allocations) == 2
        finally:
            await paths.close()


async def test_agent_asks_a_relay_without_ipv6_once() -> None:
    async with running() as server:
        port = server.address[1]
        relays = [RelayConfig(f"turn:127.0.0.1:{port}", "127.0.0.1", port, SECRET)]
        paths = RelayPaths("alice", 51820, lambda *_: None, lambda _a: None)
        try:
            await paths.ensure(relays, timeout=5)
            assert [c.address for c in paths.candidates()] == ["127.0.0.1"]
            assert paths.no_ipv6 == {relays[0].url}
            for allocation in list(paths.allocations.values()):
                await allocation.close()
            await paths.ensure(relays, timeout=5)  # the IPv4 one again, not IPv6
            assert [c.address for c in paths.candidates()] == ["127.0.0.1"]
        finally:
            await paths.close()
    assert server.counters.address_family == 1


async def test_agent_reaches_a_relay_named_by_its_ipv6_address() -> None:
    """An IPv6 literal (or a name without an A record): the IPv4 relayed address is
    asked over IPv6 too, as a host with IPv6 alone must."""
    async with running(_config6()) as server:
        assert server.address6 is not None
        port = server.address6[1]
        relays = [RelayConfig(f"turn:[::1]:{port}", "::1", port, SECRET)]
        paths = RelayPaths("alice", 51820, lambda *_: None, lambda _a: None)
        try:
            await paths.ensure(relays, timeout=5)
            assert sorted(c.address for c in paths.candidates()) == [
                "127.0.0.1", "::1"]
            assert all(":" in client[0] for client in server.table.allocations)
        finally:
            await paths.close()
