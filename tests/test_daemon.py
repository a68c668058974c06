"""The join daemon against the Keybase stand-in, with an in-memory device owner.

These prove the control-plane rules without root: who becomes a peer, what is ignored
(malformed lines, unlisted senders, replays), key replacement, and that a broken
peers.json edit never loses the running state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from kbwg.agent.control import call
from kbwg.agent.daemon import Agent, JoinError, JoinOptions
from kbwg.agent.keybase import Channel, KeybaseClient

STANDIN = str(Path(sys.executable).parent / "kbwg-keybase-standin")
TEAM = "t1"
ANNOUNCE = Channel(TEAM, "announce", "chat")
PEERS = [
    {"username": "alice", "device": "laptop", "ip": "100.64.0.1"},
    {"username": "bob", "device": "desk", "ip": "100.64.0.2"},
    {"username": "carol", "device": "nas", "ip": "100.64.0.3"},
]


def new_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


@dataclass
class FakeOwner:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        if op == "create":
            return {"listen_port": args["listen_port"] or 40000, "backend": "memory",
                    "public_key": "x", "ifname": args["ifname"]}  # fmt: skip
        if op == "stun_open":
            return {"port": 40000}
        if op == "set_peer":
            self.peers[args["public_key"]] = args
        elif op == "remove_peer":
            self.peers.pop(args["public_key"], None)
        elif op == "stats":
            peers = [
                {"public_key": k, "endpoint": v["endpoint"], "last_handshake": 0,
                 "rx_bytes": 0, "tx_bytes": 0}
                for k, v in self.peers.items()
            ]  # fmt: skip
            return {"peers": peers}
        return {}

    async def close(self) -> None:
        self.closed = True


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@dataclass
class World:
    home: Path
    owner: FakeOwner
    agent: Agent
    clients: dict[str, KeybaseClient]

    def client(self, user: str, device: str) -> KeybaseClient:
        key = f"{user}/{device}"
        if key not in self.clients:
            self.clients[key] = KeybaseClient(STANDIN, env=env_for(self.home, user, device))
        return self.clients[key]

    def write(self, name: str, data: str) -> None:
        path = self.home / "kbfs" / "team" / TEAM / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)


def env_for(home: Path, user: str, device: str) -> dict[str, str]:
    return {"KBWG_STANDIN_HOME": str(home), "KBWG_STANDIN_USER": user,
            "KBWG_STANDIN_DEVICE": device}  # fmt: skip


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    home = tmp_path / "kb"
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    # The test's peers only announce (like the prototype): after the short fallback
    # delay they get their announced endpoint.
    options = JoinOptions(team=TEAM, state_dir=tmp_path / "state", endpoint="198.18.0.5",
                          refresh_s=0.2, announced_fallback_s=0.1)  # fmt: skip
    options.state_dir.mkdir()
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory)  # fmt: skip
    w = World(home, owner, agent, {})
    w.write("peers.json", json.dumps(PEERS))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_for(lambda: (tmp_path / "state" / "control.sock").exists() or task.done(),
                   "the agent's control socket")  # fmt: skip
    try:
        yield w
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        for client in w.clients.values():
            await client.close()
    assert owner.closed, "the device owner must be closed when the agent stops"


async def test_announced_peer_is_configured_and_shown(world: World) -> None:
    key = new_key()
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
    await wait_for(lambda: key in world.owner.peers, "bob to be configured")
    assert world.owner.peers[key]["allowed_ips"] == ["100.64.0.2/32"]
    await wait_for(lambda: world.owner.peers[key]["endpoint"] == "198.18.0.6:51820",
                   "the announced endpoint after the fallback delay")
    status = await call(world.agent.options.state_dir, "status")
    bob = next(p for p in status["peers"] if p["device"] == "desk")
    assert (bob["public_key"], bob["endpoint"], bob["overlay_ip"]) == (
        key, "198.18.0.6:51820", "100.64.0.2")
    carol = next(p for p in status["peers"] if p["device"] == "nas")
    assert carol["public_key"] is None and carol["endpoint"] is None
    # Our own announcement went out in the prototype's format.
    page = await world.client("bob", "desk").read(ANNOUNCE)
    ours = [m.body for m in page.messages if m.sender_username == "alice"]
    assert ours == [f"ANNOUNCE 198.18.0.5:51820 {world.agent.state.public_key}"]  # type: ignore[union-attr]


async def test_bad_announcements_are_ignored_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bob = world.client("bob", "desk")
    for body in ["hello there", "ANNOUNCE 198.18.0.6:51820 not-base64!",
                 "ANNOUNCE 198.18.0.6:99999 " + new_key(), "ANNOUNCE ::1:5 " + new_key()]:
        await bob.send(ANNOUNCE, body)
    mallory_key = new_key()
    # A forged body names another device; the sender comes from Keybase's metadata.
    await world.client("mallory", "evil").send(ANNOUNCE, f"ANNOUNCE 203.0.113.66:1 {mallory_key}")
    good = new_key()
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {good}")
    await wait_for(lambda: good in world.owner.peers, "bob's valid announcement")
    assert mallory_key not in world.owner.peers
    assert list(world.owner.peers) == [good]
    text = caplog.text
    assert "ignoring announcement from mallory/evil: not listed in peers.json" in text
    assert text.count("ignoring message") >= 4


async def test_new_key_replaces_old_peer_and_replay_is_ignored(world: World) -> None:
    bob = world.client("bob", "desk")
    first, second = new_key(), new_key()
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {first}")
    await wait_for(lambda: first in world.owner.peers, "first key")
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.7:51820 {second}")
    await wait_for(lambda: second in world.owner.peers, "second key")
    assert first not in world.owner.peers, "the old key must be removed"
    assert ("remove_peer", {"public_key": first}) in world.owner.calls
    # Replaying the older message (as a late or duplicated delivery) changes nothing.
    page = await bob.read(ANNOUNCE)
    old = next(m for m in page.messages if m.body and first in m.body)
    await world.agent._on_chat(replace(old))
    assert list(world.owner.peers) == [second]


async def test_broken_peers_json_keeps_running_state(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
    await wait_for(lambda: key in world.owner.peers, "bob")
    world.write("peers.json", "[{broken")
    await wait_for(lambda: "keeping the previous peer list" in caplog.text, "the refresh")
    assert key in world.owner.peers
    status = await call(world.agent.options.state_dir, "status")
    assert {p["device"] for p in status["peers"]} == {"desk", "nas"}
    # A valid edit that drops bob removes him.
    world.write("peers.json", json.dumps([PEERS[0], PEERS[2]]))
    await wait_for(lambda: key not in world.owner.peers, "bob's removal")


@pytest.mark.parametrize(
    ("peers", "message"),
    [
        ("[{broken", "not valid JSON"),
        (json.dumps(PEERS[1:]), "(alice/laptop) is not listed in /keybase/team/t1/peers.json"),
        (json.dumps([*PEERS, dict(PEERS[1], device="x")]), "duplicate address 100.64.0.2"),
    ],
)
async def test_join_refuses_bad_peers_json(tmp_path: Path, peers: str, message: str) -> None:
    home = tmp_path / "kb"
    path = home / "kbfs" / "team" / TEAM / "peers.json"
    path.parent.mkdir(parents=True)
    path.write_text(peers)
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    agent = Agent(JoinOptions(team=TEAM, state_dir=tmp_path, endpoint="198.18.0.5"),
                  KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory)  # fmt: skip
    with pytest.raises(JoinError, match=re.escape(message)):
        await agent.run(asyncio.Event())
    assert not any(op == "create" for op, _ in owner.calls)
    assert owner.closed


async def test_missing_peers_json_says_where_it_looked(tmp_path: Path) -> None:
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    agent = Agent(JoinOptions(team=TEAM, state_dir=tmp_path, endpoint="198.18.0.5"),
                  KeybaseClient(STANDIN, env=env_for(tmp_path / "kb", "alice", "laptop")),
                  owner_factory=factory)  # fmt: skip
    with pytest.raises(JoinError, match=re.escape("cannot use /keybase/team/t1/peers.json")):
        await agent.run(asyncio.Event())
    assert not (tmp_path / "control.sock").exists()
