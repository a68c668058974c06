"""How the agent finds and starts the device owner: the helper path, sudo, and the hints."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kbwg.agent import cli, owner_client
from kbwg.agent.owner_client import (
    DEFAULT_HELPER,
    DeviceOwner,
    OwnerStartError,
    helper_path,
    owner_command,
    sudoers_line,
)


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    path = tmp_path / "libexec" / "kbwg-owner"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def _as(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    monkeypatch.setattr(owner_client.os, "geteuid", lambda: uid)


def test_helper_path_flag_then_variable_then_default() -> None:
    assert helper_path(None, {}) == DEFAULT_HELPER == "/usr/local/libexec/kbwg-owner"
    assert helper_path(None, {"KBWG_OWNER": "/opt/owner"}) == "/opt/owner"
    assert helper_path("/srv/owner", {"KBWG_OWNER": "/opt/owner"}) == "/srv/owner"


def test_not_root_runs_the_helper_through_sudo_with_no_arguments(
    monkeypatch: pytest.MonkeyPatch, helper: Path
) -> None:
    _as(monkeypatch, 1000)
    assert owner_command(str(helper), {}) == ["sudo", "-n", str(helper)]
    assert owner_command(None, {"KBWG_OWNER": str(helper)}) == ["sudo", "-n", str(helper)]


def test_not_root_without_the_helper_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _as(monkeypatch, 1000)
    monkeypatch.setattr(owner_client.os.path, "exists", lambda path: False)
    with pytest.raises(OwnerStartError) as info:
        owner_command(None, {})
    message = str(info.value)
    assert f"{DEFAULT_HELPER} is not installed" in message
    assert "    sudo kbwg-agent install-helper\n" in message
    assert f'ALL=(root) NOPASSWD: {DEFAULT_HELPER} ""' in message

    missing = tmp_path / "elsewhere" / "kbwg-owner"
    with pytest.raises(OwnerStartError) as info:
        owner_command(str(missing), {})
    assert f"sudo kbwg-agent install-helper --helper {missing}\n" in str(info.value)
    assert f'NOPASSWD: {missing} ""' in str(info.value)


def test_root_runs_the_installed_helper_directly(
    monkeypatch: pytest.MonkeyPatch, helper: Path
) -> None:
    _as(monkeypatch, 0)
    assert owner_command(str(helper), {}) == [str(helper)]
    assert owner_command(None, {"KBWG_OWNER": str(helper)}) == [str(helper)]


def test_root_without_the_helper_runs_its_own_python_isolated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _as(monkeypatch, 0)
    monkeypatch.setattr(owner_client, "DEFAULT_HELPER", "/nonexistent/kbwg-owner")
    with caplog.at_level(logging.INFO, logger=owner_client.__name__):
        command = owner_command(None, {})
    assert command == [sys.executable, "-I", "-m", "kbwg.owner"]
    assert "/nonexistent/kbwg-owner is not installed" in caplog.text
    assert f"{sys.executable} -I -m kbwg.owner" in caplog.text


def test_root_with_a_named_but_missing_helper_does_not_fall_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A path the user chose is not silently replaced by another program.
    _as(monkeypatch, 0)
    assert owner_command("/nonexistent/owner", {}) == ["/nonexistent/owner"]
    assert owner_command(None, {"KBWG_OWNER": "/nonexistent/o"}) == ["/nonexistent/o"]


def test_sudoers_line_allows_no_arguments() -> None:
    assert sudoers_line("alice") == 'alice ALL=(root) NOPASSWD: /usr/local/libexec/kbwg-owner ""'


async def test_sudo_password_failure_explains_the_fix(tmp_path: Path) -> None:
    fake_sudo = tmp_path / "sudo"
    fake_sudo.write_text("#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    fake_sudo.chmod(0o755)
    with pytest.raises(OwnerStartError) as info:
        await DeviceOwner.start([str(fake_sudo), "-n", "/opt/kbwg/kbwg-owner"])
    message = str(info.value)
    assert "a password is required" in message
    assert "run the agent as root" in message
    assert "sudo kbwg-agent install-helper --helper /opt/kbwg/kbwg-owner" in message
    assert 'ALL=(root) NOPASSWD: /opt/kbwg/kbwg-owner ""' in message
    assert "kbwg.agent.owner" not in message and "-m kbwg" not in message


async def test_missing_sudo_explains_the_fix() -> None:
    with pytest.raises(OwnerStartError, match="sudo is not installed") as info:
        await DeviceOwner.start(["/nonexistent/sudo", "-n", DEFAULT_HELPER])
    assert "sudo kbwg-agent install-helper\n" in str(info.value)


async def test_missing_program() -> None:
    with pytest.raises(OwnerStartError, match="cannot run /nonexistent/kbwg-owner"):
        await DeviceOwner.start(["/nonexistent/kbwg-owner"])


# `join --owner` and $KBWG_OWNER reach the agent's options.


class _FakeAgent:
    seen: ClassVar[list[Any]] = []

    def __init__(self, options: Any, keybase: Any, owner_factory: Any = None) -> None:
        self.seen.append(options)

    async def run(self, stop: Any) -> None:
        return None

    def reload(self) -> None:
        """SIGHUP's handler; never called here."""


@pytest.fixture
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from kbwg.agent import daemon

    seen: list[Any] = []
    monkeypatch.setattr(_FakeAgent, "seen", seen)
    monkeypatch.setattr(daemon, "Agent", _FakeAgent)
    # The state dir checks its owner against the (faked) uid; not what is tested here.
    monkeypatch.setattr(cli, "lock_state_dir", lambda path: io.StringIO())
    monkeypatch.delenv("KBWG_OWNER", raising=False)

    async def no_owner(command: Any) -> Any:
        raise owner_client.OwnerStartError("join starts the owner early; not in this test")

    monkeypatch.setattr(owner_client.DeviceOwner, "start", no_owner)
    return seen


def _join(tmp_path: Path, *extra: str) -> int:
    return cli.main(["join", "team", "--keybase", "/bin/true",
                     "--state-dir", str(tmp_path / "state"), *extra])  # fmt: skip


def test_join_owner_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, helper: Path, fake_agent: list[Any]
) -> None:
    _as(monkeypatch, 1000)
    assert _join(tmp_path, "--owner", str(helper)) == 0
    monkeypatch.setenv("KBWG_OWNER", str(helper))
    assert _join(tmp_path) == 0
    assert [options.owner_command for options in fake_agent] == [["sudo", "-n", str(helper)]] * 2


def test_join_without_the_helper_fails_before_starting(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fake_agent: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _as(monkeypatch, 1000)
    assert _join(tmp_path, "--owner", str(tmp_path / "missing")) == 1
    assert fake_agent == []
    assert "sudo kbwg-agent install-helper --helper" in capsys.readouterr().err
