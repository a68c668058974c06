"""The shared chat database: its schema, how to open it and how to write to it.

Every stand-in process opens the same sqlite file in WAL mode, which is safe for many
concurrent processes (also across network namespaces, as long as the filesystem is shared).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

BUSY_TIMEOUT_S = 30.0

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


# visible_at_ms of a held message (KBWG_STANDIN_HOLD): later than any real time, so every
# reader treats it as a delayed message that is not due yet, until release_held.
HELD_MS = 2**62


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every timestamp in the database."""
    return int(time.time() * 1000)


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


def held_marker(home: Path, username: str) -> Path:
    """While this file exists, the messages `username` sends are held as with
    KBWG_STANDIN_HOLD (`hold_sends`)."""
    return home / "held" / username.strip().lower()


def hold_sends(home: Path, username: str, hold: bool = True) -> None:
    """From now on the messages `username` sends are held (or, `hold` False, no longer):
    a test's way to cut one device off the chat while it runs."""
    marker = held_marker(home, username)
    if hold:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    else:
        marker.unlink(missing_ok=True)


def release_held(home: Path, username: str | None = None) -> int:
    """Make the held messages (of `username`, or everyone's) visible now; how many.

    The counterpart of KBWG_STANDIN_HOLD for a test that needs "sent first, seen later"
    in a definite order: listeners pick them up on their next poll.
    """
    conn = open_db(home)
    try:
        with write_txn(conn):
            sql = "UPDATE messages SET visible_at_ms = ? WHERE visible_at_ms = ?"
            params: tuple[object, ...] = (now_ms(), HELD_MS)
            if username is not None:
                sql += " AND sender = ?"
                params += (username.strip().lower(),)
            return conn.execute(sql, params).rowcount
    finally:
        conn.close()


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
