"""Userspace link delay: holds each packet of an NFQUEUE queue for a fixed time, in order.

This kernel has no netem qdisc, so an iptables NFQUEUE rule hands the packets of a link to
this process, which accepts each one `--delay-ms` after it arrived. The delay is constant,
so release times are monotonic and a FIFO keeps the order: nothing is reordered or dropped
here. Run inside the namespace that holds the rule, either way:

    python -m kbwg_world.delayer --queue 3 --delay-ms 40
    python /path/to/kbwg_world/delayer.py --queue 3 --delay-ms 40

It prints `ready` on stdout once bound (the world installs the rule only then: without
`--queue-bypass` a rule without a listener drops everything). It depends on nothing but the
standard library and `netfilterqueue`, so it runs as a plain script.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import netfilterqueue


@dataclass
class Delayer:
    """The FIFO of held packets and the counters reported at exit."""

    delay_s: float
    held: deque[tuple[float, Any]] = field(default_factory=deque)
    passed: int = 0
    stopping: bool = False

    def on_packet(self, pkt: Any) -> None:
        # The verdict may be given after the callback returns; only the payload would need
        # retain(), and COPY_META does not fetch it at all.
        self.held.append((time.monotonic() + self.delay_s, pkt))

    def release_due(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            self.held.popleft()[1].accept()
            self.passed += 1

    def release_all(self) -> None:
        # Shutting down must not lose packets that are already in flight.
        while self.held:
            self.held.popleft()[1].accept()
            self.passed += 1

    def stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True


def serve(queue_num: int, delay_ms: float, max_len: int) -> int:
    delayer = Delayer(delay_s=delay_ms / 1000.0)
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
            if delayer.held:
                timeout = max(0.0, delayer.held[0][0] - time.monotonic())
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
    parser.add_argument("--max-len", type=int, default=65536, help="kernel queue length")
    args = parser.parse_args(argv)
    return serve(args.queue, args.delay_ms, args.max_len)


if __name__ == "__main__":
    sys.exit(main())
