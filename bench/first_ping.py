"""Time from both agents running to the first ping over the overlay, per NAT scenario.

Each run builds a fresh world: an internet segment with a STUN server (coturn, listed in
the team's kbwg.json), the scenario's routers and two hosts, and the Keybase stand-in
delivering chat messages after --delay-ms (300 ms by default, a realistic Keybase
delivery). Both agents start at once (t_start). t_running is when both answer `status`
on their control socket (polled in-process every 20 ms: the `kbwg-agent status` CLI
takes over a second to start here, which would blur the measurement). From t_running,
alice pings bob's overlay address every 20 ms (`kbwg_world.team.first_ping`); the
first echo reply gives "from running" and "from start". The path alice then reports for
bob (`status --json`: `path`, `endpoint`) is recorded. A run has --budget seconds
(30 by default) from t_start to the first reply, or it is reported as failed.

Scenarios (`--scenario NAME`, repeatable; default: all):
  lan        two hosts on one LAN behind a masquerade router
  nat        each host behind its own port-preserving masquerade NAT
  symmetric  each host behind a fully-random (symmetric) NAT, with a TURN relay
             (`kbwg-agent relay`) on the internet and listed in kbwg.json; reported as
             skipped while the agents gather no relay candidate

To add a scenario, append a `Scenario` to SCENARIOS: `build` makes the two hosts,
`relay=True` starts the relay and lists it in kbwg.json.

    sudo .venv/bin/python bench/first_ping.py [--runs 5] [--scenario nat] [--delay-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg.agent.control import call
from kbwg_world import NatMode, Node, Segment, World
from kbwg_world.stunserver import PROBE_SCRIPT, StunServer
from kbwg_world.team import AGENT, AgentProcess, Team, first_ping
from kbwg_world.world import LAN_SPACE

ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")
STUN_IP = "203.0.113.2"
RELAY_IP = "203.0.113.3"
RELAY_PORT = 3478
RELAY_SECRET = "bench-relay-secret"
POLL_S = 0.02

# Figures from DESIGN.md ("Facts measured on this machine").
NEBULA = {"lan": "0.05 s (same LAN)", "nat": "1.42 s (two masquerade NATs)",
          "symmetric": "5.5-5.7 s (through its relay)"}  # fmt: skip
GOALS = {"lan": "< 0.8 s", "nat": "< 1.0 s", "symmetric": "< 1.5 s (relay first)"}


# ------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[World, Segment], tuple[Node, Node]]  # (alice's host, bob's host)
    relay: bool = False  # start a TURN relay in the world and list it in kbwg.json


def _one_lan(world: World, inet: Segment) -> tuple[Node, Node]:
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    return world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan])


def _two_nats(mode: NatMode) -> Callable[[World, Segment], tuple[Node, Node]]:
    def build(world: World, inet: Segment) -> tuple[Node, Node]:
        r1 = world.router("r1", wan=inet, nat=mode)
        r2 = world.router("r2", wan=inet, nat=mode)
        return world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan])

    return build


SCENARIOS = {s.name: s for s in [
    Scenario("lan", _one_lan),
    Scenario("nat", _two_nats(NatMode.MASQUERADE)),
    Scenario("symmetric", _two_nats(NatMode.FULLY_RANDOM), relay=True),
]}  # fmt: skip


def start_relay(world: World, inet: Segment, timeout: float = 10.0) -> dict[str, str]:
    """`kbwg-agent relay` on the internet; returns its kbwg.json `relays` entry."""
    node = world.server("relay", inet, ips=[RELAY_IP])
    secret = world.dir / "relay-secret"
    secret.write_text(RELAY_SECRET + "\n")
    listen = f"{RELAY_IP}:{RELAY_PORT}"
    log = open(world.dir / "relay.log", "wb")  # noqa: SIM115  (kept open by the process)
    # The world's LANs are benchmarking space, which the relay refuses as peers unless
    # allowed.
    allow = ["--allow-peer", str(LAN_SPACE)]
    proc = node.popen([*AGENT, "relay", "--listen", listen, "--secret-file", str(secret),
                       *allow], stdout=log, stderr=log)  # fmt: skip
    log.close()
    deadline = time.monotonic() + timeout
    while True:  # until it answers a STUN Binding request
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}: "
                               f"{(world.dir / 'relay.log').read_text(errors='replace')}")
        probe = node.run([sys.executable, str(PROBE_SCRIPT), "--timeout", "0.3", listen],
                         check=False, timeout=10)  # fmt: skip
        if probe.returncode == 0:
            return {"url": f"turn:{listen}", "secret": RELAY_SECRET}
        if time.monotonic() >= deadline:
            raise RuntimeError(f"relay at {listen} not answering after {timeout:.0f}s")
        time.sleep(0.05)


# ------------------------------------------------------------------ one run


class RunFailed(Exception):
    pass


class ScenarioUnsupported(Exception):
    """The agents lack what the scenario needs (e.g. a relayed path)."""


@dataclass
class RunResult:
    from_running: float | None = None
    from_start: float | None = None
    path: str = "-"
    peer_path: str = "-"  # bob's view of alice
    error: str | None = None


def wait_control(agent: AgentProcess, deadline: float) -> float:
    """Monotonic time when `agent` first answers `status` on its control socket."""
    while True:
        if agent.proc.poll() is not None:
            raise RunFailed(f"agent {agent.name} exited with {agent.proc.returncode}:\n"
                            f"{agent.log(2000)}")
        with contextlib.suppress(Exception):
            asyncio.run(call(agent.state_dir, "status", timeout=1.0))
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise RunFailed(f"agent {agent.name} did not answer status in time")
        time.sleep(POLL_S)


def peer_path(agent: AgentProcess, device: str) -> str:
    status = agent.try_status()
    if status is None:
        return "?"
    peer = next((p for p in status["peers"] if p["device"] == device), None)
    if peer is None:
        return "no peer"
    return f"{peer['path']} {peer['endpoint']} ({peer['endpoint_source']})"


def settled_path(agent: AgentProcess, device: str, timeout: float = 5.0) -> str:
    """The negotiated path, waiting a little: at the first reply the offerer may still
    be on a roamed endpoint (WireGuard followed the answerer's handshake) with its own
    checks not yet nominated, so its status says "none" although traffic flows."""
    deadline = time.monotonic() + timeout
    while True:
        path = peer_path(agent, device)
        if path.endswith("(negotiated)") and not path.startswith("none"):
            return path
        if time.monotonic() >= deadline:
            return f"{path} [not negotiated {timeout:.0f}s after the first reply]"
        time.sleep(0.1)


def has_relay_candidate(agent: AgentProcess) -> bool:
    status = agent.try_status()
    return status is not None and any(c.get("type") == "relay" for c in status["candidates"])


def one_run(scenario: Scenario, delay_ms: int, budget: float,
            keep_logs: Path | None = None) -> RunResult:
    result = RunResult()
    with World() as world:
        inet = world.internet()
        stun = StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
        config: dict[str, Any] = {"stun": [stun.address]}
        if scenario.relay:
            config["relays"] = [start_relay(world, inet)]
        a, b = scenario.build(world, inet)
        team = Team(world, delay_ms=delay_ms)
        team.write_peers([ALICE, BOB])
        team.write_file("kbwg.json", json.dumps(config))
        try:
            t_start = time.monotonic()
            deadline = t_start + budget
            alice = team.start_agent(a, ALICE[0], ALICE[1])
            bob = team.start_agent(b, BOB[0], BOB[1])
            with ThreadPoolExecutor(2) as pool:
                running = list(pool.map(lambda ag: wait_control(ag, deadline), (alice, bob)))
            t_running = max(running)
            ping_start = time.monotonic()
            try:
                t_reply = ping_start + first_ping(a, BOB[2], max(1.0, deadline - ping_start))
            except AssertionError as exc:
                if scenario.relay and not has_relay_candidate(alice):
                    raise ScenarioUnsupported(
                        "the agents gathered no relay candidate from the relay in kbwg.json "
                        "(no relayed path in this agent)") from exc
                raise RunFailed(f"no ping within the {budget:.0f}s budget; alice sees bob "
                                f"as: {peer_path(alice, BOB[1])}") from exc
            result.from_running = t_reply - t_running
            result.from_start = t_reply - t_start
            result.path = settled_path(alice, BOB[1])
            result.peer_path = settled_path(bob, ALICE[1])
        finally:
            team.stop_all()
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for agent in team.agents:
                    with contextlib.suppress(OSError):
                        shutil.copy(agent.log_path, keep_logs / f"{agent.username}.log")
    return result


# ------------------------------------------------------------------ report


@dataclass
class Summary:
    scenario: str
    results: list[RunResult] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> list[RunResult]:
        return [r for r in self.results if r.error is None]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def print_table(summaries: list[Summary], runs: int, delay_ms: int) -> None:
    print()
    print(f"first ping after both agents run: median of {runs} runs, chat delay {delay_ms} ms")
    header = (f"{'scenario':<10} {'ok':>5}  {'from running':>12}  {'from start':>10}  "
              f"{'min':>6}  {'max':>6}  path (alice -> bob)")
    print(header)
    print("-" * len(header))
    for s in summaries:
        if s.skipped is not None:
            print(f"{s.scenario:<10} {'-':>5}  skipped: {s.skipped}")
            continue
        ok = s.ok
        running = [r.from_running for r in ok if r.from_running is not None]
        start = [r.from_start for r in ok if r.from_start is not None]
        kinds = sorted({r.path.split(" ")[0] for r in ok}) or ["-"]
        endpoints = {r.path.split(" ")[1] for r in ok if len(r.path.split(" ")) > 1}
        where = endpoints.pop() if len(endpoints) == 1 else "endpoints vary"
        paths = [f"{'/'.join(kinds)} {where}"]
        print(f"{s.scenario:<10} {len(ok):>2}/{len(s.results):<2}  "
              f"{_s(statistics.median(running) if running else None):>12}  "
              f"{_s(statistics.median(start) if start else None):>10}  "
              f"{_s(min(running) if running else None):>6}  "
              f"{_s(max(running) if running else None):>6}  {'; '.join(paths)}")
    print()
    print("reference (DESIGN.md), Nebula 1.6.1 first ping in the same kind of world, and goals:")
    for s in summaries:
        print(f"  {s.scenario:<10} nebula {NEBULA.get(s.scenario, '-'):<30} "
              f"goal {GOALS.get(s.scenario, '-')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="scenario to run (repeatable; default: all)")
    parser.add_argument("--delay-ms", type=int, default=300,
                        help="Keybase stand-in delivery delay (default 300)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds a run may take from agent start to first ping")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="keep each run's agent logs in DIR/<scenario>-<run>/")
    args = parser.parse_args()
    names = args.scenario or list(SCENARIOS)

    summaries = []
    for name in names:
        summary = Summary(name)
        summaries.append(summary)
        for run in range(1, args.runs + 1):
            try:
                logs = args.logs / f"{name}-{run}" if args.logs else None
                result = one_run(SCENARIOS[name], args.delay_ms, args.budget, logs)
            except ScenarioUnsupported as exc:
                summary.skipped = str(exc)
                print(f"{name:<10} run {run}: skipped: {exc}", flush=True)
                break
            except Exception as exc:  # one failed run is reported, not fatal
                result = RunResult(error=f"{type(exc).__name__}: {exc}")
            summary.results.append(result)
            if result.error is not None:
                print(f"{name:<10} run {run}: FAILED: {result.error[:1500]}", flush=True)
            else:
                print(f"{name:<10} run {run}: {_s(result.from_running)} from running, "
                      f"{_s(result.from_start)} from start; alice->bob {result.path}; "
                      f"bob->alice {result.peer_path}", flush=True)
    print_table(summaries, args.runs, args.delay_ms)
    return 0 if all(s.skipped or s.ok for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
