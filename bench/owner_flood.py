"""The device owner under a STUN flood: its CPU, and the STUN that still gets through.

World: an internet with a STUN server (coturn), a public host P running a real device
owner (`python -m kbwg.owner`, WireGuard device created, raw socket open), a peer host Q
and an outside host X. Throughout, the bench (as P's agent) asks the STUN server for its
mapping through the owner (`stun_send`) --queries times a second, and Q sends --checks
Binding requests a second whose USERNAME names a ufrag the bench declared
(`stun_ufrags`): what a real agent needs to keep its paths. Three phases of --seconds
each: idle; X flooding P's WireGuard port at --rate datagrams a second
(kbwg_world/stunflood.py: random transaction ids and source ports, a third of them
valid-looking checks with random USERNAMEs); the same flood from random addresses of
--spoof (no per-source budget helps: only the reserved ones keep our traffic going).

Per phase: the owner's CPU (utime+stime from /proc/<pid>/stat over the phase, in % of
one core), the share of our STUN queries answered, the share of Q's checks that reached
the bench, and the owner's `stun_filter` counters (what it passed and dropped, why).
Kernel drops at the raw socket (a full receive queue: the owner too slow) come from
/proc/net/raw in P's namespace.

    sudo .venv/bin/python bench/owner_flood.py [--rate 5000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.negotiation.stun_client import StunClient
from kbwg_world import Node, World
from kbwg_world.stunserver import StunServer

FLOOD = Path(__file__).resolve().parent.parent / "netns-tests" / "kbwg_world" / "stunflood.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STUN_IP = "203.0.113.2"
UFRAG = "benchufrag"


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raw_socket_drops(node: Node) -> int:
    """Drops summed over the raw sockets of the node's namespace (the owner's)."""
    lines = node.run(["cat", "/proc/net/raw"]).stdout.splitlines()[1:]
    return sum(int(line.split()[-1]) for line in lines if line.strip())


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    cpu: float = 0.0
    queries: int = 0
    answered: int = 0
    checks_sent: int = 0
    checks_seen: int = 0
    flood: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, int] = field(default_factory=dict)
    kernel_drops: int = 0


def start_sender(node: Node, dest: str, port: int, rate: float, seconds: float,
                 *extra: str) -> subprocess.Popen[str]:
    proc = node.popen([sys.executable, str(FLOOD), dest, str(port), "--rate", str(rate),
                       "--seconds", str(seconds), *extra], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "ready"
    return proc


def sender_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=30)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def run_phase(name: str, seconds: float, owner: DeviceOwner, pid: int,
                    client: StunClient, seen: list[int], p: Node, q: Node, x: Node, port: int,
                    args: argparse.Namespace, flood: bool, spoof: str | None = None) -> Phase:
    phase = Phase(name)
    before = (await owner.request("stats"))["stun_filter"]
    drops_before = raw_socket_drops(p)
    seen_before = seen[0]
    checks = start_sender(q, p.ip, port, args.checks, seconds, "--username", f"{UFRAG}:peer",
                          "--sockets", "1")
    extra = ("--spoof", spoof) if spoof else ()
    flooder = start_sender(x, p.ip, port, args.rate, seconds, *extra) if flood else None
    cpu0, t0 = cpu_seconds(pid), time.monotonic()

    async def one_query() -> None:
        try:
            await client.binding((STUN_IP, 3478), timeout=2.0)
            phase.answered += 1
        except Exception:
            pass

    queries: list[asyncio.Task[None]] = []
    while time.monotonic() - t0 < seconds:
        queries.append(asyncio.create_task(one_query()))
        phase.queries += 1
        await asyncio.sleep(1 / args.queries)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    await asyncio.gather(*queries)
    phase.seconds, phase.cpu = t1 - t0, (cpu1 - cpu0) / (t1 - t0) * 100
    phase.checks_sent = (await asyncio.to_thread(sender_result, checks))["sent"]
    if flooder is not None:
        phase.flood = await asyncio.to_thread(sender_result, flooder)
    await asyncio.sleep(0.5)  # the last checks in flight
    phase.checks_seen = seen[0] - seen_before
    after = (await owner.request("stats"))["stun_filter"]
    phase.filter = {k: after[k] - before.get(k, 0) for k in after
                    if isinstance(after[k], int) and after[k] - before.get(k, 0)
                    and k not in ("ufrags", "sources", "transactions")}
    phase.kernel_drops = raw_socket_drops(p) - drops_before
    return phase


async def bench(args: argparse.Namespace) -> list[Phase]:
    with World() as world:
        inet = world.internet()
        StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
        p, q, x = (world.host(name, lans=[inet]) for name in ("p", "q", "x"))
        owner = await DeviceOwner.start(p.argv([sys.executable, "-I", "-m", "kbwg.owner"]))
        try:
            pid = int((await owner.request("hello"))["pid"])
            created = await owner.request(
                "create", ifname="kbwg7", listen_port=0, address="100.64.0.1/10",
                private_key=base64.b64encode(bytes(PrivateKey.generate())).decode(),
                backend="auto")  # fmt: skip
            port = int(created["listen_port"])
            print(f"owner pid {pid}, {created['backend']} WireGuard on port {port}")
            transport = await OwnerStunTransport.open(owner)
            client = StunClient(transport)
            seen = [0]

            def on_datagram(data: bytes, src: tuple[str, int], _local: str) -> None:
                if UFRAG.encode() + b":" in data:
                    seen[0] += 1
                else:
                    client.datagram_received(data, src)

            transport.local_receiver = on_datagram
            transport.set_ufrags([UFRAG])
            await transport.ufrags_declared()
            phases = [
                await run_phase("idle", args.seconds, owner, pid, client, seen, p, q, x, port,
                                args, flood=False),
                await run_phase("flood", args.seconds, owner, pid, client, seen, p, q, x, port,
                                args, flood=True),
                await run_phase("spoofed", args.seconds, owner, pid, client, seen, p, q, x,
                                port, args, flood=True, spoof=args.spoof),
            ]
            await transport.close()
        finally:
            await owner.close()
    return phases


def report(phases: list[Phase], args: argparse.Namespace) -> None:
    print(f"\n{'phase':<7} {'owner CPU':>9} {'queries answered':>17} {'checks through':>15}"
          f" {'kernel drops':>12}")
    for ph in phases:
        print(f"{ph.name:<7} {ph.cpu:>8.1f}% {ph.answered:>8}/{ph.queries:<8}"
              f" {ph.checks_seen:>7}/{ph.checks_sent:<7} {ph.kernel_drops:>12}")
    for ph in phases:
        if ph.flood:
            print(f"\n{ph.name}: {ph.flood['sent']} datagrams in {ph.flood['seconds']} s "
                  f"= {ph.flood['rate']:.0f}/s (asked {args.rate:.0f}/s)")
        print(f"{ph.name} stun_filter: {json.dumps(ph.filter, sort_keys=True)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="flood datagrams/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--queries", type=float, default=10.0, help="our STUN queries/s")
    parser.add_argument("--checks", type=float, default=20.0, help="the peer's checks/s")
    parser.add_argument("--spoof", default="198.19.128.0/17",
                        help="source addresses of the spoofed flood")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, a WireGuard device)", file=sys.stderr)
        return 2
    report(asyncio.run(bench(args)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
