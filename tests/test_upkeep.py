"""Upkeep's repair of a lost path: STUN again at once, then renegotiate with everyone
when our candidates changed, else with that peer only (and not over and over)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from virtual_clock import VIRTUAL_CLOCK

from kbwg.agent.upkeep import FIRST_REFRESH_S, LOST_PATH_SPACING_S, Upkeep
from kbwg.core.identity import DeviceId

pytestmark = VIRTUAL_CLOCK

BOB = DeviceId("bob", "desk")


@dataclass
class FakePaths:
    changes: list[bool]
    public: str | None = "203.0.113.12:51820"
    regathers: int = 0
    local: Any = field(default_factory=lambda: type("L", (), {"candidates": []})())

    async def regather(self) -> bool:
        self.regathers += 1
        return self.changes.pop(0)

    def public_endpoint(self) -> str | None:
        return self.public


@dataclass
class FakeNegotiator:
    restarted: list[DeviceId] = field(default_factory=list)
    restarted_all: int = 0

    async def restart(self, peer: DeviceId) -> bool:
        self.restarted.append(peer)
        return True

    async def restart_all(self) -> None:
        self.restarted_all += 1


@dataclass
class FakePresence:
    followed: int = 0

    async def follow_network(self, given: str | None) -> None:
        self.followed += 1


@dataclass
class FakePeerSync:
    forgotten: int = 0

    async def forget_sources(self) -> None:
        self.forgotten += 1


def upkeep(paths: FakePaths, negotiator: FakeNegotiator, presence: FakePresence,
           peer_sync: FakePeerSync | None = None) -> Upkeep:
    options = type("O", (), {"endpoint": None})()
    none = cast(Any, None)
    return Upkeep(cast(Any, options), none, none, cast(Any, presence),
                  cast(Any, peer_sync or FakePeerSync()), none, cast(Any, paths),
                  cast(Any, negotiator), none, owner=none)


async def test_lost_path_with_unchanged_candidates_restarts_that_peer_once() -> None:
    paths, negotiator, presence = FakePaths([False, False]), FakeNegotiator(), FakePresence()
    keeper = upkeep(paths, negotiator, presence)
    await keeper.on_path_lost(BOB, fell_back=False)
    assert paths.regathers == 1 and negotiator.restarted == [BOB]
    await keeper.on_path_lost(BOB, fell_back=False)  # flapping: not again so soon
    assert paths.regathers == 1 and negotiator.restarted == [BOB]

    await asyncio.sleep(LOST_PATH_SPACING_S)
    await keeper.on_path_lost(BOB, fell_back=True)  # another pair took over: STUN only
    assert paths.regathers == 2 and negotiator.restarted == [BOB]
    assert negotiator.restarted_all == 0 and presence.followed == 0


async def test_lost_path_after_a_new_public_address_renegotiates_with_everyone() -> None:
    paths, negotiator, presence = FakePaths([True]), FakeNegotiator(), FakePresence()
    await upkeep(paths, negotiator, presence).on_path_lost(BOB, fell_back=False)
    assert negotiator.restarted_all == 1 and negotiator.restarted == []
    # The new public endpoint is announced by the end of the gathering, not here.
    assert presence.followed == 0


async def test_without_stun_a_change_announces_the_host_address() -> None:
    paths = FakePaths([True], public=None)
    negotiator, presence = FakeNegotiator(), FakePresence()
    await upkeep(paths, negotiator, presence).on_network_change()
    assert presence.followed == 1 and negotiator.restarted_all == 1


async def test_an_address_gone_has_wireguard_pick_its_source_again_once_at_a_time() -> None:
    """wireguard-go sends from the address it last used with a peer: after a move to
    another network, until told to pick anew, from one the host no longer has."""
    peer_sync = FakePeerSync()
    keeper = upkeep(FakePaths([]), FakeNegotiator(), FakePresence(), peer_sync=peer_sync)
    keeper.on_address_gone()
    keeper.on_address_gone()  # the same burst, while the first is under way
    await asyncio.sleep(0.01)
    assert peer_sync.forgotten == 1
    keeper.on_address_gone()  # a later one
    await asyncio.sleep(0.01)
    assert peer_sync.forgotten == 2


class FlakyKeybase:
    """A refresh that fails once (a bug, or an input nothing refused), then works."""

    def __init__(self) -> None:
        self.passes = 0

    async def refresh(self, _due: bool) -> bool:
        self.passes += 1
        if self.passes == 1:
            raise RuntimeError("one bad line")
        return False


async def test_a_failed_refresh_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    paths = FakePaths([])
    paths.relays_missing = lambda: False  # type: ignore[attr-defined]
    keeper = upkeep(paths, FakeNegotiator(), FakePresence())
    keeper._options = cast(Any, type("O", (), {"endpoint": None, "refresh_s": 30.0,
                                               "reannounce_s": 1800.0})())
    flaky = FlakyKeybase()
    keeper._keybase = cast(Any, flaky)
    refresh = asyncio.create_task(keeper._refresh())
    try:
        await asyncio.sleep(FIRST_REFRESH_S + 30.0 + 1.0)
        assert not refresh.done(), "the refresh loop ended with the failure"
    finally:
        refresh.cancel()
    assert flaky.passes == 2
    assert "refresh failed" in caplog.text and "one bad line" in caplog.text
