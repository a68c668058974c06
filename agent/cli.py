"""`kbwg-agent`: command-line entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kbwg.agent.control import ControlError, call
from kbwg.agent.startclock import milestone
from kbwg.agent.statedir import ENV_STATE_DIR, StateDirBusy, lock_state_dir, resolve_state_dir
from kbwg.agent.status_view import render_status
from kbwg.core.deferred_init import defer_init
from kbwg.core.printable import LOG_LINE_LIMIT, PrintableMessage, printable

if TYPE_CHECKING:
    from pathlib import Path

    from kbwg.agent.owner_client import EarlyOwner

log = logging.getLogger(__name__)

ENV_KEYBASE = "KBWG_KEYBASE"


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        help=f"folder for the agent's control socket and runtime files "
        f"(default: ${ENV_STATE_DIR}, else /run/kbwg-agent as root, else "
        "$XDG_RUNTIME_DIR/kbwg-agent)",
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given `argv`, the relay's and install-helper's own
    arguments only when argv runs that command (their modules are slow to import, and
    `join` should not wait for them)."""
    command = _command_of(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="kbwg-agent",
        description="WireGuard mesh among the devices of a Keybase team. Keybase is the "
        "control plane: peers.json in the team's KBFS folder gives each device its overlay "
        "address and #announce carries endpoints and keys.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info is the default for join, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    join = sub.add_parser(
        "join",
        help="join the team's mesh and keep it up until interrupted",
        description="Create this device's WireGuard interface, configure every announced "
        "device listed in /keybase/team/TEAM/peers.json as a peer, announce this device "
        "in the team's #announce channel and follow new announcements. Run it as the "
        "Keybase user: the WireGuard device is owned by a small privileged helper (the "
        "device owner) that join starts directly when run as root, or otherwise with "
        "`sudo -n` (which must be allowed without a password for that one command; see "
        "install-helper). "
        "INT or TERM removes the interface and everything the agent added; HUP re-reads "
        "peers.json (applied at once) and kbwg.json (changes are logged: they need a "
        "restart).",
    )
    join.add_argument("team", help="Keybase team name")
    join.add_argument("--keybase", help=f"path of the keybase CLI (default: ${ENV_KEYBASE}, "
                      "else `keybase` on PATH)")
    _add_state_dir(join)
    join.add_argument("--interface", default="kbwg0",
                      help="WireGuard interface name (default: kbwg0)")
    join.add_argument("--port", type=int, default=51820,
                      help="WireGuard UDP listen port, 0 for any free port (default: 51820)")
    join.add_argument("--endpoint", metavar="IP[:PORT]",
                      help="endpoint to announce (default: the address of the interface "
                      "with the default route, and the listen port)")
    join.add_argument("--backend", choices=["auto", "kernel", "userspace"], default="auto",
                      help="WireGuard implementation: the kernel module, wireguard-go, or "
                      "auto (kernel when available; default)")
    join.add_argument("--keepalive", type=int, default=25, metavar="SECONDS",
                      help="persistent keepalive for every peer, 0 to disable (default: 25)")
    join.add_argument("--new-key", action="store_true",
                      help="start with a new WireGuard key instead of the one kept in the "
                      "state dir (peers then learn it from the announcement)")
    join.add_argument("--owner", metavar="PATH",
                      help="device owner helper (default: $KBWG_OWNER, else "
                      "/usr/local/libexec/kbwg-owner, see install-helper); run through "
                      "`sudo -n` with no arguments when not root")

    status = sub.add_parser(
        "status",
        help="show the running agent's peers",
        description="Ask the agent running with this state dir for its peers: overlay "
        "address, endpoint, last handshake and traffic of each.",
    )
    _add_state_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_ping(sub)
    _add_diag(sub)
    _add_relay(sub, with_arguments=command in (None, "relay"))
    _add_install_helper(sub, with_arguments=command in (None, "install-helper"))
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand argv names (the only options before it take no value), None when
    it names none (help, or a usage error argparse reports with the full parser)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def _add_ping(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ping = sub.add_parser(
        "ping",
        help="ping a peer over its chosen path and say which path that is",
        description="Ask the agent running with this state dir to ping PEER over the "
        "path negotiation chose: a STUN Binding signed with the pair's check credentials "
        "(exchanged in the sealed offer and answer, so only the peer can answer), sent "
        "like WireGuard's own packets. Prints the path (LAN, direct or relay), the "
        "candidate pair and the round-trip time of each ping. Exit status: 0 when a pong "
        "came (with --until-direct: a pong over a direct or LAN path), 1 otherwise.",
    )
    ping.add_argument("peer", metavar="PEER",
                      help="user/device, a device name, or an overlay address, as "
                      "`kbwg-agent status` shows them")
    _add_state_dir(ping)
    ping.add_argument("-c", "--count", type=int, default=10,
                      help="pings to send (default: 10)")
    ping.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="how long each ping waits for its pong (default: 5, at most 60)")
    ping.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                      help="from the start of one ping to the next (default: 1)")
    ping.add_argument("--until-direct", action="store_true",
                      help="stop at the first pong over a direct or LAN path (exit 0); "
                      "exit 1 if COUNT pings went by without one")
    ping.add_argument("--json", action="store_true",
                      help="one JSON object per line: each ping, then a summary")


