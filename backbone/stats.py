"""Live figures without any plugin (SC-010): rates and ack latency.  Pure: time comes in."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stats:
    connections: int
    messages_out: int
    messages_in: int
    msgs_out_per_s: float
    msgs_in_per_s: float
    pending_acks: int
    acks: int
    ack_timeouts: int
    ack_latency_avg: float | None
    ack_latency_p99: float | None
    rejected: int
    stateless_resets: int = 0  # server: stateless resets sent (packets of unknown connections)


class Figures:
    """Counters the data path bumps, plus what ``stats()`` derives from them."""

    __slots__ = (
        "_latencies",
        "_samples",
        "ack_timeouts",
        "acks",
        "messages_in",
        "messages_out",
        "rejected",
        "stateless_resets",
        "window",
    )

    def __init__(self, window: float = 10.0, latency_samples: int = 10_000) -> None:
        self.messages_out = 0
        self.messages_in = 0
        self.acks = 0
        self.ack_timeouts = 0
        self.rejected = 0
        self.stateless_resets = 0
        self.window = window
        self._latencies: deque[float] = deque(maxlen=latency_samples)
        self._samples: deque[tuple[float, int, int]] = deque()

    def ack_latency(self, seconds: float) -> None:
        self.acks += 1
        self._latencies.append(seconds)

    def sample(self, now: float) -> None:
        """Remember the totals at ``now`` (called about once a second)."""
        self._samples.append((now, self.messages_out, self.messages_in))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        if not self._samples:
            return 0.0, 0.0
        t0, out0, in0 = self._samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (self.messages_out - out0) / dt, (self.messages_in - in0) / dt

    def latency(self) -> tuple[float | None, float | None]:
        lat = self._latencies
        if not lat:
            return None, None
        ordered = sorted(lat)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return sum(ordered) / len(ordered), p99

    def snapshot(self, now: float, connections: int, pending: int) -> Stats:
        out_rate, in_rate = self.rates(now)
        avg, p99 = self.latency()
        return Stats(
            connections=connections,
            messages_out=self.messages_out,
            messages_in=self.messages_in,
            msgs_out_per_s=out_rate,
            msgs_in_per_s=in_rate,
            pending_acks=pending,
            acks=self.acks,
            ack_timeouts=self.ack_timeouts,
            ack_latency_avg=avg,
            ack_latency_p99=p99,
            rejected=self.rejected,
            stateless_resets=self.stateless_resets,
        )
