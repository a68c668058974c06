"""Random worlds: shapes the netns tests do not build, and events they do not combine.

Each seed builds one world: 3-5 devices (`--devices N` to fix it), each public, behind
a router of its own (masquerade, random or fully-random symmetric NAT, a routed LAN
behind a firewall, or static DNAT forwarding the WireGuard port, sometimes with
`--endpoint`), on another device's LAN, or behind a second masquerade NAT inside
another router's LAN; 0-60 ms delay and 0-3 % loss on router uplinks (`--lossy`: 5-15 %
loss, chat 1.5-3 s), some routers letting no UDP out (the relay is listed over UDP and
TCP), chat delay 0-800 ms, our relay or coturn, overlay addresses
anywhere in 100.64.0.0/10, and (`--ipv6`) IPv6 on some LANs. It starts every agent at
once and waits until every ordered pair pings over the overlay, then applies
`--events` random events (a NAT forgets its mappings, a NAT moves to a new public
address, the relay is killed and restarted, an agent is stopped with INT or SIGKILL
and started again with its state dir, a device moves to another network as a laptop
does), each followed by the same wait.

Prints per seed the world, the time until every pair answered, each event's time to
full recovery and which pairs never came back (`--timeout`, 60 s), each agent's paths,
allocations it lost, and lines a user should not see (tracebacks, ERROR). A seed
always builds the same world and events; timing makes runs differ. Exits 1 when a
pair never came back or an agent logged an unwanted line. An earlier form of it found
a relay sent to a peer's private address and a restarted relay noticed only at the
15 s watch (README, Benchmarks).

    sudo .venv/bin/python bench/random_worlds.py 1 2 3 [--events 4] [--only roam] [--ipv6] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "netns-tests"))

from kbwg_world import NatMode, Node, Router, Segment, World  # noqa: E402
from kbwg_world.natchange import forget_mappings, new_public_address  # noqa: E402
from kbwg_world.stunserver import StunServer  # noqa: E402
from kbwg_world.team import AgentProcess, Team  # noqa: E402
from kbwg_world.turnserver import TurnServer, start_relay  # noqa: E402

STUN_IP, RELAY_IP = "203.0.113.2", "203.0.113.5"
PORT = 51820
MODES = [NatMode.MASQUERADE, NatMode.MASQUERADE_RANDOM, NatMode.FULLY_RANDOM,
         NatMode.NONE, NatMode.STATIC_DNAT]
EVENTS = ["flush", "readdress", "restart", "kill", "relay", "roam"]
UNWANTED = re.compile(r"Traceback| ERROR |CRITICAL")


@dataclass
class Placed:
    host: Node
    extra: list[str]
    router: Router | None  # the NAT or firewall in front of it, if any


@dataclass
class Outcome:
    seed: int
    shape: list[str]
    connected_s: float | None = None
    never: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    paths: dict[str, dict[str, str]] = field(default_factory=dict)
    allocations_lost: int = 0
    unwanted: list[str] = field(default_factory=list)


def place(world: World, rng: random.Random, inet: Any, index: int, routers: list[Router],
          options: argparse.Namespace, shape: list[str]) -> Placed:
    name = f"h{index}"
    roll = rng.random()
    if routers and roll < 0.25:
        router = rng.choice(routers)
        shape.append(f"{name} on {router.name}'s LAN ({router.nat.value})")
        return Placed(world.host(name, lans=[router.lan]), [], router)
    if roll < 0.35:
        shape.append(f"{name} public")
        return Placed(world.host(name, lans=[inet]), [], None)
    if routers and roll < 0.45:
        outer = rng.choice(routers)
        inner = world.router(f"c{index}", wan=outer.lan, nat=NatMode.MASQUERADE)
        shape.append(f"{name} behind a masquerade NAT behind {outer.name} "
                     f"({outer.nat.value})")
        return Placed(world.host(name, lans=[inner.lan]), [], inner)
    mode = rng.choice(MODES)
    delay = rng.choice([0, 0, 20, 60])
    loss = rng.choice([5, 10, 15]) if options.lossy else rng.choice([0, 0, 0, 3])
    lan6 = f"2001:db8:{index + 1}::/64" if options.ipv6 and rng.random() < 0.6 else None
    router = world.router(f"r{index}", wan=inet, nat=mode, ipv6_lan=lan6,
                          delay_ms={"wan0": delay} if delay else None,
                          loss_percent={"wan0": loss} if loss else None)
    routers.append(router)
    no_udp = mode is not NatMode.STATIC_DNAT and rng.random() < 0.12
    if no_udp:  # a network that lets no UDP out: only the relay over TCP gets through
        router.block_outbound_udp()
    host = world.host(name, lans=[router.lan])
    extra: list[str] = []
    if mode is NatMode.STATIC_DNAT:
        router.forward_port(PORT, host, PORT)
        if rng.random() < 0.5:
            extra = ["--endpoint", f"{router.wan_ip}:{PORT}"]
    shape.append(f"{name} behind {router.name} ({mode.value}, {delay} ms, {loss} % loss"
                 f"{', IPv6 LAN' if lan6 else ''}{', --endpoint' if extra else ''}"
                 f"{', no UDP out' if no_udp else ''})")
    return Placed(host, extra, router)


def overlay_addresses(rng: random.Random, count: int) -> list[str]:
    base = rng.choice([IPv4Address("100.64.0.1"), IPv4Address("100.100.7.10"),
                       IPv4Address("100.127.200.1")])
    return [str(base + i * 3) for i in range(count)]


def reach_all(agents: list[AgentProcess], overlay: list[str], timeout: float) -> tuple[
        float, list[str]]:
    """Seconds until every ordered pair answered a ping; the pairs that never did."""
    start = time.monotonic()
    never = []
    for (i, a), (j, _) in itertools.permutations(enumerate(agents), 2):
        while not a.host.ping_ok(overlay[j]):
            if time.monotonic() - start > timeout or a.proc.poll() is not None:
                never.append(f"h{i}->h{j}")
                break
    return time.monotonic() - start, never


def roam(rng: random.Random, world: World, inet: Segment, placed: list[Placed],
         routers: list[Router]) -> str:
    """A device leaves its network for another router's LAN or the internet, as a
    laptop moves from one Wi-Fi to another: the old interface loses its addresses and
    goes down, a new one comes up there. Not a device given `--endpoint` (it names the
    old router)."""
    i = rng.choice([n for n, p in enumerate(placed) if not p.extra])
    host, current = placed[i].host, placed[i].router
    target = rng.choice([r for r in routers if r is not current] + [None])
    old = host.interfaces[-1].name
    host.ip_batch([f"addr flush dev {old}", f"link set {old} down"])
    seg = inet if target is None else target.lan
    new = world.attach(host, seg, f"eth{len(host.interfaces)}")
    if seg.gateway is not None:
        host.ip_batch([f"route replace default via {seg.gateway} dev {new.name}"])
    if seg.gateway6 is not None:
        host.ip_batch([f"route replace ::/0 via {seg.gateway6} dev {new.name}"])
    placed[i] = Placed(host, [], target)
    where = "the internet" if target is None else f"{target.name}'s LAN"
    return f"h{i} moves to {where} ({new.addresses[0]})"


def apply_event(rng: random.Random, world: World, inet: Segment, team: Team,
                placed: list[Placed], agents: list[AgentProcess],
                devices: list[tuple[str, str, str]], relay: TurnServer,
                kind: str, events: list[str]) -> tuple[str, TurnServer]:
    routers = sorted({p.router for p in placed if p.router is not None},
                     key=lambda r: r.name)
    natted = [r for r in routers if r.nat is not NatMode.NONE]
    event = rng.choice(events)
    if event == "flush" and routers:
        router = rng.choice(routers)
        forget_mappings(router)
        return f"{router.name} forgets its mappings", relay
    if event == "readdress" and natted:
        # Not a routed LAN's router: the internet's route to its LAN names the old address.
        router = rng.choice(natted)
        return f"{router.name} moves to {new_public_address(router)}", relay
    if event == "roam":
        return roam(rng, world, inet, placed, routers), relay
    if event == "relay":
        relay.kill()
        return "relay restarted", start_relay(relay.node, RELAY_IP, kind=kind)
    i = rng.randrange(len(agents))
    how = signal.SIGKILL if event == "kill" else signal.SIGINT
    old = agents[i]
    old.proc.send_signal(how)
    old.proc.wait(timeout=30)
    username, device, _ = devices[i]
    agents[i] = team.start_agent(placed[i].host, username, device, *placed[i].extra,
                                 state_dir=old.state_dir)
    return f"h{i} {'killed' if event == 'kill' else 'stopped'} and started again", relay


def run(seed: int, options: argparse.Namespace) -> Outcome:
    rng = random.Random(seed)
    shape: list[str] = []
    with World() as world:
        inet = world.internet(extra_subnets=["198.51.100.0/24"],
                              ipv6="2001:db8::/64" if options.ipv6 else None)
        stun = StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
        kind = rng.choice(["kbwg", "coturn"])
        relay = start_relay(world.server("relay0", inet, ips=[RELAY_IP]), RELAY_IP, kind=kind)
        chat = rng.choice([1500, 3000]) if options.lossy else rng.choice([0, 300, 800])
        team = Team(world, delay_ms=chat)
        count = options.devices or rng.randint(3, 5)
        overlay = overlay_addresses(rng, count)
        devices = [(f"user{i}", f"dev{i}", overlay[i]) for i in range(count)]
        team.write_peers(devices)
        # The relay over UDP, then over TCP for hosts whose network lets no UDP out.
        team.write_file("kbwg.json", json.dumps(
            {"stun": [stun.address], "relays": [relay.config(), relay.config_for("tcp")]}))
        shape.append(f"{count} devices, relay {kind}, chat {chat} ms")
        routers: list[Router] = []
        placed = [place(world, rng, inet, i, routers, options, shape) for i in range(count)]
        outcome = Outcome(seed, shape)
        print(f"seed {seed}: " + "; ".join(shape), flush=True)
        agents = [team.start_agent(p.host, u, d, *p.extra)
                  for p, (u, d, _) in zip(placed, devices, strict=True)]
        took, outcome.never = reach_all(agents, overlay, options.timeout)
        outcome.connected_s = round(took, 2)
        print(f"  every pair in {took:.1f} s" +
              (f"; never: {', '.join(outcome.never)}" if outcome.never else ""), flush=True)
        for _ in range(options.events):
            what, relay = apply_event(rng, world, inet, team, placed, agents, devices,
                                      relay, kind, options.only or EVENTS)
            took, never = reach_all(agents, overlay, options.timeout)
            outcome.events.append({"event": what, "recovered_s": round(took, 2),
                                   "never": never})
            print(f"  {what}: every pair again in {took:.1f} s" +
                  (f"; never: {', '.join(never)}" if never else ""), flush=True)
        for i, agent in enumerate(agents):
            status = agent.quick_status() or {}
            outcome.paths[f"h{i}"] = {
                p["device"]: f"{p['path']} {p['local_candidate']} -> {p['remote_candidate']}"
                for p in status.get("peers", [])}
        for agent in team.agents:
            for line in agent.log_path.read_text(errors="replace").splitlines():
                if "allocation" in line and " lost" in line:
                    outcome.allocations_lost += 1
                if UNWANTED.search(line):
                    outcome.unwanted.append(f"{agent.name}: {line[:300]}")
        if options.logs is not None:
            keep = options.logs / str(seed)
            keep.mkdir(parents=True, exist_ok=True)
            for n, agent in enumerate(team.agents):
                shutil.copy(agent.log_path, keep / f"{agent.name.replace('/', '-')}-{n}.log")
            (keep / "relay.log").write_text(relay.log())
        team.stop_all()
    for host, seen in outcome.paths.items():
        print(f"  {host}: " + "; ".join(f"{d} {p}" for d, p in seen.items()))
    print(f"  allocations lost: {outcome.allocations_lost}")
    for line in outcome.unwanted[:20]:
        print(f"  UNWANTED {line}")
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--events", type=int, default=4, help="events per world (4)")
    parser.add_argument("--only", action="append", choices=EVENTS, metavar="EVENT",
                        help=f"draw events only from these ({', '.join(EVENTS)}; repeatable)")
    parser.add_argument("--devices", type=int, default=0, help="devices (3-5 at random)")
    parser.add_argument("--ipv6", action="store_true", help="IPv6 on the internet and some LANs")
    parser.add_argument("--lossy", action="store_true", help="5-15 %% loss, chat 1.5-3 s")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for every pair (60)")
    parser.add_argument("--logs", type=Path, help="keep every agent's log in DIR/<seed>/")
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON too")
    options = parser.parse_args()
    outcomes = [run(seed, options) for seed in options.seeds]
    if options.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=2))
    failed = [o.seed for o in outcomes
              if o.never or o.unwanted or any(e["never"] for e in o.events)]
    print(f"{len(outcomes)} worlds; seeds with a pair that never came back or unwanted "
          f"lines: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
