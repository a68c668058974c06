"""Runs a script that drives `join` in a fresh interpreter (what a process imports can
only be seen from its start), with the Keybase stand-in and a team of one device whose
peers.json names it; the script gets the stand-in and the state dir as arguments and
prints one JSON object last, which is returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

STANDIN = str(Path(sys.executable).parent / "kbwg-keybase-standin")


def run_join_script(tmp_path: Path, script: str,
                    env: dict[str, str | None]) -> dict[str, Any]:
    """`env` is laid over ours; None removes a variable."""
    home = tmp_path / "kb"
    team = home / "kbfs" / "team" / "t1"
    team.mkdir(parents=True)
    (team / "peers.json").write_text(json.dumps(
        [{"username": "alice", "device": "laptop", "ip": "100.64.0.1"}]))
    state = tmp_path / "state"
    state.mkdir()
    full_env = {**os.environ, "KBWG_STANDIN_HOME": str(home), "KBWG_STANDIN_USER": "alice",
                "KBWG_STANDIN_DEVICE": "laptop"}
    for name, value in env.items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    result = subprocess.run([sys.executable, "-c", script, STANDIN, str(state)],
                            env=full_env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    seen: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    seen["stderr"] = result.stderr[-4000:]
    return seen
