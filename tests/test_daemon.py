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
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from kbwg.agent import upkeep
from kbwg.agent.control import call
from kbwg.agent.daemon import Agent, JoinedDevice, JoinError, JoinOptions
from kbwg.agent.keybase import Channel, KeybaseClient
from kbwg.agent.owner_client import OwnerError
from kbwg.agent.team_view import TeamView
from kbwg.agent.teamconfig import TeamConfig
from kbwg.core.identity import DeviceId
from kbwg_testing import wait_for

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
    # Keys whose handshake the device reports, with its time.
    handshakes: dict[str, float] = field(default_factory=dict)
    # No process: nothing for a later agent to wait for, and it never dies.
    pid: int = 0

    async def wait_gone(self) -> Any:
        await asyncio.Event().wait()

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        if op == "create":
            return {"listen_port": args["listen_port"] or 40000, "backend": "memory",
                    "public_key": "x", "ifname": args["ifname"]}  # fmt: skip
        if op == "stun_open":
            return {"port": 40000}
        if op == "interfaces":  # the owner reads the host's network for the agent
            return {"addresses": [{"interface": "eth9", "index": 2, "address": "198.18.0.5",
                                   "prefixlen": 24, "up": True, "default_route": True}]}
        if op == "host_routes":
            return {"destinations": []}
        if op == "set_peer":
            self.peers[args["public_key"]] = args
        elif op == "remove_peer":
            self.peers.pop(args["public_key"], None)
        elif op == "stats":
            peers = [
                {"public_key": k, "endpoint": v["endpoint"],
                 "last_handshake": self.handshakes.get(k, 0),
                 "rx_bytes": 0, "tx_bytes": 0}
                for k, v in self.peers.items()
            ]  # fmt: skip
            return {"peers": peers}
        return {}

    async def close(self) -> None:
        self.closed = True


