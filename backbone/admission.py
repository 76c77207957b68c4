"""Admission control: a token bucket for new sessions, applied at a new connection's first
packet, before any TLS work.  Pure: time comes in as ``now``."""

from __future__ import annotations

import math


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

    __slots__ = ("behind_after", "bucket", "in_flight", "max_in_flight", "retry_from")

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
