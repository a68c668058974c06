"""A stand-in for the `keybase` binary: the documented subset of its CLI JSON API.

Real Keybase cannot be installed where the tests and the demo run, so this executable
implements `keybase chat api`, `keybase chat api-listen`, `keybase whoami`, `keybase status`
and a few `keybase fs` subcommands with the same JSON shapes, message ids, pagination, dev
topics and error behaviour as the real CLI (see shared/reference/keybase-cli-api.md). The
agent must not be able to tell the difference: it only ever talks to "a keybase binary".

Every process is one "device" (``KBWG_STANDIN_USER`` / ``KBWG_STANDIN_DEVICE``) and all
processes share ``KBWG_STANDIN_HOME``: chat lives in a sqlite database in WAL mode (safe for
many concurrent processes, also across network namespaces as long as the filesystem is
shared), KBFS is a plain folder tree under ``kbfs/``.

Environment: ``KBWG_STANDIN_HOME`` (required), ``KBWG_STANDIN_USER`` and
``KBWG_STANDIN_DEVICE`` (unset: logged out), ``KBWG_STANDIN_DELAY_MS`` (messages this process
sends become visible that much later), ``KBWG_STANDIN_POLL_MS`` (api-listen poll, default 20).
Optional ``$KBWG_STANDIN_HOME/teams.json`` (``{"team": ["alice", "bob"]}``) restricts teams.
Like real Keybase, a listener only gets messages of conversations its user is in: #general
of its teams, and channels it created, joined or sent to.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import select
import signal
import sqlite3
import stat as stat_mod
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

logger = logging.getLogger(__name__)

EXIT_OK = 0
# The real CLI exits with ExitCode_NOTOK (2) on any error it prints.
EXIT_NOTOK = 2

TOPIC_TYPES = {"none": 0, "chat": 1, "dev": 2, "kbfsfileedit": 3, "emoji": 4, "emojicross": 5}
CHAT_MAX_BODY = 10_000
OTHER_MAX_BODY = 1_000_000
TOPIC_NAME_RE = re.compile(r"^[0-9a-zA-Z_-]+$")
TOPIC_NAME_MAX = 20
DEFAULT_READ_NUM = 100
DEFAULT_POLL_MS = 20
BUSY_TIMEOUT_S = 30.0
# Methods the real v1 handler knows; the stand-in serves a subset and answers the rest with
# a service error rather than the "invalid v1 method" request error, as the real CLI would
# accept them.
KNOWN_METHODS = frozenset(
    {
        "list", "read", "get", "send", "edit", "reaction", "delete", "attach", "download",
        "setstatus", "mark", "searchinbox", "searchregexp", "newconv", "listconvsonname",
        "join", "leave", "addtochannel", "loadflip", "getunfurlsettings", "setunfurlsettings",
        "advertisecommands", "clearcommands", "listcommands", "pin", "unpin",
        "getresetconvmembers", "addresetconvmember", "getdeviceinfo", "listmembers",
        "emojiadd", "emojiaddalias", "emojiremove", "emojilist",
    }
)  # fmt: skip
CONV_METHODS = frozenset({"read", "get", "send", "join", "leave", "newconv"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS convs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    members_type TEXT NOT NULL,
    topic_type TEXT NOT NULL,
    topic_name TEXT NOT NULL,
    creator TEXT NOT NULL,
    ctime_ms INTEGER NOT NULL,
    last_msg_id INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS convs_by_name ON convs (name, members_type, topic_type);
CREATE TABLE IF NOT EXISTS members (
    conv_id TEXT NOT NULL,
    username TEXT NOT NULL,
    read_upto INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv_id, username)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conv_id TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    device TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    visible_at_ms INTEGER NOT NULL,
    UNIQUE (conv_id, msg_id)
);
"""


class RequestError(Exception):
    """A request the real CLI rejects in its decode loop: printed to stderr, exit 2."""


class ServiceError(Exception):
    """An error the service returns: `{"error": {"code": 0, "message": ...}}`, pipe lives on."""


class UsageError(Exception):
    """Any other command failure: message on stderr, exit 2."""


def now_ms() -> int:
    return int(time.time() * 1000)


def die(message: str) -> NoReturn:
    raise UsageError(message)


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Identity:
    username: str
    device: str

    @property
    def uid(self) -> str:
        return user_uid(self.username)

    @property
    def device_id(self) -> str:
        return hashlib.sha256(f"device|{self.username}|{self.device}".encode()).hexdigest()[:32]


def user_uid(username: str) -> str:
    # Real user ids are 32 hex digits ending in 19; keep that look so nothing is surprised.
    return hashlib.sha256(f"uid|{username}".encode()).hexdigest()[:30] + "19"


