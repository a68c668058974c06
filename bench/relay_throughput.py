"""iperf3 over the overlay: direct path vs relayed through our relay vs through coturn.

One world for every row: a STUN server, `kbwg-agent relay` and coturn on the internet,
the Keybase stand-in, two hosts behind port-preserving NATs (the direct rows) and two
behind fully-random symmetric NATs (the relayed rows, where no direct pair exists). The
relayed pair is measured twice with the same devices: the team's kbwg.json names our
relay, then only coturn, and the two agents are restarted in between (agents read
kbwg.json when they start).

The first row is the ceiling: two bare wireguard-go instances, configured by hand with
`wg`, between the same two hosts. The agent's direct path is wireguard-go too, so it
should match that row; the machine's speed shows there, not in the agent.

    sudo .venv/bin/python bench/relay_throughput.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, Router, World
from kbwg_world.iperf import iperf_mbits
from kbwg_world.stunserver import StunServer
from kbwg_world.team import Team
from kbwg_world.turnserver import TurnServer, start_relay

DIRECT = (("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2"))
RELAYED = (("carol", "phone", "100.64.0.3"), ("dave", "tablet", "100.64.0.4"))
Device = tuple[str, str, str]

# Bare wireguard-go: its own interface, port and subnet, in a private mount namespace
# (its UAPI socket directory is shared by all namespaces otherwise).
BARE_PORT = 51900
BARE_SCRIPT = """
mount -t tmpfs kbwg-bench /var/run/wireguard
WG_PROCESS_FOREGROUND=1 wireguard-go wgbench &
until wg show wgbench >/dev/null 2>&1; do sleep 0.05; done
wg set wgbench listen-port {port} private-key {key} peer {peer} endpoint {endpoint} \
    allowed-ips {subnet} persistent-keepalive 1
ip addr add {address}/24 dev wgbench
ip link set wgbench up
wait
"""


def bare_wireguard(world: World, hosts: tuple[Node, Node], routers: tuple[Router, Router],
                   seconds: float) -> float:
    """iperf3 between two bare wireguard-go instances, endpoints the NATs' WAN addresses."""
    keys = []
    for host in hosts:
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        path = world.dir / f"bench-{host.name}.key"
        path.write_text(private + "\n")
        keys.append((path, public))
    addresses = ("100.64.200.1", "100.64.200.2")
    procs = []
    for i, host in enumerate(hosts):
        other = 1 - i
        script = BARE_SCRIPT.format(
            port=BARE_PORT, key=keys[i][0], peer=keys[other][1],
            endpoint=f"{routers[other].wan_ip}:{BARE_PORT}", subnet="100.64.200.0/24",
            address=addresses[i],
        )  # fmt: skip
        procs.append(host.popen(["unshare", "--mount", "--propagation", "private",
                                 "sh", "-c", script], stdout=subprocess.DEVNULL))  # fmt: skip
    try:
        wait_until(lambda: hosts[0].ping(addresses[1], count=1, timeout=1.0).ok, timeout=20,
                   what="bare wireguard-go")  # fmt: skip
        return iperf_mbits(hosts[0], hosts[1], addresses[1], seconds)
    finally:
        for host in hosts:
            host.run(["ip", "link", "del", "wgbench"], check=False)  # wireguard-go exits
        for proc in procs:
            proc.wait(timeout=10)


def through_agents(team: Team, hosts: tuple[Node, Node], devices: tuple[Device, Device],
                   seconds: float) -> tuple[float | None, str]:
    """Start the two devices' agents, iperf3 from the first to the second, stop them."""
    (a, b), (first, second) = hosts, devices
    agents = team.start_running((a, *first[:2]), (b, *second[:2]))
    try:
        try:
            wait_until(lambda: a.ping(second[2], count=1, timeout=1.0).ok, timeout=20,
                       what="a path")  # fmt: skip
        except AssertionError:
            return None, "no path"
        peer = next(p for p in agents[0].status()["peers"] if p["device"] == second[1])
        mbits = iperf_mbits(a, b, second[2], seconds)
        return mbits, f"{peer['path']} {peer['local_candidate']} -> {peer['remote_candidate']}"
    finally:
        for agent in agents:
            agent.stop()


def show(name: str, mbits: float | None, detail: str) -> None:
    shown = f"{mbits:8.0f}" if mbits is not None else "       -"
    print(f"{name:32} {shown}  {detail}", flush=True)


def run_rows(seconds: float) -> dict[str, float | None]:
    results: dict[str, float | None] = {}
    print(f"iperf3 over the overlay, {seconds:.0f} s per row")
    print(f"{'path':32} {'Mbit/s':>8}  chosen pair")
    with World() as world:
        inet = world.internet()
        stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
        relays = {
            kind: start_relay(world.server(f"relay-{kind}", inet, ips=[ip]), ip, kind=kind)
            for kind, ip in (("kbwg", "203.0.113.5"), ("coturn", "203.0.113.6"))
        }
        team = Team(world, delay_ms=300)
        team.write_peers([*DIRECT, *RELAYED])

        def use(relay: TurnServer) -> None:
            team.write_file("kbwg.json", json.dumps(
                {"stun": [stun.address], "relays": [relay.config()]}))

        def behind(name: str, nat: NatMode) -> tuple[Node, Router]:
            router = world.router(f"r-{name}", wan=inet, nat=nat)
            return world.host(name, lans=[router.lan]), router

        (a, ra), (b, rb) = behind("a", NatMode.MASQUERADE), behind("b", NatMode.MASQUERADE)
        (c, _), (d, _) = behind("c", NatMode.FULLY_RANDOM), behind("d", NatMode.FULLY_RANDOM)

        name = "bare wireguard-go, no agent"
        results[name] = bare_wireguard(world, (a, b), (ra, rb), seconds)
        show(name, results[name], "two masquerade NATs, endpoints set by hand")
        rows = [
            ("direct (port-preserving NATs)", relays["kbwg"], (a, b), DIRECT),
            ("relayed by kbwg-agent relay", relays["kbwg"], (c, d), RELAYED),
            ("relayed by coturn", relays["coturn"], (c, d), RELAYED),
        ]
        for name, relay, hosts, devices in rows:
            use(relay)
            results[name], detail = through_agents(team, hosts, devices, seconds)
            show(name, results[name], detail)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = run_rows(args.seconds)
    bare, direct, ours, coturn = results.values()
    if bare and direct:
        print(f"direct / bare wireguard-go = {direct / bare:.2f}")
    for name, mbits in (("kbwg-agent relay", ours), ("coturn", coturn)):
        if direct and mbits:
            print(f"relayed by {name} / direct = {mbits / direct:.2f}")
    if ours and coturn:
        print(f"our relay / coturn = {ours / coturn:.2f}")
    print("reference (DESIGN.md): Nebula relayed 0.30 Gbit/s vs 0.52 direct; wireguard-go "
          "through a Python forwarder about 0.15 Gbit/s vs 0.47 direct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
