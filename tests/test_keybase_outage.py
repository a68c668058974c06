"""Keybase outages (issue 15 part 2): the client's link state, its backoff and once-only
log lines, and the rate-limit hold (on a virtual clock, with scripted processes); the
stand-in's service stopped and started; and an agent that keeps its peers through an
outage and catches up when Keybase is back (against the stand-in, on real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_daemon import STANDIN, FakeOwner, env_for, new_key, no_routes
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until, now

from kbwg.agent import upkeep
from kbwg.agent.control import call
from kbwg.agent.daemon import Agent, JoinedDevice, JoinOptions
from kbwg.agent.keybase import (
    Channel,
    KeybaseClient,
    KeybaseRateLimited,
    KeybaseUnavailable,
)
from kbwg.agent.keybase_link import Backoff
from kbwg.agent.status_view import render_status
from kbwg_standin.ctl import start_service, stop_service
from kbwg_testing import wait_for

pytestmark = VIRTUAL_CLOCK

TEAM = "t1"
ANNOUNCE = Channel(TEAM, "announce", "chat")
DEV = Channel(TEAM, "kbwg", "dev")
DIAL = "\u25b6 ERROR dial unix /run/user/1000/keybase/keybased.sock: connect: no such file"
LOST = "\u25b6 ERROR connection to service lost: error during ping: EOF"
READY = "Listening for chat notifications. Config: ..."


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_to_30s_jittered_down_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    nominal = [1, 2, 4, 8, 16, 30, 30, 30]
    for delay, nom in zip(delays, nominal, strict=True):
        assert 0.8 * nom <= delay <= nom
    assert len({round(d / n, 6) for d, n in zip(delays, nominal, strict=True)}) > 1, \
        "jittered: not every delay is the same fraction of its nominal value"
    backoff.reset()
    assert 0.8 <= backoff.next() <= 1.0


# --------------------------------------------------------------------------- listener


class FakeProc:
    """A `keybase chat api-listen` as asyncio sees it: output fed by the test."""

    def __init__(self, stderr: list[str], *, running: bool) -> None:
        self.pid = 0
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        for line in stderr:
            self.stderr.feed_data(line.encode() + b"\n")
        self.returncode: int | None = None
        self._done = asyncio.Event()
        if not running:
            self.end(2)

    def end(self, rc: int, stderr: str | None = None) -> None:
        if stderr is not None:
            self.stderr.feed_data(stderr.encode() + b"\n")
        self.returncode = rc
        self.stdout.feed_eof()
        self.stderr.feed_eof()
        self._done.set()

    def kill(self) -> None:
        if self.returncode is None:
            self.end(-9)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode


async def coarsely_until(predicate: Callable[[], object], what: str) -> None:
    """advance_until in half-second steps: the waits here are many virtual seconds, and
    the restarts they wait for are seconds apart."""
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} not met within 200s (virtual)")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[KeybaseClient, list[float], list[FakeProc]]]:
    """A client whose api-listen is up at first, then fails (the service is down) until
    the test says `up` again: returns the client, the spawn times and the processes."""
    client = KeybaseClient("keybase-not-run")
    times: list[float] = []
    procs: list[FakeProc] = []
    client.service_up = True  # type: ignore[attr-defined]

    async def spawn(*_args: str, stdin: Any = None) -> Any:
        times.append(now())
        up = client.service_up  # type: ignore[attr-defined]
        proc = FakeProc([READY] if up else [DIAL], running=up)
        procs.append(proc)
        return proc

    client._spawn = spawn  # type: ignore[method-assign]
    yield client, times, procs
    await client.close()


async def test_listener_reconnects_with_backoff_and_says_so_once(
    scripted: tuple[KeybaseClient, list[float], list[FakeProc]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, times, procs = scripted
    caplog.set_level(logging.DEBUG, logger="kbwg.agent")

    async def consume() -> None:
        async for _ in client.listen():
            pass

    task = asyncio.create_task(consume())
    back = asyncio.create_task(client.link.wait_back())
    await advance_until(lambda: len(times) == 1, what="the first listener")
    await asyncio.sleep(60)  # a long quiet time: nothing restarts a working listener
    assert len(times) == 1 and client.link.connected

    client.service_up = False  # type: ignore[attr-defined]
    lost_at = now()
    procs[0].end(2, LOST)
    await advance_until(lambda: not client.link.connected, what="the link lost")
    assert client.link.to_json()["down_since"] is not None
    # Seven failed restarts, then one that works once the service is up.
    await coarsely_until(lambda: len(times) == 8, what="seven restarts")
    assert not back.done()
    client.service_up = True  # type: ignore[attr-defined]
    await coarsely_until(lambda: client.link.connected, what="the link back")
    await asyncio.wait_for(back, 1)

    # The first restart a second after the loss (the listener had run long enough for
    # the backoff to start over), then 2, 4, 8, 16, 30, 30, 30 s apart, each jittered
    # down by up to 20 %.
    gaps = [b - a for a, b in itertools.pairwise([lost_at, *times[1:]])]
    assert len(gaps) == 8
    for gap, nominal in zip(gaps, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert 0.8 * nominal - 0.01 <= gap <= nominal + 0.01, gaps
    link = client.link.to_json()
    assert (link["connected"], link["down_since"], link["reconnects"]) == (True, None, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    away = [m for m in warnings if "unreachable" in m]
    assert len(away) == 1 and "connection to service lost" in away[0]
    returned = [m for m in warnings if "is back after" in m]
    down_for = times[-1] - lost_at
    assert len(returned) == 1 and f"back after {down_for:.0f}s" in returned[0], returned
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_listener_restarts_at_once_when_another_call_finds_the_service_back(
    scripted: tuple[KeybaseClient, list[float], list[FakeProc]],
) -> None:
    client, times, procs = scripted

    async def consume() -> None:
        async for _ in client.listen():
            pass

    task = asyncio.create_task(consume())
    await advance_until(lambda: len(times) == 1, what="the first listener")
    client.service_up = False  # type: ignore[attr-defined]
    procs[0].end(2, LOST)
    await coarsely_until(lambda: len(times) == 4, what="three failed restarts")
    # The next restart is about 8 s away; a call that gets through (the refresh's probe,
    # or a join waiting for the service at boot) brings it forward.
    await asyncio.sleep(1.5)
    client.service_up = True  # type: ignore[attr-defined]
    back_at = now()
    client.link.ok()
    await advance_until(lambda: len(times) == 5, what="the listener restarted")
    assert times[-1] - back_at < 0.01
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- rate limits


def rate_limited(reset: int | None) -> bytes:
    data: dict[str, Any] = {"name": "chat", "callsRemaining": 0, "maxCalls": 5}
    if reset is not None:
        data["windowReset"] = reset
    return json.dumps({"error": {"code": 0, "message": "API rate limit exceeded",
                                 "data": data}}).encode()


SENT = json.dumps({"result": {"message": "message sent", "id": 9}}).encode()


def scripted_calls(client: KeybaseClient, replies: list[bytes]) -> list[float]:
    """Replace the pipes: each call takes the next reply; returns the calls' times."""
    times: list[float] = []

    async def call_once(_method: str, _line: bytes) -> bytes:
        times.append(now())
        return replies.pop(0)

    client._call_once = call_once  # type: ignore[method-assign]
    return times


