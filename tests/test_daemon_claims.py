"""Self-assigned addresses in the join daemon, against the Keybase stand-in.

Other devices are plain stand-in clients posting CLAIM and ANNOUNCE lines; the agent
runs with an in-memory device owner. Covered: bad claims are ignored with a warning and
configure nothing; a good claim makes a peer whose only allowed IP is the claimed /32;
conflicts follow the lower message id whatever the order of delivery (late messages come
from a stand-in client whose messages are held until the test releases them), on the side
of the loser (it moves and claims again), of the winner (it does nothing) and of a listed
device watching both; the `servers` policy keeps unlisted devices apart, `mesh` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from test_daemon import STANDIN, FakeOwner, env_for, new_key, no_routes

from kbwg.agent import presence as presence_module
from kbwg.agent.claims import pick_free_address
from kbwg.agent.control import call
from kbwg.agent.daemon import Agent, JoinedDevice, JoinOptions
from kbwg.agent.join_options import JoinError
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient
from kbwg.agent.presence import ENV_DYNAMIC_SEED
from kbwg.agent.runtime_state import AgentState
from kbwg.core.identity import DeviceId
from kbwg_standin.store import release_held
from kbwg_testing import wait_for

TEAM = "t2"
ANNOUNCE = Channel(TEAM, "announce", "chat")
RANGE = IPv4Network("100.64.128.0/29")
PEERS = [
    {"username": "alice", "device": "server", "ip": "100.64.0.1"},
    {"username": "bob", "device": "server", "ip": "100.64.0.2"},
    # Listed inside the dynamic range: a confused setup, but the address stays bob's.
    {"username": "bob", "device": "spare", "ip": "100.64.128.6"},
]


@dataclass
class Team:
    home: Path
    clients: dict[tuple[str, str, bool], KeybaseClient] = field(default_factory=dict)

    def write(self, name: str, data: object) -> None:
        path = self.home / "kbfs" / "team" / TEAM / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    def client(self, user: str, device: str, hold: bool = False) -> KeybaseClient:
        """Another device; with `hold` its messages stay unseen until `release(user)`."""
        key = (user, device, hold)
        if key not in self.clients:
            env = {**env_for(self.home, user, device), "KBWG_STANDIN_HOLD": "1" if hold else ""}
            self.clients[key] = KeybaseClient(STANDIN, env=env)
        return self.clients[key]

    async def release(self, user: str) -> None:
        """Delivers `user`'s held messages now: "sent earlier, seen later", in that order
        whatever the machine's speed."""
        assert await asyncio.to_thread(release_held, self.home, user) > 0, f"nothing of {user} held"

    async def claim_and_announce(self, user: str, device: str, body_ip: str,
                                 hold: bool = False, key: str | None = None) -> str:
        key = key or new_key()
        client = self.client(user, device, hold)
        await client.send(ANNOUNCE, f"CLAIM {body_ip} {key}")
        await client.send(ANNOUNCE, f"ANNOUNCE 198.18.0.{len(self.clients) + 10}:51820 {key}")
        return key

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


@dataclass
class Running:
    agent: Agent
    device: JoinedDevice
    owner: FakeOwner
    state_dir: Path

    async def status(self) -> dict[str, Any]:
        return await call(self.state_dir, "status")

    def allowed(self, key: str) -> list[str] | None:
        peer = self.owner.peers.get(key)
        return None if peer is None else list(peer["allowed_ips"])

    def addresses_set(self) -> list[str]:
        return [args["address"] for op, args in self.owner.calls if op == "set_address"]


@pytest.fixture
async def team(tmp_path: Path) -> AsyncIterator[Team]:
    t = Team(tmp_path / "kb")
    t.write("peers.json", PEERS)
    t.write("kbwg.json", {"dynamic_range": str(RANGE), "policy": "servers"})
    try:
        yield t
    finally:
        await t.close()


@contextlib.asynccontextmanager
async def running(team: Team, user: str, device: str) -> AsyncIterator[Running]:
    state_dir = team.home.parent / f"state-{user}-{device}"
    state_dir.mkdir(exist_ok=True)
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    options = JoinOptions(team=TEAM, state_dir=state_dir, endpoint="198.18.0.5",
                          refresh_s=0.3, announced_fallback_s=0.1, negotiate=False)
    joined: list[JoinedDevice] = []
    agent = Agent(options, KeybaseClient(STANDIN, env=env_for(team.home, user, device)),
                  owner_factory=factory, routes=no_routes, on_joined=joined.append)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_for(lambda: (joined and joined[0].presence.announce_id is not None)
                   or task.done(), "the agent to announce itself")
    if task.done():
        task.result()
    try:
        yield Running(agent, joined[0], owner, state_dir)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert owner.closed


