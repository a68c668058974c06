"""Whether the gateway answers an SSDP search at all, asked before UPnP's library loads.

async-upnp-client's search module pulls in aiohttp: about 25 MB of the agent's memory
(bench/resources.py), on every host whose gateway speaks neither PCP nor NAT-PMP. Most
such gateways do not answer SSDP either, so one unicast M-SEARCH from a plain socket asks
first, and the library does the real discovery (and checks the answer) only when
something answered.
"""

from __future__ import annotations

from kbwg.portmap.exchange import Garbage, exchange

SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def search_request(gateway: str, port: int) -> bytes:
    return ("M-SEARCH * HTTP/1.1\r\n"
            f"HOST: {gateway}:{port}\r\n"
            'MAN: "ssdp:discover"\r\n'
            "MX: 1\r\n"
            f"ST: {SEARCH_TARGET}\r\n\r\n").encode("ascii")


def _is_answer(data: bytes) -> bool:
    if not data.startswith(b"HTTP/1.1 200"):
        raise Garbage("not an SSDP answer")
    return True


async def gateway_answers(gateway: str, local_ip: str | None, port: int,
                          timeout: float) -> None:
    """Returns once the gateway answers an M-SEARCH; PortmapError otherwise."""
    await exchange((gateway, port), local_ip, search_request(gateway, port), _is_answer,
                   "UPnP", waits=(timeout / 3, timeout * 2 / 3))
