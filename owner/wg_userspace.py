"""wireguard-go backend, configured only through its UAPI socket.

wireguard-go puts its UAPI socket in /var/run/wireguard/<iface>.sock, a path shared by
every network namespace, so two devices with one name in two namespaces would take each
other's socket. Each wireguard-go therefore runs in a private mount namespace with its
own tmpfs on /run/wireguard, and the owner reaches the socket through
/proc/<pid>/root/run/wireguard/<iface>.sock (root may traverse another process's root).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import time

from kbwg.core.addresses import format_endpoint
from kbwg.owner.tools import SYSTEM_DIRS, clean_env, find_tool
from kbwg.owner.wg_backend import BackendError, DeviceStats, PeerConfig, PeerStats

logger = logging.getLogger(__name__)

CONNECT_RETRIES = 100
CONNECT_RETRY_S = 0.02

# wireguard-go's compiled-in socket directory; realpath gives the mount point to cover
# (on Debian /var/run is a symlink to /run).
UAPI_DIR = "/var/run/wireguard"

# Runs as `sh -c SCRIPT sh MOUNT DIR BINARY IFNAME` after `unshare --mount`, every program
# by absolute path; exec keeps one pid from unshare to wireguard-go, so signalling the
# child signals wireguard-go itself.
_LAUNCH_SCRIPT = '"$1" -t tmpfs -o mode=0700 kbwg "$2" && exec "$3" -f "$4"'

_OUTPUT_TAIL_LINES = 40
# How long a device asked for any port waits for wireguard-go to bind one.
PICKED_PORT_WAIT_S = 2.0


class UserspaceBackend:
    name = "userspace"
    outlives_owner = False

    def __init__(
        self,
        binary: str,
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        uapi_timeout: float = 5.0,
    ) -> None:
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._uapi_timeout = uapi_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._output_task: asyncio.Task[None] | None = None
        self._output_tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
        self._ifname: str | None = None
        # The index of the link once wireguard-go made it: only that link is ours to
        # delete (another owner may hold the name while ours fails to start).
        self._ifindex: int | None = None
        self._socket_dir = os.path.realpath(UAPI_DIR)
        # UAPI handles one request per connection; one at a time keeps replies ordered.
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def socket_path(self) -> str:
        if self._process is None or self._ifname is None:
            raise BackendError("wireguard-go is not running")
        return f"/proc/{self._process.pid}/root{self._socket_dir}/{self._ifname}.sock"

    async def create(self, ifname: str, private_key: bytes, listen_port: int) -> int:
        if self._process is not None:
            raise BackendError("this backend already owns a device")
        if _link_exists(ifname):
            raise BackendError(f"interface {ifname} already exists")
        if not os.path.isabs(self._binary):
            raise BackendError(f"wireguard-go path {self._binary!r} is not absolute")
        tools = {name: find_tool(name) for name in ("unshare", "sh", "mount")}
        missing = sorted(name for name, path in tools.items() if path is None)
        if missing:
            raise BackendError(
                f"{', '.join(missing)} not found in {', '.join(SYSTEM_DIRS)} (root-owned "
                "only); they isolate wireguard-go's socket: install util-linux and mount"
            )
        # The mount point must exist in the shared filesystem before the private mount.
        os.makedirs(self._socket_dir, mode=0o755, exist_ok=True)
        argv = [
            str(tools["unshare"]), "--mount", "--propagation", "private",
            str(tools["sh"]), "-c", _LAUNCH_SCRIPT, "sh",
            str(tools["mount"]), self._socket_dir, self._binary, ifname,
        ]  # fmt: skip
        setpriv = find_tool("setpriv")
        if setpriv is not None:
            # If the owner is killed outright, wireguard-go still goes away with it.
            argv = [setpriv, "--pdeathsig", "TERM", *argv]
        # Nothing inherited: wireguard-go reads LOG_LEVEL and WG_* from its environment.
        extra = {"WG_PROCESS_FOREGROUND": "1"}
        if logger.isEnabledFor(logging.DEBUG):
            extra["LOG_LEVEL"] = "verbose"
        env = clean_env(**extra)
        self._ifname = ifname
        logger.info("starting wireguard-go for %s", ifname)
        self._process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            # wireguard-go logs to stdout; sh and mount complain on stderr.
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # Its own session: a terminal's Ctrl-C reaches the owner, which then stops
            # wireguard-go in order, rather than both racing.
            start_new_session=True,
        )
        self._output_task = asyncio.create_task(self._read_output(self._process))
        try:
            await self._wait_ready(ifname)
            config = [f"private_key={private_key.hex()}"]
            if listen_port:
                config.append(f"listen_port={listen_port}")
            await self._set(config)
            actual = await self.listen_port()
            if not listen_port:
                # wireguard-go binds its random port a moment after it comes up (its TUN
                # "up" event): wait for it, then pin it so it stays the announced one.
                deadline = time.monotonic() + PICKED_PORT_WAIT_S
                while not actual and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    actual = await self.listen_port()
                if not actual:
                    raise BackendError(f"wireguard-go for {ifname} picked no listen port "
                                       f"within {PICKED_PORT_WAIT_S:g} s; pass a port")
                await self._set([f"listen_port={actual}"])
        except BaseException:
            await self.close()
            raise
        logger.info("wireguard-go %s up (pid %d, port %d)", ifname, self._process.pid, actual)
        return actual

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self._output_tail.append(text)
            logger.debug("wireguard-go: %s", text)

    def _output(self) -> str:
        return "\n".join(self._output_tail) or "(no output)"

    async def _wait_ready(self, ifname: str) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout
        path = self.socket_path
        while True:
            if self._process.returncode is not None:
                # Let the reader collect the last words before reporting them.
                if self._output_task is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._output_task), 1.0)
                raise BackendError(
                    f"wireguard-go for {ifname} exited with status "
                    f"{self._process.returncode}:\n{self._output()}"
                )
            # The socket is in wireguard-go's private mount: once it is there, the link
            # of that name is wireguard-go's.
            index = _link_index(ifname) if os.path.exists(path) else None
            if index is not None:
                self._ifindex = index
                return
            if time.monotonic() > deadline:
                raise BackendError(
                    f"wireguard-go for {ifname} did not create its link and socket within "
                    f"{self._start_timeout:.0f}s:\n{self._output()}"
                )
            await asyncio.sleep(0.02)

    async def _uapi(self, request: str) -> list[tuple[str, str]]:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exchange(request), self._uapi_timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                raise BackendError(f"wireguard-go UAPI request failed: {exc!r}") from exc

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # wireguard-go binds its socket (the file appears) a moment before it listens:
        # under load a first request can land in between and be refused.
        for _ in range(CONNECT_RETRIES):
            try:
                return await asyncio.open_unix_connection(self.socket_path)
            except ConnectionRefusedError:
                await asyncio.sleep(CONNECT_RETRY_S)
        return await asyncio.open_unix_connection(self.socket_path)

    async def _exchange(self, request: str) -> list[tuple[str, str]]:
        reader, writer = await self._connect()
        try:
            writer.write(request.encode())
            await writer.drain()
            pairs: list[tuple[str, str]] = []
            while True:
                line = await reader.readline()
                if not line:
                    raise BackendError("wireguard-go closed the UAPI socket mid-reply")
                text = line.decode().rstrip("\n")
                if not text:
                    break
                key, _, value = text.partition("=")
                pairs.append((key, value))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not pairs or pairs[-1][0] != "errno":
            raise BackendError(f"malformed UAPI reply: {pairs!r}")
        code = int(pairs[-1][1])
        if code:
            raise BackendError(f"wireguard-go refused the request: errno={code}")
        return pairs[:-1]

    async def _set(self, lines: list[str]) -> None:
        # One key=value per line: a value holding a newline would add lines of its own.
        if any("\n" in line for line in lines):
            raise BackendError("a UAPI value holds a newline: not sent")
        await self._uapi("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")

    async def set_peer(self, peer: PeerConfig) -> None:
        await self._set(uapi_peer_lines(peer))

    async def remove_peer(self, public_key: bytes) -> None:
        await self._set([f"public_key={public_key.hex()}", "remove=true"])

    async def _get(self) -> tuple[int, list[PeerStats]]:
        return parse_uapi_get(await self._uapi("get=1\n\n"))

    async def peers(self) -> list[PeerStats]:
        return (await self._get())[1]

    async def listen_port(self) -> int:
        return (await self._get())[0]

    async def stats(self) -> DeviceStats:
        listen_port, peers = await self._get()
        return DeviceStats(listen_port, peers)

    async def close(self) -> None:
        process, self._process = self._process, None
        ifname = self._ifname
        ifindex, self._ifindex = self._ifindex, None
        if process is not None and process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), self._stop_timeout)
            except TimeoutError:
                logger.warning("wireguard-go (pid %d) ignored SIGTERM, killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            except ProcessLookupError:
                pass
            except Exception:
                logger.exception("stopping wireguard-go (pid %d) failed", process.pid)
        if process is not None:
            logger.info("wireguard-go (pid %d) exited with %s", process.pid, process.returncode)
        if self._output_task is not None:
            task, self._output_task = self._output_task, None
            try:
                await asyncio.wait_for(task, 1.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:
                logger.exception("reading wireguard-go's output failed")
        # The TUN link goes with the process; only a wedged exit leaves it behind. A
        # wireguard-go that never came up made no link: one of its name is someone else's.
        if ifname is not None and ifindex is not None and _link_index(ifname) == ifindex:
            logger.warning("link %s outlived wireguard-go, deleting it", ifname)
            try:
                await _delete_link(ifindex)
            except Exception:
                logger.exception("deleting link %s failed", ifname)


def _link_exists(ifname: str) -> bool:
    return _link_index(ifname) is not None


def _link_index(ifname: str) -> int | None:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


async def _delete_link(index: int) -> None:
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        await ipr.link("del", index=index)


def uapi_peer_lines(peer: PeerConfig) -> list[str]:
    """The `set=1` lines that create or update one peer, replacing its allowed IPs."""
    lines = [f"public_key={peer.public_key.hex()}"]
    if peer.endpoint is not None:
        lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
    lines.append(f"persistent_keepalive_interval={peer.keepalive}")
    lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={cidr}" for cidr in peer.allowed_ips)
    return lines


def parse_uapi_get(pairs: list[tuple[str, str]]) -> tuple[int, list[PeerStats]]:
    """A `get=1` reply (without its errno line) → (listen port, peers)."""
    listen_port = 0
    peers: list[PeerStats] = []
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is not None:
            sec = int(str(current.get("last_handshake_time_sec", 0)))
            nsec = int(str(current.get("last_handshake_time_nsec", 0)))
            allowed = current.get("allowed_ip", [])
            peers.append(
                PeerStats(
                    public_key=bytes.fromhex(str(current["public_key"])),
                    endpoint=str(current["endpoint"]) if "endpoint" in current else None,
                    last_handshake=sec + nsec / 1e9 if sec else 0.0,
                    rx_bytes=int(str(current.get("rx_bytes", 0))),
                    tx_bytes=int(str(current.get("tx_bytes", 0))),
                    allowed_ips=list(allowed) if isinstance(allowed, list) else [],
                    keepalive=int(str(current.get("persistent_keepalive_interval", 0))),
                )
            )

    for key, value in pairs:
        if key == "public_key":
            finish()
            current = {"public_key": value, "allowed_ip": []}
        elif current is None:
            if key == "listen_port":
                listen_port = int(value)
        elif key == "allowed_ip":
            allowed_list = current["allowed_ip"]
            assert isinstance(allowed_list, list)
            allowed_list.append(value)
        else:
            current[key] = value
    finish()
    return listen_port, peers
