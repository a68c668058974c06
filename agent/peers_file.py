"""peers.json: the team's static map of Keybase devices to overlay addresses.

The format is the prototype's: a JSON list of `{"username", "device", "ip"}` objects.
Every problem is reported with the entry it concerns, so a team admin can fix the file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from kbwg.core import strict_json
from kbwg.core.identity import DeviceId
from kbwg.core.printable import printable

DEFAULT_OVERLAY = IPv4Network("100.64.0.0/10")
PEERS_NAME = "peers.json"
# The most devices peers.json may list: as many as the device owner takes peers
# (kbwg.owner.server.MAX_PEERS). Every listed device is a peer of every agent, built
# again at each peer sync (5 s) and parsed at every refresh (30 s): the 19,000 entries
# 1 MiB holds cost 0.33 s per refresh and 0.23 s per sync.
PEERS_MAX_ENTRIES = 4096
# What an error message quotes of a value: the file is any team writer's, and a broken
# one is logged again at every refresh.
SHOWN_MAX = 64


def shown(text: str) -> str:
    """`text` as an error message may quote it: printable, at most SHOWN_MAX characters
    (and its length when cut)."""
    quoted = printable(text, SHOWN_MAX)
    return quoted if len(text) <= SHOWN_MAX else f"{quoted} ({len(text)} characters)"


def peers_path(team: str) -> str:
    """peers.json of `team` in KBFS (here, not in team_view, so that `join` can start
    reading it before the modules that use it have loaded)."""
    return f"/keybase/team/{team.lower()}/{PEERS_NAME}"


class PeersError(ValueError):
    """peers.json cannot be used; the message names the offending entry."""


@dataclass(frozen=True)
class PeerEntry:
    username: str
    device: str
    ip: IPv4Address

    @property
    def device_id(self) -> DeviceId:
        return DeviceId(self.username, self.device)


def _describe(index: int, raw: object) -> str:
    if isinstance(raw, dict):
        user, device = raw.get("username"), raw.get("device")
        if isinstance(user, str) and isinstance(device, str):
            return f"entry {index} ({shown(user)}/{shown(device)})"
    return f"entry {index}"


def _field(raw: dict[str, object], name: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise PeersError(f"peers.json {where}: '{name}' must be a non-empty string")
    return value.strip()


def parse_peers(data: bytes | str, overlay: IPv4Network = DEFAULT_OVERLAY) -> list[PeerEntry]:
    """Parse and validate peers.json. Entries are numbered from 1 in error messages."""
    # ValueError also covers an integer over Python's digit limit; RecursionError is
    # deep nesting. Both are documents the decoder refuses, like any other bad JSON.
    try:
        doc = strict_json.loads(data)
    except strict_json.DuplicateKeyError as exc:
        raise PeersError(
            f"peers.json: key '{shown(exc.key)}' appears twice in one object; write each "
            "key once (readers disagree on which one counts)") from exc
    except (ValueError, RecursionError) as exc:
        raise PeersError(f"peers.json is not valid JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise PeersError("peers.json must be a JSON list of {username, device, ip} objects")
    if len(doc) > PEERS_MAX_ENTRIES:
        raise PeersError(f"peers.json has {len(doc)} entries; it may list at most "
                         f"{PEERS_MAX_ENTRIES} devices")

    entries: list[PeerEntry] = []
    by_device: dict[DeviceId, int] = {}
    by_ip: dict[IPv4Address, int] = {}
    for index, raw in enumerate(doc, start=1):
        where = _describe(index, raw)
        if not isinstance(raw, dict):
            raise PeersError(f"peers.json {where}: must be an object, got {type(raw).__name__}")
        username = _field(raw, "username", where)
        device = _field(raw, "device", where)
        ip_text = _field(raw, "ip", where)
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError as exc:
            raise PeersError(
                f"peers.json {where}: '{shown(ip_text)}' is not an IP address") from exc
        if not isinstance(ip, IPv4Address) or ip not in overlay:
            raise PeersError(
                f"peers.json {where}: address {ip} is outside the overlay range {overlay}"
            )
        if ip in (overlay.network_address, overlay.broadcast_address):
            raise PeersError(f"peers.json {where}: {ip} is not a usable host address")
        entry = PeerEntry(username, device, ip)
        if entry.device_id in by_device:
            raise PeersError(
                f"peers.json {where}: duplicate device {entry.device_id}, "
                f"already listed as entry {by_device[entry.device_id]}"
            )
        if ip in by_ip:
            raise PeersError(
                f"peers.json {where}: duplicate address {ip}, already used by entry {by_ip[ip]}"
            )
        by_device[entry.device_id] = index
        by_ip[ip] = index
        entries.append(entry)
    return entries