@dataclass(frozen=True)
class Env:
    home: Path
    identity: Identity | None
    delay_ms: int
    poll_ms: int

    @classmethod
    def from_environ(cls) -> Env:
        home = os.environ.get("KBWG_STANDIN_HOME", "")
        if not home:
            die(
                "KBWG_STANDIN_HOME is not set: the keybase stand-in needs a shared state "
                "folder (the real keybase would say the service is not running)"
            )
        user = os.environ.get("KBWG_STANDIN_USER", "").strip().lower()
        device = os.environ.get("KBWG_STANDIN_DEVICE", "").strip()
        identity = Identity(user, device) if user and device else None
        return cls(
            home=Path(home),
            identity=identity,
            delay_ms=_int_env("KBWG_STANDIN_DELAY_MS", 0),
            poll_ms=max(1, _int_env("KBWG_STANDIN_POLL_MS", DEFAULT_POLL_MS)),
        )

    def require_identity(self) -> Identity:
        if self.identity is None:
            raise ServiceError(
                "Login required: you are not logged into Keybase "
                "(set KBWG_STANDIN_USER and KBWG_STANDIN_DEVICE for the stand-in)"
            )
        return self.identity

    def team_members(self) -> dict[str, set[str]] | None:
        """teams.json if present; None means everyone is in every team."""
        path = self.home / "teams.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            die(f"cannot read {path}: {exc}")
        if not isinstance(raw, dict):
            die(f"{path}: expected an object mapping team names to lists of usernames")
        return {str(k).lower(): {str(u).lower() for u in v} for k, v in raw.items()}

    def is_team_member(self, team: str, username: str) -> bool:
        teams = self.team_members()
        if teams is None:
            return True
        return username in teams.get(team.lower(), set())


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        die(f"{name} must be an integer, got {raw!r}")


# --------------------------------------------------------------------------- database


def open_db(home: Path) -> sqlite3.Connection:
    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(home / "chat.sqlite3"), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        # Switching to WAL takes an exclusive lock; several processes starting at once may
        # collide on it even with the busy timeout, so retry for a while.
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    return conn


@contextlib.contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so id allocation never needs an upgrade that
    # could deadlock against another writer.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --------------------------------------------------------------------------- channels


def parse_topic_type(value: Any) -> str:
    if value is None or value == "":
        return "chat"
    if not isinstance(value, str) or value.lower() not in TOPIC_TYPES:
        raise RequestError(f"invalid topic type: '{value}'")
    return value.lower()


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    members_type: str
    topic_type: str
    topic_name: str

    @property
    def conv_id(self) -> str:
        key = f"{self.name}|{self.members_type}|{self.topic_type}|{self.topic_name}"
        return hashlib.sha256(key.encode()).hexdigest()[:64]

    @property
    def is_team(self) -> bool:
        return self.members_type == "team"


def canonical_name(name: str, members_type: str) -> str:
    name = name.strip().lower()
    if members_type != "team":
        # Implicit team names are sorted user lists, whatever order the caller used.
        name = ",".join(sorted(p.strip() for p in name.split(",") if p.strip()))
    return name


