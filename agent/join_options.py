"""What `kbwg-agent join` is asked to do (`JoinOptions`), and the error that stops it
(`JoinError`), raised by whichever step of joining found the problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kbwg.agent.announce import ANNOUNCE_TTL_S
from kbwg.owner.policy import DEFAULT_POLICY_PATH

# A peer that has not got a negotiated path by then gets its announced endpoint.
ANNOUNCED_FALLBACK_S = 3.0


class JoinError(RuntimeError):
    """A condition that stops `join`, with a message saying what to do."""


class NoAddressToAnnounce(JoinError):
    """The host has no IPv4 address yet (a network still coming up at boot)."""


@dataclass
class JoinOptions:
    team: str
    state_dir: Path
    interface: str = "kbwg0"
    listen_port: int = 51820
    endpoint: str | None = None
    backend: str = "auto"
    keepalive_s: int = 25
    owner_command: list[str] | None = None
    # A new WireGuard key, not the one kept in the state dir (kbwg.agent.wg_key).
    new_key: bool = False
    refresh_s: float = 30.0
    reannounce_s: float = ANNOUNCE_TTL_S / 2
    stats_s: float = 5.0
    negotiate: bool = True
    announced_fallback_s: float = ANNOUNCED_FALLBACK_S
    # The machine's own rule for the overlay (root's file, read-only for the agent).
    policy_path: Path = DEFAULT_POLICY_PATH
