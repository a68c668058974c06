"""The systemd units in contrib/systemd: parsed here (the sandboxing they promise, and
command lines the installed kbwg-agent accepts), and checked by `systemd-analyze verify`
where systemd is installed."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbwg.agent.cli import SyslogPriority, build_parser, log_format
from kbwg.agent.statedir import ENV_STATE_DIR
from kbwg.owner.policy import DEFAULT_POLICY_PATH

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
AGENT_UNIT = UNITS / "kbwg-agent@.service"
RELAY_UNIT = UNITS / "kbwg-relay.service"
RELAY_ENV = UNITS / "relay.env"
README = UNITS.parent.parent / "README.md"
INSTALLED = "/usr/local/bin/kbwg-agent"
KBWG_AGENT = str(Path(sys.executable).parent / "kbwg-agent")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's unit syntax: sections, `Key=value` lines (a key may repeat; an empty
    value resets it), `#`/`;` comments, a trailing backslash continues the line."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not Key=value"
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"{key} in [{section}]: {values}"
    return values[0]


def exec_args(command: str, env: dict[str, str], instance: str = "demo-team") -> list[str]:
    """ExecStart's arguments after the binary, as systemd passes them: `${VAR}` one word,
    `$VAR` split on whitespace, %i the instance."""
    words = shlex.split(command.replace("%i", instance))
    args: list[str] = []
    for word in words[1:]:
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            args += env.get(word[1:], "").split()
        else:
            args.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                              lambda m: env.get(m.group(1), ""), word))
    return args


def test_relay_unit_is_sandboxed() -> None:
    unit = parse_unit(RELAY_UNIT.read_text())
    service = unit["Service"]
    for key, value in [("DynamicUser", "yes"), ("NoNewPrivileges", "yes"),
                       ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("Restart", "on-failure")]:
        assert one(unit, "Service", key) == value, key
    # Set and empty: no capabilities at all (the default port is above 1024).
    assert "CapabilityBoundingSet" in service and service["CapabilityBoundingSet"] == []
    assert service.get("AmbientCapabilities", []) == []
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6"} <= families
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    # The secret comes as a credential, not as a readable file or an argument.
    assert one(unit, "Service", "LoadCredential") == "secret:/etc/kbwg/relay-secret"
    command = one(unit, "Service", "ExecStart")
    assert "--secret-file ${CREDENTIALS_DIRECTORY}/secret" in command
    assert "PrivateNetwork" not in service  # it would hide the host's addresses
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_agent_unit_can_reach_sudo() -> None:
    unit = parse_unit(AGENT_UNIT.read_text())
    service = unit["Service"]
    assert one(unit, "Service", "ExecStart") == f"{INSTALLED} join %i"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "HUP" in one(unit, "Service", "ExecReload")
    # One control socket per team, in the user's runtime folder.
    assert f"{ENV_STATE_DIR}=%t/kbwg-agent-%i" in service["Environment"]
    # Each of these stops `sudo -n` from becoming root (no_new_privs, or a user
    # namespace in a user unit), and with it the device owner.
    blocking = {"NoNewPrivileges", "RestrictSUIDSGID", "SystemCallFilter",
                "MemoryDenyWriteExecute", "PrivateUsers", "PrivateTmp", "ProtectSystem",
                "ProtectHome", "PrivateDevices", "CapabilityBoundingSet", "DynamicUser",
                "User"}
    assert not blocking & set(service)
    assert one(unit, "Install", "WantedBy") == "default.target"


def test_agent_unit_stops_the_agent_alone() -> None:
    """TERM goes to the agent only: it has the device owner remove the interface, then
    exits; the user's systemd could not signal the root owner anyway (it would log
    "Failed to kill control group ... Operation not permitted" at every stop)."""
    unit = parse_unit(AGENT_UNIT.read_text())
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"


def test_agent_unit_outlasts_a_late_network() -> None:
    """A user manager has no network-online.target: with linger, join can start at boot
    before any address exists and exit. Restarts must go on for minutes, not seconds."""
    unit = parse_unit(AGENT_UNIT.read_text())
    ordering = unit["Unit"].get("After", []) + unit["Unit"].get("Wants", [])
    assert not any("network-online.target" in value for value in ordering)
    burst = int(one(unit, "Unit", "StartLimitBurst"))
    interval = int(one(unit, "Unit", "StartLimitIntervalSec"))
    restart = int(one(unit, "Service", "RestartSec"))
    assert burst * restart >= 180 and interval >= burst * restart


# -- the README's install steps are the units' own --------------------------------------


def readme_install_commands() -> list[str]:
    """The shell lines of the code blocks in the README's "Installing on a real
    machine", without comments."""
    text = README.read_text()
    start = text.index("## Installing on a real machine")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def unit_header_commands(unit_path: Path) -> list[str]:
    """The install commands a unit file's header comment gives (`#   cmd`)."""
    lines = [line[1:].split("  #")[0].strip() for line in unit_path.read_text().splitlines()
             if line.startswith("#   ") and not line.startswith("#   [")]
    return [line for line in lines if re.match(r"(sudo )?(install|systemctl|loginctl) ", line)]


@pytest.mark.parametrize("unit_path", [AGENT_UNIT, RELAY_UNIT], ids=lambda p: p.name)
def test_readme_install_commands_are_the_units_own(unit_path: Path) -> None:
    readme = readme_install_commands()
    header = unit_header_commands(unit_path)
    assert len(header) >= 3, header
    for command in header:
        # The header names files beside it; the README runs from the checkout.
        expected = re.sub(r"(?<= )(kbwg-[a-z@]+\.service|relay\.env)(?= )",
                          r"contrib/systemd/\1", command)
        assert expected in readme, f"{unit_path.name}: {expected!r} is not in the README"