def channel_from_json(obj: Any, method: str) -> ChannelSpec | None:
    """None when absent/empty, as Go leaves a zero ChatChannel."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise RequestError(
            f"json: cannot unmarshal {_go_type(obj)} into Go struct field "
            f"{method}OptionsV1.channel of type chat1.ChatChannel"
        )
    name = obj.get("name") or ""
    if not isinstance(name, str):
        raise RequestError("json: cannot unmarshal into Go struct field ChatChannel.name")
    if not name:
        return None
    members_type = obj.get("members_type") or "impteamnative"
    if not isinstance(members_type, str) or members_type.lower() not in {
        "team",
        "impteamnative",
        "impteamupgrade",
        "kbfs",
    }:
        raise RequestError(f"invalid {method} v1 options: invalid members type: {members_type}")
    members_type = members_type.lower()
    if members_type in {"kbfs", "impteamupgrade"}:
        members_type = "impteamnative"
    topic_type = parse_topic_type(obj.get("topic_type"))
    topic_name = obj.get("topic_name") or ""
    if not isinstance(topic_name, str):
        raise RequestError("json: cannot unmarshal into Go struct field ChatChannel.topic_name")
    if members_type == "team" and topic_type == "chat" and not topic_name:
        topic_name = "general"
    return ChannelSpec(canonical_name(name, members_type), members_type, topic_type, topic_name)


def _go_type(obj: Any) -> str:
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, (int, float)):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, list):
        return "array"
    return "object"


def validate_topic_name(topic_name: str) -> None:
    if not (1 <= len(topic_name) <= TOPIC_NAME_MAX) or not TOPIC_NAME_RE.match(topic_name):
        raise ServiceError(
            f"invalid channel name {topic_name!r}: must be 1 to {TOPIC_NAME_MAX} characters "
            "of letters, digits, dashes and underscores"
        )


def channel_json(row: sqlite3.Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": row["name"],
        "public": False,
        "members_type": row["members_type"],
        "topic_type": row["topic_type"],
    }
    if row["topic_name"]:
        out["topic_name"] = row["topic_name"]
    return out


def encode_token(msg_id: int) -> str:
    return base64.b64encode(msg_id.to_bytes(4, "big")).decode()


def decode_token(token: Any, field: str) -> int:
    if not isinstance(token, str):
        raise RequestError(
            f"json: cannot unmarshal {_go_type(token)} into Go value of type []uint8"
        )
    try:
        raw = base64.b64decode(token, validate=True)
    except ValueError as exc:
        raise RequestError(f"illegal base64 data in pagination.{field}: {exc}") from exc
    if len(raw) != 4:
        raise ServiceError(f"invalid pagination {field} token")
    return int.from_bytes(raw, "big")


def ratelimits() -> list[dict[str, Any]]:
    reset = 300 - int(time.time()) % 300
    return [{"tank": "chat", "capacity": 9000, "reset": reset, "gas": 8999}]


# --------------------------------------------------------------------------- chat service


class ChatService:
    """The service side of `keybase chat api`, for one identity."""

    def __init__(self, env: Env, conn: sqlite3.Connection) -> None:
        self.env = env
        self.conn = conn

    # ----- conversations

    def conv_row(self, conv_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM convs WHERE id = ?", (conv_id,)
        ).fetchone()
        return row

    def check_access(self, spec: ChannelSpec, me: Identity) -> None:
        if spec.is_team:
            if not self.env.is_team_member(spec.name, me.username):
                raise ServiceError(
                    f"You are not a member of team {spec.name!r} "
                    "(you must be a member of a team to access its conversations)"
                )
        elif me.username not in spec.name.split(","):
            raise ServiceError(f"you are not a member of conversation {spec.name!r}")

    def ensure_conv(self, spec: ChannelSpec, me: Identity) -> sqlite3.Row:
        """Create the conversation if needed (inside a write transaction)."""
        row = self.conv_row(spec.conv_id)
        if row is not None:
            return row
        if spec.is_team or spec.topic_name:
            validate_topic_name(spec.topic_name)
        self.conn.execute(
            "INSERT INTO convs (id, name, members_type, topic_type, topic_name, creator, ctime_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                spec.conv_id,
                spec.name,
                spec.members_type,
                spec.topic_type,
                spec.topic_name,
                me.username,
                now_ms(),
            ),
        )
        created = self.conv_row(spec.conv_id)
        assert created is not None
        return created

    def ensure_general(self, team: str, me: Identity) -> None:
        # A real team always has #general; create it lazily the first time anyone looks.
        spec = ChannelSpec(team, "team", "chat", "general")
        if self.conv_row(spec.conv_id) is None:
            with write_txn(self.conn):
                self.ensure_conv(spec, me)

    def resolve(self, opts: dict[str, Any], me: Identity) -> sqlite3.Row:
        """The existing conversation named by `channel` or `conversation_id`."""
        spec: ChannelSpec | None = opts["_channel"]
        if spec is not None:
            self.check_access(spec, me)
            if spec.is_team and spec.topic_type == "chat" and spec.topic_name == "general":
                self.ensure_general(spec.name, me)
            row = self.conv_row(spec.conv_id)
            if row is None:
                raise ServiceError(f'no conversations matched "{spec.name}"')
            return row
        conv_id: str = opts["conversation_id"]
        row = self.conv_row(conv_id)
        if row is None:
            raise ServiceError(f'no conversations matched "{conv_id}"')
        self.check_access(spec_of(row), me)
        return row

    def is_member(self, row: sqlite3.Row, username: str) -> bool:
        spec = spec_of(row)
        if spec.is_team:
            if not self.env.is_team_member(spec.name, username):
                return False
            if spec.topic_type == "chat" and spec.topic_name == "general":
                return True
        elif username in spec.name.split(","):
            return True
        found = self.conn.execute(
            "SELECT 1 FROM members WHERE conv_id = ? AND username = ?", (row["id"], username)
        ).fetchone()
        return found is not None

    def join_row(self, conv_id: str, username: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO members (conv_id, username) VALUES (?, ?)", (conv_id, username)
        )

    # ----- messages

    def msg_summary(
        self, row: sqlite3.Row, conv: sqlite3.Row, me: Identity, read_upto: int | None
    ) -> dict[str, Any]:
        sender = Identity(row["sender"], row["device"])
        # Own messages are never unread; without a read marker (not a member, only
        # previewing) nothing was read yet.
        unread = sender.username != me.username and row["msg_id"] > (read_upto or 0)
        return {
            "id": row["msg_id"],
            "conversation_id": conv["id"],
            "channel": channel_json(conv),
            "sender": {
                "uid": sender.uid,
                "username": sender.username,
                "device_id": sender.device_id,
                "device_name": sender.device,
            },
            "sent_at": row["sent_at_ms"] // 1000,
            "sent_at_ms": row["sent_at_ms"],
            "content": {
                "type": "text",
                "text": {
                    "body": row["body"],
                    "payments": None,
                    "userMentions": None,
                    "teamMentions": None,
                },
            },
            "prev": None,
            "unread": unread,
            "channel_mention": "none",
        }

    def read_upto(self, conv_id: str, username: str) -> int | None:
        row = self.conn.execute(
            "SELECT read_upto FROM members WHERE conv_id = ? AND username = ?",
            (conv_id, username),
        ).fetchone()
        return None if row is None else int(row["read_upto"])

    def conv_summary(self, conv: sqlite3.Row, me: Identity) -> dict[str, Any]:
        last = self.conn.execute(
            "SELECT MAX(sent_at_ms) AS at, MAX(msg_id) AS id FROM messages"
            " WHERE conv_id = ? AND visible_at_ms <= ?",
            (conv["id"], now_ms()),
        ).fetchone()
        active_ms = int(last["at"] or conv["ctime_ms"])
        upto = self.read_upto(conv["id"], me.username) or 0
        unread = self.conn.execute(
            "SELECT 1 FROM messages WHERE conv_id = ? AND msg_id > ? AND sender != ?"
            " AND visible_at_ms <= ? LIMIT 1",
            (conv["id"], upto, me.username, now_ms()),
        ).fetchone()
        spec = spec_of(conv)
        return {
            "id": conv["id"],
            "channel": channel_json(conv),
            "is_default_conv": spec.is_team
            and spec.topic_type == "chat"
            and spec.topic_name == "general",
            "unread": unread is not None,
            "active_at": active_ms // 1000,
            "active_at_ms": active_ms,
            "member_status": "active" if self.is_member(conv, me.username) else "preview",
            "creator_info": {"ctime": conv["ctime_ms"], "username": conv["creator"]},
        }

    # ----- methods

    def do_send(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        body: str = opts["_body"]
        sent = now_ms()
        with write_txn(self.conn):
            spec: ChannelSpec | None = opts["_channel"]
            if spec is not None:
                self.check_access(spec, me)
                conv = self.ensure_conv(spec, me)
            else:
                found = self.conv_row(opts["conversation_id"])
                if found is None:
                    raise ServiceError(f'no conversations matched "{opts["conversation_id"]}"')
                self.check_access(spec_of(found), me)
                conv = found
            limit = CHAT_MAX_BODY if conv["topic_type"] == "chat" else OTHER_MAX_BODY
            if len(body.encode()) > limit:
                raise ServiceError(f"message exceeds the maximum length of {limit} bytes")
            self.conn.execute(
                "UPDATE convs SET last_msg_id = last_msg_id + 1 WHERE id = ?", (conv["id"],)
            )
            msg_id = int(
                self.conn.execute(
                    "SELECT last_msg_id FROM convs WHERE id = ?", (conv["id"],)
                ).fetchone()[0]
            )
            self.conn.execute(
                "INSERT INTO messages (conv_id, msg_id, sender, device, body, sent_at_ms,"
                " visible_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    conv["id"],
                    msg_id,
                    me.username,
                    me.device,
                    body,
                    sent,
                    sent + max(0, self.env.delay_ms),
                ),
            )
            # Sending joins the channel (the real sender joins from preview mode).
            self.join_row(conv["id"], me.username)
            self.conn.execute(
                "UPDATE members SET read_upto = MAX(read_upto, ?)"
                " WHERE conv_id = ? AND username = ?",
                (msg_id, conv["id"], me.username),
            )
        return {"message": "message sent", "id": msg_id, "ratelimits": ratelimits()}

    def do_read(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        conv = self.resolve(opts, me)
        num, nxt, prev = opts["_pagination"]
        now = now_ms()
        if prev is not None:
            rows = self.conn.execute(
                "SELECT * FROM messages WHERE conv_id = ? AND visible_at_ms <= ? AND msg_id > ?"
                " ORDER BY msg_id ASC LIMIT ?",
                (conv["id"], now, prev, num),
            ).fetchall()
            rows.reverse()
        else:
            pivot = nxt if nxt is not None else 2**31
            rows = self.conn.execute(
                "SELECT * FROM messages WHERE conv_id = ? AND visible_at_ms <= ? AND msg_id < ?"
                " ORDER BY msg_id DESC LIMIT ?",
                (conv["id"], now, pivot, num),
            ).fetchall()
        upto = self.read_upto(conv["id"], me.username)
        messages = [{"msg": self.msg_summary(r, conv, me, upto)} for r in rows]
        pagination: dict[str, Any] = {"next": None, "previous": None, "num": len(rows)}
        if rows:
            oldest, newest = rows[-1]["msg_id"], rows[0]["msg_id"]
            pagination["next"] = encode_token(oldest)
            pagination["previous"] = encode_token(newest)
            older = self.conn.execute(
                "SELECT 1 FROM messages WHERE conv_id = ? AND visible_at_ms <= ? AND msg_id < ?"
                " LIMIT 1",
                (conv["id"], now, oldest),
            ).fetchone()
            pagination["last"] = older is None
            if not opts.get("peek") and upto is not None and newest > upto:
                with write_txn(self.conn):
                    self.conn.execute(
                        "UPDATE members SET read_upto = MAX(read_upto, ?)"
                        " WHERE conv_id = ? AND username = ?",
                        (newest, conv["id"], me.username),
                    )
        else:
            pagination["last"] = True
        return {
            "messages": messages,
            "pagination": pagination,
            "offline": False,
            "ratelimits": ratelimits(),
        }

    def do_get(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        conv = self.resolve(opts, me)
        ids = opts.get("message_ids")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise RequestError("invalid get v1 options: message_ids must be a list of numbers")
        upto = self.read_upto(conv["id"], me.username)
        messages = []
        for msg_id in ids:
            row = self.conn.execute(
                "SELECT * FROM messages WHERE conv_id = ? AND msg_id = ? AND visible_at_ms <= ?",
                (conv["id"], msg_id, now_ms()),
            ).fetchone()
            if row is None:
                raise ServiceError(f"message {msg_id} not found")
            messages.append({"msg": self.msg_summary(row, conv, me, upto)})
        return {"messages": messages, "offline": False, "ratelimits": ratelimits()}

    def do_list(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        topic_type = parse_topic_type(opts.get("topic_type"))
        rows = self.conn.execute(
            "SELECT * FROM convs WHERE topic_type = ? ORDER BY ctime_ms", (topic_type,)
        ).fetchall()
        convs = [self.conv_summary(r, me) for r in rows if self.is_member(r, me.username)]
        convs.sort(key=lambda c: c["active_at_ms"], reverse=True)
        return {"conversations": convs, "offline": False}

    def do_listconvsonname(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        name = opts.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("invalid listconvsonname v1 options: missing name")
        members_type = str(opts.get("members_type") or "team").lower()
        topic_type = parse_topic_type(opts.get("topic_type"))
        name = canonical_name(name, members_type)
        spec = ChannelSpec(name, members_type, topic_type, "")
        self.check_access(spec, me)
        if members_type == "team":
            self.ensure_general(name, me)
        rows = self.conn.execute(
            "SELECT * FROM convs WHERE name = ? AND members_type = ? AND topic_type = ?"
            " ORDER BY topic_name",
            (name, members_type, topic_type),
        ).fetchall()
        return {
            "conversations": [self.conv_summary(r, me) for r in rows],
            "offline": False,
            "ratelimits": ratelimits(),
        }

    def do_newconv(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        spec: ChannelSpec | None = opts["_channel"]
        if spec is None:
            raise RequestError("invalid newconv v1 options: need channel")
        self.check_access(spec, me)
        with write_txn(self.conn):
            conv = self.ensure_conv(spec, me)
            self.join_row(conv["id"], me.username)
        return {"id": conv["id"], "ratelimits": ratelimits()}

    def do_join(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        conv = self.resolve(opts, me)
        with write_txn(self.conn):
            self.join_row(conv["id"], me.username)
        return {"ratelimits": ratelimits()}

    def do_leave(self, opts: dict[str, Any], me: Identity) -> dict[str, Any]:
        conv = self.resolve(opts, me)
        with write_txn(self.conn):
            self.conn.execute(
                "DELETE FROM members WHERE conv_id = ? AND username = ?",
                (conv["id"], me.username),
            )
        return {"ratelimits": ratelimits()}

    def handle(self, method: str, opts: dict[str, Any]) -> dict[str, Any]:
        me = self.env.require_identity()
        handlers: dict[str, Callable[[dict[str, Any], Identity], dict[str, Any]]] = {
            "send": self.do_send,
            "read": self.do_read,
            "get": self.do_get,
            "list": self.do_list,
            "listconvsonname": self.do_listconvsonname,
            "newconv": self.do_newconv,
            "join": self.do_join,
            "leave": self.do_leave,
        }
        handler = handlers.get(method)
        if handler is None:
            raise ServiceError(f"method {method!r} is not supported by the keybase stand-in")
        return handler(opts, me)


def spec_of(row: sqlite3.Row) -> ChannelSpec:
    return ChannelSpec(row["name"], row["members_type"], row["topic_type"], row["topic_name"])


# --------------------------------------------------------------------------- chat api


def check_options(method: str, options: Any) -> dict[str, Any]:
    """Decode-loop validation, as the real CLI's option Check(): failures are RequestError."""
    if options is None:
        if method in CONV_METHODS:
            raise RequestError(f"invalid {method} v1 options: empty options")
        options = {}
    if not isinstance(options, dict):
        raise RequestError(
            f"json: cannot unmarshal {_go_type(options)} into Go value of type "
            f"client.{method}OptionsV1"
        )
    opts = dict(options)
    if method in CONV_METHODS:
        spec = channel_from_json(opts.get("channel"), method)
        conv_id = opts.get("conversation_id") or ""
        if not isinstance(conv_id, str):
            raise RequestError(
                f"json: cannot unmarshal {_go_type(conv_id)} into Go struct field "
                f"{method}OptionsV1.conversation_id of type string"
            )
        if spec is None and not conv_id:
            raise RequestError(f"invalid {method} v1 options: need channel or conversation_id")
        if spec is not None and conv_id:
            raise RequestError(
                f"invalid {method} v1 options: include channel or conversation_id, not both"
            )
        opts["_channel"] = spec
        opts["conversation_id"] = conv_id
    if method == "send":
        message = opts.get("message")
        body = message.get("body") if isinstance(message, dict) else None
        if body is not None and not isinstance(body, str):
            raise RequestError(
                f"json: cannot unmarshal {_go_type(body)} into Go struct field "
                "ChatMessage.message.body of type string"
            )
        if not body:
            raise RequestError("invalid send v1 options: invalid message, body cannot be empty")
        # Go replaces invalid UTF-8 (here: lone surrogates) rather than failing.
        opts["_body"] = body.encode("utf-8", "replace").decode("utf-8")
    if method == "read":
        pag = opts.get("pagination") or {}
        if not isinstance(pag, dict):
            raise RequestError("invalid read v1 options: pagination must be an object")
        num = pag.get("num") or 0
        if not isinstance(num, int) or isinstance(num, bool):
            raise RequestError("json: cannot unmarshal into Go struct field Pagination.num")
        nxt = decode_token(pag["next"], "next") if pag.get("next") else None
        prev = decode_token(pag["previous"], "previous") if pag.get("previous") else None
        opts["_pagination"] = (num if num > 0 else DEFAULT_READ_NUM, nxt, prev)
    if method == "list" and "topic_type" in opts:
        try:
            parse_topic_type(opts["topic_type"])
        except RequestError as exc:
            raise RequestError(f"invalid list v1 options: {exc}") from exc
    return opts


