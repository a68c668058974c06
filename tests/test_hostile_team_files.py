"""A hostile team writer: peers.json and kbwg.json in KBFS hold whatever they like.

Writers choose who is listed and where, and the STUN and relay servers. They must not
make an agent read without end, spend its CPU on a file, fill its log, hang its loop,
or send every device of the team at more servers than a normal configuration names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from test_daemon import PEERS, STANDIN, TEAM, FakeOwner, env_for, no_routes
from test_keybase_client import write_script

from kbwg.agent import keybase as keybase_module
from kbwg.agent.daemon import Agent, JoinError, JoinOptions
from kbwg.agent.keybase import KeybaseClient, KeybaseError
from kbwg.agent.peers_file import PEERS_MAX_ENTRIES, PeersError, parse_peers
from kbwg.agent.team_view import TeamView
from kbwg.agent.teamconfig import (
    INTERFACE_EXCLUDE_MAX,
    RELAYS_MAX,
    STUN_MAX,
    RelayConfig,
    TeamConfig,
    TeamConfigError,
    parse_team_config,
    tls_context,
)

LIMIT = keybase_module.FS_READ_MAX_BYTES
# What an error message may quote of a writer's text, and then some for the wording.
MESSAGE_MAX = 400


def team_file(home: Path, name: str, data: str | bytes) -> None:
    path = home / "kbfs" / "team" / TEAM / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def padded(doc: Any, size: int) -> str:
    """`doc` as JSON, padded with spaces (still valid JSON) to `size` characters."""
    text = json.dumps(doc)
    return text + " " * (size - len(text))


# --- 1. size: `keybase fs read` is read up to a limit ----------------------------------


def test_the_limit_is_a_mebibyte() -> None:
    assert LIMIT == 1024 * 1024


async def test_an_endless_file_is_not_read_whole(tmp_path: Path) -> None:
    """`fs read` that goes on writing (a file far over the limit, or one being written):
    the client stops at the limit and says so, at once, instead of buffering everything
    until its call time-out and then taking Keybase for down."""
    binary = write_script(tmp_path / "keybase", (
        "import sys, time\n"
        "if sys.argv[1:3] == ['fs', 'read']:\n"
        "    sys.stdout.buffer.write(b' ' * (3 * 1024 * 1024))\n"
        "    sys.stdout.buffer.flush()\n"
        "    time.sleep(60)\n"))
    client = KeybaseClient(binary, call_timeout=10.0)
    path = f"/keybase/team/{TEAM}/peers.json"
    started = time.monotonic()
    try:
        with pytest.raises(KeybaseError) as raised:
            await client.fs_read(path)
    finally:
        await client.close()
    assert time.monotonic() - started < 8.0, "stopped at the limit, not at the time-out"
    message = str(raised.value)
    assert path in message and "1 MiB" in message, message
    assert client.link.connected, "Keybase answered: an oversized file is no outage"


async def test_a_file_at_the_limit_is_read_and_one_byte_more_is_refused(
        tmp_path: Path) -> None:
    home = tmp_path / "kb"
    client = KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop"))
    path = f"/keybase/team/{TEAM}/kbwg.json"
    try:
        team_file(home, "kbwg.json", b"x" * LIMIT)
        assert len(await client.fs_read(path)) == LIMIT
        team_file(home, "kbwg.json", b"x" * (LIMIT + 1))
        with pytest.raises(KeybaseError, match=re.escape(path) + ".*1 MiB"):
            await client.fs_read(path)
    finally:
        await client.close()


async def join_refused(tmp_path: Path, home: Path) -> str:
    """`join` as alice/laptop stops with a JoinError (within 30 s); its message."""
    owner = FakeOwner()

    async def factory(_command: list[str] | None) -> Any:
        return owner

    agent = Agent(JoinOptions(team=TEAM, state_dir=tmp_path, endpoint="198.18.0.5"),
                  KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop")),
                  owner_factory=factory, routes=no_routes)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        with pytest.raises(JoinError) as raised:
            await asyncio.wait_for(asyncio.shield(task), 30)
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 10)
    assert not any(op == "create" for op, _ in owner.calls)
    return str(raised.value)


@pytest.mark.parametrize("name", ["peers.json", "kbwg.json"])
async def test_an_oversized_team_file_stops_join_saying_what_to_fix(
        tmp_path: Path, name: str) -> None:
    home = tmp_path / "kb"
    team_file(home, "peers.json", json.dumps(PEERS))
    # Valid JSON, only too big: read whole it would have been used.
    team_file(home, name, padded(PEERS if name == "peers.json" else {}, LIMIT + 1))
    message = await join_refused(tmp_path / "state", home)
    assert f"cannot use /keybase/team/{TEAM}/{name}" in message
    assert "1 MiB" in message and "smaller" in message, message


async def test_an_oversized_peers_json_at_refresh_keeps_the_last_good_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "kb"
    client = KeybaseClient(STANDIN, env=env_for(home, "alice", "laptop"))
    team = TeamView(client, TEAM, TeamConfig())
    try:
        team_file(home, "peers.json", json.dumps(PEERS))
        await team.read_peers_file(strict=True)
        assert len(team.entries) == 3
        team_file(home, "peers.json", padded(PEERS[:1], LIMIT + 1))
        with caplog.at_level(logging.WARNING):
            await team.read_peers_file(strict=False)
    finally:
        await client.close()
    assert len(team.entries) == 3
    assert "keeping the previous peer list" in caplog.text and "1 MiB" in caplog.text


# --- 2. what an error message quotes of the file is bounded ----------------------------


@pytest.mark.parametrize("entry", [
    {"username": "alice", "device": "laptop", "ip": "1" * 100_000},
    {"username": "a" * 100_000, "device": "b" * 100_000, "ip": "10.0.0.1"},
    {"username": "a" * 100_000, "device": "laptop", "ip": "100.64.0.0"},
])
def test_peers_json_errors_quote_a_bounded_part_of_the_entry(entry: dict[str, str]) -> None:
    # peers.json is read again at every refresh (30 s) and a broken one logged each
    # time: a 1 MiB value in the line was a gigabyte of log a day.
    with pytest.raises(PeersError) as raised:
        parse_peers(json.dumps([entry]))
    assert len(str(raised.value)) < MESSAGE_MAX, str(raised.value)[:200]
    assert str(raised.value).startswith("peers.json entry 1")


@pytest.mark.parametrize("doc", [
    {"policy": "x" * 100_000},
    {"policy": [[["x" * 1000] * 100] * 100]},
    {"overlay": "1" * 100_000},
    {"dynamic_range": ["x" * 100_000]},
    {"announce_channel": "a" * 100_000},
    {"stun": ["a" * 100_000 + ":0"]},
    {"stun": ["[" + "a" * 100_000]},
    {"relays": [{"url": "turn:h:1?" + "x=1&" * 25_000, "secret": "s"}]},
    {"relays": [{"url": "turn:h:1?transport=" + "x" * 100_000, "secret": "s"}]},
])
def test_kbwg_json_errors_quote_a_bounded_part_of_the_value(doc: dict[str, Any]) -> None:
    with pytest.raises(TeamConfigError) as raised:
        parse_team_config(json.dumps(doc))
    assert len(str(raised.value)) < MESSAGE_MAX, str(raised.value)[:200]


def test_unknown_keys_are_one_bounded_line(caplog: pytest.LogCaptureFixture) -> None:
    # kbwg.json is read at start-up, at every SIGHUP and after every Keybase outage.
    doc: dict[str, Any] = {f"future{i}" + "x" * 200: i for i in range(5000)}
    doc["relays"] = [{"url": "turn:198.51.100.1", "secret": "s",
                      **{f"k{i}": i for i in range(5000)}}]
    with caplog.at_level(logging.WARNING, logger="kbwg.agent.teamconfig"):
        config = parse_team_config(json.dumps(doc))
    assert len(config.relays) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, len(lines)
    assert all(len(line) < MESSAGE_MAX for line in lines), [line[:200] for line in lines]
    assert "future0" in lines[0] and "and 4997 more" in lines[0]
    assert "'relays' item 1" in lines[1] and "k0" in lines[1]


# --- 3. counts ------------------------------------------------------------------------


def test_stun_servers_past_the_cap_are_ignored_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every device sends its gathering's Binding requests to every STUN server listed:
    thousands of them (or one victim listed a thousand times) made the whole team a
    traffic source at a writer's choice."""
    servers = [f"198.51.100.{i}:3478" for i in range(1, 201)]
    with caplog.at_level(logging.WARNING):
        config = parse_team_config(json.dumps({"stun": servers}))
    assert STUN_MAX == 8
    assert [f"{s.host}:{s.port}" for s in config.stun] == servers[:STUN_MAX]
    assert f"only the first {STUN_MAX}" in caplog.text and "192 more" in caplog.text


