"""How often this machine stalls a process that is only computing.

A pure-Python loop with no I/O and no allocation that survives a chunk (so no garbage
collection either) does a fixed piece of work (``--chunk``, default 0.4 ms: what one
QUIC stack spends per message at 1,000 msgs/s) and then sleeps so that it uses
``--util`` of a CPU (default 40 %, as each side of that benchmark does), in ``--procs``
processes at once (default 1: no process competes with it, the other CPU is idle).  Each
chunk's wall time is recorded.  On a quiet machine every chunk takes about the same
time; a chunk that takes longer than ``--factor`` (default 3) times the median ran on a
CPU that was taken away from the process (by the hypervisor, or by another process).

Stalled chunks come in episodes: stalled chunks less than 10 ms apart are one episode.  The
report gives the share of stalled chunks, the slowest chunk, and the episodes per second
with their length and slow-down (median stalled chunk / median chunk).

``StallProbe`` is the same probe as a thread, at a low duty (0.1 ms of work every 10 ms),
for running beside a benchmark: ``bench/latency.py`` runs one in its parent process during
each paced run.  It judges each chunk by its **CPU time** (``time.thread_time``) as well as
its wall time.  When another process of this machine takes the CPU, the chunk's wall time
grows but not its CPU time; in a virtual machine whose host takes the CPU away the guest
kernel charges the lost time to whatever was running, so the chunk's CPU time grows with
its wall time (checked on this machine: 17 of 18 chunks that took > 3× the median wall
time also took > 3× the median CPU time).  So ``cpu_stalled`` counts stalls that no
scheduling inside the machine explains.

Why it matters: a latency benchmark's p99 is set by its slowest 1 % of messages.  If the
machine makes every process run several times slower for tens of milliseconds at a time,
a message that arrives in such an episode queues behind the ones before it, whatever the
stack does (docs/benchmarks.md, "What stands in the way").  ``bench/latency.py`` runs this
probe before its paced runs and reports it beside them.

    PYTHONPATH=. python3 bench/machine_stalls.py             # 10 s, one process
    PYTHONPATH=. python3 bench/machine_stalls.py --procs 2   # both CPUs loaded like the pair
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

EPISODE_GAP = 0.010  # seconds: stalled chunks closer than this are one episode


def _work(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


def _iterations_for(chunk: float) -> int:
    """Loop iterations that take about ``chunk`` seconds here (best of a few tries)."""
    n = 20_000
    best = min(_timed(n) for _ in range(5))
    return max(1, int(n * chunk / best))


def _timed(n: int) -> float:
    t = time.perf_counter()
    _work(n)
    return time.perf_counter() - t


def _probe(duration: float, chunk: float, util: float, out: Any) -> None:
    perf = time.perf_counter
    n = _iterations_for(chunk)
    pause = chunk * (1.0 / util - 1.0) if util < 1.0 else 0.0
    starts: list[float] = []
    walls: list[float] = []
    end = perf() + duration
    while perf() < end:
        t = perf()
        _work(n)
        walls.append(perf() - t)
        starts.append(t)
        if pause:
            time.sleep(pause)
    out.send((starts, walls))
    out.close()


def summarize(
    starts: list[float],
    walls: list[float],
    duration: float,
    factor: float,
    gap: float = EPISODE_GAP,
) -> dict[str, Any]:
    """The report of one probe (pure: testable without running the probe).  Stalled
    chunks less than ``gap`` apart are one episode."""
    median = statistics.median(walls)
    limit = factor * median
    stalled = [(s, w) for s, w in zip(starts, walls, strict=True) if w > limit]
    episodes: list[list[tuple[float, float]]] = []
    for s, w in stalled:
        if episodes and s - (episodes[-1][-1][0] + episodes[-1][-1][1]) < gap:
            episodes[-1].append((s, w))
        else:
            episodes.append([(s, w)])
    spans = [(e[0][0], e[-1][0] + e[-1][1]) for e in episodes]
    lengths = [end - start for start, end in spans]
    return {
        "chunks": len(walls),
        "chunk_median_ms": median * 1e3,
        "stalled": len(stalled),
        "stalled_share": len(stalled) / len(walls) if walls else 0.0,
        "slowest_ms": max(walls) * 1e3 if walls else 0.0,
        "slowdown_median": statistics.median(w for _, w in stalled) / median if stalled else 1.0,
        "episodes": len(episodes),
        "episodes_per_s": len(episodes) / duration,
        "episode_ms_median": statistics.median(lengths) * 1e3 if lengths else 0.0,
        "episode_ms_max": max(lengths) * 1e3 if lengths else 0.0,
        #: (start, end) of each episode, ``perf_counter`` seconds (CLOCK_MONOTONIC: the
        #: same clock in every process of the host)
        "episode_spans": spans,
    }


def in_episodes(
    sent_at: Sequence[float], latencies: Sequence[float], spans: Sequence[Sequence[float]]
) -> list[bool]:
    """For each message: was it in flight (from ``sent_at`` to ``sent_at`` + latency) at
    some moment of a stall episode (``spans``: sorted (start, end))?"""
    starts = [s for s, _ in spans]
    flags = []
    for t, lat in zip(sent_at, latencies, strict=True):
        # the last episode that starts before the message arrived
        i = bisect.bisect_right(starts, t + lat) - 1
        flags.append(i >= 0 and spans[i][1] >= t)
    return flags


def measure(
    duration: float = 10.0,
    procs: int = 1,
    chunk: float = 0.0004,
    util: float = 0.4,
    factor: float = 3.0,
) -> dict[str, Any]:
    """Run the probe in ``procs`` processes at once; one report per process, plus the
    settings."""
    ctx = mp.get_context("spawn")
    pipes = []
    children = []
    for _ in range(procs):
        recv_end, send_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_probe, args=(duration, chunk, util, send_end), daemon=True)
        p.start()
        send_end.close()
        pipes.append(recv_end)
        children.append(p)
    reports = []
    for recv_end in pipes:
        starts, walls = recv_end.recv()
        reports.append(summarize(starts, walls, duration, factor))
    for p in children:
        p.join()
    return {
        "duration_s": duration,
        "procs": procs,
        "chunk_ms": chunk * 1e3,
        "util": util,
        "factor": factor,
        "processes": reports,
    }


class StallProbe:
    """The probe as a thread, at a low duty: ``chunk`` seconds of work every ``every``
    seconds, from :meth:`start` to :meth:`stop` (which returns the report)."""

    def __init__(self, chunk: float = 0.0001, every: float = 0.010, factor: float = 3.0):
        self.chunk = chunk
        self.every = every
        self.factor = factor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starts: list[float] = []
        self._walls: list[float] = []
        self._cpus: list[float] = []
        self._measured = threading.Condition()
        self._began = 0.0

    def start(self) -> None:
        self._n = _iterations_for(self.chunk)
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        perf, cpu, n, every = time.perf_counter, time.thread_time, self._n, self.every
        starts, walls, cpus = self._starts, self._walls, self._cpus
        warm = max(1, n // 2)
        while not self._stop.wait(every):
            _work(warm)  # not measured: the first work after a sleep pays for waking up
            t, c = perf(), cpu()
            _work(n)
            walls.append(perf() - t)
            cpus.append(cpu() - c)
            starts.append(t)
            with self._measured:
                self._measured.notify_all()

    @property
    def chunks_taken(self) -> int:
        return len(self._walls)

    def wait_for_chunks(self, n: int, timeout: float) -> bool:
        """Block until the probe has measured ``n`` chunks (True) or ``timeout`` passed."""
        with self._measured:
            return self._measured.wait_for(lambda: len(self._walls) >= n, timeout)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        duration = time.perf_counter() - self._began
        if not self._walls:
            return {"chunks": 0}
        report = summarize(self._starts, self._walls, duration, self.factor, gap=2.5 * self.every)
        cpu_median = statistics.median(self._cpus)
        report["cpu_stalled"] = sum(1 for c in self._cpus if c > self.factor * cpu_median)
        report["cpu_stalled_share"] = report["cpu_stalled"] / len(self._cpus)
        report.update(chunk_ms=self.chunk * 1e3, every_ms=self.every * 1e3, factor=self.factor)
        return report


def brief(report: dict[str, Any]) -> str:
    """A :class:`StallProbe` report in a few words."""
    if not report.get("chunks"):
        return "no probe"
    return (
        f"{report['stalled_share']:.1%} of probe chunks stalled "
        f"({report['cpu_stalled_share']:.1%} in CPU time), "
        f"{report['episodes_per_s']:.2f} episodes/s, slowest {report['slowest_ms']:.1f} ms"
    )


def describe(result: dict[str, Any]) -> str:
    """One line per process, for a terminal or a Markdown list."""
    lines = []
    for i, r in enumerate(result["processes"]):
        lines.append(
            f"probe {i + 1}/{result['procs']}: {r['stalled']:,} of {r['chunks']:,} chunks "
            f"({r['stalled_share']:.2%}) took > {result['factor']:g}× the median "
            f"{r['chunk_median_ms']:.2f} ms, slowest {r['slowest_ms']:.1f} ms; "
            f"{r['episodes']} episodes ({r['episodes_per_s']:.2f}/s), "
            f"median {r['episode_ms_median']:.0f} ms long (longest {r['episode_ms_max']:.0f} ms), "
            f"chunks {r['slowdown_median']:.1f}× slower in them"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds")
    ap.add_argument("--procs", type=int, default=1, help="probe processes at once")
    ap.add_argument("--chunk", type=float, default=0.0004, help="work per chunk, seconds")
    ap.add_argument("--util", type=float, default=0.4, help="share of a CPU each process uses")
    ap.add_argument("--factor", type=float, default=3.0, help="stalled: > factor × median")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    args = ap.parse_args(argv)
    if not 0 < args.util <= 1:
        ap.error("--util is in (0, 1]")
    result = measure(args.duration, args.procs, args.chunk, args.util, args.factor)
    print(json.dumps(result, indent=1) if args.json else describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