class ChatApi:
    def __init__(self, service: ChatService | None, out: IO[bytes], pretty: bool) -> None:
        self.service = service
        self.out = out
        self.pretty = pretty

    def handle_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            raise RequestError(
                f"json: cannot unmarshal {_go_type(call)} into Go value of type client.Call"
            )
        method = call.get("method")
        if not isinstance(method, str):
            raise RequestError("json: cannot unmarshal into Go struct field Call.method")
        params = call.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("json: cannot unmarshal into Go struct field Call.params")
        version = params.get("version", 1) or 1
        if version != 1:
            raise RequestError(f"invalid version {version}")
        if method not in KNOWN_METHODS:
            raise RequestError(f'invalid v1 method "{method}"')
        try:
            opts = check_options(method, params.get("options"))
        except RequestError as exc:
            msg = str(exc)
            if msg.startswith("invalid topic type"):
                msg = f"invalid {method} v1 options: {msg}"
            raise RequestError(msg) from exc
        reply: dict[str, Any]
        try:
            if self.service is None:
                raise ServiceError("the keybase stand-in has no service state")
            reply = {"result": self.service.handle(method, opts)}
        except ServiceError as exc:
            reply = {"error": {"code": 0, "message": str(exc)}}
        for key in ("jsonrpc", "id"):
            if call.get(key):
                reply[key] = call[key]
        text = json.dumps(
            reply,
            indent=4 if self.pretty else None,
            separators=None if self.pretty else (",", ":"),
            ensure_ascii=False,
        )
        # Always UTF-8, as Go writes it, whatever the locale says.
        self.out.write(text.encode("utf-8", "replace") + b"\n")
        self.out.flush()


