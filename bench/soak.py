"""Soak: 200 clients with churn, 10 % loss both ways, continuous WaitAck traffic.

Not run in CI.  Four kinds of process (``tests/fault_agents.py``), all on 127.0.0.1:

* a backbone **server**, which sends WaitAck messages to random connected clients
  (``--rate`` per second, at most ``--inflight`` outstanding, ``--ack-timeout`` each) and
  checks every result against its payload;
* a **relay** (``tests/relay.py``) between clients and server dropping ``--loss`` of the
  datagrams each way (seeded);
* two **client** processes with ``--clients`` clients between them, echoing payloads; each
  client closes and reopens at random (exponential, mean ``--churn-mean`` s between churns,
  down for up to ``--churn-down`` s).

It reports the server's RSS over time (drift after warm-up), every send's outcome —
**lost results must be 0**: each send ends in a correct result or a definite error
(``AckTimeout``, ``ClientGone``, ``ClientNotConnected``) — reconnect and churn counts,
and the relay's figures, then writes its section of ``docs/benchmarks.md``.

    PYTHONPATH=. python3 bench/soak.py                  # 10 minutes
    PYTHONPATH=. python3 bench/soak.py --minutes 2
    PYTHONPATH=. python3 bench/soak.py --minutes 1 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backbone.certs import make_dev_certs  # noqa: E402
from tests.fault_agents import Agent, clients_args, server_args  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench/soak.py:start -->"
SECTION_END = "<!-- bench/soak.py:end -->"


def _slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    sxx = sum((t - mx) ** 2 for t, _ in samples)
    sxy = sum((t - mx) * (v - my) for t, v in samples)
    return 60.0 * sxy / sxx if sxx else 0.0


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="backbone-soak-"))
    load_at_start = os.getloadavg()
    certs = make_dev_certs(work / "certs")
    seconds = args.minutes * 60.0
    agents: list[Agent] = []
    try:
        server = await Agent.start(
            "server",
            server_args(
                host="127.0.0.1",
                port=0,
                cert=str(certs.server_cert),
                key=str(certs.server_key),
                hb=args.heartbeat,
                misses=3,
                events=False,
            ),
            log_path=work / "server.log",
            name="server",
        )
        agents.append(server)
        port = (await server.wait_event(lambda e: e["event"] == "listening", timeout=30))["port"]
        relay = await Agent.start(
            "relay",
            [
                "--target-port",
                str(port),
                "--loss",
                str(args.loss),
                "--seed",
                str(args.seed),
                "--idle-timeout",
                "30",
            ],
            log_path=work / "relay.log",
            name="relay",
        )
        agents.append(relay)
        rport = (await relay.wait_event(lambda e: e["event"] == "listening", timeout=30))["port"]
        per = args.clients // 2
        fleet = []
        for i, count in enumerate((per, args.clients - per)):
            fleet.append(
                await Agent.start(
                    "clients",
                    clients_args(
                        host="127.0.0.1",
                        port=rport,
                        ca=str(certs.ca_cert),
                        count=count,
                        prefix="soak-",
                        start=i * per,
                        hb=args.heartbeat,
                        backoff_initial=0.5,
                        backoff_max=5.0,
                        connect_timeout=20.0,
                        churn_mean=args.churn_mean,
                        churn_down=args.churn_down,
                        seed=args.seed + i,
                        quiet=True,
                    ),
                    log_path=work / f"clients-{i}.log",
                    name=f"clients-{i}",
                )
            )
        agents.extend(fleet)
        t_connect = time.perf_counter()
        await server.request("wait_clients", n=int(args.clients * 0.95), within=120, timeout=130)
        connect_time = time.perf_counter() - t_connect
        start_stats = await server.request("stats", gc=True)
        print(
            f"soak: {args.clients} clients up in {connect_time:.1f} s; running "
            f"{args.minutes:g} min",
            flush=True,
        )
        result = await server.request(
            "soak",
            timeout=seconds + args.ack_timeout + 120,
            seconds=seconds,
            rate=args.rate,
            inflight=args.inflight,
            ack_timeout=args.ack_timeout,
            sample_every=10,
            seed=args.seed,
        )
        end_stats = await server.request("stats", gc=True, census=True)
        reports = [await a.request("report") for a in fleet]
        relay_stats = await relay.request("stats")
    finally:
        for a in reversed(agents):
            await a.stop()
    rss = [(t, kib) for t, kib in result["rss"]]
    warm = [s for s in rss if s[0] >= min(60.0, seconds * 0.2)] or rss
    return {
        "args": vars(args),
        "connect_time": connect_time,
        "soak": result,
        "start": start_stats,
        "end": end_stats,
        "rss_first_kib": rss[0][1],
        "rss_warm_kib": warm[0][1],
        "rss_last_kib": rss[-1][1],
        "rss_max_kib": max(v for _, v in rss),
        "rss_slope_kib_per_min": _slope_kib_per_min(warm),
        "clients": {
            "connects": sum(r["connects"] for r in reports),
            "churns": sum(r["churns"] for r in reports),
            "losses": {
                k: sum(r["losses"].get(k, 0) for r in reports)
                for k in sorted({k for r in reports for k in r["losses"]})
            },
            "connected_at_end": sum(r["connected"] for r in reports),
            "order_errors": sum(r["order_errors"] for r in reports),
            "rss_kib": [r["rss_kib"] for r in reports],
        },
        "relay": relay_stats,
        "work": str(work),
        "load_at_start": load_at_start,
    }


def machine() -> str:
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    import aioquic

    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{os.cpu_count()} CPUs; load average at the end {load}; Python "
        f"{platform.python_version()}, aioquic {aioquic.__version__}; {platform.platform()}; "
        f"{now}"
    )


def section(r: dict[str, Any]) -> str:
    a, s = r["args"], r["soak"]
    out = s["outcomes"]
    definite = {k: v for k, v in sorted(out.items()) if k not in ("result", "wrong_result")}
    lat = s["latency"]
    c = r["clients"]
    relay = r["relay"]
    fwd = relay["forwarded"]["up"] + relay["forwarded"]["down"]
    lost_pk = relay["lost"]["up"] + relay["lost"]["down"]
    minutes = a["minutes"]
    label = f"{minutes:g}-minute run" if minutes != 10 else "10-minute run"
    lines = [
        SECTION_START,
        "## Soak: churn and loss (`bench/soak.py`)",
        "",
        "Written by `bench/soak.py` (do not edit by hand; rerun it).  Not run in CI.",
        "",
        "Command:",
        "",
        "```",
        "PYTHONPATH=. python3 bench/soak.py" + (f" --minutes {minutes:g}" if minutes != 10 else ""),
        "```",
        "",
        f"**This is a {label}** (the default is 10 minutes).  Machine: {machine()}; load "
        f"average at the start {', '.join(f'{x:.1f}' for x in r['load_at_start'])} (the "
        "machine is shared: other work competes for the 2 CPUs).",
        "",
        f"Setup: one server process; a relay process dropping {a['loss']:.0%} of the datagrams "
        f"each way (seeded, user space); {a['clients']} clients in two processes, each client "
        f"closing and reopening at random (mean {a['churn_mean']:g} s between churns, down "
        f"up to {a['churn_down']:g} s); heartbeats {a['heartbeat']:g} s × 3.  The server "
        f"sends WaitAck messages to random connected clients, {a['rate']:g}/s at most, "
        f"{a['inflight']} in flight at most, timeout {a['ack_timeout']:g} s, and checks each "
        f"result against its payload.",
        "",
        "| figure | value |",
        "|---|--:|",
        f"| WaitAck sends | {s['sent']:,} |",
        f"| correct results | {s['results_ok']:,} |",
        f"| wrong results | {s['wrong']} |",
        f"| definite errors | {', '.join(f'{k} {v:,}' for k, v in definite.items()) or 'none'} |",
        f"| **lost (no result and no error)** | **{s['lost']}** |",
        f"| result latency p50 / p99 / max | {lat.get('p50', 0) * 1000:.1f} / "
        f"{lat.get('p99', 0) * 1000:.1f} / {lat.get('max', 0) * 1000:.0f} ms |",
        f"| client connects (initial + reconnects) | {c['connects']:,} |",
        f"| churns (client closed and reopened) | {c['churns']:,} |",
        f"| connections lost without churn (by reason) | "
        f"{', '.join(f'{k} {v:,}' for k, v in c['losses'].items()) or 'none'} |",
        f"| clients connected at the end | {c['connected_at_end']} of {a['clients']} |",
        f"| per-client order violations | {c['order_errors']} |",
        f"| datagrams forwarded / dropped by the relay | {fwd:,} / {lost_pk:,} |",
        f"| server RSS: start / after warm-up / end / max | {r['rss_first_kib'] / 1024:.1f} / "
        f"{r['rss_warm_kib'] / 1024:.1f} / {r['rss_last_kib'] / 1024:.1f} / "
        f"{r['rss_max_kib'] / 1024:.1f} MiB |",
        f"| server RSS drift after warm-up | {(r['rss_last_kib'] - r['rss_warm_kib']) / 1024:+.1f}"
        f" MiB ({r['rss_slope_kib_per_min']:+.0f} KiB/min fitted) |",
        f"| server UDP receive queue, p50 / max of 1 s samples | "
        f"{s['rx_queue'].get('p50', 0) / 1024:,.0f} / {s['rx_queue'].get('max', 0) / 1024:,.0f}"
        " KiB |",
        f"| server pending results at the end | {r['end']['pending']} |",
        f"| QUIC connection objects alive in the server at the end, by state (sessions) | "
        f"{', '.join(f'{k} {v}' for k, v in sorted(r['end']['quic_connections'].items()))} "
        f"({r['end']['sessions']}) |",
        f"| server open file descriptors: start / end | {r['start']['fds']} / {r['end']['fds']} |",
        "",
        "Lost results count sends that ended in neither a result nor an error by the end "
        "(the run waits the ack timeout plus 30 s for the last ones).  `ClientGone` is a "
        "client that churned or was evicted while its result was pending; "
        "`ClientNotConnected` a client that left between being picked and the send; "
        "`AckTimeout` a result later than the timeout.  RSS is sampled every 10 s; warm-up is "
        "the first minute (or 20 % of a shorter run).  The receive queue is what the kernel "
        "holds for the server's UDP socket (`/proc/net/udp`, including per-datagram "
        "overhead): when the server's event loop falls behind, datagrams wait there (the "
        "server drains up to 128 per readiness callback and drops those that waited longer "
        "than `max_receive_delay`), and that wait adds to every latency, heartbeats "
        "included.  The heartbeat timeouts are clients that gave up on the server (or the "
        "server on them) while the shared machine starved the processes; every one of "
        "their pending results still ended in a definite error.",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: text, doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOCS.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--loss", type=float, default=0.10)
    ap.add_argument("--rate", type=float, default=100.0, help="WaitAck sends per second")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--ack-timeout", type=float, default=10.0)
    ap.add_argument("--heartbeat", type=float, default=2.0)
    ap.add_argument("--churn-mean", type=float, default=60.0)
    ap.add_argument("--churn-down", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    r = asyncio.run(soak(args))
    text = section(r)
    print(text)
    if not args.no_write:
        write_docs(text)
        print(f"\nwrote the section to {DOCS}")
    print(f"logs: {r['work']}")
    s = r["soak"]
    if s["lost"] or s["wrong"] or r["clients"]["order_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
