"""kbwg.portmap against fake gateways on loopback: PCP, NAT-PMP and UPnP mappings,
renewal at half the lifetime (virtual clock), deletion on close and on a gateway change,
and gateways that answer garbage, refuse, time out or listen on nothing: each a clear
log line and no mapping, never an exception."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from portmap_fakes import PUBLIC_IP, FakeIgd, FakePcpGateway, start_pcp_gateway
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, now

from kbwg.agent.diag import DiagReport, render_report
from kbwg.agent.status_view import render_status
from kbwg.negotiation.candidates import TYPE_PREFERENCE, candidate_priority
from kbwg.negotiation.natprobe import NatBehaviour
from kbwg.portmap import natpmp, pcp
from kbwg.portmap.exchange import Garbage
from kbwg.portmap.gateway import Gateway
from kbwg.portmap.mapper import (
    ENV_PORTMAP,
    PortmapConfig,
    PortMapper,
    ProbeReport,
    config_from_env,
    probe,
)
from kbwg.portmap.mapping import Mapping, PortmapError

pytestmark = VIRTUAL_CLOCK

WG_PORT = 51820
WAITS = (0.25, 0.5, 1.0)


def gateway_at(host: str = "127.0.0.1") -> Gateway:
    return Gateway(host, "127.0.0.1", "lo")


def mapper_for(fake: FakePcpGateway | None, protocols: tuple[str, ...] = ("pcp", "nat-pmp"),
               lifetime: int = 120, port: int | None = None,
               **kwargs: object) -> PortMapper:
    config = PortmapConfig(lifetime=lifetime, protocols=protocols,  # type: ignore[arg-type]
                           pcp_port=port or (fake.port if fake else 9), waits=WAITS,
                           upnp_timeout=1.0)

    async def find() -> Gateway:
        return gateway_at()

    return PortMapper(WG_PORT, config, find_gateway=find, **kwargs)  # type: ignore[arg-type]


def closed_udp_port() -> int:
    """A loopback port nobody listens on: datagrams to it draw ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_pcp_maps_the_same_port_renews_at_half_lifetime_and_deletes_on_close() -> None:
    fake = await start_pcp_gateway("pcp")
    mapper = mapper_for(fake)
    mapping = await mapper.ensure()
    assert mapping is not None and mapping.protocol == "pcp"
    assert (mapping.external_ip, mapping.external_port, mapping.lifetime) == (
        PUBLIC_IP, WG_PORT, 120)
    assert fake.mappings == {WG_PORT: WG_PORT}
    first = fake.maps("pcp")[0]
    assert (first.internal_port, first.external_port) == (WG_PORT, WG_PORT)

    # Virtual time: the sleeps measure the renewal timer, exactly.
    await asyncio.sleep(59.9)
    assert len(fake.maps("pcp")) == 1
    await asyncio.sleep(0.2)
    assert len(fake.maps("pcp")) == 2, "no renewal at half the lifetime"
    renewal = fake.maps("pcp")[1]
    # The nonce owns the mapping: a renewal that changed it would be a new mapping.
    assert renewal.nonce == first.nonce and renewal.external_port == WG_PORT
    await asyncio.sleep(59.8)
    assert len(fake.maps("pcp")) == 2
    await asyncio.sleep(0.2)
    assert len(fake.maps("pcp")) == 3, "no second renewal"
    assert mapper.mapping is not None

    await mapper.close()
    (delete,) = fake.maps("pcp", deleting=True)
    assert delete.nonce == first.nonce and fake.mappings == {}
    assert mapper.mapping is None and await mapper.ensure() is None
    fake.close()


