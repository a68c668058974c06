"""A device that restarts keeps its WireGuard key (state dir), so its peers, which still
hold that key, are reconnected by early checks before anything it sends is delivered:
here nothing it sends after the restart is delivered at all (KBWG_STANDIN_HOLD).

Both orders of the two keys: the higher-keyed end of a fresh path holds its endpoint
back for the other's handshake (agent/peer_sync.py). When that is the restarted device,
its peer, whose WireGuard still has a session with the device's last run, renews it as
soon as the device's early checks arrive, so the hold ends with the peer's handshake
instead of running out."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import ALICE, BOB, AgentProcess, Team

pytestmark = pytest.mark.netns


def running(agent: AgentProcess) -> dict[str, Any]:
    def ready() -> dict[str, Any] | bool | None:
        return agent.proc.poll() is not None or agent.quick_status(timeout=5.0)

    status = wait_until(ready, timeout=90, what=f"{agent.name} to answer status")
    assert isinstance(status, dict), agent.log()
    return status


def wait_ping(agent: AgentProcess, dest: str, *others: AgentProcess) -> None:
    try:
        wait_until(lambda: agent.host.ping_ok(dest), timeout=30,
                   what=f"{agent.name} to ping {dest}")
    except AssertionError as exc:
        logs = "".join(f"\n--- log of {a.name}:\n{a.log(8000)}" for a in (agent, *others))
        raise AssertionError(f"{exc}{logs}") from None


def state_dir_with_key(world: World, who: tuple[str, str, str], key: PrivateKey) -> Path:
    """A fresh state dir holding `key` as the one kept for `who` (kbwg.agent.wg_key)."""
    path = world.dir / "agents" / f"{who[0]}-{who[1]}"
    path.mkdir(parents=True, mode=0o700)
    kept = path / "wireguard-key.json"
    kept.write_text(json.dumps({"team": "demo-team", "device": f"{who[0]}/{who[1]}",
                                "private_key": base64.b64encode(bytes(key)).decode()}))
    kept.chmod(0o600)
    return path


def public(key: PrivateKey) -> str:
    return base64.b64encode(bytes(key.public_key)).decode()


@pytest.mark.parametrize(("nat", "restarted_holds"), [(False, True), (True, True),
                                                      (True, False)],
                         ids=["lan-restarted-holds", "two-nats-restarted-holds",
                              "two-nats-peer-holds"])
def test_a_restart_with_the_kept_key_reconnects_with_nothing_it_sends_delivered(
        world: World, nat: bool, restarted_holds: bool) -> None:
    inet = world.internet()
    stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
    team = Team(world, delay_ms=300)
    team.write_peers([ALICE, BOB])
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address]}))
    first = world.router("r1", wan=inet, nat=NatMode.MASQUERADE)
    second = world.router("r2", wan=inet, nat=NatMode.MASQUERADE) if nat else first
    a, b = world.host("a", lans=[first.lan]), world.host("b", lans=[second.lan])
    low, high = sorted((PrivateKey.generate(), PrivateKey.generate()), key=public)
    alice_key, bob_key = (high, low) if restarted_holds else (low, high)
    alice = team.start_agent(a, *ALICE[:2], state_dir=state_dir_with_key(world, ALICE, alice_key))
    bob = team.start_agent(b, *BOB[:2], state_dir=state_dir_with_key(world, BOB, bob_key))
    key = running(alice)["public_key"]
    assert key == public(alice_key)
    running(bob)
    wait_ping(alice, BOB[2], bob)
    wait_ping(bob, ALICE[2], alice)

    assert alice.stop() == 0
    again = team.start_agent(a, *ALICE[:2], state_dir=alice.state_dir,
                             env={"KBWG_STANDIN_HOLD": "1"})
    assert running(again)["public_key"] == key
    wait_ping(again, BOB[2], bob)
    wait_ping(bob, ALICE[2], again)
    if restarted_holds:
        # Bob renewed his session when alice's checks came, so alice had his handshake
        # before her hold for it could run out.
        assert "alice/laptop checks us again (it restarted?)" in bob.log(200000), bob.log()
        ran_out = [line for line in again.log(200000).splitlines()
                   if "hold ended" in line and line.endswith("it ran out")]
        assert not ran_out, again.log()
