"""Log lines a remote sender can cause again and again are limited (core.loglimit), the
counters beside them are not: a relay's credential holder allocating and deleting in a
loop, datagrams on the shared WireGuard port that trip a bug in the owner, a relay
refusing every channel bind with a new reason. Each would write the log as fast as it
can send; here each writes a burst, then a trickle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aioice import stun
from test_rawstun import PORT, stun_request, udp_packet
from test_relay_protocol import Endpoint, client_for, running

from kbwg.core.loglimit import BURST, LINES_PER_SECOND
from kbwg.owner.rawstun import RawStunSocket, UdpDatagram
from kbwg.turn.client import AllocationTimers, RelayAllocation
from kbwg_testing import wait_for

Address = tuple[str, int]


def _bound(started: float) -> int:
    """The most lines a LimitedLog lets through since `started` (monotonic)."""
    return BURST + int((time.monotonic() - started) * LINES_PER_SECOND) + 1


def _lines(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno >= level]


# -- the relay -------------------------------------------------------------------------


async def test_an_allocate_and_delete_loop_writes_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Anyone with the team secret mints credentials: a client allocating and deleting
    without end wrote two lines a round trip (the quotas bound how many allocations
    live at once, not how often one is made)."""
    rounds = 2 * BURST
    async with running() as server:
        client = await client_for(server, allocate=False)
        try:
            await client.login()
            with caplog.at_level(logging.INFO, logger="kbwg.relay.allocation"):
                started = time.monotonic()
                for _ in range(rounds):
                    answer = await client.allocate()
                    assert answer.message_class == stun.Class.RESPONSE, answer
                    deleted = await client.turn(stun.Method.REFRESH, LIFETIME=0)
                    assert deleted.message_class == stun.Class.RESPONSE, deleted
                lines = _lines(caplog, "kbwg.relay.allocation", logging.INFO)
                assert 1 <= len(lines) <= _bound(started), len(lines)
            counters = server.counters
            assert (counters.allocations_created, counters.allocations_deleted) == (
                rounds, rounds)
            assert not server.table.allocations
        finally:
            client.close()


# -- the device owner's shared WireGuard port ------------------------------------------


async def test_datagrams_that_trip_the_stun_callback_write_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A datagram that trips a bug behind the raw socket is logged with its traceback;
    the same datagram sent at line rate wrote one traceback each."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)

    def broken(_datagram: UdpDatagram) -> None:
        raise ValueError("a bug in the callback")

    raw = RawStunSocket(ours, PORT, broken)
    packet = udp_packet(stun_request())
    total, batch = 300, 50
    try:
        with caplog.at_level(logging.INFO, logger="kbwg.owner.rawstun"):
            started = time.monotonic()
            for sent in range(batch, total + 1, batch):
                for _ in range(batch):
                    theirs.send(packet)
                await wait_for(lambda sent=sent: raw.counters.received == sent,
                               f"{sent} datagrams read", 10)
            failures = [r for r in caplog.records
                        if r.name == "kbwg.owner.rawstun" and r.levelno >= logging.ERROR]
            assert 1 <= len(failures) <= _bound(started), len(failures)
            assert failures[0].exc_info is not None  # the traceback says where the bug is
            assert failures[0].pathname.endswith("rawstun.py")  # the caller's line
        assert (raw.counters.delivered, raw.counters.callback_errors) == (total, total)
    finally:
        raw.close()
        theirs.close()


# -- the agent's TURN client -----------------------------------------------------------


class HostileRelay:
    """Answers Allocate and Refresh, refuses every ChannelBind after the first
    `accepted` with a 403 whose reason is new each time (`reason(n)`): a relay the
    agent was told to use, gone bad."""

    def __init__(self, endpoint: Endpoint, reason: Callable[[int], str],
                 accepted: int = 0) -> None:
        self.endpoint = endpoint
        self.reason = reason
        self.accepted = accepted
        self.binds = self.refused = 0
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            data, client = await self.endpoint.receive(timeout=60)
            if 0x40 <= data[0] <= 0x7F:
                continue  # ChannelData: relayed nowhere
            request = stun.parse_message(data)
            method = request.message_method
            if method == stun.Method.CHANNEL_BIND:
                self.binds += 1
            if method == stun.Method.CHANNEL_BIND and self.binds > self.accepted:
                self.refused += 1
                attributes: dict[str, object] = {
                    "ERROR-CODE": (403, self.reason(self.refused))}
                klass = stun.Class.ERROR
            else:
                attributes = {"LIFETIME": 600}
                if method == stun.Method.ALLOCATE:
                    attributes.update({"XOR-RELAYED-ADDRESS": ("192.0.2.50", 50000),
                                       "XOR-MAPPED-ADDRESS": client})
                klass = stun.Class.RESPONSE
            self.endpoint.send(bytes(stun.Message(method, klass, request.transaction_id,
                                                  attributes)), client)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.endpoint.close()