def iter_json_values(lines: Iterator[str]) -> Iterator[Any]:
    """JSON values from a stream, like Go's json.Decoder (several per line, or one spread
    over lines). Raises RequestError on invalid input."""
    decoder = json.JSONDecoder()
    pending = ""
    for line in lines:
        pending += line
        while True:
            stripped = pending.lstrip()
            if not stripped:
                pending = ""
                break
            try:
                value, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError as exc:
                if _looks_incomplete(stripped, exc):
                    pending = stripped
                    break
                raise RequestError(f"invalid character in JSON input: {exc.msg}") from exc
            yield value
            pending = stripped[end:]
    if pending.strip():
        raise RequestError("unexpected EOF")


def _looks_incomplete(text: str, exc: json.JSONDecodeError) -> bool:
    if exc.msg.startswith("Unterminated string"):
        return True
    return exc.pos >= len(text.rstrip())


def cmd_chat_api(env: Env, args: Sequence[str]) -> int:
    message: str | None = None
    infile: str | None = None
    outfile: str | None = None
    pretty = False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--message"):
            message = _next_arg(it, arg)
        elif arg in ("-i", "--infile"):
            infile = _next_arg(it, arg)
        elif arg in ("-o", "--outfile"):
            outfile = _next_arg(it, arg)
        elif arg in ("-p", "--pretty"):
            pretty = True
        elif arg.startswith("-m="):
            message = arg[3:]
        else:
            die(f"unknown flag for chat api: {arg}")
    # Closed explicitly below, after the loop: it lives as long as the pipe.
    out: IO[bytes] = open(outfile, "wb") if outfile else sys.stdout.buffer  # noqa: SIM115
    conn = open_db(env.home)
    api = ChatApi(ChatService(env, conn), out, pretty)
    lines: Iterator[str]
    if message is not None:
        lines = iter([message])
    elif infile is not None:
        lines = iter(Path(infile).read_text().splitlines(keepends=True))
    else:
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        lines = iter(stdin.readline, "")
    try:
        for call in iter_json_values(lines):
            api.handle_call(call)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        conn.close()
    return EXIT_OK


