"""PairTable: what a check from an unlisted address teaches, and how it ranks.

The case behind these: a peer's check through its TURN relay reaches us from the relay's
IP with a port the peer never listed, because our NAT renumbered it (conntrack does, on
a clash with our own checks to that relay port). Taken for an ordinary peer-reflexive
candidate it counted as direct and, answering a few ms faster, won over the real direct
pair: the peer saw its path relayed while we called it direct.
"""

from __future__ import annotations

from kbwg.negotiation.candidate_pairs import prflx_priority
from kbwg.negotiation.candidates import TYPE_PREFERENCE, Candidate, candidate_priority
from kbwg.negotiation.check_config import CheckCounters, CheckTimers
from kbwg.negotiation.choice import choose
from kbwg.negotiation.pair_table import MAX_PRFLX, PairTable
from kbwg.negotiation.wire import CandidateInfo

HOST = Candidate("host", "198.18.1.10", 51820, "eth0", candidate_priority("host"), "eth0")
RELAYED = Candidate("relay", "203.0.113.5", 54350, None, candidate_priority("relay"),
                    "turn:203.0.113.5:3478", "198.18.2.10:51820")


def table() -> PairTable:
    pairs = PairTable([HOST], CheckTimers(), CheckCounters(), "bob/desk")
    pairs.form([CandidateInfo("host", "198.18.2.10", 51820, candidate_priority("host"),
                              "host0")], controlling=True)
    return pairs


def test_checks_from_a_relayed_base_carry_the_relay_type() -> None:
    assert prflx_priority(RELAYED) >> 24 == TYPE_PREFERENCE["relay"]
    assert prflx_priority(HOST) >> 24 == TYPE_PREFERENCE["prflx"]


def test_a_check_through_the_peers_relay_teaches_a_relayed_candidate() -> None:
    pairs = table()
    through_relay = pairs.remote_for(("203.0.113.5", 13728), prflx_priority(RELAYED))
    direct = pairs.remote_for(("203.0.113.11", 43746), prflx_priority(HOST))
    assert through_relay is not None and direct is not None
    assert through_relay.type == "relay" and direct.type == "prflx"

    relayed_pair = pairs.pair_for(HOST, through_relay, controlling=True)
    direct_pair = pairs.pair_for(HOST, direct, controlling=True)
    assert relayed_pair is not None and direct_pair is not None
    assert relayed_pair.view().path == "relay" and direct_pair.view().path == "direct"

    # Both answer; the relayed one faster. The direct one still wins.
    for pair, rtt in ((relayed_pair, 10.0), (direct_pair, 10.2)):
        pair.state = "succeeded"
        pair.add_rtt(rtt, exact=True, at=0.0)
    best, _ = choose(None, [relayed_pair.view(), direct_pair.view()])
    assert best is not None and best.key == direct_pair.key


def test_learned_candidates_survive_trickled_ones_and_stay_bounded() -> None:
    pairs = table()
    learned = pairs.remote_for(("203.0.113.5", 13728), prflx_priority(RELAYED))
    pairs.add_remotes([CandidateInfo("srflx", "203.0.113.11", 44268,
                                     candidate_priority("srflx"), "srflx1")], True)
    assert pairs.remote_for(("203.0.113.5", 13728), prflx_priority(RELAYED)) is learned
    for port in range(MAX_PRFLX):
        pairs.remote_for(("203.0.113.12", 20000 + port), prflx_priority(HOST))
    assert pairs.remote_for(("203.0.113.13", 1), prflx_priority(HOST)) is None


def test_a_bad_priority_is_an_ordinary_peer_reflexive_candidate() -> None:
    for priority in (None, -1, 2**32, "x"):
        remote = table().remote_for(("203.0.113.11", 40000), priority)
        assert remote is not None and remote.type == "prflx"


def test_a_learned_candidate_the_peer_then_lists_takes_the_listed_type() -> None:
    pairs = table()
    learned = pairs.remote_for(("198.18.2.11", 51820), prflx_priority(HOST))
    assert learned is not None
    pair = pairs.pair_for(HOST, learned, controlling=True)
    assert pair is not None and pair.path == "direct"
    pair.state = "succeeded"
    host = CandidateInfo("host", "198.18.2.11", 51820, candidate_priority("host", 1), "host1")
    added, retyped = pairs.add_remotes([host], controlling=True)
    assert retyped == [pair] and not added
    assert pair.remote is host and pair.path == "direct-lan" and pair.state == "succeeded"
    # Listed in the class it already has: the learned type stays (the checker reads a
    # peer-reflexive remote as checks coming from a new address).
    moved = pairs.remote_for(("203.0.113.20", 40000), prflx_priority(HOST))
    assert moved is not None
    moved_pair = pairs.pair_for(HOST, moved, controlling=True)
    srflx = CandidateInfo("srflx", "203.0.113.20", 40000, candidate_priority("srflx"), "s")
    _, retyped = pairs.add_remotes([srflx], controlling=True)
    assert not retyped and moved_pair is not None and moved_pair.remote is moved


def test_a_later_lower_listing_never_demotes_a_host_candidate() -> None:
    pairs = table()
    same = CandidateInfo("srflx", "198.18.2.10", 51820, candidate_priority("srflx"), "s")
    added, retyped = pairs.add_remotes([same], controlling=True)
    assert not added and not retyped
    assert [p.remote.type for p in pairs.pairs] == ["host"]


def test_a_guessed_type_is_replaced_even_by_a_lower_one() -> None:
    """The announced endpoint is taken as server-reflexive; the peer's own listing of
    that address (here its relay) replaces the guess, whatever its priority."""
    pairs = PairTable([HOST], CheckTimers(), CheckCounters(), "bob/desk")
    pairs.form([CandidateInfo("srflx", "203.0.113.9", 50000, candidate_priority("srflx"),
                              "announced")], controlling=True)
    relayed = CandidateInfo("relay", "203.0.113.9", 50000, candidate_priority("relay"), "r")
    _, kept = pairs.add_remotes([relayed], controlling=True)
    assert not kept and pairs.pairs[0].path == "direct"
    _, retyped = pairs.add_remotes([relayed], controlling=True, replace=True)
    assert retyped == pairs.pairs and pairs.pairs[0].path == "relay"
