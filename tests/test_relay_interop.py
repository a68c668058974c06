"""Interop on loopback: coturn's test client against our relay, aioice's TURN client
against coturn (use-auth-secret), and the `kbwg-agent relay` command itself."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

from kbwg.core.turnrest import rest_password, rest_username
from kbwg_testing import wait_until

SECRET = "interop-secret"
Address = tuple[str, int]

needs_coturn = pytest.mark.skipif(
    shutil.which("turnserver") is None or shutil.which("turnutils_uclient") is None,
    reason="coturn is not installed")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_binding(address: Address, proc: subprocess.Popen[str],
                      timeout: float = 10.0) -> None:
    request = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)  # the retry interval: a request may come before the bind

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited at start ({proc.returncode})")
            sock.sendto(request, address)
            try:
                sock.recv(2048)
            except TimeoutError:
                return False
            return True

        wait_until(answers, timeout=timeout, interval=0, what=f"a STUN answer from {address}")


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay.secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def our_relay(secret_file: Path) -> Iterator[tuple[Address, subprocess.Popen[str]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbwg.agent.cli", "relay", "--listen", f"127.0.0.1:{port}",
         "--secret-file", str(secret_file), "--allow-peer", "127.0.0.0/8",
         "--stats-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_binding(("127.0.0.1", port), proc)
        yield ("127.0.0.1", port), proc
    finally:
        _stop(proc)


@pytest.fixture
def coturn() -> Iterator[Address]:
    port = _free_port()
    proc = subprocess.Popen(
        ["turnserver", "-n", "--no-cli", "--no-tls", "--no-dtls", "--listening-ip",
         "127.0.0.1", "--listening-port", str(port), "--relay-ip", "127.0.0.1",
         "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm", "kbwg",
         "--allow-loopback-peers", "--log-file", "stdout", "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_for_binding(("127.0.0.1", port), proc)
        yield ("127.0.0.1", port)
    finally:
        _stop(proc)


@needs_coturn
@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags", [[], ["-s"], ["-y"]], ids=["channels", "send", "c2c"])
def test_turnutils_uclient_against_our_relay(
        our_relay: tuple[Address, subprocess.Popen[str]], flags: list[str]) -> None:
    (host, port), relay = our_relay
    peer_port = _free_port()
    peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        result = subprocess.run(
            ["turnutils_uclient", *flags, "-n", "20", "-m", "2", "-l", "400", "-z", "5",
             "-u", "alice", "-W", SECRET, "-e", "127.0.0.1", "-r", str(peer_port),
             "-p", str(port), host],
            capture_output=True, text=True, timeout=40)
    finally:
        _stop(peer)
    output = result.stdout + result.stderr
    assert "error" not in output.lower(), output
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    assert sent, output
    total_sent, total_received = map(int, sent[-1])
    assert total_sent >= 40 and total_received == total_sent, output
    assert re.search(r"Total lost packets 0 \(", output), output
    relay.send_signal(signal.SIGINT)
    log, _ = relay.communicate(timeout=10)
    assert relay.returncode == 0
    assert "counters (exit)" in log and '"to_peer_packets"' in log, log


@needs_coturn
@pytest.mark.timeout(30)
async def test_aioice_turn_client_against_coturn(coturn: Address) -> None:
    class Collect(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.received: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.received.put_nowait((data, addr))

    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(
        Collect, local_addr=("127.0.0.1", 0), family=socket.AF_INET)
    username = rest_username("agent", 600)
    transport, protocol = await create_turn_endpoint(
        Collect, coturn, username, rest_password(SECRET, username))
    try:
        peer_address = peer_transport.get_extra_info("sockname")
        transport.sendto(b"through coturn", peer_address)
        data, relayed = await asyncio.wait_for(peer.received.get(), 5)
        assert data == b"through coturn"
        assert relayed == transport.get_extra_info("sockname")
        peer_transport.sendto(b"back", relayed)
        reply, _ = await asyncio.wait_for(protocol.received.get(), 5)
        assert reply == b"back"
    finally:
        transport.close()
        peer_transport.close()
        await asyncio.sleep(0.1)


@pytest.mark.timeout(30)
def test_relay_command_logs_counters_on_sigusr1_and_exits_on_term(
        our_relay: tuple[Address, subprocess.Popen[str]]) -> None:
    address, relay = our_relay
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"\xde\xad" * 20, address)  # garbage, counted
        # Answered after the garbage, on one socket: the relay has counted the garbage.
        sock.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), address)
        sock.recv(2048)
    relay.send_signal(signal.SIGUSR1)
    assert relay.stdout is not None
    lines = []
    for line in relay.stdout:  # up to the SIGUSR1 dump (or the end, if it never comes)
        lines.append(line)
        if "counters (SIGUSR1)" in line:
            break
    relay.send_signal(signal.SIGTERM)
    rest, _ = relay.communicate(timeout=10)
    log = "".join(lines) + rest
    assert relay.returncode == 0
    assert "counters (SIGUSR1)" in log and "counters (exit)" in log
    assert '"not_stun": 1' in log


def test_relay_command_refuses_bad_settings(secret_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--listen", "0.0.0.0:3478", "--secret-file", str(secret_file)], "--relay-ip"),
        (["--listen", "127.0.0.1:3478", "--secret-file", str(empty)], "no secret"),
        (["--listen", "localhost:3478", "--secret-file", str(secret_file)], "IPv4"),
        (["--listen", "127.0.0.1:1", "--secret-file", str(secret_file),
          "--allow-peer", "nonsense"], "nonsense"),
        (["--listen", "127.0.0.1:1", "--secret-file", str(secret_file),
          "--max-credential-lifetime", "0"], "--max-credential-lifetime"),
        (["--listen", "127.0.0.1:1", "--secret-file", str(secret_file),
          "--unauth-rate", "-1"], "negative"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "kbwg.agent.cli", "relay", *args],
                                capture_output=True, text=True, timeout=20,
                                env={**os.environ})
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
