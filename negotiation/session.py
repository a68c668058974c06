"""Pairwise offer/answer over the team's dev channel, one `PeerSession` per peer.

Who offers: a device that learns of a peer offers at once, except when the peer
announced after us (it joined later and finds our announcement in its history, so its
offer is already on the way): then we wait `offer_grace_s` before offering ourselves.
Glare (both offered) is resolved by key order: the offer of the device with the higher
WireGuard public key wins.

The rules that keep crossed, repeated and late messages from breaking a session (chat
delivery takes hundreds of ms, offers are resent, and the dev channel's recent history
is read again at every refresh, so any message may arrive late or twice):

- A peer's messages are handled one at a time, in the order they reach us.
- Glare: while our offer is out, the winner (higher key) ignores the loser's offer; the
  loser answers the winner's and drops its own (its resends stop).
- Stale offers: an offer or restart the peer sent (by its own clock, `ts`) before the
  newest offer or answer of its that we acted on is ignored. The peer gave it up when
  it sent that newer one: a loser's offer that crossed ours, then reached us after its
  answer to ours, is the usual case.
- A repeated offer of the session we answered (the peer resent it before our answer
  reached it) gets the same answer again: new credentials would make the checker the
  peer is running useless.
- Resends of an offer belong to its session: a newer offer stops them.
- A checker a new session replaces after it had a path is retired, not closed: it
  goes on answering the peer's checks and following the peer (a device that moved
  checks from its new address with the old session's credentials at once, long before
  its restart crosses the chat) until the new checker chooses a path, or for at most
  `RETIRED_MAX_S`. It no longer reports losses or failure: the new session owns them.
- A restart means the peer's path to us went quiet, so ours to it probably did too,
  noticed or not (answering retires the checks that would notice), and our NAT may have
  moved: the agent re-checks our candidates (`on_restart`, at most `RECHECK_S`) before
  we answer, so that the answer does not carry a public address that is gone. One
  re-check serves every peer that restarts meanwhile or within `RECHECK_FRESH_S` (when
  our address moved, they all do).
- A session whose checks found no path (stale candidates, or a peer that was away) is
  negotiated again, after `RETRY_MIN_S` doubling to `RETRY_MAX_S` while it keeps
  failing: nothing else would ever renegotiate it, since no chosen path is lost.

The answering side controls the checks (the reverse of RFC 8445's habit): it has both
sets of credentials the moment the offer arrives, so it checks and nominates at once,
while the offerer's checker, which exists from the moment it offered, answers those
checks. The answerer then sets its WireGuard endpoint and WireGuard's handshake reaches
the offerer, which roams to it: the path is up one chat delivery after the offer,
before the answer has even arrived.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nacl.public import PrivateKey, PublicKey

from kbwg.core.background import Background
from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import LimitedLog
from kbwg.negotiation.replay import ReplayGuard
from kbwg.negotiation.signalling import SignalMessage
from kbwg.negotiation.wire import (
    MAX_TEXT,
    Answer,
    CandidateInfo,
    Offer,
    SenderKeyMismatch,
    Trickle,
    WireError,
    WireMessage,
    ignored_notes,
    log_ignored,
    new_sender_session,
    new_session_id,
    open_body,
    seal,
)

log = logging.getLogger(__name__)

OFFER_GRACE_S = 1.5
ANSWER_TIMEOUT_S = 3.0
MAX_OFFERS = 3
# How long answering a restart waits for our candidates to be checked again (STUN).
RECHECK_S = 1.0
# A re-check this recent also serves the next peer's restart.
RECHECK_FRESH_S = 2.0
# A session whose checks found no path is renegotiated after this, doubling to the max.
RETRY_MIN_S = 2.0
RETRY_MAX_S = 300.0
# How long a replaced checker that had a path goes on beside the new one (above).
RETIRED_MAX_S = 30.0
# Offers that arrive before the sender's announcement (other channel, other order).
PENDING_MAX = 8
PENDING_TTL_S = 10.0


class Checker(Protocol):
    def set_remote(self, ufrag: str, pwd: str, candidates: list[CandidateInfo],
                   complete: bool = True) -> None: ...

    def add_remote(self, candidates: list[CandidateInfo], complete: bool) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...

    @property
    def was_connected(self) -> bool:
        """Whether its checks ever chose a path (the peer may still check with them)."""

    def retire(self) -> None:
        """A newer session took over: keep answering and following the peer, but report
        no loss or failure."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class CheckerSpec:
    """What a new checker needs; the agent's factory adds candidates and transport."""

    peer: DeviceId
    ufrag: str
    pwd: str
    controlling: bool
    tie_breaker: int
    # Told whether the checks have a path (True) or found none (False), on each change.
    on_outcome: Callable[[bool], None] | None = None