def _add_install_helper(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        with_arguments: bool = True) -> None:
    helper = sub.add_parser(
        "install-helper",
        help="install the device owner as a root-owned program for sudo (run as root)",
        description="Install the device owner into a root-owned virtual environment "
        "(non-editable, with only its own dependencies) and a helper script that runs it "
        "with `python -I`, check that only root can change either, and print the sudoers "
        "rule that lets a user start it without a password and without arguments. Safe to "
        "run again, e.g. after an upgrade.",
    )
    if with_arguments:
        from kbwg.agent.install_helper import add_arguments

        add_arguments(helper)


def _add_relay(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               with_arguments: bool = True) -> None:
    relay = sub.add_parser(
        "relay",
        help="run a TURN relay (RFC 8656, UDP) for the team's relayed paths",
        description="Serve TURN over UDP with TURN REST credentials (usernames "
        "EXPIRY:USER, password base64(HMAC-SHA1(secret, username))), the subset a "
        "WireGuard path needs, plus STUN Binding and, with --alt-address, RFC 5780 NAT "
        "behaviour discovery. Quotas, rate limits and a peer address policy are on by "
        "default. INT or TERM stops it; SIGUSR1 logs its counters.",
    )
    if with_arguments:
        from kbwg.relay.main import add_arguments

        add_arguments(relay)


def _add_diag(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    diag = sub.add_parser(
        "diag",
        help="report what this network allows: candidates, STUN, NAT behaviour, relays",
        description="Bind a UDP port and report the interfaces and host candidates, each "
        "STUN server's round-trip time and mapped address, the NAT's mapping and filtering "
        "behaviour, hairpinning, relay reachability and a one-line conclusion. STUN and "
        "relay servers come from --stun/--relay or from the team's kbwg.json (--team); "
        "there is no built-in public server. Exit status: 0 done, 2 UDP blocked (servers "
        "configured but none answered), 1 usage or configuration error.",
    )
    diag.add_argument("--json", action="store_true",
                      help="machine-readable output (stable keys, see the README)")
    source = diag.add_mutually_exclusive_group()
    source.add_argument("--team", help="take STUN and relay servers from "
                        "/keybase/team/TEAM/kbwg.json")
    source.add_argument("--stun", action="append", default=[], metavar="HOST:PORT",
                        help="a STUN server to use (repeatable)")
    diag.add_argument("--keybase", help=f"path of the keybase CLI, with --team (default: "
                      f"${ENV_KEYBASE}, else `keybase` on PATH)")
    diag.add_argument("--relay", action="append", default=[], metavar="URL",
                      help="a relay to test, turn:HOST:PORT (repeatable)")
    secret = diag.add_mutually_exclusive_group()
    secret.add_argument("--relay-secret-file", metavar="FILE",
                        help="file holding the relays' TURN REST shared secret (default: "
                        "$KBWG_RELAY_SECRET; kept for the allocation test, reachability "
                        "needs none)")
    secret.add_argument("--relay-secret", metavar="SECRET",
                        help="the secret itself: visible to every local user in the "
                        "process list, prefer --relay-secret-file or $KBWG_RELAY_SECRET")
    diag.add_argument("--state-dir", help="ask the agent running with this state dir "
                      "instead: the live WireGuard port's candidates, NAT behaviour seen "
                      "from it, and per peer the candidates and pairs known")
    diag.add_argument("--port", type=int, default=0,
                      help="local UDP port to test from (default: any free port)")
    diag.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="bound on the whole run (default: 5)")
    diag.add_argument("--no-classic", action="store_true",
                      help="skip pystun3's classic RFC 3489 NAT type")


