"""Time from `kbwg-agent join` to the first successful ping over the overlay.

Three hosts on one LAN behind a masquerade router, the Keybase stand-in delivering chat
messages after --delay-ms (300 ms by default, a realistic Keybase delivery). All three
agents start at once; for every ordered pair the time from the start to the first echo
reply (pinging every 20 ms) is recorded. Prints one row per run and the median.

    sudo .venv/bin/python bench/join_to_ping.py [--runs 5] [--delay-ms 300]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_world import NatMode, World
from kbwg_world.team import Team, first_ping

DEVICES = [("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2"),
           ("carol", "nas", "100.64.0.3")]  # fmt: skip


def one_run(delay_ms: int) -> tuple[float, float]:
    """(first pair, last pair) seconds from the start of the agents to a ping reply."""
    with World() as world:
        inet = world.internet()
        router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
        hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(len(DEVICES))]
        team = Team(world, delay_ms=delay_ms)
        team.write_peers(DEVICES)
        pairs = list(itertools.permutations(range(len(DEVICES)), 2))
        for host, (user, device, _) in zip(hosts, DEVICES, strict=True):
            team.start_agent(host, user, device)
        with ThreadPoolExecutor(len(pairs)) as pool:
            times = list(pool.map(lambda p: first_ping(hosts[p[0]], DEVICES[p[1]][2]), pairs))
        team.stop_all()
    return min(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--delay-ms", type=int, default=300)
    args = parser.parse_args()
    print(f"join -> first ping, 3 hosts on one LAN, chat delay {args.delay_ms} ms")
    print(f"{'run':>4}  {'first pair':>10}  {'all 6 pairs':>11}")
    firsts, lasts = [], []
    for run in range(1, args.runs + 1):
        first, last = one_run(args.delay_ms)
        firsts.append(first)
        lasts.append(last)
        print(f"{run:>4}  {first:>9.2f}s  {last:>10.2f}s", flush=True)
    print(f"median  {statistics.median(firsts):>9.2f}s  {statistics.median(lasts):>10.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
