"""KeybaseClient against the keybase stand-in (and a few scripted fakes for odd output)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kbwg.agent.keybase import (
    Channel,
    ChatMessage,
    Identity,
    KeybaseClient,
    KeybaseError,
    KeybaseFileNotFound,
    KeybaseRequestError,
    KeybaseServiceError,
    KeybaseUnavailable,
    parse_message,
    resolve_keybase_binary,
)

TEAM = "myteam"
ANNOUNCE = Channel(TEAM, "announce")
DEV = Channel(TEAM, "kbwg", topic_type="dev")
# Every team member is in #general without joining, so pings there reach any listener.
GENERAL = Channel(TEAM, "general")


def write_script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def binary(tmp_path: Path) -> str:
    # A binary called `keybase`, as the agent would be configured with.
    return write_script(
        tmp_path / "keybase", "import sys\nfrom kbwg_standin import main\nsys.exit(main())\n"
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "kbhome"


def identity_env(home: Path, user: str = "alice", device: str = "laptop") -> dict[str, str]:
    return {
        "KBWG_STANDIN_HOME": str(home),
        "KBWG_STANDIN_USER": user,
        "KBWG_STANDIN_DEVICE": device,
    }


@pytest.fixture
async def alice(binary: str, home: Path) -> AsyncIterator[KeybaseClient]:
    client = KeybaseClient(binary, identity_env(home))
    yield client
    await client.close()


@pytest.fixture
async def bob(binary: str, home: Path) -> AsyncIterator[KeybaseClient]:
    client = KeybaseClient(binary, identity_env(home, "bob", "desktop"))
    yield client
    await client.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); count it as leaked only if not reaped.
    return Path(f"/proc/{pid}").exists()


def pipe_pid(client: KeybaseClient) -> int:
    assert client._pipe is not None
    return client._pipe.proc.pid


def listener_pids(client: KeybaseClient) -> list[int]:
    return [p.pid for p in client._listeners]


async def first_ping(
    client: KeybaseClient, it: AsyncIterator[ChatMessage], channel: Channel = GENERAL
) -> ChatMessage:
    """Send pings until the listener shows one: proves it is up without sleeping blindly."""
    next_msg = asyncio.ensure_future(it.__anext__())
    try:
        for n in range(200):
            await client.send(channel, f"ping {n}")
            done, _ = await asyncio.wait({next_msg}, timeout=0.05)
            if done:
                return next_msg.result()
        raise AssertionError("listener never delivered a ping")
    except BaseException:
        next_msg.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await next_msg
        raise


async def drain_pings(it: AsyncIterator[ChatMessage], until_body: str) -> list[ChatMessage]:
    """Skip the remaining pings, return the messages from `until_body` on... up to it."""
    got: list[ChatMessage] = []
    while True:
        msg = await asyncio.wait_for(it.__anext__(), 5)
        if msg.body and msg.body.startswith("ping "):
            continue
        got.append(msg)
        if msg.body == until_body:
            return got


# --------------------------------------------------------------------------- helpers


def test_resolve_keybase_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KBWG_KEYBASE", raising=False)
    assert resolve_keybase_binary(None) == "keybase"
    monkeypatch.setenv("KBWG_KEYBASE", "/opt/kb")
    assert resolve_keybase_binary(None) == "/opt/kb"
    assert resolve_keybase_binary("/usr/bin/keybase") == "/usr/bin/keybase"


def test_channel_to_json() -> None:
    assert DEV.to_json() == {
        "name": TEAM, "members_type": "team", "topic_name": "kbwg", "topic_type": "dev",
    }  # fmt: skip
    assert Channel(TEAM, "x").topic_type == "chat"


def _summary(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "id": 3,
        "conversation_id": "00ab",
        "channel": {"name": TEAM, "members_type": "team", "topic_type": "dev", "topic_name": "k"},
        "sender": {"uid": "u", "username": "bob", "device_id": "d", "device_name": "phone"},
        "sent_at": 1559599057,
        "sent_at_ms": 1559599057477,
        "content": {"type": "text", "text": {"body": "hi"}},
    }
    msg.update(over)
    return msg


def test_parse_message() -> None:
    msg = parse_message(_summary())
    assert msg == ChatMessage(
        id=3,
        conversation_id="00ab",
        channel=Channel(TEAM, "k", "dev", "team"),
        sender_username="bob",
        sender_device="phone",
        sent_at=1559599057.477,
        body="hi",
        content_type="text",
    )
    assert parse_message(_summary(sent_at_ms=None)).sent_at == 1559599057.0
    reaction = parse_message(_summary(content={"type": "reaction", "reaction": {"b": "+1"}}))
    assert reaction.body is None and reaction.content_type == "reaction"
    bads: list[Any] = [
        None,
        [],
        _summary(id="3"),
        _summary(sender={"username": "bob"}),
        _summary(content={"type": "text"}),
        _summary(sent_at=None, sent_at_ms=None),
        {k: v for k, v in _summary().items() if k != "channel"},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            parse_message(bad)


# --------------------------------------------------------------------------- one-shot commands


async def test_whoami(alice: KeybaseClient, binary: str, home: Path) -> None:
    assert await alice.whoami() == Identity("alice", "laptop")
    # Logged out, `whoami --json` exits 0 with loggedIn false and no user (real client).
    logged_out = KeybaseClient(binary, {"KBWG_STANDIN_HOME": str(home)})
    with pytest.raises(KeybaseUnavailable, match="not logged in to Keybase") as info:
        await logged_out.whoami()
    assert "unexpected" not in str(info.value) and "keybase login" in str(info.value)


async def test_whoami_of_an_older_client_takes_the_device_from_status(
    binary: str, home: Path
) -> None:
    old = KeybaseClient(binary, {**identity_env(home), "KBWG_STANDIN_OLD_CLIENT": "1"})
    assert await old.whoami() == Identity("alice", "laptop")


@pytest.mark.parametrize(
    ("whoami", "status", "match"),
    [
        ('{"loggedIn": false}', "{}", "not logged in to Keybase"),
        ('{"loggedIn": true}', "{}", "names no user"),
        ('{"loggedIn": true, "user": {"username": "alice"}}', '{"Device": null}',
         "upgrade the Keybase client"),
        ('{"loggedIn": true, "user": {"username": "alice"}}', '{"LoggedIn": false}',
         "not logged in to Keybase"),
        ("[1]", "{}", "unexpected `keybase whoami --json` output"),
    ],
)
async def test_whoami_odd_output(
    tmp_path: Path, whoami: str, status: str, match: str
) -> None:
    script = write_script(tmp_path / "kb", (
        "import sys\n"
        f"print({whoami!r} if sys.argv[1] == 'whoami' else {status!r})\n"
    ))
    with pytest.raises(KeybaseError, match=match):
        await KeybaseClient(script).whoami()


async def test_fs_read_and_write(alice: KeybaseClient, bob: KeybaseClient, home: Path) -> None:
    path = f"/keybase/team/{TEAM}/peers.json"
    await alice.fs_write(path, b'[{"username":"alice"}]')
    assert await bob.fs_read(path) == b'[{"username":"alice"}]'
    assert (home / "kbfs" / "team" / TEAM / "peers.json").exists()
    with pytest.raises(KeybaseFileNotFound) as info:
        await alice.fs_read(f"/keybase/team/{TEAM}/kbwg.json")
    assert isinstance(info.value, FileNotFoundError)
    assert "kbwg.json doesn't exist" in str(info.value)  # KBFS's wording
    with pytest.raises(KeybaseFileNotFound, match="sub doesn't exist"):
        await alice.fs_read(f"/keybase/team/{TEAM}/sub/kbwg.json")
    with pytest.raises(KeybaseError):
        await alice.fs_read("/not/kbfs")


async def test_missing_binary_is_unavailable(tmp_path: Path) -> None:
    client = KeybaseClient(str(tmp_path / "no-such-keybase"))
    for attempt in (client.whoami(), client.call("list", {}), client.fs_read("/keybase/x")):
        with pytest.raises(KeybaseUnavailable, match="KBWG_KEYBASE"):
            await attempt
    with pytest.raises(KeybaseUnavailable):
        async for _ in client.listen():
            pass
    await client.close()


# --------------------------------------------------------------------------- chat api


async def test_send_read_and_one_long_lived_pipe(alice: KeybaseClient, bob: KeybaseClient) -> None:
    first = await alice.send(ANNOUNCE, "ANNOUNCE 198.51.100.7:51820 a2V5")
    second = await bob.send(ANNOUNCE, "ANNOUNCE 203.0.113.9:51820 b3Ro")
    assert (first, second) == (1, 2)
    pid = pipe_pid(alice)
    page = await alice.read(ANNOUNCE)
    assert page.last is True
    assert [(m.id, m.sender_username, m.sender_device) for m in page.messages] == [
        (2, "bob", "desktop"),
        (1, "alice", "laptop"),
    ]
    msg = page.messages[1]
    assert msg.body == "ANNOUNCE 198.51.100.7:51820 a2V5" and msg.content_type == "text"
    assert msg.channel == ANNOUNCE
    assert abs(msg.sent_at - time.time()) < 10
    assert pipe_pid(alice) == pid  # every call went over the same process
    result = await alice.call("list")
    assert [c["channel"]["topic_name"] for c in result["conversations"]] == ["announce"]


async def test_read_pages_and_history(
    alice: KeybaseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(6):
        await alice.send(DEV, f"old {n}")
    await asyncio.sleep(0.01)  # separates the timestamps of the two batches
    for n in range(5):
        await alice.send(DEV, f"new {n}")
    stamps = {m.body: m.sent_at for m in (await alice.read(DEV, num=20)).messages}
    assert stamps["new 0"] > stamps["old 5"]
    since = (stamps["new 0"] + stamps["old 5"]) / 2

    ids: list[int] = []
    token: str | None = None
    while True:
        page = await alice.read(DEV, num=4, next_token=token)
        ids += [m.id for m in page.messages]
        if page.last:
            break
        assert page.next is not None
        token = page.next
    assert ids == list(range(11, 0, -1))

    everything = [m.id async for m in alice.read_history(DEV, since=0, page_size=3)]
    assert everything == list(range(11, 0, -1))

    reads = 0
    original = alice.call

    async def counting_call(method: str, options: Any = None) -> dict[str, Any]:
        nonlocal reads
        reads += method == "read"
        return await original(method, options)

    monkeypatch.setattr(alice, "call", counting_call)
    recent = [m.body async for m in alice.read_history(DEV, since=since, page_size=2)]
    assert recent == [f"new {n}" for n in range(4, -1, -1)]
    assert reads == 3  # stopped at the first old message, not at the end of the thread


async def test_service_errors_are_typed_and_keep_the_pipe(alice: KeybaseClient) -> None:
    await alice.call("list")
    pid = pipe_pid(alice)
    with pytest.raises(KeybaseServiceError) as info:
        await alice.read(Channel(TEAM, "nothing-here"))
    assert info.value.code == 0
    assert "no conversations matched" in info.value.message
    with pytest.raises(KeybaseServiceError):
        await alice.send(Channel(TEAM, "bad name!"), "x")
    assert pipe_pid(alice) == pid


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("frobnicate", {}, "invalid v1 method"),
        ("send", {"channel": ANNOUNCE.to_json(), "message": {"body": ""}}, "body cannot be empty"),
        ("read", {"channel": ANNOUNCE.to_json(), "conversation_id": "00ab"}, "not both"),
        ("read", {}, "need channel or conversation_id"),
        ("read", {"channel": {"name": TEAM, "topic_type": "video"}}, "invalid topic type"),
        ("list", {"topic_type": "video"}, "invalid topic type"),
        (
            "send",
            {"channel": ANNOUNCE.to_json(), "message": {"body": "x" * 10_001}},
            "maximum length of 10000 bytes",
        ),
        (
            "send",
            {"channel": DEV.to_json(), "message": {"body": "x" * 1_000_001}},
            "maximum length of 1000000 bytes",
        ),
        (
            "send",
            {"channel": ANNOUNCE.to_json(), "message": {"body": "é" * 5_000 + "x"}},
            "maximum length of 10000 bytes",
        ),
    ],
)
async def test_client_side_validation(
    alice: KeybaseClient, method: str, options: dict[str, Any], match: str
) -> None:
    await alice.call("list")
    pid = pipe_pid(alice)
    with pytest.raises(KeybaseRequestError, match=match):
        await alice.call(method, options)
    assert pipe_pid(alice) == pid  # nothing reached (and killed) the pipe
    with pytest.raises(KeybaseRequestError):
        not_a_dict: Any = []
        await alice.call("read", not_a_dict)


async def test_limits_at_the_edge_go_through(alice: KeybaseClient) -> None:
    assert await alice.send(ANNOUNCE, "é" * 5_000) == 1
    assert await alice.send(DEV, "x" * 1_000_000) == 1
    page = await alice.read(DEV)
    assert page.messages[0].body == "x" * 1_000_000


async def test_request_rejected_by_the_cli_restarts_the_pipe(alice: KeybaseClient) -> None:
    await alice.send(ANNOUNCE, "one")
    pid = pipe_pid(alice)
    # Passes client-side checks but not the CLI's decode loop: it exits 2.
    with pytest.raises(KeybaseRequestError, match="base64"):
        await alice.read(ANNOUNCE, next_token="!!not base64!!")
    assert not alive(pid)
    page = await alice.read(ANNOUNCE)
    assert [m.body for m in page.messages] == ["one"]
    assert pipe_pid(alice) != pid


@pytest.mark.parametrize("reaped_first", [False, True])
async def test_pipe_restarted_after_it_is_killed(
    alice: KeybaseClient, caplog: pytest.LogCaptureFixture, reaped_first: bool
) -> None:
    await alice.send(ANNOUNCE, "before")
    pid = pipe_pid(alice)
    os.kill(pid, signal.SIGKILL)
    if reaped_first:
        # Known dead before the next call...
        assert alice._pipe is not None
        await alice._pipe.proc.wait()
    # ...or found dead by the call itself (EOF on the reply): retried on a fresh pipe.
    with caplog.at_level(logging.WARNING, logger="kbwg.agent.keybase"):
        assert await alice.send(ANNOUNCE, "after") == 2
    assert pipe_pid(alice) != pid
    assert any("restarting" in r.getMessage() for r in caplog.records)
    page = await alice.read(ANNOUNCE)
    assert [m.body for m in page.messages] == ["after", "before"]


async def test_concurrent_calls_are_serialised(alice: KeybaseClient) -> None:
    ids = await asyncio.gather(*(alice.send(ANNOUNCE, f"m{n}") for n in range(20)))
    assert sorted(ids) == list(range(1, 21))


async def test_close_leaves_no_process(binary: str, home: Path) -> None:
    client = KeybaseClient(binary, identity_env(home))
    await client.call("list")
    pid = pipe_pid(client)
    await client.close()
    assert not alive(pid)
    with pytest.raises(KeybaseError):
        await client.call("list")


# --------------------------------------------------------------------------- listen


async def test_listen_yields_messages_own_and_dev(alice: KeybaseClient, bob: KeybaseClient) -> None:
    await bob.send(DEV, "bob is in the dev channel")
    async with contextlib.aclosing(bob.listen(dev=True)) as it:
        ping = await first_ping(alice, it)
        assert ping.sender_username == "alice"
        await alice.send(DEV, "offer")
        await bob.send(ANNOUNCE, "own")
        got = await drain_pings(it, "own")
        assert [(m.body, m.channel.topic_type, m.sender_username) for m in got] == [
            ("offer", "dev", "alice"),
            ("own", "chat", "bob"),
        ]
        assert got[0].channel == DEV


async def test_listen_ready_event(alice: KeybaseClient, bob: KeybaseClient) -> None:
    ready = asyncio.Event()
    async with contextlib.aclosing(bob.listen(ready=ready)) as it:
        first = asyncio.ensure_future(it.__anext__())
        await asyncio.wait_for(ready.wait(), 10)
        assert not first.done()
        # Sent once ready: must arrive, no retries needed.
        await alice.send(GENERAL, "after ready")
        msg = await asyncio.wait_for(first, 5)
        assert msg.body == "after ready"


async def test_listen_without_dev_and_with_filters(alice: KeybaseClient) -> None:
    await alice.send(Channel(TEAM, "other"), "create")
    async with contextlib.aclosing(alice.listen(dev=False, filter_channels=[ANNOUNCE])) as it:
        await first_ping(alice, it, ANNOUNCE)
        await alice.send(DEV, "dev: filtered out")
        await alice.send(Channel(TEAM, "other"), "other: filtered out")
        await alice.send(ANNOUNCE, "wanted")
        got = await drain_pings(it, "wanted")
        assert [m.body for m in got] == ["wanted"]


async def test_listen_restarts_and_cleans_up(
    binary: str, home: Path, alice: KeybaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    listener = KeybaseClient(binary, identity_env(home), listen_backoff=(0.05, 0.2))
    it = listener.listen()
    await first_ping(alice, it)
    (pid,) = listener_pids(listener)
    with caplog.at_level(logging.WARNING, logger="kbwg.agent.keybase"):
        os.kill(pid, signal.SIGKILL)
        # Pings until one comes from the restarted listener (the old one's pipe may still
        # hold a few).
        for _ in range(50):
            await first_ping(alice, it)
            if listener_pids(listener) not in ([], [pid]):
                break
    assert any(
        "api-listen" in r.getMessage() and "restart" in r.getMessage() for r in caplog.records
    )
    (new_pid,) = listener_pids(listener)
    assert new_pid != pid and not alive(pid)
    await it.aclose()
    assert not alive(new_pid)
    assert listener_pids(listener) == []
    await listener.close()


async def test_cancelling_the_consumer_kills_the_listener(
    binary: str, home: Path, alice: KeybaseClient
) -> None:
    listener = KeybaseClient(binary, identity_env(home))
    seen = asyncio.Event()
    pids: list[int] = []

    async def consume() -> None:
        async for _ in listener.listen():
            pids.extend(listener_pids(listener))
            seen.set()

    task = asyncio.create_task(consume())
    for n in range(200):
        await alice.send(GENERAL, f"ping {n}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.wait(), 0.05)
            break
    assert seen.is_set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pids and not alive(pids[0])
    await listener.close()


async def test_close_stops_a_running_listener(
    binary: str, home: Path, alice: KeybaseClient
) -> None:
    listener = KeybaseClient(binary, identity_env(home))
    it = listener.listen()
    await first_ping(alice, it)
    (pid,) = listener_pids(listener)
    await listener.close()
    assert not alive(pid)
    # The iterator ends instead of restarting the listener.
    with pytest.raises(StopAsyncIteration):
        while True:
            await asyncio.wait_for(it.__anext__(), 5)


# --------------------------------------------------------------------------- scripted fakes

FAKE_READ_REPLY = {
    "result": {
        "messages": [
            {"error": "unable to decrypt"},
            {"msg": _summary(id=2, content={"type": "text", "text": {"body": "ok"}})},
            {"msg": {"id": "garbage"}},
            {"msg": _summary(id=1, content={"type": "edit", "edit": {}})},
        ],
        "pagination": {"next": "AQ==", "previous": "Ag==", "num": 4, "last": True},
    }
}


@pytest.fixture
def fake_binary(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    counter = tmp_path / "listen-starts"
    script = f"""
