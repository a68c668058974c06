"""A STUN server that did not answer the gathering is asked again at the next refresh.

At boot the network's address can come up before its DNS: the STUN server's name does
not resolve, the gathering finds no server-reflexive candidate, and a NATed device
announces only its private address. Nothing on the host changes when DNS comes up, so
no network event would make the agent ask again; the refresh loop does, as it does for
a relay that was missing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from test_relay_trickle import FakeOwner, FakePort
from virtual_clock import VIRTUAL_CLOCK

from kbwg.agent.connectivity import Connectivity
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.agent.teamconfig import TeamConfig, parse_team_config
from kbwg.agent.upkeep import FIRST_REFRESH_S, Upkeep
from kbwg.negotiation.candidates import Candidate, StunServerResult, candidate_priority
from kbwg.negotiation.gathering import LocalCandidates
from kbwg.negotiation.stun_client import BindingResult

pytestmark = VIRTUAL_CLOCK

REFRESH_S = 30.0
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
    unanswered: list[bool]
    regathers: int = 0
    local: Any = field(default_factory=lambda: LocalCandidates([HOST, SRFLX]))

    def relays_missing(self) -> bool:
        return False

    def stun_unanswered(self) -> bool:
        return self.unanswered[min(self.regathers, len(self.unanswered) - 1)]

    async def regather(self) -> bool:
        self.regathers += 1
        return True  # the server-reflexive candidate is new

    def public_endpoint(self) -> str | None:
        return "203.0.113.10:40000"


@dataclass
class FakeNegotiator:
    restarted_all: int = 0

    async def restart_all(self) -> None:
        self.restarted_all += 1


class QuietKeybase:
    async def refresh(self, _due: bool) -> bool:
        return True


async def test_an_unanswered_stun_server_is_asked_again_until_it_answers() -> None:
    paths = FakePaths(unanswered=[True, False])
    negotiator = FakeNegotiator()
    options = type("O", (), {"endpoint": None, "refresh_s": REFRESH_S,
                             "reannounce_s": 3600.0})()
    none = cast(Any, None)
    keeper = Upkeep(cast(Any, options), none, none, none, none, none, cast(Any, paths),
                    cast(Any, negotiator), none, owner=none)
    keeper._keybase = cast(Any, QuietKeybase())
    refresh = asyncio.create_task(keeper._refresh())
    try:
        await asyncio.sleep(FIRST_REFRESH_S + 0.1)
        # Asked again at the first refresh; the new candidate renegotiates with everyone.
        assert paths.regathers == 1 and negotiator.restarted_all == 1
        await asyncio.sleep(3 * REFRESH_S)
        assert paths.regathers == 1, "asked again after it answered"
    finally:
        refresh.cancel()