CheckerFactory = Callable[[CheckerSpec], Checker]
Poster = Callable[[str], Awaitable[None]]


def new_credentials() -> tuple[str, str]:
    # RFC 8445: ufrag at least 24 bits, password at least 128 bits of randomness.
    return secrets.token_hex(4), base64.b64encode(os.urandom(18)).decode()


# What `snapshot` shows of the previous checker's path while a new one has none yet.
KEPT_FIELDS = ("path", "local_candidate", "remote_candidate", "interface", "rtt_ms",
               "base_rtt_ms", "reason", "connected_at", "selected_at")


def _path_of(snap: dict[str, Any]) -> dict[str, Any] | None:
    """A checker snapshot's path fields (KEPT_FIELDS); None when it has no path."""
    if snap.get("path", "none") == "none":
        return None
    return {key: snap.get(key) for key in KEPT_FIELDS}


@dataclass
class PeerSession:
    peer: DeviceId
    public_key: PublicKey
    wins_glare: bool
    state: str = "idle"  # idle, offering, checking, unanswered, closed
    session_id: bytes | None = None
    checker: Checker | None = None
    offers_sent: int = 0
    started_at: float = field(default_factory=time.time)
    timer: asyncio.TimerHandle | None = None
    # Our candidates the peer has in this session, and whether we said that was all.
    sent: set[tuple[str, str, int]] = field(default_factory=set)
    sent_complete: bool = True
    # Our answer in this session, when the peer offered it (sent again to a resent offer).
    answer: Answer | None = None
    # The peer's timestamp of its newest offer or answer we acted on (stale offers).
    peer_latest: float = -math.inf
    # The peer's messages, one at a time.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Renegotiating after checks that found no path, with backoff.
    retry_s: float = RETRY_MIN_S
    retry: asyncio.TimerHandle | None = None
    # The lines about the peer's messages: a handful per session, but a peer can post
    # offers or candidates without end. Per peer, so that one does not silence others.
    notes: LimitedLog = field(default_factory=lambda: LimitedLog(log))
    # The replaced checker that had a path, still answering the peer (module docstring).
    retired: Checker | None = None
    retired_timer: asyncio.TimerHandle | None = None
    # The path the last replaced checker had chosen: WireGuard stays on it until the new
    # checker chooses, so `snapshot` shows it meanwhile (None: it had none).
    kept: dict[str, Any] | None = None

    def told(self, candidates: list[CandidateInfo], complete: bool) -> None:
        self.sent = {(c.type, c.ip, c.port) for c in candidates}
        self.sent_complete = complete

    def glare_won(self) -> bool:
        """Whether our offer is out and beats the peer's."""
        return self.state == "offering" and self.wins_glare

    def replace_checker(self, checker: Checker | None) -> None:
        """`checker` takes over; the one before is retired if it ever had a path (the
        peer may still check with its credentials; a device that moved lost that path
        but finds it again with them) and a new one is coming, else closed."""
        old, self.checker = self.checker, checker
        if checker is None:
            self.close_retired(keep=False)
        if old is None:
            return
        if checker is None or not old.was_connected:
            if self.retired is None:
                self.kept = None
            old.close()
            return
        self.close_retired(keep=False)
        old.retire()
        self.retired = old
        self.retired_timer = asyncio.get_running_loop().call_later(
            RETIRED_MAX_S, self.close_retired)

    def close_retired(self, keep: bool = True) -> None:
        """The retired checker goes: its time is up, and the path it had is what
        `snapshot` shows until the new one chooses (`keep`); or the new one chose."""
        if self.retired_timer is not None:
            self.retired_timer.cancel()
            self.retired_timer = None
        if self.retired is not None:
            self.kept = _path_of(self.retired.snapshot()) if keep else None
            self.retired.close()
            self.retired = None

    def shown_path(self) -> dict[str, Any] | None:
        """The path WireGuard is on while the current checker has none: the retired
        checker's (live), else the one kept when it went."""
        if self.retired is not None:
            return _path_of(self.retired.snapshot())
        return self.kept

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None