def first_pick(seed: str) -> IPv4Address:
    """The address an unlisted agent seeded with `seed` picks first in an empty range."""
    listed = {IPv4Address(str(e["ip"])) for e in PEERS}
    return pick_free_address(RANGE, listed, random.Random(seed))


# -- a listed device judging other devices' claims ---------------------------------------


@pytest.mark.parametrize(
    ("sender", "body_ip", "log_says"),
    [
        (("mallory", "phone"), "100.64.0.2", "100.64.0.2 is listed in peers.json for bob/server"),
        (("mallory", "phone"), "100.64.128.6",
         "100.64.128.6 is listed in peers.json for bob/spare"),
        (("mallory", "phone"), "100.64.7.7", "not a host address of the dynamic range"),
        (("mallory", "phone"), "100.64.128.0", "not a host address of the dynamic range"),
        (("mallory", "phone"), "100.64.128.7", "not a host address of the dynamic range"),
        (("mallory", "phone"), "100.64.128.2 100.64.128.3", "claims 2 addresses at once"),
        (("mallory", "phone"), "100.64.128.2,100.64.128.3", "claims 2 addresses at once"),
        (("mallory", "phone"), "100.64.128.0/30", "claims 4 addresses at once"),
        (("bob", "server"), "100.64.128.3",
         "bob/server is listed in peers.json (at 100.64.0.2) and may not claim"),
    ],
    ids=["listed-address", "listed-address-in-range", "outside-range", "network-address",
         "broadcast-address", "two-addresses", "two-addresses-comma", "a-prefix",
         "listed-device"],
)
async def test_bad_claim_is_ignored_with_a_warning(
    team: Team, caplog: pytest.LogCaptureFixture, sender: tuple[str, str], body_ip: str,
    log_says: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    async with running(team, "alice", "server") as alice:
        bad = await team.claim_and_announce(*sender, body_ip)
        # A good claim afterwards is the barrier: once it is configured, the bad one
        # (sent before it, on the same channel) has been handled.
        good = await team.claim_and_announce("zed", "tablet", "100.64.128.4")
        await wait_for(lambda: alice.allowed(good) is not None, "zed's good claim")
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "ignoring claim" in r.getMessage()]
        assert any(f"from {sender[0]}/{sender[1]}" in w and log_says in w for w in warnings), \
            warnings
        if sender == ("bob", "server"):
            # A listed device stays a peer, at its listed address only.
            assert alice.allowed(bad) == ["100.64.0.2/32"]
        else:
            assert alice.allowed(bad) is None
        status = await alice.status()
        assert [(c["username"], c["ip"]) for c in status["claims"]] == [("zed", "100.64.128.4")]
        assert {p["username"] for p in status["peers"] if p["dynamic"]} == {"zed"}


async def test_good_claim_gets_only_the_claimed_address(team: Team) -> None:
    async with running(team, "alice", "server") as alice:
        # An announcement with another key than the claim's is not enough.
        zed = team.client("zed", "tablet")
        claimed_key, other_key = new_key(), new_key()
        await zed.send(ANNOUNCE, f"CLAIM 100.64.128.4 {claimed_key}")
        await zed.send(ANNOUNCE, f"ANNOUNCE 198.18.0.9:51820 {other_key}")
        await zed.send(ANNOUNCE, f"ANNOUNCE 198.18.0.9:51820 {claimed_key}")
        await wait_for(lambda: alice.allowed(claimed_key) is not None, "zed's peer")
        assert alice.allowed(claimed_key) == ["100.64.128.4/32"]
        assert other_key not in alice.owner.peers
        status = await alice.status()
        peer = next(p for p in status["peers"] if p["username"] == "zed")
        assert peer["dynamic"] is True and peer["overlay_ip"] == "100.64.128.4"
        assert peer["claim"]["ip"] == "100.64.128.4"
        assert status["dynamic"] is False and status["policy"] == "servers"
        # A re-claim of another address moves the allowed IP; the old one is gone.
        await zed.send(ANNOUNCE, f"CLAIM 100.64.128.5 {claimed_key}")
        await wait_for(lambda: alice.allowed(claimed_key) == ["100.64.128.5/32"], "the move")


