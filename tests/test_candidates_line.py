"""Our CANDIDATES line (agent/early_wiring.py): candidates found after the announcement
(the relay allocation, usually a moment later) go out alone soon after, so a peer's
early checks have them before the offer; an announcement sent meanwhile, which carries
the line, makes that send unneeded (virtual clock)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.early_wiring import REPUBLISH_WAIT_S, CandidatesLine
from kbwg.negotiation.wire import CandidateInfo

pytestmark = VIRTUAL_CLOCK

KEY = "A" * 43 + "="
HOST = CandidateInfo("host", "198.18.1.10", 51820, 3, "host0")
SRFLX = CandidateInfo("srflx", "203.0.113.10", 51820, 2, "srflx1")
RELAY = CandidateInfo("relay", "203.0.113.3", 49152, 1, "relay2")


@dataclass
class Keybase:
    sent: list[tuple[float, str]] = field(default_factory=list)

    async def send(self, channel: Any, line: str) -> int:
        self.sent.append((now(), line))
        return len(self.sent)


def published() -> tuple[CandidatesLine, Keybase, list[CandidateInfo], list[Any]]:
    keybase = Keybase()
    candidates = [HOST, SRFLX]
    tasks: list[Any] = []
    line = CandidatesLine(cast(Any, SimpleNamespace(keybase=keybase, announce_channel="a")),
                          cast(Any, SimpleNamespace(public_key=KEY)), lambda: list(candidates),
                          lambda c: tasks.append(asyncio.ensure_future(c)))
    return line, keybase, candidates, tasks


async def test_a_relay_candidate_after_the_announcement_is_published_within_the_wait() -> None:
    line, keybase, candidates, tasks = published()
    first = line.line()
    assert first is not None and "relay:" not in first
    start = now()
    candidates.append(RELAY)
    line.changed()
    await asyncio.sleep(REPUBLISH_WAIT_S + 0.01)
    await asyncio.gather(*tasks)
    assert [(round(t - start, 3), text) for t, text in keybase.sent] == [
        (round(REPUBLISH_WAIT_S, 3), f"CANDIDATES {KEY} host:198.18.1.10:51820 "
                                     "srflx:203.0.113.10:51820 relay:203.0.113.3:49152")]
    assert REPUBLISH_WAIT_S <= 0.2  # well inside one chat delivery: before the offer


async def test_an_announcement_meanwhile_carries_it_and_nothing_more_is_sent() -> None:
    line, keybase, candidates, tasks = published()
    line.line()
    candidates.append(RELAY)
    line.changed()
    assert "relay:" in (line.line() or "")  # the next ANNOUNCE's line has it already
    await asyncio.sleep(REPUBLISH_WAIT_S + 0.01)
    assert keybase.sent == [] and tasks == []