class Negotiator:
    """All sessions of this agent run: routes dev-channel messages and posts ours."""

    def __init__(
        self,
        me: DeviceId,
        private_key: PrivateKey,
        post: Poster,
        make_checker: CheckerFactory,
        local_candidates: Callable[[], Awaitable[list[CandidateInfo]]],
        wg_port: int,
        *,
        offer_grace_s: float = OFFER_GRACE_S,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
        gathering_done: Callable[[], bool] = lambda: True,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.me = me
        self._private = private_key
        self._public = bytes(private_key.public_key)
        self._post = post
        self._make_checker = make_checker
        self._local_candidates = local_candidates
        self._wg_port = wg_port
        self._grace = offer_grace_s
        # Whether `local_candidates` gave everything (else the rest is trickled).
        self._gathering_done = gathering_done
        self._answer_timeout = answer_timeout_s
        self._recheck_s = recheck_s
        # The latest re-check: set once done, and when (loop time).
        self._rechecked = asyncio.Event()
        self._rechecked.set()
        self._rechecked_at = -math.inf
        # Set by the agent: a peer restarts, so re-check our candidates (STUN again).
        self.on_restart: Callable[[DeviceId], Awaitable[None]] | None = None
        # Set by the agent: a peer's agent said bye (it stopped; it may start again).
        self.on_bye: Callable[[DeviceId], None] | None = None
        # Set by the agent: the first message of a peer's new agent run (it restarted,
        # with or without a bye: killed, crashed); WireGuard's session with it is stale.
        self.on_new_run: Callable[[DeviceId], None] | None = None
        self.sender_session = new_sender_session()
        self.guard = ReplayGuard()
        self.sessions: dict[DeviceId, PeerSession] = {}
        self._pending: dict[DeviceId, list[tuple[float, SignalMessage]]] = {}
        # Lines about refused messages: a peer can send them without end.
        self._ignored = ignored_notes()
        self._tasks = Background(log, "negotiation step")
        self._spawn = self._tasks.spawn

    # -- peers ------------------------------------------------------------------

    def peer_key(self, peer: DeviceId, public_key_b64: str, they_joined_later: bool) -> None:
        """A peer's (new) announced key: start over with it."""
        key = PublicKey(base64.b64decode(public_key_b64))
        current = self.sessions.get(peer)
        if current is not None and bytes(current.public_key) == bytes(key):
            return
        self.forget(peer)
        session = PeerSession(peer, key, wins_glare=self._public > bytes(key))
        self.sessions[peer] = session
        if they_joined_later:
            session.timer = asyncio.get_running_loop().call_later(
                self._grace, lambda: self._spawn(self._offer_if_idle(session)))
        else:
            self._spawn(self.offer(session))
        for _, msg in self._pending.pop(peer, []):
            self._spawn(self.handle(msg))

    def forget(self, peer: DeviceId) -> None:
        session = self.sessions.pop(peer, None)
        if session is not None:
            session.cancel_timer()
            session.cancel_retry()
            session.replace_checker(None)
            session.state = "closed"

    def snapshot(self, peer: DeviceId) -> dict[str, Any]:
        session = self.sessions.get(peer)
        if session is None:
            return {"negotiation": "none"}
        data = session.checker.snapshot() if session.checker is not None else {}
        # Until the new checks choose (or fail), WireGuard is on the replaced path.
        if (data.get("path", "none") == "none" and data.get("state") != "failed"
                and (kept := session.shown_path()) is not None):
            data = {**data, **kept, "reason": f"{kept['reason']} (kept while renegotiating)"}
        # Once checks run, the checker's state (checking, connected, failed) says more.
        state = data.get("state", session.state) if session.state == "checking" else \
            session.state
        return {**data, "negotiation": state}

    # -- offers -------------------------------------------------------------------

    async def _offer_if_idle(self, session: PeerSession) -> None:
        if session.state == "idle":
            log.info("no offer from %s yet; offering", session.peer)
            await self.offer(session)

    async def offer(self, session: PeerSession, kind: str = "offer") -> None:
        """A new negotiation session with this peer (kind "restart" after a change)."""
        session.cancel_timer()
        before = session.session_id
        candidates = await self._local_candidates()
        if session.session_id != before or self.sessions.get(session.peer) is not session:
            # The peer's own offer was answered while we gathered: that session stands
            # (replacing it now would throw away checks already under way).
            log.debug("not offering to %s: its offer came first", session.peer)
            return
        ufrag, pwd = new_credentials()
        tie_breaker = secrets.randbits(64)
        session.cancel_timer()  # the resends of an offer left while we gathered
        sid = session.session_id = new_session_id()
        session.answer = None
        session.replace_checker(self._make_checker(CheckerSpec(
            session.peer, ufrag, pwd, False, tie_breaker, self._outcome_hook(session, sid))))
        session.state = "offering"
        session.offers_sent = 0
        complete = self._gathering_done()
        session.told(candidates, complete)
        body = Offer(ufrag, pwd, tie_breaker, candidates, self._wg_port, complete)
        await self._send_offer(session, kind, sid, body)

    async def _send_offer(self, session: PeerSession, kind: str, sid: bytes,
                          body: Offer) -> None:
        # Only while this very offer is out: a resend timer of an older one may fire
        # (it was set while a newer offer was being gathered, or could not be cancelled
        # in time), and must not send the old credentials under the new session id.
        if (session.state != "offering" or session.session_id != sid
                or self.sessions.get(session.peer) is not session):
            return
        if session.offers_sent >= MAX_OFFERS:
            session.state = "unanswered"
            log.info("%s never answered %d offers: keeping its announced endpoint "
                     "(an agent without negotiation?)", session.peer, MAX_OFFERS)
            return
        session.offers_sent += 1
        await self._send(session, kind, sid, body.to_wire())
        if session.state != "offering" or session.session_id != sid:
            return  # answered, or replaced, while the post went out
        session.cancel_timer()
        session.timer = asyncio.get_running_loop().call_later(
            self._answer_timeout * session.offers_sent,
            lambda: self._spawn(self._send_offer(session, kind, sid, body)))

    async def trickle(self, candidates: list[CandidateInfo], complete: bool) -> None:
        """Our candidates after a gathering step: those a peer's session lacks go to it
        (a "candidates" message), `complete` once gathering is over."""
        for session in list(self.sessions.values()):
            if session.state not in ("offering", "checking") or session.session_id is None:
                continue
            new = [c for c in candidates if (c.type, c.ip, c.port) not in session.sent]
            if not new and (session.sent_complete or not complete):
                continue
            session.sent |= {(c.type, c.ip, c.port) for c in new}
            session.sent_complete = complete
            if session.answer is not None:  # a resent answer carries them too
                session.answer = Answer(session.answer.ufrag, session.answer.pwd,
                                        [*session.answer.candidates, *new], complete)
            log.debug("trickling %d candidates to %s%s", len(new), session.peer,
                      " (end of candidates)" if complete else "")
            await self._send(session, "candidates", session.session_id,
                             Trickle(new, complete).to_wire())

    async def restart(self, peer: DeviceId) -> bool:
        """Renegotiate with one peer whose path went quiet (unless an offer to it is
        already out); True when a restart was sent."""
        session = self.sessions.get(peer)
        if session is None or session.state == "offering":
            return False
        await self.offer(session, kind="restart")
        return True

    async def restart_all(self) -> None:
        """Our candidates changed: renegotiate with everyone."""
        for session in list(self.sessions.values()):
            await self.offer(session, kind="restart")

    async def close(self) -> None:
        """Say bye to every peer (best effort) and stop."""
        byes = [self._send(s, "bye", s.session_id or new_session_id(), {})
                for s in self.sessions.values()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*byes, return_exceptions=True), 2.0)
        for peer in list(self.sessions):
            self.forget(peer)
        self._tasks.cancel()

    # -- incoming -----------------------------------------------------------------

    async def handle(self, chat: SignalMessage) -> None:
        """A dev-channel post from a device listed in peers.json."""
        sender = DeviceId(chat.sender_username, chat.sender_device)
        session = self.sessions.get(sender)
        if sender == self.me or chat.body is None:
            return
        if session is None:
            # Its announcement may still be on the way (another channel).
            self._hold(sender, chat)
            return
        # One message of a peer at a time: the listener's pushes and a re-read of the
        # channel's history arrive concurrently, and an offer's answer awaits gathering.
        async with session.lock:
            if self.sessions.get(sender) is not session:
                self._spawn(self.handle(chat))  # its key changed meanwhile: start over
                return
            try:
                message = open_body(chat.body, sender=str(sender),
                                    sender_public=session.public_key,
                                    my_private=self._private, me=str(self.me))
                if self.guard.check(message) and self.on_new_run is not None:
                    self.on_new_run(sender)
                await self._dispatch(session, message)
            except SenderKeyMismatch:
                self._hold(sender, chat)  # sealed with a key not announced (yet)
            except WireError as exc:
                log_ignored(chat, exc, self._ignored)

    def _hold(self, sender: DeviceId, chat: SignalMessage) -> None:
        if chat.body is not None and len(chat.body) > MAX_TEXT:
            # open_body refuses it anyway; held, a dev body can be 1,000,000 bytes.
            log.debug("not holding negotiation message %d from %s: %d characters, over %d",
                      chat.id, sender, len(chat.body), MAX_TEXT)
            return
        now = asyncio.get_running_loop().time()
        # Every sender's expired messages go, not only this one's: a peer that never
        # announces (or stopped being one) would keep its last PENDING_MAX for good.
        for other in list(self._pending):
            live = [(t, m) for t, m in self._pending[other] if now - t < PENDING_TTL_S]
            if live:
                self._pending[other] = live
            else:
                del self._pending[other]
        self._pending[sender] = [*self._pending.get(sender, []), (now, chat)][-PENDING_MAX:]
        log.debug("holding negotiation message %d from %s until its key is announced",
                  chat.id, sender)

    async def _dispatch(self, session: PeerSession, message: WireMessage) -> None:
        if message.type in ("offer", "restart"):
            await self._on_offer(session, message, Offer.from_wire(message.body))
        elif message.type == "answer":
            self._on_answer(session, message, Answer.from_wire(message.body))
        elif message.type == "candidates":
            self._on_trickle(session, message, Trickle.from_wire(message.body))
        elif message.type == "bye":
            session.notes.log(logging.INFO, "%s said bye", session.peer)
            session.cancel_timer()
            session.cancel_retry()  # its agent stopped: its next run offers or announces
            session.replace_checker(None)
            session.answer = None
            session.state = "idle"
            if self.on_bye is not None:
                self.on_bye(session.peer)
        else:
            log.debug("ignoring %s from %s", message.type, session.peer)

    async def _on_offer(self, session: PeerSession, message: WireMessage, offer: Offer) -> None:
        sid, peer = message.session_id, session.peer
        if sid == session.session_id and session.answer is not None:
            # Resent before our answer reached the peer: the same answer, whose
            # credentials the checks under way use.
            log.debug("%s of %s again: answering it again", message.type, peer)
            session.peer_latest = max(session.peer_latest, message.timestamp)
            await self._send(session, "answer", sid, session.answer.to_wire())
            return
        if message.timestamp < session.peer_latest:
            log.debug("%s from %s ignored: sent %.3fs before its newest message we took "
                      "(it gave this one up)", message.type, peer,
                      session.peer_latest - message.timestamp)
            return
        if session.glare_won():
            session.notes.log(logging.INFO, "glare with %s: our offer wins (higher key)", peer)
            return
        session.peer_latest = message.timestamp
        if message.type == "restart":
            await self._recheck(peer)
        candidates = await self._local_candidates()
        if self.sessions.get(peer) is not session:
            return
        if session.glare_won():
            # Our own offer went out while we re-checked or gathered (our candidates
            # changed: a restart to everyone), and it wins.
            session.notes.log(logging.INFO, "glare with %s: our offer wins (higher key)", peer)
            return
        if session.session_id is not None and session.session_id != sid:
            self.guard.supersede(str(peer), session.session_id)
        session.cancel_timer()
        ufrag, pwd = new_credentials()
        session.session_id = sid
        checker = self._make_checker(CheckerSpec(
            peer, ufrag, pwd, True, secrets.randbits(64), self._outcome_hook(session, sid)))
        session.replace_checker(checker)
        checker.set_remote(offer.ufrag, offer.pwd, list(offer.candidates), offer.complete)
        session.state = "checking"
        session.notes.log(logging.INFO, "%s from %s: %d candidates%s; answering", message.type,
                          peer, len(offer.candidates), "" if offer.complete else ", more to come")
        complete = self._gathering_done()
        session.told(candidates, complete)
        answer = session.answer = Answer(ufrag, pwd, candidates, complete)
        await self._send(session, "answer", sid, answer.to_wire())

    async def _recheck(self, peer: DeviceId) -> None:
        """Our NAT may have moved under the path too: the agent STUNs again before we
        answer. Bounded: what it finds later trickles to the peer, or renegotiates."""
        on_restart = self.on_restart
        if on_restart is None:
            return
        loop = asyncio.get_running_loop()
        if self._rechecked.is_set() and loop.time() - self._rechecked_at >= RECHECK_FRESH_S:
            done = self._rechecked = asyncio.Event()

            async def recheck() -> None:
                try:
                    await on_restart(peer)
                finally:
                    self._rechecked_at = loop.time()
                    done.set()

            self._spawn(recheck())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._rechecked.wait(), self._recheck_s)

    def _outcome_hook(self, session: PeerSession, sid: bytes) -> Callable[[bool], None]:
        return lambda ok: self._outcome(session, sid, ok)

    def _outcome(self, session: PeerSession, sid: bytes, ok: bool) -> None:
        """The checks of session `sid` found a path, or found none."""
        if self.sessions.get(session.peer) is not session or session.session_id != sid:
            return
        session.cancel_retry()
        if ok:
            session.retry_s = RETRY_MIN_S
            session.close_retired(keep=False)
            return
        delay, session.retry_s = session.retry_s, min(session.retry_s * 2, RETRY_MAX_S)
        # Usually a lost path, which the agent renegotiates at once; else the retry does.
        log.debug("no path to %s in this session: negotiating again in %.0fs unless "
                  "renegotiated before", session.peer, delay)
        session.retry = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._retry(session, sid)))

    async def _retry(self, session: PeerSession, sid: bytes) -> None:
        session.retry = None
        if (self.sessions.get(session.peer) is not session or session.session_id != sid
                or session.state == "offering"):
            return  # renegotiated meanwhile
        log.info("no path to %s in its session: negotiating again", session.peer)
        # Our candidates may be what failed (a NAT that moved): STUN again first; when
        # they changed, the agent renegotiates with everyone, this peer included.
        await self._recheck(session.peer)
        if session.session_id == sid and session.state != "offering":
            await self.offer(session, kind="restart")

    def _on_answer(self, session: PeerSession, message: WireMessage, answer: Answer) -> None:
        # Also after we stopped resending ("unanswered"): the offer's checker still waits.
        if (session.state not in ("offering", "unanswered")
                or message.session_id != session.session_id):
            log.debug("answer from %s for another session; ignored", session.peer)
            return
        session.cancel_timer()
        session.peer_latest = max(session.peer_latest, message.timestamp)
        assert session.checker is not None
        session.checker.set_remote(answer.ufrag, answer.pwd, list(answer.candidates),
                                   answer.complete)
        session.state = "checking"
        session.notes.log(logging.INFO, "answer from %s: %d candidates%s", session.peer,
                          len(answer.candidates), "" if answer.complete else ", more to come")

    def _on_trickle(self, session: PeerSession, message: WireMessage, trickle: Trickle) -> None:
        if message.session_id != session.session_id or session.checker is None:
            log.debug("candidates from %s for another session; ignored", session.peer)
            return
        session.checker.add_remote(list(trickle.candidates), trickle.complete)
        session.notes.log(logging.INFO, "%d more candidates from %s%s", len(trickle.candidates),
                          session.peer, " (the last)" if trickle.complete else "")

    # -- plumbing -----------------------------------------------------------------

    async def _send(self, session: PeerSession, kind: str, session_id: bytes,
                    body: dict[str, Any]) -> None:
        message = WireMessage.new(kind, self.me, session.peer, self.sender_session,
                                  session_id, body)
        await self._post(seal(message, self._private, session.public_key))