import json, sys
MSG = {json.dumps(json.dumps(_summary()))}
args = sys.argv[1:]
if args[:2] == ["chat", "api"]:
    for line in sys.stdin:
        print({json.dumps(json.dumps(FAKE_READ_REPLY))}, flush=True)
elif args[:2] == ["chat", "api-listen"]:
    with open({str(counter)!r}, "a") as f:
        f.write("x")
    print("Listening for chat notifications. Config: ...", file=sys.stderr, flush=True)
    print("not json at all", flush=True)
    print(json.dumps({{"type": "chat", "source": "remote", "error": "unbox failed"}}), flush=True)
    print(json.dumps({{"type": "chat_conv", "conv": {{}}}}), flush=True)
    print(json.dumps({{"type": "chat", "source": "remote", "msg": json.loads(MSG)}}), flush=True)
    sys.exit(3)
"""
    yield write_script(tmp_path / "fake-keybase", script), counter


async def test_read_skips_error_entries(
    fake_binary: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client = KeybaseClient(fake_binary[0])
    try:
        with caplog.at_level(logging.WARNING, logger="kbwg.agent.keybase"):
            page = await client.read(DEV)
        assert [(m.id, m.body, m.content_type) for m in page.messages] == [
            (2, "ok", "text"),
            (1, None, "edit"),
        ]
        assert page.next == "AQ==" and page.last is True
        assert any("unable to decrypt" in r.getMessage() for r in caplog.records)
    finally:
        await client.close()


async def test_listen_skips_junk_and_restarts_with_backoff(
    fake_binary: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    binary, counter = fake_binary
    client = KeybaseClient(binary, listen_backoff=(0.01, 0.05))
    with caplog.at_level(logging.DEBUG, logger="kbwg.agent.keybase"):
        async with contextlib.aclosing(client.listen()) as it:
            got = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(3)]
    # Only the good line of each run; the listener exited after each and was restarted.
    assert [m.body for m in got] == ["hi", "hi", "hi"]
    assert counter.read_text() == "xxx"
    messages = [r.getMessage() for r in caplog.records]
    assert any("undecodable" in m for m in messages)
    assert any("unbox failed" in m for m in messages)
    assert sum("rc=3" in m for m in messages) >= 2
    # stderr went to the log, never into the JSON stream.
    assert any("Listening for chat notifications" in m for m in messages)
    await client.close()


async def test_newconv_of_a_channel_in_use_is_refused_and_join_gets_in(
    alice: KeybaseClient, bob: KeybaseClient
) -> None:
    conv_id = await alice.newconv(DEV)
    for client in (alice, bob):
        with pytest.raises(KeybaseServiceError, match="already in use"):
            await client.newconv(DEV)
    await bob.join(DEV)
    listed = await bob.call("list", {"topic_type": "dev"})
    assert [c["id"] for c in listed["conversations"]] == [conv_id]
