"""`kbwg-agent install-helper`: install the device owner as a root-owned program.

The agent's user may start the owner as root through sudo, so nothing that user can
write may decide what that process runs. The helper is therefore:

- a virtual environment made by root (default /usr/local/lib/kbwg-owner) holding a
  regular, non-editable install of this project and only the owner's own runtime
  dependencies;
- a script (default /usr/local/libexec/kbwg-owner) whose interpreter line runs that
  environment's Python with `-I`: no current directory or script directory on the
  import path, no user site directory, no PYTHON* variables;
- checked at the end: the script, the environment and every directory above them are
  owned by root and writable by nobody else.

Then it prints the sudoers rule (no arguments allowed) that lets a user start it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import kbwg.agent
from kbwg.agent.owner_client import DEFAULT_HELPER, sudoers_line

DEFAULT_PREFIX = Path("/usr/local/lib/kbwg-owner")
SYSTEM_PYTHON = Path("/usr/bin/python3")
PROJECT_NAME = "kbwg-agent"
# What `import kbwg.owner` needs at run time, and nothing else of the project's list.
OWNER_DEPENDENCIES = ("msgpack", "pynacl", "pyroute2")
HELPER_ENTRY = "from kbwg.owner.main import main\nmain()\n"
SUDOERS_FILE = "/etc/sudoers.d/kbwg-owner"
USER_PLACEHOLDER = "<user>"
# Build trees and environments a source checkout may hold: never part of the install.
_SOURCE_JUNK = (".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                ".mypy_cache", ".ruff_cache", ".pytest_cache")  # fmt: skip

Lstat = Callable[[str], os.stat_result]


class InstallError(Exception):
    """The helper cannot be installed; the message says what to do."""


@dataclass
class InstallOptions:
    prefix: Path
    helper: Path
    python: Path
    source: Path
    user: str


def default_python() -> Path:
    # The system's Python, when there is one, outlives whatever environment ran this.
    return SYSTEM_PYTHON if SYSTEM_PYTHON.exists() else Path(sys.executable)


def find_source() -> Path:
    """The checkout this kbwg came from: the folder above the package with pyproject.toml."""
    candidate = Path(kbwg.agent.__file__).resolve().parent.parent
    if _is_project(candidate):
        return candidate
    raise InstallError(
        f"cannot find the kbwg-agent source checkout (no pyproject.toml in {candidate}, "
        "which is the case for a non-editable install); pass --source DIR with the "
        "folder holding kbwg-agent's pyproject.toml"
    )


def _is_project(folder: Path) -> bool:
    try:
        doc = tomllib.loads((folder / "pyproject.toml").read_text())
    except (OSError, ValueError):
        return False
    return bool(doc.get("project", {}).get("name") == PROJECT_NAME)


def _requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", spec.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def owner_requirements(pyproject: Path) -> list[str]:
    """The owner's dependencies with the version floors the project declares."""
    try:
        doc = tomllib.loads(pyproject.read_text())
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read {pyproject}: {exc}") from exc
    declared = {_requirement_name(spec): spec.strip()
                for spec in doc.get("project", {}).get("dependencies", [])}  # fmt: skip
    missing = [name for name in OWNER_DEPENDENCIES if name not in declared]
    if missing:
        raise InstallError(f"{pyproject} does not declare {', '.join(missing)}: "
                           "is --source a kbwg-agent checkout?")
    return [declared[name] for name in OWNER_DEPENDENCIES]


def helper_script(prefix: Path) -> str:
    return f"#!{prefix / 'bin' / 'python3'} -I\n{HELPER_ENTRY}"


# -- ownership checks -------------------------------------------------------------------


def unsafe_reason(path: str, lstat: Lstat = os.lstat) -> str | None:
    """Why `path` could be replaced by someone other than root, else None.

    Only root may own it and only the owner may write it. A sticky, world-writable
    directory such as /tmp is refused as well: the sudoers rule outlives the files, and
    once a tmp cleaner has removed them anyone may create the same path.
    """
    try:
        info = lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot check {path}: {exc}"
    if info.st_uid != 0:
        return f"{path} is owned by uid {info.st_uid}, not root"
    if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022:
        return f"{path} is writable by its group or by others (mode {info.st_mode & 0o7777:o})"
    return None


def _ancestors(path: str) -> list[str]:
    """`path` and each folder above it up to /, both as written and as resolved."""
    out: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        current = start
        while True:
            if current not in out:
                out.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return out


