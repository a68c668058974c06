"""The least start-up this design allows: N devices starting at once on this machine.

Issue 13's LAN and six-device goals are timed from process start, every device of the
world on this one machine. Before a device can announce itself and take a check, it
must at the very least: start a Python process with asyncio and a key pair; ask Keybase
who it is, read peers.json and kbwg.json, subscribe to chat and send the announcement
(five `keybase` processes, the stand-in here); start the privileged device owner
(another Python process, with pyroute2) and wireguard-go through it, set the key, the
port and the address. This bench does only that, with no agent logic at all (no team
view, no negotiation, no history, no gathering, no control socket): in each host a
floor device sends its announcement while its owner creates the device, in one of
three orders (`--order`): after its Keybase reads, as `join` does; its `chat api`
process spawned before anything else; or that send alone first, the rest spawned once
it is out. It prints when the last device announced and when the last device existed,
and the floor of issue 13's connect time that follows:

    max(last announcement + chat delay, last device created)

(a peer hears of us one chat delay after our announcement and checks us at once; the
check and WireGuard's handshake add a few milliseconds more on a LAN, not counted).
The real agent's figure (`bench/connect.py`) cannot be below it.

    sudo .venv/bin/python bench/start_floor.py [--devices 1 3 6] [--runs 5]
                                               [--order ORDER] [--delay-ms 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OWNER_READY = b"ready\n"
WIREGUARD_GO = "/usr/bin/wireguard-go"
IFNAME = "floor0"
# When a device sends its announcement: after its Keybase reads, as `join` does
# (whoami, peers.json, kbwg.json, the listener); its `chat api` process spawned first,
# the rest at once after it; or alone, the rest spawned once it was sent.
ORDERS = ("after-reads", "announce-first", "announce-alone")


# ------------------------------------------------------------------ in each host


async def _keybase(standin: str, *argv: str, data: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        standin, *argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate(data)
    if proc.returncode:
        raise RuntimeError(f"keybase {' '.join(argv)} exited with {proc.returncode}")
    return out


async def _listen(standin: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        standin, "chat", "api-listen", "--dev", stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    while b"Listening" not in await proc.stderr.readline():
        pass
    return proc


async def device_main(standin: str, team: str, overlay_ip: str, order: str) -> None:
    """One device: its announcement and its set-up (owner, device, Keybase reads),
    in the `order` asked (ORDERS)."""
    from nacl.public import PrivateKey

    key = PrivateKey.generate()
    channel = {"name": team, "members_type": "team", "topic_name": "announce"}
    body = f"ANNOUNCE 192.0.2.1:51820 {bytes(key.public_key).hex()}"
    call = {"method": "send", "params": {"options": {"channel": channel,
                                                     "message": {"body": body}}}}
    async def announce() -> float:
        await _keybase(standin, "chat", "api", data=json.dumps(call).encode())
        return time.monotonic()

    announcing = None
    if order != "after-reads":
        announcing = asyncio.create_task(announce())
        if order == "announce-alone":
            await announcing
        else:
            await asyncio.sleep(0)  # its process is spawned first
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-I", __file__, "--owner", overlay_ip,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    listening = asyncio.create_task(_listen(standin))
    who, _peers, _config = await asyncio.gather(
        _keybase(standin, "whoami", "--json"),
        _keybase(standin, "fs", "read", f"/keybase/team/{team}/peers.json"),
        _keybase(standin, "fs", "read", f"/keybase/team/{team}/kbwg.json"))
    json.loads(who)
    listener = await listening
    announced = await (announcing if announcing is not None else announce())
    assert owner.stdout is not None and owner.stdin is not None
    if await owner.stdout.readline() != OWNER_READY:
        raise RuntimeError("the floor owner failed")
    ready = time.monotonic()
    owner.stdin.close()
    await owner.wait()
    listener.terminate()
    await listener.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({"announced": announced, "created": ready, "cpu": cpu}), flush=True)


async def owner_main(overlay_ip: str) -> None:
    """The device owner's least: wireguard-go with a key and port, an address, up."""
    from kbwg.core.deferred_init import defer_init

    defer_init("pyroute2")
    from pyroute2.iproute.linux import AsyncIPRoute

    from kbwg.owner.wg_userspace import UserspaceBackend

    backend = UserspaceBackend(WIREGUARD_GO)
    await backend.create(IFNAME, os.urandom(32), 51820)
    try:
        async with AsyncIPRoute() as ipr:
            (index,) = await ipr.link_lookup(ifname=IFNAME)
            await ipr.addr("add", index=index, address=overlay_ip, prefixlen=10)
            await ipr.link("set", index=index, state="up")
        sys.stdout.buffer.write(OWNER_READY)
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await backend.close()


