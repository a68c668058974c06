"""Re-reading the team's files on request (SIGHUP): peers.json takes effect at once,
kbwg.json changes are reported, since every one of its settings is fixed at join time
(the overlay, the channels, the STUN and relay servers the paths were opened with)."""

from __future__ import annotations

import dataclasses
import logging

from kbwg.agent.joined import JoinedDevice
from kbwg.agent.keybase import KeybaseError
from kbwg.agent.teamconfig import TeamConfig, TeamConfigError, load_team_config, team_config_path

log = logging.getLogger(__name__)


def changed_settings(running: TeamConfig, read: TeamConfig) -> list[str]:
    """The kbwg.json keys whose value differs from the running one."""
    return [f.name for f in dataclasses.fields(TeamConfig)
            if getattr(running, f.name) != getattr(read, f.name)]


async def reread_team_files(device: JoinedDevice) -> list[str]:
    """peers.json applied now (a broken one keeps the last good list); the kbwg.json keys
    that changed and need a restart."""
    team = device.team
    config_path = team_config_path(team.team)
    log.info("re-reading %s and %s", team.peers_path, config_path)
    await team.read_peers_file(strict=False)
    await device.presence.check_my_claim()
    await device.peer_sync.sync()
    try:
        config = await load_team_config(team.keybase, team.team)
    except (TeamConfigError, KeybaseError) as exc:
        log.warning("cannot use %s (%s); the running settings stay until it is fixed",
                    config_path, exc)
        return []
    changed = changed_settings(team.config, config)
    if changed:
        log.warning("%s changed (%s): these settings are fixed while the agent runs; "
                    "restart it to apply them (systemctl --user restart kbwg-agent@%s)",
                    config_path, ", ".join(changed), team.team)
    else:
        log.info("%s unchanged", config_path)
    return changed
