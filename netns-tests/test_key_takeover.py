"""Team input an agent refuses, with real agents in a world.

A member announcing another device's WireGuard key must not take that device's traffic:
alice and bob run agents on one LAN and ping each other without pause while mallory (a
listed member with no agent, only chat lines) announces alice's key with mallory's own
endpoint, then a fresh key of its own. And a kbwg.json overlay that overlaps one of the
host's routes stops `join` before the WireGuard device exists.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from nacl.public import PrivateKey

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.team import ALICE, BOB, STANDIN, Team

pytestmark = pytest.mark.netns

MALLORY = ("mallory", "phone", "100.64.0.3")
PING_INTERVAL_S = 0.2


def post_as(team: Team, username: str, device: str, body: str) -> int:
    """Send a line to the team's #announce as another device, the way any member's
    Keybase client can (`keybase chat api`); returns the message id."""
    call = {"method": "send", "params": {"options": {
        "channel": {"name": team.name, "members_type": "team", "topic_name": "announce",
                    "topic_type": "chat"},
        "message": {"body": body}}}}
    out = subprocess.run([str(STANDIN), "chat", "api"], input=json.dumps(call) + "\n",
                         env=team.keybase_env(username, device), capture_output=True,
                         text=True, timeout=20, check=True)
    reply: dict[str, Any] = json.loads(out.stdout.splitlines()[0])
    assert "error" not in reply, reply
    return int(reply["result"]["id"])


def test_announcing_anothers_key_does_not_take_its_traffic(world: World) -> None:
    inet = world.internet()
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    a, b = world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan])
    m = world.host("m", lans=[home.lan])
    team = Team(world)
    team.write_peers([ALICE, BOB, MALLORY])
    alice, bob = team.start_running((a, *ALICE[:2]), (b, *BOB[:2]))
    alice_key = alice.status()["public_key"]
    wait_until(lambda: a.ping(BOB[2], count=1, timeout=1.0).ok, timeout=30,
               what="alice to ping bob over the overlay")
    wait_until(lambda: b.ping(ALICE[2], count=1, timeout=1.0).ok, timeout=30,
               what="bob to ping alice over the overlay")
    before = bob.peer_view("laptop")
    assert before is not None and before["public_key"] == alice_key
    alice_endpoint = before["endpoint"]
    assert alice_endpoint == f"{a.ip}:51820", before

    count = 60  # 12 s of pings, both ways, across both of mallory's announcements
    with ThreadPoolExecutor(max_workers=2) as pool:
        to_bob = pool.submit(a.ping, BOB[2], count=count, timeout=2.0,
                             interval=PING_INTERVAL_S)
        to_alice = pool.submit(b.ping, ALICE[2], count=count, timeout=2.0,
                               interval=PING_INTERVAL_S)
        # Mallory copies alice's key, with mallory's own endpoint.
        post_as(team, *MALLORY[:2], f"ANNOUNCE {m.ip}:51820 {alice_key}")
        wait_until(lambda: "one key per device" in bob.log(100_000), timeout=10,
                   what="bob to refuse mallory's copy of alice's key")
        # Then a fresh key: in the prototype's rules this removed alice's peer entry.
        fresh = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        post_as(team, *MALLORY[:2], f"ANNOUNCE {m.ip}:51820 {fresh}")
        wait_until(lambda: (bob.peer_view("phone") or {}).get("public_key") == fresh,
                   timeout=10, what="bob to configure mallory's own key")
        results = {"alice to bob": to_bob.result(), "bob to alice": to_alice.result()}

    for what, result in results.items():
        assert result.sent == count, (what, result)
        assert result.lost <= 1, f"{what}: {result.lost} of {count} pings lost\n" \
                                 f"--- bob:\n{bob.log(6000)}\n--- alice:\n{alice.log(6000)}"
    after = bob.peer_view("laptop")
    assert after is not None
    assert (after["public_key"], after["endpoint"]) == (alice_key, alice_endpoint), after
    mallory = bob.peer_view("phone")
    assert mallory is not None
    assert (mallory["public_key"], mallory["overlay_ip"]) == (fresh, MALLORY[2])
    # Alice judged the copy of her own key the same way.
    assert "one key per device" in alice.log(100_000)
    assert (alice.peer_view("desk") or {}).get("public_key") == bob.status()["public_key"]


def test_an_overlay_overlapping_a_host_route_stops_join(world: World) -> None:
    inet = world.internet()
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    host = world.host("h", lans=[home.lan])
    # A site network in shared address space, reached through the LAN's router.
    host.run(["ip", "route", "add", "100.64.5.0/24", "via", str(home.lan.gateway)])
    # What the check reads: every route but default ones and our own interface's (a
    # stand-in kbwg0 here, as one left behind by an earlier run would be).
    host.run(["ip", "link", "add", "kbwg0", "type", "veth", "peer", "name", "kbwgpeer"])
    host.run(["ip", "address", "add", "100.64.0.1/16", "dev", "kbwg0"])
    host.run(["ip", "link", "set", "kbwg0", "up"])
    host.run(["ip", "link", "set", "kbwgpeer", "up"])
    probe = ("import asyncio; from kbwg.agent.overlaycheck import host_routes; "
             "print(' '.join(sorted(str(n) for n in asyncio.run(host_routes('kbwg0')))))")
    seen = host.run([sys.executable, "-c", probe]).stdout.split()
    assert "100.64.5.0/24" in seen and str(home.lan.subnet) in seen, seen
    assert not any(n.endswith("/0") or n.startswith("100.64.0.") for n in seen), seen
    host.run(["ip", "link", "del", "kbwg0"])
    team = Team(world)
    team.write_peers([ALICE, BOB])
    team.write_file("kbwg.json", json.dumps({"overlay": "100.64.0.0/16"}))
    agent = team.start_agent(host, *ALICE[:2])
    assert agent.proc.wait(timeout=30) != 0
    log = agent.log()
    assert ("kbwg.json 'overlay' 100.64.0.0/16: 100.64.0.0/16 overlaps the host's existing "
            "route to 100.64.5.0/24; ask a team admin") in log, log
    links = host.run(["ip", "-o", "link", "show"]).stdout
    assert "kbwg0" not in links, links
