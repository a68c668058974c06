"""`join` at boot: a Keybase service that does not answer yet and a network with no
address yet are waited for, not errors (agent/startup_waits.py).

The retry timing runs on a virtual clock with scripted reads; the agent itself joins
against the stand-in, whose service is stopped when `join` starts (real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_daemon import STANDIN, FakeOwner, env_for, new_key, no_routes
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until, now

from kbwg.agent.daemon import Agent, JoinedDevice, JoinOptions
from kbwg.agent.join_options import JoinError, NoAddressToAnnounce
from kbwg.agent.keybase import (
    Channel,
    KeybaseClient,
    KeybaseServiceDown,
    KeybaseUnavailable,
)
from kbwg.agent.keybase_link import KeybaseLink
from kbwg.agent.startup_waits import ADDRESS_POLL_S, KEYBASE_RETRY_S, StartupWaits
from kbwg_standin.ctl import start_service, stop_service
from kbwg_testing import wait_for

pytestmark = VIRTUAL_CLOCK

TEAM = "t1"
ANNOUNCE = Channel(TEAM, "announce", "chat")


def failing(times: list[float], failures: int,
            error: Callable[[], Exception]) -> Callable[[], Awaitable[str]]:
    """A read that fails `failures` times (recording when it was tried), then works."""

    async def read() -> str:
        times.append(now())
        if len(times) <= failures:
            raise error()
        return "read"

    return read


def service_down(link: KeybaseLink) -> KeybaseServiceDown:
    link.lost("dial unix /run/user/1000/keybase/keybased.sock: connect: no such file")
    return KeybaseServiceDown("the service is not running")


async def test_a_keybase_read_is_retried_until_the_service_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kbwg.agent")
    link = KeybaseLink(joining=True)
    waits = StartupWaits(link)
    times: list[float] = []
    assert await waits.keybase(failing(times, 5, lambda: service_down(link))) == "read"
    # 0.5 s doubling to 5 s, each jittered down by up to 20 %.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    initial, most = KEYBASE_RETRY_S
    nominals = [min(initial * 2 ** n, most) for n in range(5)]
    assert nominals[-1] == most
    for gap, nominal in zip(gaps, nominals, strict=True):
        assert 0.8 * nominal - 0.01 <= gap <= nominal + 0.01, gaps
    messages = [r.getMessage() for r in caplog.records]
    assert sum("waiting for the Keybase service before joining" in m for m in messages) == 1
    assert sum("Keybase is not answering" in m for m in messages) == 1


async def test_every_waiting_read_goes_as_soon_as_one_finds_the_service_back() -> None:
    link = KeybaseLink()
    waits = StartupWaits(link)
    times: list[float] = []
    reading = asyncio.create_task(
        waits.keybase(failing(times, 4, lambda: service_down(link))))
    await advance_until(lambda: len(times) == 4, timeout=10, what="four tries")
    # Its next try is up to 5 s away; another call that gets through (whoami) ends
    # the wait at once.
    back_at = now()
    link.ok()
    assert await reading == "read"
    assert times[-1] - back_at < 0.01


async def test_what_no_wait_can_fix_ends_start_up_at_once() -> None:
    waits = StartupWaits(KeybaseLink())
    keybase: list[float] = []
    with pytest.raises(KeybaseUnavailable, match="not logged in"):
        await waits.keybase(failing(keybase, 1, lambda: KeybaseUnavailable("not logged in")))
    address: list[float] = []
    with pytest.raises(JoinError, match="bad file"):
        await waits.address(failing(address, 1, lambda: JoinError("bad file")))
    assert len(keybase) == len(address) == 1


async def test_no_address_yet_is_polled_until_one_comes_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kbwg.agent")
    times: list[float] = []
    found = await StartupWaits.address(
        failing(times, 3, lambda: NoAddressToAnnounce("found no IPv4 address to announce")))
    assert found == "read"
    assert [round(b - a, 3) for a, b in itertools.pairwise(times)] == \
        [ADDRESS_POLL_S] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("waiting for one" in m for m in messages) == 1
    assert sum("came up after 3s" in m for m in messages) == 1


def test_a_wait_before_joining_is_not_a_reconnection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kbwg.agent")
    link = KeybaseLink(joining=True)
    link.lost("dial unix: no such file")
    link.ok()
    assert link.reconnects == 0
    link.joining = False
    link.lost("connection to service lost")
    link.ok()
    assert link.reconnects == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "tunnel" not in messages[0] and "joining" in messages[1]
    assert "every tunnel stays up" in messages[2] and "catching up" in messages[3]


# --------------------------------------------------------------------------- the agent


class BootingOwner(FakeOwner):
    """A device owner on a host whose network has no address until `network_up`."""

    network_up = False

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        if op == "interfaces" and not self.network_up:
            self.calls.append((op, args))
            return {"addresses": []}
        return await super().request(op, **args)


@dataclass
class Running:
    """`join` as alice, run by a test, and bob's Keybase client."""

    home: Path
    agent: Agent
    joined: list[JoinedDevice]
    task: asyncio.Task[None]
    bob: KeybaseClient

    async def says(self, caplog: pytest.LogCaptureFixture, text: str) -> None:
        """Wait until the agent logs `text`; it must still be running then."""
        await wait_for(lambda: self.task.done() or any(
            text in r.getMessage() for r in caplog.records), f"join to say {text!r}",
            timeout=30)
        assert not self.task.done(), f"join must wait ({text}), not fail"

    async def joins(self) -> JoinedDevice:
        await wait_for(lambda: bool(self.joined) or self.task.done(), "join to join",
                       timeout=30)
        assert self.joined, self.task
        return self.joined[0]


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, owner: FakeOwner,
                        endpoint: str | None) -> AsyncIterator[Running]:
    """alice's `join` started (peers.json lists alice and bob), stopped at the end."""
    home = tmp_path / "kb"
    peers = [{"username": "alice", "device": "laptop", "ip": "100.64.0.1"},
             {"username": "bob", "device": "desk", "ip": "100.64.0.2"}]
    (home / "kbfs" / "team" / TEAM).mkdir(parents=True)
    (home / "kbfs" / "team" / TEAM / "peers.json").write_text(json.dumps(peers))

    async def factory(_command: list[str] | None) -> Any:
        return owner

    options = JoinOptions(team=TEAM, state_dir=tmp_path / "state", endpoint=endpoint,
                          refresh_s=3600.0, announced_fallback_s=0.1)
    options.state_dir.mkdir()
    joined: list[JoinedDevice] = []
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory, routes=no_routes, on_joined=joined.append)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))
    try:
        yield Running(home, agent, joined, task, bob)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bob.close()


