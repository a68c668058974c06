"""kbwg.json: the team's configuration, kept in KBFS next to peers.json.

Only team members can read the team folder, so the relay secret stays inside the team.
An absent file is a valid configuration: no STUN, no relay, host candidates only. There
is deliberately no built-in STUN or relay server: a default would send every member's
addresses to a third party nobody in the team chose.

Unknown keys are logged and ignored, so a file written for a newer agent still loads.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import stat
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Protocol
from urllib.parse import parse_qs

from kbwg.agent.claims import Policy
from kbwg.agent.keybase import KeybaseFileNotFound
from kbwg.agent.peers_file import DEFAULT_OVERLAY, shown
from kbwg.core import strict_json
from kbwg.core.addresses import HostPort
from kbwg.negotiation.interface_defaults import DEFAULT_INTERFACE_EXCLUDE
from kbwg.owner.policy import WIDEST_PREFIX

log = logging.getLogger(__name__)

TEAM_CONFIG_NAME = "kbwg.json"
STUN_DEFAULT_PORT = 3478

# Keybase channel (topic) names: letters, digits, dashes and underscores, at most 20.
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}\Z")  # not $: it allows a final \n
_KNOWN_KEYS = frozenset({
    "stun", "relays", "overlay", "announce_channel", "negotiation_channel",
    "interface_exclude", "dynamic_range", "policy",
})
_KNOWN_RELAY_KEYS = frozenset({"url", "secret", "username", "ca_file"})
# RFC 7065's schemes and transports: turn: over UDP (the default) or TCP, turns: over TLS.
TURN_DEFAULT_PORT = 3478
TURNS_DEFAULT_PORT = 5349
TRANSPORTS = ("udp", "tcp", "tls")
# Every device sends each gathering's Binding requests to every STUN server, and keeps
# an allocation (UDP, TCP or TLS) on every relay entry: without a bound a writer listing
# thousands (or one victim many times) made the whole team a traffic source at their
# choice. A team needs two STUN servers to measure its NAT, and a few relays reached up
# to three ways each. Entries past these are ignored, with a warning.
STUN_MAX = 8
RELAYS_MAX = 12
# Each gathering matches every address's interface against every pattern (fnmatch,
# whose cache holds 32,768): 100,000 patterns took minutes of the event loop. Interface
# names have at most 15 characters. More, or longer, is refused.
INTERFACE_EXCLUDE_MAX = 64
PATTERN_MAX_CHARS = 64
# DNS names have at most 253 characters (RFC 1035); a URL is a name and a little more.
HOST_MAX_CHARS = 253
URL_MAX_CHARS = 300
# ca_file is read whole into memory by every device (it may live in the team's KBFS
# folder, which any writer fills); a CA bundle is a few hundred KB.
CA_FILE_MAX_BYTES = 1024 * 1024
# Unknown keys named in one warning (a file for a newer agent has a few).
_UNKNOWN_SHOWN = 3
# Addresses that are never a peer's: the overlay must not touch them.
_NEVER_OVERLAY = tuple(IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))


class TeamConfigError(ValueError):
    """kbwg.json cannot be used; the message names the offending key."""


class UnsupportedRelayUrl(ValueError):
    """A well-formed URL this agent cannot use (another scheme or transport): in
    kbwg.json that relay is skipped, so a file written for a newer agent still works."""


@dataclass(frozen=True)
class RelayConfig:
    url: str
    host: str
    port: int
    secret: str
    transport: str = "udp"  # udp, tcp or tls (turns:)
    # None: the Keybase username of the device, filled in when credentials are made.
    username: str | None = None
    # PEM file of the CA that signed a turns: relay's certificate (a self-signed relay);
    # None: the system's trusted CAs.
    ca_file: str | None = None

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)


@dataclass(frozen=True)
class TeamConfig:
    stun: list[HostPort] = field(default_factory=list)
    relays: list[RelayConfig] = field(default_factory=list)
    overlay: IPv4Network = DEFAULT_OVERLAY
    announce_channel: str = "announce"
    negotiation_channel: str = "kbwg"
    interface_exclude: list[str] = field(default_factory=lambda: list(DEFAULT_INTERFACE_EXCLUDE))
    # None: devices missing from peers.json cannot join (nowhere to claim an address).
    dynamic_range: IPv4Network | None = None
    policy: Policy = Policy.MESH


def tls_context(relay: RelayConfig) -> ssl.SSLContext:
    """The TLS settings for a turns: relay: its `ca_file` when given, else the system's
    CAs. Raises ValueError naming the key and what to do."""
    if relay.ca_file is None:
        return ssl.create_default_context()
    try:
        # Read here, not by OpenSSL: a FIFO or a device named there blocked the event
        # loop, and a huge file was read whole. ASCII only: cadata takes nothing else,
        # and outside the PEM blocks (comments) other bytes do not matter.
        pem = _read_ca_file(relay.ca_file).decode("latin-1")
        return ssl.create_default_context(
            cadata=pem.encode("ascii", "replace").decode("ascii"))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValueError(
            f"kbwg.json relay {relay.url}: cannot use 'ca_file' {relay.ca_file}: {detail}; "
            "give a readable PEM file holding the CA that signed the relay's certificate "
            "(or remove 'ca_file' for a relay with a publicly trusted certificate)"
        ) from exc


def _read_ca_file(path: str) -> bytes:
    """A regular file of at most CA_FILE_MAX_BYTES, opened without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = file.read(CA_FILE_MAX_BYTES + 1)
    if len(data) > CA_FILE_MAX_BYTES:
        raise ValueError(f"larger than {CA_FILE_MAX_BYTES} bytes (1 MiB)")
    return data


