"""`keybase chat api`: the decode loop that reads JSON calls, checks their options as the
real CLI does, hands them to the service and writes one reply per call."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from kbwg_standin.channels import channel_from_json, decode_token, go_type, parse_topic_type
from kbwg_standin.ctl import LOST, is_stopped, watch
from kbwg_standin.env import Env
from kbwg_standin.errors import EXIT_NOTOK, EXIT_OK, RequestError, ServiceError, die, next_arg
from kbwg_standin.service import ChatService
from kbwg_standin.store import open_db

DEFAULT_READ_NUM = 100
# Methods the real v1 handler knows; the stand-in serves a subset and answers the rest with
# a service error rather than the "invalid v1 method" request error, as the real CLI would
# accept them.
KNOWN_METHODS = frozenset(
    {
        "list", "read", "get", "send", "edit", "reaction", "delete", "attach", "download",
        "setstatus", "mark", "searchinbox", "searchregexp", "newconv", "listconvsonname",
        "join", "leave", "addtochannel", "loadflip", "getunfurlsettings", "setunfurlsettings",
        "advertisecommands", "clearcommands", "listcommands", "pin", "unpin",
        "getresetconvmembers", "addresetconvmember", "getdeviceinfo", "listmembers",
        "emojiadd", "emojiaddalias", "emojiremove", "emojilist",
    }
)  # fmt: skip
CONV_METHODS = frozenset({"read", "get", "send", "join", "leave", "newconv"})


def check_options(method: str, options: Any) -> dict[str, Any]:
    """Decode-loop validation, as the real CLI's option Check(): failures are RequestError."""
    if options is None:
        if method in CONV_METHODS:
            raise RequestError(f"invalid {method} v1 options: empty options")
        options = {}
    if not isinstance(options, dict):
        raise RequestError(
            f"json: cannot unmarshal {go_type(options)} into Go value of type "
            f"client.{method}OptionsV1"
        )
    opts = dict(options)
    if method in CONV_METHODS:
        spec = channel_from_json(opts.get("channel"), method)
        conv_id = opts.get("conversation_id") or ""
        if not isinstance(conv_id, str):
            raise RequestError(
                f"json: cannot unmarshal {go_type(conv_id)} into Go struct field "
                f"{method}OptionsV1.conversation_id of type string"
            )
        if spec is None and not conv_id:
            raise RequestError(f"invalid {method} v1 options: need channel or conversation_id")
        if spec is not None and conv_id:
            raise RequestError(
                f"invalid {method} v1 options: include channel or conversation_id, not both"
            )
        opts["_channel"] = spec
        opts["conversation_id"] = conv_id
    if method == "send":
        message = opts.get("message")
        body = message.get("body") if isinstance(message, dict) else None
        if body is not None and not isinstance(body, str):
            raise RequestError(
                f"json: cannot unmarshal {go_type(body)} into Go struct field "
                "ChatMessage.message.body of type string"
            )
        if not body:
            raise RequestError("invalid send v1 options: invalid message, body cannot be empty")
        # Go replaces invalid UTF-8 (here: lone surrogates) rather than failing.
        opts["_body"] = body.encode("utf-8", "replace").decode("utf-8")
    if method == "read":
        pag = opts.get("pagination") or {}
        if not isinstance(pag, dict):
            raise RequestError("invalid read v1 options: pagination must be an object")
        num = pag.get("num") or 0
        if not isinstance(num, int) or isinstance(num, bool):
            raise RequestError("json: cannot unmarshal into Go struct field Pagination.num")
        nxt = decode_token(pag["next"], "next") if pag.get("next") else None
        prev = decode_token(pag["previous"], "previous") if pag.get("previous") else None
        opts["_pagination"] = (num if num > 0 else DEFAULT_READ_NUM, nxt, prev)
    if method == "list" and "topic_type" in opts:
        try:
            parse_topic_type(opts["topic_type"])
        except RequestError as exc:
            raise RequestError(f"invalid list v1 options: {exc}") from exc
    return opts


