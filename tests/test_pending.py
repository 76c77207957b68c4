import random

import pytest

from backbone.errors import TooManyPending
from backbone.pending import PendingTable


def test_entry_resolves_once_and_is_removed():
    t = PendingTable[str](10, 100)
    t.add("a", b"1" * 16, timeout=5.0, now=0.0, token="x")
    assert len(t) == 1
    e = t.resolve("a", b"1" * 16)
    assert e is not None and e.token == "x"
    assert t.resolve("a", b"1" * 16) is None
    assert len(t) == 0 and t.count("a") == 0


def test_expiry_is_exact_at_the_deadline():
    t = PendingTable[int](10, 100)
    t.add("a", b"1" * 16, timeout=5.0, now=10.0, token=1)
    t.add("a", b"2" * 16, timeout=7.0, now=10.0, token=2)
    assert t.next_deadline() == 15.0
    assert t.expire(14.999) == []
    assert [e.token for e in t.expire(15.0)] == [1]
    assert t.next_deadline() == 17.0
    assert t.late("a", b"1" * 16) is not None
    assert t.late("a", b"2" * 16) is None


def test_bounds_per_peer_and_total():
    t = PendingTable[int](2, 3)
    t.add("a", b"1" * 16, 1, 0, 0)
    t.add("a", b"2" * 16, 1, 0, 0)
    with pytest.raises(TooManyPending, match="per-peer"):
        t.add("a", b"3" * 16, 1, 0, 0)
    t.add("b", b"1" * 16, 1, 0, 0)
    with pytest.raises(TooManyPending, match="total"):
        t.add("c", b"1" * 16, 1, 0, 0)
    assert len(t) == 3


def test_same_msg_id_for_many_peers_broadcast():
    t = PendingTable[str](10, 100)
    for peer in "abc":
        t.add(peer, b"m" * 16, 1.0, 0.0, peer)
    assert t.resolve("b", b"m" * 16).token == "b"
    assert sorted(e.token for e in t.expire(1.0)) == ["a", "c"]


def test_drop_peer_fails_only_that_peer():
    t = PendingTable[int](10, 100)
    t.add("a", b"1" * 16, 1, 0, 1)
    t.add("b", b"1" * 16, 1, 0, 2)
    assert [e.token for e in t.drop_peer("a")] == [1]
    assert len(t) == 1
    assert t.expire(100.0)[0].token == 2


def test_abandoned_entry_makes_a_late_result_late_not_unknown():
    t = PendingTable[int](10, 100)
    t.add("a", b"1" * 16, 1, 0, 1)
    assert t.abandon("a", b"1" * 16) is not None
    assert len(t) == 0
    assert t.late("a", b"1" * 16) is not None


def test_table_is_empty_after_10000_mixed_outcomes():
    rng = random.Random(7)
    t = PendingTable[int](100_000, 100_000)
    now = 0.0
    outcomes = {"result": 0, "timeout": 0, "gone": 0, "abandon": 0}
    resolved = set()
    for i in range(10_000):
        peer = f"p{i % 50}"
        mid = i.to_bytes(16, "big")
        t.add(peer, mid, timeout=rng.uniform(0.5, 5.0), now=now, token=i)
        now += 0.001
        r = rng.random()
        if r < 0.4:
            assert t.resolve(peer, mid).token == i
            outcomes["result"] += 1
            resolved.add(i)
        elif r < 0.5:
            assert t.abandon(peer, mid).token == i
            outcomes["abandon"] += 1
            resolved.add(i)
        if i % 1000 == 999:
            for e in t.expire(now):
                assert e.token not in resolved
                resolved.add(e.token)
                outcomes["timeout"] += 1
        if i % 2500 == 2499:
            for e in t.drop_peer(f"p{rng.randrange(50)}"):
                assert e.token not in resolved
                resolved.add(e.token)
                outcomes["gone"] += 1
    for e in t.expire(now + 10.0):
        assert e.token not in resolved
        resolved.add(e.token)
        outcomes["timeout"] += 1
    assert len(t) == 0
    assert t.next_deadline() is None
    assert len(resolved) == 10_000
    assert all(v > 0 for v in outcomes.values()), outcomes
    assert t.snapshot()["heap"] == 0


def test_a_late_result_still_knows_its_message_order():
    t = PendingTable[int](10, 100)
    t.add("a", b"1" * 16, timeout=1.0, now=0.0, token=1, order=7)
    t.add("a", b"2" * 16, timeout=9.0, now=0.0, token=2, order=8)
    assert t.late("a", b"1" * 16) is None  # still pending, not late
    t.expire(1.0)
    assert t.late("a", b"1" * 16) == 7
    assert t.abandon("a", b"2" * 16) is not None
    assert t.late("a", b"2" * 16) == 8
    assert t.late("a", b"3" * 16) is None and t.late("b", b"1" * 16) is None


@pytest.mark.parametrize("timeout", [float("nan"), 0.0, -1.0, float("inf")])
def test_a_deadline_must_be_a_time_to_come(timeout: float):
    t = PendingTable[int](10, 100)
    with pytest.raises(ValueError, match="timeout"):
        t.add("a", b"1" * 16, timeout=timeout, now=0.0, token=1)
    assert len(t) == 0 and t.next_deadline() is None
