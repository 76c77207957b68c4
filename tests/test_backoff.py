import pytest

from backbone.backoff import Backoff


def test_default_sequence_without_jitter_is_1_2_4_8_capped_at_60():
    b = Backoff(jitter=0.0)
    assert [b.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_jitter_randomizes_downward_within_bounds_also_at_the_cap():
    # rng at its extremes gives the bounds exactly
    lo = Backoff(jitter=0.2, rng=lambda: 1.0)
    hi = Backoff(jitter=0.2, rng=lambda: 0.0)
    lows = [lo.next_delay() for _ in range(8)]
    highs = [hi.next_delay() for _ in range(8)]
    assert highs == [1, 2, 4, 8, 16, 32, 60, 60]
    assert lows == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 48.0, 48.0])


def test_jittered_delays_differ_between_clients_at_the_cap():
    import random

    delays = set()
    for seed in range(20):
        b = Backoff(rng=random.Random(seed).random)
        for _ in range(10):
            d = b.next_delay()
        assert 48.0 <= d <= 60.0
        delays.add(round(d, 6))
    assert len(delays) == 20  # no lockstep at the cap


def test_reset_starts_over():
    b = Backoff(jitter=0.0)
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == 1.0


def test_no_overflow_after_very_many_attempts():
    b = Backoff(jitter=0.0)
    b.attempt = 10_000
    assert b.next_delay() == 60.0


@pytest.mark.parametrize(
    "kwargs", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"jitter": 1.0}, {"factor": 0.5}]
)
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
