"""Human rendering of `status --json` for `kbwg-agent status`."""

from __future__ import annotations

import time
from typing import Any

from kbwg.core.printable import RENDER_LIMIT, printable_tree


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    seconds = max(0, int(now - ts))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    status = printable_tree(status, RENDER_LIMIT)  # no terminal controls from others
    lines = [
        f"{status['username']}/{status['device']} in team {status['team']}: "
        f"{status['overlay_ip']} on {status['interface']} ({status['backend']}), "
        f"listening on {status['endpoint']}",
        f"public key {status['public_key']}",
        "",
    ]
    mapping = (status.get("portmap") or {}).get("mapping")
    if mapping:
        lines[-1:-1] = [f"port mapped: {mapping['external']} -> {mapping['internal']} "
                        f"by {mapping['protocol']} on gateway {mapping['gateway']}"]
    for relay in status.get("relays") or []:
        if relay.get("transport", "udp") != "udp":  # a fallback: say so, and why
            lines[-1:-1] = [f"relay {relay['url']}: {relay['relayed']} over "
                            f"{relay['transport']} ({relay.get('transport_reason')})"]
    keybase = status.get("keybase") or {}
    if keybase.get("connected") is False:
        lines[-1:-1] = [f"Keybase unreachable since {_ago(keybase.get('down_since'), now)} "
                        "(tunnels stay up; reconnecting): "
                        f"{keybase.get('last_error') or 'no answer'}"]
    if keybase.get("rate_limited_until"):
        lines[-1:-1] = ["Keybase rate limit: chat calls held for "
                        f"{max(0, int(keybase['rate_limited_until'] - now))}s"]
    header = ("PEER", "OVERLAY IP", "PATH", "ENDPOINT", "RTT", "HANDSHAKE", "RX", "TX")
    rows = [header]
    reasons = []
    for peer in status["peers"]:
        name = f"{peer['username']}/{peer['device']}"
        if peer.get("dynamic"):
            name += " (dynamic)"
        rtt = peer.get("rtt_ms")
        rows.append((
            name,
            peer["overlay_ip"],
            peer.get("path") or "none",
            peer["endpoint"] or ("(negotiating)" if peer["public_key"] else "(not announced)"),
            f"{rtt:.1f} ms" if rtt is not None else "-",
            _ago(peer["last_handshake"], now),
            _bytes(peer["rx_bytes"]),
            _bytes(peer["tx_bytes"]),
        ))
        if peer.get("reason"):
            reasons.append(f"  {name}: {peer['reason']}")
    if len(rows) == 1:
        lines.append("no peers listed in peers.json besides this device")
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if reasons:
        lines += ["", "why:", *reasons]
    return "\n".join(lines)
