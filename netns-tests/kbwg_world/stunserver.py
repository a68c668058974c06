"""coturn as a STUN server inside a world node, with RFC 5780 when it has two addresses.

    server = StunServer.start(node, ["203.0.113.2", "198.51.100.2"])  # RFC 5780
    plain = StunServer.start(other, ["203.0.113.3"])                   # Binding only

The process is started with `node.popen`, so the world terminates it when it closes; its
pid file, user database and log live in the world's directory (nothing is written to
/var/run or /var/lib/turn). `start` returns once every listening endpoint answers a STUN
Binding request (polled from inside the node), not after a fixed sleep.

Run by path, the module is that readiness probe (standard library only):

    python stunserver.py 203.0.113.2:3478 198.51.100.2:3479

sends one Binding request to each endpoint and exits 0 when all of them answered.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kbwg_world.world import Node

PROBE_SCRIPT = Path(__file__).resolve()
STUN_PORT = 3478
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101


def binding_request() -> tuple[bytes, bytes]:
    """A minimal Binding request (no attributes) and its transaction id."""
    txid = os.urandom(12)
    return struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE) + txid, txid


def probe(endpoints: list[tuple[str, int]], timeout: float) -> list[tuple[str, int]]:
    """Send one Binding request to each endpoint; return those that did not answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        waiting: dict[bytes, tuple[str, int]] = {}
        for endpoint in endpoints:
            data, txid = binding_request()
            waiting[txid] = endpoint
            sock.sendto(data, endpoint)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                break
            try:
                data = sock.recv(2048)
            except OSError:  # ICMP port unreachable: that listener is not up yet
                continue
            if len(data) >= 20:
                msg_type, _, cookie = struct.unpack_from("!HHI", data)
                if msg_type == BINDING_SUCCESS and cookie == MAGIC_COOKIE:
                    waiting.pop(data[8:20], None)
    return list(waiting.values())


class StunServerError(RuntimeError):
    """coturn did not start, or died."""


@dataclass(eq=False)
class StunServer:
    """A running coturn (STUN only, no authentication) in `node`."""

    node: Node
    proc: subprocess.Popen[Any]
    ips: list[str]
    port: int
    alt_port: int | None  # set when RFC 5780 is on (two addresses)
    log_path: Path

    @property
    def address(self) -> str:
        """`IP:PORT` of the primary endpoint, as `--stun` takes it."""
        return f"{self.ips[0]}:{self.port}"

    @property
    def rfc5780(self) -> bool:
        return self.alt_port is not None

    @property
    def other_address(self) -> str | None:
        """The OTHER-ADDRESS the primary endpoint announces (RFC 5780), or None."""
        return f"{self.ips[1]}:{self.alt_port}" if self.alt_port is not None else None

    def endpoints(self) -> list[tuple[str, int]]:
        ports = [self.port] if self.alt_port is None else [self.port, self.alt_port]
        return [(ip, port) for ip in self.ips for port in ports]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @classmethod
    def start(
        cls,
        node: Node,
        ips: list[str] | None = None,
        port: int = STUN_PORT,
        alt_port: int | None = None,
        timeout: float = 10.0,
    ) -> StunServer:
        """Start coturn on `ips` (default: the node's addresses) and wait until it answers.

        With two or more addresses RFC 5780 is on: coturn also listens on `alt_port`
        (default `port + 1`) and answers CHANGE-REQUEST from the other address and port.
        """
        ips = list(ips or node.addresses)
        if not ips:
            raise StunServerError(f"{node.name} has no address to listen on")
        rfc5780 = len(ips) >= 2
        alt = (port + 1 if alt_port is None else alt_port) if rfc5780 else None
        base = node.world.dir / f"turnserver-{node.name}-{port}"
        log_path = base.with_suffix(".log")
        argv = ["turnserver", "-n", "--listening-port", str(port)]
        for ip in ips:
            argv += ["--listening-ip", ip]
        argv += ["--alt-listening-port", str(alt)] if alt is not None else ["--no-rfc5780"]
        argv += [
            "--stun-only", "--no-auth", "--no-cli", "--no-tls", "--no-dtls",
            "--log-file", "stdout", "--simple-log",
            "--pidfile", str(base.with_suffix(".pid")),
            "--userdb", str(base.with_suffix(".db")),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = node.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        server = cls(node=node, proc=proc, ips=ips, port=port, alt_port=alt, log_path=log_path)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll a Binding to every endpoint from inside the node until all answer."""
        probe_argv = [sys.executable, str(PROBE_SCRIPT), "--timeout", "0.3"]
        probe_argv += [f"{ip}:{port}" for ip, port in self.endpoints()]
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise StunServerError(
                    f"turnserver in {self.node.name} exited with {self.proc.returncode}: "
                    f"{self.log()[-2000:]}"
                )
            result = self.node.run(probe_argv, check=False, timeout=10)
            if result.returncode == 0:
                return
            last = (result.stdout + result.stderr).strip()
            if time.monotonic() >= deadline:
                raise StunServerError(
                    f"turnserver in {self.node.name} not answering after {timeout:.1f}s "
                    f"({last}): {self.log()[-2000:]}"
                )
            time.sleep(0.05)  # poll interval between probes, not a readiness guess


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="STUN Binding readiness probe")
    parser.add_argument("endpoints", nargs="+", type=_endpoint, metavar="IP:PORT")
    parser.add_argument("--timeout", type=float, default=0.3)
    args = parser.parse_args(argv)
    missing = probe(args.endpoints, args.timeout)
    if missing:
        print("no answer from " + " ".join(f"{h}:{p}" for h, p in missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