def check_root_only(paths: Iterable[str], lstat: Lstat = os.lstat) -> list[str]:
    """The problems found on each path and every folder above it (empty when none)."""
    problems: list[str] = []
    for path in paths:
        for each in _ancestors(path):
            reason = unsafe_reason(each, lstat)
            if reason is not None and reason not in problems:
                problems.append(reason)
    return problems


def _tree(root: Path) -> list[str]:
    found = [str(root)]
    for folder, dirs, files in os.walk(root):
        found += [os.path.join(folder, name) for name in (*dirs, *files)]
    return found


def verify(options: InstallOptions) -> None:
    """Refuse the install unless root alone can change what the helper runs."""
    python = options.prefix / "bin" / "python3"
    problems = check_root_only([str(options.helper), str(options.prefix), str(python)])
    for path in _tree(options.prefix):
        reason = unsafe_reason(path)
        if reason is not None:
            problems.append(reason)
    if problems:
        raise InstallError(_unsafe_message(problems))


def _unsafe_message(problems: list[str]) -> str:
    shown = "\n    ".join(problems[:10])
    more = f"\n    ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return (
        "refusing the install: whoever can change these could run code as root through "
        f"the helper:\n    {shown}{more}\nfix their owner and mode (chown root:root, "
        "chmod go-w), or choose other --prefix/--helper locations"
    )


def precheck(options: InstallOptions) -> None:
    """The folders that will hold the install must already be root's alone."""
    parents = [_existing_parent(options.prefix), _existing_parent(options.helper)]
    problems = check_root_only(str(p) for p in parents)
    if problems:
        raise InstallError(_unsafe_message(problems))


def _existing_parent(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


# -- steps ------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"install-helper: {message}", flush=True)


def _run(argv: list[str], what: str, quiet: bool = False) -> str:
    if not quiet:
        _say(f"{what}: {' '.join(argv)}")
    # PIP_ROOT_USER_ACTION: this is root installing for root, on purpose.
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-3000:]
        raise InstallError(f"{what} failed (exit status {proc.returncode}):\n{output}")
    return proc.stdout


def _version_of(python: Path) -> str:
    out = _run([str(python), "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
               f"checking {python}", quiet=True)  # fmt: skip
    return out.strip()


def _venv_version(prefix: Path) -> str | None:
    """The Python version `prefix` was made with, or None when it is no usable venv."""
    try:
        text = (prefix / "pyvenv.cfg").read_text()
    except OSError:
        return None
    if not (prefix / "bin" / "python3").exists():
        return None
    match = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+)", text, re.MULTILINE)
    return match.group(1) if match else None


def ensure_venv(prefix: Path, python: Path) -> None:
    wanted = _version_of(python)
    if prefix.exists() and not (prefix / "pyvenv.cfg").exists() and any(prefix.iterdir()):
        raise InstallError(f"{prefix} exists and is not a virtual environment; remove it "
                           "or choose another --prefix")
    have = _venv_version(prefix)
    if have == wanted:
        _say(f"reusing the Python {have} environment in {prefix}")
        # Point it at this interpreter again (the same version may have moved).
        _run([str(python), "-I", "-m", "venv", "--upgrade", str(prefix)], "refreshing the venv")
        return
    _run([str(python), "-I", "-m", "venv", "--clear", str(prefix)], "creating the venv")


_BUILD_PROBE = """\
import importlib.metadata as m, importlib.util as u
try:
    v = tuple(int(x) for x in m.version("setuptools").split(".")[:2])
except Exception:
    v = (0, 0)
print(int(v >= (64, 0) and (v >= (70, 1) or u.find_spec("wheel") is not None)))
"""


def builds_offline(venv_python: Path) -> bool:
    """True when the venv's own setuptools can build the project (no download needed)."""
    probe = _run([str(venv_python), "-I", "-c", _BUILD_PROBE], "checking setuptools", quiet=True)
    return probe.strip() == "1"


def _ignore_junk(folder: str, names: list[str]) -> set[str]:
    ignored = set(shutil.ignore_patterns(*_SOURCE_JUNK)(folder, names))
    # Any virtual environment in the checkout (.venv, venv, ...).
    ignored |= {name for name in names if os.path.isfile(os.path.join(folder, name, "pyvenv.cfg"))}
    return ignored


