"""A STUN flood for tests and benchmarks, run inside a namespace as a plain script.

    python stunflood.py HOST PORT [--rate 5000] [--seconds 30] [--sockets 256]
                        [--username U] [--spoof CIDR]

Sends STUN-shaped datagrams to HOST:PORT at `rate` per second for `seconds`, from
`sockets` UDP sockets on random ports in turn (so every few datagrams come from another
source port). Each datagram has a random transaction id and is one of: a bare header of
a random class (no FINGERPRINT), a Binding request with a random USERNAME and a right
FINGERPRINT (what a check looks like), a Binding success response with a right
FINGERPRINT (an answer to nobody). With --username, every datagram is instead a Binding
request with that USERNAME and a right FINGERPRINT: a peer's checks, for benchmarks that
measure what still gets through. With --spoof (root), each datagram comes from a random
address of CIDR instead (a raw socket writing its own IPv4 header, UDP checksum 0): a
flood from many sources, which no per-source budget stops. Prints JSON lines:
`{"event": "ready"}` once the sockets are bound, then `{"event": "done", "sent": N,
"errors": E, "seconds": T, "rate": R}`. Ends early, with the same line, on SIGTERM or
SIGINT. Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import time
import zlib

COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
# Distinct datagrams made up front: the send loop only picks.
DISTINCT = 30000
MAX_BATCH = 256


def _attr(attr_type: int, value: bytes) -> bytes:
    pad = -len(value) & 3
    return struct.pack("!HH", attr_type, len(value)) + value + bytes(pad)


def _message(msg_type: int, tid: bytes, attrs: bytes, fingerprint: bool) -> bytes:
    length = len(attrs) + (8 if fingerprint else 0)
    data = struct.pack("!HHI", msg_type, length, COOKIE) + tid + attrs
    if fingerprint:
        data += struct.pack("!HHI", 0x8028, 4, zlib.crc32(data) ^ FINGERPRINT_XOR)
    return data


def datagram(rng: random.Random, username: str | None = None) -> bytes:
    tid = rng.randbytes(12)
    if username is not None:
        return _message(0x0001, tid, _attr(0x0006, username.encode()), True)
    kind = rng.randrange(3)
    if kind == 0:
        return _message(rng.choice((0x0001, 0x0011, 0x0101, 0x0111)), tid, b"", False)
    if kind == 1:
        name = f"{rng.getrandbits(32):08x}:{rng.getrandbits(32):08x}".encode()
        attrs = _attr(0x0006, name) + _attr(0x0024, struct.pack("!I", rng.getrandbits(32)))
        return _message(0x0001, tid, attrs, True)
    xor_port = rng.getrandbits(16)
    attrs = _attr(0x0020, struct.pack("!BBH", 0, 1, xor_port) + rng.randbytes(4))
    return _message(0x0101, tid, attrs, True)


def spoofed(payload: bytes, src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IPv4 packet from `src`; the kernel fills in the IP checksum and id."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + udp


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sockets", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--username", default=None)
    parser.add_argument("--spoof", type=ipaddress.IPv4Network, default=None)
    args = parser.parse_args(argv)

    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rng = random.Random(args.seed if args.seed is not None else os.urandom(8))
    payloads = [datagram(rng, args.username) for _ in range(DISTINCT)]
    socks = []
    if args.spoof is not None:
        net: ipaddress.IPv4Network = args.spoof
        payloads = [spoofed(p, str(net[rng.randrange(net.num_addresses)]),
                            rng.randrange(1024, 65536), args.host, args.port)
                    for p in payloads]
        # IPPROTO_RAW implies IP_HDRINCL: the header is ours.
        socks.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
    else:
        for _ in range(args.sockets):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))
            socks.append(sock)
    dest = (args.host, args.port if args.spoof is None else 0)
    emit({"event": "ready"})

    sent = errors = 0
    start = time.monotonic()
    end = start + args.seconds
    while not stop:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int((now - start) * args.rate) - sent - errors, MAX_BATCH)
        if due <= 0:
            time.sleep(0.0005)
            continue
        for _ in range(due):
            n = sent + errors
            try:
                socks[n % len(socks)].sendto(payloads[n % DISTINCT], dest)
                sent += 1
            except OSError:
                errors += 1
    elapsed = time.monotonic() - start
    emit({"event": "done", "sent": sent, "errors": errors, "seconds": round(elapsed, 3),
          "rate": round(sent / elapsed, 1) if elapsed else 0.0})
    for sock in socks:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
