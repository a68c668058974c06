"""`kbwg-agent join`: keeps this device's WireGuard peers in step with the team.

peers.json, `#announce` (ANNOUNCE and CLAIM lines) and the team's dev channel
(negotiation) are the inputs; the device owner's WireGuard device is the output.

`Agent` is `join` before it has joined: options, Keybase, how to start the device owner.
`Agent.run` joins, which makes a `JoinedDevice` (joined.py), runs that device's loops
until stopped, and cleans up whatever was made, however far joining got.

Start-up order matters for time to first packet: what does not depend on anything
else starts at once (the chat listener, the device owner, Keybase's whoami, both team
files); once whoami and kbwg.json are in, the channels are joined and #announce's
history is read (once the listener is subscribed: nothing falls between the two) while
peers.json is parsed and the overlay checked, and the books take that history once
peers.json is in; the device is created as soon as the owner is up; host candidates go
out at once and the others trickle in (nothing waits for a STUN or relay server that
may not answer). Imports are part of that order: this module imports only what
starting those processes needs, and the rest (negotiation, relays: most of the agent)
is imported in a thread while Keybase answers and the device owner starts and creates
the device. `startclock.milestone` logs each step's time since process start.
A Keybase service that does not answer yet, or a network with no address yet (a boot),
is waited for (startup_waits), not an error.

Team input is checked before it is applied: kbwg.json's overlay must pass the device
owner's own rule on this host before the device is created (overlaycheck); each key
belongs to one device (keyowners); peers follow (peer_sync) and are reconciled with the
device at each stats poll (device_stats).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Any

from kbwg.agent.join_options import JoinError, JoinOptions
from kbwg.agent.keybase import ChatMessage, KeybaseClient, KeybaseError
from kbwg.agent.owner_client import INSTALL_COMMAND, DeviceOwner, OwnerError, OwnerGone
from kbwg.agent.previous_owner import forget as forget_owner
from kbwg.agent.previous_owner import record as record_owner
from kbwg.agent.previous_owner import wait_for_previous as wait_for_previous_owner
from kbwg.agent.startclock import milestone
from kbwg.agent.startup_waits import StartupWaits
from kbwg.core.background import Background
from kbwg.core.identity import DeviceId

if TYPE_CHECKING:
    from kbwg.agent.joined import JoinedDevice
    from kbwg.agent.overlaycheck import RoutesReader
    from kbwg.agent.team_view import TeamView
    from kbwg.agent.teamconfig import TeamConfig
    from kbwg.owner.policy import IPNetwork
    from kbwg.turn.client import RelayAllocation

__all__ = ["Agent", "JoinError", "JoinOptions", "JoinedDevice", "OwnerFactory"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3.0
LISTENER_READY_TIMEOUT_S = 5.0
# What joining needs beyond kbwg.json's parser, loaded while it waits for Keybase and
# the owner, in the order needed: TeamView for peers.json, the overlay check and the
# owner's calls (not needed to start the owner, which goes first), then the data path.
# Not pyroute2: the device owner reads netlink for the agent (the host's routes for the
# overlay check, its addresses, gateway and changes).
DATA_PATH_MODULES = ("kbwg.agent.team_view", "kbwg.agent.overlaycheck",
                     "kbwg.agent.owner_calls", "kbwg.agent.runtime_state",
                     "kbwg.agent.presence", "kbwg.agent.connectivity", "kbwg.agent.control",
                     "kbwg.agent.joined")

OwnerFactory = Callable[[list[str] | None], Coroutine[Any, Any, DeviceOwner]]
JoinedCallback = Callable[["JoinedDevice"], object]


def __getattr__(name: str) -> Any:
    # JoinedDevice is the whole data path: loaded with the rest of it, during start-up
    # (see the module docstring), not when `join` imports this module.
    if name == "JoinedDevice":
        from kbwg.agent.joined import JoinedDevice

        return JoinedDevice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_data_path() -> None:
    for name in DATA_PATH_MODULES:
        importlib.import_module(name)


def _drop(task: asyncio.Future[Any]) -> None:
    """Cancel a start-up step; a failure it already had is start-up's to report (or is
    moot once another step failed), not the event loop's to log as never retrieved."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _imported(loading: asyncio.Future[None]) -> None:
    # Looking at the outcome marks it seen: start-up may have failed before awaiting it.
    if not loading.cancelled() and loading.exception() is None:
        milestone(log, "agent modules imported")


