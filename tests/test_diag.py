"""`kbwg-agent diag` end to end, as a subprocess, against loopback STUN servers only."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stun_test_server import StunTestServer

from kbwg.agent.diag import (
    ENV_RELAY_SECRET,
    DiagReport,
    RelayReport,
    conclude,
    relay_secret,
    render_report,
)
from kbwg.negotiation.natprobe import NatBehaviour
from kbwg_testing import wait_for

STANDIN = Path(sys.executable).with_name("kbwg-keybase-standin")


async def _diag(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kbwg.agent.cli", "diag", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_json_report_against_a_loopback_server() -> None:
    async with StunTestServer(mapped_ip="127.0.0.9",
                              filtering="address-and-port-dependent") as server:
        code, out, err = await _diag("--json", "--stun", f"127.0.0.1:{server.port}",
                                     "--relay", f"turn:127.0.0.1:{server.port}",
                                     "--timeout", "3")
    assert code == 0, err
    report = json.loads(out)
    assert report["version"] == 1 and report["mode"] == "standalone"
    assert report["udp"] is True
    assert report["mapping"] == "endpoint-independent"
    assert report["filtering"] == "address-and-port-dependent"
    assert report["behind_nat"] is True
    # The whole 127/8 is local: the "public" 127.0.0.9:PORT reaches diag's 0.0.0.0 socket.
    assert report["hairpin"] is True
    assert report["classic"] == "port-restricted-cone"
    port = report["local_port"]
    [stun] = report["stun"]
    assert stun["server"] == f"127.0.0.1:{server.port}"
    assert stun["mapped"] == f"127.0.0.9:{port}"
    assert isinstance(stun["rtt_ms"], float) and stun["error"] is None
    [relay] = report["relays"]
    assert relay["reachable"] is True and relay["url"] == f"turn:127.0.0.1:{server.port}"
    kinds = {c["type"] for c in report["candidates"]}
    assert "srflx" in kinds
    for candidate in report["candidates"]:
        assert set(candidate) >= {"type", "address", "port", "interface", "priority", "source"}
        assert not candidate["address"].startswith("127.") or candidate["type"] == "srflx"
    srflx = next(c for c in report["candidates"] if c["type"] == "srflx")
    assert (srflx["address"], srflx["port"]) == ("127.0.0.9", port)
    assert "port-preserving NAT" in report["conclusion"]
    assert "relay reachable" in report["conclusion"]
    assert {i["name"] for i in report["interfaces"]} >= {"lo"}


async def test_human_output_is_a_readable_table() -> None:
    async with StunTestServer() as server:
        code, out, err = await _diag("--stun", f"127.0.0.1:{server.port}", "--no-classic",
                                     "--timeout", "3")
    assert code == 0, err
    for heading in ("Interfaces", "STUN servers", "NAT behaviour", "Relays", "Candidates",
                    "Conclusion: no NAT"):
        assert heading in out
    assert f"127.0.0.1:{server.port}" in out
    assert "RFC 5780, other address 127.0.0.2:" in out
    assert "Mapping         endpoint-independent (by rfc5780)" in out


async def test_exit_2_when_no_server_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        code, out, _ = await _diag("--json", "--stun", f"127.0.0.1:{port}", "--timeout", "1")
        elapsed = time.monotonic() - started
    assert code == 2
    report = json.loads(out)
    assert report["udp"] is False
    assert report["stun"][0]["mapped"] is None and report["stun"][0]["rtt_ms"] is None
    assert report["conclusion"].startswith("UDP blocked")
    assert elapsed < 10


async def test_no_server_configured_reports_host_candidates_only() -> None:
    code, out, _ = await _diag("--json", "--timeout", "1")
    assert code == 0
    report = json.loads(out)
    assert report["udp"] is None and report["stun"] == []
    assert report["mapping"] == "unknown" and report["filtering"] == "unknown"
    assert {c["type"] for c in report["candidates"]} <= {"host"}
    assert report["conclusion"].startswith("no STUN server configured")


async def test_usage_errors_exit_1() -> None:
    code, _, err = await _diag("--stun", "127.0.0.1:0")
    assert code == 1 and "port" in err
    code, _, err = await _diag("--relay", "http://x")
    assert code == 1 and "turn:" in err


@pytest.mark.skipif(not STANDIN.exists(), reason="keybase stand-in not installed")
async def test_servers_from_the_team_config(tmp_path: Path) -> None:
    async with StunTestServer() as server:
        folder = tmp_path / "kbfs" / "team" / "t1"
        folder.mkdir(parents=True)
        (folder / "kbwg.json").write_text(json.dumps({
            "stun": [f"127.0.0.1:{server.port}"],
            "relays": [{"url": f"turn:127.0.0.2:{server.port}", "secret": "s"}],
        }))
        env = {"KBWG_STANDIN_HOME": str(tmp_path), "KBWG_STANDIN_USER": "alice",
               "KBWG_STANDIN_DEVICE": "laptop", "KBWG_KEYBASE": str(STANDIN)}
        code, out, err = await _diag("--json", "--team", "t1", "--no-classic",
                                     "--timeout", "3", env=env)
    assert code == 0, err
    report = json.loads(out)
    assert report["config_source"] == "team t1 kbwg.json"
    assert report["stun"][0]["server"] == f"127.0.0.1:{server.port}"
    assert report["relays"][0]["reachable"] is True


def test_conclusions() -> None:
    def conclusion(relay: bool = True, **nat: Any) -> str:
        report = DiagReport(local_port=1, config_source="x", nat=NatBehaviour(**nat))
        if relay:
            report.relays = [RelayReport(server="r", rtt_ms=3.0)]
        return conclude(report)

    assert "symmetric NAT" in conclusion(udp=True, behind_nat=True,
                                         mapping="endpoint-dependent")
    assert "will be relayed" in conclusion(udp=True, behind_nat=True,
                                           mapping="endpoint-dependent")
    assert "full-cone" in conclusion(udp=True, behind_nat=True,
                                     mapping="endpoint-independent",
                                     filtering="endpoint-independent")
    assert "mapping unknown" in conclusion(udp=True, behind_nat=True)
    assert "no relay configured" in conclusion(relay=False, udp=True, behind_nat=False)


def test_render_without_servers() -> None:
    text = render_report(DiagReport(local_port=5, config_source="command line",
                                    nat=NatBehaviour()).to_json())
    assert "none configured" in text and "Conclusion: no STUN server configured" in text


def test_render_with_a_relay_does_not_say_none_configured() -> None:
    report = DiagReport(local_port=5, config_source="command line", nat=NatBehaviour(),
                        relays=[RelayReport("203.0.113.3:3478", rtt_ms=4.0,
                                            url="turn:203.0.113.3")])
    text = render_report(report.to_json())
    relays = text.split("Relays", 1)[1].split("\n\n", 1)[0]
    assert "turn:203.0.113.3" in relays and "none configured" not in relays, relays


def _free_port_pair() -> int:
    for _ in range(50):
        socks = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            for ip, p in (("127.0.0.1", port + 1), ("127.0.0.2", port),
                          ("127.0.0.2", port + 1)):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((ip, p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn's turnserver is not installed")
    port = _free_port_pair()
    proc = subprocess.Popen(
        [binary, "-n", "-L", "127.0.0.1", "-L", "127.0.0.2", "-p", str(port),
         "--alt-listening-port", str(port + 1), "--stun-only", "--no-auth", "--no-cli",
         "--no-tls", "--no-dtls", "--log-file", "stdout", "--simple-log",
         "--pidfile", str(tmp_path / "turnserver.pid")],
        stdout=(tmp_path / "turnserver.log").open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_against_a_real_coturn(coturn: int) -> None:
    errors: list[str] = []

    async def udp_report() -> dict[str, Any] | None:
        _code, out, err = await _diag("--json", "--stun", f"127.0.0.1:{coturn}",
                                     "--timeout", "2")
        errors.append(err)
        report: dict[str, Any] = json.loads(out)
        return report if report["udp"] else None

    # coturn needs a moment to open its listeners.
    report = await wait_for(udp_report, "coturn to answer diag", timeout=40, interval=0.2)
    assert report["udp"] is True, errors[-1]
    assert report["stun"][0]["other_address"] == f"127.0.0.2:{coturn + 1}"
    assert report["mapping"] == "endpoint-independent"
    assert report["mapping_method"] == "rfc5780"
    assert report["filtering"] == "endpoint-independent"
    assert report["classic"] == "open-internet"
    assert report["behind_nat"] is False


# -- the relays' secret ----------------------------------------------------------


def test_relay_secret_sources(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("  from-file\n")
    env = {ENV_RELAY_SECRET: "from-env"}
    assert relay_secret(None, str(secret_file), env) == ("from-file", None)
    assert relay_secret(None, None, env) == ("from-env", None)
    assert relay_secret(None, None, {}) == ("", None)
    secret, warning = relay_secret("from-flag", None, env)
    assert secret == "from-flag"
    assert warning is not None and "process list" in warning
    assert "--relay-secret-file" in warning and ENV_RELAY_SECRET in warning


@pytest.mark.parametrize(("content", "error"), [
    (None, "cannot read --relay-secret-file"),
    (b" \n", "holds no secret"),
    (b"\xff\xfe", "not UTF-8"),
    (b"x" * 70000, "only the relays' secret"),
])
def test_unusable_relay_secret_file(tmp_path: Path, content: bytes | None, error: str) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=error):
        relay_secret(None, str(path), {})


async def test_secret_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    code, out, err = await _diag("--json", "--timeout", "1", "--relay-secret", "s3cret")
    assert code == 0, err
    assert "warning: --relay-secret puts the secret in the process list" in err
    assert "s3cret" not in out + err
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n")
    code, _, err = await _diag("--json", "--timeout", "1", "--relay-secret-file",
                               str(secret_file))
    assert code == 0 and "warning" not in err, err
    code, _, err = await _diag("--json", "--timeout", "1", env={ENV_RELAY_SECRET: "s3cret"})
    assert code == 0 and "warning" not in err, err


async def test_unreadable_secret_file_exits_1(tmp_path: Path) -> None:
    code, _, err = await _diag("--relay-secret-file", str(tmp_path / "missing"))
    assert code == 1 and "cannot read --relay-secret-file" in err
    code, _, err = await _diag("--relay-secret", "a", "--relay-secret-file", "b")
    assert code == 2 and "not allowed with" in err