def test_relay_entries_past_the_cap_are_ignored_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    # Each entry is a TURN allocation (UDP, TCP or TLS) from every device, kept alive.
    relays: list[dict[str, Any]] = [{"url": f"turn:198.51.100.{i}", "secret": "s"}
                                     for i in range(1, 201)]
    # Entries past the cap are not read at all (a broken one there is no error).
    relays.append({"url": 5})
    with caplog.at_level(logging.WARNING):
        config = parse_team_config(json.dumps({"relays": relays}))
    assert RELAYS_MAX == 12
    assert [r.host for r in config.relays] == [f"198.51.100.{i}"
                                              for i in range(1, RELAYS_MAX + 1)]
    assert f"only the first {RELAYS_MAX}" in caplog.text and "189 more" in caplog.text


def test_interface_exclude_is_bounded() -> None:
    """Every gathering matches each address's interface against every pattern: 100,000
    patterns (fnmatch's cache holds 32,768) took minutes of the event loop."""
    many = [f"x{i}*" for i in range(INTERFACE_EXCLUDE_MAX + 1)]
    with pytest.raises(TeamConfigError, match=rf"'interface_exclude'.*at most "
                                              rf"{INTERFACE_EXCLUDE_MAX}"):
        parse_team_config(json.dumps({"interface_exclude": many}))
    config = parse_team_config(json.dumps({"interface_exclude": many[:-1]}))
    assert len(config.interface_exclude) == INTERFACE_EXCLUDE_MAX
    with pytest.raises(TeamConfigError, match=r"'interface_exclude' item 2: .*64"):
        parse_team_config(json.dumps({"interface_exclude": ["wg*", "*a" * 40]}))


