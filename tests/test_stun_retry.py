"""STUN servers that did not answer the gathering are asked again, soon, then less often.

At boot the network's address can come up before its DNS: the STUN server's name does
not resolve, the gathering finds no server-reflexive candidate, and a NATed device
announces only its private address. Nothing on the host changes when DNS comes up, so
no network event would make the agent ask again: Upkeep's STUN loop does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from test_relay_trickle import FakeOwner, FakePort
from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.connectivity import Connectivity
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.agent.teamconfig import TeamConfig, parse_team_config
from kbwg.agent.upkeep import STUN_RETRY_MAX_S, Upkeep
from kbwg.negotiation.candidates import Candidate, StunServerResult, candidate_priority
from kbwg.negotiation.gathering import LocalCandidates
from kbwg.negotiation.stun_client import BindingResult

pytestmark = VIRTUAL_CLOCK

SERVER = ("203.0.113.3", 3478)
HOST = Candidate("host", "198.18.1.10", 51820, "eth0", candidate_priority("host"),
                 "interface eth0")
SRFLX = Candidate("srflx", "203.0.113.10", 40000, "eth0", candidate_priority("srflx"),
                  "stun 203.0.113.3:3478", base="198.18.1.10:51820")
ANSWER = BindingResult(SERVER, SERVER, ("203.0.113.10", 40000), 5.0, 1)


def paths_with(config: TeamConfig, local: LocalCandidates) -> Connectivity:
    paths = Connectivity(cast(OwnerCalls, FakeOwner()), cast(OwnerStunTransport, FakePort()),
                         51820, "alice", config, lambda _a: None)
    paths.local = local
    return paths


STUN = parse_team_config('{"stun": ["stun.example.net:3478"]}')
UNRESOLVED = StunServerResult("stun.example.net:3478", None, error="did not resolve")


@pytest.mark.parametrize(("config", "local", "unanswered"), [
    (STUN, LocalCandidates([HOST], [UNRESOLVED]), True),
    (STUN, LocalCandidates([HOST], [StunServerResult("x", SERVER, error="timed out")]), True),
    (STUN, LocalCandidates([HOST, SRFLX], [StunServerResult("x", SERVER, ANSWER)]), False),
    (STUN, LocalCandidates([HOST, SRFLX], [StunServerResult("x", SERVER, ANSWER),
                                           UNRESOLVED]), False),  # one answered is enough
    # None asked (no server of the uplink's family, no address): a network change tells.
    (STUN, LocalCandidates([HOST], []), False),
    (STUN, LocalCandidates([], []), False),
    (TeamConfig(), LocalCandidates([HOST], []), False),  # no STUN server configured
], ids=["unresolved", "timed-out", "answered", "one-answered", "none-asked", "no-address",
        "no-stun"])
async def test_stun_unanswered(config: TeamConfig, local: LocalCandidates,
                               unanswered: bool) -> None:
    paths = paths_with(config, local)
    try:
        assert paths.stun_unanswered() is unanswered
    finally:
        await paths.close()


@dataclass
class FakePaths:
    answered_after: int  # regathers until a server answers
    regathers: list[float] = field(default_factory=list)
    local: Any = field(default_factory=lambda: LocalCandidates([HOST, SRFLX]))

    def stun_unanswered(self) -> bool:
        return len(self.regathers) < self.answered_after

    async def regather(self) -> bool:
        self.regathers.append(now())
        return len(self.regathers) == self.answered_after  # the srflx candidate is new

    def public_endpoint(self) -> str | None:
        return "203.0.113.10:40000"


@dataclass
class FakeNegotiator:
    restarted_all: int = 0

    async def restart_all(self) -> None:
        self.restarted_all += 1


async def test_an_unanswered_stun_server_is_asked_again_less_and_less_often() -> None:
    paths = FakePaths(answered_after=4)
    negotiator = FakeNegotiator()
    none = cast(Any, None)
    keeper = Upkeep(cast(Any, type("O", (), {"endpoint": None})()), none, none, none, none,
                    none, cast(Any, paths), cast(Any, negotiator), none, owner=none)
    start = now()
    asking = asyncio.create_task(keeper._ask_stun_again())
    try:
        await asyncio.sleep(10 * STUN_RETRY_MAX_S)
    finally:
        asking.cancel()
    # 2 s after joining, then 4, 8 and 16 s apart; none after the answer.
    assert [round(t - start, 3) for t in paths.regathers] == [2.0, 6.0, 14.0, 30.0]
    # The answer's new candidate renegotiates with everyone.
    assert negotiator.restarted_all == 1


class FailingPaths(FakePaths):
    async def regather(self) -> bool:
        self.regathers.append(now())
        raise RuntimeError("the owner refused")


async def test_a_failed_try_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    paths = FailingPaths(answered_after=2)
    none = cast(Any, None)
    keeper = Upkeep(cast(Any, type("O", (), {"endpoint": None})()), none, none, none, none,
                    none, cast(Any, paths), cast(Any, FakeNegotiator()), none, owner=none)
    start = now()
    asking = asyncio.create_task(keeper._ask_stun_again())
    try:
        await asyncio.sleep(10.0)
        assert not asking.done(), "the loop ended with the failure"
    finally:
        asking.cancel()
    assert [round(t - start, 3) for t in paths.regathers] == [2.0, 6.0]
    assert "asking the STUN servers again failed" in caplog.text
