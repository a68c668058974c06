"""The first announcement goes at once, with the host endpoint when STUN has not answered
yet (a LAN peer needs nothing else, and a STUN server that never answers delays no one);
the public endpoint STUN finds reaches #announce as soon as it is found (not when the
gathering ends), even when it came while the first announcement was being sent (the
trickle saw no announcement yet and left it to `introduce`), and is announced once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from kbwg.agent.joined import JoinedDevice, announce_if_moved, trickled


class Presence:
    def __init__(self, state: Any) -> None:
        self.sent: list[str] = []
        self._state = state
        self.announce_id: int | None = None

    async def announce(self) -> None:
        self.sent.append(self._state.announced_endpoint)
        self.announce_id = len(self.sent)


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


async def test_the_first_announcement_does_not_wait_for_stun() -> None:
    options, paths, state, presence = world(None)

    async def never(_timeout: float) -> None:
        raise AssertionError("introduce waited for STUN")

    paths.local_gathered = never
    synced: list[bool] = []

    async def sync() -> None:
        synced.append(True)

    device = SimpleNamespace(options=options, paths=paths, state=state, presence=presence,
                             peer_sync=SimpleNamespace(sync=sync))
    await JoinedDevice.introduce(cast(Any, device))
    assert presence.sent == ["198.18.1.10:51820"] and synced == [True]


async def test_a_public_endpoint_is_announced_when_stun_answers_mid_gathering() -> None:
    public: list[str] = []
    options, paths, state, presence = world(None)
    paths.public_endpoint = lambda: public[0] if public else None
    await presence.announce()  # the first announcement, with the host endpoint
    public.append("203.0.113.10:51820")
    # STUN answered; relays and port mapping are still under way (not complete).
    await trickled(None, options, paths, state, cast(Any, presence), [], complete=False)
    assert presence.sent == ["198.18.1.10:51820", "203.0.113.10:51820"]
    await trickled(None, options, paths, state, cast(Any, presence), [], complete=True)
    assert len(presence.sent) == 2
