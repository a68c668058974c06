"""JSON documents whose objects name each key once.

A JSON object with a key twice is valid JSON, but readers disagree on which value counts
(Python's keeps the last, others the first): a team writer could show reviewers one
value and the agents another. Team files are therefore refused when a key repeats.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """An object of the document has `key` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} appears twice in one object")
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def loads(data: bytes | str) -> Any:
    """`json.loads`, raising DuplicateKeyError (a ValueError) for a repeated key."""
    return json.loads(data, object_pairs_hook=_object)
