"""Drills (issue 15): the agent on a bad network, with its device owner killed, and
killed itself and restarted at once.

- 5 % loss and 100 ms jitter on every WAN link: every pair (direct and relayed) still
  connects, within 3x the time the same world took without them.
- The device owner killed with SIGKILL: `join` exits non-zero saying what happened and
  what to do, leaves nothing behind, and a fresh `join` works.
- `join` killed with SIGKILL and started again at once: it reconnects with exactly one
  interface, and the old device owner (whose agent died) cleaned up and went away.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import Direction, NatMode, Node, World
from kbwg_world.netns import namespace_pids
from kbwg_world.stunserver import StunServer
from kbwg_world.team import ALICE, BOB, AgentProcess, Team, first_ping
from kbwg_world.turnserver import start_relay
from kbwg_world.udp import UdpPeer

pytestmark = pytest.mark.netns

CAROL = ("carol", "nas", "100.64.0.3")
DAVE = ("dave", "phone", "100.64.0.4")
# Agents starting at once on two cores that other tests share.
STARTUP_TIMEOUT_S = 120.0


# -- what runs in a host, and what it has ----------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    argv: list[str]

    @property
    def kind(self) -> str:
        """owner, route-reaper, wireguard-go, agent or other."""
        text = " ".join(self.argv)
        if self.argv and os.path.basename(self.argv[0]) == "wireguard-go":
            return "wireguard-go"
        if "kbwg.owner.route_reaper" in text:
            return "route-reaper"
        if "kbwg.owner" in text or "kbwg-owner" in text:
            return "owner"
        if "kbwg-agent" in text or "kbwg.agent" in text:
            return "agent" if "join" in self.argv else "other"
        return "other"


def processes(host: Node) -> list[Proc]:
    """The live (not zombie) processes inside `host`'s network namespace."""
    found = []
    for pid in namespace_pids(host.ns):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" or argv == [b""]:
            continue
        found.append(Proc(pid, int(fields[1]), [a.decode(errors="replace") for a in argv]))
    return found


def of_kind(host: Node, kind: str) -> list[Proc]:
    return [p for p in processes(host) if p.kind == kind]


def kbwg_links(host: Node) -> list[str]:
    links = json.loads(host.run(["ip", "-j", "link", "show"]).stdout)
    return [link["ifname"] for link in links if link["ifname"].startswith("kbwg")]


def net_state(host: Node) -> dict[str, str]:
    """Everything the device owner may change in a host: links, addresses, routes (all
    tables) and the nftables ruleset."""
    return {
        "links": " ".join(sorted(
            link["ifname"] for link in json.loads(host.run(["ip", "-j", "link"]).stdout))),
        "addresses": host.run(["ip", "-o", "addr", "show"]).stdout,
        "routes": host.run(["ip", "route", "show", "table", "all"]).stdout,
        "rules": host.run(["ip", "rule", "show"]).stdout,
        "nft": host.run(["nft", "list", "ruleset"]).stdout,
    }


def wait_ping(agent: AgentProcess, dest: str, timeout: float, *others: AgentProcess) -> None:
    try:
        wait_until(lambda: agent.host.ping_ok(dest), timeout=timeout,
                   what=f"{agent.name} to ping {dest}")  # fmt: skip
    except AssertionError as exc:
        logs = "".join(f"\n--- log of {a.name}:\n{a.log(6000)}" for a in (agent, *others))
        raise AssertionError(f"{exc}{logs}") from None


def wait_running(agent: AgentProcess) -> dict[str, Any]:
    """The agent's status once it answers; fails at once if it exits."""

    def ready() -> dict[str, Any] | bool | None:
        return agent.proc.poll() is not None or agent.quick_status(timeout=5.0)

    status = wait_until(ready, timeout=STARTUP_TIMEOUT_S, what=f"{agent.name} to answer status")
    if not isinstance(status, dict):
        raise AssertionError(f"{agent.name} exited with {agent.proc.returncode}:\n"
                             f"{agent.log()}")
    return status


def start_running(team: Team, *devices: tuple[Node, str, str]) -> list[AgentProcess]:
    agents = [team.start_agent(host, username, device) for host, username, device in devices]
    for agent in agents:
        wait_running(agent)
    return agents


def lan_pair(world: World) -> tuple[Team, Node, Node]:
    inet = world.internet()
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    a, b = world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan])
    team = Team(world)
    team.write_peers([ALICE, BOB])
    return team, a, b


