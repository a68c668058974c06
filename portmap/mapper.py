"""The agent's port mapping: one UDP mapping of the WireGuard port on the default
gateway, tried by PCP, then NAT-PMP, then UPnP IGD, renewed at half its lifetime,
moved when the gateway changes, and deleted on close.

Every failure is a log line and no mapping: the other candidates never wait on it or
break because of it. Times are the event loop's (tests run it on a virtual clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Mapping as Env
from dataclasses import dataclass, field
from typing import Any

from kbwg.portmap import natpmp, pcp, ssdp
from kbwg.portmap.exchange import DEFAULT_WAITS
from kbwg.portmap.gateway import Gateway
from kbwg.portmap.mapping import PROTOCOLS, Mapping, PortmapError, Protocol, mapping_problem

log = logging.getLogger(__name__)

DEFAULT_LIFETIME_S = 7200
# After every protocol failed on a gateway, ask it again only this much later (or when
# the gateway changes): a router without any of them is the common case.
RETRY_AFTER_FAILURE_S = 300.0
# A failed renewal is tried again this often until the lease runs out.
RENEW_RETRY_S = 15.0
# upnp.SSDP_PORT: kbwg.portmap.upnp (async-upnp-client, aiohttp) is imported only when
# UPnP is tried, so an agent whose gateway speaks PCP never loads it.
SSDP_PORT = 1900
# "off" turns port mapping off; a comma-separated list ("pcp,nat-pmp") limits it.
ENV_PORTMAP = "KBWG_PORTMAP"


@dataclass
class PortmapConfig:
    lifetime: int = DEFAULT_LIFETIME_S
    protocols: tuple[Protocol, ...] = PROTOCOLS  # in the order tried; empty: off
    pcp_port: int = pcp.PORT  # NAT-PMP shares it
    ssdp_port: int = SSDP_PORT
    waits: Sequence[float] = DEFAULT_WAITS
    upnp_timeout: float = 2.0
    retry_after_failure_s: float = RETRY_AFTER_FAILURE_S


def config_from_env(environ: Env[str, str]) -> PortmapConfig:
    """$KBWG_PORTMAP: unset (all protocols), "off", or the protocols to use."""
    text = environ.get(ENV_PORTMAP, "").strip().lower()
    if not text:
        return PortmapConfig()
    if text in ("off", "no", "0", "false", "none"):
        return PortmapConfig(protocols=())
    names = [n.strip() for n in text.split(",") if n.strip()]
    chosen = tuple(p for p in PROTOCOLS if p in names)
    unknown = sorted(set(names) - set(PROTOCOLS))
    if unknown or not chosen:
        log.warning("$%s=%s: unknown %s; use off or a list of %s; using all of them",
                    ENV_PORTMAP, text, ", ".join(unknown) or "value", ", ".join(PROTOCOLS))
        return PortmapConfig()
    return PortmapConfig(protocols=chosen)


@dataclass
class ProbeReport:
    """Which protocols the gateway answers (`diag`): per protocol "yes", "no" (nothing
    answers it) or "error" (an answer we could not use); why, per protocol."""

    gateway: str | None = None
    local_ip: str | None = None
    answers: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str | None] = field(default_factory=dict)
    public_ip: str | None = None
    mapping: Mapping | None = None

    def to_json(self) -> dict[str, Any]:
        key = {"pcp": "pcp", "nat-pmp": "nat_pmp", "upnp": "upnp"}
        return {
            "gateway": self.gateway, "local_ip": self.local_ip,
            **{key[p]: self.answers.get(p) for p in PROTOCOLS},
            "errors": {key[p]: self.errors.get(p) for p in PROTOCOLS},
            "public_ip": self.public_ip,
            "mapping": self.mapping.to_json() if self.mapping else None,
        }


def _answer(exc: PortmapError) -> str:
    return "no" if exc.kind in ("timeout", "refused") or "only NAT-PMP" in str(exc) else "error"


async def probe(gateway: Gateway | None, config: PortmapConfig | None = None) -> ProbeReport:
    """Ask the gateway each protocol at once without mapping anything: PCP ANNOUNCE,
    NAT-PMP's public address, an SSDP search for an IGD."""
    config = config or PortmapConfig()
    report = ProbeReport()
    if not config.protocols:
        report.errors = {p: f"off (${ENV_PORTMAP})" for p in PROTOCOLS}
        return report
    if gateway is None:
        report.errors = {p: "no default gateway" for p in PROTOCOLS}
        return report
    report.gateway, report.local_ip = gateway.address, gateway.local_ip

    async def one(protocol: Protocol) -> None:
        try:
            if protocol == "pcp":
                result = await pcp.announce(gateway.address, gateway.local_ip,
                                            config.pcp_port, config.waits)
                if result:
                    raise PortmapError("error", f"PCP: ANNOUNCE answered result {result} "
                                       f"({pcp.RESULTS.get(result, 'unknown')})")
            elif protocol == "nat-pmp":
                report.public_ip = await natpmp.public_address(
                    gateway.address, gateway.local_ip, config.pcp_port, config.waits)
            else:
                await ssdp.gateway_answers(gateway.address, gateway.local_ip,
                                           config.ssdp_port, config.upnp_timeout)
                from kbwg.portmap import upnp

                location = await upnp.discover(gateway.address, gateway.local_ip,
                                               config.upnp_timeout, config.ssdp_port)
                await asyncio.wait_for(upnp.wan_service(location, config.upnp_timeout),
                                       config.upnp_timeout)
        except PortmapError as exc:
            report.answers[protocol], report.errors[protocol] = _answer(exc), str(exc)
            log.info("probing %s on %s: %s", protocol, gateway.address, exc)
        except Exception as exc:  # a gateway's answers are untrusted input
            report.answers[protocol] = "error"
            report.errors[protocol] = f"{protocol}: {type(exc).__name__}: {exc}"[:300]
        else:
            report.answers[protocol], report.errors[protocol] = "yes", None

    # All at once: each asks from its own socket, so answers cannot be mixed up even
    # where PCP and NAT-PMP share the gateway's port.
    await asyncio.gather(*(one(p) for p in PROTOCOLS if p in config.protocols))
    for protocol in PROTOCOLS:
        if protocol not in config.protocols:
            report.errors[protocol] = f"off (${ENV_PORTMAP})"
    return report