def count_syncs(device: JoinedDevice, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many peer syncs the agent has finished from now on. "Nothing changes" is only
    shown by syncs that ran: waiting for a few beats sleeping and hoping they did."""
    done = [0]
    original = device.peer_sync.sync

    async def counted() -> None:
        await original()
        done[0] += 1

    monkeypatch.setattr(device.peer_sync, "sync", counted)
    return lambda: done[0]


async def no_routes(_own_ifname: str) -> list[Any]:
    """The host's routes for the overlay check: none, so tests do not depend on the
    machine they run on (the netns tests read real ones)."""
    return []


@dataclass
class World:
    home: Path
    owner: FakeOwner
    agent: Agent
    clients: dict[str, KeybaseClient]
    joined: list[JoinedDevice]

    @property
    def device(self) -> JoinedDevice:
        assert self.joined, "the agent has not joined"
        return self.joined[0]

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
    joined: list[JoinedDevice] = []
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory, routes=no_routes, on_joined=joined.append)  # fmt: skip
    w = World(home, owner, agent, {}, joined)
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
    ours = [m.body for m in page.messages if m.sender_username == "alice"
            and not (m.body or "").startswith("CANDIDATES ")]  # early checks' own line
    assert ours == [f"ANNOUNCE 198.18.0.5:51820 {world.device.state.public_key}"]


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
    await world.device.chat.on_message(replace(old))
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
    await refused_join(tmp_path, home, owner, message)
    assert not any(op == "create" for op, _ in owner.calls)
    assert owner.closed


async def refused_join(tmp_path: Path, home: Path, owner: FakeOwner, message: str) -> None:
    """`join` as alice/laptop with this owner stops with a JoinError saying `message`."""

    async def factory(_command: list[str] | None) -> Any:
        return owner

    agent = Agent(JoinOptions(team=TEAM, state_dir=tmp_path, endpoint="198.18.0.5"),
                  KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory)  # fmt: skip
    with pytest.raises(JoinError, match=re.escape(message)):
        await agent.run(asyncio.Event())


async def test_missing_peers_json_says_where_it_looked(tmp_path: Path) -> None:
    await refused_join(tmp_path, tmp_path / "kb", FakeOwner(),
                       "cannot use /keybase/team/t1/peers.json")
    assert not (tmp_path / "control.sock").exists()


# -- team input checked before anything is applied: the overlay -----------------------


@dataclass
class Joining:
    agent: Agent
    owner: FakeOwner
    task: asyncio.Task[None]
    stop: asyncio.Event
    joined: list[JoinedDevice]

    async def started(self) -> None:
        await wait_for(lambda: self.joined or self.task.done(),
                       "the agent to start")
        if self.task.done():
            self.task.result()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def join_with(tmp_path: Path, kbwg: dict[str, Any], routes: list[str] | None = None,
                    policy: str | None = None) -> Joining:
    """An agent (alice/laptop) started with this kbwg.json, host routes and local policy
    file."""
    home = tmp_path / "kb"
    team_dir = home / "kbfs" / "team" / TEAM
    team_dir.mkdir(parents=True)
    overlay = IPv4Network(str(kbwg.get("overlay", "100.64.0.0/10")))
    peers = [dict(p, ip=str(overlay.network_address + 1 + i)) for i, p in enumerate(PEERS)]
    (team_dir / "peers.json").write_text(json.dumps(peers))
    (team_dir / "kbwg.json").write_text(json.dumps(kbwg))
    policy_path = tmp_path / "owner.json"
    if policy is not None:
        policy_path.write_text(policy)
        policy_path.chmod(0o644)
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    async def host_routes(own_ifname: str) -> list[Any]:
        assert own_ifname == "kbwg0"
        return [ip_network(r) for r in routes or []]

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    options = JoinOptions(team=TEAM, state_dir=state_dir, endpoint="198.18.0.5",
                          policy_path=policy_path)
    joined: list[JoinedDevice] = []
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory, routes=host_routes, on_joined=joined.append)
    stop = asyncio.Event()
    return Joining(agent, owner, asyncio.create_task(agent.run(stop)), stop, joined)


@pytest.mark.parametrize(("kbwg", "routes", "message"), [
    ({"overlay": "0.0.0.0/1"}, [], "kbwg.json 'overlay' 0.0.0.0/1 is wider than /10"),
    ({"overlay": "0.0.0.0/0"}, [], "kbwg.json 'overlay' 0.0.0.0/0 is wider than /10"),
    ({"overlay": "10.0.0.0/8"}, [], "kbwg.json 'overlay' 10.0.0.0/8 is wider than /10"),
    ({"overlay": "127.0.0.0/16"}, [], "kbwg.json 'overlay' 127.0.0.0/16 overlaps 127.0.0.0/8"),
    ({"overlay": "198.18.0.0/16"}, [],
     "kbwg.json 'overlay' 198.18.0.0/16: 198.18.0.0/16 is not inside the locally allowed "
     "overlay 100.64.0.0/10; ask a team admin"),
    # The LAN's own range, when a site happens to use shared address space.
    ({"overlay": "100.64.0.0/16"}, ["198.18.0.0/24", "100.64.7.0/24"],
     "kbwg.json 'overlay' 100.64.0.0/16: 100.64.0.0/16 overlaps the host's existing route "
     "to 100.64.7.0/24; ask a team admin"),
    ({"overlay": "100.64.0.0/16"}, ["100.0.0.0/8"], "overlaps the host's existing route"),
])
async def test_join_refuses_an_overlay_before_creating_anything(
        tmp_path: Path, kbwg: dict[str, Any], routes: list[str], message: str) -> None:
    joining = await join_with(tmp_path, kbwg, routes)
    with pytest.raises(JoinError, match=re.escape(message)):
        await asyncio.wait_for(joining.task, 20)
    assert not any(op == "create" for op, _ in joining.owner.calls), joining.owner.calls
    assert joining.owner.closed, "the device owner must be stopped"
    assert not joining.joined


async def test_routes_that_do_not_overlap_are_fine(tmp_path: Path) -> None:
    joining = await join_with(
        tmp_path, {"overlay": "100.64.0.0/16"}, ["198.18.0.0/24", "100.65.0.0/16"])
    await joining.started()
    await joining.finish()
    create = next(args for op, args in joining.owner.calls if op == "create")
    assert create["address"] == "100.64.0.1/16"


@pytest.mark.skipif(os.geteuid() != 0, reason="the local policy file must be root's")
async def test_a_local_policy_file_allows_another_overlay(tmp_path: Path) -> None:
    joining = await join_with(tmp_path, {"overlay": "198.18.64.0/20"},
                              policy='{"overlay": "198.18.0.0/16"}')
    await joining.started()
    await joining.finish()
    create = next(args for op, args in joining.owner.calls if op == "create")
    assert create["address"] == "198.18.64.1/20"


@pytest.mark.skipif(os.geteuid() != 0, reason="the local policy file must be root's")
async def test_a_policy_file_narrower_than_the_team_refuses(tmp_path: Path) -> None:
    joining = await join_with(tmp_path, {"overlay": "100.64.0.0/16"},
                              policy='{"overlay": "100.100.0.0/16"}')
    with pytest.raises(JoinError, match=re.escape(
            "kbwg.json 'overlay' 100.64.0.0/16: 100.64.0.0/16 is not inside the locally "
            "allowed overlay 100.100.0.0/16")):
        await asyncio.wait_for(joining.task, 20)
    assert not any(op == "create" for op, _ in joining.owner.calls)


async def test_a_broken_policy_file_stops_join(tmp_path: Path) -> None:
    joining = await join_with(tmp_path, {}, policy="{not json")
    with pytest.raises(JoinError, match=re.escape("owner.json")):
        await asyncio.wait_for(joining.task, 20)
    assert not any(op == "create" for op, _ in joining.owner.calls)
    assert joining.owner.closed


# -- one key per device -----------------------------------------------------------------


def other_spelling(key: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spelled = key[:42] + alphabet[alphabet.index(key[42]) ^ 1] + key[43:]
    assert spelled != key and base64.b64decode(spelled) == base64.b64decode(key)
    return spelled


def removed(owner: FakeOwner, key: str, since: int) -> bool:
    return ("remove_peer", {"public_key": key}) in owner.calls[since:]


@pytest.mark.parametrize("spelling", ["same", "other"])
async def test_a_member_announcing_anothers_key_changes_nothing(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        spelling: str) -> None:
    caplog.set_level(logging.INFO)
    synced = count_syncs(world.device, monkeypatch)
    bob_key = new_key()
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {bob_key}")
    await wait_for(lambda: world.owner.peers.get(bob_key, {}).get("endpoint")
                   == "198.18.0.6:51820", "bob's announced endpoint")
    copy = bob_key if spelling == "same" else other_spelling(bob_key)
    carol = world.client("carol", "nas")
    before = len(world.owner.calls)
    await carol.send(ANNOUNCE, f"ANNOUNCE 203.0.113.66:51820 {copy}")
    await wait_for(lambda: "one key per device" in caplog.text, "the refusal to be logged")
    # Several syncs later (refresh every 0.2 s), still bob's and logged once only.
    mark = synced()
    await wait_for(lambda: synced() >= mark + 3, "three more peer syncs")
    assert world.owner.peers[bob_key]["allowed_ips"] == ["100.64.0.2/32"]
    assert world.owner.peers[bob_key]["endpoint"] == "198.18.0.6:51820"
    assert list(world.owner.peers) == [bob_key]
    assert caplog.text.count("one key per device") == 1
    status = await call(world.agent.options.state_dir, "status")
    view = {p["device"]: p for p in status["peers"]}
    assert view["desk"]["public_key"] == bob_key
    assert view["nas"]["public_key"] is None and "bob/desk's" in view["nas"]["reason"]

    # The impostor's fresh key is its own peer; bob's key is never removed.
    fresh = new_key()
    await carol.send(ANNOUNCE, f"ANNOUNCE 203.0.113.66:51820 {fresh}")
    await wait_for(lambda: fresh in world.owner.peers, "carol's own key")
    mark = synced()
    await wait_for(lambda: synced() >= mark + 3, "three more peer syncs")
    assert not removed(world.owner, bob_key, since=before)
    assert not any(op == "set_peer" and args["public_key"] == bob_key
                   for op, args in world.owner.calls[before:])
    assert world.owner.peers[bob_key]["allowed_ips"] == ["100.64.0.2/32"]
    assert world.owner.peers[bob_key]["endpoint"] == "198.18.0.6:51820"
    assert world.owner.peers[fresh]["allowed_ips"] == ["100.64.0.3/32"]


async def test_nobody_is_configured_with_this_devices_own_key(world: World) -> None:
    mine = world.device.state.public_key
    await world.client("carol", "nas").send(ANNOUNCE, f"ANNOUNCE 203.0.113.66:51820 {mine}")
    marker = new_key()
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {marker}")
    await wait_for(lambda: marker in world.owner.peers, "bob, sent after carol")
    assert mine not in world.owner.peers


# -- the agent's view against the device's actual peers ------------------------------


async def test_reconcile_re_adds_a_removed_peer_and_removes_an_unknown_key(
        world: World) -> None:
    bob_key = new_key()
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {bob_key}")
    await wait_for(lambda: world.owner.peers.get(bob_key, {}).get("endpoint")
                   == "198.18.0.6:51820", "bob's announced endpoint")
    stranger = new_key()
    del world.owner.peers[bob_key]  # removed by mistake, behind the agent's back
    world.owner.peers[stranger] = {"public_key": stranger, "endpoint": "203.0.113.9:1",
                                   "allowed_ips": ["100.64.0.9/32"], "keepalive": 0}
    await world.device.stats.poll()
    assert set(world.owner.peers) == {bob_key}
    assert world.owner.peers[bob_key]["endpoint"] == "198.18.0.6:51820"
    assert world.owner.peers[bob_key]["allowed_ips"] == ["100.64.0.2/32"]
    assert world.owner.peers[bob_key]["keepalive"] == world.agent.options.keepalive_s


# -- endpoints move only on proof that the key's holder is there ----------------------


async def test_an_announcement_does_not_move_a_working_endpoint(world: World) -> None:
    bob = world.client("bob", "desk")
    key = new_key()
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
    await wait_for(lambda: world.owner.peers.get(key, {}).get("endpoint")
                   == "198.18.0.6:51820", "bob's announced endpoint")
    # Nothing works yet: a newer announcement is followed (prototype peers roam so).
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.7:51820 {key}")
    await wait_for(lambda: world.owner.peers[key]["endpoint"] == "198.18.0.7:51820",
                   "the newer announced endpoint while no handshake happened")
    # An authenticated handshake over it: now it works and announcements cannot move it.
    world.owner.handshakes[key] = time.time()
    await world.device.stats.poll()
    await bob.send(ANNOUNCE, f"ANNOUNCE 203.0.113.66:51820 {key}")
    marker = new_key()
    await world.client("carol", "nas").send(ANNOUNCE, f"ANNOUNCE 198.18.0.8:51820 {marker}")
    await wait_for(lambda: marker in world.owner.peers, "carol, announced after bob")
    bob_id = DeviceId("bob", "desk")
    await wait_for(lambda: world.device.state.peers[bob_id].announcement_id is not None
                   and world.device.state.peers[bob_id].announcement_endpoint
                   == "203.0.113.66:51820",
        "the agent to take bob's newest announcement")
    assert world.owner.peers[key]["endpoint"] == "198.18.0.7:51820"
    status = await call(world.agent.options.state_dir, "status")
    view = next(p for p in status["peers"] if p["device"] == "desk")
    assert (view["endpoint"], view["announced_endpoint"]) == (
        "198.18.0.7:51820", "203.0.113.66:51820")


async def test_an_owner_refusal_skips_that_peer_and_keeps_the_agent(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer the owner's policy refuses (here: every set_peer for bob's key) is logged
    and retried at the next refresh; the agent and its other peers carry on."""
    refused, fine = new_key(), new_key()
    original = world.owner.request

    async def refusing(op: str, **args: Any) -> dict[str, Any]:
        if op == "set_peer" and args.get("public_key") == refused:
            raise OwnerError("refused: allowed IP is outside the overlay")
        return await original(op, **args)

    world.owner.request = refusing  # type: ignore[method-assign]
    await world.client("bob", "desk").send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {refused}")
    await world.client("carol", "nas").send(ANNOUNCE, f"ANNOUNCE 198.18.0.7:51820 {fine}")
    await wait_for(lambda: fine in world.owner.peers, "carol, whose entry is allowed")
    await wait_for(lambda: caplog.text.count("device owner refused to configure it") >= 2,
                   "the refusal retried at a refresh")
    assert "bob/desk: the device owner refused" in caplog.text
    assert refused not in world.owner.peers
    status = await call(world.agent.options.state_dir, "status")
    assert {p["device"] for p in status["peers"]} == {"desk", "nas"}


async def test_announced_endpoints_of_this_host_are_refused(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """WireGuard must never be pointed at a local service (or nowhere) by a member."""
    bob = world.client("bob", "desk")
    for ip in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1"):
        await bob.send(ANNOUNCE, f"ANNOUNCE {ip}:51820 {new_key()}")
    good = new_key()
    await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {good}")
    await wait_for(lambda: good in world.owner.peers, "bob's usable announcement")
    assert list(world.owner.peers) == [good]
    assert caplog.text.count("is not a unicast address of another host") == 5


# -- day-to-day operation: the real client's ways, SIGHUP --------------------------------


@dataclass
class Started:
    agent: Agent
    owner: FakeOwner
    joined: list[JoinedDevice]
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start an agent as alice/laptop with the given JoinOptions fields; stopped at the
    end of the test."""
    started: list[Started] = []

    async def start(**fields: Any) -> Started:
        owner = FakeOwner()

        async def factory(_command: list[str] | None) -> Any:
            return owner

        state_dir = tmp_path / f"state{len(started)}"
        state_dir.mkdir()
        options = JoinOptions(state_dir=state_dir, endpoint="198.18.0.5",
                              announced_fallback_s=0.1, **fields)
        joined: list[JoinedDevice] = []
        agent = Agent(options, KeybaseClient(STANDIN, env=env_for(tmp_path / "kb", "alice",
                                                                   "laptop")),
                      owner_factory=factory, routes=no_routes, on_joined=joined.append)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        one = Started(agent, owner, joined, stop, task)
        started.append(one)
        await wait_for(lambda: bool(joined) or task.done(), "the agent to join")
        if task.done():
            task.result()  # its start-up error
        return one

    yield start
    for one in started:
        one.stop.set()
        await asyncio.wait_for(one.task, 10)


@pytest.mark.parametrize(("error", "hint"), [
    ("unknown op 'host_routes'",
     "the device owner helper is older than this agent: run `sudo kbwg-agent install-helper`"),
    ("netlink socket failed", "its log lines above say why"),
])
async def test_an_owner_that_cannot_read_the_routes_stops_join_with_a_fix(
        tmp_path: Path, error: str, hint: str) -> None:
    """The overlay check asks the device owner for the host's routes; one installed by an
    older kbwg-agent does not know the op, and the user is told to reinstall it."""
    home = tmp_path / "kb"
    write_team_file(home, "peers.json", json.dumps(PEERS))

    @dataclass
    class OldOwner(FakeOwner):
        async def request(self, op: str, **args: Any) -> dict[str, Any]:
            if op == "host_routes":
                self.calls.append((op, args))
                raise OwnerError(error)
            return await super().request(op, **args)

    owner = OldOwner()
    await refused_join(tmp_path, home, owner, f"could not read them: {error}); {hint}")
    assert ("host_routes", {"exclude_ifname": "kbwg0"}) in owner.calls
    assert not any(op == "create" for op, _ in owner.calls)


def write_team_file(home: Path, name: str, data: str) -> None:
    path = home / "kbfs" / "team" / TEAM / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


async def test_a_team_name_in_other_case_is_the_same_team(
    tmp_path: Path, start_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keybase replies with the canonical lowercase name: `join T1` must still take the
    messages of t1 (from the listener: no history read is due) and read its files."""
    monkeypatch.setattr(upkeep, "FIRST_REFRESH_S", 3600.0)
    write_team_file(tmp_path / "kb", "peers.json", json.dumps(PEERS))
    agent = await start_agent(team=TEAM.upper(), refresh_s=3600.0)
    bob = KeybaseClient(STANDIN, env=env_for(tmp_path / "kb", "bob", "desk"))
    try:
        key = new_key()
        await bob.send(Channel(TEAM.upper(), "announce", "chat"),
                       f"ANNOUNCE 198.18.0.6:51820 {key}")
        await wait_for(lambda: key in agent.owner.peers, "bob, announced in t1")
    finally:
        await bob.close()


async def test_joining_channels_that_exist_goes_through_join(tmp_path: Path) -> None:
    """The real service refuses newconv for a channel the team already has: the agent
    then joins it, and is a member (so its listener gets the messages)."""
    home = tmp_path / "kb"
    bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))
    alice = KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop"))
    try:
        team = TeamView(alice, TEAM, TeamConfig())
        made = {await bob.newconv(team.announce_channel),
                await bob.newconv(team.negotiation_channel)}
        await team.join_channels()
        mine = set()
        for topic_type in ("chat", "dev"):
            listed = await alice.call("list", {"topic_type": topic_type})
            mine |= {c["id"] for c in listed["conversations"]}
        assert made <= mine
    finally:
        await bob.close()
        await alice.close()