class ChatApi:
    def __init__(self, service: ChatService | None, out: IO[bytes], pretty: bool) -> None:
        self.service = service
        self.out = out
        self.pretty = pretty

    def handle_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            raise RequestError(
                f"json: cannot unmarshal {go_type(call)} into Go value of type client.Call"
            )
        method = call.get("method")
        if not isinstance(method, str):
            raise RequestError("json: cannot unmarshal into Go struct field Call.method")
        params = call.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("json: cannot unmarshal into Go struct field Call.params")
        version = params.get("version", 1) or 1
        if version != 1:
            raise RequestError(f"invalid version {version}")
        if method not in KNOWN_METHODS:
            raise RequestError(f'invalid v1 method "{method}"')
        try:
            opts = check_options(method, params.get("options"))
        except RequestError as exc:
            msg = str(exc)
            if msg.startswith("invalid topic type"):
                msg = f"invalid {method} v1 options: {msg}"
            raise RequestError(msg) from exc
        reply: dict[str, Any]
        try:
            if self.service is None:
                raise ServiceError("the keybase stand-in has no service state")
            reply = {"result": self.service.handle(method, opts)}
        except ServiceError as exc:
            reply = {"error": {"code": 0, "message": str(exc)}}
            if exc.data is not None:
                # As the real errReply: a ChatRateLimitError carries its RateLimit here.
                reply["error"]["data"] = exc.data
        for key in ("jsonrpc", "id"):
            if call.get(key):
                reply[key] = call[key]
        text = json.dumps(
            reply,
            indent=4 if self.pretty else None,
            separators=None if self.pretty else (",", ":"),
            ensure_ascii=False,
        )
        # Always UTF-8, as Go writes it, whatever the locale says.
        self.out.write(text.encode("utf-8", "replace") + b"\n")
        self.out.flush()


def iter_json_values(lines: Iterator[str]) -> Iterator[Any]:
    """JSON values from a stream, like Go's json.Decoder (several per line, or one spread
    over lines). Raises RequestError on invalid input."""
    decoder = json.JSONDecoder()
    pending = ""
    for line in lines:
        pending += line
        while True:
            stripped = pending.lstrip()
            if not stripped:
                pending = ""
                break
            try:
                value, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError as exc:
                if _looks_incomplete(stripped, exc):
                    pending = stripped
                    break
                raise RequestError(f"invalid character in JSON input: {exc.msg}") from exc
            yield value
            pending = stripped[end:]
    if pending.strip():
        raise RequestError("unexpected EOF")


def _looks_incomplete(text: str, exc: json.JSONDecodeError) -> bool:
    if exc.msg.startswith("Unterminated string"):
        return True
    return exc.pos >= len(text.rstrip())


def cmd_chat_api(env: Env, args: Sequence[str]) -> int:
    message: str | None = None
    infile: str | None = None
    outfile: str | None = None
    pretty = False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--message"):
            message = next_arg(it, arg)
        elif arg in ("-i", "--infile"):
            infile = next_arg(it, arg)
        elif arg in ("-o", "--outfile"):
            outfile = next_arg(it, arg)
        elif arg in ("-p", "--pretty"):
            pretty = True
        elif arg.startswith("-m="):
            message = arg[3:]
        else:
            die(f"unknown flag for chat api: {arg}")
    # Closed explicitly below, after the loop: it lives as long as the pipe.
    out: IO[bytes] = open(outfile, "wb") if outfile else sys.stdout.buffer  # noqa: SIM115
    conn = open_db(env.home)
    api = ChatApi(ChatService(env, conn), out, pretty)
    # A pipe whose service goes away dies, as the real one does when its connection to
    # the service is lost; the caller starts a new one (which fails while it is down).
    watch(env.home, env.identity, _service_lost)
    lines: Iterator[str]
    if message is not None:
        lines = iter([message])
    elif infile is not None:
        lines = iter(Path(infile).read_text().splitlines(keepends=True))
    else:
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        lines = iter(stdin.readline, "")
    try:
        for call in iter_json_values(lines):
            # The watch above polls; a call that comes first must not get through either:
            # with its service gone the real pipe has nothing to send the call to.
            if is_stopped(env.home, env.identity):
                _service_lost()
            api.handle_call(call)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        conn.close()
    return EXIT_OK


def _service_lost() -> None:
    sys.stderr.write(f"\u25b6 ERROR {LOST}\n")
    sys.stderr.flush()
    os._exit(EXIT_NOTOK)
