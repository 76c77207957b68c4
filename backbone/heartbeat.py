"""Heartbeat bookkeeping for both ends.  Pure: no I/O; time comes in as ``now``."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the widest slot a server's heartbeat deadlines are rounded up to (:func:`timer_slot`)
MAX_TIMER_SLOT = 1.0


def timer_slot(interval: float) -> float:
    """How coarse the server's heartbeat deadlines for ``interval`` may be: 1/16 of the
    interval, at most :data:`MAX_TIMER_SLOT` (a timeout of 3 × 15 s is then judged at
    most 1 s late, about 2 %)."""
    return min(MAX_TIMER_SLOT, interval / 16)


def round_up(when: float, slot: float) -> float:
    """``when`` rounded up to a multiple of ``slot``.  A server holds one deadline per
    connection, and each one that falls due on its own wakes the event loop: at 10,000
    clients about 330 times a second, each wake-up a few tens of µs of kernel and loop
    work on top of the check.  Rounded up, all the deadlines in one slot fall due in
    one loop pass; a deadline is at most ``slot`` late (and, by the float rounding of
    the division, at most a few ulps early: the caller checks again when it fires)."""
    if slot <= 0:
        return when
    return math.ceil(when / slot) * slot


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
    #: pings go out on the nearest multiple of this many seconds of the wall clock, at
    #: most ``interval / 8`` (0: not aligned); see :meth:`next_ping_after`
    align: float = 0.0
    #: the wall clock minus the clock ``now`` comes from, which places the grid
    wall_offset: float = 0.0
    _sent: dict[int, float] | None = None

    def __post_init__(self) -> None:
        self.next_ping_at = self.next_ping_after(self.started_at)
        self._sent = {}

    def next_ping_after(self, now: float) -> float:
        """When the ping after one at ``now`` goes out: ``now + interval``, moved to the
        nearest point of the alignment grid.

        Clients whose wall clocks agree (NTP) then ping in the same instants, so a server
        with thousands of them reads their pings in bunches, one wake-up and warm caches
        for many, instead of one wake-up each (measured with 2,000 clients and a 0.1 s
        grid: the idle server's CPU about halved, see docs/benchmarks.md).  The interval
        between two pings stays ``interval`` once the phase is set (the first may be up to
        half a grid step shorter or longer); clients whose clocks disagree just ping at
        their own phase."""
        target = now + self.interval
        slot = min(self.align, self.interval / 8)
        if slot <= 0:
            return target
        offset = self.wall_offset
        return round((target + offset) / slot) * slot - offset

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
        self.next_ping_at = self.next_ping_after(now)
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

    def dead_at(self) -> float:
        """When the server is declared dead if no pong comes: ``interval × misses`` after
        the last sign of life, and not before the oldest ping still unanswered went out
        ``interval × (misses − 1)`` earlier, at least one interval (with pings every
        interval and misses ≥ 2, the same moment).

        The second condition is for a client whose own event loop stalled (a busy
        process, a starved CPU): it sent no pings, so the silence says nothing about the
        server.  Such a client pings first and blames the server only for pings it did
        send.  (Seen in a 10,000-client benchmark: load generators that fell seconds
        behind declared a live server dead for 2,000 clients at once.)"""
        if not self._sent:
            return math.inf  # nothing unanswered: the next ping is due first
        silent = self.silent_since() + self.interval * self.misses
        # at least one interval for a ping to be answered (with misses = 1 a ping sent
        # when the verdict is due would otherwise get no time at all)
        grace = self.interval * max(1, self.misses - 1)
        return max(silent, min(self._sent.values()) + grace)

    def server_dead(self, now: float) -> bool:
        return now >= self.dead_at()

    def deadline(self) -> float:
        """The next moment something must happen: a ping, or the dead-server verdict."""
        return min(self.next_ping_at, self.dead_at())