# ------------------------------------------------------------------ the world


@dataclass(frozen=True)
class Run:
    order: str
    devices: int
    last_announced: float  # seconds from the start of every device
    last_created: float
    cpu: float  # CPU-seconds of all devices' processes

    def floor(self, delay_s: float) -> float:
        return max(self.last_announced + delay_s, self.last_created)


def run_once(devices: int, delay_ms: int, order: str) -> Run:
    from kbwg_world import NatMode, World
    from kbwg_world.team import STANDIN, Team

    with World() as world:
        inet = world.internet()
        router = world.router("r0", wan=inet, nat=NatMode.MASQUERADE)
        hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(devices)]
        team = Team(world, delay_ms=delay_ms)
        team.write_peers([(f"user{i}", f"dev{i}", f"100.64.0.{i + 1}") for i in range(devices)])
        team.write_file("kbwg.json", json.dumps({"stun_servers": []}))
        team.home.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        procs = [host.popen([sys.executable, "-I", __file__, "--device", str(STANDIN),
                             team.name, f"100.64.0.{i + 1}", order],
                            env=team.keybase_env(f"user{i}", f"dev{i}"),
                            stdout=subprocess.PIPE)
                 for i, host in enumerate(hosts)]
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            if proc.returncode:
                raise SystemExit(f"a floor device failed (exit {proc.returncode})")
            results.append(json.loads(out))
    return Run(order, devices, max(r["announced"] for r in results) - start,
               max(r["created"] for r in results) - start, sum(r["cpu"] for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--order", choices=ORDERS, action="append",
                        help="repeatable; default: all")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--delay-ms", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it builds network namespaces")
    sys.path.insert(0, str(BENCH))
    from connect import compile_sources  # the bytecode an install has, as connect.py

    compile_sources()
    delay_s = args.delay_ms / 1000
    rows = []
    for order, devices in itertools.product(args.order or ORDERS, args.devices):
        runs = []
        for index in range(args.runs):
            run = run_once(devices, args.delay_ms, order)
            runs.append(run)
            print(f"{order}, {devices} devices, run {index + 1}: last announced "
                  f"{run.last_announced:.2f} s, last device {run.last_created:.2f} s, "
                  f"floor {run.floor(delay_s):.2f} s, {run.cpu:.2f} CPU-s", file=sys.stderr)
        rows.append({
            "order": order,
            "devices": devices,
            "announced_median_s": statistics.median(r.last_announced for r in runs),
            "created_median_s": statistics.median(r.last_created for r in runs),
            "floor_median_s": statistics.median(r.floor(delay_s) for r in runs),
            "floor_min_s": min(r.floor(delay_s) for r in runs),
            "cpu_per_device_s": statistics.median(r.cpu for r in runs) / devices,
        })
    if args.json:
        print(json.dumps({"delay_ms": args.delay_ms, "runs": args.runs, "rows": rows}))
        return 0
    print(f"start-up floor, {args.runs} runs each, chat delay {args.delay_ms} ms, "
          f"{os.cpu_count()} cores")
    print("| order | devices | last announced | last device created | floor (median) "
          "| floor (best) | CPU-s per device |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['order']} | {row['devices']} | {row['announced_median_s']:.2f} s | "
              f"{row['created_median_s']:.2f} s | {row['floor_median_s']:.2f} s | "
              f"{row['floor_min_s']:.2f} s | {row['cpu_per_device_s']:.2f} |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--device"]:
        asyncio.run(device_main(*sys.argv[2:6]))
    elif sys.argv[1:2] == ["--owner"]:
        asyncio.run(owner_main(sys.argv[2]))
    else:
        sys.exit(main())
