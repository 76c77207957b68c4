"""CPU per message of each observability plugin, without QUIC: where the cost of
``bench/plugins_overhead.py`` goes.

One process, one event loop: the events are emitted from a running loop, which yields
every :data:`PER_PASS` messages, as the real sender does; the plugins' flush, inside the
window, includes the work they defer (history's packing).  A stand-in sender (a
:class:`backbone.Server` that is never started, so its plugins install as they would)
emits the per-message steps the core emits for a one-way message on each side, the way
the core does (``Link._report``, called on a stand-in: an event per step for per-step
receivers, a row per step for batch receivers): ``message.sent`` (server) and
``message.received`` + ``message.processed`` (client), ``--n`` of each.  Reported per
message and per side, in CPU microseconds:

* ``loop``: the emitting thread (building the event, ``signals.emit``, the receivers);
* ``workers``: every other thread of the process (the history writer, exporters),
  measured with per-thread CPU clocks, after a flush so the queued work is included.

A configuration's loop + workers, over the no-plugin baseline, is what it adds to the
about 30 µs of CPU backbone needs per one-way message on the receiving side
(``docs/benchmarks.md``): with a 25 % throughput budget that is about 10 µs on each side.

Run::

    PYTHONPATH=. python3 bench/plugin_paths.py [--n 100000] [--configs none,history]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from backbone import Client, Server, signals
from backbone._link import Link
from backbone.events import SEQUENCE
from backbone.plugins import Plugin

#: messages emitted per event-loop pass (``bench/single_connection.py`` sends 64 a pass)
PER_PASS = 64

CONFIGS = ("none", "logging", "metrics", "history", "logging+metrics+history", "tracing")


def _thread_cpu() -> dict[int, float]:
    out = {}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return out


class Steps:
    """A stand-in for the core's ``Link`` where per-message steps are concerned: its
    own ``_report`` and ``_step`` (the event for per-step receivers, the row for batch
    receivers), on this object's owner, role and client id."""

    _report = Link._report
    _step = Link._step

    def __init__(self, owner: Any, role: str, client_id: str) -> None:
        self.owner = owner
        self.role = role
        self.client_id = client_id
        self.pending_steps: dict[str, list[tuple[Any, ...]]] | None = None


def make_plugins(config: str, work: Path) -> list[Plugin]:
    from plugins.history import HistoryPlugin
    from plugins.logs import LoggingPlugin
    from plugins.metrics import MetricsPlugin
    from plugins.otel import TracingPlugin

    out: list[Plugin] = []
    for name in config.split("+"):
        if name == "none":
            continue
        if name == "logging":
            logger = logging.getLogger("bench.plugin_paths")
            logger.handlers[:] = [logging.FileHandler(work / "log.txt")]
            logger.setLevel(logging.INFO)
            logger.propagate = False
            out.append(LoggingPlugin(logger=logger))
        elif name == "metrics":
            out.append(MetricsPlugin(otlp=False))
        elif name == "history":
            out.append(HistoryPlugin(work / f"h-{len(os.listdir(work))}.sqlite3"))
        elif name == "tracing":
            out.append(TracingPlugin())
        else:
            raise SystemExit(f"unknown plugin {name}")
    return out


async def run(config: str, n: int, work: Path) -> dict[str, Any]:
    cert = work / "none"
    server = Server("127.0.0.1", 0, certfile=str(cert), keyfile=str(cert))
    client = Client("c-1", "127.0.0.1", 1, verify=False)
    server_plugins = make_plugins(config, work)
    client_plugins = make_plugins(config, work)
    for p in server_plugins:
        p.install(server)
    for p in client_plugins:
        p.install(client)
    headers: dict[str, str] = {}
    server_steps = Steps(server, "server", "c-1")
    client_steps = Steps(client, "client", "c-1")
    loop_ident = threading.get_ident()
    out: dict[str, Any] = {"config": config}
    try:
        for side in ("server", "client"):
            before = _thread_cpu()
            t0 = time.thread_time()
            for i in range(n):
                if i % PER_PASS == 0:
                    await asyncio.sleep(0)  # one loop pass per PER_PASS, as the sender does
                msg_id = f"{i:032x}"
                if side == "server":
                    want = signals.wants(signals.on_message_sent)
                    if want or signals.batching("message.sent"):
                        server_steps._report(
                            want,
                            signals.on_message_sent,
                            "message.sent",
                            (next(SEQUENCE), time.time(), msg_id, 200, False, False, headers),
                        )
                    continue
                want = signals.wants(signals.on_message_received)
                if want or signals.batching("message.received"):
                    client_steps._report(
                        want,
                        signals.on_message_received,
                        "message.received",
                        (next(SEQUENCE), time.time(), msg_id, 200, False, headers),
                    )
                started = time.time()
                want = signals.wants(signals.on_message_processed)
                if want or signals.batching("message.processed"):
                    client_steps._report(
                        want,
                        signals.on_message_processed,
                        "message.processed",
                        (
                            next(SEQUENCE),
                            time.time(),
                            msg_id,
                            False,
                            True,
                            None,
                            started,
                            2e-6,
                            headers,
                        ),
                    )
            await asyncio.sleep(0)  # the last pass's batches
            await asyncio.sleep(0)  # and the deferred work (history's packing)
            loop_s = time.thread_time() - t0
            for p in server_plugins + client_plugins:
                flush = getattr(p, "flush", None)
                if flush is not None:
                    flush()
            after = _thread_cpu()
            workers = sum(v - before.get(k, 0.0) for k, v in after.items() if k != loop_ident)
            out[side] = {"loop_us": loop_s / n * 1e6, "workers_us": workers / n * 1e6}
    finally:
        for p in server_plugins:
            p.uninstall(server)
        for p in client_plugins:
            p.uninstall(client)
        for p in server_plugins + client_plugins:
            for name in ("close", "shutdown"):
                fn = getattr(p, name, None)
                if fn is not None:
                    fn()
                    break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'config':26} {'side':7} {'loop µs':>8} {'workers µs':>10} {'total':>7}")
        for config in args.configs.split(","):
            r = asyncio.run(run(config, args.n, work))
            for side in ("server", "client"):
                s = r[side]
                total = s["loop_us"] + s["workers_us"]
                print(
                    f"{config:26} {side:7} {s['loop_us']:8.2f} {s['workers_us']:10.2f} {total:7.2f}"
                )


if __name__ == "__main__":
    main()