class FileReader(Protocol):
    async def fs_read(self, path: str) -> bytes: ...


def parse_host_port(text: str, default_port: int | None = STUN_DEFAULT_PORT) -> HostPort:
    """`HOST:PORT`, `[V6]:PORT`, or a bare host when `default_port` is given.

    Raises ValueError with a message fit for the user.
    """
    text = text.strip()
    quoted = shown(text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{quoted}' is not HOST:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"'{quoted}': write IPv6 addresses as [ADDRESS]:PORT")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"'{quoted}' has no valid host")
    try:
        # As the resolver will: an empty or over-63-character label fails there with a
        # UnicodeError that the gatherer does not expect.
        valid = len(host.encode("idna")) <= HOST_MAX_CHARS
    except UnicodeError:
        valid = False
    if not valid:
        raise ValueError(f"'{quoted}': '{shown(host)}' is not a valid host name")
    if not port_text:
        if default_port is None:
            raise ValueError(f"'{quoted}' has no port (HOST:PORT)")
        return HostPort(host, default_port)
    # isdigit() alone also passes "²" and other digits int() refuses, and any length.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) \
            or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"'{quoted}': port must be a number from 1 to 65535")
    return HostPort(host, int(port_text))


def parse_relay_url(url: str) -> tuple[HostPort, str]:
    """`turn:HOST[:PORT][?transport=udp|tcp]` or `turns:HOST[:PORT][?transport=tcp]`
    (RFC 7065) -> (address, transport: udp, tcp or tls). turn: defaults to port 3478,
    turns: to 5349. Raises UnsupportedRelayUrl for another scheme or transport and
    ValueError for a malformed URL, with a message fit for the user."""
    quoted = shown(url)
    if len(url) > URL_MAX_CHARS:
        raise ValueError(f"'{quoted}' is longer than {URL_MAX_CHARS} characters")
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("turn", "turns"):
        raise UnsupportedRelayUrl(
            f"'{quoted}' is not a turn: or turns: URL; write turn:HOST:PORT (UDP), "
            "turn:HOST:PORT?transport=tcp or turns:HOST:PORT (TLS)")
    hostport, _, query = rest.partition("?")
    if hostport.startswith("//"):
        raise ValueError(f"'{quoted}': write {scheme}:HOST:PORT, without //")
    tls = scheme == "turns"
    address = parse_host_port(hostport, TURNS_DEFAULT_PORT if tls else TURN_DEFAULT_PORT)
    transport = "tls" if tls else "udp"
    if query:
        params = parse_qs(query, keep_blank_values=True)
        unknown = set(params) - {"transport"}
        if unknown:
            raise ValueError(f"'{quoted}': unknown URL parameter {shown(sorted(unknown)[0])}")
        asked = shown(params["transport"][-1].lower())
        # turns: is TLS over TCP; RFC 7065 lets it say so, DTLS (turns: over UDP) we lack.
        allowed = ("tcp",) if tls else ("udp", "tcp")
        if asked not in allowed:
            raise UnsupportedRelayUrl(
                f"'{quoted}': transport={asked} is not supported; use "
                + (f"{scheme}:HOST:PORT without it" if tls else "transport=udp or tcp, "
                   "or turns:HOST:PORT for TLS"))
        if not tls:
            transport = asked
    return address, transport


def _string_list(doc: dict[str, object], key: str, limit: int | None = None) -> list[str]:
    """The strings at `key`; past `limit` ignored with a warning."""
    strings: list[str] = []
    for index, item in enumerate(_capped(doc, key, limit, "a list of strings"), start=1):
        if not isinstance(item, str) or not item.strip():
            raise TeamConfigError(f"kbwg.json '{key}' item {index} must be a non-empty string")
        strings.append(item.strip())
    return strings


