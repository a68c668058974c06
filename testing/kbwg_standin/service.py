"""The service side of `keybase chat api`: conversations, membership and messages in the
shared database, as seen by one identity."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from kbwg_standin.channels import (
    ChannelSpec,
    canonical_name,
    channel_json,
    encode_token,
    parse_topic_type,
    spec_of,
    validate_topic_name,
)
from kbwg_standin.env import Env, Identity
from kbwg_standin.errors import RequestError, ServiceError
from kbwg_standin.store import HELD_MS, held_marker, now_ms, write_txn

CHAT_MAX_BODY = 10_000
OTHER_MAX_BODY = 1_000_000


def ratelimits() -> list[dict[str, Any]]:
    reset = 300 - int(time.time()) % 300
    return [{"tank": "chat", "capacity": 9000, "reset": reset, "gas": 8999}]


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
            self.check_rate(me, sent)
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
                    HELD_MS if self.holding(me) else sent + max(0, self.env.delay_ms),
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

    def holding(self, me: Identity) -> bool:
        """Whether what `me` sends now is held (KBWG_STANDIN_HOLD, or `hold_sends`)."""
        return self.env.hold or held_marker(self.env.home, me.username).exists()

    def check_rate(self, me: Identity, now: int) -> None:
        """KBWG_STANDIN_RATE_LIMIT: the real service's ChatRateLimitError, whose RateLimit
        (name, callsRemaining, windowReset in seconds, maxCalls) the CLI puts into the
        error's `data`."""
        if self.env.rate_limit is None:
            return
        max_calls, window_s = self.env.rate_limit
        rows = self.conn.execute(
            "SELECT sent_at_ms FROM messages WHERE sender = ? AND sent_at_ms > ?"
            " ORDER BY sent_at_ms",
            (me.username, now - window_s * 1000),
        ).fetchall()
        if len(rows) < max_calls:
            return
        oldest = int(rows[0]["sent_at_ms"]) if rows else now
        reset = max(1, -(-(oldest + window_s * 1000 - now) // 1000))
        raise ServiceError(
            "API rate limit exceeded",
            {"name": "chat", "callsRemaining": 0, "windowReset": reset, "maxCalls": max_calls},
        )

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
        if spec.is_team and spec.topic_type == "chat" and spec.topic_name == "general":
            self.ensure_general(spec.name, me)
        with write_txn(self.conn):
            existing = self.conv_row(spec.conv_id)
            if existing is not None and spec.is_team:
                # The real service refuses a team channel name already in use (chat
                # DuplicateTopicNameError), also to its creator: `join` it instead.
                raise ServiceError(
                    f"channel name {spec.topic_name} is already in use in {spec.name}"
                )
            conv = existing if existing is not None else self.ensure_conv(spec, me)
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
