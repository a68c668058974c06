"""`kbwg-agent ping PEER` against running agents: the path it reports and its exit status.

Two worlds: port-preserving NATs (a punched direct path) and fully-random symmetric
NATs with a relay (a relayed path). The command runs as a user would, in the root
namespace, talking to the agent through its control socket (a file).
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from kbwg_world import NatMode, World
from kbwg_world.team import AGENT, AgentProcess
from kbwg_world.two_nats import BOB, start_pair, two_nats

pytestmark = pytest.mark.netns

PONG = re.compile(r"^pong from bob/desk \(100\.64\.0\.2\) via (?P<path>\S+) "
                  r"\((?P<local>\w+ [\d.]+:\d+) -> (?P<remote>\w+ [\d.]+:\d+)\) "
                  r"in (?P<rtt>[\d.]+) ms$")


def ping(agent: AgentProcess, *args: str,
         timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "ping", *args, "--state-dir", str(agent.state_dir)],
                          capture_output=True, text=True, timeout=timeout)


def pongs(out: str) -> list[re.Match[str]]:
    return [m for line in out.splitlines() if (m := PONG.match(line))]


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_direct_path_pings_with_pair_and_rtt(world: World) -> None:
    net = two_nats(world)
    r1, r2 = net.r1, net.r2
    alice, _bob = start_pair(net.team, net.a, net.b)
    peer = alice.wait_path("desk")
    assert peer["path"] == "direct", peer

    done = ping(alice, "bob/desk", "-c", "3", "--interval", "0.2")
    assert done.returncode == 0, (done.stdout, done.stderr, alice.log())
    seen = pongs(done.stdout)
    assert len(seen) == 3, done.stdout
    for match in seen:
        assert match["path"] == "direct"
        # The pair status shows: our NAT's mapping towards bob's.
        assert match["local"] == peer["local_candidate"] == f"srflx {r1.wan_ip}:51820"
        assert match["remote"] == peer["remote_candidate"] == f"srflx {r2.wan_ip}:51820"
        assert 0 < float(match["rtt"]) < 1000
    assert "3 pings, 3 pongs" in done.stdout

    # --until-direct on a direct path: the first pong ends it, exit 0. By overlay address.
    direct = ping(alice, BOB[2], "--until-direct", "-c", "5", "--json")
    assert direct.returncode == 0, (direct.stdout, direct.stderr)
    lines = json_lines(direct.stdout)
    assert [x["type"] for x in lines] == ["ping", "summary"]
    assert lines[0]["status"] == "pong" and lines[0]["path"] == "direct"
    assert lines[0]["rtt_ms"] > 0 and lines[0]["seen_as"] == f"{r1.wan_ip}:51820"
    assert lines[1]["direct"] is True and lines[1]["exit"] == 0

    # A name the agent does not know: the known ones are listed.
    unknown = ping(alice, "erin", "-c", "1")
    assert unknown.returncode == 1
    assert "no peer 'erin' in this team; known peers: bob/desk (100.64.0.2)" in unknown.stderr


def test_relayed_path_pings_via_the_relay_and_is_not_direct(world: World) -> None:
    net = two_nats(world, nats=(NatMode.FULLY_RANDOM, NatMode.FULLY_RANDOM),
                   relays=[("kbwg", "203.0.113.5")])
    alice, _bob = start_pair(net.team, net.a, net.b)
    peer = alice.wait_path("desk", timeout=30)
    assert peer["path"] == "relay", peer

    done = ping(alice, "desk", "-c", "2", "--interval", "0.2")
    assert done.returncode == 0, (done.stdout, done.stderr, alice.log())
    seen = pongs(done.stdout)
    assert len(seen) == 2, done.stdout
    for match in seen:
        assert match["path"] == "relay"
        assert "relay 203.0.113.5:" in f"{match['local']} {match['remote']}", match.group(0)

    # Still relayed after its count: --until-direct fails, as tailscale's does.
    relayed = ping(alice, "bob/desk", "--until-direct", "-c", "3", "--interval", "0.2")
    assert relayed.returncode == 1, (relayed.stdout, relayed.stderr)
    assert [m["path"] for m in pongs(relayed.stdout)] == ["relay"] * 3
    assert "direct connection not established after 3 pings (path: relay)" in relayed.stderr