class PortMapper:
    """The WireGuard port's mapping on the current default gateway."""

    def __init__(self, internal_port: int, config: PortmapConfig | None,
                 find_gateway: Callable[[], Awaitable[Gateway | None]],
                 on_change: Callable[[], None] | None = None) -> None:
        self.internal_port = internal_port
        self.config = config or PortmapConfig()
        self.mapping: Mapping | None = None
        self.gateway: Gateway | None = None
        # The last attempt per protocol: None (worked) or the error, for `status`/`diag`.
        self.last_errors: dict[str, str | None] = {}
        self.on_change = on_change
        self._find_gateway = find_gateway
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None
        self._closed = False

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def ensure(self) -> Mapping | None:
        """The mapping on the current gateway, made if there is none (a new gateway
        loses the old one's mapping); None when no protocol works."""
        async with self._lock:
            if self._closed or not self.config.protocols:
                return None
            gateway = await self._find_gateway()
            if gateway != self.gateway:
                if self.mapping is not None:
                    log.info("gateway changed (%s -> %s): dropping the port mapping %s",
                             self.gateway.address if self.gateway else None,
                             gateway.address if gateway else None, self.mapping.external)
                    await self._remove()
                self.gateway, self._failed_at = gateway, None
            if gateway is None or self.mapping is not None:
                return self.mapping
            if (self._failed_at is not None
                    and self._now() - self._failed_at < self.config.retry_after_failure_s):
                return None
            self.mapping = await self._map(gateway)
            if self.mapping is None:
                self._failed_at = self._now()
            else:
                self._renewal = asyncio.create_task(self._renew_loop(), name="portmap-renew")
            return self.mapping

    async def _map(self, gateway: Gateway, previous: Mapping | None = None) -> Mapping | None:
        """PCP, NAT-PMP, UPnP in turn; `previous` is renewed by its own protocol first."""
        protocols = list(self.config.protocols)
        if previous is not None and previous.protocol in protocols:
            protocols.remove(previous.protocol)
            protocols.insert(0, previous.protocol)
        for protocol in protocols:
            try:
                mapping = await self._request(protocol, gateway, previous)
            except PortmapError as exc:
                self.last_errors[protocol] = str(exc)
                log.info("port mapping on %s: %s", gateway.address, exc)
                continue
            except Exception as exc:  # untrusted answers: log, never crash the agent
                self.last_errors[protocol] = f"{protocol}: {type(exc).__name__}: {exc}"
                log.warning("port mapping on %s by %s failed unexpectedly: %r",
                            gateway.address, protocol, exc)
                continue
            problem = mapping_problem(mapping, self.config.lifetime)
            if problem is not None:
                self.last_errors[protocol] = f"{protocol}: {problem}"
                log.warning("port mapping on %s by %s: %s; not using it", gateway.address,
                            protocol, problem)
                if previous is None or previous.protocol != protocol:
                    # Whatever the gateway made, if it made anything, does not outlive
                    # us. Not a renewal's: that would delete the mapping we hold.
                    await self._delete(mapping)
                continue
            # A longer lease than asked is renewed as the one asked: believing a forged
            # 136 years, the mapping would never be renewed and run out unnoticed.
            mapping.lifetime = min(mapping.lifetime, self.config.lifetime)
            self.last_errors[protocol] = None
            if previous is None or mapping.external != previous.external:
                log.info("port mapping by %s on %s: %s -> %s:%d (lease %d s)", protocol,
                         gateway.address, mapping.external, gateway.local_ip,
                         self.internal_port, mapping.lifetime)
            return mapping
        return None

    async def _request(self, protocol: Protocol, gateway: Gateway,
                       previous: Mapping | None) -> Mapping:
        same = previous if previous is not None and previous.protocol == protocol else None
        # The same external port as the internal one where the gateway allows it.
        external = same.external_port if same else self.internal_port
        cfg = self.config
        if protocol == "pcp":
            return await pcp.map_udp(
                gateway.address, gateway.local_ip, self.internal_port, external,
                cfg.lifetime, nonce=same.nonce if same else None,
                external_ip=same.external_ip if same else "0.0.0.0",
                port=cfg.pcp_port, waits=cfg.waits)
        if protocol == "nat-pmp":
            return await natpmp.map_udp(gateway.address, gateway.local_ip, self.internal_port,
                                        external, cfg.lifetime, cfg.pcp_port, cfg.waits)
        if same is None:
            await ssdp.gateway_answers(gateway.address, gateway.local_ip, cfg.ssdp_port,
                                       cfg.upnp_timeout)
        from kbwg.portmap import upnp

        return await upnp.map_udp(gateway.address, gateway.local_ip, self.internal_port,
                                  external, cfg.lifetime, cfg.upnp_timeout, cfg.ssdp_port,
                                  service=same.control if same else None)

    async def _renew_loop(self) -> None:
        while (current := self.mapping) is not None:
            expires = current.obtained_at + current.lifetime
            due = current.obtained_at + current.lifetime / 2
            while True:
                await asyncio.sleep(max(0.0, due - self._now()))
                async with self._lock:
                    if self.mapping is not current or self.gateway is None:
                        return
                    renewed = await self._map(self.gateway, previous=current)
                    if renewed is not None:
                        self.mapping = renewed
                        if renewed.external != current.external:
                            self._changed()
                        break
                    if self._now() + RENEW_RETRY_S < expires:
                        # Still ours until the lease ends: try again soon.
                        log.warning("port mapping %s: renewal failed, trying again in "
                                    "%.0f s", current.external, RENEW_RETRY_S)
                        due = self._now() + RENEW_RETRY_S
                        continue
                    log.warning("port mapping %s expired: renewal failed", current.external)
                    self.mapping = None
                    self._failed_at = self._now()
                    self._changed()
                    return

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _remove(self) -> None:
        mapping, self.mapping = self.mapping, None
        task, self._renewal = self._renewal, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if mapping is not None:
            await self._delete(mapping)

    async def _delete(self, mapping: Mapping) -> None:
        cfg = self.config
        try:
            if mapping.protocol == "pcp":
                await pcp.unmap_udp(mapping, cfg.pcp_port, cfg.waits)
            elif mapping.protocol == "nat-pmp":
                await natpmp.unmap_udp(mapping, cfg.pcp_port, cfg.waits)
            else:
                from kbwg.portmap import upnp

                await upnp.unmap_udp(mapping, cfg.upnp_timeout)
                await upnp.close(mapping)
        except PortmapError as exc:
            log.info("port mapping %s not deleted: %s", mapping.external, exc)
        except Exception as exc:  # untrusted answers, as above
            log.warning("port mapping %s not deleted: %r", mapping.external, exc)
        else:
            log.info("port mapping %s deleted", mapping.external)

    async def close(self) -> None:
        """Delete the mapping (on exit); ensure() makes none afterwards."""
        if self._closed:
            return
        self._closed = True
        task = self._renewal
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            await self._remove()

    def to_json(self) -> dict[str, Any]:
        return {"gateway": self.gateway.address if self.gateway else None,
                "mapping": self.mapping.to_json() if self.mapping else None,
                "errors": dict(self.last_errors)}
