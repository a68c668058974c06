"""`./run demo`: four devices of a Keybase team, behind different NATs, form a mesh.

A netns world: an internet segment with a STUN server (coturn) and the team's own relay
(`kbwg-agent relay`); a home router (port-preserving masquerade NAT, stateful firewall)
with alice and bob on its LAN; carol behind another port-preserving NAT; dave behind a
symmetric (fully-random) NAT. Each runs `kbwg-agent join demo-team` with the Keybase
stand-in (300 ms chat delivery delay). The demo prints the per-peer path table each
agent chose (LAN, punched through NATs, or relayed), pings every pair over the overlay,
and tears everything down.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_world import NatMode, World, wait_until
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AGENT, AgentProcess, Team, first_ping
from kbwg_world.turnserver import start_relay

DEVICES = [
    ("alice", "laptop", "100.64.0.1", "home"),
    ("bob", "desk", "100.64.0.2", "home"),
    ("carol", "nas", "100.64.0.3", "office"),
    ("dave", "phone", "100.64.0.4", "cafe"),
]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def settled(agent: AgentProcess) -> dict[str, Any] | None:
    status = agent.try_status()
    if status and all(p["path"] != "none" and p["last_handshake"] for p in status["peers"]):
        return status
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=int, default=300, help="chat delivery delay")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="copy every agent's log to DIR before the world is torn down")
    args = parser.parse_args()

    with World() as world:
        step("building the world")
        inet = world.internet()
        stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
        relay = start_relay(world.server("relay", inet, ips=["203.0.113.5"]), "203.0.113.5")
        routers = {
            "home": world.router("home", wan=inet, nat=NatMode.MASQUERADE),
            "office": world.router("office", wan=inet, nat=NatMode.MASQUERADE),
            "cafe": world.router("cafe", wan=inet, nat=NatMode.FULLY_RANDOM),
        }
        hosts = {user: world.host(user, lans=[routers[site].lan])
                 for user, _, _, site in DEVICES}
        print(f"internet {inet.subnet}: STUN {stun.address}, relay {relay.url}")
        for name, router in routers.items():
            kind = "symmetric NAT" if router.nat is NatMode.FULLY_RANDOM else \
                "port-preserving NAT"
            members = ", ".join(f"{u} {hosts[u].ip}" for u, _, _, s in DEVICES if s == name)
            print(f"  {name:7} WAN {router.wan_ip:13} {kind:20} LAN {router.lan.subnet}: "
                  f"{members}")

        team = Team(world, delay_ms=args.delay_ms)
        team.write_peers([(u, d, ip) for u, d, ip, _ in DEVICES])
        team.write_file("kbwg.json", json.dumps(
            {"stun": [stun.address], "relays": [relay.config()]}, indent=2))
        step(f"team files in /keybase/team/{team.name}/ (chat delay {args.delay_ms} ms)")
        print("peers.json:", team.kbfs_path("peers.json").read_text())
        print("kbwg.json (the relay secret stays inside the team):",
              team.kbfs_path("kbwg.json").read_text())

        step("starting `kbwg-agent join demo-team` on every host")
        agents = [team.start_agent(hosts[u], u, d) for u, d, _, _ in DEVICES]
        for agent in agents:
            team.wait_running(agent)
        t0 = time.monotonic()
        waits = []
        for a, b in itertools.permutations(agents, 2):
            ip = next(ip for u, _, ip, _ in DEVICES if u == b.username)
            waits.append((first_ping(a.host, ip), a.name, b.name))
        slowest = max(waits)
        print(f"every pair answered a ping within {time.monotonic() - t0:.2f} s of all "
              f"agents running (slowest pair {slowest[1]} -> {slowest[2]}: "
              f"{slowest[0]:.2f} s)")

        step("the path each agent chose for each peer")
        rows: list[tuple[str, ...]] = [("AGENT", "PEER", "PATH", "ENDPOINT", "RTT", "REASON")]
        for agent in agents:
            status = wait_until(functools.partial(settled, agent), timeout=30,
                                what=f"{agent.name} to settle")
            for peer in status["peers"]:
                rtt = f"{peer['rtt_ms']:.1f} ms" if peer["rtt_ms"] is not None else "-"
                rows.append((agent.name, f"{peer['username']}/{peer['device']}", peer["path"],
                             peer["endpoint"] or "-", rtt, peer["reason"]))
        table(rows)

        step("kbwg-agent status on dave's phone (behind the symmetric NAT)")
        print(agents[3].host.run([*AGENT, "status", "--state-dir",
                                  str(agents[3].state_dir)]).stdout)  # fmt: skip

        step("ping over the overlay")
        failed = False
        rows = [("FROM", "TO", "REPLIES", "RTT")]
        for a, (user, device, ip, _) in itertools.product(agents, DEVICES):
            if a.username == user:
                continue
            result = a.host.ping(ip, count=3, interval=0.2)
            rtt = f"{min(result.rtts_ms):.2f} ms" if result.rtts_ms else "-"
            rows.append((a.name, f"{user}/{device} {ip}", f"{result.received}/{result.sent}",
                         rtt))
            failed |= not result.ok
        table(rows)

        step("stopping the agents (INT): each removes its interface")
        for agent in agents:
            code = agent.stop()
            links = agent.host.run(["ip", "-o", "link", "show"]).stdout
            state = "STILL THERE" if "kbwg0" in links else "removed"
            print(f"  {agent.name:13} exit {code}, kbwg0 {state}")
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for agent in agents:
                shutil.copyfile(agent.log_path, args.logs / f"{agent.username}-{agent.device}.log")
            print(f"agent logs copied to {args.logs}/")
    print("\nworld torn down; nothing left behind")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