def _setup_logging(verbosity: int, quiet: bool = False) -> None:
    if verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1 or not quiet:
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format=log_format(os.environ), stream=sys.stderr)
    # pyroute2 logs every netlink message at debug (and sets its loggers' levels
    # itself): far too much even for -vv, so its records below WARNING are dropped.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_pyroute2)
        handler.addFilter(SyslogPriority())
        # Messages quote what others chose (names, reasons): one line, no controls.
        handler.addFilter(PrintableMessage())


def log_format(environ: Mapping[str, str]) -> str:
    """Under systemd (stderr is the journal: JOURNAL_STREAM is set) the journal stamps
    each line itself, and reads a leading `<N>` as the syslog priority; elsewhere lines
    carry their own time and level name."""
    if environ.get("JOURNAL_STREAM"):
        return "<%(syslog_priority)d>%(name)s: %(message)s"
    return "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SyslogPriority(logging.Filter):
    # sd-daemon(3) priorities: 3 err, 4 warning, 6 info, 7 debug.
    def filter(self, record: logging.LogRecord) -> bool:
        level = record.levelno
        record.syslog_priority = (2 if level >= logging.CRITICAL else 3 if level >= logging.ERROR
                                  else 4 if level >= logging.WARNING else 6
                                  if level >= logging.INFO else 7)
        return True


def _quiet_pyroute2(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("pyroute2") and record.levelno < logging.WARNING)


def _fail(message: str, code: int = 1) -> int:
    # Errors quote what others chose (kbwg.json, Keybase, the agent): no controls. Our
    # own hints span lines (the sudo set-up), so newlines stay, but every line after
    # the first is indented: no line a quoted text starts can pass for one of ours or
    # carry a journal priority (`<3>`) at its start.
    text = printable(message, LOG_LINE_LIMIT, keep="\n").replace("\n", "\n  ")
    print(f"kbwg-agent: error: {text}", file=sys.stderr)
    return code


async def _join(args: argparse.Namespace) -> int:
    from kbwg.agent.owner_client import EarlyOwner, OwnerStartError, owner_command

    try:
        owner = owner_command(args.owner)
    except OwnerStartError as exc:
        return _fail(str(exc))
    state_dir = resolve_state_dir(args.state_dir)
    try:
        lock = lock_state_dir(state_dir)
    except (StateDirBusy, OSError) as exc:
        return _fail(str(exc))
    # The device owner is the slowest step of the start: its process starts now and
    # imports while this one imports the daemon.
    early_owner = await EarlyOwner.start(owner)
    try:
        return await _run_join(args, owner, state_dir, early_owner)
    finally:
        await early_owner.discard()
        lock.close()


async def _run_join(args: argparse.Namespace, owner: list[str], state_dir: Path,
                    early_owner: EarlyOwner) -> int:
    from kbwg.agent.daemon import Agent, JoinError, JoinOptions
    from kbwg.agent.keybase import KeybaseClient, KeybaseError, resolve_keybase_binary
    from kbwg.agent.owner_client import OwnerError, OwnerGone, OwnerStartError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    options = JoinOptions(
        team=args.team,
        state_dir=state_dir,
        interface=args.interface,
        listen_port=args.port,
        endpoint=args.endpoint,
        backend=args.backend,
        keepalive_s=args.keepalive,
        owner_command=owner,
        new_key=args.new_key,
    )
    agent = Agent(options, KeybaseClient(resolve_keybase_binary(args.keybase)),
                  owner_factory=early_owner.take)
    loop.add_signal_handler(signal.SIGHUP, agent.reload)
    try:
        await agent.run(stop)
    except (JoinError, KeybaseError, OwnerError, OwnerGone, OwnerStartError) as exc:
        return _fail(str(exc))
    except Exception as exc:
        log.exception("the agent failed")
        return _fail(f"{exc} (a bug: please report it with the log above)")
    log.info("stopped")
    return 0


async def _status(args: argparse.Namespace) -> int:
    try:
        status = await call(resolve_state_dir(args.state_dir), "status")
    except ControlError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_status(status))
    return 0


