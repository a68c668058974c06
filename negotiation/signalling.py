"""The signalling channel negotiation runs over, as negotiation sees it: posts that carry
a text body and the sender's identity as the channel vouches for it (Keybase's signed
metadata). The agent's Keybase chat messages are such posts; nothing here knows Keybase."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

# Posts one text body to the channel every peer reads.
Post = Callable[[str], Awaitable[None]]


class SignalMessage(Protocol):
    """One post on the channel: who sent it (never taken from the body) and its text."""

    @property
    def id(self) -> int: ...

    @property
    def sender_username(self) -> str: ...

    @property
    def sender_device(self) -> str: ...

    @property
    def body(self) -> str | None: ...

    @property
    def content_type(self) -> str: ...
