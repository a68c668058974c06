"""One WireGuard key per device, one device per key.

WireGuard knows a peer only by its public key: two team devices configured with one key
are one WireGuard peer, and the second configuration redirects the first device's
traffic (its endpoint and allowed IP). A key is public, so any member can copy another
device's key into its own ANNOUNCE or CLAIM line; this decides whose key it is.

Rules, applied to every key that more than one device currently uses (the key of its
newest live announcement, or of its current live claim):

- a device listed in peers.json beats one that is not;
- otherwise the device that used the key first (the lowest Keybase message id of an
  ANNOUNCE or CLAIM line of it carrying that key) wins;
- the other devices get no peer entry with that key, and each such line is logged once.

Keys are compared in canonical form only (announce.canonical_key), so two spellings of
one key are the same key. The sender of every line comes from Keybase's metadata, so a
device cannot make its copy look older than it is: a copy always comes after the
original it was copied from.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kbwg.agent.announce import ANNOUNCE_TTL_S
from kbwg.core.identity import DeviceId


@dataclass
class KeyUse:
    """A device's use of one key: its first line with it, and the newest one's time."""

    first_msg_id: int
    last_sent_at: float


@dataclass(frozen=True)
class KeyRefusal:
    """A device's current line carries a key that belongs to another device."""

    device: DeviceId
    msg_id: int
    key: str
    owner: DeviceId
    why: str

    def describe(self) -> str:
        return (f"ignoring the key {self.key[:8]}… in message {self.msg_id} from "
                f"{self.device}: it is {self.owner}'s ({self.why}); one key per device")


class KeyBook:
    """Who used which key first, from every ANNOUNCE and CLAIM line seen."""

    def __init__(self) -> None:
        self._uses: dict[str, dict[DeviceId, KeyUse]] = {}
        self._logged: set[int] = set()

    def record(self, device: DeviceId, key: str, msg_id: int, sent_at: float) -> None:
        """`key` in canonical form. Order of arrival does not matter (history is read
        newest first): the lowest message id is kept."""
        use = self._uses.setdefault(key, {}).get(device)
        if use is None:
            self._uses[key][device] = KeyUse(msg_id, sent_at)
            return
        use.first_msg_id = min(use.first_msg_id, msg_id)
        use.last_sent_at = max(use.last_sent_at, sent_at)

    def first_use(self, device: DeviceId, key: str) -> int | None:
        use = self._uses.get(key, {}).get(device)
        return None if use is None else use.first_msg_id

    def prune(self, now: float) -> None:
        """Forget uses whose newest line has expired: such a line no longer makes a
        peer, and a device still using a key re-announces it well within the TTL."""
        for key in list(self._uses):
            devices = self._uses[key]
            for device in [d for d, u in devices.items() if u.last_sent_at < now - ANNOUNCE_TTL_S]:
                del devices[device]
            if not devices:
                del self._uses[key]
        # A line older than every recorded use is no device's current line any more
        # (give or take a listed device that stopped announcing): forget it was logged.
        floor = min((u.first_msg_id for devices in self._uses.values()
                     for u in devices.values()), default=None)
        self._logged = {m for m in self._logged if floor is not None and m >= floor}

    def owner(self, key: str, users: Mapping[DeviceId, int], listed: Collection[DeviceId]
              ) -> tuple[DeviceId, str]:
        """Of the devices currently using `key` (each with the id of its current line
        carrying it), the one it belongs to, and why (for the log)."""

        def first(device: DeviceId) -> int:
            recorded = self.first_use(device, key)
            return users[device] if recorded is None else min(recorded, users[device])

        winner = min(users, key=lambda d: (d not in listed, first(d), str(d)))
        if winner in listed and all(d not in listed for d in users if d != winner):
            return winner, "listed in peers.json"
        return winner, f"used it first, in message {first(winner)}"

    def should_log(self, msg_id: int) -> bool:
        """Once per message: the judgement is made again at every sync."""
        if msg_id in self._logged:
            return False
        self._logged.add(msg_id)
        return True