@contextlib.asynccontextmanager
async def allocation_on_hostile(reason: Callable[[int], str], accepted: int = 0,
                                timers: AllocationTimers | None = None,
                                ) -> AsyncIterator[tuple[RelayAllocation, HostileRelay]]:
    relay = HostileRelay(await Endpoint.open(), reason, accepted)
    try:
        allocation = await RelayAllocation.open("turn:hostile", relay.endpoint.address,
                                                "alice", "secret",
                                                timers=timers or AllocationTimers())
        try:
            yield allocation, relay
        finally:
            await allocation.close()
    finally:
        await relay.close()


async def _refused_sends(allocation: RelayAllocation, peer: Address, sends: int) -> None:
    for n in range(1, sends + 1):
        allocation.send(b"wireguard", peer)
        await wait_for(lambda n=n: allocation.counters.send_errors == n,
                       f"send {n} refused", 10)


async def test_a_relay_refusing_with_new_reasons_writes_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A refusal is said once per peer and reason; a relay changing its reason phrase
    each time had every send to that peer write a line."""
    sends = 2 * BURST
    async with allocation_on_hostile(lambda n: f"Forbidden ({n})") as (allocation, relay):
        with caplog.at_level(logging.INFO, logger="kbwg.turn.client"):
            started = time.monotonic()
            await _refused_sends(allocation, ("203.0.113.7", 51820), sends)
            lines = [line for line in _lines(caplog, "kbwg.turn.client", logging.INFO)
                     if "cannot reach" in line]
            assert 1 <= len(lines) <= _bound(started), len(lines)
        assert relay.refused == sends


async def test_a_relays_long_reason_phrase_is_cut_short_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reason phrase is the relay's to choose, up to a datagram long: the agent's log
    line and what it remembers per refused peer stay short."""
    async with allocation_on_hostile(lambda n: "x" * 60000) as (allocation, _relay):
        with caplog.at_level(logging.INFO, logger="kbwg.turn.client"):
            await _refused_sends(allocation, ("203.0.113.8", 51820), 1)
            (line,) = [line for line in _lines(caplog, "kbwg.turn.client", logging.INFO)
                       if "cannot reach" in line]
            short = "xxxx" in line and len(line) < 600
            assert short, f"a line of {len(line)} characters"


async def test_a_relays_long_reason_for_a_refused_channel_refresh_is_cut_short(
        caplog: pytest.LogCaptureFixture) -> None:
    """The same for a channel in use whose binding the relay then refuses to refresh:
    one line per channel every watch interval, as long as the relay makes it."""
    timers = AllocationTimers(watch_interval=0.05, channel_refresh=0.1)
    peer = ("203.0.113.9", 51820)
    async with allocation_on_hostile(lambda n: "y" * 60000, accepted=1,
                                     timers=timers) as (allocation, relay):
        with caplog.at_level(logging.INFO, logger="kbwg.turn.client"):
            allocation.send(b"wireguard", peer)  # binds the channel
            await wait_for(lambda: allocation.counters.sent == 1, "the channel bound", 10)
            allocation.send(b"wireguard", peer)  # in use: to be refreshed
            await wait_for(lambda: relay.refused >= 1, "a refresh refused", 10)
            await wait_for(lambda: [line for line in _lines(
                caplog, "kbwg.turn.client", logging.INFO) if "not refreshed" in line],
                "the refusal logged", 10)
            line = next(line for line in _lines(caplog, "kbwg.turn.client", logging.INFO)
                        if "not refreshed" in line)
            short = "yyyy" in line and len(line) < 600
            assert short, f"a line of {len(line)} characters"
