"""`join`'s start path costs few processes and little CPU, and waits for nothing it does
not need (issue 13: start-up is timed from process start on two cores, where every
`keybase` process counts).

The channels are joined and #announce's history read while the overlay check still
waits for the device owner; on a team whose channels exist, joining them is one `join`
call each; a burst of quick chat calls shares one `chat api` pipe instead of starting
one process per call; TeamView (needed as soon as peers.json is in) loads neither
aioice nor `statistics`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from test_daemon import PEERS, STANDIN, TEAM, FakeOwner, env_for

from kbwg.agent.daemon import Agent, JoinOptions
from kbwg.agent.keybase import KeybaseClient, KeybaseServiceError
from kbwg.agent.team_view import TeamView
from kbwg.agent.teamconfig import TeamConfig
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.wire import CandidateInfo
from kbwg_testing import wait_for


class CountingClient(KeybaseClient):
    """The stand-in, with every chat call's method recorded."""

    def __init__(self, binary: str, env: Mapping[str, str]) -> None:
        super().__init__(binary, env)
        self.methods: list[str] = []

    async def call(self, method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.methods.append(method)
        return await super().call(method, options)


async def members_of(client: KeybaseClient) -> set[str]:
    mine: set[str] = set()
    for topic_type in ("chat", "dev"):
        listed = await client.call("list", {"topic_type": topic_type})
        mine |= {c["id"] for c in listed["conversations"]}
    return mine


async def test_history_is_read_while_the_overlay_check_waits_for_the_owner(
    tmp_path: Path,
) -> None:
    home = tmp_path / "kb"
    team_file = home / "kbfs" / "team" / TEAM / "peers.json"
    team_file.parent.mkdir(parents=True)
    team_file.write_text(json.dumps(PEERS))
    routes_asked = asyncio.Event()
    owner_answers = asyncio.Event()

    async def slow_routes(_own_ifname: str) -> list[Any]:
        # The device owner reads the host's routes; here it takes its time.
        routes_asked.set()
        await owner_answers.wait()
        return []

    async def factory(_command: list[str] | None) -> Any:
        return FakeOwner()

    options = JoinOptions(team=TEAM, state_dir=tmp_path / "state", endpoint="198.18.0.5")
    options.state_dir.mkdir()
    keybase = CountingClient(STANDIN, env_for(home, "alice", "laptop"))
    joined: list[Any] = []
    agent = Agent(options, keybase, owner_factory=factory, routes=slow_routes,
                  on_joined=joined.append)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(routes_asked.wait(), 60)
        await wait_for(lambda: "read" in keybase.methods or run.done(),
                       "#announce's history read before the owner answers", timeout=60)
        assert not joined
        owner_answers.set()
        await wait_for(lambda: bool(joined) or run.done(), "joined", timeout=60)
        assert joined
    finally:
        owner_answers.set()
        stop.set()
        await asyncio.wait_for(run, 30)


async def test_existing_channels_are_joined_with_one_call_each(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))
    alice = CountingClient(STANDIN, env_for(home, "alice", "laptop"))
    try:
        team = TeamView(alice, TEAM, TeamConfig())
        made = {await bob.newconv(team.announce_channel),
                await bob.newconv(team.negotiation_channel)}
        await team.join_channels()
        assert alice.methods == ["join", "join"]
        assert made <= await members_of(alice)
    finally:
        await bob.close()
        await alice.close()


async def test_a_new_teams_channels_are_made_and_joined(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    alice = CountingClient(STANDIN, env_for(home, "alice", "laptop"))
    bob = CountingClient(STANDIN, env_for(home, "bob", "desk"))
    try:
        await TeamView(alice, TEAM, TeamConfig()).join_channels()
        assert alice.methods == ["join", "newconv", "join", "newconv"]
        await TeamView(bob, TEAM, TeamConfig()).join_channels()
        assert bob.methods == ["join", "join"]
        assert len(await members_of(alice)) == 2
        assert await members_of(alice) == await members_of(bob)
    finally:
        await alice.close()
        await bob.close()


async def test_a_channel_made_by_another_device_meanwhile_is_joined(tmp_path: Path) -> None:
    """join finds no channel, another device makes it, our newconv is refused: join."""
    home = tmp_path / "kb"
    bob = KeybaseClient(STANDIN, env=env_for(home, "bob", "desk"))

    class Racing(CountingClient):
        async def call(self, method: str,
                       options: Mapping[str, Any] | None = None) -> dict[str, Any]:
            if method == "join" and not self.methods:
                self.methods.append(method)
                # Another device makes the channel just after our join missed it.
                await bob.newconv(team.announce_channel)
                raise KeybaseServiceError(0, f'no conversations matched "{TEAM}"')
            return await super().call(method, options)

    alice = Racing(STANDIN, env_for(home, "alice", "laptop"))
    try:
        team = TeamView(alice, TEAM, TeamConfig())
        await team.join_channels()
        assert alice.methods[:3] == ["join", "newconv", "join"]
        assert await members_of(bob) <= await members_of(alice)
    finally:
        await alice.close()
        await bob.close()


async def test_a_burst_of_quick_calls_shares_one_pipe(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    # A generous wait: on a loaded machine a stand-in call can take a while.
    alice = KeybaseClient(STANDIN, env_for(home, "alice", "laptop"), pipe_wait=30.0)
    try:
        team = TeamView(alice, TEAM, TeamConfig())
        ids = await asyncio.gather(*(alice.send(team.announce_channel, f"m{n}")
                                     for n in range(5)))
        assert sorted(ids) == list(range(1, 6))
        assert len(alice._pipes) == 1
    finally:
        await alice.close()


def loaded_by(module: str, roots: tuple[str, ...]) -> list[str]:
    """What of `roots` importing `module` loads, in a fresh interpreter."""
    script = (f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules "
              f"if m.split('.')[0] in {roots!r})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_the_team_view_loads_neither_aioice_nor_statistics() -> None:
    assert loaded_by("kbwg.agent.team_view", ("aioice", "dns", "statistics", "pyroute2")) == []
    assert loaded_by("kbwg.negotiation.candidate_pairs", ("statistics",)) == []


def test_a_pairs_rtt_is_the_median_of_its_samples() -> None:
    local = Candidate("host", "198.18.1.10", 51820, "eth0", candidate_priority("host"), "if")
    remote = CandidateInfo("host", "198.18.1.20", 51820, candidate_priority("host"), "f0")
    pair = CandidatePair(local, remote, 1)
    for sample in (30.0, 10.0, 20.0):
        pair.add_rtt(sample, exact=True, at=0.0)
    assert pair.rtt_ms == 20.0
    pair.add_rtt(50.0, exact=True, at=0.0)
    assert pair.rtt_ms == 25.0
