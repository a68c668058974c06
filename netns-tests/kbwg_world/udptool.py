"""A scriptable UDP endpoint for tests, run inside a namespace as a plain script.

    python udptool.py --port 40000 [--bind IP] [--echo]

It prints JSON lines on stdout: `{"event": "ready", "port": P}` once bound, then
`{"event": "recv", "src": [ip, port], "data": "..."}` per datagram. Each JSON line on stdin
`{"op": "send", "host": ip, "port": p, "data": "..."}` sends a datagram from the bound socket
(so the NAT mapping is the one of that socket). With --echo it answers every datagram with
`seen <ip>:<port>`, i.e. the address the sender's packet came from: a poor man's STUN.
Standard library only, so it runs by path with any interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_command(sock: socket.socket, cmd: dict[str, object]) -> None:
    if cmd.get("op") != "send":
        emit({"event": "error", "error": f"unknown command {cmd!r}"})
        return
    try:
        sock.sendto(str(cmd["data"]).encode(), (str(cmd["host"]), int(str(cmd["port"]))))
    except OSError as exc:
        emit({"event": "error", "error": str(exc)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--echo", action="store_true")
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.bind, args.port))
    sock.setblocking(False)
    emit({"event": "ready", "port": sock.getsockname()[1]})

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    # Raw reads of fd 0: a buffered readline() would hide queued commands from select().
    sel.register(0, selectors.EVENT_READ, "stdin")
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                chunk = os.read(0, 65536)
                if not chunk:
                    return 0  # the controlling test went away
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        run_command(sock, json.loads(line))
                continue
            while True:
                try:
                    data, src = sock.recvfrom(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                text = data.decode(errors="replace")
                emit({"event": "recv", "src": [src[0], src[1]], "data": text})
                if args.echo:
                    sock.sendto(f"seen {src[0]}:{src[1]}".encode(), src)


if __name__ == "__main__":
    sys.exit(main())
