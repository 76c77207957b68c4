"""Heartbeat bookkeeping for both ends.  Pure: no I/O; time comes in as ``now``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class HeartbeatMonitor:
    """Server side: when did this client last ping, and when is it declared dead?

    A client is evicted once ``interval × misses`` seconds pass with no ping
    (15 s × 3 = 45 s by default).

    Unless the server itself was behind (:meth:`evict_at`): then the silence may be the
    server's own fault — the pings may be waiting unread in its socket, or have been
    dropped there — and the eviction is held, at most one more timeout.
    """

    interval: float
    misses: int
    last_heartbeat_at: float
    count: int = 0
    #: pings allowed within one interval before it counts as a flood
    flood_limit: int = 32
    _window_start: float = 0.0
    _window_count: int = 0

    def flooding(self, now: float) -> bool:
        """Count a ping; True once more than ``flood_limit`` arrived within one interval
        (a client pings once per interval)."""
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._window_count = 0
        self._window_count += 1
        return self._window_count > self.flood_limit

    @property
    def timeout(self) -> float:
        return self.interval * self.misses

    def deadline(self) -> float:
        return self.last_heartbeat_at + self.timeout

    def record(self, now: float) -> None:
        self.last_heartbeat_at = now
        self.count += 1

    def is_expired(self, now: float) -> bool:
        return now >= self.deadline()

    def evict_at(self, behind_at: float) -> float:
        """When to evict, given the last time the server was behind its input: a full
        timeout after the last ping or after ``behind_at``, whichever is later, but never
        later than two timeouts after the last ping (a dead client is still evicted while
        the server stays behind)."""
        silent_since = max(self.last_heartbeat_at, behind_at)
        return min(silent_since + self.timeout, self.last_heartbeat_at + 2 * self.timeout)

    def missed(self, now: float) -> int:
        """Whole intervals that passed without a ping."""
        return max(0, int((now - self.last_heartbeat_at) // self.interval))


@dataclass(slots=True)
class HeartbeatScheduler:
    """Client side: when to ping next, and whether the server stopped answering.

    Pings go out every ``interval``.  The server is declared dead when no Pong came
    for ``interval × misses`` seconds (aioquic itself never notices a server that
    restarted, so this is the client's only reliable signal).
    """

    interval: float
    misses: int
    started_at: float
    next_ping_at: float = 0.0
    last_pong_at: float | None = None
    nonce: int = 0
    rtt: float | None = None
    _sent: dict[int, float] | None = None

    def __post_init__(self) -> None:
        self.next_ping_at = self.started_at + self.interval
        self._sent = {}

    def ping_due(self, now: float) -> bool:
        return now >= self.next_ping_at

    def ping_sent(self, now: float) -> int:
        """Record a ping going out; returns its nonce."""
        assert self._sent is not None
        self.nonce += 1
        self._sent[self.nonce] = now
        # keep at most ``misses + 1`` outstanding pings
        if len(self._sent) > self.misses + 1:
            del self._sent[min(self._sent)]
        self.next_ping_at = now + self.interval
        return self.nonce

    def pong_received(self, nonce: int, now: float) -> float | None:
        """Record a pong; returns the round-trip time, or None for an unknown nonce."""
        assert self._sent is not None
        sent = self._sent.pop(nonce, None)
        if sent is None:
            return None
        # older pings are answered implicitly by a newer pong
        for n in [n for n in self._sent if n < nonce]:
            del self._sent[n]
        self.last_pong_at = now
        self.rtt = now - sent
        return self.rtt

    def silent_since(self) -> float:
        return self.last_pong_at if self.last_pong_at is not None else self.started_at

    def server_dead(self, now: float) -> bool:
        return now - self.silent_since() >= self.interval * self.misses

    def deadline(self) -> float:
        """The next moment something must happen: a ping, or the dead-server verdict."""
        return min(self.next_ping_at, self.silent_since() + self.interval * self.misses)
