"""First echo reply from each of several addresses, run inside a world namespace.

    python reach.py 100.64.0.2 100.64.0.3 --interval 0.02 --timeout 30

Pings every target every --interval (one raw ICMP socket for all of them, so one
process per host serves any number of directions) and prints one JSON line per target
at its first reply: {"dest": "100.64.0.2", "t": <time.monotonic()>}. The monotonic
clock is the same in every network namespace, so the caller compares these times with
its own. A target without a route yet (the agent has not made its interface) is simply
tried again. Prints {"ready": t} once the socket is open; exits 0 when every target
answered, 1 at the timeout. Standard library plus the world's pingtool only.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_world.pingtool import echo_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dest", nargs="+")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    waiting = set(args.dest)
    print(json.dumps({"ready": time.monotonic()}), flush=True)
    deadline = time.monotonic() + args.timeout
    next_send = time.monotonic()
    seq = 0
    while waiting:
        now = time.monotonic()
        if now >= deadline:
            return 1
        if now >= next_send:
            seq = (seq + 1) & 0xFFFF
            for dest in waiting:
                with contextlib.suppress(OSError):  # no route yet: try again next round
                    sock.sendto(echo_request(ident, seq), (dest, 0))
            next_send = now + args.interval
        readable, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
        if not readable:
            continue
        packet, (src, _) = sock.recvfrom(65535)
        ihl = (packet[0] & 0x0F) * 4
        icmp_type, _code, _sum, r_ident, _seq = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
        if icmp_type == 0 and r_ident == ident and src in waiting:
            waiting.discard(src)
            print(json.dumps({"dest": src, "t": time.monotonic()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
