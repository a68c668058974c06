"""Userspace link delay: holds each packet of an NFQUEUE queue for a time, then accepts it.

This kernel has no netem qdisc, so an iptables NFQUEUE rule hands the packets of a link to
this process, which accepts each one `--delay-ms` after it arrived. Without jitter the
delay is constant, so release times are monotonic and the order is kept: nothing is
reordered or dropped here. Run inside the namespace that holds the rule, either way:

    python -m kbwg_world.delayer --queue 3 --delay-ms 40
    python /path/to/kbwg_world/delayer.py --queue 3 --delay-ms 40

Jitter (`--jitter-ms J`) holds each packet `--delay-ms` plus a uniform random 0..J ms
(netem's `delay D+J/2 J/2`: J is the width of the spread, so `--delay-ms 0 --jitter-ms
100` is 50 +- 50 ms). Like netem with jitter, packets then leave in order of their release
time, so a later packet may overtake an earlier one (also within one flow); `--in-order`
holds a packet at least until the one before it left instead, which keeps the order but
makes delays bunch up behind a long one.

It prints `ready` on stdout once bound (the world installs the rule only then: without
`--queue-bypass` a rule without a listener drops everything). It depends on nothing but the
standard library and `netfilterqueue`, so it runs as a plain script.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import netfilterqueue


@dataclass
class Delayer:
    """The held packets, by release time, and the counters reported at exit."""

    delay_s: float
    jitter_s: float = 0.0
    in_order: bool = False
    rng: random.Random = field(default_factory=random.Random)
    # (release time, arrival number, packet): a heap, so with jitter the earliest release
    # leaves first; the arrival number keeps equal times (a constant delay) in FIFO order.
    held: list[tuple[float, int, Any]] = field(default_factory=list)
    arrivals: itertools.count[int] = field(default_factory=itertools.count)
    last_release: float = 0.0
    passed: int = 0
    stopping: bool = False

    def hold_time(self) -> float:
        if self.jitter_s <= 0:
            return self.delay_s
        return self.delay_s + self.rng.uniform(0.0, self.jitter_s)

    def on_packet(self, pkt: Any) -> None:
        # The verdict may be given after the callback returns; only the payload would need
        # retain(), and COPY_META does not fetch it at all.
        release = time.monotonic() + self.hold_time()
        if self.in_order:
            release = max(release, self.last_release)
        self.last_release = max(self.last_release, release)
        heapq.heappush(self.held, (release, next(self.arrivals), pkt))

    def next_release(self) -> float | None:
        return self.held[0][0] if self.held else None

    def release_due(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            heapq.heappop(self.held)[2].accept()
            self.passed += 1

    def release_all(self) -> None:
        # Shutting down must not lose packets that are already in flight.
        while self.held:
            heapq.heappop(self.held)[2].accept()
            self.passed += 1

    def stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True


def serve(queue_num: int, delay_ms: float, max_len: int, jitter_ms: float = 0.0,
          in_order: bool = False) -> int:
    delayer = Delayer(delay_s=delay_ms / 1000.0, jitter_s=jitter_ms / 1000.0,
                      in_order=in_order)
    signal.signal(signal.SIGTERM, delayer.stop)
    signal.signal(signal.SIGINT, delayer.stop)
    nfq = netfilterqueue.NetfilterQueue()
    # A deep kernel queue and a big socket buffer: at benchmark rates a 40 ms hold keeps
    # thousands of packets in flight, and overflowing either would drop packets.
    nfq.bind(
        queue_num,
        delayer.on_packet,
        max_len=max_len,
        mode=netfilterqueue.COPY_META,
        sock_len=8 * 1024 * 1024,
    )
    fd = nfq.get_fd()
    # select() is restarted after a signal handler (PEP 475), so a wakeup pipe is what
    # actually interrupts an idle wait on SIGTERM.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    print("ready", flush=True)
    try:
        while not delayer.stopping:
            timeout = None
            release = delayer.next_release()
            if release is not None:
                timeout = max(0.0, release - time.monotonic())
            readable, _, _ = select.select([fd, wake_r], [], [], timeout)
            if fd in readable:
                nfq.run(block=False)
            delayer.release_due(time.monotonic())
    finally:
        delayer.release_all()
        nfq.unbind()
        print(f"delayer queue {queue_num}: passed {delayer.passed} packets", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE queue number")
    parser.add_argument("--delay-ms", type=float, required=True, help="hold time per packet")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="add a uniform random 0..J ms to each packet's hold time")
    parser.add_argument("--in-order", action="store_true",
                        help="with jitter: never let a packet overtake an earlier one")
    parser.add_argument("--max-len", type=int, default=65536, help="kernel queue length")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.jitter_ms < 0:
        parser.error("--delay-ms and --jitter-ms must not be negative")
    return serve(args.queue, args.delay_ms, args.max_len, args.jitter_ms, args.in_order)


if __name__ == "__main__":
    sys.exit(main())
