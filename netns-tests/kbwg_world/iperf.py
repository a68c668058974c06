"""iperf3 between two nodes of a world: a one-shot server, a client run, Mbit/s received."""

from __future__ import annotations

import json
import subprocess

from kbwg_testing import wait_until
from kbwg_world.world import Node


def iperf_mbits(client: Node, server: Node, dest: str, seconds: float = 2.0) -> float:
    """TCP throughput from `client` to `server`'s address `dest`, as iperf3 measured it."""
    proc = server.popen(["iperf3", "-s", "-1", "-B", dest], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: ":5201" in server.run(["ss", "-ltn"], check=False).stdout,
                   what="iperf3 server")  # fmt: skip
        out = client.run(["iperf3", "-c", dest, "-t", str(seconds), "-J"], timeout=seconds + 30)
    finally:
        proc.wait(timeout=30)
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6
