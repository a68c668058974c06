"""The keybase stand-in, driven as a subprocess exactly as the real CLI would be."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kbwg_standin.ctl import stop_service
from kbwg_standin.store import hold_sends, release_held

STANDIN = [sys.executable, "-m", "kbwg_standin"]
TEAM = "myteam"
HEX = re.compile(r"^[0-9a-f]+$")


def chan(topic: str, topic_type: str = "chat", name: str = TEAM) -> dict[str, str]:
    return {"name": name, "members_type": "team", "topic_name": topic, "topic_type": topic_type}


def send_call(channel: dict[str, str], body: str, **extra: Any) -> dict[str, Any]:
    return {
        "method": "send",
        "params": {"options": {"channel": channel, "message": {"body": body}}},
        **extra,
    }


def read_call(channel: dict[str, str], **pagination: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"channel": channel, "peek": True}
    if pagination:
        options["pagination"] = pagination
    return {"method": "read", "params": {"options": options}}


def make_env(home: Path, user: str | None = "alice", device: str | None = "laptop", **extra: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBWG_STANDIN_")}
    env["KBWG_STANDIN_HOME"] = str(home)
    if user is not None:
        env["KBWG_STANDIN_USER"] = user
    if device is not None:
        env["KBWG_STANDIN_DEVICE"] = device
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*STANDIN, *args], input=stdin, env=env, capture_output=True, timeout=20)


class ApiPipe:
    """A long-lived `keybase chat api`, as the agent keeps one."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*STANDIN, "chat", "api"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.endswith(b"\n"), f"no reply line: {line!r}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def result(self, obj: dict[str, Any]) -> dict[str, Any]:
        reply = self.call(obj)
        assert "error" not in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


