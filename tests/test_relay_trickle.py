"""A relay allocation is published the moment it is made (with the host and STUN
candidates already out), not when the whole gathering ends: the port mapping's grace
comes after it, and a peer behind a symmetric NAT can early-check nothing but our
relayed candidate, which reaches it only in a CANDIDATES line."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.connectivity import Connectivity
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.agent.relay_paths import RelayPaths
from kbwg.agent.teamconfig import RelayConfig, TeamConfig
from kbwg.core.interface_address import InterfaceAddress
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.wire import CandidateInfo

pytestmark = VIRTUAL_CLOCK

RELAY = RelayConfig("turn:203.0.113.3", "203.0.113.3", 3478, "s")
RELAYED = Candidate("relay", "203.0.113.3", 49152, None, candidate_priority("relay"),
                    "relay turn:203.0.113.3")
ALLOCATED_AT = 0.3
MAPPING_TAKES = 5.0  # a gateway that is slow to answer port mapping


class FakeOwner:
    transport = None

    async def interfaces(self) -> list[InterfaceAddress]:
        return [InterfaceAddress("eth0", 2, "198.18.1.10", 24, True, True)]

    async def default_gateway(self) -> None:
        return None


class FakePort:
    local_receiver: Any = None
    receiver: Any = None

    def from_source(self, _source: str) -> FakePort:
        return self

    async def close(self) -> None:
        pass


class FakeRelays(RelayPaths):
    async def ensure(self, relays: list[RelayConfig], timeout: float = 3.0) -> None:
        await asyncio.sleep(ALLOCATED_AT)
        self.made = True

    def candidates(self) -> list[Candidate]:
        return [RELAYED] if getattr(self, "made", False) else []

    async def close(self) -> None:
        pass


async def test_a_relay_allocation_is_published_before_gathering_ends() -> None:
    config = TeamConfig(relays=[RELAY])
    paths = Connectivity(cast(OwnerCalls, FakeOwner()), cast(OwnerStunTransport, FakePort()),
                         51820, "alice", config, lambda _a: None)
    paths.relays = FakeRelays("alice", 51820, lambda *_: None, lambda _a: None)

    async def slow_mapping() -> None:
        await asyncio.sleep(MAPPING_TAKES)

    paths.portmap.ensure = slow_mapping  # type: ignore[assignment, method-assign]
    published: list[tuple[float, list[str], bool]] = []

    def on_candidates(candidates: list[CandidateInfo], complete: bool) -> None:
        published.append((now(), [c.type for c in candidates], complete))

    paths.on_candidates = on_candidates
    start = now()
    try:
        await paths.start_gathering()
        with_relay = [(at - start, complete) for at, types, complete in published
                      if "relay" in types]
        # Published when the allocation came (not later, as part of the final list),
        # while the gathering was still incomplete.
        assert with_relay[0] == (ALLOCATED_AT, False)
        assert published[-1][1:] == (["host", "relay"], True)
        assert [c.type for c in paths.local.candidates] == ["host", "relay"]
    finally:
        await paths.close()
