"""`keybase whoami`, `keybase status` and `keybase version`: who is logged in on this
"device", in the shapes the real CLI prints."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from kbwg_standin.env import Env
from kbwg_standin.errors import EXIT_OK, die

STANDIN_VERSION = "6.2.4-kbwg-standin"


def cmd_whoami(env: Env, args: Sequence[str]) -> int:
    as_json = False
    for arg in args:
        if arg in ("-j", "--json"):
            as_json = True
        else:
            die(f"unknown flag for whoami: {arg}")
    me = env.identity
    if not as_json:
        if me is None:
            die("Not logged in: no user is logged into Keybase on this device")
        print(me.username)
        return EXIT_OK
    # With --json the real client exits 0 even when logged out: loggedIn false, no user.
    status: dict[str, Any] = {
        "configured": True,
        "registered": me is not None,
        "loggedIn": me is not None,
        "sessionIsValid": me is not None,
    }
    if me is not None:
        status["user"] = {"uid": me.uid, "username": me.username}
        if not env.old_client:
            status["deviceName"] = me.device
    print(json.dumps(status, separators=(",", ":")))
    return EXIT_OK


def cmd_status(env: Env, args: Sequence[str]) -> int:
    as_json = any(a in ("-j", "--json") for a in args)
    me = env.identity
    logged_in = me is not None
    device: dict[str, Any] | None = None
    if me is not None:
        from kbwg_standin.store import now_ms  # sqlite3 with it: not for `whoami`

        ctime = now_ms()
        device = {
            "type": "desktop",
            "name": me.device,
            "deviceID": me.device_id,
            "deviceNumberOfType": 0,
            "cTime": ctime,
            "mTime": ctime,
            "lastUsedTime": ctime,
            "encryptKey": "",
            "verifyKey": "",
            "status": 0,
        }
    status = {
        "Username": me.username if me else "",
        "UserID": me.uid if me else "",
        "Device": device,
        "LoggedIn": logged_in,
        "SessionIsValid": logged_in,
        "KBFS": {"Version": STANDIN_VERSION, "Running": True, "Pid": str(os.getpid()), "Log": ""},
        "Service": {
            "Version": STANDIN_VERSION,
            "Running": True,
            "Pid": str(os.getpid()),
            "Log": "",
        },
        "ConfigPath": str(env.home / "config.json"),
        "DefaultUsername": me.username if me else "",
        "ProvisionedUsernames": [me.username] if me else [],
    }
    if as_json:
        print(json.dumps(status, separators=(",", ":")))
    else:
        print(f"Username:      {status['Username']}")
        print(f"Logged in:     {'yes' if logged_in else 'no'}")
        if me is not None:
            print(f"Device name:   {me.device}")
    return EXIT_OK


def cmd_version(_env: Env | None, _args: Sequence[str]) -> int:
    print(f"Client:  {STANDIN_VERSION}")
    print(f"Service: {STANDIN_VERSION}")
    return EXIT_OK
