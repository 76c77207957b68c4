"""Admission control: a token bucket for new sessions, applied at a new connection's first
packet, before any TLS work.  Pure: time comes in as ``now``."""

from __future__ import annotations

import math
import re


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst``.
    A ``rate`` of 0 means unlimited."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def try_take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate


class HandshakeGate:
    """Decides on a new connection from its first packet, before any TLS work is done.

    :meth:`check` returns None when the connection is admitted, else the reason:

    * ``server_behind`` — that packet waited longer than ``behind_after`` seconds in the
      server's socket: the server is not keeping up with the clients it has, and a
      handshake now would push it further behind (no token is taken);
    * ``retry`` — ``retry_above`` of ``max_in_flight`` (half) or more are taken and the
      packet carries no token: it is answered with a QUIC Retry, and only a client that
      receives it (a real one, at the address the packet claims) comes back, with a
      token, to take a place.  Spoofed Initials then cannot hold the places (no token is taken);
    * ``handshakes_in_flight`` — ``max_in_flight`` connections are already between their
      first packet and their HELLO: new ones wait until some of those finish (no token
      is taken);
    * ``overloaded`` — no token in ``bucket``: the session budget is spent.

    The in-flight limit makes admission follow how fast handshakes actually complete.
    The token bucket alone admits at a fixed rate; when the handshakes are slower than
    that — slow clients, a slow network, or the server itself short of CPU — admitted
    handshakes pile up, each gets a smaller share of the CPU, and past the clients'
    connect timeout they all fail together, their work wasted (a 10,000-client restart
    storm on one 2-CPU machine: 26,712 connect timeouts, a third back in 150 s).  With
    at most ``max_in_flight`` open, each finishes in about the time it needs, and the
    rest are refused at once, for the cost of one packet, and back off.
    """

    __slots__ = (
        "_mark_at",
        "_mark_count",
        "behind_after",
        "bucket",
        "finish_rate",
        "finished_total",
        "in_flight",
        "max_in_flight",
        "retry_from",
        "returns",
    )

    def __init__(
        self,
        bucket: TokenBucket,
        behind_after: float,
        max_in_flight: int = 0,
        retry_above: float = 0.5,
    ) -> None:
        self.bucket = bucket
        self.behind_after = behind_after
        #: 0: no limit
        self.max_in_flight = max_in_flight
        #: from this many in flight on, a packet without a token gets a Retry (None: never)
        self.retry_from = None if retry_above >= 1 else math.ceil(max_in_flight * retry_above)
        #: connections admitted whose handshake and HELLO have not finished yet
        self.in_flight = 0
        #: admitted connections that finished (session opened, or ended before it)
        self.finished_total = 0
        #: finished per second over the last measured period (None: not measured lately)
        self.finish_rate: float | None = None
        self._mark_at: float | None = None
        self._mark_count = 0
        #: when each refused client is told to come back
        self.returns = ReturnSchedule()

    def check(self, now: float, waited: float, validated: bool = False) -> str | None:
        """``validated``: the packet carries a token (it answers our Retry)."""
        if waited > self.behind_after:
            return "server_behind"
        limit = self.max_in_flight
        if limit:
            retry_from = self.retry_from
            if not validated and retry_from is not None and self.in_flight >= retry_from:
                return "retry"
            if self.in_flight >= limit:
                return "handshakes_in_flight"
        if not self.bucket.try_take(now):
            return "overloaded"
        return None

    def opened(self) -> None:
        """An admitted connection was created."""
        self.in_flight += 1

    def finished(self) -> None:
        """An admitted connection got its session, or ended before it did."""
        self.in_flight -= 1
        self.finished_total += 1

    def admit_rate(self, now: float, reason: str) -> float:
        """New sessions per second this server can take now, as seen by a refusal for
        ``reason``: the session budget's rate when that is spent (``overloaded``); when
        the places are all taken (``handshakes_in_flight``), how fast handshakes have been
        finishing lately (measured over periods of at least a second, forgotten after
        :data:`RATE_MEMORY` seconds without a refusal), at most the budget's rate."""
        mark = self._mark_at
        if mark is None or now - mark > RATE_MEMORY:
            self._mark_at, self._mark_count, self.finish_rate = now, self.finished_total, None
        elif now - mark >= 1.0:
            self.finish_rate = (self.finished_total - self._mark_count) / (now - mark)
            self._mark_at, self._mark_count = now, self.finished_total
        budget = self.bucket.rate if self.bucket.rate > 0 else math.inf
        if reason == "handshakes_in_flight" and self.finish_rate is not None:
            return max(MIN_ADMIT_RATE, min(budget, self.finish_rate))
        if budget == math.inf:  # no budget: guess a place per handshake a second
            return float(max(self.max_in_flight, 1))
        return budget

    def come_back_in(self, now: float, reason: str) -> float:
        """Seconds after which the client refused now for ``reason`` should try again."""
        return self.returns.next_slot(now, self.admit_rate(now, reason))


