from dataclasses import replace

from kbwg.negotiation.choice import (
    PairState,
    PairView,
    better_class_pending,
    choose,
    explain,
    faster_enough,
    path_class,
)


def view(key: str, local: str, remote: str, rtt: float | None = 10.0,
         state: PairState = "succeeded", priority: int = 0) -> PairView:
    return PairView(key=key, local_type=local, local_address=f"10.0.0.{len(key)}:51820",
                    remote_type=remote, remote_address=f"10.0.1.{len(key)}:51820",
                    state=state, rtt_ms=rtt, priority=priority)


def test_path_class() -> None:
    assert path_class("host", "host") == "direct-lan"
    assert path_class("host", "srflx") == "direct"
    assert path_class("srflx", "srflx") == "direct"
    assert path_class("prflx", "host") == "direct"
    assert path_class("host", "prflx") == "direct"
    assert path_class("relay", "host") == "relay"
    assert path_class("srflx", "relay") == "relay"


def test_class_beats_rtt() -> None:
    lan = view("lan", "host", "host", rtt=50.0)
    nat = view("nat", "srflx", "srflx", rtt=5.0)
    relay = view("relay", "relay", "host", rtt=1.0)
    best, reason = choose(None, [relay, nat, lan])
    assert best == lan
    assert reason == "same LAN: host candidates answer each other (50.0 ms)"
    best, reason = choose(None, [relay, nat])
    assert best == nat
    assert reason == ("direct through NAT via server-reflexive address (5.0 ms); "
                      "no LAN path")
    failed = [view(f"d{i}", "host", "srflx", state="failed") for i in range(4)]
    best, reason = choose(None, [relay, *failed])
    assert best == relay
    assert reason == "relayed (1.0 ms): no direct pair answered (tried 4)"


def test_lower_rtt_wins_within_a_class_without_current() -> None:
    slow = view("slow", "host", "host", rtt=160.0, priority=10)
    fast = view("fast", "host", "host", rtt=10.0, priority=1)
    assert choose(None, [slow, fast])[0] == fast
    # Unknown RTT loses to a known one; priority breaks ties.
    unknown = view("unknown", "host", "host", rtt=None, priority=99)
    assert choose(None, [unknown, fast])[0] == fast
    tied = [view("a", "host", "host", 5.0, priority=1), view("bb", "host", "host", 5.0, priority=2)]
    assert choose(None, tied)[0] == tied[1]


def between(key: str, local: str, remote: str, rtt: float, base: float) -> PairView:
    """A working pair from `local` to `remote` ("type ip:port"), its recent and base
    RTT."""
    (local_type, local_address), (remote_type, remote_address) = (
        local.split(), remote.split())
    return PairView(key, local_type, local_address, remote_type, remote_address,
                    rtt_ms=rtt, base_rtt_ms=base)


def test_the_base_rtt_not_the_recent_one_decides_a_switch() -> None:
    # The selected path carries a transfer: its recent checks wait behind the transfer's
    # queue (9.1 ms), an idle alternative's do not (1.5 ms). Its base is 1.4 ms: kept.
    loaded = between("cur", "host 198.18.1.10:51820", "srflx 203.0.113.11:40001", 9.1, 1.4)
    idle = between("new", "host 198.18.3.10:51820", "srflx 203.0.113.11:40002", 1.5, 1.5)
    assert choose(loaded, [loaded, idle])[0] == loaded
    # Slower at its base too: replaced, and the reason gives the base RTTs compared.
    slow = between("cur", "host 198.18.1.10:51820", "srflx 203.0.113.11:40001", 9.1, 8.0)
    best, reason = choose(slow, [slow, idle])
    assert best == idle
    assert reason.endswith(": 1.5 ms vs 8.0 ms")
    # Ranking without a current pair goes by the base RTT as well.
    assert choose(None, [loaded, idle])[0] == loaded


def test_relayed_pairs_through_the_same_relay_never_switch_on_rtt() -> None:
    # Ours through the peer's allocation, or the peer's through ours, on one relay:
    # only whose loopback proxy carries the path differs.
    theirs = between("a", "prflx 203.0.113.10:35545", "relay 203.0.113.5:57713", 9.1, 9.1)
    ours = between("b", "relay 203.0.113.5:60875", "prflx 203.0.113.11:58448", 1.5, 1.5)
    assert choose(theirs, [theirs, ours])[0] == theirs
    # Through another relay: a different route, and RTT decides.
    other = between("c", "relay 203.0.113.6:50000", "prflx 203.0.113.11:58449", 1.5, 1.5)
    assert choose(theirs, [theirs, other])[0] == other
    # Not a question of RTT: a pair relayed at one end still beats one relayed twice.
    twice = between("d", "relay 203.0.113.5:60875", "relay 203.0.113.5:57713", 0.5, 0.5)
    assert choose(twice, [twice, theirs])[0] == theirs