def _next_arg(it: Iterator[str], flag: str) -> str:
    try:
        return next(it)
    except StopIteration:
        die(f"flag {flag} needs an argument")


# --------------------------------------------------------------------------- api-listen


@dataclass
class ListenOptions:
    dev: bool = False
    local: bool = False
    hide_exploding: bool = False
    convs: bool = False
    wallet: bool = False
    filters: list[Any] = dataclasses.field(default_factory=list)


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
            raw = value if value is not None else _next_arg(it, flag)
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

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        out.flush()

    try:
        while not stop["flag"]:
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


# --------------------------------------------------------------------------- identity


def cmd_whoami(env: Env, args: Sequence[str]) -> int:
    as_json = False
    for arg in args:
        if arg in ("-j", "--json"):
            as_json = True
        else:
            die(f"unknown flag for whoami: {arg}")
    me = env.identity
    if me is None:
        die("Not logged in: no user is logged into Keybase on this device")
    if as_json:
        status = {
            "configured": True,
            "registered": True,
            "loggedIn": True,
            "sessionIsValid": True,
            "user": {"uid": me.uid, "username": me.username},
            "deviceName": me.device,
        }
        print(json.dumps(status, separators=(",", ":")))
    else:
        print(me.username)
    return EXIT_OK


def cmd_status(env: Env, args: Sequence[str]) -> int:
    as_json = any(a in ("-j", "--json") for a in args)
    me = env.identity
    logged_in = me is not None
    device: dict[str, Any] | None = None
    if me is not None:
        ctime = now_ms()
        device = {
            "type": "desktop",
            "name": me.device,
            "deviceID": me.device_id,
            "deviceNumberOfType": 0,
            "cTime": ctime,
            "mTime": ctime,
            "lastUsedTime": ctime,
            "encryptKey": "",
            "verifyKey": "",
            "status": 0,
        }
    status = {
        "Username": me.username if me else "",
        "UserID": me.uid if me else "",
        "Device": device,
        "LoggedIn": logged_in,
        "SessionIsValid": logged_in,
        "KBFS": {"Version": STANDIN_VERSION, "Running": True, "Pid": str(os.getpid()), "Log": ""},
        "Service": {
            "Version": STANDIN_VERSION,
            "Running": True,
            "Pid": str(os.getpid()),
            "Log": "",
        },
        "ConfigPath": str(env.home / "config.json"),
        "DefaultUsername": me.username if me else "",
        "ProvisionedUsernames": [me.username] if me else [],
    }
    if as_json:
        print(json.dumps(status, separators=(",", ":")))
    else:
        print(f"Username:      {status['Username']}")
        print(f"Logged in:     {'yes' if logged_in else 'no'}")
        if me is not None:
            print(f"Device name:   {me.device}")
    return EXIT_OK


