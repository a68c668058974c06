"""`keybase chat api-listen`: one JSON line per chat message this user may see, as it
becomes visible, until the reader goes away or a signal arrives.

Like real Keybase, a listener only gets messages of conversations its user is in: #general
of its teams, and channels it created, joined or sent to.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from kbwg_standin.channels import channel_from_json, encode_token
from kbwg_standin.ctl import LOST, is_stopped
from kbwg_standin.env import Env, Identity
from kbwg_standin.errors import EXIT_OK, RequestError, die, next_arg
from kbwg_standin.service import ChatService
from kbwg_standin.store import now_ms, open_db


class ListenOptions:
    """api-listen's flags (a plain class: `dataclasses` costs every listener's start
    more CPU than the rest of its imports)."""

    def __init__(self) -> None:
        self.dev = False
        self.local = False
        self.hide_exploding = False
        self.convs = False
        self.wallet = False
        self.filters: list[Any] = []


def parse_listen_args(args: Sequence[str]) -> ListenOptions:
    opts = ListenOptions()
    it = iter(args)
    for arg in it:
        flag, _, inline = arg.partition("=")
        value = inline if inline else None
        if flag == "--dev":
            opts.dev = True
        elif flag == "--local":
            opts.local = True
        elif flag == "--hide-exploding":
            opts.hide_exploding = True
        elif flag == "--convs":
            opts.convs = True
        elif flag == "--wallet":
            opts.wallet = True
        elif flag in ("--filter-channel", "--filter-channels"):
            raw = value if value is not None else next_arg(it, flag)
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                die(f"invalid {flag} JSON: {exc}")
            if flag == "--filter-channel":
                opts.filters.append(parsed)
            elif isinstance(parsed, list):
                opts.filters.extend(parsed)
            else:
                die("--filter-channels expects a JSON array of channels")
        else:
            die(f"unknown flag for chat api-listen: {arg}")
    return opts


def resolve_filters(service: ChatService, me: Identity, filters: list[Any]) -> set[str] | None:
    if not filters:
        return None
    conv_ids: set[str] = set()
    for raw in filters:
        try:
            spec = channel_from_json(raw, "listen")
        except RequestError as exc:
            die(str(exc))
        if spec is None:
            die("invalid filter channel: missing name")
        if isinstance(raw, dict) and not raw.get("topic_name") and spec.is_team:
            # A team filter without a topic expands to all of the team's conversations of
            # that topic type, as they exist now.
            if spec.topic_type == "chat":
                service.ensure_general(spec.name, me)
            rows = service.conn.execute(
                "SELECT id FROM convs WHERE name = ? AND members_type = 'team' AND topic_type = ?",
                (spec.name, spec.topic_type),
            ).fetchall()
            conv_ids.update(r["id"] for r in rows)
        else:
            if spec.is_team and spec.topic_type == "chat" and spec.topic_name == "general":
                service.ensure_general(spec.name, me)
            if service.conv_row(spec.conv_id) is not None:
                conv_ids.add(spec.conv_id)
    if not conv_ids:
        die("no conversations matched")
    return conv_ids


class StopListening(Exception):
    pass


def cmd_api_listen(env: Env, args: Sequence[str]) -> int:
    opts = parse_listen_args(args)
    if env.identity is None:
        die("Login required: you are not logged into Keybase")
    me = env.identity
    conn = open_db(env.home)
    service = ChatService(env, conn)
    filter_ids = resolve_filters(service, me, opts.filters)
    stop = {"flag": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Taken before the status line, so anything sent after a reader saw it gets delivered.
    row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()
    floor = int(row[0])  # every seq <= floor was either delivered or predates the listener
    sys.stderr.write(
        "Listening for chat notifications. Config: "
        f"hideExploding: {str(opts.hide_exploding).lower()}, "
        f"showDev: {str(opts.dev).lower()}, showLocal: {str(opts.local).lower()}, "
        f"wallet: {str(opts.wallet).lower()}, convs: {str(opts.convs).lower()}, "
        f"filters: {len(opts.filters)}\n"
    )
    sys.stderr.flush()

    out = sys.stdout.buffer
    out_fd = out.fileno()
    poller = select.poll()
    # Registered with no events: poll still reports POLLERR/POLLHUP once the reader of our
    # stdout pipe has gone away, so an idle listener notices its parent vanished.
    poller.register(out_fd, 0)
    delivered: set[int] = set()
    conv_cache: dict[str, sqlite3.Row] = {}
    dropping = dict(env.drop_pushes)

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        out.flush()

    try:
        while not stop["flag"]:
            if is_stopped(env.home, me):
                # The real listener pings its service every second and exits when that
                # fails; nothing it missed meanwhile is replayed by the next one.
                die(LOST)
            now = now_ms()
            next_due: int | None = None
            rows = conn.execute(
                "SELECT * FROM messages WHERE seq > ? ORDER BY seq", (floor,)
            ).fetchall()
            contiguous = True
            for msg in rows:
                seq = int(msg["seq"])
                if seq in delivered:
                    if contiguous:
                        floor = seq
                    continue
                if msg["visible_at_ms"] > now:
                    # Delayed message: keep the floor below it, look again when it is due.
                    contiguous = False
                    due = int(msg["visible_at_ms"])
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                delivered.add(seq)
                if contiguous:
                    floor = seq
                conv = conv_cache.get(msg["conv_id"]) or service.conv_row(msg["conv_id"])
                if conv is None:
                    continue
                conv_cache[msg["conv_id"]] = conv
                if not _wanted(service, conv, me, opts, filter_ids):
                    continue
                if msg["sender"] != me.username and _drop(dropping, conv["topic_type"]):
                    continue
                summary = service.msg_summary(msg, conv, me, None)
                summary["unread"] = msg["sender"] != me.username
                pagination = {
                    "next": encode_token(int(msg["msg_id"])),
                    "previous": encode_token(int(msg["msg_id"])),
                    "num": 1,
                    "last": False,
                }
                if opts.local and msg["sender"] == me.username and msg["device"] == me.device:
                    emit(
                        {
                            "type": "chat",
                            "source": "local",
                            "msg": summary,
                            "pagination": pagination,
                        }
                    )
                emit({"type": "chat", "source": "remote", "msg": summary, "pagination": pagination})
            delivered = {s for s in delivered if s > floor}
            timeout = env.poll_ms
            if next_due is not None:
                timeout = max(1, min(timeout, next_due - now_ms()))
            for _fd, event in poller.poll(timeout):
                if event & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise StopListening
    except (BrokenPipeError, StopListening):
        # Our reader is gone; nobody is left to tell. Keep interpreter shutdown from
        # complaining about flushing a dead pipe.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out_fd)
    finally:
        conn.close()
    return EXIT_OK


def _drop(dropping: dict[str, int | None], topic_type: str) -> bool:
    """KBWG_STANDIN_DROP_PUSHES: whether this push is lost (counting it)."""
    if topic_type not in dropping:
        return False
    left = dropping[topic_type]
    if left is None:
        return True
    if left <= 0:
        return False
    dropping[topic_type] = left - 1
    return True


def _wanted(
    service: ChatService,
    conv: sqlite3.Row,
    me: Identity,
    opts: ListenOptions,
    filter_ids: set[str] | None,
) -> bool:
    topic_type = conv["topic_type"]
    # The notify router sends CHAT activity to every chat listener and DEV activity only to
    # those subscribed to chatdev; other topic types go elsewhere.
    if topic_type == "dev":
        if not opts.dev:
            return False
    elif topic_type != "chat":
        return False
    if filter_ids is not None and conv["id"] not in filter_ids:
        return False
    return service.is_member(conv, me.username)
