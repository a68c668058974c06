"""install-helper's pure parts: requirements, the script, the ownership rules, the options.

The install itself (venv, pip, sudo) runs in netns-tests/test_sudo_helper.py.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from kbwg.agent import install_helper
from kbwg.agent.install_helper import (
    InstallError,
    check_root_only,
    helper_script,
    owner_requirements,
    sudoers_instructions,
    unsafe_reason,
)

REPO = Path(__file__).resolve().parent.parent


def _stat(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def _fake_lstat(table: dict[str, os.stat_result]) -> install_helper.Lstat:
    def lstat(path: str) -> os.stat_result:
        if path not in table:
            raise FileNotFoundError(path)
        return table[path]

    return lstat


DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o755


def test_owner_requirements_keep_the_project_floors_and_nothing_else(tmp_path: Path) -> None:
    reqs = owner_requirements(REPO / "pyproject.toml")
    assert [r.split(">")[0] for r in reqs] == ["msgpack", "pynacl", "pyroute2"]
    assert all(">=" in r for r in reqs)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "kbwg-agent"\ndependencies = ["PyNaCl >= 9", "msgpack"]\n')
    with pytest.raises(InstallError, match="does not declare pyroute2"):
        owner_requirements(tmp_path / "pyproject.toml")


def test_helper_script_runs_the_venv_python_isolated() -> None:
    assert helper_script(Path("/usr/local/lib/kbwg-owner")) == (
        "#!/usr/local/lib/kbwg-owner/bin/python3 -I\n"
        "from kbwg.owner.main import main\nmain()\n"
    )


def test_root_owned_folders_pass() -> None:
    lstat = _fake_lstat({"/": _stat(DIR), "/usr": _stat(DIR), "/usr/x": _stat(FILE)})
    assert check_root_only(["/usr/x"], lstat) == []


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (_stat(stat.S_IFDIR | 0o775), "/usr is writable by its group or by others (mode 775)"),
        (_stat(stat.S_IFDIR | 0o757), "/usr is writable by its group or by others (mode 757)"),
        # Sticky /tmp-like folders too: the sudoers rule outlives a tmp cleaner.
        (_stat(stat.S_IFDIR | 0o1777), "/usr is writable by its group or by others (mode 1777)"),
        (_stat(DIR, uid=1000), "/usr is owned by uid 1000, not root"),
    ],
)
def test_a_parent_others_could_change_is_refused(entry: os.stat_result, reason: str) -> None:
    lstat = _fake_lstat({"/": _stat(DIR), "/usr": entry, "/usr/x": _stat(FILE)})
    assert check_root_only(["/usr/x"], lstat) == [reason]


def test_the_path_itself_and_a_missing_path() -> None:
    lstat = _fake_lstat({"/": _stat(DIR), "/x": _stat(stat.S_IFREG | 0o777)})
    assert unsafe_reason("/x", lstat) == "/x is writable by its group or by others (mode 777)"
    assert unsafe_reason("/y", lstat) == "/y does not exist"


def test_symlinked_paths_are_checked_where_they_lead(tmp_path: Path) -> None:
    # On the real file system: the link's target folder is checked, not only the link's.
    target = tmp_path / "real"
    target.mkdir()
    (target / "python3").touch()
    link = tmp_path / "link"
    link.symlink_to(target)
    seen: list[str] = []

    def lstat(path: str) -> os.stat_result:
        seen.append(path)
        return _stat(DIR)

    assert check_root_only([str(link / "python3")], lstat) == []
    assert str(link) in seen and str(target) in seen and str(target / "python3") in seen


def test_sudoers_instructions_stage_check_then_install() -> None:
    text = sudoers_instructions("alice", Path("/usr/local/libexec/kbwg-owner"))
    line = 'alice ALL=(root) NOPASSWD: /usr/local/libexec/kbwg-owner ""'
    assert f"    {line}\n" in text
    assert (f"printf '%s\\n' '{line}' | sudo tee /etc/sudoers.d/kbwg-owner.new >/dev/null"
            in text)  # fmt: skip
    assert ("sudo chmod 0440 /etc/sudoers.d/kbwg-owner.new && sudo visudo -cf "
            "/etc/sudoers.d/kbwg-owner.new && sudo mv /etc/sudoers.d/kbwg-owner.new "
            "/etc/sudoers.d/kbwg-owner") in text  # fmt: skip


def _args(**over: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    install_helper.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in over.items():
        setattr(args, key, value)
    return args


def test_options_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    options = install_helper.options_from(_args())
    assert options.prefix == Path("/usr/local/lib/kbwg-owner")
    assert options.helper == Path("/usr/local/libexec/kbwg-owner")
    assert options.source == REPO
    assert options.user == "alice"
    monkeypatch.delenv("SUDO_USER")
    assert install_helper.options_from(_args()).user == "<user>"


def test_options_refuse_relative_paths_and_a_non_project_source(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="--helper must be an absolute path"):
        install_helper.options_from(_args(helper=Path("kbwg-owner")))
    with pytest.raises(InstallError, match=r"holds no kbwg-agent pyproject\.toml"):
        install_helper.options_from(_args(source=tmp_path))


def test_not_root_is_told_to_use_sudo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(install_helper.os, "geteuid", lambda: 1000)
    assert install_helper.run(_args()) == 1
    assert "must itself run as root: sudo kbwg-agent install-helper" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a root-owned file")
def test_write_helper_replaces_atomically(tmp_path: Path) -> None:
    helper = tmp_path / "libexec" / "kbwg-owner"
    install_helper.write_helper(helper, Path("/opt/a"))
    install_helper.write_helper(helper, Path("/opt/b"))
    assert helper.read_text().startswith("#!/opt/b/bin/python3 -I\n")
    info = helper.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o755)
    assert os.listdir(helper.parent) == ["kbwg-owner"]  # no temp file left
