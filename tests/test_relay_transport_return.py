"""A relay reached over TCP (UDP got no answer) is asked over UDP again, soon and then
less often; once UDP answers, the UDP allocation replaces the stream's, which carries its
peers' data a little longer and then closes.

On a virtual clock, with the scripted allocations of test_relay_transport_race."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from test_relay_transport_race import NEVER, TCP, TLS, UDP, FakeAllocation, Script, paths_with
from test_stun_retry import FakeNegotiator
from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.relay_paths import RETIRE_GRACE_S, RelayPaths
from kbwg.agent.upkeep import RELAY_RETRY_FIRST_S, RELAY_RETRY_MAX_S, Upkeep
from kbwg.negotiation.gathering import LocalCandidates

pytestmark = VIRTUAL_CLOCK


@dataclass
class FakeProxy:
    allocation: Any
    peer: tuple[str, int] = ("203.0.113.20", 40000)
    closed: bool = False

    def close(self) -> None:
        self.closed = True


async def on_tcp(script: Script, told: list[Any]) -> RelayPaths:
    """Paths whose relay answered over TCP only (UDP silent)."""
    script.plan[("udp", False)] = (NEVER, None)
    script.plan[("udp", True)] = (NEVER, None)
    paths = paths_with(script, told, on_ready=False)
    await paths.ensure([UDP, TCP])
    assert paths.allocations[UDP.url].transport == "tcp"
    return paths


async def test_udp_answering_again_replaces_the_stream_allocation() -> None:
    script, told = Script({}), cast(list[Any], [])
    paths = await on_tcp(script, told)
    stream = cast(FakeAllocation, paths.allocations[UDP.url])
    assert [g.key for g in paths.on_later_transport([UDP, TCP])] == [UDP.url]
    proxy = FakeProxy(stream)
    paths.proxies["bob/desk"] = cast(Any, proxy)

    # UDP still silent: nothing moves, after the one try's time-out.
    start = now()
    assert not await paths.retry_first_transports([UDP, TCP])
    assert now() - start == pytest.approx(3.0)
    assert paths.allocations[UDP.url] is stream and not stream.closed

    script.plan[("udp", False)] = (0.05, None)
    assert await paths.retry_first_transports([UDP, TCP])
    now_udp = paths.allocations[UDP.url]
    assert now_udp.transport == "udp"
    assert now_udp.transport_reason == "udp: answers again (was tcp)"
    assert paths.on_later_transport([UDP, TCP]) == []
    # The stream still carries the peer's data for the grace, then closes, quietly: its
    # end is not a lost relay to gather again for.
    await asyncio.sleep(RETIRE_GRACE_S - 0.1)
    assert not stream.closed and not proxy.closed
    await asyncio.sleep(0.2)
    assert stream.closed and proxy.closed and "bob/desk" not in paths.proxies
    assert told == []
    assert not now_udp.closed
    await paths.close()


async def test_a_stream_lost_while_udp_was_asked_is_not_replaced() -> None:
    script, told = Script({}), cast(list[Any], [])
    paths = await on_tcp(script, told)
    stream = cast(FakeAllocation, paths.allocations[UDP.url])
    script.plan[("udp", False)] = (1.0, None)
    asking = asyncio.create_task(paths.retry_first_transports([UDP, TCP]))
    await asyncio.sleep(0.5)
    stream.closed = True  # lost meanwhile: the gathering that follows decides
    assert not await asking
    assert paths.allocations[UDP.url] is stream
    assert script.made[-1].transport == "udp" and script.made[-1].closed
    await paths.close()


async def test_relays_on_their_first_transport_or_with_one_alone_are_not_asked() -> None:
    script = Script({})
    paths = paths_with(script)
    await paths.ensure([UDP, TCP])  # UDP answered
    tcp_alone = paths_with(Script({}))
    await tcp_alone.ensure([TCP, TLS])  # TCP is this relay's first transport
    for p, relays in ((paths, [UDP, TCP]), (tcp_alone, [TCP, TLS])):
        started = len(script.started)
        assert p.on_later_transport(relays) == []
        assert not await p.retry_first_transports(relays)
        assert len(script.started) == started
        await p.close()


async def test_close_ends_a_retiring_allocation_at_once() -> None:
    script = Script({})
    paths = await on_tcp(script, [])
    stream = cast(FakeAllocation, paths.allocations[UDP.url])
    script.plan[("udp", False)] = (0.0, None)
    assert await paths.retry_first_transports([UDP, TCP])
    start = now()
    await paths.close()
    assert now() - start < RETIRE_GRACE_S
    assert stream.closed and all(a.closed for a in script.made)


@dataclass
class FakePaths:
    udp_after: int  # tries until UDP answers
    tries: list[float] = field(default_factory=list)
    regathers: list[float] = field(default_factory=list)
    local: Any = field(default_factory=lambda: LocalCandidates([]))

    def relays_on_later_transport(self) -> bool:
        return len(self.tries) < self.udp_after

    async def retry_relay_transports(self) -> bool:
        self.tries.append(now())
        return len(self.tries) == self.udp_after

    async def regather(self) -> bool:
        self.regathers.append(now())
        return True

    def public_endpoint(self) -> str | None:
        return "203.0.113.10:40000"


def keeper_for(paths: FakePaths, negotiator: FakeNegotiator) -> Upkeep:
    none = cast(Any, None)
    return Upkeep(cast(Any, type("O", (), {"endpoint": None})()), none, none, none, none,
                  none, cast(Any, paths), cast(Any, negotiator), none, owner=none)


async def test_the_loop_asks_less_and_less_often_and_regathers_once_udp_answers() -> None:
    paths, negotiator = FakePaths(udp_after=5), FakeNegotiator()
    keeper = keeper_for(paths, negotiator)
    start = now()
    loop = asyncio.create_task(keeper._retry_relay_transports())
    try:
        await asyncio.sleep(500.0)
    finally:
        loop.cancel()
    first = RELAY_RETRY_FIRST_S
    expected, at, wait = [], 0.0, first
    for _ in range(5):
        at += wait
        expected.append(at)
        wait = min(wait * 2, RELAY_RETRY_MAX_S)
    assert [round(t - start, 3) for t in paths.tries] == expected
    # The move changed the relayed candidate: one gathering, everyone renegotiated.
    assert [round(t - start, 3) for t in paths.regathers] == [expected[-1]]
    assert negotiator.restarted_all == 1


class FailingPaths(FakePaths):
    async def retry_relay_transports(self) -> bool:
        self.tries.append(now())
        raise RuntimeError("a bug")


async def test_a_failed_try_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    paths = FailingPaths(udp_after=3)
    keeper = keeper_for(paths, FakeNegotiator())
    start = now()
    loop = asyncio.create_task(keeper._retry_relay_transports())
    try:
        await asyncio.sleep(3 * RELAY_RETRY_FIRST_S + 1)
        assert not loop.done(), "the loop ended with the failure"
    finally:
        loop.cancel()
    assert [round(t - start, 3) for t in paths.tries] == [RELAY_RETRY_FIRST_S,
                                                          3 * RELAY_RETRY_FIRST_S]
    assert "asking a relay over UDP again failed" in caplog.text


async def test_an_allocation_from_an_address_the_host_lost_is_replaced_at_once() -> None:
    """The relay knows an allocation by the address it is used from: after a move to
    another network only a Refresh timing out would tell, seconds later."""
    script, told = Script({}), cast(list[Any], [])
    paths = paths_with(script, told, on_ready=False)
    await paths.ensure([UDP])
    old = cast(FakeAllocation, paths.allocations[UDP.url])
    proxy = FakeProxy(old)
    paths.proxies["bob/desk"] = cast(Any, proxy)
    paths.drop_moved({"198.18.1.10", "2001:db8::10"})
    assert paths.allocations[UDP.url] is old, "its address is still the host's"
    paths.drop_moved({"198.18.7.20"})
    assert UDP.url not in paths.allocations
    await paths.ensure([UDP])
    assert paths.allocations[UDP.url] is not old
    # Its proxies go after the grace, and its end is no lost relay to gather again for.
    await asyncio.sleep(RETIRE_GRACE_S + 0.1)
    assert old.closed and proxy.closed
    assert told == []
    await paths.close()
