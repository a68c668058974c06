"""Idle cost of one agent in a team of --peers+1 devices: CPU, memory, chat messages.

World: an internet with a STUN server (coturn, listed in the team's kbwg.json); the
measured device alone behind a port-preserving NAT; --peers full agents spread over
--nats port-preserving NATs (several devices per LAN, so both punched and LAN paths
exist). The peers are real `kbwg-agent join` processes, each with its own device owner
and wireguard-go: to the measured agent they are real peers that announce, negotiate,
answer consent checks and keep WireGuard handshaking. The Keybase stand-in delivers
chat messages after --delay-ms.

Once the measured agent has a negotiated path to every peer, and --settle seconds more
have passed (the peers negotiate among themselves too), the bench samples every
--interval seconds for --minutes, while nothing changes:

- CPU: utime+stime from /proc/PID/stat of the agent, its device owner and its
  wireguard-go, over the window, in % of one core (and the busiest single interval);
- memory: VmRSS from /proc/PID/status at every sample; growth as the least-squares
  slope over the window (MB per hour) and the last sample minus the first;
- chat: the messages the measured device posted to the team's conversations during the
  window (from the stand-in's database), per peer per hour.

Goals (issue 15): agent + owner under 1 % of a core and under 80 MB RSS together, no
growth (the median RSS of the window's last third at most 1 MB above its first third's).
wireguard-go is reported beside them, not counted in the goals. The load of the machine
during the window is reported too (load average, all cores' busy share, and the CPU of
all agents in the world together).

    sudo .venv/bin/python bench/resources.py [--minutes 10] [--peers 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg.agent.control import call
from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AGENT, AgentProcess, Team

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = 1024 * 1024
STUN_IP = "203.0.113.2"
MEASURED = ("measured", "laptop")
GOAL_CPU_PERCENT = 1.0
GOAL_RSS_MB = 80.0
GOAL_GROWTH_MB = 1.0  # last third's median over the first third's
# Team.start_agent runs `kbwg-agent -vv join ...`; this wrapper drops the -vv, so every
# agent logs at the default level, as under the systemd unit (debug lines for every
# negotiation message in the team would be a cost of the bench, not of the agent).
DEFAULT_LOG_LEVEL = ("sh", "-c", 'agent=$1; shift 2; exec "$agent" "$@"', "sh")

# --------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # Field 2 (comm) may hold spaces; everything after its ')' splits cleanly and
    # starts at field 3.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14, 15


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (the interpreter, libraries) split among the
    processes that map them."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def descendants(root: int) -> list[int]:
    """`root` and every process below it (by parent pid), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@dataclass(frozen=True)
class Pids:
    """The processes of one device: agent, device owner, wireguard-go."""

    agent: int
    owner: int
    wireguard: int | None

    def all(self) -> dict[str, int]:
        pids = {"agent": self.agent, "owner": self.owner}
        if self.wireguard is not None:
            pids["wireguard-go"] = self.wireguard
        return pids


def find_pids(agent: AgentProcess) -> Pids | None:
    """The agent's processes, found by command line below the process the world started
    (`ip netns exec ... kbwg-agent join`, exec'ed through)."""
    agent_pid = owner_pid = wg_pid = None
    for pid in descendants(agent.proc.pid):
        argv = cmdline(pid)
        if not argv:
            continue
        joined = " ".join(argv)
        if "kbwg.owner" in argv or "kbwg-owner" in joined:
            owner_pid = pid
        elif Path(argv[0]).name == "wireguard-go":
            wg_pid = pid
        elif "join" in argv and any(Path(a).name in ("kbwg-agent", "cli.py") or
                                    a == "kbwg.agent.cli" for a in argv):
            agent_pid = pid
    if agent_pid is None or owner_pid is None:
        return None
    return Pids(agent_pid, owner_pid, wg_pid)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


# --------------------------------------------------------------------- the world


@dataclass
class TeamWorld:
    team: Team
    measured: AgentProcess
    peers: list[AgentProcess]