def test_hysteresis_keeps_current_against_jitter() -> None:
    current = view("cur", "host", "host", rtt=20.0)
    slightly = view("new", "host", "host", rtt=17.0)  # 15% better: within the margin
    best, reason = choose(current, [current, slightly])
    assert best == current
    assert "same LAN" in reason
    # 50% better but under 2 ms faster: still kept (tiny absolute jitter on a LAN).
    lan_cur = view("cur", "host", "host", rtt=0.6)
    lan_new = view("new", "host", "host", rtt=0.3)
    assert choose(lan_cur, [lan_cur, lan_new])[0] == lan_cur
    assert not faster_enough(0.3, 0.6)
    assert not faster_enough(None, 10.0) and not faster_enough(5.0, None)


def test_big_improvement_switches_with_reason() -> None:
    current = view("cur", "host", "host", rtt=81.0)
    better = view("new", "host", "host", rtt=5.2)
    best, reason = choose(current, [current, better])
    assert best == better
    assert reason.startswith(f"switched from {current.label()} to {better.label()}")
    assert reason.endswith("5.2 ms vs 81.0 ms")


def test_better_class_switches_regardless_of_rtt() -> None:
    relay = view("relay", "relay", "srflx", rtt=20.0)
    direct = view("direct", "srflx", "srflx", rtt=30.0)
    best, reason = choose(relay, [relay, direct])
    assert best == direct
    assert reason.startswith("switched from relay")
    # ... but a worse class never replaces a working current.
    assert choose(direct, [relay, direct])[0] == direct


def test_a_pair_that_missed_its_latest_check_is_kept_but_not_moved_to() -> None:
    """The peer moved: its old direct pair, one miss from failing, must not take the
    path back from the pair its new address answers on."""
    dying = replace(view("old", "srflx", "srflx", rtt=30.0), missed=True)
    relay = view("relay", "relay", "prflx", rtt=60.0)
    assert choose(relay, [dying, relay])[0] == relay
    assert choose(None, [dying, relay])[0] == relay
    # As the path itself it stays until its misses add up; with nothing else, it is used.
    assert choose(dying, [dying, relay])[0] == dying
    assert choose(None, [dying])[0] == dying
    assert choose(relay, [dying, replace(relay, state="failed")])[0] == dying


def test_dead_current_is_replaced_at_once() -> None:
    dead = view("cur", "host", "host", rtt=1.0, state="failed")
    other = view("other", "host", "srflx", rtt=50.0)
    best, reason = choose(dead, [dead, other])
    assert best == other
    assert reason.startswith(f"{dead.label()} stopped answering; switched to")
    best, reason = choose(dead, [dead])
    assert best is None
    assert reason == f"{dead.label()} stopped answering; no pair answered (tried 1)"


def test_nothing_usable_reasons() -> None:
    assert choose(None, []) == (None, "no candidate pairs to check")
    pending = [view("a", "host", "host", state="in-progress"),
               view("bb", "host", "srflx", state="failed")]
    assert choose(None, pending) == (None, "no pair answered yet (1 of 2 still checking)")


def test_better_class_pending() -> None:
    nat = view("nat", "host", "srflx")
    assert better_class_pending(nat, [nat, view("lan", "host", "host", state="in-progress")])
    assert not better_class_pending(nat, [nat, view("lan", "host", "host", state="failed")])
    assert not better_class_pending(nat, [nat, view("n2", "host", "srflx", state="waiting")])


def test_explain_names_the_reflexive_side() -> None:
    assert "peer-reflexive" in explain(view("p", "prflx", "host", 3.0), [])
    assert "server-reflexive" in explain(view("s", "host", "srflx", 3.0), [])
    assert explain(view("r", "relay", "host", None), []).startswith("relayed (RTT unknown)")


def test_explain_says_when_the_rtt_is_only_an_upper_bound() -> None:
    # Timed across retransmissions (the first copies were lost): not a measured RTT.
    bound = PairView(key="r", local_type="relay", local_address="203.0.113.5:40000",
                     remote_type="srflx", remote_address="203.0.113.11:51820",
                     rtt_ms=307.3, rtt_bound=True)
    assert explain(bound, []).startswith("relayed (at most 307.3 ms)")


def test_one_relayed_end_beats_two_even_when_slower() -> None:
    # Relayed at both ends: twice through the relay and a loopback proxy at each agent.
    one_end = view("one", "relay", "prflx", rtt=3.2)
    both_ends = view("both", "relay", "relay", rtt=1.1)
    best, _ = choose(None, [both_ends, one_end])
    assert best == one_end
    best, reason = choose(one_end, [both_ends, one_end])
    assert best == one_end, reason  # no switch for a millisecond on an idle check
    best, reason = choose(both_ends, [both_ends, one_end])
    assert best == one_end and reason.startswith("switched from"), reason
