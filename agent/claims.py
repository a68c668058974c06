"""Self-assigned overlay addresses for devices that peers.json does not list.

An unlisted device picks a free address in the team's `dynamic_range` and claims it in
`#announce` with `CLAIM <overlay-ip> <base64 wg public key>`, right before its ANNOUNCE
line. Old agents log and ignore lines that are not ANNOUNCE, so they are unaffected. As
for announcements, the sender comes from Keybase's message metadata, never the body.

Rules (every agent applies them to what it has seen, so they all reach the same verdict
once every message is delivered, whatever the order of delivery):

- One address per device: a device's newer claim (higher message id) replaces its older
  one. That is how a loser re-claims, and why no device ever holds two addresses.
- Conflicts: among the live claims of one address, the one with the lowest *seniority*
  wins. A device re-posts its claim with each re-announcement, so every refresh has a
  new, higher id; seniority is therefore the lowest message id among the device's
  consecutive claims of that same address. A refresh neither makes a device lose to
  itself nor lets a rival that claimed in between overtake it. Claiming another address
  starts a new run, and coming back later counts from the new claim.
- Claims live ANNOUNCE_TTL_S after they were sent, as announcements do.
- At most MAX_CLAIMS_PER_DEVICE live claims of a device are kept, its newest: past them
  the oldest go as expired ones do, their run's rank carried. No correct agent claims
  that often in a lifetime; agents that saw such a device's claims in different orders
  (the history is read newest first) may rank that device differently.
- Ignored claims leave no trace: a claim from a listed device, of a listed address or of
  an address outside the dynamic range, or one already expired, changes nothing.
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import json
import logging
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from kbwg.agent.announce import ANNOUNCE_TTL_S, AnnounceError, canonical_key
from kbwg.agent.peers_file import PeerEntry
from kbwg.agent.statedir import read_private, write_private
from kbwg.core.identity import DeviceId
from kbwg.core.printable import PrintableReason

log = logging.getLogger(__name__)

CLAIM_WORD = "CLAIM"
PREVIOUS_ADDRESS_FILE = "dynamic-address.json"
_PREVIOUS_MAX_BYTES = 4096  # the file holds one small JSON object
# Random draws before falling back to listing the free addresses: a nearly full range
# would otherwise make the draw loop long, a nearly empty one makes the listing wasteful.
_RANDOM_DRAWS = 64
# A device's live claims kept (for its seniority; older ones are dropped as expired ones
# are, their run's rank carried). A device claims once per re-announcement (every 30
# min) and again after losing an address: a handful an hour. A member claiming without
# end made every claim cost a pass over all its earlier ones, and the list grew for an
# hour (the claims' lifetime).
MAX_CLAIMS_PER_DEVICE = 32


class ClaimError(PrintableReason, ValueError):
    """A body that is not a usable claim, or no address left to claim; str() is printable
    (no terminal controls from the body) and cut short."""


class Policy(StrEnum):
    """Who peers with whom (kbwg.json 'policy')."""

    MESH = "mesh"  # everyone peers with everyone
    SERVERS = "servers"  # unlisted devices peer only with listed ones


class Rejection(Enum):
    NO_RANGE = "no dynamic range"
    LISTED_DEVICE = "listed device"
    LISTED_ADDRESS = "listed address"
    OUTSIDE_RANGE = "outside the dynamic range"
    EXPIRED = "expired"
    STALE = "stale"

    @property
    def is_misbehaviour(self) -> bool:
        """A claim no correct agent sends (worth a warning), as opposed to a late one."""
        return self in (Rejection.LISTED_DEVICE, Rejection.LISTED_ADDRESS,
                        Rejection.OUTSIDE_RANGE)


@dataclass(frozen=True)
class Claim:
    sender: DeviceId
    ip: IPv4Address
    public_key: str  # canonical base64, as WireGuard prints it
    msg_id: int
    sent_at: float

    @property
    def expires_at(self) -> float:
        return self.sent_at + ANNOUNCE_TTL_S

    def live(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class ClaimVerdict:
    accepted: bool
    rejection: Rejection | None = None
    reason: str = ""  # for the caller's log line; empty when accepted
    # The device's current claim before this one, when this one replaced it: the caller
    # drops that address from the peer if it differs.
    replaced: Claim | None = None


@dataclass(frozen=True)
class ClaimState:
    """One device's current claim as `status` and `diag` show it."""

    claim: Claim
    seniority: int
    owner: bool

    def to_json(self) -> dict[str, object]:
        c = self.claim
        return {
            "username": c.sender.username, "device": c.sender.device, "ip": str(c.ip),
            "public_key": c.public_key, "msg_id": c.msg_id, "sent_at": c.sent_at,
            "expires_at": c.expires_at, "seniority": self.seniority, "owner": self.owner,
        }