class Agent:
    """`join` before it has joined; `run` may be called once."""

    def __init__(
        self,
        options: JoinOptions,
        keybase: KeybaseClient,
        owner_factory: OwnerFactory = DeviceOwner.start,
        routes: RoutesReader | None = None,
        on_joined: JoinedCallback | None = None,
    ) -> None:
        self.options = options
        self.keybase = keybase
        self._owner_factory = owner_factory
        # None: the device owner reads them (`host_routes`).
        self._routes = routes
        # Told the device as soon as it takes messages (tests look inside it).
        self._on_joined = on_joined
        # Set by `reload` (SIGHUP); served once joined.
        self._reload = asyncio.Event()

    def reload(self) -> None:
        """Re-read the team's files now (peers.json applied, kbwg.json changes reported).
        Safe to call from a signal handler; a request made before joining is served
        right after."""
        self._reload.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; start-up problems raise JoinError and clean up."""
        listener_ready = asyncio.Event()
        joined: asyncio.Future[JoinedDevice] = asyncio.get_running_loop().create_future()
        stopper = asyncio.create_task(stop.wait(), name="stop")
        tasks = [asyncio.create_task(self._follow(listener_ready, joined), name="listen")]
        # Whatever joining makes is pushed here as it is made, and closed in reverse.
        async with contextlib.AsyncExitStack() as made:
            made.push_async_callback(self.keybase.close)
            try:
                starting = asyncio.create_task(self._start(listener_ready, made, joined),
                                               name="start")
                await asyncio.wait([starting, stopper, *tasks],
                                   return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():
                    starting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await starting
                    self._raise_failures(tasks)
                    return
                try:
                    device = starting.result()
                except OwnerGone as exc:
                    raise self._owner_died(exc) from exc
                tasks += [asyncio.create_task(loop, name=name)
                          for name, loop in device.upkeep.loops().items()]
                tasks.append(asyncio.create_task(self._serve_reloads(device), name="reload"))
                tasks.append(asyncio.create_task(self._watch_owner(device), name="owner"))
                await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                self._raise_failures(tasks)
            finally:
                for task in [stopper, *tasks]:
                    task.cancel()
                # Bounded: a library that swallows a cancellation must not hang the exit.
                _, stuck = await asyncio.wait([stopper, *tasks], timeout=SHUTDOWN_GRACE_S)
                for task in stuck:
                    log.warning("the %s task did not stop within %.0fs; exiting without it",
                                task.get_name(), SHUTDOWN_GRACE_S)

    async def _serve_reloads(self, device: JoinedDevice) -> None:
        from kbwg.agent.reload import reread_team_files

        while True:
            await self._reload.wait()
            self._reload.clear()
            try:
                await reread_team_files(device)
            except Exception:
                # A failed re-read must not stop the agent; the periodic refresh goes on.
                log.exception("re-reading the team files failed")

    @staticmethod
    async def _watch_owner(device: JoinedDevice) -> None:
        """The owner holds the device, so without it there is nothing left to keep in
        step: its death stops the agent at once, not at the next request that fails."""
        raise await device.owner.transport.wait_gone()

    def _owner_died(self, gone: OwnerGone) -> JoinError:
        return JoinError(
            f"{gone}. The WireGuard device {self.options.interface} went with it, so this "
            f"agent stopped. Start `kbwg-agent join {self.options.team}` again (a service "
            "manager restarts it by itself); if the device owner keeps dying, its last log "
            "lines above say why (and the system log, e.g. for the OOM killer)")

    def _raise_failures(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled():
                exc = task.exception()
                if isinstance(exc, OwnerGone):
                    raise self._owner_died(exc) from exc
                if exc is not None:
                    raise exc
                raise RuntimeError(f"internal error: the {task.get_name()} task ended")

    async def _follow(self, ready: asyncio.Event,
                      joined: asyncio.Future[JoinedDevice]) -> None:
        async for msg in self.keybase.listen(dev=True, ready=ready):
            # Messages that arrive during start-up wait here until peers are known.
            device = await asyncio.shield(joined)
            try:
                await device.chat.on_message(msg)
            except Exception:
                # One bad or unlucky message must not stop the agent.
                log.exception("handling message %d from %s/%s failed", msg.id,
                              msg.sender_username, msg.sender_device)

    async def _start(self, listener_ready: asyncio.Event, made: contextlib.AsyncExitStack,
                     joined: asyncio.Future[JoinedDevice]) -> JoinedDevice:
        # The device owner (a process, then wireguard-go) is the slowest step, so it
        # starts first, with Keybase's whoami, before this process imports any more.
        owner_task = asyncio.create_task(self._owner_factory(self.options.owner_command))
        owner_task.add_done_callback(lambda _: milestone(log, "device owner ready"))
        made.push_async_callback(self._stop_owner, owner_task)
        # At boot the Keybase service may not answer yet: these reads wait for it.
        self.keybase.link.joining = True
        waits = StartupWaits(self.keybase.link)
        whoami = asyncio.create_task(waits.keybase(self.keybase.whoami))
        made.callback(whoami.cancel)
        # Both team files at once (kbwg.json's parser is light; peers.json's is parsed
        # by TeamView, which loads with the data path).
        from kbwg.agent.peers_file import peers_path

        peers = peers_path(self.options.team)
        peers_raw = asyncio.create_task(waits.keybase(lambda: self.keybase.fs_read(peers)))
        made.callback(peers_raw.cancel)
        loading_config = asyncio.create_task(self._load_config(waits))
        made.callback(loading_config.cancel)
        await asyncio.sleep(0)  # the Keybase processes started (each task's first step)
        # In a thread, so that this loop goes on with Keybase's answers and the owner's
        # `create` meanwhile (the GIL passes to it whenever it has work).
        loading = asyncio.ensure_future(asyncio.to_thread(_import_data_path))
        loading.add_done_callback(_imported)
        identity, config = await asyncio.gather(whoami, loading_config)
        milestone(log, "whoami and kbwg.json read")
        me = DeviceId(identity.username, identity.device)
        from kbwg.agent.team_view import TeamView

        team = TeamView(self.keybase, self.options.team, config)
        # None of these waits for another: the channels are joined and #announce's
        # history read (once the listener is subscribed) while peers.json is parsed and
        # the overlay checked (which waits for the device owner).
        history = asyncio.create_task(self._fetch_history(team, listener_ready, waits))
        made.callback(_drop, history)
        # Before anything is created: the owner has started, but `create` waits for this.
        checking = asyncio.create_task(self._check_overlay(config, owner_task))
        made.callback(_drop, checking)
        await self._read_team(me, team, peers_raw)
        milestone(log, "peers.json read")
        # The books take the history once both it and peers.json are in.
        taking = asyncio.create_task(self._take_history(team, me, history))
        made.callback(_drop, taking)
        mine = next((e for e in team.entries if e.device_id == me), None)
        if mine is None:
            from kbwg.agent.presence import pick_dynamic

            await taking  # a dynamic address needs the live claims
            overlay_ip = pick_dynamic(team, me, self.options.state_dir)
        else:
            overlay_ip = mine.ip

        from kbwg.agent.wg_key import kept_private_key

        # The key of the last run: its peers still know it, so early checks reconnect
        # them before this run's announcement is delivered.
        private_key = kept_private_key(self.options.state_dir, me, self.options.team,
                                       new=self.options.new_key)
        # An agent killed outright leaves its owner removing the device for a moment.
        await wait_for_previous_owner(self.options.state_dir)
        await checking
        from kbwg.agent.owner_calls import OwnerCalls

        owner = OwnerCalls(await owner_task)
        record_owner(self.options.state_dir, owner.transport.pid)
        creating = asyncio.create_task(owner.create(
            self.options.interface, bytes(private_key), self.options.listen_port,
            IPv4Interface(f"{overlay_ip}/{config.overlay.prefixlen}"), self.options.backend))
        made.callback(creating.cancel)
        await loading
        from kbwg.agent.connectivity import Connectivity
        from kbwg.agent.control import ControlServer
        from kbwg.agent.joined import JoinedDevice
        from kbwg.agent.presence import announce_target, configured_endpoint
        from kbwg.agent.runtime_state import AgentState

        (announce_ip, announce_port), created = await asyncio.gather(
            waits.address(lambda: announce_target(self.options.endpoint, config,
                                                  owner.interfaces)),
            creating)
        port = created.listen_port
        milestone(log, "device created")
        state = AgentState(
            me=me, listed=mine is not None, overlay_ip=overlay_ip,
            public_key=base64.b64encode(bytes(private_key.public_key)).decode(),
            listen_port=port, interface=self.options.interface, backend=created.backend,
            announced_endpoint=f"{announce_ip}:{announce_port or port}",
        )
        log.info("%s is %s%s on %s (%s backend, port %d)", me, overlay_ip,
                 "" if mine else " (self-assigned)", self.options.interface,
                 state.backend, port)

        tasks = Background(log, "background step")

        def relay_lost(_allocation: RelayAllocation | None) -> None:
            # Only ever called once gathering runs, after `device` exists.
            tasks.spawn(device.upkeep.on_network_change())

        paths = await Connectivity.open(owner, port, me.username, config, relay_lost,
                                        configured_endpoint(self.options.endpoint, port))
        # A port mapping that comes late, moves or expires changes the candidates too.
        paths.portmap.on_change = lambda: relay_lost(None)
        made.push_async_callback(paths.close)
        # The books hold the history before anything acts on the team's messages.
        await taking
        device = JoinedDevice.assemble(self.options, self.keybase, team, state, owner, paths,
                                       private_key, tasks.spawn)
        paths.start_gathering()
        milestone(log, "gathering started")
        made.callback(device.peer_sync.close)
        if device.negotiator is not None:
            made.push_async_callback(device.negotiator.close)
        made.callback(tasks.cancel)
        control = ControlServer(self.options.state_dir, device.replies.handlers())
        await control.start()
        made.push_async_callback(control.close)
        joined.set_result(device)
        self.keybase.link.joining = False
        if self._on_joined is not None:
            self._on_joined(device)
        await device.introduce()
        milestone(log, "introduced (announced)")
        return device

    async def _stop_owner(self, owner_task: asyncio.Task[DeviceOwner]) -> None:
        """The owner is stopped however far start-up got (it removes the device)."""
        if not owner_task.done():
            owner_task.cancel()
        try:
            owner = await owner_task
        except BaseException:
            return  # it never started (the failure is reported by start-up)
        with contextlib.suppress(Exception):
            await owner.close()
        forget_owner(self.options.state_dir)
        log.info("device %s removed", self.options.interface)

    async def _load_config(self, waits: StartupWaits) -> TeamConfig:
        from kbwg.agent.teamconfig import TeamConfigError, load_team_config, team_config_path

        try:
            return await waits.keybase(lambda: load_team_config(self.keybase,
                                                                self.options.team))
        except (TeamConfigError, KeybaseError) as exc:
            raise JoinError(
                f"cannot use {team_config_path(self.options.team)}: {exc}; fix the file "
                "or remove it (without it: no STUN or relay servers)"
            ) from exc

    async def _check_overlay(self, config: TeamConfig,
                             owner_task: asyncio.Task[DeviceOwner]) -> None:
        from kbwg.agent.overlaycheck import OverlayError, check_team_overlay
        from kbwg.agent.owner_calls import OwnerCalls
        from kbwg.agent.teamconfig import team_config_path

        async def owner_routes(own_ifname: str) -> list[IPNetwork]:
            # Ready about when pyroute2 would have been imported here.
            return list(await OwnerCalls(await owner_task).host_routes(own_ifname))

        try:
            await check_team_overlay(config.overlay, team_config_path(self.options.team),
                                     self.options.interface, self.options.policy_path,
                                     self._routes or owner_routes)
        except OverlayError as exc:
            raise JoinError(str(exc)) from exc
        except OwnerError as exc:
            # The first op of the owner's network reads: an owner helper installed by an
            # older kbwg-agent does not know them.
            fix = (f"the device owner helper is older than this agent: run `{INSTALL_COMMAND}` "
                   "again" if "unknown op" in str(exc) else "its log lines above say why")
            raise JoinError(f"cannot check kbwg.json 'overlay' against this host's routes "
                            f"(the device owner could not read them: {exc}); {fix}") from exc

    async def _read_team(self, me: DeviceId, team: TeamView,
                         peers_raw: asyncio.Task[bytes]) -> None:
        """peers.json (which must list us, or the team allow self-assigned addresses),
        as read by `peers_raw`, into `team`."""
        from kbwg.agent.claims import check_range_against_peers

        config = team.config
        await team.read_peers_file(strict=True, reading=peers_raw)
        if (not any(e.device_id == me for e in team.entries)
                and config.dynamic_range is None):
            raise JoinError(
                f"this device ({me}) is not listed in {team.peers_path} and the team's "
                f"kbwg.json sets no dynamic_range; ask a team admin to add "
                f'{{"username": "{me.username}", "device": "{me.device}", '
                f'"ip": "<free address in {config.overlay}>"}} to peers.json, '
                "or a dynamic_range to kbwg.json"
            )
        if config.dynamic_range is not None:
            for problem in check_range_against_peers(config.dynamic_range, team.entries):
                log.warning("kbwg.json dynamic_range: %s", problem)

    @staticmethod
    async def _fetch_history(team: TeamView, listener_ready: asyncio.Event,
                             waits: StartupWaits) -> list[ChatMessage]:
        """The team's channels joined, and #announce's history read (not yet taken)."""
        await waits.keybase(team.join_channels)
        try:
            await asyncio.wait_for(listener_ready.wait(), LISTENER_READY_TIMEOUT_S)
        except TimeoutError:
            log.warning("chat listener not confirmed after %.0fs; reading history anyway",
                        LISTENER_READY_TIMEOUT_S)
        return await waits.keybase(lambda: team.fetch_history(first=True))

    @staticmethod
    async def _take_history(team: TeamView, me: DeviceId,
                            history: asyncio.Task[list[ChatMessage]]) -> None:
        # History first (into the books only): a dynamic address needs the live claims.
        team.take_history(await history, me)
        milestone(log, "history read")