async def test_reload_applies_peers_json_and_reports_kbwg_json(
    tmp_path: Path, start_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGHUP's reload: with no periodic refresh due, a peers.json edit takes effect at
    once; a kbwg.json edit is logged as needing a restart and changes nothing."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(upkeep, "FIRST_REFRESH_S", 3600.0)
    home = tmp_path / "kb"
    write_team_file(home, "peers.json", json.dumps(PEERS))
    agent = await start_agent(team=TEAM, refresh_s=3600.0)
    bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))
    try:
        key = new_key()
        await bob.send(ANNOUNCE, f"ANNOUNCE 198.18.0.6:51820 {key}")
        await wait_for(lambda: key in agent.owner.peers, "bob")
        write_team_file(home, "peers.json", json.dumps([PEERS[0], PEERS[2]]))
        write_team_file(home, "kbwg.json", json.dumps({"announce_channel": "hello"}))
        agent.agent.reload()
        await wait_for(lambda: key not in agent.owner.peers, "bob's removal on reload")
        await wait_for(lambda: "restart it to apply them" in caplog.text,
                       "the kbwg.json change reported")
        assert "kbwg.json changed (announce_channel)" in caplog.text
        assert agent.joined[0].team.config.announce_channel == "announce"
        # A broken kbwg.json on a later reload keeps the running settings.
        write_team_file(home, "kbwg.json", "{broken")
        agent.agent.reload()
        await wait_for(lambda: "the running settings stay" in caplog.text, "the refusal")
        assert not agent.task.done()
    finally:
        await bob.close()


def test_the_configured_endpoint_is_an_ipv4_address_and_port() -> None:
    from kbwg.agent.presence import configured_endpoint

    assert configured_endpoint("203.0.113.7:40000", 51820) == ("203.0.113.7", 40000)
    assert configured_endpoint("203.0.113.7", 51820) == ("203.0.113.7", 51820)
    assert configured_endpoint(None, 51820) is None
    # Not an IPv4 address (announce_target announces it as given), or no usable port.
    assert configured_endpoint("vpn.example.com:51820", 51820) is None
    assert configured_endpoint("[2001:db8::1]:51820", 51820) is None
    assert configured_endpoint("203.0.113.7:70000", 51820) is None