# -- the device owner killed -----------------------------------------------------------------


def test_owner_killed_stops_join_with_a_clear_error_and_leaves_nothing(world: World) -> None:
    team, a, b = lan_pair(world)
    before = net_state(a)
    alice, bob = start_running(team, (a, *ALICE[:2]), (b, *BOB[:2]))
    wait_ping(alice, BOB[2], 60, bob)
    (owner,) = [p for p in of_kind(a, "owner")]
    assert owner.ppid == alice.proc.pid, (owner, alice.proc.pid)
    assert len(of_kind(a, "wireguard-go")) == 1 and kbwg_links(a) == ["kbwg0"]

    os.kill(owner.pid, signal.SIGKILL)
    try:
        code = alice.proc.wait(timeout=60)
    except Exception:
        raise AssertionError(f"join kept running without its owner:\n{alice.log()}") from None
    log = alice.log()
    assert code != 0, log
    error = [line for line in log.splitlines() if line.startswith("kbwg-agent: error:")]
    assert len(error) == 1, log
    # What happened, and what to do about it.
    assert "device owner" in error[0] and "SIGKILL" in error[0], error[0]
    assert "kbwg-agent join" in error[0], error[0]

    # Nothing left: no device, no wireguard-go, no owner, nothing changed in the host.
    wait_until(lambda: not of_kind(a, "wireguard-go"), timeout=30, what="wireguard-go to exit")
    assert not of_kind(a, "owner") and not of_kind(a, "agent")
    wait_until(lambda: not kbwg_links(a), timeout=30, what="kbwg0 to go")
    assert net_state(a) == before
    assert not (alice.state_dir / "control.sock").exists()
    assert not (alice.state_dir / "owner.pid").exists()

    # The same state dir joins again at once and connects.
    again = team.start_agent(a, *ALICE[:2], state_dir=alice.state_dir)
    wait_running(again)
    wait_ping(again, BOB[2], 60, bob)
    assert kbwg_links(a) == ["kbwg0"] and len(of_kind(a, "owner")) == 1


# -- join killed and restarted at once -------------------------------------------------------


def test_join_killed_and_restarted_at_once_reconnects(world: World) -> None:
    team, a, b = lan_pair(world)
    before = net_state(a)
    alice, bob = start_running(team, (a, *ALICE[:2]), (b, *BOB[:2]))
    wait_ping(alice, BOB[2], 60, bob)
    (old_owner,) = of_kind(a, "owner")
    (old_wg,) = of_kind(a, "wireguard-go")

    # The old owner removes its device once it sees its agent go; on a loaded machine
    # that can take longer than a new `join` needs to get to creating its own. Holding
    # the old owner (SIGSTOP) makes that race certain instead of a matter of load.
    os.kill(old_owner.pid, signal.SIGSTOP)
    try:
        alice.proc.kill()
        alice.proc.wait(timeout=10)
        again = team.start_agent(a, *ALICE[:2], state_dir=alice.state_dir)
        wait_until(lambda: "waiting for it to remove its device" in again.log(100000)
                   or again.proc.poll() is not None, timeout=STARTUP_TIMEOUT_S,
                   what="the new agent to wait for the old owner")  # fmt: skip
        assert again.proc.poll() is None, again.log()
    finally:
        os.kill(old_owner.pid, signal.SIGCONT)
    wait_running(again)
    wait_ping(again, BOB[2], 60, bob)
    wait_ping(bob, ALICE[2], 30, again)

    # The old owner saw its agent go (end of its input), removed its device and exited.
    pids = {p.pid for p in processes(a)}
    assert old_owner.pid not in pids and old_wg.pid not in pids, processes(a)
    owners, wgs = of_kind(a, "owner"), of_kind(a, "wireguard-go")
    assert [o.ppid for o in owners] == [again.proc.pid], processes(a)
    assert len(wgs) == 1 and kbwg_links(a) == ["kbwg0"], processes(a)
    status, bobs = wait_running(again), wait_running(bob)
    assert status["public_key"] in {p["public_key"] for p in bobs["peers"]}

    again.stop()
    assert net_state(a) == before
    assert not of_kind(a, "owner") and not of_kind(a, "wireguard-go")
    assert not (again.state_dir / "owner.pid").exists()


# -- loss and jitter on every WAN link -------------------------------------------------------

