from kbwg.agent.status_view import render_status


def peer(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "username": "bob", "device": "desk", "overlay_ip": "100.64.0.2", "dynamic": False,
        "public_key": "k", "endpoint": "198.18.1.11:51820", "path": "direct-lan",
        "rtt_ms": 0.42, "last_handshake": 995.0, "rx_bytes": 2048, "tx_bytes": 10,
        "reason": "same LAN: host candidates answer each other (0.4 ms)",
    }
    base.update(over)
    return base


STATUS = {"username": "alice", "device": "laptop", "team": "t", "overlay_ip": "100.64.0.1",
          "interface": "kbwg0", "backend": "userspace", "endpoint": "198.18.1.10:51820",
          "public_key": "pk"}


def test_table_shows_path_rtt_and_reason() -> None:
    text = render_status({**STATUS, "peers": [
        peer(),
        peer(username="carol", device="nas", overlay_ip="100.64.0.3", public_key=None,
             endpoint=None, path="none", rtt_ms=None, last_handshake=None, reason=None),
        peer(username="dave", device="phone", overlay_ip="100.64.128.9", dynamic=True,
             endpoint=None, path="none", rtt_ms=None, last_handshake=None, reason=None),
    ]}, now=1000.0)
    lines = text.splitlines()
    bob = next(line for line in lines if line.startswith("bob/desk"))
    assert "direct-lan" in bob and "0.4 ms" in bob and "5s ago" in bob and "2.0 KiB" in bob
    carol = next(line for line in lines if line.startswith("carol/nas"))
    assert "(not announced)" in carol and "never" in carol
    dave = next(line for line in lines if line.startswith("dave/phone (dynamic)"))
    assert "(negotiating)" in dave
    assert "  bob/desk: same LAN: host candidates answer each other (0.4 ms)" in lines


def test_no_peers() -> None:
    assert "no peers" in render_status({**STATUS, "peers": []})
