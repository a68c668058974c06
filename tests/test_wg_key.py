"""The WireGuard key kept in the state dir: the same one at the next start, a new one for
another device or team, on request, or when the file is not what the agent wrote."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import pytest

from kbwg.agent.wg_key import KEY_FILE, kept_private_key
from kbwg.core.identity import DeviceId

ME = DeviceId("alice", "laptop")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def test_the_next_start_gets_the_same_key_from_a_private_file(state_dir: Path) -> None:
    first = kept_private_key(state_dir, ME, "team")
    assert os.stat(state_dir / KEY_FILE).st_mode & 0o777 == 0o600
    assert bytes(kept_private_key(state_dir, ME, "team")) == bytes(first)


@pytest.mark.parametrize(("me", "team"), [(DeviceId("alice", "desk"), "team"),
                                          (DeviceId("bob", "laptop"), "team"),
                                          (ME, "other-team")])
def test_another_device_or_team_gets_a_new_key(state_dir: Path, me: DeviceId,
                                               team: str) -> None:
    first = kept_private_key(state_dir, ME, "team")
    second = kept_private_key(state_dir, me, team)
    assert bytes(second) != bytes(first)
    # The file is now the new owner's.
    assert bytes(kept_private_key(state_dir, me, team)) == bytes(second)


def test_new_key_replaces_the_kept_one(state_dir: Path) -> None:
    first = kept_private_key(state_dir, ME, "team")
    second = kept_private_key(state_dir, ME, "team", new=True)
    assert bytes(second) != bytes(first)
    assert bytes(kept_private_key(state_dir, ME, "team")) == bytes(second)


def _kept(key: bytes) -> str:
    return json.dumps({"team": "team", "device": "alice/laptop",
                       "private_key": base64.b64encode(key).decode()})


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[1, 2]", b'{"team": "team", "device": "alice/laptop"}',
    _kept(b"short").encode(),
    json.dumps({"team": "team", "device": "alice/laptop", "private_key": "!!"}).encode(),
    json.dumps({"team": "team", "device": "alice/laptop", "private_key": 5}).encode(),
    b"\xff\xfe", b"{" * 100_000,
], ids=["empty", "not-json", "list", "no-key", "short-key", "not-base64", "number",
        "not-utf8", "too-large"])
def test_a_broken_file_gives_a_new_key_and_a_warning(
        state_dir: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = state_dir / KEY_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        key = kept_private_key(state_dir, ME, "team")
    assert f"ignoring {path}" in caplog.text
    assert bytes(kept_private_key(state_dir, ME, "team")) == bytes(key)  # now kept


def test_a_key_others_could_read_is_not_used(state_dir: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    first = kept_private_key(state_dir, ME, "team")
    (state_dir / KEY_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING):
        second = kept_private_key(state_dir, ME, "team")
    assert bytes(second) != bytes(first)
    assert "others may have read it (mode 0644)" in caplog.text
    assert os.stat(state_dir / KEY_FILE).st_mode & 0o777 == 0o600


def test_a_link_or_a_fifo_is_never_read(state_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(_kept(bytes(range(32))))
    elsewhere.chmod(0o600)
    (state_dir / KEY_FILE).symlink_to(elsewhere)
    key = kept_private_key(state_dir, ME, "team")
    assert bytes(key) != bytes(range(32))
    assert elsewhere.read_text() == _kept(bytes(range(32)))  # not written through the link
    (state_dir / KEY_FILE).unlink()
    os.mkfifo(state_dir / KEY_FILE, 0o600)
    assert bytes(kept_private_key(state_dir, ME, "team")) != bytes(key)  # did not block


def test_a_key_that_cannot_be_kept_still_starts(state_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    missing = state_dir / "gone"
    with caplog.at_level(logging.WARNING):
        key = kept_private_key(missing, ME, "team")
    assert len(bytes(key)) == 32
    assert "cannot keep the WireGuard key" in caplog.text