def _capped(doc: dict[str, object], key: str, limit: int | None, what: str) -> list[object]:
    """The list at `key`, its first `limit` items only (the rest are not even checked:
    logged once, with the cap)."""
    value = doc[key]
    if not isinstance(value, list):
        raise TeamConfigError(f"kbwg.json '{key}' must be {what}")
    if limit is not None and len(value) > limit:
        log.warning("kbwg.json '%s': only the first %d entries are used (at most %d, so "
                    "that no file makes every device contact more servers); %d more "
                    "ignored", key, limit, limit, len(value) - limit)
        return value[:limit]
    return value


def _unknown_keys(where: str, raw: dict[str, object], known: frozenset[str]) -> None:
    """One warning naming a few unknown keys, however many there are."""
    unknown = sorted(set(raw) - known)
    if not unknown:
        return
    names = ", ".join(f"'{shown(key)}'" for key in unknown[:_UNKNOWN_SHOWN])
    more = f" and {len(unknown) - _UNKNOWN_SHOWN} more" if len(unknown) > _UNKNOWN_SHOWN else ""
    log.warning("%s: ignoring unknown key%s %s%s", where, "s" if len(unknown) > 1 else "",
                names, more)


def _interface_exclude(doc: dict[str, object]) -> list[str]:
    patterns = _string_list(doc, "interface_exclude")
    if len(patterns) > INTERFACE_EXCLUDE_MAX:
        raise TeamConfigError(f"kbwg.json 'interface_exclude' has {len(patterns)} patterns; "
                              f"give at most {INTERFACE_EXCLUDE_MAX}")
    for index, pattern in enumerate(patterns, start=1):
        if len(pattern) > PATTERN_MAX_CHARS:
            raise TeamConfigError(
                f"kbwg.json 'interface_exclude' item {index}: '{shown(pattern)}' is longer "
                f"than {PATTERN_MAX_CHARS} characters (interface names have at most 15)")
    return patterns


def _parse_relay(index: int, raw: object) -> RelayConfig | None:
    """The relay, or None (logged) when its URL names a scheme or transport this agent
    cannot use: the other relays and paths keep working."""
    where = f"kbwg.json 'relays' item {index}"
    if not isinstance(raw, dict):
        raise TeamConfigError(f"{where} must be an object with 'url' and 'secret'")
    _unknown_keys(where, raw, _KNOWN_RELAY_KEYS)
    url = raw.get("url")
    if not isinstance(url, str) or not url.strip():
        raise TeamConfigError(f"{where}: 'url' must be a turn:HOST:PORT string")
    try:
        address, transport = parse_relay_url(url.strip())
    except UnsupportedRelayUrl as exc:
        log.warning("%s: 'url' %s; this relay is skipped", where, exc)
        return None
    except ValueError as exc:
        raise TeamConfigError(f"{where}: 'url' {exc}") from exc
    secret = raw.get("secret")
    if not isinstance(secret, str) or not secret:
        raise TeamConfigError(f"{where}: 'secret' must be a non-empty string")
    username = raw.get("username")
    if username is not None and (not isinstance(username, str) or not username.strip()):
        raise TeamConfigError(f"{where}: 'username' must be a non-empty string when given")
    ca_file = raw.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.strip()):
        raise TeamConfigError(f"{where}: 'ca_file' must be a non-empty path when given")
    if ca_file is not None and transport != "tls":
        log.warning("%s: 'ca_file' only matters for turns: (TLS) URLs; ignored", where)
        ca_file = None
    return RelayConfig(
        url=url.strip(), host=address.host, port=address.port, secret=secret,
        transport=transport, username=username.strip() if username else None,
        ca_file=ca_file.strip() if ca_file else None,
    )