LOSS_PERCENT = 5.0
# "100 ms jitter": each packet is held a uniform random 0..100 ms (50 +- 50 ms, netem's
# `delay 50ms 50ms`) at each end of each WAN link and direction, and may overtake earlier
# packets, as with netem.
JITTER_MS = 100.0
# The clean time has a floor, because WireGuard retries a lost handshake only after 5 s
# (REKEY_TIMEOUT) whatever the clean time was. A relayed pair's packets cross four lossy
# points each way (their sites' links and the relay's, both ways), so about half its
# first handshakes lose a packet (initiation, response or the confirming keepalive), and
# one in five needs a third try: 10 s of retries on top of a clean time of one to a few
# seconds (from running to the first ping). Below 10 s, "3x" would measure WireGuard's
# timer, not the agent; above it, the agent's own slowness (a stuck negotiation, crossing
# handshakes, a path that flaps) still shows.
CLEAN_FLOOR_S = 10.0
SLOWDOWN = 3.0


def test_jitter_spreads_delays_and_reorders(world: World) -> None:
    inet = world.internet()
    server = world.server("srv", inet)
    host = world.server("h", inet)
    world.set_delay(host, "eth0", 0, Direction.INGRESS, jitter_ms=JITTER_MS)
    rtts = server.ping(host.ip, count=40, interval=0.01, timeout=1.0).rtts_ms
    assert len(rtts) == 40, rtts
    # Uniform 0..100 ms: 40 draws all below 25 ms or all above 75 ms have odds of 1e-24.
    assert min(rtts) < 25.0 and 75.0 < max(rtts) < 130.0, rtts
    assert 30.0 < statistics.mean(rtts) < 75.0, rtts

    listener = UdpPeer.start(host, 5000)
    sender = UdpPeer.start(server, 40000)
    for i in range(100):
        sender.send(host.ip, 5000, str(i))
    received = []
    while (dgram := listener.recv(timeout=1.0)) is not None:
        received.append(int(dgram.data))
    assert sorted(received) == list(range(100)), "jitter lost packets"
    assert received != list(range(100)), "jitter kept every packet in order"

    world.set_delay(host, "eth0", 0, Direction.INGRESS, jitter_ms=JITTER_MS, in_order=True)
    for i in range(100):
        sender.send(host.ip, 5000, str(i))
    received = []
    while (dgram := listener.recv(timeout=1.0)) is not None:
        received.append(int(dgram.data))
    assert received == list(range(100))


@dataclass
class Site:
    host: Node
    who: tuple[str, str, str]


def impair_wan(world: World, node: Node, wan: str, lan: str | None) -> None:
    """Loss and jitter both ways on `node`'s WAN link.

    A NAT router's outbound packets are held on their way *in* from the LAN: held after
    conntrack (on the WAN egress), two packets of a new flow would be NATed apart and may
    leave from different ports, which no real router does (see shaping.py).
    """
    world.set_loss(node, wan, LOSS_PERCENT, Direction.BOTH)
    world.set_delay(node, wan, 0, Direction.INGRESS, jitter_ms=JITTER_MS)
    if lan is None:
        world.set_delay(node, wan, 0, Direction.EGRESS, jitter_ms=JITTER_MS)
    else:
        world.set_delay(node, lan, 0, Direction.INGRESS, jitter_ms=JITTER_MS)


def time_to_connect(team: Team, sites: list[Site], tag: str, budget: float) -> tuple[
        float, dict[str, float], list[AgentProcess]]:
    """Start an agent per site at once. For each pair, seconds from both agents running
    (answering status) to the first ping over the overlay; the slowest pair, each pair's
    time, and the agents. Start-up is left out: it is process start on two cores shared
    with other tests, the same with or without loss, and would only blur the ratio."""
    agents = []
    for site in sites:
        state_dir = team.world.dir / "agents" / f"{tag}-{site.who[0]}"
        agents.append(team.start_agent(site.host, *site.who[:2], state_dir=state_dir))
    ips = {agent.name: site.who[2] for agent, site in zip(agents, sites, strict=True)}
    pairs = list(itertools.combinations(agents, 2))

    def connect(pair: tuple[AgentProcess, AgentProcess]) -> float:
        src, dst = pair
        # ping picks its source address when it starts: started before the agent made
        # its interface, it would send from the LAN address, which no peer accepts.
        wait_running(src)
        wait_running(dst)
        running = time.monotonic()
        first_ping(src.host, ips[dst.name], timeout=budget)
        return time.monotonic() - running

    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        futures = {f"{a.name}-{b.name}": pool.submit(connect, (a, b)) for a, b in pairs}
        times: dict[str, float] = {}
        failed = []
        for name, future in futures.items():
            try:
                times[name] = future.result()
            except AssertionError as exc:
                failed.append(f"{name}: {exc}")
    if failed:
        logs = "".join(f"\n--- log of {a.name}:\n{a.log(5000)}" for a in agents)
        raise AssertionError(f"{tag}: no ping within {budget:.0f}s: {failed} (the others: "
                             f"{times}){logs}")
    return max(times.values()), times, agents


