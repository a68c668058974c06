"""Fast tests run in the machine's own network namespace: port mapping stays off there,
or an agent or `diag` under test would send PCP, NAT-PMP and SSDP to the machine's real
default gateway. Tests of kbwg.portmap use fake gateways on loopback instead."""

from __future__ import annotations

import pytest

from kbwg.portmap.mapper import ENV_PORTMAP


@pytest.fixture(autouse=True)
def _no_port_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PORTMAP, "off")
