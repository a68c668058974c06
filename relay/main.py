"""`kbwg-agent relay`: run the TURN relay until INT or TERM.

Counters are logged every --stats-interval seconds, on SIGUSR1 and at exit, only the
non-zero ones: a quiet relay logs one short line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
from dataclasses import replace

from kbwg.core.addresses import Address
from kbwg.relay.config import Lifetimes, ServerConfig
from kbwg.relay.limits import Quotas, parse_networks
from kbwg.relay.server import RelayServer
from kbwg.relay.streams import server_tls_context

log = logging.getLogger(__name__)

DEFAULT_PORT = 3478
DEFAULT_TLS_PORT = 5349


def parse_address(text: str, default_port: int | None = DEFAULT_PORT) -> Address:
    """IPv4 `ADDR[:PORT]`; raises ValueError with a message fit for the user."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = port_text, ""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"'{text}': the relay needs an IPv4 address") from None
    if not port_text:
        if default_port is None:
            raise ValueError(f"'{text}' has no port")
        return (host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"'{text}': port must be a number from 0 to 65535")
    return (host, int(port_text))


def parse_address6(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """IPv6 `[ADDR]:PORT` or a bare `ADDR`; raises ValueError with a message fit for
    the user."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{text}': write an IPv6 address and port as [ADDR]:PORT")
        port_text = rest[1:]
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"'{text}': this needs an IPv6 address, as [ADDR]:PORT") from None
    if not port_text:
        return (host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"'{text}': port must be a number from 0 to 65535")
    return (host, int(port_text))


def parse_ip6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text.strip().strip("[]")))
    except ValueError:
        raise ValueError(f"'{text}': --relay-ip6 needs an IPv6 address") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    quotas, lifetimes = Quotas(), Lifetimes()
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT",
                        help=f"UDP address to serve TURN and STUN on (port default "
                        f"{DEFAULT_PORT})")
    parser.add_argument("--listen6", metavar="[ADDR]:PORT",
                        help=f"also serve TURN and STUN over IPv6 here (port default "
                        f"{DEFAULT_PORT}); IPv6 relayed addresses come from its address, "
                        f"or from --relay-ip6")
    parser.add_argument("--tcp-listen", metavar="ADDR:PORT",
                        help=f"also serve TURN over TCP here (RFC 8656; port default "
                        f"{DEFAULT_PORT}); for clients whose network blocks UDP")
    parser.add_argument("--tls-listen", metavar="ADDR:PORT",
                        help=f"also serve TURN over TLS here (turns:, port default "
                        f"{DEFAULT_TLS_PORT}); needs --cert and --key")
    parser.add_argument("--cert", metavar="FILE",
                        help="PEM certificate chain for --tls-listen")
    parser.add_argument("--key", metavar="FILE",
                        help="PEM private key of --cert")
    parser.add_argument("--secret-file", required=True, metavar="FILE",
                        help="file holding the TURN REST shared secret (the team's relay "
                        "secret from kbwg.json)")
    parser.add_argument("--realm", default="kbwg", help="authentication realm "
                        "(default: kbwg)")
    parser.add_argument("--relay-ip", metavar="IP",
                        help="address of relayed sockets, put in XOR-RELAYED-ADDRESS "
                        "(default: the listen address; needed when listening on 0.0.0.0)")
    parser.add_argument("--relay-ip6", metavar="IP",
                        help="IPv6 address of relayed sockets, for allocations asking for "
                        "IPv6 (REQUESTED-ADDRESS-FAMILY; default: the --listen6 address; "
                        "needed when listening on [::]); without it and --listen6 such "
                        "requests get 440")
    parser.add_argument("--alt-address", metavar="IP:PORT",
                        help="second IP and port for RFC 5780 NAT behaviour discovery "
                        "(OTHER-ADDRESS, CHANGE-REQUEST); both must differ from --listen")
    parser.add_argument("--allow-peer", action="append", default=[], metavar="CIDR",
                        help="relay to these peers even when denied by default: private "
                        "(RFC 1918), shared (100.64/10), benchmarking, loopback, "
                        "link-local, multicast and reserved ranges, and the relay host's "
                        "own addresses (documentation ranges are allowed); for a test "
                        "world or a relay serving a LAN (repeatable)")
    parser.add_argument("--deny-peer", action="append", default=[], metavar="CIDR",
                        help="never relay to these peers either (repeatable)")
    parser.add_argument("--max-allocations", type=int, default=quotas.allocations,
                        metavar="N", help=f"allocations in total (default "
                        f"{quotas.allocations})")
    parser.add_argument("--max-allocations-per-user", type=int, metavar="N",
                        default=quotas.allocations_per_user,
                        help=f"allocations per REST user (default "
                        f"{quotas.allocations_per_user})")
    parser.add_argument("--max-allocations-per-ip", type=int, metavar="N",
                        default=quotas.allocations_per_address,
                        help=f"allocations per client IP address (an IPv6 client's /64), "
                        f"whatever the user names (default {quotas.allocations_per_address}; "
                        f"raise it for more devices behind one NAT or /64)")
    parser.add_argument("--max-permissions", type=int, metavar="N",
                        default=quotas.permissions_per_allocation,
                        help=f"permissions per allocation (default "
                        f"{quotas.permissions_per_allocation})")
    parser.add_argument("--max-channels", type=int, metavar="N",
                        default=quotas.channels_per_allocation,
                        help=f"channels per allocation (default "
                        f"{quotas.channels_per_allocation})")
    parser.add_argument("--max-pps", type=int, metavar="N",
                        default=quotas.packets_per_second,
                        help=f"packets per second per allocation, 0 for no limit "
                        f"(default {quotas.packets_per_second})")
    parser.add_argument("--max-bytes-per-second", type=int, metavar="N",
                        default=quotas.bytes_per_second,
                        help=f"bytes per second per allocation, 0 for no limit "
                        f"(default {quotas.bytes_per_second})")
    parser.add_argument("--max-lifetime", type=int, metavar="SECONDS",
                        default=int(lifetimes.allocation_max),
                        help=f"longest allocation lifetime granted (default "
                        f"{int(lifetimes.allocation_max)})")
    parser.add_argument("--max-credential-lifetime", type=int, metavar="SECONDS",
                        default=int(lifetimes.credential_max),
                        help=f"refuse TURN REST usernames whose expiry lies further ahead "
                        f"(default {int(lifetimes.credential_max)}, 24 h: what kbwg "
                        f"agents mint; 5 minutes of clock skew are allowed on top)")
    parser.add_argument("--unauth-rate", type=int, metavar="N",
                        default=quotas.unauthenticated_total,
                        help=f"answers per second to requests without credentials "
                        f"(Binding, 401 challenges), all sources together, 0 for no "
                        f"limit (default {quotas.unauthenticated_total})")
    parser.add_argument("--unauth-rate-per-source", type=int, metavar="N",
                        default=quotas.unauthenticated_per_source,
                        help=f"the same per source IP address, 0 for no limit (default "
                        f"{quotas.unauthenticated_per_source})")
    parser.add_argument("--stats-interval", type=float, default=300, metavar="SECONDS",
                        help="log counters this often, 0 never (default 300; SIGUSR1 "
                        "logs them at once)")


def build_config(args: argparse.Namespace) -> ServerConfig:
    """Raises ValueError or OSError with a message fit for the user."""
    with open(args.secret_file, encoding="utf-8") as handle:
        secret = handle.read().strip()
    if not secret:
        raise ValueError(f"{args.secret_file} holds no secret")
    numbers = (args.max_allocations, args.max_allocations_per_user,
               args.max_allocations_per_ip, args.max_permissions, args.max_channels,
               args.max_pps, args.max_bytes_per_second, args.unauth_rate,
               args.unauth_rate_per_source)
    if min(numbers) < 0 or args.max_lifetime < 1 or args.max_credential_lifetime < 1:
        raise ValueError("limits must not be negative, and --max-lifetime and "
                         "--max-credential-lifetime at least 1")
    quotas = Quotas(
        allocations=args.max_allocations, allocations_per_user=args.max_allocations_per_user,
        allocations_per_address=args.max_allocations_per_ip,
        permissions_per_allocation=args.max_permissions,
        channels_per_allocation=args.max_channels, packets_per_second=args.max_pps,
        bytes_per_second=args.max_bytes_per_second,
        unauthenticated_per_source=args.unauth_rate_per_source,
        unauthenticated_total=args.unauth_rate,
    )
    lifetimes = Lifetimes()
    lifetimes = replace(lifetimes, allocation_max=args.max_lifetime,
                        allocation_default=min(lifetimes.allocation_default,
                                               args.max_lifetime),
                        credential_max=args.max_credential_lifetime)
    if args.tls_listen and not (args.cert and args.key):
        raise ValueError("--tls-listen needs --cert FILE and --key FILE (PEM)")
    if (args.cert or args.key) and not args.tls_listen:
        raise ValueError("--cert and --key are for --tls-listen ADDR:PORT; add it")
    config = ServerConfig(
        listen=parse_address(args.listen),
        tcp_listen=parse_address(args.tcp_listen) if args.tcp_listen else None,
        tls_listen=(parse_address(args.tls_listen, DEFAULT_TLS_PORT) if args.tls_listen
                    else None),
        cert_file=args.cert, key_file=args.key,
        secret=secret,
        realm=args.realm,
        relay_ip=args.relay_ip,
        listen6=parse_address6(args.listen6) if args.listen6 else None,
        relay_ip6=parse_ip6(args.relay_ip6) if args.relay_ip6 else None,
        alt_address=parse_address(args.alt_address, None) if args.alt_address else None,
        allow_peers=parse_networks(args.allow_peer),
        deny_peers=parse_networks(args.deny_peer),
        quotas=quotas,
        lifetimes=lifetimes,
    )
    _ = config.relayed_ip  # fails early on a wildcard listen address without --relay-ip
    _ = config.relayed_ip6  # and on [::] without --relay-ip6
    if config.tls_listen is not None:
        server_tls_context(config)  # fails early on unreadable or mismatched files
    return config


def _log_counters(server: RelayServer, why: str) -> None:
    state = server.table.counts()
    log.info("counters (%s): %s %s", why, json.dumps(state),
             json.dumps(server.counters.nonzero(), sort_keys=True))


async def serve(config: ServerConfig, stats_interval: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = RelayServer(config)
    loop.add_signal_handler(signal.SIGUSR1, _log_counters, server, "SIGUSR1")
    try:
        await server.start()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), stats_interval or None)
            except TimeoutError:
                _log_counters(server, "periodic")
    finally:
        _log_counters(server, "exit")
        server.close()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(signum)


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"kbwg-agent relay: error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(config, args.stats_interval))
    except OSError as exc:
        print(f"kbwg-agent relay: error: cannot serve: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"kbwg-agent relay: error: {exc}", file=sys.stderr)
        return 1
    return 0