class Listener:
    """`keybase chat api-listen`; lines are collected by a thread so tests await them."""

    def __init__(self, env: dict[str, str], *flags: str) -> None:
        self.proc = subprocess.Popen(
            [*STANDIN, "chat", "api-listen", *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.started = threading.Event()
        self.stderr_text = b""
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def _err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_text += line
            if line.startswith(b"Listening for chat notifications"):
                self.started.set()

    def wait_started(self) -> None:
        assert self.started.wait(10), self.stderr_text

    def next(self, timeout: float = 5.0) -> tuple[float, dict[str, Any]]:
        at, line = self.lines.get(timeout=timeout)
        return at, json.loads(line)

    def expect_nothing(self, window: float = 0.3) -> None:
        with pytest.raises(queue.Empty):
            self.lines.get(timeout=window)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "kbhome"


@pytest.fixture
def alice(home: Path) -> Iterator[ApiPipe]:
    pipe = ApiPipe(make_env(home))
    yield pipe
    pipe.close()


@pytest.fixture
def bob(home: Path) -> Iterator[ApiPipe]:
    pipe = ApiPipe(make_env(home, "bob", "desktop"))
    yield pipe
    pipe.close()


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    started: list[Listener] = []
    yield started
    for listener in started:
        listener.stop()


# --------------------------------------------------------------------------- chat api


def test_send_and_read_shapes(alice: ApiPipe) -> None:
    reply = alice.call(
        send_call(chan("announce"), "ANNOUNCE 1.2.3.4:51820 key=", jsonrpc="2.0", id=7)
    )
    assert reply["jsonrpc"] == "2.0" and reply["id"] == 7
    result = reply["result"]
    assert result["message"] == "message sent"
    assert result["id"] == 1
    assert set(result["ratelimits"][0]) == {"tank", "capacity", "reset", "gas"}

    thread = alice.result(read_call(chan("announce")))
    assert set(thread) >= {"messages", "pagination", "ratelimits"}
    (entry,) = thread["messages"]
    msg = entry["msg"]
    assert set(msg) == {
        "id", "conversation_id", "channel", "sender", "sent_at", "sent_at_ms", "content",
        "prev", "unread", "channel_mention",
    }  # fmt: skip
    assert msg["id"] == 1
    assert HEX.match(msg["conversation_id"]) and len(msg["conversation_id"]) == 64
    assert msg["channel"] == {
        "name": TEAM, "public": False, "members_type": "team", "topic_type": "chat",
        "topic_name": "announce",
    }  # fmt: skip
    sender = msg["sender"]
    assert sender["username"] == "alice" and sender["device_name"] == "laptop"
    assert HEX.match(sender["uid"]) and HEX.match(sender["device_id"])
    assert msg["content"] == {
        "type": "text",
        "text": {
            "body": "ANNOUNCE 1.2.3.4:51820 key=",
            "payments": None, "userMentions": None, "teamMentions": None,
        },
    }  # fmt: skip
    assert msg["sent_at"] == msg["sent_at_ms"] // 1000
    assert abs(msg["sent_at_ms"] / 1000 - time.time()) < 10
    assert msg["unread"] is False  # own message
    assert msg["prev"] is None and msg["channel_mention"] == "none"


def test_topic_type_case_insensitive_and_default_general(alice: ApiPipe) -> None:
    upper = alice.result(send_call(chan("kbwg", "DEV"), "x"))
    lower = alice.result(read_call(chan("kbwg", "dev")))
    assert upper["id"] == lower["messages"][0]["msg"]["id"]
    assert lower["messages"][0]["msg"]["channel"]["topic_type"] == "dev"
    alice.result(send_call({"name": TEAM, "members_type": "team"}, "hello general"))
    general = alice.result(read_call(chan("general")))
    assert general["messages"][0]["msg"]["content"]["text"]["body"] == "hello general"


def test_ids_increase_newest_first_and_pagination_to_the_end(alice: ApiPipe) -> None:
    ids = [alice.result(send_call(chan("announce"), f"m{i}"))["id"] for i in range(7)]
    assert ids == list(range(1, 8))
    # Another conversation has its own id sequence.
    assert alice.result(send_call(chan("other"), "x"))["id"] == 1

    seen: list[int] = []
    lasts: list[bool] = []
    token: str | None = None
    for _ in range(10):
        page = alice.result(
            read_call(chan("announce"), num=3, **({"next": token} if token else {}))
        )
        page_ids = [m["msg"]["id"] for m in page["messages"]]
        assert page_ids == sorted(page_ids, reverse=True)  # newest first
        seen += page_ids
        pag = page["pagination"]
        assert pag["num"] == len(page_ids)
        lasts.append(pag["last"])
        if pag["last"]:
            break
        token = pag["next"]
        assert isinstance(token, str)
        base64.b64decode(token, validate=True)
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    assert lasts == [False, False, True]

    # `previous` of the second page leads back to the newest page.
    first = alice.result(read_call(chan("announce"), num=3))
    second = alice.result(read_call(chan("announce"), num=3, next=first["pagination"]["next"]))
    back = alice.result(
        read_call(chan("announce"), num=3, previous=second["pagination"]["previous"])
    )
    assert [m["msg"]["id"] for m in back["messages"]] == [7, 6, 5]


def test_dev_and_chat_are_separate_conversations(alice: ApiPipe) -> None:
    alice.result(send_call(chan("kbwg", "chat"), "chat body"))
    dev_id = alice.result(send_call(chan("kbwg", "dev"), "dev body"))["id"]
    assert dev_id == 1
    chat = alice.result(read_call(chan("kbwg", "chat")))["messages"]
    dev = alice.result(read_call(chan("kbwg", "dev")))["messages"]
    assert [m["msg"]["content"]["text"]["body"] for m in chat] == ["chat body"]
    assert [m["msg"]["content"]["text"]["body"] for m in dev] == ["dev body"]
    assert chat[0]["msg"]["conversation_id"] != dev[0]["msg"]["conversation_id"]

    chat_list = alice.result({"method": "list"})["conversations"]
    dev_list = alice.result({"method": "list", "params": {"options": {"topic_type": "DEV"}}})
    assert {c["channel"]["topic_name"] for c in chat_list} == {"kbwg"}
    assert [c["channel"]["topic_type"] for c in dev_list["conversations"]] == ["dev"]


def test_read_by_conversation_id_and_get(alice: ApiPipe) -> None:
    alice.result(send_call(chan("announce"), "one"))
    alice.result(send_call(chan("announce"), "two"))
    conv_id = alice.result(read_call(chan("announce")))["messages"][0]["msg"]["conversation_id"]
    by_id = alice.result({"method": "read", "params": {"options": {"conversation_id": conv_id}}})
    assert [m["msg"]["id"] for m in by_id["messages"]] == [2, 1]
    got = alice.result(
        {"method": "get", "params": {"options": {"conversation_id": conv_id, "message_ids": [1]}}}
    )
    assert got["messages"][0]["msg"]["content"]["text"]["body"] == "one"


def test_service_error_keeps_the_pipe_alive(home: Path, alice: ApiPipe) -> None:
    reply = alice.call(read_call(chan("never-created")))
    assert reply["error"]["code"] == 0
    assert "no conversations matched" in reply["error"]["message"]
    # Invalid topic name on creation is a service error too.
    bad = alice.call(send_call(chan("bad name!"), "x"))
    assert "error" in bad
    assert alice.result({"method": "list"}) == {"conversations": [], "offline": False}
    assert alice.close() == 0


def test_body_limits_in_utf8_bytes(alice: ApiPipe) -> None:
    assert alice.result(send_call(chan("c"), "a" * 10_000))["id"] == 1
    assert alice.result(send_call(chan("c"), "é" * 5_000))["id"] == 2  # 10,000 bytes
    too_long = alice.call(send_call(chan("c"), "é" * 5_000 + "a"))
    assert too_long["error"]["message"] == "message exceeds the maximum length of 10000 bytes"
    assert alice.result(send_call(chan("d", "dev"), "b" * 1_000_000))["id"] == 1
    dev_long = alice.call(send_call(chan("d", "dev"), "b" * 1_000_001))
    assert dev_long["error"]["message"] == "message exceeds the maximum length of 1000000 bytes"
    body = alice.result(read_call(chan("d", "dev")))["messages"][0]["msg"]["content"]["text"]
    assert len(body["body"]) == 1_000_000


@pytest.mark.parametrize(
    ("call", "stderr_part"),
    [
        ({"method": "nope"}, 'invalid v1 method "nope"'),
        (send_call(chan("x"), ""), "invalid message, body cannot be empty"),
        (
            {
                "method": "read",
                "params": {"options": {"channel": chan("x"), "conversation_id": "00ab"}},
            },
            "include channel or conversation_id, not both",
        ),
        (read_call(chan("x", "bogus")), "invalid topic type: 'bogus'"),
        ({"method": "read", "params": {"options": {}}}, "need channel or conversation_id"),
    ],
)
def test_request_errors_exit_2(home: Path, call: dict[str, Any], stderr_part: str) -> None:
    # The second call must never be answered: the decode loop has ended.
    stdin = (json.dumps(call) + "\n" + json.dumps({"method": "list"}) + "\n").encode()
    proc = run(make_env(home), "chat", "api", stdin=stdin)
    assert proc.returncode == 2
    assert stderr_part in proc.stderr.decode()
    assert proc.stdout == b""


def test_bad_json_exits_2_after_earlier_replies(home: Path) -> None:
    proc = run(make_env(home), "chat", "api", stdin=b'{"method":"list"}\n{not json}\n')
    assert proc.returncode == 2
    assert len(proc.stdout.splitlines()) == 1
    assert proc.stderr


def test_message_flag_and_multiline_input(home: Path) -> None:
    one = run(make_env(home), "chat", "api", "-m", json.dumps(send_call(chan("a"), "via -m")))
    assert one.returncode == 0 and json.loads(one.stdout)["result"]["id"] == 1
    # Go's json.Decoder accepts values split over lines and several on one line.
    pretty = json.dumps(read_call(chan("a")), indent=2) + '{"method":"list"}{"method":"list"}'
    many = run(make_env(home), "chat", "api", stdin=pretty.encode())
    assert many.returncode == 0
    assert len(many.stdout.splitlines()) == 3


def test_two_identities_in_two_processes(home: Path, alice: ApiPipe, bob: ApiPipe) -> None:
    alice.result(send_call(chan("announce"), "from alice"))
    bob.result({"method": "join", "params": {"options": {"channel": chan("announce")}}})
    (seen,) = [m["msg"] for m in bob.result(read_call(chan("announce")))["messages"]]
    assert seen["unread"] is True  # someone else's, not read yet (peek)
    # Reading without peek marks it read.
    bob.result({"method": "read", "params": {"options": {"channel": chan("announce")}}})
    assert bob.result(read_call(chan("announce")))["messages"][0]["msg"]["unread"] is False

    bob.result(send_call(chan("announce"), "from bob"))
    msgs = [m["msg"] for m in alice.result(read_call(chan("announce")))["messages"]]
    assert [(m["sender"]["username"], m["sender"]["device_name"]) for m in msgs] == [
        ("bob", "desktop"),
        ("alice", "laptop"),
    ]
    assert [m["unread"] for m in msgs] == [True, False]
    assert msgs[0]["sender"]["uid"] != msgs[1]["sender"]["uid"]
    assert msgs[0]["sender"]["device_id"] != msgs[1]["sender"]["device_id"]


def test_concurrent_senders_get_distinct_ids(home: Path) -> None:
    procs = [
        subprocess.Popen(
            [*STANDIN, "chat", "api"],
            env=make_env(home, f"user{i}", "d"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(4)
    ]
    lines = "".join(json.dumps(send_call(chan("race"), f"n{n}")) + "\n" for n in range(10))
    outs = [p.communicate(lines.encode(), timeout=30)[0] for p in procs]
    ids = [json.loads(line)["result"]["id"] for out in outs for line in out.splitlines()]
    assert sorted(ids) == list(range(1, 41))


def test_team_membership_from_teams_json(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "teams.json").write_text(json.dumps({TEAM: ["alice"]}))
    alice = ApiPipe(make_env(home))
    carol = ApiPipe(make_env(home, "carol", "phone"))
    try:
        alice.result(send_call(chan("announce"), "members only"))
        assert "error" in carol.call(send_call(chan("announce"), "let me in"))
        assert "error" in carol.call(read_call(chan("announce")))
        assert "error" in carol.call(
            {"method": "listconvsonname", "params": {"options": {"name": TEAM}}}
        )
    finally:
        alice.close()
        carol.close()


def test_newconv_join_leave_listconvsonname(alice: ApiPipe, bob: ApiPipe) -> None:
    created = alice.result(
        {"method": "newconv", "params": {"options": {"channel": chan("k", "dev")}}}
    )
    assert HEX.match(created["id"])
    # Like the real service: a team channel name in use is refused, even to its creator
    # (and #general always exists); joining is the way in.
    taken = ((alice, "k", "dev"), (bob, "k", "dev"), (bob, "general", "chat"))
    for who, topic, topic_type in taken:
        again = who.call(
            {"method": "newconv", "params": {"options": {"channel": chan(topic, topic_type)}}}
        )
        assert again["error"]["message"] == f"channel name {topic} is already in use in {TEAM}"
    dev_of = {"method": "list", "params": {"options": {"topic_type": "dev"}}}
    assert bob.result(dev_of)["conversations"] == []
    names = bob.result(
        {
            "method": "listconvsonname",
            "params": {"options": {"name": TEAM, "members_type": "team", "topic_type": "DEV"}},
        }
    )
    assert [c["id"] for c in names["conversations"]] == [created["id"]]
    bob.result({"method": "join", "params": {"options": {"channel": chan("k", "dev")}}})
    assert [c["id"] for c in bob.result(dev_of)["conversations"]] == [created["id"]]
    bob.result({"method": "leave", "params": {"options": {"conversation_id": created["id"]}}})
    assert bob.result(dev_of)["conversations"] == []
    joined_missing = bob.call({"method": "join", "params": {"options": {"channel": chan("zz")}}})
    assert "error" in joined_missing


# --------------------------------------------------------------------------- api-listen


def test_listen_echoes_own_and_shows_dev_only_with_flag(
    home: Path, alice: ApiPipe, listeners: list[Listener]
) -> None:
    alice.result(send_call(chan("announce"), "before the listeners"))
    plain = Listener(make_env(home))
    dev = Listener(make_env(home), "--dev")
    listeners += [plain, dev]
    plain.wait_started()
    dev.wait_started()
    assert b"Listening for chat notifications" in plain.stderr_text

    alice.result(send_call(chan("kbwg", "dev"), "dev body"))
    alice.result(send_call(chan("announce"), "chat body"))

    _, note = plain.next()
    assert note["type"] == "chat" and note["source"] == "remote"
    assert set(note["pagination"]) >= {"next", "previous", "num", "last"}
    assert note["msg"]["content"]["text"]["body"] == "chat body"  # never the dev one
    assert note["msg"]["sender"]["username"] == "alice"  # own message echoed
    plain.expect_nothing()

    bodies = [dev.next()[1]["msg"]["content"]["text"]["body"] for _ in range(2)]
    assert bodies == ["dev body", "chat body"]
    dev.expect_nothing(0.1)


def test_listen_needs_membership_of_the_conversation(
    home: Path, alice: ApiPipe, bob: ApiPipe, listeners: list[Listener]
) -> None:
    alice.result({"method": "newconv", "params": {"options": {"channel": chan("neg", "dev")}}})
    bob_listen = Listener(make_env(home, "bob", "desktop"), "--dev")
    listeners.append(bob_listen)
    bob_listen.wait_started()
    alice.result(send_call(chan("neg", "dev"), "not for bob yet"))
    bob_listen.expect_nothing()
    bob.result({"method": "join", "params": {"options": {"channel": chan("neg", "dev")}}})
    alice.result(send_call(chan("neg", "dev"), "now bob is in"))
    assert bob_listen.next()[1]["msg"]["content"]["text"]["body"] == "now bob is in"
    # #general of the team reaches every member without joining.
    alice.result(send_call(chan("general"), "hi all"))
    assert bob_listen.next()[1]["msg"]["channel"]["topic_name"] == "general"


def test_listen_filters(home: Path, alice: ApiPipe, listeners: list[Listener]) -> None:
    missing = run(make_env(home), "chat", "api-listen", "--filter-channel", json.dumps(chan("x")))
    assert missing.returncode != 0
    assert b"no conversations matched" in missing.stderr

    alice.result(send_call(chan("a"), "create a"))
    alice.result(send_call(chan("b"), "create b"))
    only_a = Listener(make_env(home), "--filter-channel", json.dumps(chan("a")))
    listeners.append(only_a)
    only_a.wait_started()
    alice.result(send_call(chan("b"), "to b"))
    alice.result(send_call(chan("a"), "to a"))
    assert only_a.next()[1]["msg"]["content"]["text"]["body"] == "to a"
    only_a.expect_nothing(0.1)


def test_delivery_delay_is_honoured(home: Path, bob: ApiPipe, listeners: list[Listener]) -> None:
    # Long enough that the read just after the send is done well within it on a loaded
    # machine; the bounds below are the subject, so this stays on the real clock.
    delay_ms = 1000
    listener = Listener(make_env(home, "bob", "desktop"))
    listeners.append(listener)
    listener.wait_started()
    slow_alice = ApiPipe(make_env(home, KBWG_STANDIN_DELAY_MS=str(delay_ms)))
    try:
        bob.result(send_call(chan("announce"), "create"))
        assert listener.next()[1]["msg"]["content"]["text"]["body"] == "create"
        sent = time.monotonic()
        slow_alice.result(send_call(chan("announce"), "delayed"))
        # Not visible yet: neither to read...
        visible = [m["msg"]["id"] for m in bob.result(read_call(chan("announce")))["messages"]]
        assert visible == [1]
        # ...nor to the listener, until the delay has passed.
        at, note = listener.next()
        assert note["msg"]["content"]["text"]["body"] == "delayed"
        assert at - sent >= delay_ms / 1000 - 0.02
        assert at - sent < delay_ms / 1000 + 1.0
        after = [m["msg"]["id"] for m in bob.result(read_call(chan("announce")))["messages"]]
        assert after == [2, 1]
    finally:
        slow_alice.close()


def bob_listening(home: Path, bob: ApiPipe, listeners: list[Listener]) -> Listener:
    """Bob's listener, once #announce exists (bob created it) and it saw that."""
    listener = Listener(make_env(home, "bob", "desktop"))
    listeners.append(listener)
    listener.wait_started()
    bob.result(send_call(chan("announce"), "create"))
    assert next_body(listener) == "create"
    return listener


def next_body(listener: Listener) -> str:
    return str(listener.next()[1]["msg"]["content"]["text"]["body"])


def test_held_messages_wait_for_their_release(
    home: Path, bob: ApiPipe, listeners: list[Listener],
) -> None:
    listener = bob_listening(home, bob, listeners)
    held_alice = ApiPipe(make_env(home, KBWG_STANDIN_HOLD="1"))
    try:
        held_alice.result(send_call(chan("announce"), "held"))
        bob.result(send_call(chan("announce"), "after"))
        # The later message is delivered; the held one, with the lower id, is not.
        assert next_body(listener) == "after"
        visible = [m["msg"]["id"] for m in bob.result(read_call(chan("announce")))["messages"]]
        assert visible == [3, 1]
        assert release_held(home, "bob") == 0, "only the named sender's messages"
        assert release_held(home, "alice") == 1
        note = listener.next()[1]["msg"]
        assert (note["id"], note["content"]["text"]["body"]) == (2, "held")
        after = [m["msg"]["id"] for m in bob.result(read_call(chan("announce")))["messages"]]
        assert after == [3, 2, 1]
        assert release_held(home) == 0
    finally:
        held_alice.close()


def test_a_running_senders_messages_are_held_from_the_moment_a_test_says(
    home: Path, bob: ApiPipe, listeners: list[Listener],
) -> None:
    listener = bob_listening(home, bob, listeners)
    alice = ApiPipe(make_env(home))  # one long-lived pipe, as the agent keeps
    try:
        alice.result(send_call(chan("announce"), "before"))
        assert next_body(listener) == "before"
        hold_sends(home, "Alice")
        alice.result(send_call(chan("announce"), "cut off"))
        bob.result(send_call(chan("announce"), "bob's"))
        assert next_body(listener) == "bob's"
        hold_sends(home, "alice", hold=False)
        alice.result(send_call(chan("announce"), "back"))
        assert next_body(listener) == "back"
        assert release_held(home, "alice") == 1
        assert next_body(listener) == "cut off"
    finally:
        alice.close()


def test_listener_exits_on_sigterm_and_closed_stdout(home: Path) -> None:
    listener = Listener(make_env(home))
    listener.wait_started()
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.proc.wait(timeout=5) == 0

    proc = subprocess.Popen(
        [*STANDIN, "chat", "api-listen"],
        env=make_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None and proc.stdout is not None
    proc.stderr.readline()  # started
    proc.stdout.close()  # the reader goes away while the listener is idle
    assert proc.wait(timeout=5) == 0
    proc.stderr.close()


def test_listen_when_logged_out_fails(home: Path) -> None:
    proc = run(make_env(home, None, None), "chat", "api-listen")
    assert proc.returncode != 0
    assert b"logged" in proc.stderr.lower() or b"login" in proc.stderr.lower()


# --------------------------------------------------------------------------- identity, fs


def test_whoami_and_status(home: Path) -> None:
    out = run(make_env(home), "whoami", "--json")
    assert out.returncode == 0
    status = json.loads(out.stdout)
    assert status["user"]["username"] == "alice" and status["deviceName"] == "laptop"
    assert status["loggedIn"] is True and status["sessionIsValid"] is True
    assert HEX.match(status["user"]["uid"])
    assert json.loads(run(make_env(home), "whoami", "-j").stdout) == status
    assert run(make_env(home), "whoami").stdout == b"alice\n"
    # Global flags of the real CLI before the subcommand are accepted and ignored.
    flagged = run(make_env(home), "--home", "/nowhere", "-d", "--pid-file", "/x", "whoami")
    assert flagged.returncode == 0 and flagged.stdout == b"alice\n"

    st = json.loads(run(make_env(home), "status", "--json").stdout)
    assert st["Username"] == "alice" and st["LoggedIn"] is True
    assert st["Device"]["name"] == "laptop" and st["UserID"] == status["user"]["uid"]

    # Logged out, the real client's --json still exits 0: loggedIn false and no user.
    logged_out = run(make_env(home, None, None), "whoami", "--json")
    assert logged_out.returncode == 0
    out_status = json.loads(logged_out.stdout)
    assert out_status["loggedIn"] is False and "user" not in out_status
    assert "deviceName" not in out_status
    plain = run(make_env(home, None, None), "whoami")
    assert plain.returncode != 0 and b"logged in" in plain.stderr.lower()


def test_an_older_client_has_no_device_name_in_whoami(home: Path) -> None:
    env = make_env(home, KBWG_STANDIN_OLD_CLIENT="1")
    status = json.loads(run(env, "whoami", "--json").stdout)
    assert status["user"]["username"] == "alice" and "deviceName" not in status
    assert json.loads(run(env, "status", "--json").stdout)["Device"]["name"] == "laptop"


def test_team_names_are_canonical_lowercase_in_replies(alice: ApiPipe) -> None:
    alice.result(send_call(chan("announce", name="MyTeam"), "hi"))
    page = alice.result(read_call(chan("announce", name="MYTEAM")))
    assert [m["msg"]["channel"]["name"] for m in page["messages"]] == [TEAM]


def test_missing_home_is_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBWG_STANDIN_")}
    proc = subprocess.run(
        [*STANDIN, "chat", "api", "-m", '{"method":"list"}'],
        env=env,
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == 2
    assert b"KBWG_STANDIN_HOME" in proc.stderr


def test_fs_read_write_mapping(home: Path) -> None:
    env = make_env(home)
    data = json.dumps([{"username": "alice", "device": "laptop", "ip": "100.64.0.1"}]).encode()
    assert run(env, "fs", "write", f"/keybase/team/{TEAM}/peers.json", stdin=data).returncode == 0
    assert (home / "kbfs" / "team" / TEAM / "peers.json").read_bytes() == data
    assert run(env, "fs", "read", f"/keybase/team/{TEAM}/peers.json").stdout == data
    assert run(env, "fs", "read", f"keybase://team/{TEAM}/peers.json").stdout == data
    # Another identity sees the same KBFS.
    bob_env = make_env(home, "bob", "desktop")
    assert run(bob_env, "fs", "read", f"/keybase/team/{TEAM}/peers.json").stdout == data

    # Real KBFS names the first missing entry (libkbfs NoSuchNameError).
    missing = run(env, "fs", "read", f"/keybase/team/{TEAM}/nope.json")
    assert missing.returncode == 2
    assert b"nope.json doesn't exist" in missing.stderr and missing.stdout == b""
    deeper = run(env, "fs", "read", f"/keybase/team/{TEAM}/sub/dir/x.json")
    assert deeper.returncode == 2 and b"sub doesn't exist" in deeper.stderr
    elsewhere = run(env, "fs", "read", "/keybase/nowhere/x")
    assert elsewhere.returncode == 2 and b"does not exist" in elsewhere.stderr

    # Nested folders must be made first, as with real KBFS.
    assert run(env, "fs", "write", f"/keybase/team/{TEAM}/d/x", stdin=b"1").returncode == 2
    assert run(env, "fs", "mkdir", f"/keybase/team/{TEAM}/d").returncode == 0
    assert run(env, "fs", "write", f"/keybase/team/{TEAM}/d/x", stdin=b"1").returncode == 0
    assert run(env, "fs", "write", "-a", f"/keybase/team/{TEAM}/d/x", stdin=b"2").returncode == 0
    assert run(env, "fs", "read", f"/keybase/team/{TEAM}/d/x").stdout == b"12"
    listing = run(env, "fs", "ls", f"/keybase/team/{TEAM}").stdout.decode().split()
    assert listing == ["d", "peers.json"]
    stat = run(env, "fs", "stat", f"/keybase/team/{TEAM}/peers.json")
    assert stat.returncode == 0 and b"FILE" in stat.stdout
    assert run(env, "fs", "stat", f"/keybase/team/{TEAM}/zzz").returncode != 0
    assert run(env, "fs", "rm", f"/keybase/team/{TEAM}/d/x").returncode == 0
    assert run(env, "fs", "read", f"/keybase/team/{TEAM}/d/x").returncode == 2
    # Escaping the KBFS root is not possible.
    assert run(env, "fs", "read", "/keybase/../../etc/passwd").returncode == 2
    # Atomic writes leave no temporary files behind.
    leftovers = [p.name for p in (home / "kbfs").rglob("*") if p.name.startswith(".standin-")]
    assert leftovers == []


def test_a_pipe_refuses_the_first_call_after_its_service_stops(
        home: Path, alice: ApiPipe) -> None:
    """The real pipe has no service to hand a call to once it is gone. The stand-in's
    watch looks at the service every 0.1 s; a call that comes before it noticed must
    fail all the same, or an agent under load sees a send get through an outage."""
    alice.result(send_call(chan("general"), "before"))
    stop_service(home, "alice", "laptop")
    assert alice.proc.stdin is not None and alice.proc.stdout is not None
    alice.proc.stdin.write(json.dumps(send_call(chan("general"), "after")).encode() + b"\n")
    alice.proc.stdin.flush()
    assert alice.proc.stdout.readline() == b"", "a reply came with the service stopped"
    assert alice.proc.wait(timeout=10) == 2
    assert alice.proc.stderr is not None
    assert b"connection to service lost" in alice.proc.stderr.read()
