"""TURN relays in a world: the project's own (`kbwg-agent relay`) and coturn, both with
TURN REST credentials from one shared secret, started in a node (so the world stops
them) and awaited by polling a STUN Binding, never by a guessed sleep.

Both also serve TURN over TCP on the same port (coturn does by default; ours with
--tcp-listen) and, given certificates, over TLS on `tls_port`."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbwg_testing import wait_until
from kbwg_testing.certs import RelayCertificates
from kbwg_world.stunserver import PROBE_SCRIPT
from kbwg_world.world import LAN_SPACE, Node

AGENT = Path(sys.executable).with_name("kbwg-agent")


@dataclass
class TurnServer:
    kind: str  # "kbwg" or "coturn"
    node: Node
    proc: subprocess.Popen[Any]
    ip: str
    port: int
    secret: str
    log_path: Path
    tls: RelayCertificates | None = None
    tls_port: int = 5349

    @property
    def url(self) -> str:
        return f"turn:{self.ip}:{self.port}"

    def config(self) -> dict[str, str]:
        """The entry for kbwg.json's `relays`."""
        return {"url": self.url, "secret": self.secret}

    def config_for(self, transport: str) -> dict[str, str]:
        """The kbwg.json entry reaching it over udp, tcp or tls (turns:, with the CA)."""
        if transport == "tcp":
            return {"url": f"{self.url}?transport=tcp", "secret": self.secret}
        if transport == "tls":
            if self.tls is None:
                raise ValueError("this relay was started without TLS certificates")
            return {"url": f"turns:{self.ip}:{self.tls_port}", "secret": self.secret,
                    "ca_file": str(self.tls.ca)}
        return self.config()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop it dead (SIGKILL): a relay that dies, not one that says goodbye."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait_ready(self, timeout: float = 30.0) -> None:  # Python starts slowly when loaded
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} relay exited: {self.log()[-2000:]}")
            probe = self.node.run([sys.executable, str(PROBE_SCRIPT), "--timeout", "0.3",
                                   f"{self.ip}:{self.port}"], check=False)  # fmt: skip
            return probe.returncode == 0

        wait_until(ready, timeout=timeout, what=f"the {self.kind} relay to answer")


def start_relay(node: Node, ip: str, port: int = 3478, secret: str = "team-secret",
                kind: str = "kbwg", tls: RelayCertificates | None = None,
                tls_port: int = 5349, extra: tuple[str, ...] = ()) -> TurnServer:
    base = node.world.dir / f"{kind}-relay-{node.name}-{port}"
    log_path = base.with_suffix(".log")
    if kind == "kbwg":
        secret_file = base.with_suffix(".secret")
        secret_file.write_text(secret + "\n")
        argv = [str(AGENT), "relay", "--listen", f"{ip}:{port}",
                "--secret-file", str(secret_file), "--stats-interval", "5"]  # fmt: skip
        # The world's LANs are benchmarking space, which the relay refuses as peers
        # unless told otherwise; its internet (documentation space) is relayable as is.
        argv += ["--allow-peer", str(LAN_SPACE), "--tcp-listen", f"{ip}:{port}"]
        argv += extra  # e.g. --listen6 [ADDR]:PORT
        if tls is not None:
            argv += ["--tls-listen", f"{ip}:{tls_port}", "--cert", str(tls.cert),
                     "--key", str(tls.key)]  # fmt: skip
    elif kind == "coturn":
        argv = [
            "turnserver", "-n", "--listening-ip", ip, "--relay-ip", ip,
            "--listening-port", str(port), "--use-auth-secret",
            f"--static-auth-secret={secret}", "--realm", "kbwg", "--no-cli",
            "--no-dtls", "--no-rfc5780", "--log-file", "stdout", "--simple-log",
            "--pidfile", str(base.with_suffix(".pid")), "--userdb", str(base.with_suffix(".db")),
        ]  # fmt: skip
        argv += (["--cert", str(tls.cert), "--pkey", str(tls.key),
                  "--tls-listening-port", str(tls_port)] if tls is not None
                 else ["--no-tls"])  # fmt: skip
    else:
        raise ValueError(f"unknown relay kind {kind!r}")
    with open(log_path, "wb") as log:
        proc = node.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = TurnServer(kind, node, proc, ip, port, secret, log_path, tls, tls_port)
    server.wait_ready()
    return server
