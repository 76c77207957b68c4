import itertools
import random

import pytest

from backbone.heartbeat import (
    MAX_TIMER_SLOT,
    HeartbeatMonitor,
    HeartbeatScheduler,
    round_up,
    timer_slot,
)


def test_server_evicts_after_exactly_45_seconds_by_default():
    m = HeartbeatMonitor(interval=15.0, misses=3, last_heartbeat_at=1000.0)
    assert m.timeout == 45.0
    assert not m.is_expired(1044.999)
    assert m.is_expired(1045.0)
    assert m.missed(1044.999) == 2
    assert m.missed(1045.0) == 3


def test_each_ping_pushes_the_deadline():
    m = HeartbeatMonitor(interval=15.0, misses=3, last_heartbeat_at=0.0)
    for t in (15.0, 30.0, 44.0):
        m.record(t)
    assert m.deadline() == 89.0
    assert not m.is_expired(88.9)
    assert m.count == 3


def test_client_pings_every_interval_and_measures_rtt():
    s = HeartbeatScheduler(interval=15.0, misses=3, started_at=0.0)
    assert not s.ping_due(14.9)
    assert s.ping_due(15.0)
    n = s.ping_sent(15.0)
    assert s.next_ping_at == 30.0
    assert s.pong_received(n, 15.002) == pytest.approx(0.002)
    assert s.pong_received(n, 15.003) is None  # a nonce is answered once


def test_client_declares_server_dead_after_interval_times_misses_without_pong():
    s = HeartbeatScheduler(interval=15.0, misses=3, started_at=0.0)
    t = 0.0
    while t < 44.0:
        t += 15.0
        if s.ping_due(t):
            s.ping_sent(t)
    assert not s.server_dead(44.999)
    assert s.server_dead(45.0)


def test_a_client_whose_loop_stalled_pings_before_it_blames_the_server():
    s = HeartbeatScheduler(interval=15.0, misses=3, started_at=0.0)
    n = s.ping_sent(15.0)
    s.pong_received(n, 15.001)
    # the client's own loop stalls from 15 s to 80 s: no ping went out, so the 65 s of
    # silence say nothing about the server
    assert not s.server_dead(80.0)
    assert s.ping_due(80.0)
    s.ping_sent(80.0)
    # with that ping unanswered, the verdict is due interval × (misses - 1) after it
    assert s.dead_at() == 80.0 + 30.0
    assert s.deadline() == 95.0  # the next ping comes first
    s.ping_sent(95.0)
    assert not s.server_dead(109.999)
    assert s.server_dead(110.0)
    # answered in time instead, it is alive
    t = HeartbeatScheduler(interval=15.0, misses=3, started_at=0.0)
    t.pong_received(t.ping_sent(15.0), 15.001)
    t.pong_received(t.ping_sent(80.0), 80.002)
    assert not t.server_dead(110.0)
    assert t.deadline() == 95.0


def test_with_one_miss_allowed_a_ping_still_gets_an_interval_to_be_answered():
    s = HeartbeatScheduler(interval=10.0, misses=1, started_at=0.0)
    s.pong_received(s.ping_sent(0.0), 0.001)
    # the ping due at 10 s goes out when the silence reaches interval × misses
    assert not s.server_dead(10.0)
    s.ping_sent(10.0)
    assert s.dead_at() == 20.0
    assert not s.server_dead(10.0005)
    s.pong_received(s.nonce, 10.002)  # answered in 2 ms: alive
    assert not s.server_dead(19.9)


def test_a_late_pong_for_an_older_ping_still_counts_and_clears_older_ones():
    s = HeartbeatScheduler(interval=1.0, misses=3, started_at=0.0)
    a = s.ping_sent(1.0)
    b = s.ping_sent(2.0)
    assert s.pong_received(b, 2.5) == 0.5
    assert s.pong_received(a, 2.6) is None
    assert s.silent_since() == 2.5
    assert s.deadline() == min(3.0, 5.5)


def test_outstanding_pings_are_bounded():
    s = HeartbeatScheduler(interval=1.0, misses=3, started_at=0.0)
    for i in range(100):
        s.ping_sent(float(i))
    assert len(s._sent) <= 4


def test_ping_flood_is_detected_per_interval():
    m = HeartbeatMonitor(interval=1.0, misses=3, last_heartbeat_at=0.0, flood_limit=3)
    assert [m.flooding(0.1) for _ in range(4)] == [False, False, False, True]
    assert not m.flooding(1.2)  # a new interval starts over


def test_eviction_is_exact_when_the_server_was_never_behind():
    m = HeartbeatMonitor(interval=1.0, misses=3, last_heartbeat_at=10.0)
    assert m.evict_at(behind_at=float("-inf")) == 13.0
    assert m.evict_at(behind_at=9.0) == 13.0  # behind before the last ping: no excuse