async def test_listed_device_follows_the_lower_message_id_delivered_late(team: Team) -> None:
    async with running(team, "alice", "server") as alice:
        # early's messages get the lower ids but are held until late's are handled.
        early = await team.claim_and_announce("erin", "phone", "100.64.128.3", hold=True)
        late = await team.claim_and_announce("lars", "phone", "100.64.128.3")
        await wait_for(lambda: alice.allowed(late) == ["100.64.128.3/32"],
                       "the only claimant so far to be configured")
        assert alice.allowed(early) is None
        await team.release("erin")
        await wait_for(lambda: alice.allowed(early) == ["100.64.128.3/32"],
                       "the earlier claim, delivered late, to take the address", timeout=15)
        assert late not in alice.owner.peers, "the loser must be removed"
        status = await alice.status()
        owners = {c["username"]: c["owner"] for c in status["claims"]}
        assert owners == {"erin": True, "lars": False}
        # The loser moves: it is a peer again, at its new address.
        await team.client("lars", "phone").send(ANNOUNCE, f"CLAIM 100.64.128.5 {late}")
        await wait_for(lambda: alice.allowed(late) == ["100.64.128.5/32"], "lars's new claim")
        assert alice.allowed(early) == ["100.64.128.3/32"]


# -- an unlisted device defending or giving up its own claim --------------------------------