def format_claim(ip: IPv4Address, public_key: str) -> str:
    return f"{CLAIM_WORD} {ip} {public_key}"


def is_claim(body: str) -> bool:
    """Whether a body is meant as a claim (then parse_claim, not parse_announce)."""
    return body.split(maxsplit=1)[:1] == [CLAIM_WORD]


def _address_count(token: str) -> int:
    """How many addresses a token names: 0 if it is no address at all."""
    if "," in token:
        return sum(max(_address_count(p), 1) for p in token.split(",") if p)
    try:
        return ipaddress.ip_network(token, strict=False).num_addresses
    except ValueError:
        return 0


def parse_claim(body: str, sender: DeviceId, msg_id: int, sent_at: float) -> Claim:
    tokens = body.split()
    if not tokens or tokens[0] != CLAIM_WORD:
        raise ClaimError(f"not a CLAIM line: {body[:80]!r}")
    if len(tokens) < 3:
        raise ClaimError(f"expected 'CLAIM <overlay-ip> <public key>': {body[:80]!r}")
    *address_tokens, key_text = tokens[1:]
    addresses = sum(_address_count(t) for t in address_tokens)
    if addresses > 1:
        raise ClaimError(f"claims {addresses} addresses at once: {' '.join(address_tokens)}")
    if len(address_tokens) > 1:
        raise ClaimError(f"expected 'CLAIM <overlay-ip> <public key>': {body[:80]!r}")
    ip_text = address_tokens[0]
    try:
        ip = IPv4Address(ip_text)
    except ValueError as exc:
        raise ClaimError(f"claimed address {ip_text!r} is not a bare IPv4 address") from exc
    try:
        key = canonical_key(key_text)
    except AnnounceError as exc:
        raise ClaimError(str(exc)) from exc
    return Claim(sender, ip, key, msg_id, sent_at)


def _host_in(ip: IPv4Address, network: IPv4Network) -> bool:
    return ip in network and ip not in (network.network_address, network.broadcast_address)


@dataclass
class _History:
    """One device's claims that are still live, oldest first.

    Older claims are dropped as they expire, but a refresh must keep the rank its first
    claim earned, even hours later: `carried` remembers the (ip, seniority) of the run
    the last dropped claim belonged to.
    """

    claims: list[Claim] = field(default_factory=list)
    dropped_upto: int = -1
    carried: tuple[IPv4Address, int] | None = None

    @property
    def current(self) -> Claim:
        return self.claims[-1]

    def seniority_at(self, index: int) -> int:
        ip = self.claims[index].ip
        while index > 0 and self.claims[index - 1].ip == ip:
            index -= 1
        if index == 0 and self.carried is not None and self.carried[0] == ip:
            return self.carried[1]
        return self.claims[index].msg_id

    def drop_expired(self, now: float) -> None:
        while len(self.claims) > 1 and not self.claims[0].live(now):
            self.drop_oldest()

    def drop_oldest(self) -> None:
        """Forget the oldest claim, keeping the rank its run earned."""
        self.carried = (self.claims[0].ip, self.seniority_at(0))
        self.dropped_upto = self.claims.pop(0).msg_id


@dataclass(frozen=True)
class _ListedIndex:
    """peers.json's entries (`source`, the list itself) by device and by address."""

    source: Collection[PeerEntry]
    by_device: dict[DeviceId, IPv4Address]
    by_ip: dict[IPv4Address, DeviceId]


