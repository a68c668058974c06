"""How fast devices connect from process start, and how fast a broken path comes back.

One command for issue 13's table: every case runs --runs times (5 by default) in a
fresh world with the Keybase stand-in delivering chat after --delay-ms (300 ms), a
STUN server (coturn) on the internet segment named in kbwg.json, and prints the
median and the slowest run beside the goal, with the ratio to the goal. The machine's
load (`/proc/loadavg`) is recorded with every run: figures from a loaded machine are
slower, and other work often shares these two cores.

Connecting cases are timed from the moment every `join` process is started (the
`reach.py` pingers are already running in each host, so their start-up is not counted)
to the first echo reply over the overlay in every direction. Repair cases are timed
from the change to the first reply in each direction that must work again.

Cases (`--case NAME`, repeatable; default: all):
  lan3            three devices on one LAN (behind one masquerade router), 6 directions
  lan3-nostun     the same, kbwg.json's STUN and relay servers not answering at all
  nat             two port-preserving (masquerade) NATs, both directions
  symmetric       two symmetric (fully-random) NATs, relayed by `kbwg-agent relay`
  multihomed      a host with a slow default uplink (80 ms) and a fast backup (5 ms)
                  to a public peer: time until the fast uplink is used, and whether
                  it was the first choice (the goal is that it is)
  readdress       two masquerade NATs, connected; one NAT's public address changes
                  (and its mappings go): time until traffic flows both ways again
  flush           two masquerade NATs, connected; one NAT forgets its mappings
                  (conntrack flush) while only the device on the other side sends
  six             six devices behind three masquerade NATs (two per NAT), 30 directions
  join            the everyday case, not in issue 13's table (no goal): two devices
                  behind masquerade NATs are connected, then a third behind its own
                  joins; timed from its process start to the first reply in all 4
                  directions with it (no other start-up competes for the cores)
  restart         the everyday case too (no goal): two devices behind masquerade NATs
                  are connected, then one stops (INT) and starts again with its state
                  dir (its kept WireGuard key); timed from its new process start to
                  the first reply both ways
  roam            the laptop's case (no goal): two devices behind masquerade NATs
                  are connected, pings flowing both ways; one leaves for a third NAT's
                  network (old interface down, a new one up there); timed from the
                  move to the first reply each way. Its peer's NAT lets nothing from
                  the new address in before the peer hears of it over chat
  roam-public     the same with a public peer (a server, or a forwarded port), which
                  the moved device's checks reach at once

Before the first case the project's modules are compiled to bytecode, as installing
the package does: this venv's install is editable, and where PYTHONDONTWRITEBYTECODE is
set every agent and stand-in process would otherwise compile some hundred modules from
source again (a third of a second of CPU each). `--no-compile` leaves that out. Each
run's agent logs (--logs) hold `start-up +S.SSSs: STEP` lines: bench/startup.py turns
them into a breakdown of where the first seconds went.

    sudo .venv/bin/python bench/connect.py [--runs 5] [--case nat] [--json] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "netns-tests"))
sys.path.insert(0, str(BENCH))

from first_ping import RELAY_IP, STUN_IP, start_relay  # noqa: E402  (bench helpers)

from kbwg.agent.control import call  # noqa: E402
from kbwg_world import NatMode, Node, Router, Segment, World  # noqa: E402
from kbwg_world.multihomed import multi_homed  # noqa: E402
from kbwg_world.natchange import forget_mappings, new_public_address  # noqa: E402
from kbwg_world.stunserver import StunServer  # noqa: E402
from kbwg_world.team import AgentProcess, Team  # noqa: E402

REACH = BENCH / "reach.py"
# The folders of the packages agents, owners and the stand-in import (pyproject's
# package-dir), compiled before the first case.
SOURCES = ["core", "agent", "negotiation", "owner", "relay", "turn", "portmap",
           "testing/kbwg_standin", "testing/kbwg_testing"]
BUDGET_S = 90.0  # per run; generous: a failed run is reported as such, not timed
POLL_S = 0.02


def device(i: int) -> tuple[str, str, str]:
    """(username, device, overlay ip) of the i-th device of a case."""
    return f"user{i}", f"dev{i}", f"100.64.0.{i + 1}"


def compile_sources() -> bool:
    """Write the bytecode an install would have (stale or missing .pyc files only)."""
    root = BENCH.parent
    return all(compileall.compile_dir(root / folder, quiet=1) for folder in SOURCES)


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


class RunFailed(Exception):
    pass


# ------------------------------------------------------------------ measuring


@dataclass(eq=False)
class Reach:
    """A reach.py pinger in one host; `first[dest]` is the monotonic time of dest's first
    reply."""

    node: Node
    targets: list[str]
    proc: subprocess.Popen[str]
    first: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, node: Node, targets: Sequence[str], timeout: float = BUDGET_S) -> Reach:
        proc = node.popen([sys.executable, str(REACH), *targets, "--timeout", str(timeout)],
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
        reach = cls(node, list(targets), proc)
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RunFailed(f"reach.py in {node.name} did not start: {ready!r}")
        threading.Thread(target=reach._read, daemon=True).start()
        return reach

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                row = json.loads(line)
                self.first[row["dest"]] = float(row["t"])
        self.done.set()

    def wait(self, timeout: float) -> dict[str, float]:
        self.done.wait(timeout)
        with contextlib.suppress(OSError):
            self.proc.kill()
        return dict(self.first)


def reach_all(reaches: Sequence[Reach], since: float, budget: float = BUDGET_S,
              each: dict[str, float] | None = None) -> float:
    """Seconds from `since` until every reach got every target (each direction's time
    into `each` when given); RunFailed naming the directions that never answered."""
    deadline = since + budget
    last = since
    missing = []
    for reach in reaches:
        got = reach.wait(max(0.1, deadline - time.monotonic()))
        missing += [f"{reach.node.name}->{t}" for t in reach.targets if t not in got]
        last = max([last, *got.values()])
        if each is not None:
            each.update({f"{reach.node.name}->{t}": at - since for t, at in got.items()})
    if missing:
        raise RunFailed(f"no reply within {budget:.0f}s: {', '.join(missing)}")
    return last - since


def directions(each: dict[str, float]) -> str:
    return ", ".join(f"{d} {t:.2f}s" for d, t in sorted(each.items()))


def negotiated(agent: AgentProcess, peer_device: str) -> dict[str, Any] | None:
    """`agent`'s status entry for a peer, asked in-process (the CLI's start-up would
    blur 20 ms polling)."""
    with contextlib.suppress(Exception):
        status = asyncio.run(call(agent.state_dir, "status", timeout=1.0))
        for peer in status["peers"]:
            if peer["device"] == peer_device and peer["endpoint_source"] == "negotiated" \
                    and peer["path"] != "none":
                return dict(peer)
    return None


def wait_negotiated(agent: AgentProcess, peer_device: str, budget: float = BUDGET_S) -> None:
    deadline = time.monotonic() + budget
    while negotiated(agent, peer_device) is None:
        if agent.proc.poll() is not None:
            raise RunFailed(f"{agent.name} exited:\n{agent.log(2000)}")
        if time.monotonic() >= deadline:
            raise RunFailed(f"{agent.name} negotiated no path to {peer_device}")
        time.sleep(0.05)


# ------------------------------------------------------------------ worlds


def servers(world: World, inet: Segment, reachable: bool = True,
            relay: bool = False) -> dict[str, Any]:
    """kbwg.json for the case: STUN (and a relay) on the internet, or only their
    addresses (nothing answers there: packets to them vanish, as with a dead server)."""
    if not reachable:
        return {"stun": [f"{STUN_IP}:3478"],
                "relays": [{"url": f"turn:{RELAY_IP}:3478", "secret": "unused-secret"}]}
    stun = StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
    config: dict[str, Any] = {"stun": [stun.address]}
    if relay:
        config["relays"] = [start_relay(world, inet)]
    return config


@dataclass(frozen=True)
class Outcome:
    seconds: float
    note: str = ""


@dataclass
class Setup:
    """A built world with a team, ready to start agents."""

    world: World
    inet: Segment
    team: Team
    hosts: list[Node]
    routers: list[Router]

    def start(self) -> tuple[float, list[AgentProcess]]:
        t0 = time.monotonic()
        agents = [self.team.start_agent(h, *device(i)[:2]) for i, h in enumerate(self.hosts)]
        return t0, agents

    def reaches(self, pairs: Sequence[tuple[int, int]]) -> list[Reach]:
        """One pinger per source host, for the directions (source, target) asked."""
        by_src: dict[int, list[str]] = {}
        for src, dst in pairs:
            by_src.setdefault(src, []).append(device(dst)[2])
        return [Reach.start(self.hosts[src], targets) for src, targets in by_src.items()]


def build(world: World, delay_ms: int, routers: Sequence[NatMode], per_router: int,
          reachable: bool = True, relay: bool = False) -> Setup:
    inet = world.internet()
    config = servers(world, inet, reachable, relay)
    nats = [world.router(f"r{i}", wan=inet, nat=mode) for i, mode in enumerate(routers)]
    hosts: list[Node] = [world.host(f"h{i}{j}", lans=[r.lan]) for i, r in enumerate(nats)
                         for j in range(per_router)]
    team = Team(world, delay_ms=delay_ms)
    team.write_peers([device(i) for i in range(len(hosts))])
    team.write_file("kbwg.json", json.dumps(config))
    return Setup(world, inet, team, hosts, nats)


def all_pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.permutations(range(n), 2))


def connect(setup: Setup) -> Outcome:
    pairs = all_pairs(len(setup.hosts))
    reaches = setup.reaches(pairs)
    t0, _ = setup.start()
    each: dict[str, float] = {}
    took = reach_all(reaches, t0, each=each)
    slowest = sorted(each.items(), key=lambda item: item[1])[-3:]
    return Outcome(took, f"{len(pairs)} directions; slowest "
                   + ", ".join(f"{d} {t:.2f}s" for d, t in reversed(slowest)))


# ------------------------------------------------------------------ cases


def case_lan3(world: World, delay_ms: int) -> Outcome:
    return connect(build(world, delay_ms, [NatMode.MASQUERADE], 3))


def case_lan3_nostun(world: World, delay_ms: int) -> Outcome:
    return connect(build(world, delay_ms, [NatMode.MASQUERADE], 3, reachable=False))


def case_nat(world: World, delay_ms: int) -> Outcome:
    return connect(build(world, delay_ms, [NatMode.MASQUERADE] * 2, 1))


def case_symmetric(world: World, delay_ms: int) -> Outcome:
    return connect(build(world, delay_ms, [NatMode.FULLY_RANDOM] * 2, 1, relay=True))


def case_six(world: World, delay_ms: int) -> Outcome:
    return connect(build(world, delay_ms, [NatMode.MASQUERADE] * 3, 2))


def case_multihomed(world: World, delay_ms: int) -> Outcome:
    inet = world.internet()
    config = servers(world, inet)
    shape = multi_homed(world, inet)  # eth0 the slow default route, eth1 fast
    m, p, slow, fast = shape.m, shape.p, shape.slow, shape.fast
    team = Team(world, delay_ms=delay_ms)
    team.write_peers([device(0), device(1)])
    team.write_file("kbwg.json", json.dumps(config))
    setup = Setup(world, inet, team, [m, p], [slow, fast])
    t0, (alice, _) = setup.start()
    deadline = t0 + BUDGET_S
    seen: list[str] = []
    while True:
        peer = negotiated(alice, device(1)[1])
        if peer is not None and (not seen or seen[-1] != peer["interface"]):
            seen.append(peer["interface"])
        if peer is not None and peer["interface"] == "eth1" and peer.get("host_route"):
            break
        if time.monotonic() >= deadline:
            raise RunFailed(f"never on eth1 (seen: {seen or 'nothing'})")
        time.sleep(POLL_S)
    took = time.monotonic() - t0
    first = seen[0]
    return Outcome(took, f"first choice {first}" + ("" if first == "eth1" else " (WRONG)"))


def _connected_pair(world: World, delay_ms: int,
                    setup: Setup | None = None) -> tuple[Setup, list[AgentProcess]]:
    setup = setup or build(world, delay_ms, [NatMode.MASQUERADE] * 2, 1)
    reaches = setup.reaches(all_pairs(2))
    t0, agents = setup.start()
    reach_all(reaches, t0)
    wait_negotiated(agents[0], device(1)[1])
    wait_negotiated(agents[1], device(0)[1])
    # Let the first checks settle (consent running, nominations done): the repair is
    # what is measured, not the end of start-up.
    time.sleep(3.0)
    return setup, agents


def case_join(world: World, delay_ms: int) -> Outcome:
    setup = build(world, delay_ms, [NatMode.MASQUERADE] * 3, 1)
    running = Setup(world, setup.inet, setup.team, setup.hosts[:2], setup.routers[:2])
    t0, agents = running.start()
    reach_all(running.reaches(all_pairs(2)), t0)
    wait_negotiated(agents[0], device(1)[1])
    wait_negotiated(agents[1], device(0)[1])
    time.sleep(1.0)  # their start-up's CPU is over: only the newcomer's is measured
    pairs = [(2, 0), (2, 1), (0, 2), (1, 2)]
    reaches = setup.reaches(pairs)
    t0 = time.monotonic()
    setup.team.start_agent(setup.hosts[2], *device(2)[:2])
    each: dict[str, float] = {}
    took = reach_all(reaches, t0, each=each)
    return Outcome(took, directions(each))


def case_restart(world: World, delay_ms: int) -> Outcome:
    setup, agents = _connected_pair(world, delay_ms)
    if agents[0].stop() != 0:
        raise RunFailed(f"{agents[0].name} did not stop cleanly:\n{agents[0].log(2000)}")
    reaches = setup.reaches(all_pairs(2))
    t0 = time.monotonic()
    setup.team.start_agent(setup.hosts[0], *device(0)[:2], state_dir=agents[0].state_dir)
    each: dict[str, float] = {}
    took = reach_all(reaches, t0, each=each)
    return Outcome(took, directions(each))


def traffic(setup: Setup, src: int, dst: int) -> None:
    """Steady pings from host `src` to device `dst` over the overlay, until the world
    closes: the traffic that flows through a change."""
    setup.hosts[src].popen(["ping", "-q", "-n", "-i", "0.05", device(dst)[2]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def case_readdress(world: World, delay_ms: int) -> Outcome:
    setup, _ = _connected_pair(world, delay_ms)
    traffic(setup, 0, 1)
    traffic(setup, 1, 0)
    r0 = setup.routers[0]
    old = r0.ip
    t_change = time.monotonic()
    new = new_public_address(r0)
    # Pingers started after the change: a reply to an echo sent before it is no proof.
    each: dict[str, float] = {}
    took = reach_all(setup.reaches(all_pairs(2)), t_change, each=each)
    return Outcome(took, f"{old} -> {new}: {directions(each)}")


def _roam(world: World, delay_ms: int, peer_public: bool) -> Outcome:
    """Device 0 (behind r0) leaves for another NAT's network, as a laptop changes
    Wi-Fi, with traffic both ways; its peer is behind a NAT of its own or public."""
    setup = build(world, delay_ms, [NatMode.MASQUERADE] * (1 if peer_public else 2), 1)
    if peer_public:
        setup.hosts.append(world.host("h10", lans=[setup.inet]))
        setup.team.write_peers([device(i) for i in range(2)])
    setup, _ = _connected_pair(world, delay_ms, setup)
    away = world.router("away", wan=setup.inet, nat=NatMode.MASQUERADE)
    traffic(setup, 0, 1)
    traffic(setup, 1, 0)
    mover = setup.hosts[0]
    t_move = time.monotonic()
    mover.ip_batch(["addr flush dev eth0", "link set eth0 down"])
    world.attach(mover, away.lan, "eth1")
    mover.ip_batch([f"route replace default via {away.lan.gateway} dev eth1"])
    each: dict[str, float] = {}
    took = reach_all(setup.reaches(all_pairs(2)), t_move, each=each)
    return Outcome(took, directions(each))


def case_roam(world: World, delay_ms: int) -> Outcome:
    return _roam(world, delay_ms, peer_public=False)


def case_roam_public(world: World, delay_ms: int) -> Outcome:
    return _roam(world, delay_ms, peer_public=True)


def case_flush(world: World, delay_ms: int) -> Outcome:
    setup, _ = _connected_pair(world, delay_ms)
    # Only the far side (host 1) sends; host 0's NAT forgets its mappings.
    traffic(setup, 1, 0)
    time.sleep(0.5)
    t_flush = time.monotonic()
    forget_mappings(setup.routers[0])
    return Outcome(reach_all(setup.reaches([(1, 0)]), t_flush), "far side sending")


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    goal_s: float | None  # None: not one of issue 13's goals
    goal: str
    nebula: str
    run: Callable[[World, int], Outcome]


CASES = {c.name: c for c in [
    Case("lan3", "three devices on one LAN", 0.8, "0.8 s", "0.04 s", case_lan3),
    Case("lan3-nostun", "the same, STUN/relay server unreachable", 0.8, "0.8 s (no penalty)",
         "-", case_lan3_nostun),
    Case("nat", "two port-preserving NATs", 1.1, "1.1 s", "1.3 s", case_nat),
    Case("symmetric", "two symmetric NATs, relayed", 1.6, "1.6 s", "5.7 s", case_symmetric),
    Case("multihomed", "multi-homed, slow default uplink (time to the fast one)", 1.1,
         "right uplink at first choice (1.1 s)", "no choice", case_multihomed),
    Case("readdress", "a NAT changes its public address (both ways)", 3.0, "3 s", "-",
         case_readdress),
    Case("flush", "a NAT forgets its mappings, the other side sending", 1.0, "1 s",
         "up to 9.6 s", case_flush),
    Case("six", "six devices on three NATs, all 30 directions", 1.5, "1.5 s", "-", case_six),
    Case("join", "a third device joins two connected ones (three NATs)", None, "-", "-",
         case_join),
    Case("restart", "a device restarts (two NATs, its key kept)", None, "-", "-",
         case_restart),
    Case("roam", "a device moves to another NAT's network (peer behind a NAT)", None,
         "-", "-", case_roam),
    Case("roam-public", "a device moves to another NAT's network (peer public)", None,
         "-", "-", case_roam_public),
]}  # fmt: skip


# ------------------------------------------------------------------ running


@dataclass
class RunResult:
    seconds: float | None
    load: str
    note: str = ""
    error: str | None = None


@dataclass
class CaseResult:
    name: str
    title: str
    goal_s: float | None
    goal: str
    nebula: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        return [r.seconds for r in self.runs if r.seconds is not None]

    def summary(self) -> dict[str, Any]:
        times = self.times
        median = statistics.median(times) if times else None
        worst = max(times) if times else None
        return {
            "case": self.name, "title": self.title, "goal_s": self.goal_s, "goal": self.goal,
            "nebula": self.nebula, "ok": len(times), "runs": len(self.runs),
            "median_s": median, "max_s": worst,
            "median_ratio": None if median is None or not self.goal_s else median / self.goal_s,
            "max_ratio": None if worst is None or not self.goal_s else worst / self.goal_s,
            "loads": [r.load for r in self.runs],
            "notes": sorted({r.note for r in self.runs if r.note}),
            "results": [asdict(r) for r in self.runs],
        }


def one_run(case: Case, delay_ms: int, logs: Path | None) -> RunResult:
    """One run in a fresh world; its agents' logs go to `logs`, and a failed run's are
    kept in a new directory under /tmp when `logs` is None (its error names it)."""
    before = load()
    with World() as world:
        try:
            outcome = case.run(world, delay_ms)
            result = RunResult(outcome.seconds, before, outcome.note)
        except Exception as exc:  # one failed run is reported, not fatal
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if logs is None:
                logs = Path(tempfile.mkdtemp(prefix=f"kbwg-bench-{case.name}-failed-"))
                error += f" (agent logs kept in {logs})"
            result = RunResult(None, before, error=error)
        finally:
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                for path in (world.dir / "agents").glob("*/agent*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(path, logs / f"{path.parent.name}.log")
    return result


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(results: list[CaseResult], runs: int, delay_ms: int) -> None:
    print()
    print(f"connect from process start: {runs} runs per case, chat delay {delay_ms} ms")
    print("| case | median | max | goal | median/goal | max/goal | Nebula | load (1 min) | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r.summary()
        ok = "" if s["ok"] == s["runs"] else f" ({s['ok']}/{s['runs']} ok)"
        print(f"| {r.title}{ok} | {_s(s['median_s'])} | {_s(s['max_s'])} | {r.goal} | "
              f"{_x(s['median_ratio'])} | {_x(s['max_ratio'])} | {r.nebula} | "
              f"{min(s['loads'])}-{max(s['loads'])} | {'; '.join(s['notes'])} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--case", action="append", choices=list(CASES),
                        help="case to run (repeatable; default: all)")
    parser.add_argument("--delay-ms", type=int, default=300,
                        help="Keybase stand-in delivery delay (default 300)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="keep each run's agent logs in DIR/<case>-<run>/")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not compile the project's modules to bytecode first")
    args = parser.parse_args()
    if not args.no_compile and not compile_sources():
        print("compiling the project's modules failed; timing them from source",
              file=sys.stderr)

    results = []
    for name in args.case or list(CASES):
        case = CASES[name]
        result = CaseResult(case.name, case.title, case.goal_s, case.goal, case.nebula)
        results.append(result)
        for run in range(1, args.runs + 1):
            logs = args.logs / f"{name}-{run}" if args.logs else None
            one = one_run(case, args.delay_ms, logs)
            result.runs.append(one)
            what = one.error if one.error else f"{_s(one.seconds)} {one.note}"
            print(f"{name} run {run} (load {one.load}): {what}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"delay_ms": args.delay_ms, "runs": args.runs,
                          "cases": [r.summary() for r in results]}, indent=2))
    else:
        print_table(results, args.runs, args.delay_ms)
    return 0 if all(r.times for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
