"""Chat robustness (issue 13 part 5): dev-channel messages the listener never got are
taken from the history at the next refresh, every message is taken once however it
came, and calls do not wait behind one another's round trips."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_daemon import STANDIN, FakeOwner, env_for, new_key, no_routes
from test_keybase_client import write_script

from kbwg.agent.chat_dispatch import SeenMessages
from kbwg.agent.daemon import Agent, JoinedDevice, JoinOptions
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient
from kbwg_testing import wait_for

TEAM = "t1"
ANNOUNCE = Channel(TEAM, "announce", "chat")
DEV = Channel(TEAM, "kbwg", "dev")


def message(msg_id: int, conv: str = "c1") -> ChatMessage:
    return ChatMessage(msg_id, conv, DEV, "bob", "desk", 0.0, "x", "text")


def test_seen_messages_by_conversation_and_id_bounded() -> None:
    seen = SeenMessages(cap=3)
    assert seen.first_time(message(1)) and seen.first_time(message(1, "c2"))
    assert not seen.first_time(message(1))
    assert message(1) in seen
    seen.first_time(message(2))
    seen.first_time(message(3))
    assert message(1) not in seen and message(3) in seen  # the oldest went first


@pytest.fixture
async def make_agent(tmp_path: Path) -> AsyncIterator[
        Callable[..., Any]]:
    """Starts alice's agent (refresh every 0.3 s) with extra stand-in variables, bob
    announced as its peer; returns (device, dev message ids the negotiator got, bob)."""
    home = tmp_path / "kb"
    peers = [{"username": "alice", "device": "laptop", "ip": "100.64.0.1"},
             {"username": "bob", "device": "desk", "ip": "100.64.0.2"}]
    (home / "kbfs" / "team" / TEAM).mkdir(parents=True)
    (home / "kbfs" / "team" / TEAM / "peers.json").write_text(json.dumps(peers))
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    clients: list[KeybaseClient] = []

    async def start(**standin_env: str) -> tuple[JoinedDevice, list[int], KeybaseClient]:
        owner = FakeOwner()

        async def factory(_command: list[str] | None) -> Any:
            return owner

        options = JoinOptions(team=TEAM, state_dir=tmp_path / "state", endpoint="198.18.0.5",
                              refresh_s=0.3, announced_fallback_s=0.1)
        options.state_dir.mkdir()
        joined: list[JoinedDevice] = []
        keybase = KeybaseClient(STANDIN, env={**env_for(home, "alice", "laptop"),
                                              **standin_env})
        agent = Agent(options, keybase, owner_factory=factory, routes=no_routes,
                      on_joined=joined.append)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        stops.append((stop, task))
        await wait_for(lambda: bool(joined) or task.done(), "the agent to join", timeout=60)
        device = joined[0]
        handled: list[int] = []
        assert device.negotiator is not None

        async def spy(msg: Any) -> None:
            handled.append(msg.id)

        # Whatever reaches the negotiator, by push or by re-read.
        device.negotiator.handle = spy  # type: ignore[method-assign]

        bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))
        clients.append(bob)
        key = new_key()
        await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
        await wait_for(lambda: key in owner.peers, "bob to be a peer", timeout=30)
        return device, handled, bob

    yield start
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, 30)
    for c in clients:
        await c.close()


def refreshes(device: JoinedDevice) -> Callable[[], int]:
    """How many dev-channel re-reads the agent has finished from now on."""
    done = [0]
    original = device.chat.reread

    async def counted() -> int:
        result = await original()
        done[0] += 1
        return result

    device.chat.reread = counted  # type: ignore[method-assign]
    return lambda: done[0]


async def test_dev_message_missed_by_the_listener_is_taken_from_the_history(
    make_agent: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent.chat_dispatch")
    # This listener loses every dev-channel push, as the real service loses the ones
    # sent while it reconnects.
    device, handled, bob = await make_agent(KBWG_STANDIN_DROP_PUSHES="dev")
    msg_id = await bob.send(DEV, "sealed negotiation message")
    await wait_for(lambda: msg_id in handled, "the missed message, from the history",
                   timeout=30)
    done = refreshes(device)
    await wait_for(lambda: done() >= 3, "three more re-reads", timeout=30)
    assert handled.count(msg_id) == 1
    assert any(f"message {msg_id} from bob/desk" in r.getMessage()
               and "not pushed" in r.getMessage() for r in caplog.records)


async def test_a_message_pushed_and_read_again_is_taken_once(
    make_agent: Callable[..., Any]
) -> None:
    device, handled, bob = await make_agent()
    done = refreshes(device)
    ids = [await bob.send(DEV, f"message {n}") for n in range(3)]
    await wait_for(lambda: all(i in handled for i in ids), "the pushes", timeout=30)
    start = done()
    await wait_for(lambda: done() >= start + 3, "three re-reads that see them again",
                   timeout=30)
    assert sorted(handled) == ids


# --------------------------------------------------------------------------- concurrency


async def test_sends_are_not_serialised_behind_each_other(tmp_path: Path) -> None:
    """A `chat api` whose replies wait for the test: three sends are in flight at once
    (three pipes), where one pipe would hold the second until the first's reply."""
    gate = tmp_path / "release"
    inbox = tmp_path / "requests"
    inbox.mkdir()
    script = f"""
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
if args[:2] != ["chat", "api"]:
    sys.exit(2)
n = 0
for line in sys.stdin:
    n += 1
    Path({str(inbox)!r}, f"{{os.getpid()}}-{{n}}").write_text(line)
    while not Path({str(gate)!r}).exists():
        time.sleep(0.01)
    print(json.dumps({{"result": {{"message": "message sent", "id": os.getpid()}}}}),
          flush=True)
"""
    client = KeybaseClient(write_script(tmp_path / "keybase", script))
    try:
        sends = [asyncio.create_task(client.send(DEV, f"m{n}")) for n in range(3)]
        await wait_for(lambda: len(list(inbox.iterdir())) == 3,
                       "three requests in flight at once", timeout=60)
        gate.touch()
        ids = await asyncio.wait_for(asyncio.gather(*sends), 60)
        assert len(set(ids)) == 3  # each on its own pipe
        # Afterwards the pipes are reused, not restarted.
        assert await client.send(DEV, "again") in ids
    finally:
        gate.touch()
        await client.close()
