"""A relay listed with several transports: each starts when the one before it failed or
had NEXT_TRANSPORT_DELAY_S alone, the first allocation wins, the others are cancelled
or closed, and the IPv6 relayed address is asked over the transport that won.

On a virtual clock, with allocations that a script decides: (transport, ipv6) -> how
long until it answers, and whether with an allocation or an error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aioice import stun
from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.relay_paths import IPV6_KEY, NEXT_TRANSPORT_DELAY_S, RelayPaths
from kbwg.agent.teamconfig import RelayConfig
from kbwg.turn.client import RelayAllocation

pytestmark = VIRTUAL_CLOCK

UDP = RelayConfig("turn:192.0.2.9", "192.0.2.9", 3478, "s")
TCP = RelayConfig("turn:192.0.2.9?transport=tcp", "192.0.2.9", 3478, "s", "tcp")
TLS = RelayConfig("turns:192.0.2.9", "192.0.2.9", 5349, "s", "tls")
NEVER = 1e9


@dataclass
class FakeAllocation:
    url: str
    transport: str
    ipv6: bool
    relayed: tuple[str, int] = ("198.51.100.9", 50000)
    rtt_ms: float = 10.0
    transport_reason: str = ""
    closed: bool = False
    local_ip: str | None = "198.18.1.10"

    async def close(self) -> None:
        self.closed = True


@dataclass
class Script:
    """What each (transport, ipv6) attempt does: (seconds, None for an allocation or
    the exception to raise). Unlisted: an allocation at once."""

    plan: dict[tuple[str, bool], tuple[float, BaseException | None]]
    started: list[tuple[str, bool, float]] = field(default_factory=list)
    cancelled: list[tuple[str, bool]] = field(default_factory=list)
    made: list[FakeAllocation] = field(default_factory=list)

    async def allocate(self, relay: RelayConfig, timeout: float,
                       ipv6: bool = False) -> RelayAllocation:
        self.started.append((relay.transport, ipv6, now()))
        seconds, error = self.plan.get((relay.transport, ipv6), (0.0, None))
        try:
            if seconds >= timeout:
                await asyncio.sleep(timeout)
                raise TimeoutError
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append((relay.transport, ipv6))
            raise
        if error is not None:
            raise error
        made = FakeAllocation(relay.url, relay.transport, ipv6)
        self.made.append(made)
        return cast(RelayAllocation, made)


def paths_with(script: Script, told: list[Any] | None = None,
               on_ready: bool = True) -> RelayPaths:
    sink = told if told is not None else []
    paths = (RelayPaths("alice", 51820, lambda *_: None, lambda _a: None,
                        on_ready=sink.append) if on_ready
             else RelayPaths("alice", 51820, lambda *_: None, sink.append))
    paths._allocate = script.allocate  # type: ignore[method-assign]
    return paths


def refused() -> stun.TransactionFailed:
    response = stun.Message(stun.Method.ALLOCATE, stun.Class.ERROR)
    response.attributes["ERROR-CODE"] = (440, "Address Family not Supported")
    return stun.TransactionFailed(response)


async def test_udp_answering_is_the_only_try() -> None:
    script = Script({})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP, TLS])
    assert [(t, v6) for t, v6, _ in script.started] == [("udp", True), ("udp", False)]
    assert paths.allocations[UDP.url].transport_reason == "udp: first choice"
    assert paths.allocations[UDP.url + IPV6_KEY].transport == "udp"


async def test_silent_udp_has_tcp_start_beside_it_after_the_delay() -> None:
    script = Script({("udp", False): (NEVER, None), ("udp", True): (NEVER, None),
                     ("tcp", False): (0.1, None)})
    told: list[Any] = []
    paths = paths_with(script, told)
    start = now()
    await paths.ensure([UDP, TCP, TLS], timeout=3.0)
    # Done well before the 3 s time-out, with both addresses over TCP.
    assert now() - start == pytest.approx(NEXT_TRANSPORT_DELAY_S + 0.1, abs=0.01)
    starts = {(t, v6): at - start for t, v6, at in script.started}
    assert starts[("tcp", False)] == pytest.approx(NEXT_TRANSPORT_DELAY_S)
    assert ("tls", False) not in starts  # TCP answered before TLS's turn
    assert starts[("tcp", True)] == pytest.approx(NEXT_TRANSPORT_DELAY_S + 0.1)
    assert sorted(script.cancelled) == [("udp", False), ("udp", True)]
    main = paths.allocations[UDP.url]
    assert main.transport == "tcp"
    assert main.transport_reason == "udp: no answer in 1.1 s; using tcp"
    assert paths.allocations[UDP.url + IPV6_KEY].transport == "tcp"
    assert told == []  # ensure itself had them: nothing to regather for
    assert paths.pending == {}


async def test_a_failing_transport_lets_the_next_start_at_once() -> None:
    script = Script({("udp", False): (0.05, OSError("Network is unreachable")),
                     ("udp", True): (0.05, OSError("Network is unreachable"))})
    paths = paths_with(script)
    start = now()
    await paths.ensure([UDP, TCP])
    starts = {(t, v6): at - start for t, v6, at in script.started}
    assert starts[("tcp", False)] == pytest.approx(0.05)
    assert paths.allocations[UDP.url].transport_reason == (
        "udp: Network is unreachable; using tcp")


async def test_a_slow_udp_still_wins_over_a_slower_tcp() -> None:
    script = Script({("udp", False): (1.2, None), ("tcp", False): (0.5, None)})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP])
    assert paths.allocations[UDP.url].transport == "udp"
    assert ("tcp", False) in script.cancelled
    assert all(not a.closed for a in script.made)


async def test_two_answering_together_keep_one_and_close_the_other() -> None:
    script = Script({("udp", False): (1.5, None), ("tcp", False): (0.5, None)})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP])
    v4 = [a for a in script.made if not a.ipv6]
    assert len(v4) == 2
    kept = paths.allocations[UDP.url]
    assert [a.closed for a in v4] == [a is not kept for a in v4]


@pytest.mark.parametrize("on_ready", [True, False])
async def test_an_allocation_after_the_time_out_is_told_later(on_ready: bool) -> None:
    script = Script({("udp", False): (NEVER, None), ("udp", True): (NEVER, None),
                     ("tcp", False): (2.5, None), ("tcp", True): (0.1, refused())})
    told: list[Any] = []
    paths = paths_with(script, told, on_ready)
    await paths.ensure([UDP, TCP], timeout=3.0)
    assert UDP.url not in paths.allocations and paths.missing([UDP, TCP]) == []
    while not told:
        await asyncio.sleep(0.1)
    [allocation] = told
    assert allocation.transport == "tcp"
    assert paths.allocations[UDP.url] is allocation
    # Refused over TCP, after the UDP try timed out (when TCP won it was cancelled).
    assert UDP.url + IPV6_KEY not in paths.allocations and UDP.url in paths.no_ipv6


async def test_every_transport_failing_leaves_nothing_pending() -> None:
    script = Script({("udp", False): (0.0, OSError("down")), ("udp", True): (0.0, OSError("down")),
                     ("tcp", False): (0.0, ConnectionRefusedError("refused")),
                     ("tls", False): (0.0, ConnectionRefusedError("refused"))})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP, TLS])
    assert paths.allocations == {} and paths.pending == {}
    assert paths.missing([UDP, TCP, TLS]) != []  # tried again next time


async def test_closing_while_transports_race_cancels_and_closes_them() -> None:
    script = Script({("udp", False): (NEVER, None), ("udp", True): (NEVER, None),
                     ("tcp", False): (NEVER, None)})
    paths = paths_with(script)
    ensuring = asyncio.create_task(paths.ensure([UDP, TCP]))
    await asyncio.sleep(NEXT_TRANSPORT_DELAY_S + 0.2)  # TCP started, all still trying
    assert paths.pending
    await paths.close()
    await ensuring
    assert paths.pending == {} and paths.allocations == {}
    assert sorted(script.cancelled) == [("tcp", False), ("udp", False), ("udp", True)]


async def test_an_ipv6_address_alone_is_asked_over_the_transport_in_use() -> None:
    script = Script({("udp", False): (NEVER, None), ("udp", True): (NEVER, None),
                     ("tcp", True): (0.1, OSError("no route"))})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP])
    assert paths.allocations[UDP.url].transport == "tcp"
    assert UDP.url + IPV6_KEY not in paths.allocations
    script.started.clear()
    script.plan[("tcp", True)] = (0.1, None)
    await paths.ensure([UDP, TCP])  # a regather: only the IPv6 one is missing
    assert [(t, v6) for t, v6, _ in script.started] == [("tcp", True)]
    assert paths.allocations[UDP.url + IPV6_KEY].transport == "tcp"
