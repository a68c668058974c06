"""This device's WireGuard key, kept in the state dir from one `join` to the next.

Peers know a device by its WireGuard public key. A device that starts again with the key
it had is reconnected by early checks (kbwg.negotiation.early) from what both sides
already know: the peers still hold its key and their early-check credentials for it,
and its own history read gives their endpoints and candidates, so no chat delivery is
waited for. A fresh key reaches the peers only with its announcement, one delivery
later.

The file (`KEY_FILE`, mode 0600 in the private state dir) names the team and device it
belongs to: a state dir copied to another device or used for another team gets a new key,
so that two devices do not share one (kbwg.agent.keyowners would refuse the copy). A file
others can read, or one that is not what this module writes, is replaced by a new key,
with a warning. `join --new-key` replaces it on purpose. The default state dir for root
is /run/kbwg-agent, a tmpfs: there the key lasts until the next boot.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
from pathlib import Path

from nacl.public import PrivateKey

from kbwg.agent.statedir import read_private, write_private
from kbwg.core.identity import DeviceId
from kbwg.core.printable import printable

log = logging.getLogger(__name__)

KEY_FILE = "wireguard-key.json"
_KEY_MAX_BYTES = 4096  # one small JSON object


def kept_private_key(state_dir: Path, me: DeviceId, team: str, new: bool = False) -> PrivateKey:
    """The key this device used last time in `team`, or a new one (then kept)."""
    path = state_dir / KEY_FILE
    if not new:
        kept = _read(path, me, team)
        if kept is not None:
            log.debug("using the WireGuard key kept in %s", path)
            return kept
    key = PrivateKey.generate()
    text = json.dumps({"team": team, "device": str(me),
                       "private_key": base64.b64encode(bytes(key)).decode()})
    try:
        write_private(path, text + "\n")
    except OSError as exc:
        log.warning("cannot keep the WireGuard key in %s: %s; the next start makes a new "
                    "one (its peers then wait for its announcement)", path, exc)
    return key


def _read(path: Path, me: DeviceId, team: str) -> PrivateKey | None:
    try:
        data = read_private(path, _KEY_MAX_BYTES, owner_only=True)
        if data is None:
            return None
        kept = json.loads(data)
        if not isinstance(kept, dict):
            raise ValueError("not a JSON object")
        owner = (kept.get("team"), kept.get("device"))
        if owner != (team, str(me)):
            log.info("%s is the key of %s in team %s: a new one for %s in %s", path,
                     printable(owner[1], 64), printable(owner[0], 64), me, team)
            return None
        raw = base64.b64decode(kept["private_key"], validate=True)
        if len(raw) != 32:
            raise ValueError(f"its key has {len(raw)} bytes, not 32")
        return PrivateKey(raw)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        reason = ("a symbolic link" if isinstance(exc, OSError) and exc.errno == errno.ELOOP
                  else printable(exc, 120))
        log.warning("ignoring %s (%s): making a new WireGuard key", path, reason)
        return None
