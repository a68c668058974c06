"""The public endpoint STUN found reaches #announce even when it came while the first
announcement was being sent (the trickle saw no announcement yet and left it to
`introduce`), and is announced once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from kbwg.agent.joined import announce_if_moved


class Presence:
    def __init__(self, state: Any) -> None:
        self.sent: list[str] = []
        self._state = state

    async def announce(self) -> None:
        self.sent.append(self._state.announced_endpoint)


def world(public: str | None, given: str | None = None) -> tuple[Any, Any, Any, Presence]:
    options = SimpleNamespace(endpoint=given)
    paths = SimpleNamespace(public_endpoint=lambda: public)
    state = SimpleNamespace(announced_endpoint="198.18.1.10:51820")
    return options, paths, state, Presence(state)


async def test_a_public_endpoint_found_late_is_announced_once() -> None:
    options, paths, state, presence = world("203.0.113.10:51820")
    for _ in range(2):  # introduce and the trickle both look
        await announce_if_moved(options, paths, state, cast(Any, presence))
    assert presence.sent == ["203.0.113.10:51820"]


async def test_nothing_new_or_a_given_endpoint_is_not_announced_again() -> None:
    for public, given in ((None, None), ("198.18.1.10:51820", None),
                          ("203.0.113.10:51820", "192.0.2.5:51820")):
        options, paths, state, presence = world(public, given)
        await announce_if_moved(options, paths, state, cast(Any, presence))
        assert presence.sent == [], (public, given)