STANDIN_VERSION = "6.2.4-kbwg-standin"


def cmd_version(_env: Env | None, _args: Sequence[str]) -> int:
    print(f"Client:  {STANDIN_VERSION}")
    print(f"Service: {STANDIN_VERSION}")
    return EXIT_OK


# --------------------------------------------------------------------------- kbfs


@dataclass(frozen=True)
class KbfsPath:
    shown: str  # as the user wrote it, for messages
    kbfs: str  # normalised KBFS path, e.g. /team/t/x
    local: Path


def kbfs_path(env: Env, arg: str) -> KbfsPath:
    if arg.startswith("keybase://"):
        rest = "/" + arg[len("keybase://") :]
    elif arg == "/keybase" or arg.startswith("/keybase/"):
        rest = arg[len("/keybase") :] or "/"
    else:
        die(f"{arg}: not a KBFS path (KBFS paths start with /keybase/ or keybase://)")
    norm = posixpath.normpath("/" + rest.lstrip("/"))
    if norm.startswith("//"):
        norm = norm[1:]
    parts = [p for p in norm.split("/") if p]
    if parts and parts[0] not in ("team", "private", "public"):
        die(f"{arg}: file does not exist")
    return KbfsPath(arg, norm, env.home.joinpath("kbfs", *parts))


def check_kbfs_access(env: Env, path: KbfsPath, write: bool) -> None:
    parts = [p for p in path.kbfs.split("/") if p]
    if len(parts) < 2:
        return
    me = env.identity
    if me is None:
        die("Login required: you are not logged into Keybase")
    kind, folder = parts[0], parts[1]
    if kind == "team":
        if not env.is_team_member(folder, me.username):
            die(f"{path.shown}: permission denied: {me.username} is not a member of team {folder}")
    elif kind == "private":
        if me.username not in folder.lower().split(","):
            die(f"{path.shown}: permission denied")
    elif kind == "public" and write and me.username not in folder.lower().split(","):
        die(f"{path.shown}: permission denied")


def _is_tlf_root_or_above(path: KbfsPath) -> bool:
    return len([p for p in path.kbfs.split("/") if p]) <= 2


def _not_found(path: KbfsPath) -> NoReturn:
    die(f"{path.shown}: file does not exist")


