"""Who this process is and where the shared state lives, from ``KBWG_STANDIN_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from kbwg_standin.errors import ServiceError, die

# Records are NamedTuples, not dataclasses, and hashlib and json load only when used:
# every `keybase` call is a new stand-in process, and `dataclasses` alone (it loads
# `inspect`) costs more CPU than `whoami` or `fs read` does otherwise.

DEFAULT_POLL_MS = 20


class Identity(NamedTuple):
    username: str
    device: str

    @property
    def uid(self) -> str:
        return user_uid(self.username)

    @property
    def device_id(self) -> str:
        import hashlib

        return hashlib.sha256(f"device|{self.username}|{self.device}".encode()).hexdigest()[:32]


def user_uid(username: str) -> str:
    import hashlib

    # Real user ids are 32 hex digits ending in 19; keep that look so nothing is surprised.
    return hashlib.sha256(f"uid|{username}".encode()).hexdigest()[:30] + "19"


class Env(NamedTuple):
    home: Path
    identity: Identity | None
    delay_ms: int
    poll_ms: int
    # Messages this process sends stay hidden until store.release_held (tests force an
    # order of delivery with it instead of racing a delay against the machine's speed).
    hold: bool = False
    # An older client, whose `whoami --json` has no deviceName (``KBWG_STANDIN_OLD_CLIENT``).
    old_client: bool = False
    # ``KBWG_STANDIN_RATE_LIMIT=N/S``: at most N sends per S seconds per user, then the
    # real service's rate-limit error (with its RateLimit in `error.data`).
    rate_limit: tuple[int, int] | None = None
    # ``KBWG_STANDIN_DROP_PUSHES=dev[:N],chat[:N]``: this listener loses the first N pushes
    # (all without N) of others' messages of that topic type, as the real service loses
    # the ones sent while a client reconnects; `read` still has them.
    drop_pushes: Mapping[str, int | None] = MappingProxyType({})

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
            hold=os.environ.get("KBWG_STANDIN_HOLD", "").strip() not in ("", "0"),
            old_client=os.environ.get("KBWG_STANDIN_OLD_CLIENT", "").strip() not in ("", "0"),
            rate_limit=_rate_limit(os.environ.get("KBWG_STANDIN_RATE_LIMIT", "")),
            drop_pushes=_drop_pushes(os.environ.get("KBWG_STANDIN_DROP_PUSHES", "")),
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
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8
            die(f"cannot read {path}: {exc}")
        import json

        try:
            raw = json.loads(text)
        except ValueError as exc:
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


def _rate_limit(raw: str) -> tuple[int, int] | None:
    if not raw.strip():
        return None
    calls, sep, seconds = raw.partition("/")
    if not (sep and calls.strip().isdigit() and seconds.strip().isdigit()
            and int(seconds) > 0):
        die(f"KBWG_STANDIN_RATE_LIMIT must be CALLS/SECONDS (e.g. 5/10), got {raw!r}")
    return int(calls), int(seconds)


def _drop_pushes(raw: str) -> dict[str, int | None]:
    rules: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        topic, sep, count = part.partition(":")
        if topic not in ("chat", "dev") or (sep and not count.isdigit()):
            die(f"KBWG_STANDIN_DROP_PUSHES takes chat[:N] and dev[:N], got {part!r}")
        rules[topic] = int(count) if sep else None
    return rules
