"""The device owner for an unprivileged agent: `install-helper`, the README's sudoers rule
and `sudo -n`, end to end, and the helper's isolation from the caller's import path.

Nothing here changes the machine. The helper is installed into a root-owned folder that
is bound over /usr/local only in private mount namespaces, so it sits at its default
paths there; a test user and the sudoers rule exist only in those namespaces too (temp
copies of /etc/passwd and /etc/group, a temp /etc/shadow holding only that user and a
temp /etc/sudoers.d are bound over the real ones). Every command that needs them runs
behind MOUNTS, inside `ip netns exec` (a fresh mount namespace per command) or
`unshare --mount`: the mounts end with the command.
"""

from __future__ import annotations

import grp
import os
import pwd
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from kbwg.owner.frames import FrameDecoder, encode_frame
from kbwg_testing import wait_until
from kbwg_world import World
from kbwg_world.netns import namespace_pids
from kbwg_world.team import AGENT, STANDIN, Team

pytestmark = pytest.mark.netns

HELPER = "/usr/local/libexec/kbwg-owner"
DEVICES = [("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2")]
PRIVATE = ["unshare", "--mount", "--propagation", "private"]

# $0 is the setup folder; the rest of the arguments are the command to exec.
_MOUNT_SCRIPT = """set -e
b=$0
mount --bind "$b/usrlocal" /usr/local
mount --bind "$b/etc/passwd" /etc/passwd
mount --bind "$b/etc/group" /etc/group
mount --bind "$b/etc/shadow" /etc/shadow
mount --bind "$b/sudoers.d" /etc/sudoers.d
if [ -e "$b/sudoers" ]; then mount --bind "$b/sudoers" /etc/sudoers; fi
"""

FAKE_CODE = "open({marker!r}, 'a').write(__name__ + '\\n')\n"


def readme_line(user: str) -> str:
    """The sudoers line the README gives, for `user`."""
    return f'{user} ALL=(root) NOPASSWD: {HELPER} ""'