#: the finish rate measured while refusing is forgotten after this many seconds without a
#: refusal (it says how fast the server admitted during that overload, not the next one)
RATE_MEMORY = 5.0
#: the lowest admission rate a refusal schedule assumes, sessions per second
MIN_ADMIT_RATE = 1.0


#: the earliest a refused client is told to come back, seconds (the first slot); a client
#: takes no shorter hint (the refusal is not authenticated)
MIN_RETRY_AFTER = 0.5


class ReturnSchedule:
    """When refused clients should come back: each refusal gets the next free slot, the
    slots ``1 / rate`` apart, the first ``first`` seconds from now and none further than
    ``longest`` (a refusal beyond that gets ``longest`` and takes no slot).

    Refused clients then return at about the rate the server admits them.  With their
    own exponential backoff alone, thousands refused at once come back in waves: each
    wave larger than what the server can take (refused again, for the cost of a new
    connection each on the client), and between waves the server idles while clients
    wait out delays that have doubled (a restart storm of 10,000 clients on one 2-CPU
    machine: 28,352 refusals, the server 57 % busy).
    """

    __slots__ = ("_next", "first", "longest")

    def __init__(self, first: float = MIN_RETRY_AFTER, longest: float = 60.0) -> None:
        self.first = first
        self.longest = longest
        self._next = -math.inf

    def next_slot(self, now: float, rate: float) -> float:
        at = max(self._next, now + self.first)
        if at - now >= self.longest:
            return self.longest
        self._next = at + 1.0 / rate
        return at - now


class RecentRefusals:
    """The destination connection IDs of the last ``size`` refused Initials, each with the
    reason phrase it was answered with.

    A client resends its Initial when no answer came within its loss timer (a few hundred
    milliseconds at first), so a server that is behind its socket finds two copies of a
    refused Initial there.  The first is refused; if a place has come free by the time the
    second is read, the gate would admit it — a connection for an attempt its client has
    already given up (its socket is closed), holding a place until ``hello_timeout``.  A
    copy whose ID is remembered here is refused again with the same answer instead.  Its
    client chose the ID at random for that attempt alone, so nothing else carries it.
    """

    __slots__ = ("_ids", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._ids: dict[bytes, str] = {}

    def remember(self, cid: bytes, phrase: str) -> None:
        ids = self._ids
        ids[cid] = phrase
        if len(ids) > self.size:
            del ids[next(iter(ids))]  # the oldest

    def get(self, cid: bytes) -> str | None:
        return self._ids.get(cid)

    def __len__(self) -> int:
        return len(self._ids)


_HINT = re.compile(r"\bretry_after=([0-9]+(?:\.[0-9]+)?) window=([0-9]+(?:\.[0-9]+)?)")


def refusal_phrase(reason: str, retry_after: float, window: float) -> str:
    """The reason phrase of a refusal's CONNECTION_CLOSE, with when to come back and how
    much later at most, at random (the server's ``overload_window``):
    ``"overloaded retry_after=2.350 window=1.000"`` (protocol.md §14)."""
    return f"{reason} retry_after={retry_after:.3f} window={window:.3f}"


def parse_refusal_hint(phrase: str) -> tuple[float, float] | None:
    """``(retry_after, window)`` from a refusal's reason phrase, or None without a hint."""
    m = _HINT.search(phrase)
    if m is None:
        return None
    return float(m.group(1)), float(m.group(2))
