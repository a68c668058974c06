"""A relay's refusal to reach a peer (403 for another allocation on the same relay, at
every check's retransmit) is logged once at INFO, then at DEBUG while the reason stays
the same; a new reason, or the peer reachable again, is said again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from kbwg.turn.client import RelayAllocation

PEER = ("203.0.113.3", 49027)
OTHER = ("203.0.113.11", 16001)


@dataclass
class Protocol:
    """The TURN client protocol's send side: refuses while `refusal` is set."""

    refusal: str | None = "STUN transaction failed (403 - Forbidden)"
    peer_to_channel: dict[Any, int] = field(default_factory=dict)

    async def send_data(self, data: bytes, peer: Any) -> None:
        if self.refusal is not None:
            raise RuntimeError(self.refusal)


def allocation(protocol: Protocol) -> RelayAllocation:
    return RelayAllocation("turn:203.0.113.3:3478", ("203.0.113.3", 3478),
                           cast(Any, protocol), cast(Any, None), ("203.0.113.3", 47570),
                           None, 3.0)


async def send(relay: RelayAllocation, peer: tuple[str, int]) -> None:
    relay.send(b"check", peer)
    await asyncio.sleep(0)  # the bind-and-send task
    await asyncio.sleep(0)


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if "cannot reach" in r.getMessage()]


async def test_a_refusal_is_said_once_until_it_changes(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kbwg.turn.client")
    protocol = Protocol()
    relay = allocation(protocol)
    for _ in range(3):
        await send(relay, PEER)
    await send(relay, OTHER)
    levels = [level for level, _ in said(caplog)]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert relay.counters.send_errors == 4

    caplog.clear()
    protocol.refusal = "STUN transaction failed (508 - Insufficient Capacity)"
    await send(relay, PEER)  # another reason: said again
    protocol.refusal = None
    await send(relay, PEER)  # reachable: forgotten
    protocol.refusal = "STUN transaction failed (403 - Forbidden)"
    await send(relay, PEER)
    assert [level for level, _ in said(caplog)] == [logging.INFO, logging.INFO]