async def test_natpmp_only_gateway_is_used_after_pcp_says_unsupported_version(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    fake = await start_pcp_gateway("natpmp")
    mapper = mapper_for(fake)
    mapping = await mapper.ensure()
    assert mapping is not None and mapping.protocol == "nat-pmp"
    assert mapping.external == f"{PUBLIC_IP}:{WG_PORT}"
    assert "speaks only NAT-PMP" in caplog.text
    assert fake.mappings == {WG_PORT: WG_PORT}
    await asyncio.sleep(60.1)
    assert len(fake.maps("nat-pmp")) == 2, "no renewal at half the lifetime"
    await mapper.close()
    assert fake.mappings == {} and len(fake.maps("nat-pmp", deleting=True)) == 1
    fake.close()


@pytest.mark.parametrize(("mode", "says"), [
    ("garbage", "answered garbage"),
    ("refuse", "refused: result 2"),
    ("silent", "no answer from 127.0.0.1"),
])
async def test_bad_gateway_gives_a_log_line_and_no_mapping(
        mode: str, says: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    fake = await start_pcp_gateway(mode)
    mapper = mapper_for(fake)
    started = now()
    assert await mapper.ensure() is None
    assert mapper.mapping is None
    for protocol in ("pcp", "nat-pmp"):
        error = mapper.last_errors[protocol]
        assert error is not None and says in error, mapper.last_errors
    assert caplog.text.count(says) >= 2, caplog.text
    if mode == "refuse":
        assert now() - started < 0.01
    else:
        # Both protocols waited out their retransmissions (garbage does not end them: a
        # good answer may still come), no more.
        assert now() - started == pytest.approx(2 * sum(WAITS), abs=0.01)
    # A gateway that failed is not asked again on every gathering...
    count = fake.datagrams
    assert await mapper.ensure() is None and fake.datagrams == count
    # ...only after a while.
    await asyncio.sleep(mapper.config.retry_after_failure_s)
    assert await mapper.ensure() is None and fake.datagrams > count
    await mapper.close()
    fake.close()


@REAL_CLOCK
async def test_nothing_listening_is_refused_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    mapper = mapper_for(None, port=closed_udp_port())
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await mapper.ensure() is None
    assert loop.time() - started < 0.2
    assert "refused" in (mapper.last_errors["pcp"] or "")
    assert "the gateway does not speak it" in caplog.text
    await mapper.close()


async def test_renewal_that_fails_retries_then_expires_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    fake = await start_pcp_gateway("pcp")
    changes: list[float] = []
    mapper = mapper_for(fake, on_change=lambda: changes.append(now()))
    started = now()
    assert await mapper.ensure() is not None
    fake.mode = "silent"
    # Renewal at 60 s, then every 15 s while the lease lasts (it ends at 120 s); each
    # try waits out both protocols' retransmissions (3.5 s).
    await asyncio.sleep(110)
    assert not changes and mapper.mapping is not None
    await asyncio.sleep(20)
    assert changes and changes[0] - started == pytest.approx(120, abs=5), changes
    assert mapper.mapping is None
    assert "renewal failed" in caplog.text and "expired" in caplog.text
    await mapper.close()
    fake.close()


async def test_renewal_on_a_new_external_port_reports_the_change() -> None:
    fake = await start_pcp_gateway("pcp")
    changes: list[float] = []
    mapper = mapper_for(fake, on_change=lambda: changes.append(now()))
    assert (await mapper.ensure()) is not None
    fake.port_shift = 7  # e.g. the gateway restarted and gave the port to someone else
    await asyncio.sleep(65)
    assert mapper.mapping is not None and mapper.mapping.external_port == WG_PORT + 7
    await mapper.close()
    fake.close()


async def test_a_new_gateway_gets_the_mapping_and_the_old_one_loses_it() -> None:
    first = await start_pcp_gateway("pcp", host="127.0.0.1")
    second = await start_pcp_gateway("pcp", host="127.0.0.2")
    # One port number for both: the mapper asks whichever gateway is current.
    second.close()
    loop = asyncio.get_running_loop()
    _, second = await loop.create_datagram_endpoint(
        lambda: FakePcpGateway("pcp", public_ip="198.51.100.7"),
        local_addr=("127.0.0.2", first.port))
    current = [Gateway("127.0.0.1", "127.0.0.1", "lo")]

    async def find() -> Gateway:
        return current[0]

    mapper = PortMapper(WG_PORT, PortmapConfig(lifetime=120, protocols=("pcp",),
                                               pcp_port=first.port, waits=WAITS),
                        find_gateway=find)
    assert (await mapper.ensure()) is not None and first.mappings
    current[0] = Gateway("127.0.0.2", "127.0.0.1", "lo")
    mapping = await mapper.ensure()
    assert mapping is not None and mapping.external_ip == "198.51.100.7"
    assert first.mappings == {} and second.mappings == {WG_PORT: WG_PORT}
    await mapper.close()
    assert second.mappings == {}
    first.close()
    second.close()


async def test_off_by_environment_asks_nothing() -> None:
    fake = await start_pcp_gateway("pcp")
    config = config_from_env({ENV_PORTMAP: "off"})
    assert config.protocols == ()
    asked = []

    async def find() -> Gateway:
        asked.append(True)
        return Gateway("127.0.0.1", "127.0.0.1", "lo")

    mapper = PortMapper(WG_PORT, config, find_gateway=find)
    assert await mapper.ensure() is None and fake.requests == [] and asked == []
    assert config_from_env({ENV_PORTMAP: "upnp,pcp"}).protocols == ("pcp", "upnp")
    assert config_from_env({ENV_PORTMAP: "bogus"}).protocols == ("pcp", "nat-pmp", "upnp")
    fake.close()


# -- UPnP (aiohttp's HTTP client and server: real time) -----------------------------------

def upnp_mapper(igd: FakeIgd) -> PortMapper:
    async def find() -> Gateway:
        return gateway_at()

    config = PortmapConfig(lifetime=120, protocols=("upnp",), ssdp_port=igd.ssdp_port,
                           upnp_timeout=1.0)
    return PortMapper(WG_PORT, config, find_gateway=find)


@REAL_CLOCK
async def test_upnp_maps_and_deletes() -> None:
    igd = await FakeIgd().start()
    try:
        mapper = upnp_mapper(igd)
        mapping = await mapper.ensure()
        assert mapping is not None and mapping.protocol == "upnp"
        assert mapping.external == f"{PUBLIC_IP}:{WG_PORT}"
        assert igd.mappings == {WG_PORT: ("127.0.0.1", WG_PORT, 120)}
        add = next(args for action, args in igd.actions if action == "AddPortMapping")
        assert add["NewProtocol"] == "UDP" and add["NewRemoteHost"] == ""
        await mapper.close()
        assert igd.mappings == {}
    finally:
        await igd.close()


@REAL_CLOCK
@pytest.mark.parametrize(("mode", "says"), [
    ("fault", "UPnP: mapping failed"),
    ("garbage", "UPnP: mapping failed"),
    ("elsewhere", "no SSDP answer"),
])
async def test_upnp_gateway_that_refuses_or_talks_nonsense(
        mode: str, says: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    igd = await FakeIgd(mode=mode).start()
    try:
        mapper = upnp_mapper(igd)
        assert await mapper.ensure() is None
        assert says in (mapper.last_errors["upnp"] or ""), mapper.last_errors
        assert says in caplog.text
        if mode == "elsewhere":
            # Never fetched from a host that is not the gateway.
            assert "not the gateway" in caplog.text and igd.actions == []
        await mapper.close()
    finally:
        await igd.close()


@REAL_CLOCK
async def test_probe_says_which_protocols_the_gateway_answers() -> None:
    fake = await start_pcp_gateway("natpmp")
    igd = await FakeIgd().start()
    try:
        config = PortmapConfig(pcp_port=fake.port, ssdp_port=igd.ssdp_port, waits=WAITS,
                               upnp_timeout=1.0)
        report = await probe(gateway_at(), config)
        data = report.to_json()
        assert (data["pcp"], data["nat_pmp"], data["upnp"]) == ("no", "yes", "yes"), data
        assert data["public_ip"] == PUBLIC_IP and "only NAT-PMP" in data["errors"]["pcp"]
        assert fake.maps("pcp") == [] and fake.maps("nat-pmp") == []  # it maps nothing

        fake.mode = "garbage"
        silent = PortmapConfig(pcp_port=fake.port, ssdp_port=closed_udp_port(),
                               waits=(0.1,), upnp_timeout=0.3)
        data = (await probe(gateway_at(), silent)).to_json()
        assert (data["pcp"], data["nat_pmp"], data["upnp"]) == ("error", "error", "no"), data
    finally:
        fake.close()
        await igd.close()


# -- formats and reports -------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_decoders_reject_any_bytes_cleanly(data: bytes) -> None:
    decoders = [pcp.decode_map(b"n" * 12, WG_PORT), pcp.decode_announce,
                natpmp.decode_address, natpmp.decode_map(WG_PORT)]
    for decode in decoders:
        with contextlib.suppress(Garbage, PortmapError):
            decode(data)


def test_pcp_request_layout() -> None:
    request = pcp.map_request(b"N" * 12, "198.18.1.10", WG_PORT, WG_PORT, 7200)
    assert len(request) == 60 and request[:2] == b"\x02\x01"
    assert request[8:24] == b"\x00" * 10 + b"\xff\xff" + bytes([198, 18, 1, 10])
    assert request[36] == 17  # UDP
    assert natpmp.map_request(WG_PORT, WG_PORT, 7200) == (
        b"\x00\x01\x00\x00" + WG_PORT.to_bytes(2, "big") * 2 + (7200).to_bytes(4, "big"))


def test_mapped_candidates_rank_between_host_and_srflx() -> None:
    assert TYPE_PREFERENCE["srflx"] < TYPE_PREFERENCE["mapped"] < TYPE_PREFERENCE["host"]
    assert candidate_priority("srflx") < candidate_priority("mapped") < candidate_priority(
        "host")


def test_diag_reports_and_renders_the_gateway() -> None:
    report = DiagReport(local_port=WG_PORT, config_source="command line", nat=NatBehaviour())
    report.portmap = ProbeReport(
        gateway="198.18.1.1", local_ip="198.18.1.10",
        answers={"pcp": "yes", "nat-pmp": "yes", "upnp": "no"},
        errors={"pcp": None, "nat-pmp": None, "upnp": "UPnP: no SSDP answer"},
        public_ip=PUBLIC_IP,
        mapping=Mapping("pcp", "198.18.1.1", "198.18.1.10", WG_PORT, PUBLIC_IP, WG_PORT,
                        7200, 0.0))
    data = report.to_json()
    assert data["portmap"]["nat_pmp"] == "yes" and data["portmap"]["upnp"] == "no"
    assert data["portmap"]["mapping"]["external"] == f"{PUBLIC_IP}:{WG_PORT}"
    text = render_report(data)
    assert "Port mapping (gateway 198.18.1.1, from 198.18.1.10)" in text
    assert "UPnP     no (UPnP: no SSDP answer)" in text
    assert f"{PUBLIC_IP}:{WG_PORT} -> 198.18.1.10:{WG_PORT} by pcp" in text


def test_status_shows_the_mapping() -> None:
    status = {"username": "alice", "device": "laptop", "team": "t",
              "overlay_ip": "100.64.0.1", "interface": "kbwg0", "backend": "userspace",
              "endpoint": f"{PUBLIC_IP}:{WG_PORT}", "public_key": "pk", "peers": []}
    assert "port mapped" not in render_status(status)
    mapping = Mapping("upnp", "198.18.1.1", "198.18.1.10", WG_PORT, PUBLIC_IP, WG_PORT,
                      7200, 0.0)
    text = render_status({**status, "portmap": {"gateway": "198.18.1.1",
                                                "mapping": mapping.to_json(), "errors": {}}})
    assert (f"port mapped: {PUBLIC_IP}:{WG_PORT} -> 198.18.1.10:{WG_PORT} by upnp on "
            "gateway 198.18.1.1") in text.splitlines()


def test_upnp_library_is_not_loaded_when_the_gateway_answers_no_ssdp() -> None:
    """async-upnp-client brings aiohttp (~25 MB): a gateway silent to SSDP never loads it."""
    import subprocess
    import sys
    import textwrap

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # takes the search and never answers
    script = textwrap.dedent(f"""
        import asyncio, sys
        from kbwg.portmap.gateway import Gateway
        from kbwg.portmap.mapper import PortmapConfig, probe
        config = PortmapConfig(protocols=("upnp",), ssdp_port={silent.getsockname()[1]},
                               upnp_timeout=0.3)
        report = asyncio.run(probe(Gateway("127.0.0.1", "127.0.0.1", "lo"), config))
        print(report.to_json()["upnp"], "aiohttp" in sys.modules,
              "async_upnp_client" in sys.modules)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, check=True)
        assert silent.recv(2048).startswith(b"M-SEARCH * HTTP/1.1")
    finally:
        silent.close()
    assert done.stdout.split() == ["no", "False", "False"], done.stdout + done.stderr