def _channel(doc: dict[str, object], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not _CHANNEL_RE.match(value):
        raise TeamConfigError(
            f"kbwg.json '{key}' must be a channel name (letters, digits, - and _, "
            f"at most 20), got {shown(repr(value))}"
        )
    return value


def _network(doc: dict[str, object], key: str, example: str) -> IPv4Network:
    raw = doc[key]
    try:
        if not isinstance(raw, str):
            raise ValueError("not a string")
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise TeamConfigError(
            f"kbwg.json '{key}' must be an IPv4 network like {example}, "
            f"got {shown(repr(raw))}"
        ) from exc
    if not isinstance(network, IPv4Network) or network.prefixlen > 30:
        raise TeamConfigError(
            f"kbwg.json '{key}' must be an IPv4 network of at least 4 addresses, "
            f"got {shown(repr(raw))}"
        )
    return network


def _overlay(doc: dict[str, object]) -> IPv4Network:
    """The checks that need no host: each agent also checks the overlay against its
    local policy and its routes (overlaycheck) before creating anything."""
    network = _network(doc, "overlay", "100.64.0.0/10")
    if network.prefixlen < WIDEST_PREFIX:
        raise TeamConfigError(
            f"kbwg.json 'overlay' {network} is wider than /{WIDEST_PREFIX}: it would route "
            f"that much of the address space into the tunnel; use a range like 100.64.0.0/16"
        )
    for special in _NEVER_OVERLAY:
        if network.overlaps(special):
            raise TeamConfigError(
                f"kbwg.json 'overlay' {network} overlaps {special}, which no overlay may "
                "use (this host, loopback, link-local, multicast or reserved addresses)"
            )
    return network


def _dynamic_range(doc: dict[str, object], overlay: IPv4Network) -> IPv4Network | None:
    if "dynamic_range" not in doc:
        return None
    network = _network(doc, "dynamic_range", "100.64.128.0/17")
    # Inside the overlay, the range's own network and broadcast addresses are never
    # claimed, which also keeps the overlay's out whenever the range touches them.
    if not network.subnet_of(overlay):
        raise TeamConfigError(
            f"kbwg.json 'dynamic_range' {network} is not inside the overlay {overlay}"
        )
    return network


def _policy(doc: dict[str, object]) -> Policy:
    raw = doc.get("policy", Policy.MESH.value)
    if isinstance(raw, str) and raw in {p.value for p in Policy}:
        return Policy(raw)
    choices = " or ".join(f"'{p.value}'" for p in Policy)
    raise TeamConfigError(f"kbwg.json 'policy' must be {choices}, got {shown(repr(raw))}")


def parse_team_config(data: bytes | str) -> TeamConfig:
    """Parse and validate kbwg.json; every error names the key it concerns."""
    # ValueError also covers an integer over Python's digit limit; RecursionError is
    # deep nesting. Both are documents the decoder refuses, like any other bad JSON.
    try:
        doc = strict_json.loads(data)
    except strict_json.DuplicateKeyError as exc:
        raise TeamConfigError(
            f"kbwg.json: key '{shown(exc.key)}' appears twice in one object; write each "
            "key once (readers disagree on which one counts)") from exc
    except (ValueError, RecursionError) as exc:
        raise TeamConfigError(f"kbwg.json is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise TeamConfigError("kbwg.json must be a JSON object")
    _unknown_keys("kbwg.json", doc, _KNOWN_KEYS)

    stun: list[HostPort] = []
    if "stun" in doc:
        for index, text in enumerate(_string_list(doc, "stun", STUN_MAX), start=1):
            try:
                stun.append(parse_host_port(text))
            except ValueError as exc:
                raise TeamConfigError(f"kbwg.json 'stun' item {index}: {exc}") from exc

    relays: list[RelayConfig] = []
    if "relays" in doc:
        entries = _capped(doc, "relays", RELAYS_MAX, "a list of {url, secret} objects")
        parsed = [_parse_relay(i, raw) for i, raw in enumerate(entries, start=1)]
        relays = [relay for relay in parsed if relay is not None]

    overlay = _overlay(doc) if "overlay" in doc else DEFAULT_OVERLAY

    announce = _channel(doc, "announce_channel", "announce")
    negotiation = _channel(doc, "negotiation_channel", "kbwg")
    exclude = (
        _interface_exclude(doc) if "interface_exclude" in doc
        else list(DEFAULT_INTERFACE_EXCLUDE)
    )
    return TeamConfig(
        stun=stun, relays=relays, overlay=overlay, announce_channel=announce,
        negotiation_channel=negotiation, interface_exclude=exclude,
        dynamic_range=_dynamic_range(doc, overlay), policy=_policy(doc),
    )


def team_config_path(team: str) -> str:
    # Team names are case-insensitive; KBFS folders use the canonical lowercase form.
    return f"/keybase/team/{team.lower()}/{TEAM_CONFIG_NAME}"


async def load_team_config(keybase: FileReader, team: str) -> TeamConfig:
    """Read the team's kbwg.json; an absent file gives the empty default."""
    path = team_config_path(team)
    try:
        raw = await keybase.fs_read(path)
    except KeybaseFileNotFound:
        log.info("%s does not exist: no STUN or relay servers, host candidates only", path)
        return TeamConfig()
    return parse_team_config(raw)