async def test_rate_limit_holds_every_call_until_the_window_resets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = KeybaseClient("keybase-not-run")
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    times = scripted_calls(client, [rate_limited(5), rate_limited(5), SENT, SENT])
    start = now()
    first = asyncio.create_task(client.send(ANNOUNCE, "one"))
    await advance_until(lambda: len(times) == 1)
    assert client.link.to_json()["rate_limited_until"] is not None
    # A second send meanwhile waits too instead of hitting the API.
    second = asyncio.create_task(client.send(ANNOUNCE, "two"))
    assert await asyncio.wait_for(first, 30) == 9
    assert await asyncio.wait_for(second, 30) == 9
    assert [round(t - start, 3) for t in times] == [0, 5, 10, 10]
    assert client.link.to_json()["rate_limited_until"] is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("rate limit reached" in m for m in messages) == 1
    assert sum("rate limit over" in m for m in messages) == 1
    assert client.link.rate_limits == 1


async def test_rate_limit_without_a_window_backs_off_then_gives_up() -> None:
    client = KeybaseClient("keybase-not-run")
    times = scripted_calls(client, [rate_limited(None)] * 4)
    start = now()
    with pytest.raises(KeybaseRateLimited, match="rate limit"):
        await client.send(ANNOUNCE, "x")
    assert times[0] == start and len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Doubling from 1 s (jittered down by up to 20 %), four tries in all.
    for gap, nominal in zip(gaps, [1, 2, 4], strict=True):
        assert 0.8 * nominal - 0.001 <= gap <= nominal + 0.001, gaps


# --------------------------------------------------------------------------- stand-in