def test_eviction_is_held_while_the_server_is_behind():
    m = HeartbeatMonitor(interval=1.0, misses=3, last_heartbeat_at=10.0)
    # the server was behind at 12.5: the client's pings may be waiting in its socket,
    # so the silence is counted from then
    assert m.evict_at(behind_at=12.5) == 15.5
    # a ping that finally gets read ends the hold
    m.record(14.0)
    assert m.evict_at(behind_at=12.5) == 17.0


def test_a_dead_client_is_evicted_after_two_timeouts_even_if_the_server_stays_behind():
    m = HeartbeatMonitor(interval=1.0, misses=3, last_heartbeat_at=10.0)
    for behind_at in (13.0, 14.5, 15.99, 100.0):  # the server is behind at every check
        assert m.evict_at(behind_at) == min(behind_at + 3.0, 16.0)


# --- coarse server deadlines -------------------------------------------------------------


def test_server_deadlines_are_rounded_up_at_most_one_slot_late():
    slot = timer_slot(15.0)
    assert slot == 15.0 / 16
    assert timer_slot(600.0) == MAX_TIMER_SLOT
    assert timer_slot(0.2) == pytest.approx(0.0125)
    for when in (0.0, 0.3, 44.99, 45.0, 1045.123456, 98765.4321):
        r = round_up(when, slot)
        assert when <= r < when + slot + 1e-9
    # deadlines in one slot fall due together: one event-loop wake-up for all of them
    dues = {round_up(1000.001 + i * 0.0005, 0.5) for i in range(900)}
    assert len(dues) == 1
    assert round_up(12.34, 0) == 12.34


# --- aligned client pings ------------------------------------------------------------------


def _on_grid(t: float, offset: float, slot: float) -> bool:
    k = (t + offset) / slot
    return abs(k - round(k)) < 1e-6


def test_aligned_pings_land_on_the_wall_clock_grid_and_keep_the_interval():
    offset = 1_764_300_000.0371  # wall clock minus loop clock
    s = HeartbeatScheduler(15.0, 3, started_at=3.217, align=0.1, wall_offset=offset)
    first = s.next_ping_at
    assert _on_grid(first, offset, 0.1)
    assert abs(first - (3.217 + 15.0)) <= 0.05 + 1e-9  # nearest grid point
    dues = [first]
    for late in (0.0013, 0.004, 0.0, 0.0021, 0.0009):  # the timer fires a little late
        now = dues[-1] + late
        assert s.ping_due(now)
        s.ping_sent(now)
        dues.append(s.next_ping_at)
        assert _on_grid(s.next_ping_at, offset, 0.1)
    # the phase holds: each ping is due exactly 15 s after the one before, however late
    # the timer fired for it
    assert [b - a for a, b in itertools.pairwise(dues)] == pytest.approx([15.0] * 5, abs=1e-6)


def test_many_clients_ping_in_at_most_one_instant_per_grid_step():
    rng = random.Random(7)
    offset = 1_764_300_000.5

    def ping_instants(align: float) -> set[float]:
        instants = set()
        for _ in range(1000):  # clients that connected at random moments over 15 s
            s = HeartbeatScheduler(
                15.0, 3, started_at=rng.uniform(0, 15), align=align, wall_offset=offset
            )
            for _ in range(3):
                now = s.next_ping_at
                s.ping_sent(now)
                if 30.0 <= now < 45.0:  # one interval, [30 s, 45 s), long after they all started
                    instants.add(round(now, 6))
                    assert align == 0 or _on_grid(now, offset, align)
        return instants

    # 1,000 clients, one ping each per 15 s: 1,000 wake-ups for the server unaligned,
    # at most 150 aligned on a 0.1 s grid (the grid points in 15 s)
    assert len(ping_instants(0.0)) > 900
    assert len(ping_instants(0.1)) <= 151


def test_alignment_is_at_most_an_eighth_of_the_interval_and_can_be_off():
    s = HeartbeatScheduler(0.4, 3, started_at=0.0, align=1.0, wall_offset=0.013)
    # a 1 s grid would round a 0.4 s interval to 0 or 1 s; the grid is 0.05 s instead
    for _ in range(20):
        now = s.next_ping_at
        s.ping_sent(now)
        assert s.next_ping_at - now == pytest.approx(0.4, abs=0.025 + 1e-9)
        assert _on_grid(s.next_ping_at, 0.013, 0.05)
    off = HeartbeatScheduler(15.0, 3, started_at=3.217, align=0.0, wall_offset=0.3)
    assert off.next_ping_at == 3.217 + 15.0
    off.ping_sent(18.2201)
    assert off.next_ping_at == 18.2201 + 15.0
