"""Terminal escapes and control characters from others never reach a terminal or a log
line raw (kbwg.core.printable).

Each hostile string goes in where its sender puts it (a STUN or TURN reason phrase, a
gateway's SOAP fault, a CANDIDATES line, a Keybase sender name, a relay username, a
report the agent answers) and the rendered text or log line is read back: every
control character shows as an escape, no line is forged, nothing long stays long.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from aioice import stun
from portmap_fakes import FakeIgd, _soap
from stun_test_server import Address, StunTestServer
from test_log_floods import allocation_on_hostile
from test_portmap import upnp_mapper
from test_relay_protocol import Endpoint, client_for, running
from test_wire import ALICE_KEY, BOB, BOB_KEY, CHANNEL, MALLORY_KEY, message

from kbwg.agent import cli
from kbwg.agent.announce import AnnounceBook
from kbwg.agent.announce_candidates import CandidateBook
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import ClaimBook
from kbwg.agent.control import ControlError
from kbwg.agent.diag import DiagReport, RelayReport, ServerReport, render_report
from kbwg.agent.keybase import ChatMessage
from kbwg.agent.ping_command import PingOptions, render_ping, run_ping
from kbwg.agent.status_view import render_status
from kbwg.core.identity import DeviceId
from kbwg.core.printable import PrintableMessage, printable, printable_tree
from kbwg.negotiation.natprobe import NatBehaviour
from kbwg.negotiation.replay import ReplayGuard
from kbwg.negotiation.stun_client import StunErrorResponse, open_udp_client
from kbwg.negotiation.wire import receive, seal
from kbwg.turn.client import RelayAllocation, RelayRefused

# Retitles the terminal, clears the screen, colours by 8-bit CSI, returns to the start
# of the line to write over it, forges a line of its own and a journal priority, rubs
# out a character and reverses what follows.
HOSTILE = ("\x1b]0;pwned\x07\x1b[2J\x9b31m\rpath: direct\n<3>2026-12-02 09:00:00 WARNING "
           "kbwg: forged\x08\u202eevil")
FORGED = "\n<3>2026-12-02"


def assert_inert(text: str) -> None:
    """No control character outside the renderer's own line breaks, and the hostile
    string's parts there only as escapes."""
    for line in text.split("\n"):
        assert line.isprintable(), f"control characters in {line!r}"
    assert "\x1b" not in text and "\r" not in text and FORGED not in text, repr(text)


def assert_inert_line(line: str) -> None:
    assert line.isprintable(), f"control characters in {line!r}"


# -- the helper -------------------------------------------------------------------------


def test_printable_escapes_every_control_as_repr_does_and_keeps_the_rest() -> None:
    assert printable("alice/laptop 198.51.100.7:51820 ünïcødé ✓") == (
        "alice/laptop 198.51.100.7:51820 ünïcødé ✓")
    out = printable(HOSTILE, 1000)
    assert out.isprintable()
    assert out.startswith(r"\x1b]0;pwned\x07\x1b[2J\x9b31m\rpath: direct\n<3>")
    assert out.endswith(r"forged\x08\u202eevil")
    assert printable("\x00\x7f\u2028\ud800\t") == r"\x00\x7f\u2028\ud800\t"
    assert printable(ValueError("bad\x1b[0m")) == r"bad\x1b[0m"


def test_printable_cuts_long_text_and_never_splits_an_escape() -> None:
    assert printable("x" * 500, 10) == "x" * 10 + "…"
    # An escape goes whole or not at all: 8 characters, then \x1b would make 12.
    assert printable("ab\x1b" * 10, 9) == r"ab\x1bab" + "…"
    assert len(printable("\x1b" * 10_000, 200)) <= 201


def test_printable_tree_cleans_every_string_and_keeps_keys_and_numbers() -> None:
    tree = {"a": [HOSTILE, {"b": HOSTILE, "n": 1.5, "k": None, "t": True}], "c": 3}
    clean = printable_tree(tree, 1000)
    assert clean["c"] == 3 and clean["a"][1]["n"] == 1.5 and clean["a"][1]["k"] is None
    assert clean["a"][1]["t"] is True
    assert clean["a"][0] == clean["a"][1]["b"] == printable(HOSTILE, 1000)


def test_printable_message_filter_makes_the_whole_line_printable() -> None:
    record = logging.LogRecord("kbwg.x", logging.WARNING, __file__, 1,
                               "ignoring %s: %s", ("alice/laptop", HOSTILE), None)
    assert PrintableMessage().filter(record)
    assert_inert_line(record.getMessage())
    assert record.getMessage().startswith("ignoring alice/laptop: \\x1b]0;pwned")
    plain = logging.LogRecord("kbwg.x", logging.INFO, __file__, 1, "%d%%", (5,), None)
    PrintableMessage().filter(plain)
    assert plain.getMessage() == "5%" and plain.args == (5,)  # left as it was