@dataclass
class SudoSetup:
    base: Path
    user: str
    uid: int
    mounts: list[str]  # argv prefix: set up the mounts, then exec the rest
    install_output: str

    @property
    def as_user(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]

    def user_dir(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(mode=0o700)
        os.chown(path, self.uid, self.uid)
        return path


def _free_id() -> int:
    while True:
        candidate = random.randrange(30000, 60000)
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
        except KeyError:
            return candidate


def _hidden_ancestor(path: Path) -> Path | None:
    """The highest folder above `path` that other users cannot enter, if any."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _expose_python(base: Path) -> str:
    """Mount commands that let any user run this Python (pyenv lives under /root, 0700):
    an empty tmpfs over the closed folder, with only the Python installs bound back."""
    lines: list[str] = []
    binds: list[tuple[Path, Path]] = []
    covers: list[Path] = []
    for index, path in enumerate(sorted({Path(sys.base_prefix).resolve(),
                                         Path(sys.prefix).resolve()})):  # fmt: skip
        hidden = _hidden_ancestor(path)
        if hidden is None:
            continue
        stash = base / f"stash{index}"
        stash.mkdir()
        binds.append((path, stash))
        if hidden not in covers:
            covers.append(hidden)
    lines += [f'mount --bind "{path}" "{stash}"' for path, stash in binds]
    lines += [f'mount -t tmpfs -o mode=0755 kbwg-sudo-test "{c}"' for c in covers]
    for path, stash in binds:
        lines += [f'mkdir -p "{path}"', f'mount --bind "{stash}" "{path}"']
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int, group: str = "root") -> None:
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, 0, grp.getgrnam(group).gr_gid)


@pytest.fixture(scope="module")
def sudo_setup() -> Iterator[SudoSetup]:
    for tool in ("sudo", "setpriv", "unshare", "visudo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="kbwgsudo-"))
    try:
        os.chmod(base, 0o755)
        uid = _free_id()
        user = f"kbwgt{secrets.token_hex(3)}"
        (base / "usrlocal").mkdir(mode=0o755)
        (base / "etc").mkdir(mode=0o755)
        (base / "sudoers.d").mkdir(mode=0o755)
        _write(base / "etc" / "passwd", Path("/etc/passwd").read_text()
               + f"{user}:x:{uid}:{uid}:kbwg test:/nonexistent:/usr/sbin/nologin\n", 0o644)
        _write(base / "etc" / "group", Path("/etc/group").read_text() + f"{user}:x:{uid}:\n",
               0o644)  # fmt: skip
        # Only the test user: pam_unix's account check wants an entry, and no real one
        # needs copying.
        _write(base / "etc" / "shadow", f"{user}:*:19000:0:99999:7:::\n", 0o640,
               "shadow" if _group_exists("shadow") else "root")  # fmt: skip
        if "@includedir /etc/sudoers.d" not in Path("/etc/sudoers").read_text() and \
                "#includedir /etc/sudoers.d" not in Path("/etc/sudoers").read_text():
            _write(base / "sudoers", "Defaults env_reset\nroot ALL=(ALL:ALL) ALL\n"
                   "@includedir /etc/sudoers.d\n", 0o440)  # fmt: skip
        mounts = ["sh", "-c", _MOUNT_SCRIPT + _expose_python(base) + 'exec "$@"', str(base)]

        # The README's install command, at its default paths (/usr/local is ours here).
        install = _install(mounts, user)
        _write(base / "sudoers.d" / "kbwg-owner", readme_line(user) + "\n", 0o440)
        check = subprocess.run(["visudo", "-cf", str(base / "sudoers.d" / "kbwg-owner")],
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        yield SudoSetup(base, user, uid, mounts, install.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _install(mounts: list[str], user: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PRIVATE, *mounts, *AGENT, "install-helper", "--user", user],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_install_prints_the_readme_line_and_writes_a_root_only_helper(
    sudo_setup: SudoSetup,
) -> None:
    assert f"    {readme_line(sudo_setup.user)}\n" in sudo_setup.install_output
    helper = sudo_setup.base / "usrlocal" / "libexec" / "kbwg-owner"
    assert helper.read_text() == (
        "#!/usr/local/lib/kbwg-owner/bin/python3 -I\nfrom kbwg.owner.main import main\nmain()\n"
    )
    info = helper.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, 0, 0o755)
    site = list((sudo_setup.base / "usrlocal" / "lib" / "kbwg-owner" / "lib").glob(
        "python3*/site-packages"))  # fmt: skip
    assert len(site) == 1
    installed = {p.name.split("-")[0].lower() for p in site[0].glob("*.dist-info")}
    # Not editable (the code itself is there), and only the owner's dependencies.
    assert (site[0] / "kbwg" / "owner" / "main.py").is_file()
    assert not list(site[0].glob("__editable__*"))
    assert {"msgpack", "pynacl", "pyroute2", "kbwg_agent"} <= installed
    assert not installed & {"aioice", "pystun3"}

    # Again, as after an upgrade: the environment is reused and the helper rewritten.
    before = helper.stat().st_ino
    again = _install(sudo_setup.mounts, sudo_setup.user)
    assert "reusing the Python" in again.stdout
    assert f"    {readme_line(sudo_setup.user)}\n" in again.stdout
    assert helper.stat().st_ino != before  # replaced by rename, never rewritten in place
    assert (site[0] / "kbwg" / "owner" / "main.py").is_file()


def test_install_refuses_a_folder_others_can_write(sudo_setup: SudoSetup) -> None:
    shared = sudo_setup.base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    proc = subprocess.run(
        [*AGENT, "install-helper", "--prefix", str(shared / "venv"),
         "--helper", str(shared / "kbwg-owner")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{shared} is writable by its group or by others (mode 777)" in proc.stderr
    assert not (shared / "venv").exists() and not (shared / "kbwg-owner").exists()


def _fake_kbwg(root: Path, marker: Path) -> None:
    """A `kbwg` package whose every module leaves a mark when imported."""
    for package in (root / "kbwg", root / "kbwg" / "owner"):
        package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "owner/__init__.py", "owner/__main__.py", "owner/main.py"):
        (root / "kbwg" / name).write_text(FAKE_CODE.format(marker=str(marker)))


def _hello(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Run an owner with one hello request then end of input; it answers and exits."""
    return subprocess.run(
        argv, input=encode_frame({"id": 1, "op": "hello"}), capture_output=True,
        cwd=cwd, env=env, timeout=60, check=False,
    )  # fmt: skip


def _hello_reply(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    frames = FrameDecoder().feed(proc.stdout)
    assert len(frames) == 1 and frames[0]["ok"] is True, (frames, proc.stderr)
    return frames[0]


def test_helper_ignores_kbwg_in_the_callers_folders(sudo_setup: SudoSetup) -> None:
    marker = sudo_setup.base / "marker"
    planted = sudo_setup.user_dir("planted")
    _fake_kbwg(planted, marker)
    user_site = planted / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    _fake_kbwg(user_site / "site-packages", marker)
    shutil.chown(planted, sudo_setup.uid, sudo_setup.uid)
    for path in planted.rglob("*"):
        os.chown(path, sudo_setup.uid, sudo_setup.uid, follow_symlinks=False)
    planted_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(planted),
                   "PYTHONUSERBASE": str(planted)}  # fmt: skip

    # The planted package does work when a Python is not isolated: the test can fail.
    _hello([sys.executable, "-c", "import kbwg.owner"], planted, planted_env)
    assert marker.exists()
    marker.unlink()

    # The user, through sudo, from the folder holding the package.
    as_user = _hello([*PRIVATE, *sudo_setup.mounts, *sudo_setup.as_user, "sudo", "-n", HELPER],
                     planted, planted_env)  # fmt: skip
    _hello_reply(as_user)
    # Root, running the helper with PYTHONPATH and the user site pointing at it.
    as_root = _hello([*PRIVATE, *sudo_setup.mounts, HELPER], planted, planted_env)
    _hello_reply(as_root)
    # Root without the helper: its own Python, isolated.
    fallback = _hello([sys.executable, "-I", "-m", "kbwg.owner"], planted, planted_env)
    _hello_reply(fallback)
    assert not marker.exists(), marker.read_text()

    # The rule allows the helper with no arguments, and nothing else.
    for argv in ([HELPER, "--log-level", "DEBUG"], ["/bin/true"]):
        refused = subprocess.run(
            [*PRIVATE, *sudo_setup.mounts, *sudo_setup.as_user, "sudo", "-n", *argv],
            capture_output=True, text=True, cwd="/", timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 1 and "password is required" in refused.stderr, refused


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _owner_uids(ns: str) -> list[int]:
    uids = []
    for pid in namespace_pids(ns):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            uid = _uid_of(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(part.endswith(b"kbwg-owner") for part in cmdline) and b"sudo" not in cmdline[0]:
            uids.append(uid)
    return uids


def test_unprivileged_agent_joins_through_sudo(world: World, sudo_setup: SudoSetup) -> None:
    inet = world.internet()
    user_host = world.host("user", lans=[inet])
    root_host = world.host("root", lans=[inet])
    team = Team(world)
    team.write_peers(DEVICES)
    # The test user must reach the team's stand-in files and its own state dir.
    os.chmod(world.dir, 0o711)
    uid = sudo_setup.uid
    for path in [team.home, *team.home.rglob("*")]:
        os.chown(path, uid, uid)
    state_dir = world.dir / "user-state"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, uid, uid)
    home = world.dir / "user-home"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    # Every stand-in runs as the test user, so the shared chat database stays writable.
    keybase = world.dir / "keybase-as-user"
    keybase.write_text(f'#!/bin/sh\n[ "$(id -u)" != 0 ] || exec {" ".join(sudo_setup.as_user)} '
                       f'{STANDIN} "$@"\nexec {STANDIN} "$@"\n')
    keybase.chmod(0o755)

    user_agent = team.start_agent(
        user_host, *DEVICES[0][:2], "--keybase", str(keybase), state_dir=state_dir,
        env={"HOME": str(home)}, wrap=[*sudo_setup.mounts, *sudo_setup.as_user],
    )  # fmt: skip
    root_agent = team.start_agent(root_host, *DEVICES[1][:2], "--keybase", str(keybase),
                                  wrap=sudo_setup.mounts)  # fmt: skip
    for agent in (user_agent, root_agent):
        team.wait_running(agent)
    for a, b in ((user_agent, root_agent), (root_agent, user_agent)):
        dest = str(b.status()["overlay_ip"])
        wait_until(partial(a.ping_ok, dest), timeout=30,
                   what=f"{a.name} to ping {b.name} over the overlay")  # fmt: skip

    # The agent itself is the test user; its owner is root, started through sudo.
    assert _uid_of(user_agent.proc.pid) == uid
    assert _owner_uids(user_host.ns) == [0]
    assert f"device owner: sudo -n {HELPER}" in user_agent.log(last=10**7)
    assert f"device owner: {HELPER}\n" in root_agent.log(last=10**7)
    status = user_agent.status()
    assert status["overlay_ip"] == DEVICES[0][2]
    assert [p["device"] for p in status["peers"]] == [DEVICES[1][1]]
    assert {p["device"] for p in root_agent.status()["peers"]} == {DEVICES[0][1]}