def status(agent: AgentProcess, timeout: float = 10.0) -> dict[str, Any] | None:
    """The agent's `status`, asked in-process on its control socket (the CLI's start-up
    takes seconds on a loaded machine), or None."""
    if agent.proc.poll() is not None:
        raise AssertionError(f"agent {agent.name} exited with {agent.proc.returncode}:\n"
                             f"{agent.log(3000)}")
    try:
        return asyncio.run(call(agent.state_dir, "status", timeout=timeout))
    except Exception:
        return None


def path_kinds(agent: AgentProcess) -> dict[str, int]:
    """How many peers the agent reaches by each kind of path (`none`: no path)."""
    kinds: dict[str, int] = {}
    for peer in (status(agent, timeout=30.0) or {"peers": []})["peers"]:
        kinds[peer["path"]] = kinds.get(peer["path"], 0) + 1
    return kinds


def wait_running(agent: AgentProcess, timeout: float) -> None:
    wait_until(lambda: status(agent), timeout=timeout, interval=0.5,
               what=f"agent {agent.name} to answer status")


def build(world: World, peers: int, nats: int, delay_ms: int, timeout: float) -> TeamWorld:
    inet = world.internet()
    stun = StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    routers = [world.router(f"site{i}", wan=inet, nat=NatMode.MASQUERADE)
               for i in range(max(1, nats))]  # fmt: skip
    devices = [(MEASURED[0], MEASURED[1], "100.64.0.1")]
    devices += [(f"peer{i:02d}", "dev", f"100.64.{(i + 2) // 256}.{(i + 2) % 256}")
                for i in range(peers)]  # fmt: skip
    team = Team(world, delay_ms=delay_ms)
    team.write_peers(devices)
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address]}))
    assert len(AGENT) == 1, AGENT  # the wrapper drops the argument after the script
    measured = team.start_agent(world.host("m", lans=[home.lan]), *MEASURED,
                                wrap=DEFAULT_LOG_LEVEL)
    wait_running(measured, timeout)
    started: list[AgentProcess] = []
    batch = 5  # started a few at a time: 20 Python start-ups at once starve 2 cores
    for first in range(0, peers, batch):
        group = []
        for i in range(first, min(first + batch, peers)):
            host = world.host(f"p{i:02d}", lans=[routers[i % len(routers)].lan])
            group.append(team.start_agent(host, devices[i + 1][0], devices[i + 1][1],
                                          wrap=DEFAULT_LOG_LEVEL))
        for agent in group:
            wait_running(agent, timeout)
        started += group
    return TeamWorld(team, measured, started)


def wait_all_paths(tw: TeamWorld, timeout: float) -> tuple[float, list[str]]:
    """Seconds until the measured agent has a negotiated path to every peer (or the
    time-out), and the peers still without one, with their state."""
    start = time.monotonic()
    names = {p.username for p in tw.peers}
    missing: list[str] = sorted(names)

    def all_negotiated() -> bool:
        nonlocal missing
        now = status(tw.measured)
        if now is None:
            return False
        missing = [f"{p['username']} ({p['negotiation']}, path {p['path']}: {p['reason']})"
                   for p in now["peers"] if p["username"] in names
                   and not (p["endpoint_source"] == "negotiated" and p["path"] != "none")]
        return not missing

    with contextlib.suppress(AssertionError):
        wait_until(all_negotiated, timeout=timeout, interval=2.0,
                   what="the measured agent to negotiate a path to every peer")
    return time.monotonic() - start, missing


# --------------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # seconds since the window opened
    cpu: dict[str, float]  # cumulative CPU seconds per role
    rss: dict[str, float]  # MB per role
    pss: dict[str, float]  # MB per role


@dataclass
class Window:
    samples: list[Sample] = field(default_factory=list)
    others_cpu: float = 0.0  # every other agent's agent+owner+wireguard-go CPU seconds
    busy: float = 0.0  # all cores busy, fraction
    load_start: str = ""
    load_end: str = ""
    wall_start: float = 0.0
    wall_end: float = 0.0


