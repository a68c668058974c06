"""The remembered dynamic address on disk: a private file written through a fresh temp
name, read only when it is a regular file."""

from __future__ import annotations

import logging
import os
import stat
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kbwg.agent.claims import PREVIOUS_ADDRESS_FILE, load_previous, save_previous

IP = IPv4Address("100.64.0.7")


def test_saved_file_is_private_and_no_temp_file_is_left(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        save_previous(tmp_path, IP)
    finally:
        os.umask(old)
    path = tmp_path / PREVIOUS_ADDRESS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [PREVIOUS_ADDRESS_FILE]
    assert load_previous(tmp_path) == IP


def test_save_does_not_write_through_a_planted_temp_name(tmp_path: Path) -> None:
    # The old fixed temp name, planted as a link to a file of someone else's choosing.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = (tmp_path / PREVIOUS_ADDRESS_FILE).with_suffix(".tmp")
    planted.symlink_to(victim)
    save_previous(tmp_path, IP)
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink()
    assert load_previous(tmp_path) == IP


def test_save_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / PREVIOUS_ADDRESS_FILE).symlink_to(victim)
    save_previous(tmp_path, IP)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / PREVIOUS_ADDRESS_FILE).is_symlink()
    assert load_previous(tmp_path) == IP


def test_save_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        save_previous(tmp_path / "missing", IP)
    assert "cannot save" in caplog.text and "after a restart" in caplog.text


def test_symlink_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"ip": "100.64.0.9"}\n')
    (tmp_path / PREVIOUS_ADDRESS_FILE).symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING):
        assert load_previous(tmp_path) is None
    assert "symbolic link" in caplog.text


def test_fifo_is_not_read_and_does_not_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / PREVIOUS_ADDRESS_FILE)
    with caplog.at_level(logging.WARNING):
        assert load_previous(tmp_path) is None
    assert "not a regular file" in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b'{"ip": "100.64.0.7"}' + b" " * 5000])
def test_garbage_is_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / PREVIOUS_ADDRESS_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert load_previous(tmp_path) is None
    assert PREVIOUS_ADDRESS_FILE in caplog.text
