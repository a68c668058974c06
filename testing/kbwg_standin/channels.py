"""Conversations as the JSON API names them: channels, their canonical names and ids,
topic types and names, and the pagination tokens of `read`."""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from types import MappingProxyType
from typing import Any, NamedTuple

from kbwg_standin.errors import RequestError, ServiceError

# chat1.TopicType, read-only: membership is all the stand-in needs of it.
TOPIC_TYPES = MappingProxyType(
    {"none": 0, "chat": 1, "dev": 2, "kbfsfileedit": 3, "emoji": 4, "emojicross": 5}
)
TOPIC_NAME_RE = re.compile(r"^[0-9a-zA-Z_-]+$")
TOPIC_NAME_MAX = 20


def parse_topic_type(value: Any) -> str:
    if value is None or value == "":
        return "chat"
    if not isinstance(value, str) or value.lower() not in TOPIC_TYPES:
        raise RequestError(f"invalid topic type: '{value}'")
    return value.lower()


class ChannelSpec(NamedTuple):
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


def spec_of(row: sqlite3.Row) -> ChannelSpec:
    return ChannelSpec(row["name"], row["members_type"], row["topic_type"], row["topic_name"])


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
            f"json: cannot unmarshal {go_type(obj)} into Go struct field "
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


def go_type(obj: Any) -> str:
    """The JSON type name Go's decoder puts in its unmarshal errors."""
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
        raise RequestError(f"json: cannot unmarshal {go_type(token)} into Go value of type []uint8")
    try:
        raw = base64.b64decode(token, validate=True)
    except ValueError as exc:
        raise RequestError(f"illegal base64 data in pagination.{field}: {exc}") from exc
    if len(raw) != 4:
        raise ServiceError(f"invalid pagination {field} token")
    return int.from_bytes(raw, "big")