@REAL_CLOCK
async def test_join_started_before_the_keybase_service_joins_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    home = tmp_path / "kb"
    stop_service(home)  # the whole machine's Keybase: not up yet
    owner = FakeOwner()
    async with running_agent(tmp_path, owner, "198.18.0.5") as run:
        await run.says(caplog, "waiting for the Keybase service")
        assert not run.joined and not run.agent.keybase.link.connected
        start_service(home)
        await run.joins()
        # Listening too: a peer's announcement made after the join configures it.
        bob_key = new_key()
        await run.bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {bob_key}")
        await wait_for(lambda: bob_key in owner.peers, "bob configured", timeout=30)
        link = run.agent.keybase.link.to_json()
        assert link["connected"] and link["reconnects"] == 0
        messages = [r.getMessage() for r in caplog.records]
        assert sum("Keybase answers after" in m for m in messages) == 1
        assert not any("every tunnel stays up" in m for m in messages)


@REAL_CLOCK
async def test_join_started_before_the_network_has_an_address_announces_it_when_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    owner = BootingOwner()
    async with running_agent(tmp_path, owner, None) as run:
        await run.says(caplog, "waiting for one")
        asked = sum(op == "interfaces" for op, _ in owner.calls)
        await wait_for(lambda: sum(op == "interfaces" for op, _ in owner.calls) > asked,
                       "the host's addresses read again", timeout=30)
        owner.network_up = True
        device = await run.joins()
        await wait_for(lambda: device.presence.announce_id is not None,
                       "the announcement", timeout=30)
        page = await run.bob.read(ANNOUNCE)
        assert [(m.body or "").split()[1].rpartition(":")[0] for m in page.messages
                if (m.body or "").startswith("ANNOUNCE ")] == ["198.18.0.5"]