class ClaimBook:
    """Every device's claims as seen in `#announce`, and who owns which address."""

    def __init__(self) -> None:
        self._devices: dict[DeviceId, _History] = {}
        self._listed: _ListedIndex | None = None

    def offer(
        self,
        claim: Claim,
        *,
        listed: Collection[PeerEntry],
        dynamic_range: IPv4Network | None,
        now: float,
    ) -> ClaimVerdict:
        """Record a claim unless it is to be ignored; the verdict says why not."""
        rejected = self._check(claim, self._index(listed), dynamic_range, now)
        if rejected is not None:
            return rejected
        self._prune_device(claim.sender, now)  # the others' at the next sync (prune)
        history = self._devices.setdefault(claim.sender, _History())
        known = [c.msg_id for c in history.claims]
        if claim.msg_id in known or claim.msg_id <= history.dropped_upto:
            return _reject(Rejection.STALE, f"message {claim.msg_id} was already seen")
        previous = history.current if history.claims else None
        bisect.insort(history.claims, claim, key=lambda c: c.msg_id)
        if len(history.claims) > MAX_CLAIMS_PER_DEVICE:
            # Its oldest go as expired ones do: a claim older than them is then stale.
            log.debug("%s: more than %d live claims, the oldest forgotten", claim.sender,
                      MAX_CLAIMS_PER_DEVICE)
            while len(history.claims) > MAX_CLAIMS_PER_DEVICE:
                history.drop_oldest()
            if claim.msg_id <= history.dropped_upto:
                return _reject(Rejection.STALE, f"message {claim.msg_id} is older than the "
                               f"{MAX_CLAIMS_PER_DEVICE} claims kept of {claim.sender}")
        if previous is not None and claim.msg_id < previous.msg_id:
            # History is read newest first: the older claim still counts for seniority.
            return _reject(
                Rejection.STALE,
                f"older than its current claim (message {previous.msg_id}); "
                "kept only for seniority",
            )
        return ClaimVerdict(accepted=True, replaced=previous)

    def _index(self, listed: Collection[PeerEntry]) -> _ListedIndex:
        """`listed` by device and by address, made again only for another list: every
        claim of the history, read again at each refresh, is checked against it."""
        if self._listed is None or self._listed.source is not listed:
            by_device: dict[DeviceId, IPv4Address] = {}
            by_ip: dict[IPv4Address, DeviceId] = {}
            for entry in listed:
                by_device.setdefault(entry.device_id, entry.ip)
                by_ip.setdefault(entry.ip, entry.device_id)
            self._listed = _ListedIndex(listed, by_device, by_ip)
        return self._listed

    @staticmethod
    def _check(
        claim: Claim, listed: _ListedIndex, dynamic_range: IPv4Network | None,
        now: float,
    ) -> ClaimVerdict | None:
        if dynamic_range is None:
            return _reject(Rejection.NO_RANGE, "the team's kbwg.json has no dynamic_range")
        listed_ip = listed.by_device.get(claim.sender)
        if listed_ip is not None:
            return _reject(
                Rejection.LISTED_DEVICE,
                f"{claim.sender} is listed in peers.json (at {listed_ip}) and may not claim",
            )
        holder = listed.by_ip.get(claim.ip)
        if holder is not None:
            return _reject(
                Rejection.LISTED_ADDRESS,
                f"{claim.ip} is listed in peers.json for {holder}",
            )
        if not _host_in(claim.ip, dynamic_range):
            return _reject(
                Rejection.OUTSIDE_RANGE,
                f"{claim.ip} is not a host address of the dynamic range {dynamic_range}",
            )
        if not claim.live(now):
            return _reject(Rejection.EXPIRED, f"sent more than {ANNOUNCE_TTL_S:.0f} s ago")
        return None

    def prune(self, now: float) -> None:
        """Forget what has expired; queries already ignore it, this only frees memory."""
        for device in list(self._devices):
            self._prune_device(device, now)

    def _prune_device(self, device: DeviceId, now: float) -> None:
        history = self._devices.get(device)
        if history is None:
            return
        if not history.current.live(now):
            del self._devices[device]  # a claim after this starts a new run
        else:
            history.drop_expired(now)

    def claim_of(self, device: DeviceId, now: float) -> Claim | None:
        """The device's current claim, if live (whether or not it owns the address)."""
        history = self._devices.get(device)
        if history is None or not history.current.live(now):
            return None
        return history.current

    def seniority(self, device: DeviceId) -> int | None:
        history = self._devices.get(device)
        return history.seniority_at(len(history.claims) - 1) if history else None

    def _contenders(self, ip: IPv4Address, now: float) -> Iterable[tuple[int, Claim]]:
        for history in self._devices.values():
            current = history.current
            if current.ip == ip and current.live(now):
                yield history.seniority_at(len(history.claims) - 1), current

    def owner_of(self, ip: IPv4Address, now: float) -> Claim | None:
        """The live claim that holds `ip`: the lowest seniority among its claimants."""
        ranked = sorted(self._contenders(ip, now), key=lambda sc: (sc[0], sc[1].msg_id))
        return ranked[0][1] if ranked else None

    def winner(self, device: DeviceId, now: float) -> bool:
        """Whether the device's current claim owns its address."""
        claim = self.claim_of(device, now)
        if claim is None:
            return False
        owner = self.owner_of(claim.ip, now)
        return owner is not None and owner.sender == device

    def lost(self, mine: Claim, now: float) -> Claim | None:
        """The rival claim that beats `mine`, or None if mine holds (or nobody contests).

        `mine` need not have been offered yet (its echo may still be on its way); if it
        was, its run's seniority counts.
        """
        rank = mine.msg_id
        current = self.claim_of(mine.sender, now)
        seniority = self.seniority(mine.sender)
        if current is not None and current.ip == mine.ip and seniority is not None:
            rank = min(rank, seniority)
        rivals = sorted(
            (sc for sc in self._contenders(mine.ip, now) if sc[1].sender != mine.sender),
            key=lambda sc: (sc[0], sc[1].msg_id),
        )
        if rivals and rivals[0][0] < rank:
            return rivals[0][1]
        return None

    def taken(self, now: float, *, besides: DeviceId | None = None) -> set[IPv4Address]:
        """Addresses under a live claim by any device other than `besides`."""
        return {
            h.current.ip for d, h in self._devices.items()
            if d != besides and h.current.live(now)
        }

    def live_claims(self, now: float) -> list[ClaimState]:
        """Every device's current live claim, by address then seniority."""
        states = []
        for device, history in self._devices.items():
            current = history.current
            if current.live(now):
                owner = self.owner_of(current.ip, now)
                states.append(ClaimState(
                    current, history.seniority_at(len(history.claims) - 1),
                    owner is not None and owner.sender == device,
                ))
        return sorted(states, key=lambda s: (s.claim.ip, s.seniority))