def standin(home: Path, *args: str, user: str | None = "alice",
            device: str | None = "laptop") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KBWG_STANDIN_HOME": str(home)}
    env.pop("KBWG_STANDIN_USER", None)
    env.pop("KBWG_STANDIN_DEVICE", None)
    if user and device:
        env.update(KBWG_STANDIN_USER=user, KBWG_STANDIN_DEVICE=device)
    return subprocess.run([sys.executable, "-m", "kbwg_standin", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@REAL_CLOCK
def test_standin_service_stop_and_start(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    assert standin(home, "whoami", "--json").returncode == 0
    listen = subprocess.Popen(
        [sys.executable, "-m", "kbwg_standin", "chat", "api-listen", "--dev"],
        env={**os.environ, **env_for(home, "alice", "laptop")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pipe = subprocess.Popen(
        [sys.executable, "-m", "kbwg_standin", "chat", "api"],
        env={**os.environ, **env_for(home, "alice", "laptop")},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stderr is not None and pipe.stdin is not None and pipe.stdout is not None
        assert listen.stderr.readline().startswith("Listening for chat notifications")
        pipe.stdin.write('{"method": "list"}\n')
        pipe.stdin.flush()
        assert "result" in json.loads(pipe.stdout.readline())
        # One device's service stopped: only its commands fail.
        assert standin(home, "ctl", "stop").returncode == 0
        stopped = standin(home, "whoami", "--json")
        assert stopped.returncode == 2
        assert "\u25b6 ERROR dial unix" in stopped.stderr and "keybased.sock" in stopped.stderr
        assert standin(home, "whoami", "--json", user="bob", device="desk").returncode == 0
        assert standin(home, "ctl", "status").stdout.strip() == "stopped"
        # What was running exits, as with the real service gone.
        assert listen.wait(30) == 2
        assert "connection to service lost" in listen.stderr.read()
        assert pipe.wait(30) == 2
        assert standin(home, "ctl", "start").returncode == 0
        assert standin(home, "whoami", "--json").returncode == 0
        # Without a device, every service.
        assert standin(home, "service", "stop", user=None, device=None).returncode == 0
        assert standin(home, "whoami", "--json", user="bob", device="desk").returncode == 2
        assert standin(home, "service", "start", user=None, device=None).returncode == 0
        assert standin(home, "whoami", "--json", user="bob", device="desk").returncode == 0
    finally:
        for proc in (listen, pipe):
            proc.kill()
            proc.wait()


@REAL_CLOCK
def test_standin_rate_limit_is_reported_like_the_real_service(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    send = json.dumps({"method": "send", "params": {"options": {
        "channel": ANNOUNCE.to_json(), "message": {"body": "hi"}}}})
    env = {**os.environ, **env_for(home, "alice", "laptop"), "KBWG_STANDIN_RATE_LIMIT": "2/60"}
    out = subprocess.run([sys.executable, "-m", "kbwg_standin", "chat", "api"],
                         input="\n".join([send] * 3) + "\n", env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    replies = [json.loads(line) for line in out]
    assert [r.get("result", {}).get("id") for r in replies[:2]] == [1, 2]
    error = replies[2]["error"]
    assert error["code"] == 0 and "rate limit" in error["message"]
    assert error["data"]["name"] == "chat" and error["data"]["callsRemaining"] == 0
    assert 0 < error["data"]["windowReset"] <= 60 and error["data"]["maxCalls"] == 2


@REAL_CLOCK
async def test_client_link_follows_the_standin_service(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    client = KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop"))
    try:
        await client.send(ANNOUNCE, "before")
        assert client.link.connected
        stop_service(home, "alice", "laptop")
        pipe = client._pipe
        assert pipe is not None
        await asyncio.wait_for(pipe.proc.wait(), 30)  # it dies with its service
        with pytest.raises(KeybaseUnavailable, match="dial unix"):
            await client.send(ANNOUNCE, "during")
        assert not client.link.connected and not await client.probe()
        start_service(home, "alice", "laptop")
        assert await client.probe()
        assert client.link.reconnects == 1
        assert await client.send(ANNOUNCE, "after") == 2
    finally:
        await client.close()


# --------------------------------------------------------------------------- the agent


@pytest.fixture
async def agent_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[Path, FakeOwner, Agent, list[JoinedDevice], Callable[[str, str], KeybaseClient]]]:
    home = tmp_path / "kb"
    peers = [{"username": "alice", "device": "laptop", "ip": "100.64.0.1"},
             {"username": "bob", "device": "desk", "ip": "100.64.0.2"},
             {"username": "carol", "device": "nas", "ip": "100.64.0.3"}]
    (home / "kbfs" / "team" / TEAM).mkdir(parents=True)
    (home / "kbfs" / "team" / TEAM / "peers.json").write_text(json.dumps(peers))
    # No periodic refresh in the test's time: only the catch-up can bring news.
    monkeypatch.setattr(upkeep, "FIRST_REFRESH_S", 3600.0)
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    options = JoinOptions(team=TEAM, state_dir=tmp_path / "state", endpoint="198.18.0.5",
                          refresh_s=3600.0, announced_fallback_s=0.1)
    options.state_dir.mkdir()
    joined: list[JoinedDevice] = []
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop"),
                                         listen_backoff=(0.2, 1.0)),
                  owner_factory=factory, routes=no_routes, on_joined=joined.append)
    clients: dict[str, KeybaseClient] = {}

    def client(user: str, device: str) -> KeybaseClient:
        if user not in clients:
            clients[user] = KeybaseClient(STANDIN, env=env_for(home, user, device))
        return clients[user]

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_for(lambda: bool(joined) or task.done(), "the agent to join", timeout=60)
    try:
        yield home, owner, agent, joined, client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        for c in clients.values():
            await c.close()


@REAL_CLOCK
async def test_agent_keeps_its_peers_through_an_outage_and_catches_up(
    agent_world: tuple[Path, FakeOwner, Agent, list[JoinedDevice],
                       Callable[[str, str], KeybaseClient]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    home, owner, agent, joined, client = agent_world
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    device = joined[0]
    handled: list[int] = []
    assert device.negotiator is not None

    async def spy(msg: Any) -> None:
        handled.append(msg.id)

    device.negotiator.handle = spy  # type: ignore[method-assign]
    bob_key = new_key()
    await client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {bob_key}")
    await wait_for(lambda: owner.peers.get(bob_key, {}).get("endpoint"), "bob configured",
                   timeout=30)
    calls_before = len(owner.calls)

    stop_service(home, "alice", "laptop")
    state_dir = agent.options.state_dir
    await wait_for(lambda: not agent.keybase.link.connected,
                   "the agent to notice Keybase is away", timeout=30)
    status = await call(state_dir, "status")
    assert status["keybase"]["connected"] is False
    assert status["keybase"]["down_since"] is not None
    assert "Keybase unreachable" in render_status(status)
    # News while this device's Keybase is away: a new peer, and a negotiation message.
    carol_key = new_key()
    await client("carol", "nas").send(ANNOUNCE, f"ANNOUNCE 198.18.0.7:51820 {carol_key}")
    dev_id = await client("bob", "desk").send(DEV, "sealed negotiation message")
    # A re-announcement due now fails, is kept, and is not fatal.
    assert not await device.presence.try_announce()
    assert device.presence.announce_pending
    await asyncio.sleep(1.5)  # several listener restarts, all failing
    assert not [op for op, _ in owner.calls[calls_before:] if op in ("remove_peer", "set_peer")]
    assert bob_key in owner.peers

    start_service(home, "alice", "laptop")
    await wait_for(lambda: carol_key in owner.peers, "carol picked up by the catch-up",
                   timeout=30)
    await wait_for(lambda: dev_id in handled, "the missed dev message taken", timeout=30)
    status = await call(state_dir, "status")
    assert status["keybase"]["connected"] is True and status["keybase"]["reconnects"] == 1
    assert status["keybase"]["down_since"] is None
    assert handled.count(dev_id) == 1
    await wait_for(lambda: not device.presence.announce_pending,
                   "the kept announcement sent", timeout=30)
    page = await client("bob", "desk").read(ANNOUNCE)
    assert sum(m.sender_username == "alice" and (m.body or "").startswith("ANNOUNCE ")
               for m in page.messages) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Keybase is unreachable" in m for m in messages) == 1
    assert sum("Keybase is back after" in m for m in messages) == 1


@REAL_CLOCK
def test_standin_listener_drops_the_first_pushes_it_is_told_to(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    env = {**os.environ, **env_for(home, "alice", "laptop"), "KBWG_STANDIN_DROP_PUSHES": "dev:1"}
    # Alice must be in the dev channel to be told about it.
    join = json.dumps({"method": "newconv", "params": {"options": {"channel": DEV.to_json()}}})
    subprocess.run([sys.executable, "-m", "kbwg_standin", "chat", "api"], input=join + "\n",
                   env=env, capture_output=True, text=True, timeout=60, check=True)
    listen = subprocess.Popen([sys.executable, "-m", "kbwg_standin", "chat", "api-listen", "--dev"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stderr is not None and listen.stdout is not None
        assert listen.stderr.readline().startswith("Listening for chat notifications")
        sends = "\n".join(json.dumps({"method": "send", "params": {"options": {
            "channel": DEV.to_json(), "message": {"body": f"dev {n}"}}}}) for n in (1, 2))
        subprocess.run([sys.executable, "-m", "kbwg_standin", "chat", "api"],
                       input=sends + "\n", env={**os.environ, **env_for(home, "bob", "desk")},
                       capture_output=True, text=True, timeout=60, check=True)
        pushed = json.loads(listen.stdout.readline())
        assert pushed["msg"]["content"]["text"]["body"] == "dev 2"  # the first one was lost
    finally:
        listen.kill()
        listen.wait()