# -- status, diag, ping: the human renderers --------------------------------------------

STATUS: dict[str, Any] = {
    "username": "alice", "device": "laptop", "team": "t", "overlay_ip": "100.64.0.1",
    "interface": "kbwg0", "backend": "userspace", "endpoint": "198.18.1.10:51820",
    "public_key": "pk",
    "portmap": {"mapping": {"external": "203.0.113.1:51820", "internal": "198.18.1.10:51820",
                            "protocol": "upnp", "gateway": HOSTILE}},
    "relays": [{"url": "turn:" + HOSTILE, "relayed": "203.0.113.3:49152", "transport": "tcp",
                "transport_reason": "udp: STUN transaction failed (403 - " + HOSTILE + ")"}],
    "keybase": {"connected": False, "down_since": 990.0, "last_error": HOSTILE},
    "peers": [{
        "username": "bob", "device": HOSTILE, "overlay_ip": "100.64.0.2", "dynamic": True,
        "public_key": "k", "endpoint": "198.18.1.11:51820", "path": HOSTILE,
        "rtt_ms": 0.4, "last_handshake": 995.0, "rx_bytes": 1, "tx_bytes": 2,
        "reason": "relayed: " + HOSTILE,
    }],
}


def test_status_renders_strings_from_others_inert() -> None:
    text = render_status(STATUS, now=1000.0)
    assert_inert(text)
    assert r"bob/\x1b]0;pwned\x07" in text  # shown, escaped
    assert "Keybase unreachable since 10s ago" in text  # the rest as before


def test_status_json_escapes_control_characters() -> None:
    """`status --json` and `diag --json` print json.dumps's default (ensure_ascii):
    every control character, C1 included, is a \\u escape."""
    text = json.dumps(STATUS, indent=2, sort_keys=True)
    assert text.isascii() and "\x1b" not in text and "\x9b" not in text
    assert "\\u001b]0;pwned\\u0007" in text and "\\u009b31m\\rpath" in text
    assert json.loads(text) == STATUS


def test_diag_renders_strings_from_others_inert() -> None:
    report = DiagReport(local_port=5, config_source="team t kbwg.json", nat=NatBehaviour(
        udp=True, notes=["filtering test I failed: " + HOSTILE]),
        stun=[ServerReport("stun." + HOSTILE, error="answered error 400 " + HOSTILE)],
        relays=[RelayReport("203.0.113.3:3478", url="turn:" + HOSTILE, error=HOSTILE)])
    data = report.to_json()
    data["portmap"].update(gateway="192.0.2.1", local_ip="192.0.2.5",
                           errors={"upnp": "UPnP: mapping failed: " + HOSTILE}, upnp="error")
    data["relay_allocations"] = STATUS["relays"]
    data["peers"] = [{**STATUS["peers"][0],
                      "candidates": [{"type": HOSTILE, "ip": "198.18.1.11", "port": 1}],
                      "pairs": [{"local": HOSTILE, "remote": "x", "state": HOSTILE}]}]
    text = render_report(data)
    assert_inert(text)
    assert "answered error 400 \\x1b]0;pwned" in text


def test_ping_renders_replies_and_refusals_inert() -> None:
    reply = {"peer": "bob/" + HOSTILE, "overlay_ip": "100.64.0.2", "status": "timeout",
             "path": HOSTILE, "local_candidate": HOSTILE, "remote_candidate": "x",
             "reason": HOSTILE}
    assert_inert(render_ping(reply, 5.0))
    assert_inert(render_ping({**reply, "status": "no-path"}, 5.0))

    async def refused(_peer: str, _timeout: float) -> dict[str, Any]:
        raise ControlError("no peer " + HOSTILE)

    out, err = io.StringIO(), io.StringIO()
    assert asyncio.run(run_ping(PingOptions("x", count=1), refused, out, err)) == 1
    assert_inert(err.getvalue().rstrip("\n"))

    async def answered(_peer: str, _timeout: float) -> dict[str, Any]:
        return reply

    out, err = io.StringIO(), io.StringIO()
    asyncio.run(run_ping(PingOptions("x", count=1, interval=0, until_direct=True),
                         answered, out, err))
    assert_inert(out.getvalue().rstrip("\n"))
    assert_inert(err.getvalue().rstrip("\n"))


# -- STUN servers and relays ------------------------------------------------------------


def _refusing(reason: str) -> Any:
    def refuse(request: stun.Message, _client: Address, _local: Address) -> list[bytes]:
        return [bytes(stun.Message(stun.Method.BINDING, stun.Class.ERROR,
                                   transaction_id=request.transaction_id,
                                   attributes={"ERROR-CODE": (400, reason)}))]
    return refuse