async def test_own_claim_loses_to_a_lower_id_delivered_late(
    team: Team, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kbwg.agent")
    monkeypatch.setenv(ENV_DYNAMIC_SEED, "7")
    ip = first_pick("7")
    # Sent before the agent starts (lower id) but held until the agent has claimed and
    # seen walt's claim: the order is the test's, not the machine's speed.
    rival = await team.claim_and_announce("rita", "phone", str(ip), hold=True)
    async with running(team, "uma", "tablet") as uma:
        assert uma.device.state is not None
        first_claim = uma.device.state.my_claim
        assert first_claim is not None, "an unlisted agent claims"
        assert first_claim.ip == ip, "the seed's first pick (rita's claim came too soon?)"
        assert first_claim.msg_id > 1
        assert uma.addresses_set() == []
        # A later rival (higher id, seen at once) does not move us: we are the winner.
        await team.claim_and_announce("walt", "phone", str(ip))
        walt = DeviceId("walt", "phone")
        await wait_for(lambda: uma.device.team.claims.claim_of(walt, time.time()) is not None,
                       "walt's claim in the book")
        assert uma.addresses_set() == []
        state = uma.device.state
        await team.release("rita")
        # Moved: the new address set, and claimed (the claim is sent after the set).
        await wait_for(lambda: uma.addresses_set() and state.my_claim is not None
                       and state.my_claim.ip == state.overlay_ip != ip,
                       "uma to move once rita's claim arrives", timeout=15)  # fmt: skip
        moved = uma.device.state.overlay_ip
        assert moved != ip and moved in RANGE
        assert uma.addresses_set() == [f"{moved}/10"]
        assert uma.device.state.my_claim is not None
        assert uma.device.state.my_claim.ip == moved
        assert uma.device.state.my_claim.msg_id > first_claim.msg_id
        assert f"rita/phone also claimed {ip}, first" in caplog.text
        assert f"moving to {moved}" in caplog.text
        # The new claim went out, and the address is remembered for a restart.
        page = await team.client("zed", "tablet").read(ANNOUNCE)
        mine = [m.body for m in page.messages if m.sender_username == "uma"]
        assert f"CLAIM {moved} {uma.device.state.public_key}" in mine
        saved = json.loads((uma.state_dir / "dynamic-address.json").read_text())
        assert saved == {"ip": str(moved)}
        status = await uma.status()
        assert status["overlay_ip"] == str(moved) and status["dynamic"] is True
        # Under `servers`, rita (another unlisted device) is not a peer of ours.
        assert rival not in uma.owner.peers
        # It does not move again: the rivals keep their claims of the old address. A claim
        # sent after uma's new one is the barrier: once it is in the book, uma has also
        # handled the echo of its own claim and everything before it.
        other = next(a for a in RANGE.hosts()
                     if a not in (ip, moved) and str(a) != "100.64.128.6")
        await team.claim_and_announce("zed", "tablet", str(other))
        zed = DeviceId("zed", "tablet")
        await wait_for(lambda: uma.device.team.claims.claim_of(zed, time.time()) is not None,
                       "zed's claim in the book")
        assert uma.addresses_set() == [f"{moved}/10"]


async def test_restart_reclaims_the_previous_address(
    team: Team, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_DYNAMIC_SEED, "7")
    async with running(team, "uma", "tablet") as uma:
        assert uma.device.state is not None
        first = uma.device.state.overlay_ip
    # Someone else now holds the seed's first pick; ours is still ours.
    monkeypatch.setenv(ENV_DYNAMIC_SEED, "8")
    async with running(team, "uma", "tablet") as again:
        assert again.device.state is not None
        assert again.device.state.overlay_ip == first
        status = await again.status()
        mine = [c for c in status["claims"] if c["username"] == "uma"]
        assert mine and mine[0]["owner"] is True and mine[0]["ip"] == str(first)


@pytest.mark.parametrize("policy", ["servers", "mesh"])
async def test_policy_decides_whether_unlisted_devices_peer(team: Team, policy: str) -> None:
    team.write("kbwg.json", {"dynamic_range": str(RANGE), "policy": policy})
    async with running(team, "uma", "tablet") as uma:
        assert uma.device.state is not None
        free = next(str(h) for h in RANGE.hosts()
                    if h != uma.device.state.overlay_ip and str(h) != "100.64.128.6")
        zed = await team.claim_and_announce("zed", "tablet", free)
        server = team.client("alice", "server")
        server_key = new_key()
        await server.send(ANNOUNCE, f"ANNOUNCE 198.18.0.30:51820 {server_key}")
        await wait_for(lambda: uma.allowed(server_key) == ["100.64.0.1/32"], "the server")
        if policy == "mesh":
            await wait_for(lambda: uma.allowed(zed) == [f"{free}/32"], "zed under mesh")
        else:
            status = await uma.status()
            assert any(c["username"] == "zed" for c in status["claims"])
            assert zed not in uma.owner.peers
            assert {p["username"] for p in status["peers"]} == {"alice", "bob"}


def lose_claim(uma: Running) -> AgentState:
    """A rival's claim of `uma`'s address with a lower message id, as a late delivery
    would bring it, taken into the books (not acted on yet); `uma`'s state."""
    state = uma.device.state
    assert state is not None and state.my_claim is not None
    mine = state.my_claim
    rival = ChatMessage(
        id=mine.msg_id - 1, conversation_id="c", channel=ANNOUNCE,
        sender_username="rita", sender_device="phone", sent_at=time.time(),
        body=f"CLAIM {mine.ip} {new_key()}", content_type="text")
    assert uma.device.team.take_announce(rival, state.me)
    return state


async def test_concurrent_checks_move_only_once(
    team: Team, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chat listener and the refresh loop may both find the claim lost at once."""
    monkeypatch.setenv(ENV_DYNAMIC_SEED, "7")
    async with running(team, "uma", "tablet") as uma:
        state = lose_claim(uma)
        await asyncio.gather(uma.device.presence.check_my_claim(),
                             uma.device.presence.check_my_claim())
        assert len(uma.addresses_set()) == 1, uma.addresses_set()
        assert state.my_claim is not None and state.my_claim.ip == state.overlay_ip
        assert uma.addresses_set() == [f"{state.overlay_ip}/10"]


async def test_a_lost_claim_with_no_free_address_is_kept_and_said(
    team: Team, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """With the dynamic range full there is nowhere to move: a clear warning, not a
    failure of the check (the refresh loop and the chat listener both run it)."""
    monkeypatch.setenv(ENV_DYNAMIC_SEED, "7")
    async with running(team, "uma", "tablet") as uma:
        state = lose_claim(uma)
        mine = state.my_claim

        def full(*_args: object, **_kwargs: object) -> IPv4Address:
            raise JoinError("no free address in 100.64.128.0/24: all taken; ask a team "
                            "admin for a larger dynamic_range")

        monkeypatch.setattr(presence_module, "pick_dynamic", full)
        await uma.device.presence.check_my_claim()
        assert state.overlay_ip == mine.ip and state.my_claim is mine
        assert "rita/phone also claimed" in caplog.text
        assert "ask a team admin for a larger dynamic_range; keeping it" in caplog.text
