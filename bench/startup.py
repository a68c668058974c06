"""Where `join`'s first seconds go: a per-step breakdown read back from agent logs.

The agent logs `start-up +S.SSSs: STEP` (kbwg.agent.startclock) at its own milestones,
measured from the kernel's record of its process start; later steps (first check, path
chosen, first WireGuard handshake) are found by their ordinary log lines, whose wall
time is turned into the same scale with the first milestone line. Needs `-vv` logs, as
bench/connect.py --logs keeps them:

    sudo .venv/bin/python bench/connect.py --case lan3 --runs 3 --logs /tmp/b
    .venv/bin/python bench/startup.py /tmp/b            # every agent*.log below it

Prints each step's median and maximum over the agents (and runs) found, in time order,
and at the agent's own milestones the CPU it had used by then (the rest of the gap is
waiting: for Keybase, the owner, or a core); then how many `keybase` processes each
agent had started by its announcement (each costs a process start, as much CPU as
some steps above), by subcommand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_MILESTONE = re.compile(r"start-up \+(\d+\.\d+)s(?: \(cpu (\d+\.\d+)s\))?: (.+)$")
# kbwg.agent.keybase logs each CLI process it starts.
_SPAWNED = re.compile(r"kbwg\.agent\.keybase: started `\S+ ([^`]+)` \(pid \d+\)")
ANNOUNCED = "introduced (announced)"
# Steps that are ordinary log lines: (step, pattern); the first match counts.
_LINES = [
    ("owner: policy read (owner imports done)", re.compile(r"owner: .*policy: overlay within")),
    ("owner: wireguard-go started", re.compile(r"owner: .*wireguard-go \S+ up")),
    ("chat listener subscribed", re.compile(r"api-listen stderr: Listening")),
    ("local candidates (gathering done)", re.compile(r"kbwg.agent.connectivity: local candidates")),
    ("first offer or answer received", re.compile(r"kbwg.negotiation.session: (offer|answer|"
                                                  r"restart) from ")),
    ("first check sent (checking pairs)", re.compile(r": checking \d+ pairs")),
    ("first pair works", re.compile(r": pair .* works \(")),
    ("first path chosen", re.compile(r"kbwg.negotiation.checks: .*: path ")),
    ("first WireGuard handshake seen", re.compile(r"kbwg.agent.device_stats: handshake with")),
]


def _wall(line: str) -> float | None:
    match = _STAMP.match(line)
    if match is None:
        return None
    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def steps(log: str, cpu: dict[str, float] | None = None,
          spawned: list[tuple[float, str]] | None = None) -> dict[str, float]:
    """Step -> seconds since the process started, for one agent's log (and into `cpu`,
    the agent's CPU seconds at its own milestones; into `spawned`, each `keybase`
    process it started: (seconds since start, subcommand))."""
    found: dict[str, float] = {}
    started: list[tuple[float, str]] = []
    start: float | None = None  # wall time of the process start
    pending: list[tuple[float, str]] = []
    for line in log.splitlines():
        wall = _wall(line)
        if wall is None:
            continue
        milestone = _MILESTONE.search(line)
        if milestone is not None:
            age = float(milestone.group(1))
            step = milestone.group(3).strip()
            found.setdefault(step, age)
            if cpu is not None and milestone.group(2) is not None:
                cpu.setdefault(step, float(milestone.group(2)))
            if start is None:
                start = wall - age
            continue
        process = _SPAWNED.search(line)
        if process is not None:
            started.append((wall, process.group(1)))
            continue
        for step, pattern in _LINES:
            if step not in found and pattern.search(line):
                pending.append((wall, step))
                found[step] = -1.0
    if start is None:
        return {}
    for wall, step in pending:
        found[step] = wall - start
    if spawned is not None:
        spawned += [(wall - start, what) for wall, what in started]
    return found


def spawned_by_announcement(found: dict[str, float],
                            spawned: list[tuple[float, str]]) -> list[str] | None:
    """The subcommands of the `keybase` processes started before the announcement."""
    announced = found.get(ANNOUNCED)
    if announced is None:
        return None
    return [what for age, what in spawned if age <= announced]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="log files or folders of them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files: list[Path] = []
    for path in args.paths:
        files += sorted(path.rglob("*.log")) if path.is_dir() else [path]
    per_step: dict[str, list[float]] = {}
    cpu_step: dict[str, list[float]] = {}
    agents = 0
    processes: list[int] = []
    kinds: Counter[str] = Counter()
    for path in files:
        cpu: dict[str, float] = {}
        spawned: list[tuple[float, str]] = []
        found = steps(path.read_text(errors="replace"), cpu, spawned)
        agents += bool(found)
        before = spawned_by_announcement(found, spawned)
        if before is not None:
            processes.append(len(before))
            kinds.update(before)
        for step, seconds in found.items():
            per_step.setdefault(step, []).append(seconds)
        for step, seconds in cpu.items():
            cpu_step.setdefault(step, []).append(seconds)
    if not agents:
        print("no start-up milestones found (logs need -vv)", file=sys.stderr)
        return 1
    rows = sorted(per_step.items(), key=lambda item: statistics.median(item[1]))
    per_agent = {kind: count / len(processes) for kind, count in kinds.most_common()} \
        if processes else {}
    if args.json:
        print(json.dumps({"agents": agents, "steps": [
            {"step": step, "n": len(times), "median_s": statistics.median(times),
             "max_s": max(times), "agent_cpu_median_s": _median(cpu_step.get(step))}
            for step, times in rows],
            "keybase_processes_by_announcement": {
                "median": _median([float(n) for n in processes]),
                "max": max(processes, default=None), "per_agent": per_agent}}, indent=2))
        return 0
    print(f"start-up steps, seconds from process start ({agents} agent logs)")
    print("| step | median | max | agent CPU by then (median) | n |")
    print("|---|---|---|---|---|")
    for step, times in rows:
        used = _median(cpu_step.get(step))
        print(f"| {step} | {statistics.median(times):.2f} | {max(times):.2f} | "
              f"{'-' if used is None else f'{used:.2f}'} | {len(times)} |")
    if processes:
        print(f"\n`keybase` processes started by the announcement, per agent: median "
              f"{statistics.median(processes):g}, max {max(processes)} ("
              + ", ".join(f"{kind} {n:.2g}" for kind, n in per_agent.items()) + ")")
    return 0


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


if __name__ == "__main__":
    sys.exit(main())
