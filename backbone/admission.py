"""Admission control: a token bucket for new sessions, applied at a new connection's first
packet, before any TLS work.  Pure: time comes in as ``now``."""

from __future__ import annotations


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
    * ``overloaded`` — no token in ``bucket``: the session budget is spent.
    """

    __slots__ = ("behind_after", "bucket")

    def __init__(self, bucket: TokenBucket, behind_after: float) -> None:
        self.bucket = bucket
        self.behind_after = behind_after

    def check(self, now: float, waited: float) -> str | None:
        if waited > self.behind_after:
            return "server_behind"
        if not self.bucket.try_take(now):
            return "overloaded"
        return None
