"""A stand-in for the `keybase` binary: the documented subset of its CLI JSON API.

Real Keybase cannot be installed where the tests and the demo run, so this executable
implements `keybase chat api`, `keybase chat api-listen`, `keybase whoami`, `keybase status`
and a few `keybase fs` subcommands with the same JSON shapes, message ids, pagination, dev
topics and error behaviour as the real CLI (see shared/reference/keybase-cli-api.md). The
agent must not be able to tell the difference: it only ever talks to "a keybase binary".

Every process is one "device" (``KBWG_STANDIN_USER`` / ``KBWG_STANDIN_DEVICE``) and all
processes share ``KBWG_STANDIN_HOME``: chat lives in a sqlite database in WAL mode (safe for
many concurrent processes, also across network namespaces as long as the filesystem is
shared), KBFS is a plain folder tree under ``kbfs/``.

Environment: ``KBWG_STANDIN_HOME`` (required), ``KBWG_STANDIN_USER`` and
``KBWG_STANDIN_DEVICE`` (unset: logged out), ``KBWG_STANDIN_DELAY_MS`` (messages this process
sends become visible that much later), ``KBWG_STANDIN_HOLD=1`` (messages this process sends
stay hidden until ``kbwg_standin.store.release_held(home, username)`` is called: a test's way
to deliver a message late without racing a delay; ``store.hold_sends(home, username)`` holds
one user's messages from then on, mid-run), ``KBWG_STANDIN_POLL_MS`` (api-listen poll,
default 20), ``KBWG_STANDIN_OLD_CLIENT=1`` (an older client: `whoami --json` has no
``deviceName``, `status --json` still has ``Device.name``).
Like the real client, `whoami --json` exits 0 when logged out (``loggedIn: false``, no
``user``), `fs read` of a missing file in a team folder says "<name> doesn't exist"
(libkbfs NoSuchNameError), and `newconv` of a team channel that already exists is refused
(`join` it instead).
Optional ``$KBWG_STANDIN_HOME/teams.json`` (``{"team": ["alice", "bob"]}``) restricts teams.
Like real Keybase, a listener only gets messages of conversations its user is in: #general
of its teams, and channels it created, joined or sent to.

Modules: ``cli`` (global flags, dispatch, error lines and exit codes), ``errors``, ``env``
(identity and environment), ``store`` (the sqlite database), ``channels`` (channel names,
ids and pagination tokens), ``service`` (the chat service), ``api`` (`chat api`), ``listen``
(`chat api-listen`), ``identity`` (`whoami`, `status`, `version`), ``kbfs`` (`fs ...`).
"""

from __future__ import annotations

from kbwg_standin.cli import main, run

__all__ = ["main", "run"]