def paths(agents: list[AgentProcess]) -> dict[str, str]:
    """Each pair's path as its first agent reports it ("?" while it does not answer)."""
    found = {}
    for a, b in itertools.combinations(agents, 2):
        status = a.quick_status(timeout=5.0)
        peer = next((p for p in (status or {}).get("peers", []) if p["device"] == b.device),
                    None)
        found[f"{a.name}-{b.name}"] = "?" if peer is None else peer["path"]
    return found


# Paths the world's NATs allow: the port-preserving NATs punch, the symmetric one is
# relayed except towards the public host.
EXPECTED_PATHS = {"alice/laptop-bob/desk": "direct", "alice/laptop-carol/nas": "relay",
                  "bob/desk-carol/nas": "relay"}


def wait_paths(agents: list[AgentProcess], timeout: float) -> dict[str, str]:
    """The pairs' paths once the expected ones are in place (relay first is allowed)."""

    def settled() -> dict[str, str] | None:
        now = paths(agents)
        return now if all(now[k] == v for k, v in EXPECTED_PATHS.items()) else None

    try:
        return wait_until(settled, timeout=timeout, what=f"paths {EXPECTED_PATHS}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {paths(agents)}") from None


def stop_all(agents: list[AgentProcess]) -> None:
    for agent in agents:
        agent.proc.send_signal(signal.SIGINT)
    for agent in agents:
        assert agent.proc.wait(timeout=60) == 0, agent.log()


def test_loss_and_jitter_on_every_wan_link(world: World) -> None:
    inet = world.internet()
    stun_node = world.server("stun", inet, ips=["203.0.113.2"])
    relay_node = world.server("relay", inet, ips=["203.0.113.5"])
    stun = StunServer.start(stun_node)
    relay = start_relay(relay_node, "203.0.113.5")
    routers = [world.router("r1", wan=inet, nat=NatMode.MASQUERADE),
               world.router("r2", wan=inet, nat=NatMode.MASQUERADE),
               world.router("r3", wan=inet, nat=NatMode.FULLY_RANDOM)]
    public = world.host("d", lans=[inet])
    # alice and bob behind port-preserving NATs (direct between them and to dave, who is
    # public), carol behind a symmetric one (relayed to alice and bob).
    sites = [Site(world.host("a", lans=[routers[0].lan]), ALICE),
             Site(world.host("b", lans=[routers[1].lan]), BOB),
             Site(world.host("c", lans=[routers[2].lan]), CAROL),
             Site(public, DAVE)]
    config = json.dumps({"stun": [stun.address], "relays": [relay.config()]})
    # One team per run, so the second run reads none of the first run's announcements.
    teams = [Team(world, name=name, delay_ms=300) for name in ("drill-clean", "drill-lossy")]
    for team in teams:
        team.write_peers([site.who for site in sites])
        team.write_file("kbwg.json", config)

    clean, clean_pairs, agents = time_to_connect(teams[0], sites, "clean", budget=90)
    clean_paths = wait_paths(agents, timeout=60)
    stop_all(agents)

    for router in routers:
        impair_wan(world, router, "wan0", "lan0")
    for node in (stun_node, relay_node, public):
        impair_wan(world, node, "eth0", None)
    bound = SLOWDOWN * max(clean, CLEAN_FLOOR_S)
    # Past the bound it has failed already; the extra time only tells by how much.
    lossy, lossy_pairs, agents = time_to_connect(teams[1], sites, "lossy", budget=bound + 30)
    report = (f"clean {clean:.1f}s {clean_pairs} {clean_paths}; with loss and jitter "
              f"{lossy:.1f}s {lossy_pairs}")
    print(report)
    assert lossy <= bound, report
    # The punched pair is not left on the relay by a few lost checks.
    print(wait_paths(agents, timeout=60))
    # Still connected a while later: nothing was only luck of the first packets.
    for agent, site in itertools.product(agents[:1], sites[1:]):
        wait_ping(agent, site.who[2], 30, *agents)
