"""The `keybase` command line: global flags, then dispatch to a subcommand; errors become
the real CLI's ``▶ ERROR`` line and exit code."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from kbwg_standin.ctl import cmd_ctl, dial_error, is_stopped
from kbwg_standin.env import Env
from kbwg_standin.errors import EXIT_NOTOK, RequestError, ServiceError, UsageError, die

# Every `keybase` call is a new process here (the agent makes several while it starts),
# so each subcommand's module is imported only when it runs: `whoami` and `fs read` do not
# pay for the chat service's modules, as the real Go client pays for none.

GLOBAL_FLAGS_WITH_VALUE = frozenset(
    {"--home", "--pid-file", "--log-file", "--socket-file", "--config-file", "--run-mode"}
)
GLOBAL_FLAGS = frozenset({"-d", "--debug", "--standalone", "--no-auto-fork", "-F"})


def strip_global_flags(argv: Sequence[str]) -> list[str]:
    """The real CLI takes global flags before the subcommand; the stand-in ignores them."""
    args = list(argv)
    while args and args[0].startswith("-"):
        flag = args[0].split("=", 1)[0]
        if flag in GLOBAL_FLAGS_WITH_VALUE:
            args = args[1:] if "=" in args[0] else args[2:]
        elif flag in GLOBAL_FLAGS:
            args = args[1:]
        else:
            die(f"flag provided but not defined: {args[0]}")
    return args


def run(argv: Sequence[str]) -> int:
    args = strip_global_flags(argv)
    if not args:
        die("usage: keybase [global flags] <chat api|chat api-listen|whoami|status|fs ...|ctl ...>")
    cmd, rest = args[0], args[1:]
    if cmd == "version":
        from kbwg_standin.identity import cmd_version

        return cmd_version(None, rest)
    env = Env.from_environ()
    if cmd in ("ctl", "service"):
        # `service stop|start` is the stand-in's own spelling of `ctl stop|start`.
        return cmd_ctl(env.home, env.identity, rest)
    if is_stopped(env.home, env.identity):
        die(dial_error(env.home))
    if cmd == "chat":
        if not rest:
            die("chat: missing subcommand (api, api-listen)")
        if rest[0] == "api":
            from kbwg_standin.api import cmd_chat_api

            return cmd_chat_api(env, rest[1:])
        if rest[0] == "api-listen":
            from kbwg_standin.listen import cmd_api_listen

            return cmd_api_listen(env, rest[1:])
        die(f"chat {rest[0]}: not supported by the keybase stand-in")
    if cmd == "whoami":
        from kbwg_standin.identity import cmd_whoami

        return cmd_whoami(env, rest)
    if cmd == "status":
        from kbwg_standin.identity import cmd_status

        return cmd_status(env, rest)
    if cmd == "fs":
        from kbwg_standin.kbfs import cmd_fs

        return cmd_fs(env, rest)
    die(f"{cmd}: not supported by the keybase stand-in")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (RequestError, UsageError) as exc:
        _print_error(str(exc))
        return EXIT_NOTOK
    except ServiceError as exc:
        _print_error(str(exc))
        return EXIT_NOTOK
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_NOTOK
    except KeyboardInterrupt:
        return 130


def _print_error(message: str) -> None:
    sys.stderr.write(f"\u25b6 ERROR {message}\n")
    sys.stderr.flush()
