"""`UdpPeer`: drive `udptool.py` inside a node to send and observe UDP datagrams.

The tool runs in the node's namespace and reports every datagram with the source address
it arrived from, which is exactly what NAT tests need (mapped address and port).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kbwg_world.world import Node

UDPTOOL_SCRIPT = Path(__file__).with_name("udptool.py")


@dataclass(frozen=True)
class Datagram:
    src_ip: str
    src_port: int
    data: str

    @property
    def src(self) -> tuple[str, int]:
        return (self.src_ip, self.src_port)


@dataclass(eq=False)
class UdpPeer:
    """A UDP socket bound in a node; its process is owned (and killed) by the world."""

    node: Node
    proc: subprocess.Popen[Any]
    port: int = 0
    events: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue, repr=False)

    @classmethod
    def start(
        cls,
        node: Node,
        port: int = 0,
        bind: str = "0.0.0.0",
        echo: bool = False,
        timeout: float = 5.0,
    ) -> UdpPeer:
        argv = [sys.executable, str(UDPTOOL_SCRIPT), "--port", str(port), "--bind", bind]
        if echo:
            argv.append("--echo")
        proc = node.popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        peer = cls(node=node, proc=proc)
        # A reader thread turns the tool's output into a queue, so reads can time out.
        threading.Thread(target=peer._read, name=f"udppeer-{node.name}", daemon=True).start()
        ready = peer._next_event(timeout)
        if ready is None or ready.get("event") != "ready":
            raise RuntimeError(f"udptool in {node.name} did not start: {ready!r}")
        peer.port = int(ready["port"])
        return peer

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)  # EOF: the tool exited

    def _next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, host: str, port: int, data: str = "hello") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "send", "host": host, "port": port, "data": data}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 2.0) -> Datagram | None:
        """The next datagram received, or None after `timeout` seconds."""
        while True:
            event = self._next_event(timeout)
            if event is None:
                return None
            if event.get("event") == "recv":
                src_ip, src_port = event["src"]
                return Datagram(str(src_ip), int(src_port), str(event["data"]))
            if event.get("event") == "error":
                raise RuntimeError(f"udptool in {self.node.name}: {event['error']}")

    def expect(self, timeout: float = 2.0, what: str = "a datagram") -> Datagram:
        dgram = self.recv(timeout)
        if dgram is None:
            raise AssertionError(f"{self.node.name}:{self.port} received no {what} in {timeout}s")
        return dgram

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the tool exits at EOF on stdin
