"""ICMP echo for the world (no `ping` binary on this machine), run inside a namespace.

    python pingtool.py 203.0.113.2 --count 5 --interval 0.2 --timeout 1

Prints one JSON object: {"sent": n, "received": m, "rtts_ms": [...]}. Exit status 0 when
at least one reply came back. A raw ICMP socket needs root, which the world has anyway.
Standard library only, so it runs by path with any interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"kbwg-world-ping".ljust(32, b".")
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dest")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=1.0, help="wait for the last reply")
    parser.add_argument("--source", default=None, help="bind to this local address")
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if args.source:
        sock.bind((args.source, 0))
    ident = os.getpid() & 0xFFFF
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    next_send = time.monotonic()
    seq = 0
    deadline = None
    while True:
        now = time.monotonic()
        if seq < args.count and now >= next_send:
            seq += 1
            sent_at[seq] = time.monotonic()
            # Unreachable right now counts as a lost probe.
            with contextlib.suppress(OSError):
                sock.sendto(echo_request(ident, seq), (args.dest, 0))
            next_send += args.interval
            if seq == args.count:
                deadline = time.monotonic() + args.timeout
        if deadline is not None and (now >= deadline or len(rtts) == args.count):
            break
        wake = deadline if seq >= args.count and deadline is not None else next_send
        readable, _, _ = select.select([sock], [], [], max(0.0, wake - time.monotonic()))
        if not readable:
            continue
        packet, _ = sock.recvfrom(65535)
        recv_time = time.monotonic()
        ihl = (packet[0] & 0x0F) * 4
        icmp_type, _code, _sum, r_ident, r_seq = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
        # A raw socket sees every ICMP packet of the namespace: keep only our replies.
        if icmp_type == 0 and r_ident == ident and r_seq in sent_at:
            rtts.append((recv_time - sent_at.pop(r_seq)) * 1000.0)
    print(json.dumps({"sent": seq, "received": len(rtts), "rtts_ms": rtts}))
    return 0 if rtts else 1


if __name__ == "__main__":
    sys.exit(main())