def install_packages(options: InstallOptions, workdir: Path) -> None:
    venv_python = options.prefix / "bin" / "python3"
    pip = [str(venv_python), "-I", "-m", "pip", "install", "--no-cache-dir", "--upgrade"]
    # The dependencies first, so the project's own --no-deps install finds them.
    _run([*pip, *owner_requirements(options.source / "pyproject.toml")],
         "installing the owner's dependencies")  # fmt: skip
    # A private copy: building writes build/ and *.egg-info next to the sources, and the
    # checkout may be someone else's working tree.
    copy = workdir / "source"
    shutil.copytree(options.source, copy, symlinks=True, ignore=_ignore_junk)
    # With a recent enough setuptools in the venv, building needs no download.
    isolation = ["--no-build-isolation"] if builds_offline(venv_python) else []
    _run([*pip, "--no-deps", "--force-reinstall", *isolation, str(copy)],
         f"installing kbwg-agent from {options.source} (not editable)")


def write_helper(helper: Path, prefix: Path) -> None:
    """Write the script next to its final place, then rename it over: never half-written."""
    helper.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=helper.parent, prefix=f".{helper.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(helper_script(prefix))
            out.flush()
            os.fchown(out.fileno(), 0, 0)
            os.fchmod(out.fileno(), 0o755)
            os.fsync(out.fileno())
        os.replace(tmp, helper)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _say(f"wrote {helper}")


def sudoers_instructions(user: str, helper: Path) -> str:
    line = sudoers_line(user, str(helper))
    staged = f"{SUDOERS_FILE}.new"  # sudo ignores files with a dot in sudoers.d
    return (
        f"To let {user} start the device owner (and nothing else) as root, add this rule; "
        '"" means no arguments are allowed:\n'
        f"    {line}\n"
        "for example with:\n"
        f"    printf '%s\\n' '{line}' | sudo tee {staged} >/dev/null\n"
        f"    sudo chmod 0440 {staged} && sudo visudo -cf {staged} && "
        f"sudo mv {staged} {SUDOERS_FILE}"
    )


def install(options: InstallOptions) -> None:
    if os.geteuid() != 0:
        raise InstallError("install-helper installs a program that runs as root and must "
                           "itself run as root: sudo kbwg-agent install-helper")
    # Nothing this makes may be writable by group or others, whatever root's umask is.
    os.umask(0o022)
    precheck(options)
    if not options.python.exists():
        raise InstallError(f"no Python at {options.python}; pass --python PATH")
    ensure_venv(options.prefix, options.python)
    os.chmod(options.prefix, 0o755)
    with tempfile.TemporaryDirectory(prefix="kbwg-install-") as workdir:
        install_packages(options, Path(workdir))
    write_helper(options.helper, options.prefix)
    verify(options)
    _say(f"{options.helper} and {options.prefix} are owned by root and writable only by root")
    _run([str(options.prefix / "bin" / "python3"), "-I", "-c", "import kbwg.owner.main"],
         "checking that the helper's Python imports kbwg.owner.main")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, metavar="DIR",
                        help=f"virtual environment to install into (default: {DEFAULT_PREFIX})")
    parser.add_argument("--helper", type=Path, default=Path(DEFAULT_HELPER), metavar="PATH",
                        help=f"path of the helper program (default: {DEFAULT_HELPER}); "
                        "an agent finds another path with `join --owner` or $KBWG_OWNER")
    parser.add_argument("--python", type=Path, metavar="PATH",
                        help=f"Python to make the environment with (default: {SYSTEM_PYTHON} "
                        "when present, else the one running this)")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="kbwg-agent source checkout to install (default: the one this "
                        "kbwg-agent runs from)")
    parser.add_argument("--user", help="user the printed sudoers rule is for (default: "
                        "$SUDO_USER)")


def options_from(args: argparse.Namespace) -> InstallOptions:
    source = args.source.absolute() if args.source is not None else find_source()
    if not _is_project(source):
        raise InstallError(f"{source} holds no kbwg-agent pyproject.toml")
    for name, path in (("--prefix", args.prefix), ("--helper", args.helper)):
        if not path.is_absolute():
            raise InstallError(f"{name} must be an absolute path (the sudoers rule and the "
                               "interpreter line name it)")
    return InstallOptions(
        prefix=args.prefix,
        helper=args.helper,
        python=(args.python or default_python()).absolute(),
        source=source,
        user=args.user or os.environ.get("SUDO_USER") or USER_PLACEHOLDER,
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
        install(options)
    except InstallError as exc:
        print(f"kbwg-agent install-helper: error: {exc}", file=sys.stderr)
        return 1
    _say("done")
    print(sudoers_instructions(options.user, options.helper))
    return 0
