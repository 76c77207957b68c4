"""The latency benchmark's machine-stall probe: its report is pure arithmetic over the
chunks' start and wall times, so it is checked here on made-up chunks."""

from __future__ import annotations

import pytest

from bench.machine_stalls import (
    EPISODE_GAP,
    StallProbe,
    in_episodes,
    summarize,
)


def test_stalled_chunks_close_together_make_one_episode() -> None:
    # 100 chunks of 1 ms every 2 ms; chunks 10-12 took 5 ms (one episode), chunk 60 took
    # 4 ms (a second one), chunk 61 is normal again
    starts, walls = [], []
    t = 0.0
    for i in range(100):
        w = 0.005 if 10 <= i <= 12 else 0.004 if i == 60 else 0.001
        starts.append(t)
        walls.append(w)
        t += w + 0.001
    r = summarize(starts, walls, duration=t, factor=3.0)
    assert r["chunks"] == 100
    assert r["chunk_median_ms"] == pytest.approx(1.0)
    assert r["stalled"] == 4
    assert r["stalled_share"] == pytest.approx(0.04)
    assert r["episodes"] == 2
    assert r["slowest_ms"] == pytest.approx(5.0)
    # the first episode: from chunk 10's start to chunk 12's end, 3 x 5 ms + 2 gaps
    assert r["episode_ms_max"] == pytest.approx(17.0)
    assert r["slowdown_median"] == pytest.approx(5.0)


def test_stalls_further_apart_than_the_gap_are_separate_episodes() -> None:
    starts = [0.0, 0.002, EPISODE_GAP + 0.02, 1.0, 1.001]
    walls = [0.001, 0.01, 0.01, 0.001, 0.001]
    assert summarize(starts, walls, 1.0, 3.0)["episodes"] == 2
    # with a wider gap they are one
    assert summarize(starts, walls, 1.0, 3.0, gap=0.05)["episodes"] == 1


def test_the_episode_spans_are_reported() -> None:
    starts = [0.0, 0.010, 0.012, 0.5]
    walls = [0.001, 0.001, 0.005, 0.001]
    r = summarize(starts, walls, 1.0, 3.0)
    assert r["episode_spans"] == [(0.012, pytest.approx(0.017))]


def test_messages_in_flight_during_an_episode() -> None:
    spans = [(1.0, 1.05), (2.0, 2.03)]
    sent_at = [0.5, 0.99, 1.02, 1.06, 1.5, 1.99, 2.5]
    latencies = [0.001, 0.02, 0.001, 0.001, 0.6, 0.0005, 0.001]
    # in flight during an episode: sent before and handled in it (0.99), sent in it
    # (1.02), sent before and handled after the second one started (1.5 + 0.6 = 2.1);
    # not: 0.5 (done before), 1.06 (after the first), 1.99 (done at 1.9905), 2.5
    assert in_episodes(sent_at, latencies, spans) == [
        False, True, True, False, True, False, False
    ]  # fmt: skip
    assert in_episodes([], [], spans) == []
    assert in_episodes(sent_at, latencies, []) == [False] * 7


def test_a_quiet_run_reports_no_stall() -> None:
    r = summarize([i * 0.01 for i in range(50)], [0.001] * 50, 0.5, 3.0)
    assert (r["stalled"], r["episodes"], r["slowdown_median"]) == (0, 0, 1.0)


def test_the_probe_thread_measures_chunks_until_stopped() -> None:
    probe = StallProbe(chunk=0.0001, every=0.002)
    probe.start()
    assert probe.wait_for_chunks(10, timeout=10)  # the probe thread runs on its own
    report = probe.stop()
    assert report["chunks"] >= 10
    # the calibrated chunk is 0.1 ms of work: a median far from it means the
    # calibration or the timing is broken (a stall only moves a few chunks)
    assert 0.02 <= report["chunk_median_ms"] <= 20.0, report
    assert report["chunk_median_ms"] > 0
