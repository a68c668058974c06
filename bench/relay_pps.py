"""Relay throughput on loopback: our relay against coturn, same load, same settings.

Each relay runs pinned to CPU 0, the load generator (a sender process and a sink
process) to CPU 1, so both relays get exactly one core. The sender opens N TURN
allocations with TURN REST credentials, binds one channel each to a sink socket, then
sends 1200-byte ChannelData as fast as it can for a fixed time; the sink counts what
arrives. Relayed packets per second = packets at the sink / time between the first and
the last. CPU use of the relay comes from /proc/<pid>/stat over the same window.

Run as root (coturn wants to raise its limits; the relays use 4 MB socket buffers):
    sudo .venv/bin/python bench/relay_pps.py [--duration 5] [--clients 4]

`--baseline REV` also runs the relay as it was at git revision REV (its kbwg.relay and
kbwg.core, exported to a temporary directory), to measure what a change costs;
`--rounds N` repeats the whole comparison and reports medians, for a busy machine.
There, packets per CPU-second is the figure to compare: packets per second depend on
how much of CPU 0 the relay gets beside everything else running.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from aioice import stun
from aioice.turn import UDP_TRANSPORT, make_integrity_key

from kbwg.core.turnrest import rest_password, rest_username

Address = tuple[str, int]
SECRET = "bench-secret"
REALM = "kbwg"
PAYLOAD = 1200
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
# Runs `kbwg.relay.main` from the directory in argv[1], not the installed package.
BASELINE_MAIN = """
import argparse, sys
sys.path.insert(0, sys.argv.pop(1))
import kbwg.relay.main as relay_main
assert relay_main.__file__.startswith(sys.path[0]), relay_main.__file__
parser = argparse.ArgumentParser()
relay_main.add_arguments(parser)
sys.exit(relay_main.run(parser.parse_args()))
"""


def _transact(sock: socket.socket, request: stun.Message, key: bytes | None,
              auth: dict[str, object]) -> stun.Message:
    if key is not None:
        request.attributes.update(auth)
        request.add_message_integrity(key)
    for _ in range(5):
        sock.send(bytes(request))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            message = stun.parse_message(data)
            if message.transaction_id == request.transaction_id:
                return message
    raise TimeoutError(f"no answer to {request.message_method.name}")


def open_channel(server: Address, peer: Address, user: str) -> socket.socket:
    """A client socket with an allocation and channel 0x4000 bound to `peer`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.connect(server)
    username = rest_username(user, 3600)
    password = rest_password(SECRET, username)
    allocate = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                            attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT})
    challenge = _transact(sock, allocate, None, {})
    realm, nonce = challenge.attributes["REALM"], challenge.attributes["NONCE"]
    key = make_integrity_key(username, realm, password)
    auth = {"USERNAME": username, "REALM": realm, "NONCE": nonce}
    allocate = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                            attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT})
    answer = _transact(sock, allocate, key, auth)
    if answer.message_class != stun.Class.RESPONSE:
        raise RuntimeError(f"Allocate failed: {answer.attributes.get('ERROR-CODE')}")
    bind = stun.Message(stun.Method.CHANNEL_BIND, stun.Class.REQUEST,
                        attributes={"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer})
    answer = _transact(sock, bind, key, auth)
    if answer.message_class != stun.Class.RESPONSE:
        raise RuntimeError(f"ChannelBind failed: {answer.attributes.get('ERROR-CODE')}")
    return sock


def sender(server: Address, peers: list[Address], duration: float, conn: Connection) -> None:
    os.sched_setaffinity(0, {1})
    try:
        sockets = [open_channel(server, peer, f"bench{i}") for i, peer in enumerate(peers)]
    except Exception as exc:
        conn.send(("error", str(exc)))
        return
    for sock in sockets:
        sock.setblocking(False)
    conn.send(("ready", None))
    conn.recv()
    packet = struct.pack("!HH", 0x4000, PAYLOAD) + bytes(PAYLOAD)
    sends = [sock.send for sock in sockets]
    sent = dropped = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for _ in range(64):
            for send in sends:
                try:
                    send(packet)
                    sent += 1
                except BlockingIOError:
                    dropped += 1
    conn.send(("sent", (sent, dropped)))


def sink(count: int, conn: Connection) -> None:
    os.sched_setaffinity(0, {1})
    selector = selectors.DefaultSelector()
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    conn.send([sock.getsockname() for sock in sockets])
    buf = bytearray(2048)
    received = 0
    first = last = 0.0
    while not conn.poll():
        for key, _ in selector.select(0.2):
            recv = key.fileobj.recv_into  # type: ignore[union-attr]
            while True:
                try:
                    recv(buf)
                except BlockingIOError:
                    break
                received += 1
            last = time.monotonic()
            if not first:
                first = last
    conn.send((received, first, last))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Result:
    name: str
    pps: float
    sent: int
    received: int
    cpu: float


def wait_ready(server: Address, proc: subprocess.Popen[bytes]) -> None:
    request = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.1)
    try:
        for _ in range(50):
            if proc.poll() is not None:
                raise RuntimeError("relay exited at start")
            sock.sendto(request, server)
            try:
                sock.recv(2048)
                return
            except TimeoutError:
                continue
        raise RuntimeError("relay did not answer")
    finally:
        sock.close()


def run_load(name: str, command: list[str], server: Address, clients: int,
             duration: float) -> Result:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    sink_parent, sink_child = mp.Pipe()
    send_parent, send_child = mp.Pipe()
    sink_proc = mp.Process(target=sink, args=(clients, sink_child))
    send_proc: mp.Process | None = None
    try:
        wait_ready(server, proc)
        sink_proc.start()
        peers = sink_parent.recv()
        send_proc = mp.Process(target=sender, args=(server, peers, duration, send_child))
        send_proc.start()
        status, detail = send_parent.recv()
        if status != "ready":
            raise RuntimeError(f"{name}: {detail}")
        cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
        send_parent.send("go")
        _, (sent, _dropped) = send_parent.recv()
        cpu = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - started)
        time.sleep(0.3)  # let the relay drain its buffers into the sink
        sink_parent.send("stop")
        received, first, last = sink_parent.recv()
        pps = received / (last - first) if last > first else 0.0
        return Result(name, pps, sent, received, cpu)
    finally:
        for child in (send_proc, sink_proc):
            if child is not None and child.is_alive():
                child.terminate()
            if child is not None and child.pid is not None:
                child.join(5)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def export_baseline(rev: str, dest: Path) -> None:
    """kbwg.relay and kbwg.core as they were at `rev`, importable from `dest`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "relay", "core"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest / "kbwg", filter="data")


def _per_cpu(result: Result) -> float:
    return result.pps / result.cpu if result.cpu else 0.0


def _median(results: list[Result]) -> Result:
    """Medians of each figure over rounds (pps and CPU separately)."""
    first = results[0]
    return Result(first.name, statistics.median(r.pps for r in results),
                  int(statistics.median(r.sent for r in results)),
                  int(statistics.median(r.received for r in results)),
                  statistics.median(r.cpu for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=34878)
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the relay of this git revision")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the comparison, report medians (default 1)")
    args = parser.parse_args()
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        secret_path = Path(tmp) / "relay.secret"
        secret_path.write_text(SECRET)
        relay_args = ["--listen", f"127.0.0.1:{args.port}", "--secret-file", str(secret_path),
                      "--realm", REALM, "--allow-peer", "127.0.0.0/8", "--stats-interval", "0"]
        contenders: list[tuple[str, list[str], Address]] = [
            ("kbwg relay", [sys.executable, "-m", "kbwg.agent.cli", "relay", *relay_args],
             ("127.0.0.1", args.port))]
        if args.baseline:
            export_baseline(args.baseline, Path(tmp) / "baseline")
            contenders.append((f"kbwg@{args.baseline[:10]}", [
                sys.executable, "-c", BASELINE_MAIN, str(Path(tmp) / "baseline"),
                *relay_args], ("127.0.0.1", args.port)))
        coturn = [shutil.which("turnserver") or "turnserver", "-n", "--no-cli", "--no-tls",
                  "--no-dtls", "--listening-ip", "127.0.0.1", "--listening-port",
                  str(args.port + 2), "--relay-ip", "127.0.0.1", "--use-auth-secret",
                  f"--static-auth-secret={SECRET}", "--realm", REALM,
                  "--allow-loopback-peers", "--no-stun-backward-compatibility",
                  "--log-file", "stdout", "--simple-log", "--no-software-attribute"]
        contenders.append(("coturn", coturn, ("127.0.0.1", args.port + 2)))
        rounds: list[list[Result]] = [[] for _ in contenders]
        # Each round starts with another contender, so none is always first after a
        # quiet spell (or always last, after the machine got busy).
        for round_index in range(max(1, args.rounds)):
            for offset in range(len(contenders)):
                i = (round_index + offset) % len(contenders)
                name, command, server = contenders[i]
                rounds[i].append(run_load(name, command, server, args.clients,
                                          args.duration))
    results = [_median(runs) for runs in rounds]
    print(f"{args.clients} channels, {PAYLOAD}-byte payloads, {args.duration:g} s each, "
          f"relay pinned to CPU 0, load generator to CPU 1"
          f"{f', medians of {args.rounds} rounds' if args.rounds > 1 else ''}")
    for r in results:
        print(f"{r.name:>16}: {r.pps:9.0f} pkt/s relayed  ({r.received} of {r.sent} sent, "
              f"relay CPU {100 * r.cpu:3.0f}%, {_per_cpu(r):9.0f} pkt/s per CPU-second)")
    coturn_r = results[-1]
    for r in results[:-1]:
        if not coturn_r.pps:
            break
        print(f"ratio {r.name}/coturn: {r.pps / coturn_r.pps:.2f}x pkt/s", end="")
        if r.cpu and coturn_r.cpu:
            print(f", {_per_cpu(r) / _per_cpu(coturn_r):.2f}x per CPU-second")
        else:
            print()
    if args.baseline and results[1].pps:
        ours_r, base_r = results[0], results[1]
        print(f"ratio now/{base_r.name}: {ours_r.pps / base_r.pps:.2f}x pkt/s", end="")
        if ours_r.cpu and base_r.cpu:
            print(f", {_per_cpu(ours_r) / _per_cpu(base_r):.2f}x per CPU-second")
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