async def test_a_stun_servers_reason_phrase_is_printable() -> None:
    async with StunTestServer(override=_refusing(HOSTILE)) as server, \
            open_udp_client("127.0.0.1") as (client, _):
        with pytest.raises(StunErrorResponse) as info:
            await client.binding(server.address, timeout=10, rto=10)
    assert info.value.code == 400
    assert_inert_line(str(info.value))
    assert "answered error 400 \\x1b]0;pwned" in str(info.value)


async def test_diag_end_to_end_shows_a_stun_servers_and_relays_reason_inert() -> None:
    """`kbwg-agent diag` as a user runs it, against a STUN server and a relay (one
    loopback server) refusing every Binding with a hostile reason phrase."""
    async with StunTestServer(override=_refusing(HOSTILE)) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kbwg.agent.cli", "diag", "--no-classic",
            "--stun", f"127.0.0.1:{server.port}", "--relay", f"turn:127.0.0.1:{server.port}",
            "--timeout", "3", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "KBWG_PORTMAP": "off"})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert "answered error 400 \\x1b]0;pwned" in text, (text, err.decode())
    assert_inert(text.rstrip("\n"))
    assert_inert(err.decode().rstrip("\n"))


class _AllocateRefuser:
    """A relay refusing every Allocate with 403 and a hostile reason phrase."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            data, client = await self.endpoint.receive(timeout=60)
            request = stun.parse_message(data)
            self.endpoint.send(bytes(stun.Message(
                request.message_method, stun.Class.ERROR, request.transaction_id,
                {"ERROR-CODE": (403, HOSTILE)})), client)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.endpoint.close()


async def test_a_relay_refusing_the_allocation_is_reported_inert() -> None:
    """The failure becomes `status`'s and `diag`'s transport_reason and a warning."""
    relay = _AllocateRefuser(await Endpoint.open())
    try:
        with pytest.raises(stun.TransactionFailed) as info:
            await RelayAllocation.open("turn:hostile", relay.endpoint.address, "alice",
                                       "secret", timeout=10)
    finally:
        await relay.close()
    assert isinstance(info.value, RelayRefused)
    assert info.value.response.error_code == 403  # the rest of it as aioice made it
    assert_inert_line(str(info.value))
    assert "(403 - \\x1b]0;pwned" in str(info.value)


async def test_a_relay_refusing_a_channel_with_a_hostile_reason_logs_it_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    async with allocation_on_hostile(lambda n: HOSTILE) as (allocation, _relay):
        with caplog.at_level(logging.INFO, logger="kbwg.turn.client"):
            allocation.send(b"wireguard", ("203.0.113.7", 51820))
            for _ in range(200):
                if allocation.counters.send_errors:
                    break
                await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert lines and "\\x1b]0;pwned" in lines[0]
    for line in lines:
        assert_inert_line(line)


async def test_the_relay_logs_a_hostile_username_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    """A credential holder chooses the user part of its TURN REST username."""
    with caplog.at_level(logging.DEBUG, logger="kbwg.relay"):
        async with running() as server:
            client = await client_for(server, user="mallory" + HOSTILE)
            client.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kbwg.relay")]
    created = [line for line in lines if "allocation" in line and "mallory" in line]
    assert created and "mallory\\x1b]0;pwned" in created[0], lines
    for line in lines:
        assert_inert_line(line)


# -- the gateway ------------------------------------------------------------------------


class _HostileIgd(FakeIgd):
    """An IGD refusing AddPortMapping with a SOAP fault whose description forges a line
    (XML carries CR, LF and the C1 controls, though not ESC)."""

    async def _control(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.text()
        if "AddPortMapping" in request.headers.get("SOAPACTION", ""):
            self.actions.append(("AddPortMapping", {}))
            fault = _soap(
                "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError"
                '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                "<errorCode>718</errorCode><errorDescription>Conflict\x9b31m&#13;path: direct"
                "\n2026-12-02 09:00:00 WARNING kbwg: forged</errorDescription></UPnPError>"
                "</detail></s:Fault>")
            return web.Response(status=500, text=fault, content_type="text/xml")
        del body
        return await super()._control(request)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_gateways_soap_fault_reaches_diag_and_the_log_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    igd = await _HostileIgd().start()
    try:
        mapper = upnp_mapper(igd)
        assert await mapper.ensure() is None
        error = mapper.last_errors["upnp"] or ""
        await mapper.close()
    finally:
        await igd.close()
    assert "UPnP: mapping failed" in error and "path: direct" in error, error
    assert_inert_line(error)
    for record in caplog.records:
        assert_inert_line(record.getMessage())


# -- team members: chat posts and the names Keybase gives -------------------------------


def test_a_candidates_line_with_a_hostile_scope_is_logged_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    """ip_address keeps an IPv6 scope as given: a link-local candidate with ESC and BEL
    in its scope was quoted raw in the refusal."""
    key = base64.b64encode(bytes(ALICE_KEY.public_key)).decode()
    body = f"CANDIDATES {key} host:fe80::1%\x1b]0;pwned\x07\x9b2J:51820"
    msg = ChatMessage(7, "conv", CHANNEL, "alice", "laptop", time.time(), body, "text")
    with caplog.at_level(logging.INFO, logger="kbwg.agent.announce_feed"):
        assert not take_announce_message(msg, DeviceId("bob", "pc"), AnnounceBook(),
                                         ClaimBook(), [], None, time.time(),
                                         published=CandidateBook())
    (line,) = [r.getMessage() for r in caplog.records if "candidates 7" in r.getMessage()]
    assert "fe80::1%\\x1b]0;pwned\\x07\\x9b2J" in line, line
    assert_inert_line(line)


def test_a_claim_of_many_addresses_with_hostile_words_is_logged_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    """The refusal of a claim naming several addresses quoted its words as given."""
    key = base64.b64encode(bytes(ALICE_KEY.public_key)).decode()
    body = f"CLAIM 100.64.128.0/30 \x1b]0;pwned\x07\x9b2J {key}"
    msg = ChatMessage(8, "conv", CHANNEL, "alice", "laptop", time.time(), body, "text")
    with caplog.at_level(logging.INFO, logger="kbwg.agent.announce_feed"):
        assert not take_announce_message(msg, DeviceId("bob", "pc"), AnnounceBook(),
                                         ClaimBook(), [], None, time.time())
    (line,) = [r.getMessage() for r in caplog.records if "claim 8" in r.getMessage()]
    assert "addresses at once" in line and "\\x1b]0;pwned\\x07\\x9b2J" in line, line
    assert_inert_line(line)


def test_a_forged_box_from_a_hostile_sender_name_is_logged_inert(
        caplog: pytest.LogCaptureFixture) -> None:
    """The refusal quotes the sender as Keybase names it (a name with controls, were
    Keybase ever to give one)."""
    sender = DeviceId("alice", "laptop" + HOSTILE)
    text = seal(message(sender=sender), MALLORY_KEY, BOB_KEY.public_key)
    post = ChatMessage(9, "conv", CHANNEL, sender.username, sender.device, time.time(),
                       text, "text")
    # On the logger itself, copied as it comes: its handlers see the record before any
    # of the root's (a `join` handler an earlier test set up makes the whole line
    # printable, in the record itself, args and all).
    records: list[tuple[str, object]] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append((r.getMessage(), r.args))  # type: ignore[method-assign]
    wire_log = logging.getLogger("kbwg.negotiation.wire")
    wire_log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="kbwg.negotiation.wire"):
            assert receive(post, known_keys={sender: ALICE_KEY.public_key},
                           my_private=BOB_KEY, me=BOB, guard=ReplayGuard()) is None
    finally:
        wire_log.removeHandler(handler)
    (args,) = [a for m, a in records if "message 9" in m]
    assert isinstance(args, tuple), args
    exc_text = str(args[-1])
    assert "laptop\\x1b]0;pwned" in exc_text, exc_text  # the reason itself is inert
    assert_inert_line(exc_text)


# -- join's log lines on stderr ---------------------------------------------------------


def test_joins_log_lines_are_inert_whatever_a_caller_passes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler `join` logs through (stderr, the journal under systemd) gets one
    printable line per record: a name quoted raw anywhere cannot forge another line or
    its `<N>` priority."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    root.handlers = []
    try:
        cli._setup_logging(0)
        logging.getLogger("kbwg.agent.test").warning("ignoring claim %d from %s: %s", 3,
                                                    "alice/laptop", HOSTILE)
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, level = saved
        root.setLevel(level)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("<4>kbwg.agent.test: ignoring claim 3 from alice/laptop: ")
    assert_inert_line(lines[0])


def test_a_cli_error_quoting_others_is_inert(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._fail("team t: kbwg.json relay " + HOSTILE) == 1
    err = capsys.readouterr().err.rstrip("\n")
    assert_inert(err)
    # A line the quoted text starts is indented: no forged line, no journal priority.
    assert all(line.startswith("  ") for line in err.split("\n")[1:]), err


def test_a_cli_error_keeps_our_own_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The sudo set-up hint spans lines: shown as lines, not as one line of escapes."""
    assert cli._fail("the device owner needs root:\n    sudo kbwg-agent install-helper") == 1
    assert capsys.readouterr().err == ("kbwg-agent: error: the device owner needs root:\n"
                                       "      sudo kbwg-agent install-helper\n")