def sample(pids: Pids, t0: float) -> Sample:
    roles = pids.all()
    return Sample(time.monotonic() - t0, {r: cpu_seconds(p) for r, p in roles.items()},
                  {r: rss_mb(p) for r, p in roles.items()},
                  {r: pss_mb(p) for r, p in roles.items()})


def measure(pids: Pids, others: list[Pids], minutes: float, interval: float) -> Window:
    window = Window(load_start=Path("/proc/loadavg").read_text().strip())
    def others_total() -> float:
        return sum(cpu_seconds(p) for o in others for p in o.all().values())

    others0, busy0 = others_total(), machine_busy()
    t0 = time.monotonic()
    window.wall_start = time.time()
    window.samples.append(sample(pids, t0))
    end = t0 + minutes * 60
    while time.monotonic() < end:
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
        window.samples.append(sample(pids, t0))
    window.wall_end = time.time()
    busy1 = machine_busy()
    window.others_cpu = others_total() - others0
    window.busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    window.load_end = Path("/proc/loadavg").read_text().strip()
    return window


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour."""
    if len(ts) < 2:
        return 0.0
    mean_t, mean_y = statistics.fmean(ts), statistics.fmean(ys)
    num = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True))
    den = sum((t - mean_t) ** 2 for t in ts)
    return num / den * 3600 if den else 0.0


# --------------------------------------------------------------------- profile


def profile(pids: Pids, seconds: float, out_dir: Path, top: int = 12) -> dict[str, list[str]]:
    """py-spy (`pip install py-spy`) on the agent and the owner for `seconds`, after the
    window (it costs CPU of its own); collapsed stacks go to out_dir, and the functions
    with the most samples on top of the stack, and with the most in their stack, are
    returned per role."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = {role: subprocess.Popen(
        [spy, "record", "--nonblocking", "--format", "raw", "--rate", "200", "-d",
         str(int(seconds)), "-p", str(pid), "-o", str(out_dir / f"{role}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for role, pid in (("agent", pids.agent), ("owner", pids.owner))}  # fmt: skip
    report: dict[str, list[str]] = {}
    for role, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=seconds + 300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        stacks = out_dir / f"{role}.txt"
        if proc.returncode != 0 or not stacks.exists():
            report[role] = [f"py-spy failed: {err.strip()[-300:]}"]
            continue
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in stacks.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            total += int(count)
            own[frames[-1]] = own.get(frames[-1], 0) + int(count)
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
        lines = [f"{total} samples"]
        lines += [f"self {n * 100 / total:5.1f} %  {f}" for f, n in
                  sorted(own.items(), key=lambda kv: -kv[1])[:top]]  # fmt: skip
        lines += [f"incl {n * 100 / total:5.1f} %  {f}" for f, n in
                  sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]]  # fmt: skip
        report[role] = lines
    return report


# --------------------------------------------------------------------- chat


def chat_messages(home: Path, team: str, username: str, since: float,
                  until: float) -> dict[str, int]:
    """Messages `username` posted to the team's conversations in [since, until] (Unix
    seconds), by channel (`#announce`, or the dev channel's topic)."""
    conn = sqlite3.connect(f"file:{home / 'chat.sqlite3'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT c.topic_type, c.topic_name, COUNT(*) FROM messages m "
            "JOIN convs c ON c.id = m.conv_id WHERE lower(c.name) = lower(?) "
            "AND m.sender = ? AND m.sent_at_ms BETWEEN ? AND ? "
            "GROUP BY c.topic_type, c.topic_name",
            (team, username, int(since * 1000), int(until * 1000))).fetchall()
    finally:
        conn.close()
    return {f"{'#' if kind == 'chat' else 'dev:'}{topic}": int(n) for kind, topic, n in rows}


# --------------------------------------------------------------------- report


def summarise(window: Window, messages: dict[str, int], peers: int, others: int,
              setup: dict[str, float]) -> dict[str, Any]:
    first, last = window.samples[0], window.samples[-1]
    span = last.t - first.t
    roles = list(first.cpu)
    cpu = {r: (last.cpu[r] - first.cpu[r]) / span * 100 for r in roles}
    peak = {r: max((b.cpu[r] - a.cpu[r]) / (b.t - a.t) * 100
                   for a, b in zip(window.samples, window.samples[1:], strict=False))
            for r in roles}  # fmt: skip
    ts = [s.t for s in window.samples]
    together = [s.rss["agent"] + s.rss["owner"] for s in window.samples]
    third = max(1, len(together) // 3)
    growth = statistics.median(together[-third:]) - statistics.median(together[:third])
    rss = {r: {"first": first.rss[r], "last": last.rss[r], "pss_last": last.pss[r],
               "max": max(s.rss[r] for s in
               window.samples), "slope_mb_per_h": slope_per_hour(ts, [s.rss[r] for s in
               window.samples])} for r in roles}  # fmt: skip
    hours = span / 3600
    sent = sum(messages.values())
    cpu_pair = cpu["agent"] + cpu["owner"]
    rss_pair_max = max(together)
    return {
        "peers": peers,
        "window_s": span,
        "samples": len(window.samples),
        "setup_s": setup,
        "cpu_percent": cpu,
        "cpu_percent_peak_interval": peak,
        "cpu_percent_agent_owner": cpu_pair,
        "rss_mb": rss,
        "rss_mb_agent_owner": {"first": together[0], "last": together[-1],
                               "max": rss_pair_max, "growth_thirds": growth,
                               "pss_last": last.pss["agent"] + last.pss["owner"],
                               "slope_mb_per_h": slope_per_hour(ts, together)},
        "chat_messages": messages,
        "chat_messages_total": sent,
        "chat_messages_per_peer_per_hour": sent / peers / hours if hours else 0.0,
        "goals": {"cpu_under_1_percent": cpu_pair < GOAL_CPU_PERCENT,
                  "rss_under_80_mb": rss_pair_max < GOAL_RSS_MB,
                  "no_growth": growth <= GOAL_GROWTH_MB},
        "load": {"loadavg_start": window.load_start, "loadavg_end": window.load_end,
                 "all_cores_busy_percent": window.busy * 100,
                 "other_agents_cpu_percent": window.others_cpu / span * 100,
                 "other_agents": others, "cores": os.cpu_count()},
    }


def _ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def print_report(r: dict[str, Any]) -> None:
    goals = r["goals"]
    pair = r["rss_mb_agent_owner"]
    print()
    print(f"idle resources of one agent with {r['peers']} peers, "
          f"{r['window_s'] / 60:.1f} min window, {r['samples']} samples")
    print(f"{'process':<14} {'CPU % core':>10} {'peak':>6} {'RSS first':>10} {'last':>7} "
          f"{'max':>7} {'PSS last':>9} {'slope MB/h':>11}")
    for role, cpu in r["cpu_percent"].items():
        m = r["rss_mb"][role]
        print(f"{role:<14} {cpu:>10.2f} {r['cpu_percent_peak_interval'][role]:>6.2f} "
              f"{m['first']:>10.1f} {m['last']:>7.1f} {m['max']:>7.1f} {m['pss_last']:>9.1f} "
              f"{m['slope_mb_per_h']:>11.2f}")
    print()
    print(f"agent + owner CPU  {r['cpu_percent_agent_owner']:.2f} % of a core   "
          f"goal < {GOAL_CPU_PERCENT:.0f} %: {_ok(goals['cpu_under_1_percent'])}")
    print(f"agent + owner RSS  max {pair['max']:.1f} MB (PSS {pair['pss_last']:.1f} MB)   "
          f"goal < {GOAL_RSS_MB:.0f} MB: {_ok(goals['rss_under_80_mb'])}")
    print(f"RSS growth         {pair['first']:.1f} -> {pair['last']:.1f} MB, last third's median "
          f"{pair['growth_thirds']:+.2f} MB over the first's, slope "
          f"{pair['slope_mb_per_h']:+.2f} MB/h   goal: none (<= {GOAL_GROWTH_MB:.0f} MB): "
          f"{_ok(goals['no_growth'])}")
    by_channel = ", ".join(f"{k} {v}" for k, v in sorted(r["chat_messages"].items())) or "none"
    print(f"chat messages      {r['chat_messages_total']} in the window ({by_channel}): "
          f"{r['chat_messages_per_peer_per_hour']:.3f} per peer per hour")
    load = r["load"]
    print(f"machine            loadavg {load['loadavg_start']} -> {load['loadavg_end']}; "
          f"all {load['cores']} cores {load['all_cores_busy_percent']:.0f} % busy; the "
          f"{load['other_agents']} other agents (agent+owner+wireguard-go) "
          f"{load['other_agents_cpu_percent']:.1f} % of a core together")
    s = r["setup_s"]
    print(f"setup              {s['start']:.0f} s to start every agent, "
          f"{s['paths']:.0f} s more to every negotiated path, {s['settle']:.0f} s settling")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="window (default 10)")
    parser.add_argument("--peers", type=int, default=20, help="peers (default 20)")
    parser.add_argument("--nats", type=int, default=4,
                        help="NATs the peers are spread over (default 4)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between samples (default 10)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds after every path is negotiated before the window opens")
    parser.add_argument("--delay-ms", type=int, default=300,
                        help="Keybase stand-in delivery delay (default 300)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the window, py-spy the agent and the owner for a minute "
                             "and keep their collapsed stacks in DIR")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures as JSON to FILE ('-': stdout)")
    args = parser.parse_args()
    if args.peers < 1 or args.minutes <= 0 or args.interval <= 0:
        parser.error("--peers, --minutes and --interval must be positive")

    with World() as world:
        t = time.monotonic()
        tw = build(world, args.peers, args.nats, args.delay_ms, timeout=600.0)
        started = time.monotonic() - t
        print(f"{args.peers + 1} agents running after {started:.0f} s", flush=True)
        paths, missing = wait_all_paths(tw, timeout=300.0 + 15.0 * args.peers)
        if missing:
            print(f"WARNING: no negotiated path to {len(missing)} peers after {paths:.0f} s; "
                  f"measuring anyway: {'; '.join(missing)}", flush=True)
        print(f"every path negotiated {paths:.0f} s later; settling {args.settle:.0f} s",
              flush=True)
        time.sleep(args.settle)
        kinds = path_kinds(tw.measured)
        print(f"paths of the measured agent: {kinds}", flush=True)
        pids = find_pids(tw.measured)
        if pids is None:
            raise SystemExit(f"could not find the measured agent's processes below pid "
                             f"{tw.measured.proc.pid}")
        others = [p for p in (find_pids(a) for a in tw.peers) if p is not None]
        print(f"measuring for {args.minutes:g} min: agent {pids.agent}, owner {pids.owner}, "
              f"wireguard-go {pids.wireguard}", flush=True)
        window = measure(pids, others, args.minutes, args.interval)
        messages = chat_messages(tw.team.home, tw.team.name, MEASURED[0], window.wall_start,
                                 window.wall_end)
        kinds_end = path_kinds(tw.measured)
        dead = [a.name for a in [tw.measured, *tw.peers] if a.proc.poll() is not None]
        result = summarise(window, messages, args.peers, len(others),
                           {"start": started, "paths": paths, "settle": args.settle})
        result["samples_raw"] = [asdict(s) for s in window.samples]
        result["exited_during_run"] = dead
        result["peers_without_path_at_start"] = missing
        result["paths_at_start"] = kinds
        result["paths_at_end"] = kinds_end
        print_report(result)
        print(f"paths of the measured agent at the start {kinds}, at the end {kinds_end}")
        if dead:
            print(f"WARNING: agents exited during the run: {', '.join(dead)}")
        if args.profile:
            try:
                result["profile"] = profile(pids, 60, args.profile)
            except Exception as exc:  # the figures above stand without it
                result["profile"] = {"error": [f"{type(exc).__name__}: {exc}"]}
            for role, lines in result["profile"].items():
                print(f"\nprofile of the {role} (py-spy, a minute after the window):")
                print("\n".join(f"  {line}" for line in lines))
        tw.team.stop_all()
    if args.json is not None:
        text = json.dumps(result, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0 if all(result["goals"].values()) and not dead else 1


if __name__ == "__main__":
    sys.exit(main())