def test_host_names_longer_than_dns_allows_are_refused() -> None:
    # Short labels pass the IDNA check at any length; the name went into every log line
    # about that server.
    long_name = "a." * 127  # 254 characters
    with pytest.raises(TeamConfigError, match="not a valid host name"):
        parse_team_config(json.dumps({"stun": [f"{long_name}:3478"]}))
    with pytest.raises(TeamConfigError, match="not a valid host name"):
        parse_team_config(json.dumps({"relays": [{"url": f"turn:{long_name}",
                                                  "secret": "s"}]}))
    ok = "a." * 126 + "b"  # 253
    assert parse_team_config(json.dumps({"stun": [ok]})).stun[0].host == ok


def test_peers_json_over_the_cap_is_refused() -> None:
    """Each peer sync (5 s) builds a peer for every listed device, and the device owner
    takes no more peers than this."""
    overlay = IPv4Network("100.64.0.0/10")
    entries = [{"username": f"u{i}", "device": "d", "ip": str(overlay[i + 1])}
               for i in range(PEERS_MAX_ENTRIES + 1)]
    assert len(parse_peers(json.dumps(entries[:-1]))) == PEERS_MAX_ENTRIES
    with pytest.raises(PeersError, match=rf"{PEERS_MAX_ENTRIES + 1} entries.*at most "
                                         rf"{PEERS_MAX_ENTRIES}"):
        parse_peers(json.dumps(entries))


# --- ca_file: a path every device opens ------------------------------------------------


def _relay(ca_file: str) -> RelayConfig:
    return RelayConfig("turns:192.0.2.1", "192.0.2.1", 5349, "s", "tls", ca_file=ca_file)


async def test_a_fifo_as_ca_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """OpenSSL opened it in the event loop and waited for a writer: the agent hung."""
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    try:
        with pytest.raises(ValueError, match=r"'ca_file'.*not a regular file"):
            await asyncio.wait_for(asyncio.to_thread(tls_context, _relay(str(fifo))), 5)
    finally:
        # Unblocks a reader left waiting (before the fix), so that its thread ends.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("name", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_ca_file_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"'ca_file'.*not a regular file"):
        tls_context(_relay(name))


def test_a_huge_ca_file_is_refused(tmp_path: Path) -> None:
    # ca_file may live in the team's KBFS folder, which writers fill as they like.
    path = tmp_path / "ca.pem"
    path.write_bytes(b"#" * (LIMIT + 1))
    with pytest.raises(ValueError, match=r"'ca_file'.*1 MiB"):
        tls_context(_relay(str(path)))


def test_a_value_quoted_in_an_error_has_no_terminal_controls() -> None:
    """A broken peers.json is logged at every refresh: what it quotes is inert."""
    entries = [{"username": "u", "device": "d", "ip": "\x1b]0;pwned\x07" + "x" * 100}]
    with pytest.raises(PeersError) as caught:
        parse_peers(json.dumps(entries))
    message = str(caught.value)
    assert "\x1b" not in message and "\\x1b]0;pwned\\x07" in message, message
    assert "(110 characters)" in message, message