def test_readme_installs_what_the_units_expect() -> None:
    readme = readme_install_commands()
    # The units' ExecStart binary is the README's symlink.
    assert f"sudo ln -s /opt/kbwg-agent/bin/kbwg-agent {INSTALLED}" in readme
    # The state dir the README tells `status` to use is the unit's.
    unit = parse_unit(AGENT_UNIT.read_text())
    assert f"{ENV_STATE_DIR}=%t/kbwg-agent-%i" in unit["Service"]["Environment"]
    assert '--state-dir "$XDG_RUNTIME_DIR/kbwg-agent-TEAM"' in README.read_text()
    # The relay's folder also holds the owner's policy, which a user's agent reads:
    # it must not be made root-only.
    assert DEFAULT_POLICY_PATH.parent == Path("/etc/kbwg")
    assert "install -d -m755 /etc/kbwg" in readme
    assert not any(re.search(r"install -d -m7[0-4]0 /etc/kbwg", c) for c in readme)
    # A user cannot enable linger alone without polkit.
    assert 'sudo loginctl enable-linger "$USER"' in readme
    # The relay's secret file and env file are the ones the unit loads.
    relay = parse_unit(RELAY_UNIT.read_text())
    secret = one(relay, "Service", "LoadCredential").split(":", 1)[1]
    assert f"install -m600 /dev/null {secret}" in readme
    env_file = one(relay, "Service", "EnvironmentFile")
    assert f"install -m644 contrib/systemd/relay.env {env_file}" in readme


@pytest.mark.parametrize("unit_path", [AGENT_UNIT, RELAY_UNIT], ids=lambda p: p.name)
def test_exec_start_is_a_command_line_kbwg_agent_accepts(unit_path: Path) -> None:
    unit = parse_unit(unit_path.read_text())
    command = one(unit, "Service", "ExecStart")
    assert command.split()[0] == INSTALLED
    env = {**parse_env_file(RELAY_ENV.read_text()), "CREDENTIALS_DIRECTORY": "/run/cred"}
    args = exec_args(command, env)
    parsed = build_parser().parse_args(args)  # exits (fails the test) on a wrong flag
    assert parsed.command == args[0]
    if parsed.command == "relay":
        assert (parsed.listen, parsed.secret_file) == ("0.0.0.0:3478", "/run/cred/secret")
        assert parsed.relay_ip == "203.0.113.5"
    else:
        assert parsed.team == "demo-team"
    # And the installed console script knows each flag.
    shown = subprocess.run([KBWG_AGENT, args[0], "--help"], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in shown, flag


def test_relay_env_shows_tls_with_the_credentials_the_drop_in_loads() -> None:
    """The commented TCP/TLS example in relay.env, uncommented, is a command line the
    relay accepts, and its --cert/--key are the credentials its drop-in loads."""
    text = RELAY_ENV.read_text()
    example = next(line[1:] for line in text.splitlines()
                   if line.startswith("#KBWG_RELAY_ARGS=") and "--tls-listen" in line)
    env = {**parse_env_file(text + example + "\n"), "CREDENTIALS_DIRECTORY": "/run/cred"}
    command = one(parse_unit(RELAY_UNIT.read_text()), "Service", "ExecStart")
    parsed = build_parser().parse_args(exec_args(command, env))
    loaded = dict(re.findall(r"LoadCredential=(\w+):(\S+)", text))
    credentials = "/run/credentials/kbwg-relay.service"
    assert parsed.tls_listen and parsed.tcp_listen, parsed
    assert (parsed.cert, parsed.key) == (f"{credentials}/cert", f"{credentials}/key")
    assert set(loaded) == {"cert", "key"}, loaded


def _verify(tmp_path: Path, unit_path: Path, name: str, user: bool) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the parse tests above stand in")
    # verify checks that ExecStart's binary exists: point it at this checkout's.
    copy = tmp_path / unit_path.name
    copy.write_text(unit_path.read_text().replace(INSTALLED, KBWG_AGENT))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", str(tmp_path / name)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if str(tmp_path) in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_systemd_analyze_verify_relay(tmp_path: Path) -> None:
    _verify(tmp_path, RELAY_UNIT, RELAY_UNIT.name, user=False)


def test_systemd_analyze_verify_agent(tmp_path: Path) -> None:
    _verify(tmp_path, AGENT_UNIT, "kbwg-agent@demo-team.service", user=True)


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a misplaced key is reported."""
    bad = tmp_path / "bad" / "kbwg-relay.service"
    bad.parent.mkdir()
    bad.write_text(RELAY_UNIT.read_text().replace("[Service]", "[Service]\nNoSuchKey=5"))
    with pytest.raises(AssertionError, match="Unknown key"):
        _verify(tmp_path / "bad", bad, bad.name, user=False)


# -- logging for the journal ------------------------------------------------------------


def _format(fmt: str, level: int) -> str:
    record = logging.LogRecord("kbwg.agent.x", level, __file__, 1, "hello %s", ("there",), None)
    SyslogPriority().filter(record)
    return logging.Formatter(fmt).format(record)


def test_log_lines_for_the_journal_have_a_priority_and_no_time() -> None:
    journal = log_format({"JOURNAL_STREAM": "8:12345"})
    assert _format(journal, logging.WARNING) == "<4>kbwg.agent.x: hello there"
    assert _format(journal, logging.ERROR).startswith("<3>")
    assert _format(journal, logging.INFO).startswith("<6>")
    assert _format(journal, logging.DEBUG).startswith("<7>")
    terminal = _format(log_format({}), logging.WARNING)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING kbwg.agent.x: hello there$",
                    terminal)
