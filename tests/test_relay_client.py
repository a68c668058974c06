"""RelayAllocation (the agent's side of a relay) against our relay server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
from aioice import stun
from test_relay_protocol import SECRET, Endpoint, _config

from kbwg.relay.config import Lifetimes
from kbwg.relay.server import RelayServer
from kbwg.turn.client import AllocationTimers, RelayAllocation
from kbwg_testing import wait_for

Address = tuple[str, int]


@contextlib.asynccontextmanager
async def allocation_on(server: RelayServer, **timers: float) -> AsyncIterator[
        tuple[RelayAllocation, asyncio.Queue[tuple[bytes, Address]], asyncio.Event]]:
    allocation = await RelayAllocation.open("turn:test", server.address, "alice", SECRET,
                                            timers=AllocationTimers(**timers))  # fmt: skip
    received: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
    lost = asyncio.Event()
    allocation.receiver = lambda data, peer: received.put_nowait((data, peer))
    allocation.on_lost = lambda _a: lost.set()
    try:
        yield allocation, received, lost
    finally:
        await allocation.close()


async def test_data_goes_both_ways_over_a_channel() -> None:
    async with RelayServer(_config()) as server, allocation_on(server) as (alloc, got, _):
        peer = await Endpoint.open()
        try:
            alloc.send(b"first", peer.address)  # binds the channel, then sends
            data, relayed = await peer.receive()
            assert (data, relayed) == (b"first", alloc.relayed)
            alloc.send(b"second", peer.address)  # bound: ChannelData from here
            assert (await peer.receive())[0] == b"second"
            peer.send(b"reply", alloc.relayed)
            assert await asyncio.wait_for(got.get(), 2.0) == (b"reply", peer.address)
            assert (alloc.counters.sent, alloc.counters.received) == (2, 1)
            assert alloc.local_ip == "127.0.0.1"  # the address the relay knows it by
        finally:
            peer.close()


async def test_data_from_an_unbound_port_of_a_permitted_peer_arrives() -> None:
    # A NAT may show the peer from another port than the one we bound a channel to: the
    # relay sends that as a Data indication, which goes through aioice, not the fast path.
    async with RelayServer(_config()) as server, allocation_on(server) as (alloc, got, _):
        bound, other = await Endpoint.open(), await Endpoint.open()
        try:
            alloc.send(b"bind", bound.address)
            await bound.receive()
            other.send(b"from elsewhere", alloc.relayed)
            assert await asyncio.wait_for(got.get(), 2.0) == (b"from elsewhere", other.address)
        finally:
            bound.close()
            other.close()


@contextlib.asynccontextmanager
async def after_a_restart(**timers: float) -> AsyncIterator[
        tuple[RelayAllocation, asyncio.Event]]:
    """An allocation on a relay that then restarted: the same address, a new process
    that knows no allocation (a Refresh or a bind there gets 437)."""
    first = RelayServer(_config())
    await first.start()
    address = first.address
    async with allocation_on(first, **timers) as (alloc, _, lost):
        first.close()
        async with RelayServer(_config(listen=address)):
            yield alloc, lost


async def lost_on_sending(alloc: RelayAllocation, lost: asyncio.Event) -> None:
    """Send to a new peer (a bind first); the allocation must be reported lost."""
    peer = await Endpoint.open()
    try:
        alloc.send(b"x", peer.address)
        await asyncio.wait_for(lost.wait(), 5.0)
    finally:
        peer.close()


async def test_allocation_forgotten_by_a_restarted_relay_is_reported_lost() -> None:
    async with after_a_restart(watch_interval=0.05) as (alloc, lost):
        await asyncio.wait_for(lost.wait(), 5.0)
    assert alloc.closed


async def test_allocation_on_a_silent_relay_is_reported_lost() -> None:
    server = RelayServer(_config())
    await server.start()
    async with allocation_on(server, watch_interval=0.05, watch_timeout=0.3) as (
            alloc, _, lost):
        server.close()
        await asyncio.wait_for(lost.wait(), 5.0)
        assert alloc.closed


async def test_live_allocation_is_confirmed_not_lost() -> None:
    async with RelayServer(_config()) as server, allocation_on(
            server, watch_interval=0.02, watch_timeout=1.0) as (alloc, _, lost):
        protocol = alloc._protocol
        request = protocol.request_with_retry
        confirmed = asyncio.Event()
        answers: list[object] = []

        async def counted(message: stun.Message) -> tuple[stun.Message, Address]:
            answer = await request(message)
            answers.append(answer[0].message_class)
            if len(answers) == 3:
                confirmed.set()
            return answer

        protocol.request_with_retry = counted  # type: ignore[method-assign]
        await asyncio.wait_for(confirmed.wait(), 5.0)
        assert answers == [stun.Class.RESPONSE] * 3
        assert not lost.is_set() and not alloc.closed


# A relay with RFC 8656's lifetimes shrunk: permissions 0.5 s, channels 1 s.
SHORT = Lifetimes(permission=0.5, channel=1.0, channel_cooldown=0.2)
FAST_UPKEEP = {"watch_interval": 0.05, "watch_timeout": 1.0, "channel_refresh": 0.25,
               "channel_lifetime": 1.3}


async def test_channel_in_use_is_bound_again_before_its_permission_expires() -> None:
    config = _config(lifetimes=SHORT, sweep_interval=0.02)
    async with RelayServer(config) as server, allocation_on(server, **FAST_UPKEEP) as (
            alloc, got, _):
        peer = await Endpoint.open()
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 4 * SHORT.permission
            rounds = 0
            while loop.time() < end:  # traffic both ways for several permission lifetimes
                alloc.send(b"ping", peer.address)
                assert (await peer.receive())[0] == b"ping"
                peer.send(b"pong", alloc.relayed)
                assert await asyncio.wait_for(got.get(), 1.0) == (b"pong", peer.address)
                rounds += 1
                await asyncio.sleep(0.05)  # lets time pass: the lifetimes are the subject
            assert rounds > 10
            assert server.counters.permissions_expired == 0
            assert server.counters.channels_expired == 0
        finally:
            peer.close()


async def test_unused_channel_is_forgotten_then_bound_anew() -> None:
    config = _config(lifetimes=SHORT, sweep_interval=0.02)
    async with RelayServer(config) as server, allocation_on(server, **FAST_UPKEEP) as (
            alloc, got, _):
        peer = await Endpoint.open()
        try:
            alloc.send(b"first", peer.address)
            assert (await peer.receive())[0] == b"first"
            first_channel = alloc._protocol.peer_to_channel[peer.address]
            await wait_for(lambda: peer.address not in alloc._protocol.peer_to_channel,
                           "the idle channel to be forgotten")
            assert server.counters.channels_expired == 1
            alloc.send(b"again", peer.address)
            assert (await peer.receive())[0] == b"again"
            assert alloc._protocol.peer_to_channel[peer.address] != first_channel
            peer.send(b"reply", alloc.relayed)
            assert await asyncio.wait_for(got.get(), 1.0) == (b"reply", peer.address)
        finally:
            peer.close()


async def test_malformed_stun_from_the_relay_is_counted_not_fatal() -> None:
    # aioice's parser lets this one (CHANGE-REQUEST two bytes long) raise struct.error.
    attribute = struct.pack("!HH", 0x0003, 2) + bytes(4)
    data_indication = (struct.pack("!HHI", 0x0017, len(attribute), 0x2112A442)
                       + bytes(12) + attribute)
    server = RelayServer(_config())
    await server.start()
    async with allocation_on(server, watch_interval=60.0) as (alloc, got, lost):
        server.close()
        # A bad relay: a socket on the relay's address, sending what it likes.
        loop = asyncio.get_running_loop()
        bad_relay, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=alloc.server)
        try:
            local = alloc._protocol.transport.get_extra_info("sockname")
            bad_relay.sendto(b"\x40\x00\x00\x10short", local)  # ChannelData, cut short
            bad_relay.sendto(data_indication, local)
            await wait_for(lambda: alloc.unhandled, "the malformed datagram to be counted")
            assert not alloc.closed and not lost.is_set() and got.empty()
        finally:
            bad_relay.close()


def refuse_binds(alloc: RelayAllocation, code: int) -> list[stun.Method]:
    """Make the relay refuse every ChannelBind with `code`, as coturn does once it has
    filed the client under a new session (coturn issue 688); returns the methods of the
    requests that reached the relay, in order."""
    protocol = alloc._protocol
    request = protocol.request_with_retry
    sent: list[stun.Method] = []

    async def refusing(message: stun.Message) -> tuple[stun.Message, Address]:
        sent.append(message.message_method)
        if message.message_method == stun.Method.CHANNEL_BIND:
            refusal = stun.Message(message.message_method, stun.Class.ERROR,
                                   message.transaction_id)
            refusal.attributes["ERROR-CODE"] = (code, "refused")
            raise stun.TransactionFailed(refusal)
        return await request(message)

    protocol.request_with_retry = refusing  # type: ignore[method-assign]
    return sent


async def test_a_quiet_path_has_the_allocation_confirmed_at_once() -> None:
    # A restarted relay drops ChannelData without a word: only a Refresh tells.
    async with after_a_restart(watch_interval=60.0, doubt_gap=0.05) as (alloc, lost):
        alloc.confirm_soon()  # a relayed path through it stopped answering
        await asyncio.wait_for(lost.wait(), 5.0)
    assert alloc.closed


async def test_a_bind_refused_437_is_the_allocations_loss_at_once() -> None:
    # The watch would notice in a minute; the bind's own 437 says it now.
    async with after_a_restart(watch_interval=60.0) as (alloc, lost):
        await lost_on_sending(alloc, lost)
    assert alloc.closed


async def test_a_bind_refused_400_by_a_relay_that_lost_the_allocation_is_noticed_at_once(
) -> None:
    async with after_a_restart(watch_interval=60.0, doubt_gap=0.05) as (alloc, lost):
        sent = refuse_binds(alloc, 400)
        await lost_on_sending(alloc, lost)
    assert sent == [stun.Method.CHANNEL_BIND, stun.Method.REFRESH]


async def test_a_bind_refused_400_by_a_live_relay_confirms_and_keeps_the_allocation() -> None:
    async with RelayServer(_config()) as server, allocation_on(
            server, watch_interval=60.0, doubt_gap=0.2) as (alloc, _, lost):
        sent = refuse_binds(alloc, 400)
        peer = await Endpoint.open()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # A refusal per send for a second: confirmed early, but once per doubt_gap.
            while loop.time() - started < 1.0:
                alloc.send(b"x", peer.address)
                await asyncio.sleep(0.01)
            await wait_for(lambda: stun.Method.REFRESH in sent, "an early Refresh")
            assert 1 <= sent.count(stun.Method.REFRESH) <= 6, sent
            assert sent.count(stun.Method.CHANNEL_BIND) > 20
            assert not lost.is_set() and not alloc.closed
        finally:
            peer.close()


@pytest.mark.parametrize("code", [403, 443, 508])
async def test_a_refusal_about_the_peer_does_not_doubt_the_allocation(code: int) -> None:
    async with RelayServer(_config()) as server, allocation_on(
            server, watch_interval=60.0, doubt_gap=0.0) as (alloc, _, lost):
        sent = refuse_binds(alloc, code)
        peer = await Endpoint.open()
        try:
            alloc.send(b"x", peer.address)
            await wait_for(lambda: alloc.counters.send_errors == 1, "the refused send")
            # The upkeep runs whenever it has cause (doubt_gap 0): a yield is enough.
            await asyncio.sleep(0.05)
            assert sent == [stun.Method.CHANNEL_BIND]
            assert not lost.is_set() and not alloc.closed
        finally:
            peer.close()
