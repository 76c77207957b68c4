import pytest

from backbone.heartbeat import HeartbeatMonitor, HeartbeatScheduler


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