async def _ping(args: argparse.Namespace) -> int:
    from kbwg.agent.ping import MAX_TIMEOUT_S
    from kbwg.agent.ping_command import PingOptions, run_ping

    if args.count < 1 or not 0 < args.timeout <= MAX_TIMEOUT_S or args.interval < 0:
        return _fail(f"-c must be at least 1, --timeout in (0, {MAX_TIMEOUT_S:g}] and "
                     "--interval not negative")
    state_dir = resolve_state_dir(args.state_dir)

    async def one(peer: str, timeout: float) -> dict[str, Any]:
        return await call(state_dir, "ping", timeout=timeout + 10, peer=peer,
                          ping_timeout=timeout)

    options = PingOptions(peer=args.peer, count=args.count, timeout=args.timeout,
                          interval=args.interval, until_direct=args.until_direct,
                          json=args.json)
    return await run_ping(options, one, sys.stdout, sys.stderr)


async def _diag(args: argparse.Namespace) -> int:
    from kbwg.agent.diag import DiagOptions, relay_secret, run_diag
    from kbwg.agent.teamconfig import (
        RelayConfig,
        TeamConfigError,
        load_team_config,
        parse_host_port,
        parse_relay_url,
    )

    options = DiagOptions(port=args.port, timeout=args.timeout, classic=not args.no_classic)
    if not 0 <= args.port <= 65535 or args.timeout <= 0:
        return _fail("--port must be 0-65535 and --timeout positive")
    try:
        secret, warning = relay_secret(args.relay_secret, args.relay_secret_file, os.environ)
        if warning is not None:
            print(f"kbwg-agent: warning: {warning}", file=sys.stderr)
        options.stun = [parse_host_port(text) for text in args.stun]
        for url in args.relay:
            address, transport = parse_relay_url(url)
            options.relays.append(RelayConfig(url, address.host, address.port,
                                              secret, transport))
    except ValueError as exc:
        return _fail(str(exc))
    if args.team:
        from kbwg.agent.keybase import KeybaseClient, KeybaseError, resolve_keybase_binary

        keybase = KeybaseClient(resolve_keybase_binary(args.keybase))
        try:
            config = await load_team_config(keybase, args.team)
        except (TeamConfigError, KeybaseError) as exc:
            return _fail(str(exc))
        finally:
            await keybase.close()
        options.stun = config.stun
        options.relays = config.relays + options.relays
        options.interface_exclude = config.interface_exclude
        options.overlay = config.overlay
        options.config_source = f"team {args.team} kbwg.json"
    if args.state_dir is not None:
        return await _diag_agent(args)
    try:
        report = await run_diag(options)
    except OSError as exc:
        return _fail(f"cannot run diag: {exc}")
    return _print_diag(args, report.to_json())


def _print_diag(args: argparse.Namespace, data: dict[str, Any]) -> int:
    from kbwg.agent.diag import EXIT_OK, EXIT_UDP_BLOCKED, render_report

    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render_report(data))
    return EXIT_UDP_BLOCKED if data.get("udp") is False else EXIT_OK


async def _diag_agent(args: argparse.Namespace) -> int:
    """The running agent's view: its WireGuard port's candidates and its peers."""
    if args.stun or args.team or args.relay or args.port:
        return _fail("--state-dir asks the running agent, which uses the team's kbwg.json; "
                     "drop --stun/--team/--relay/--port, or drop --state-dir for a "
                     "standalone run")
    try:
        data = await call(resolve_state_dir(args.state_dir), "diag",
                          timeout=args.timeout + 10, diag_timeout=args.timeout,
                          classic=not args.no_classic)
    except ControlError as exc:
        return _fail(str(exc))
    return _print_diag(args, data)


def lighter_imports() -> None:
    """Before anything imports aioice: only its STUN and TURN modules are used, and its
    ICE agent, mDNS and dnspython, which its __init__ loads, would cost every start
    60 ms of CPU."""
    defer_init("aioice")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lighter_imports()
    args = build_parser(argv).parse_args(argv)
    if args.command == "join":
        _setup_logging(args.verbose)
        milestone(log, "command line parsed")
        return asyncio.run(_join(args))
    if args.command == "relay":
        from kbwg.relay.main import run

        _setup_logging(args.verbose)
        return run(args)
    if args.command == "install-helper":
        from kbwg.agent.install_helper import run as install_helper

        return install_helper(args)
    _setup_logging(args.verbose, quiet=True)
    try:
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command == "diag":
            return asyncio.run(_diag(args))
        if args.command == "ping":
            try:
                return asyncio.run(_ping(args))
            except KeyboardInterrupt:
                return 130
    except BrokenPipeError:
        # `status | head`: the reader has gone, so stop quietly as cat does; stdout goes
        # to /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
