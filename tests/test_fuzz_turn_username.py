"""Fuzzing the TURN REST username (`expiry:user`) that any client can put in USERNAME.

The relay reads the expiry before it checks MESSAGE-INTEGRITY, so this runs on every
unauthenticated request: whatever the text, `split_username` gives an (expiry, user)
pair or None, and the relay answers with a challenge instead of a handler error.
"""

from __future__ import annotations

import fuzzing
import pytest
from aioice import stun
from aioice.turn import UDP_TRANSPORT
from hypothesis import given
from hypothesis import strategies as st
from test_relay_fuzz import REALM, Harness

from kbwg.core.turnrest import split_username

usernames = st.one_of(
    st.text(max_size=30),
    st.tuples(st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=14),
              st.sampled_from(["", ":", ":alice"])).map("".join),
    st.integers(0, 10**14).map(lambda n: f"{n}:alice"),
)


@pytest.mark.timeout(60)
@fuzzing.FUZZ
@given(username=usernames)
def test_split_username_gives_a_pair_or_none(username: str) -> None:
    parsed = split_username(username)
    if parsed is not None:
        expiry, user = parsed
        assert 0 <= expiry < 10**12 and isinstance(user, str)


@pytest.mark.parametrize("username", ["\u00b2:alice", "\u00b9\u00b2\u00b3", "\u0661:x"])
def test_a_username_with_non_ascii_digits_is_challenged(username: str) -> None:
    # "²" passed isdigit() and then raised ValueError in int(): a handler error (and no
    # answer) for an unauthenticated request, instead of the 401 challenge.
    harness = Harness()
    try:
        message = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                               attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT,
                                           "USERNAME": username, "REALM": REALM,
                                           "NONCE": harness.nonce})
        message.add_message_integrity(b"k" * 16)
        answers = harness.feed(bytes(message))
        assert harness.server.counters.handler_errors == 0
        assert [stun.parse_message(a).attributes["ERROR-CODE"][0] for a in answers] == [401]
    finally:
        harness.close()
