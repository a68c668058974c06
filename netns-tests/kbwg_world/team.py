"""A Keybase team in a world: the stand-in's shared home, peers.json, and agents.

Used by the netns scenario tests, the demo and the benchmarks, so all three start agents
the same way a user would: `kbwg-agent join TEAM --keybase <stand-in>` inside a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kbwg.agent.control import ControlError, call
from kbwg_testing import wait_until
from kbwg_world.world import Node, World

BIN = Path(sys.executable).parent


def _tool(name: str, module: str) -> list[str]:
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


AGENT = _tool("kbwg-agent", "kbwg.agent.cli")
# The usual two members of a test team: (username, device, overlay address in peers.json).
ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")
STANDIN = BIN / "kbwg-keybase-standin"


@dataclass(eq=False)
class AgentProcess:
    host: Node
    username: str
    device: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"{self.username}/{self.device}"

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        # The control socket is a file: reachable from any namespace, as in real use.
        out = subprocess.run(
            [*AGENT, "status", "--json", "--state-dir", str(self.state_dir)],
            capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
            return None

    def quick_status(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """`status` over the control socket from this process, or None: the CLI (a new
        Python each time) takes seconds to start on two busy cores, which would swamp
        what a test polls for."""
        try:
            return asyncio.run(call(self.state_dir, "status", timeout=timeout))
        except (ControlError, OSError, TimeoutError, ValueError):
            return None

    def peer_view(self, device: str) -> dict[str, Any] | None:
        """This agent's status entry for the peer `device` (None before it answers)."""
        status = self.try_status()
        if status is None:
            return None
        return next((p for p in status["peers"] if p["device"] == device), None)

    def ping_ok(self, dest: str) -> bool:
        return self.host.ping_ok(dest)

    def negotiated(self, device: str) -> dict[str, Any] | None:
        """This agent's status entry for the peer `device` once negotiation chose a
        path to it, else None."""
        peer = self.peer_view(device)
        if peer is None or peer["endpoint_source"] != "negotiated" or peer["path"] == "none":
            return None
        return peer

    def wait_path(self, device: str, timeout: float = 20.0,
                  path: str | None = None) -> dict[str, Any]:
        """The negotiated path to `device` (of class `path`, if given); on time-out the
        error carries the last status entry seen and our log.

        A LAN peer whose CANDIDATES line is read a moment after its check may first be
        seen through its announced endpoint, of unknown type (agent/early_checks.py):
        a test of the class waits for it."""
        last: list[dict[str, Any] | None] = [None]

        def ready() -> dict[str, Any] | None:
            peer = last[0] = self.negotiated(device)
            return peer if peer is not None and path in (None, peer["path"]) else None

        try:
            return wait_until(ready, timeout=timeout,
                              what=f"{self.name} to negotiate a {path or 'path'} to {device}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast seen: {last[0]}\n--- log of {self.name}:\n"
                                 f"{self.log(8000)}") from None

    def log(self, last: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-last:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            raise AssertionError(f"agent {self.name} ignored signal {sig}:\n{self.log()}") from exc


@dataclass(eq=False)
class Team:
    world: World
    name: str = "demo-team"
    delay_ms: int = 0
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.world.dir / "keybase"

    def kbfs_path(self, name: str) -> Path:
        return self.home / "kbfs" / "team" / self.name / name

    def write_file(self, name: str, data: bytes | str) -> None:
        path = self.kbfs_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)

    def write_peers(self, entries: list[tuple[str, str, str]]) -> None:
        """entries: (username, device, overlay ip)."""
        doc = [{"username": u, "device": d, "ip": ip} for u, d, ip in entries]
        self.write_file("peers.json", json.dumps(doc, indent=2))

    def keybase_env(self, username: str, device: str) -> dict[str, str]:
        return {
            "KBWG_STANDIN_HOME": str(self.home),
            "KBWG_STANDIN_USER": username,
            "KBWG_STANDIN_DEVICE": device,
            "KBWG_STANDIN_DELAY_MS": str(self.delay_ms),
        }

    def start_agent(
        self,
        host: Node,
        username: str,
        device: str,
        *extra: str,
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
        wrap: Sequence[str] = (),
    ) -> AgentProcess:
        """Start `kbwg-agent join` in `host` as username/device.

        `env` adds to the stand-in's environment (e.g. KBWG_DYNAMIC_SEED). `state_dir`
        reuses an earlier agent's state dir (a restart that keeps dynamic-address.json);
        by default every start gets a fresh one. Each start logs to its own file. `wrap`
        is a command run in the host that execs kbwg-agent's argv given as its arguments
        (e.g. setpriv, to run the agent as another user).
        """
        self.home.mkdir(parents=True, exist_ok=True)
        index = len(self.agents)
        if state_dir is None:
            state_dir = self.world.dir / "agents" / f"{username}-{device}-{index}"
            state_dir.mkdir(parents=True)
            log_path = state_dir / "agent.log"
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            log_path = state_dir / f"agent-{index}.log"
        argv = [*wrap, *AGENT, "-vv", "join", self.name, "--keybase", str(STANDIN),
                "--state-dir", str(state_dir), *extra]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = host.popen(
                argv, env={**self.keybase_env(username, device), **(env or {})},
                stdout=log, stderr=log,
            )  # fmt: skip
        agent = AgentProcess(host, username, device, state_dir, log_path, proc)
        self.agents.append(agent)
        return agent

    def start_running(self, *devices: tuple[Node, str, str]) -> list[AgentProcess]:
        """Start an agent per (host, username, device), all at once, then wait until
        each answers `status`."""
        agents = [self.start_agent(host, username, device) for host, username, device in devices]
        for agent in agents:
            self.wait_running(agent)
        return agents

    def wait_running(self, agent: AgentProcess, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if agent.proc.poll() is not None:
                raise AssertionError(
                    f"agent {agent.name} exited with {agent.proc.returncode}:\n{agent.log()}"
                )
            return agent.try_status()

        try:
            return wait_until(ready, timeout=timeout, what=f"agent {agent.name} to answer status")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log of {agent.name}:\n{agent.log()}") from None

    def stop_all(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()


def first_ping(host: Node, dest: str, timeout: float = 30.0) -> float:
    """Seconds until the first ICMP echo reply from `dest`, pinging every 20 ms.

    ping exits at once while there is no route to `dest` (the agent has not made its
    interface yet), so it is restarted until the deadline.
    """
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        left = max(1, int(deadline - time.monotonic()))
        proc = subprocess.Popen(
            host.argv(["ping", "-n", "-i", "0.02", "-W", "1", "-w", str(left), dest]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "bytes from" in line:
                    return time.monotonic() - start
        finally:
            proc.kill()
            proc.wait()
        time.sleep(0.02)
    raise AssertionError(f"no ping reply from {dest} in {host.name} within {timeout:.0f}s")