def atomic_write(target: Path, data: bytes) -> None:
    # Readers must never see half a file: write beside it, then rename over it.
    fd, tmp = tempfile.mkstemp(prefix=".standin-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_fs(env: Env, args: Sequence[str]) -> int:
    if not args:
        die("fs: missing subcommand (read, write, mkdir, ls, stat, rm)")
    sub, rest = args[0], list(args[1:])
    flags = [a for a in rest if a.startswith("-") and a != "-"]
    positional = [a for a in rest if not (a.startswith("-") and a != "-")]
    if sub in ("-b", "--buffersize"):
        die("fs: flags go after the subcommand")
    # -b/--buffersize and --rev take a value; drop it from the positionals.
    for flag in ("-b", "--buffersize", "--rev"):
        if flag in rest:
            idx = rest.index(flag)
            if idx + 1 < len(rest) and rest[idx + 1] in positional:
                positional.remove(rest[idx + 1])
    if not positional:
        die(f"fs {sub}: missing path")
    handlers: dict[str, Callable[[Env, list[KbfsPath], list[str]], int]] = {
        "read": _fs_read,
        "write": _fs_write,
        "mkdir": _fs_mkdir,
        "ls": _fs_ls,
        "stat": _fs_stat,
        "rm": _fs_rm,
    }
    handler = handlers.get(sub)
    if handler is None:
        die(f"fs {sub}: not supported by the keybase stand-in")
    paths = [kbfs_path(env, p) for p in positional]
    return handler(env, paths, flags)


def _fs_read(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    path = paths[0]
    check_kbfs_access(env, path, write=False)
    try:
        data = path.local.read_bytes()
    except FileNotFoundError:
        _not_found(path)
    except IsADirectoryError:
        die(f"{path.shown}: is a directory")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _fs_write(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    path = paths[0]
    if _is_tlf_root_or_above(path):
        die(f"{path.shown}: cannot write to a folder root")
    check_kbfs_access(env, path, write=True)
    parent = path.local.parent
    if not parent.is_dir():
        if len([p for p in path.kbfs.split("/") if p]) == 3:
            # The team/private/public folder itself always exists in real KBFS.
            parent.mkdir(parents=True, exist_ok=True)
        else:
            die(f"{path.shown}: parent folder does not exist (create it with keybase fs mkdir)")
    if path.local.is_dir():
        die(f"{path.shown}: is a directory")
    data = sys.stdin.buffer.read()
    if "-a" in flags or "--append" in flags:
        # Appends are read-modify-write; serialise them per file. The lock lives outside
        # the KBFS tree so listings stay clean.
        lock_dir = env.home / "kbfs-locks"
        lock_dir.mkdir(exist_ok=True)
        lock_path = lock_dir / hashlib.sha256(path.kbfs.encode()).hexdigest()
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                old = path.local.read_bytes()
            except FileNotFoundError:
                old = b""
            atomic_write(path.local, old + data)
    else:
        atomic_write(path.local, data)
    return EXIT_OK


def _fs_mkdir(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    for path in paths:
        check_kbfs_access(env, path, write=True)
        if path.local.exists() and not path.local.is_dir():
            die(f"{path.shown}: file exists")
        path.local.mkdir(parents=True, exist_ok=True)
    return EXIT_OK


def _entry_exists(path: KbfsPath) -> bool:
    return path.local.exists() or _is_tlf_root_or_above(path)


def _fs_ls(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    long = "-l" in flags or "--long" in flags
    for path in paths:
        check_kbfs_access(env, path, write=False)
        if not _entry_exists(path):
            _not_found(path)
        if path.local.is_file():
            names = [path.local.name]
            base = path.local.parent
        else:
            base = path.local
            names = sorted(
                n
                for n in (os.listdir(base) if base.is_dir() else [])
                if not n.startswith(".standin-")
            )
        for name in names:
            if long:
                st = (base / name).stat()
                kind = "DIR" if stat_mod.S_ISDIR(st.st_mode) else "FILE"
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
                print(f"{stamp}\t{kind}\t{st.st_size}\t{name}")
            else:
                print(name)
    return EXIT_OK


def _fs_stat(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    path = paths[0]
    check_kbfs_access(env, path, write=False)
    if not path.local.exists():
        if _is_tlf_root_or_above(path):
            path.local.mkdir(parents=True, exist_ok=True)
        else:
            _not_found(path)
    st = path.local.stat()
    kind = "DIR" if stat_mod.S_ISDIR(st.st_mode) else "FILE"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(st.st_mtime))
    writer = env.identity.username if env.identity else ""
    print(path.shown)
    print(f"{stamp}\t{kind}\t{st.st_size}\t{path.local.name}\t{writer}\tComplete")
    return EXIT_OK


def _fs_rm(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    recursive = "-r" in flags or "--recursive" in flags
    for path in paths:
        check_kbfs_access(env, path, write=True)
        if _is_tlf_root_or_above(path):
            die(f"{path.shown}: cannot remove a folder root")
        if not path.local.exists():
            _not_found(path)
        if path.local.is_dir():
            if not recursive:
                die(f"{path.shown}: is a directory (use -r)")
            for root, dirs, files in os.walk(path.local, topdown=False):
                for name in files:
                    os.unlink(os.path.join(root, name))
                for name in dirs:
                    os.rmdir(os.path.join(root, name))
            os.rmdir(path.local)
        else:
            path.local.unlink()
    return EXIT_OK


# --------------------------------------------------------------------------- entry point

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
        die("usage: keybase [global flags] <chat api|chat api-listen|whoami|status|fs ...>")
    cmd, rest = args[0], args[1:]
    if cmd == "version":
        return cmd_version(None, rest)
    env = Env.from_environ()
    if cmd == "chat":
        if not rest:
            die("chat: missing subcommand (api, api-listen)")
        if rest[0] == "api":
            return cmd_chat_api(env, rest[1:])
        if rest[0] == "api-listen":
            return cmd_api_listen(env, rest[1:])
        die(f"chat {rest[0]}: not supported by the keybase stand-in")
    if cmd == "whoami":
        return cmd_whoami(env, rest)
    if cmd == "status":
        return cmd_status(env, rest)
    if cmd == "fs":
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


if __name__ == "__main__":
    sys.exit(main())
