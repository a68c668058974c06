"""`./run demo`: three devices of a Keybase team on one LAN join a WireGuard mesh.

Builds a netns world (an internet segment, a home router with a masquerade NAT and a
stateful firewall, three hosts on its LAN), runs `kbwg-agent join demo-team` on each host
with the Keybase stand-in (300 ms chat delivery delay), prints every agent's peer table,
pings every pair over the overlay and tears everything down.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_world import NatMode, World, wait_until
from kbwg_world.team import AGENT, AgentProcess, Team, first_ping

DEVICES = [("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2"),
           ("carol", "nas", "100.64.0.3")]  # fmt: skip


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def all_handshaken(agent: AgentProcess) -> bool:
    status = agent.try_status()
    return bool(status) and all(p["last_handshake"] for p in status["peers"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-ms", type=int, default=300, help="chat delivery delay")
    args = parser.parse_args()

    with World() as world:
        step("building the world")
        inet = world.internet()
        router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
        hosts = [world.host(name, lans=[router.lan]) for name in ("alice", "bob", "carol")]
        print(f"internet {inet.subnet}; router 'home' WAN {router.ip}, NAT masquerade, "
              f"LAN {router.lan.subnet}")  # fmt: skip
        for host in hosts:
            print(f"  host {host.name:6} {host.ip}")

        team = Team(world, delay_ms=args.delay_ms)
        team.write_peers(DEVICES)
        step(f"peers.json in /keybase/team/{team.name}/ (chat delay {args.delay_ms} ms)")
        print(team.kbfs_path("peers.json").read_text())

        step("starting `kbwg-agent join demo-team` on each host")
        t0 = time.monotonic()
        agents = [team.start_agent(h, u, d) for h, (u, d, _) in zip(hosts, DEVICES, strict=True)]
        for agent in agents:
            team.wait_running(agent)
        for a, b in itertools.permutations(agents, 2):
            ip = DEVICES[agents.index(b)][2]
            first_ping(a.host, ip)
            print(f"  {a.name:13} -> {b.name:10} first reply "
                  f"{time.monotonic() - t0:.2f} s after start")  # fmt: skip
        for agent in agents:
            wait_until(lambda agent=agent: all_handshaken(agent), timeout=20,
                       what=f"{agent.name} to see handshakes")  # fmt: skip

        step("kbwg-agent status, on each host")
        for agent in agents:
            print(f"-- {agent.host.name}")
            print(agent.host.run([*AGENT, "status", "--state-dir", str(agent.state_dir)]).stdout)

        step("ping over the overlay")
        for a, (b_user, b_dev, ip) in itertools.product(agents, DEVICES):
            if a.username == b_user:
                continue
            result = a.host.ping(ip, count=3, interval=0.2)
            rtt = f"{min(result.rtts_ms):.2f} ms" if result.rtts_ms else "-"
            print(f"{a.name:13} -> {b_user}/{b_dev:7} {ip:11} {result.received}/{result.sent} "
                  f"replies, rtt {rtt}")  # fmt: skip
            if not result.ok:
                print(f"FAILED\n{a.log()}")
                return 1

        step("stopping the agents (INT): each removes its interface")
        for agent in agents:
            code = agent.stop()
            links = agent.host.run(["ip", "-o", "link", "show"]).stdout
            state = "STILL THERE" if "kbwg0" in links else "removed"
            print(f"{agent.name:13} exit {code}, kbwg0 {state}")
    print("\nworld torn down; nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