def _reject(rejection: Rejection, reason: str) -> ClaimVerdict:
    return ClaimVerdict(accepted=False, rejection=rejection, reason=reason)


def check_range_against_peers(
    dynamic_range: IPv4Network, entries: Iterable[PeerEntry]
) -> list[str]:
    """Problems between kbwg.json's dynamic_range and peers.json, for the daemon to log.

    kbwg.json is parsed without peers.json, so this is checked where both are known.
    Listed addresses inside the range stay safe regardless: they are never picked and
    claims on them are ignored; but they shrink the range and show a confused setup.
    """
    return [
        f"peers.json lists {e.device_id} at {e.ip}, inside the dynamic range "
        f"{dynamic_range}: unlisted devices will not claim it, but peers.json "
        "addresses should be outside the range"
        for e in entries if e.ip in dynamic_range
    ]


def pick_free_address(
    dynamic_range: IPv4Network,
    taken: Collection[IPv4Address],
    rng: random.Random,
    previous: IPv4Address | None = None,
) -> IPv4Address:
    """A free host address of the range to claim; `previous` first, if still free.

    `taken` holds the listed addresses and every other device's live claim. `rng` is
    injected so tests are deterministic: the daemon seeds it from the test-only
    environment variable KBWG_DYNAMIC_SEED (by the value alone, not per device, so
    devices sharing a seed draw the same first address: tests force conflicts that way),
    and otherwise uses a system-seeded one.
    Raises ClaimError when the range has no free address.
    """
    if previous is not None and _host_in(previous, dynamic_range) and previous not in taken:
        return previous
    first = int(dynamic_range.network_address) + 1
    last = int(dynamic_range.broadcast_address) - 1
    if last < first:
        raise ClaimError(f"the dynamic range {dynamic_range} has no host addresses")
    for _ in range(_RANDOM_DRAWS):
        candidate = IPv4Address(rng.randint(first, last))
        if candidate not in taken:
            return candidate
    free = [ip for ip in dynamic_range.hosts() if ip not in taken]
    if not free:
        raise ClaimError(f"every address of the dynamic range {dynamic_range} is taken")
    return rng.choice(free)


def may_peer(policy: Policy, me_listed: bool, peer_listed: bool) -> bool:
    """Whether two devices configure each other as WireGuard peers."""
    if policy is Policy.MESH:
        return True
    return me_listed or peer_listed


def load_previous(state_dir: Path) -> IPv4Address | None:
    """The address this device last claimed, to reclaim it after a restart."""
    path = state_dir / PREVIOUS_ADDRESS_FILE
    try:
        data = read_private(path, _PREVIOUS_MAX_BYTES)
        if data is None:
            return None
        ip = json.loads(data)["ip"]
        if not isinstance(ip, str):
            raise TypeError(f"'ip' is {ip!r}, not a string")
        return IPv4Address(ip)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = ("a symbolic link" if isinstance(exc, OSError) and exc.errno == errno.ELOOP
                  else str(exc))
        log.warning("ignoring %s (%s): a fresh address will be picked", path, reason)
        return None


def save_previous(state_dir: Path, ip: IPv4Address) -> None:
    """Remember the claimed address; a failure only costs the reclaim after a restart."""
    path = state_dir / PREVIOUS_ADDRESS_FILE
    try:
        write_private(path, json.dumps({"ip": str(ip)}) + "\n")
    except OSError as exc:
        log.warning("cannot save %s: %s; the address may change after a restart", path, exc)
