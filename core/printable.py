"""Text from others made safe to show: `printable` for one string, `printable_tree` for a
report about to be rendered, `PrintableReason` for an exception's reason,
`PrintableMessage` for a whole log line.

Team members, relays, STUN servers and LAN gateways choose strings that reach a user's
terminal (status, diag, ping, join's log lines) and the journal: a reason phrase, a
device name, a URL in a gateway's description. An ESC or CSI there can retitle the
terminal or clear the screen, a carriage return or newline can forge a line ("path:
direct", a fake log line with its own `<N>` journal priority), a backspace or a
bidirectional override can hide text. Every non-printable character is written as the
escape `repr` would use (`\\x1b`, `\\n`, `\\u202e`), and a string too long is cut.
"""

from __future__ import annotations

import logging
from typing import Any

# Characters kept of one string from elsewhere before the cut: enough for any reason
# phrase or name, far less than a datagram or a chat message.
DEFAULT_LIMIT = 200
# A log line's whole message: ours with its arguments, cut only when hostile in size.
LOG_LINE_LIMIT = 4000
# Any one string of a report rendered for a terminal (status, diag, ping).
RENDER_LIMIT = 1000
# An exception's reason that may quote what others sent (a body, a name, a value).
REASON_LIMIT = 300
CUT = "…"


def printable(text: object, limit: int = DEFAULT_LIMIT, keep: str = "") -> str:
    """`str(text)` with every non-printable character (C0 and C1 controls, DEL, line and
    paragraph separators, format characters such as bidirectional overrides, unpaired
    surrogates) escaped as `repr` escapes it, cut after `limit` characters of the
    result, with "…" after a cut. Printable text, spaces included, is unchanged, and so
    are the characters in `keep` (newlines, for our own multi-line messages)."""
    raw = text if isinstance(text, str) else str(text)
    if len(raw) <= limit and raw.isprintable():
        return raw
    out: list[str] = []
    size = 0
    for char in raw:
        piece = char if char.isprintable() or char in keep else repr(char)[1:-1]
        if size + len(piece) > limit:
            out.append(CUT)
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def printable_tree(value: Any, limit: int = DEFAULT_LIMIT) -> Any:
    """`value` (a JSON-like report: maps, lists, strings, numbers) with every string in
    it passed through `printable`; map keys are kept (the renderer looks them up)."""
    if isinstance(value, str):
        return printable(value, limit)
    if isinstance(value, dict):
        return {key: printable_tree(item, limit) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(item, limit) for item in value]
    return value


class PrintableReason(Exception):
    """A base for exceptions whose reason may quote what others chose: str() is the
    reason `printable`, cut at `reason_limit`."""

    reason_limit = REASON_LIMIT

    def __str__(self) -> str:
        return printable(super().__str__(), self.reason_limit)


class PrintableMessage(logging.Filter):
    """For a handler: the record's message, arguments merged in, made `printable` (one
    line, no controls), whatever a caller passed. Tracebacks are formatted after it and
    stay as they are."""

    def __init__(self, limit: int = LOG_LINE_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: logging reports it when the handler formats
            return True
        if len(message) > self.limit or not message.isprintable():
            record.msg, record.args = printable(message, self.limit), None
        return True
