"""The whole benchmark suite in one command (issue #6).

Runs, each in its own Python process, from the repository root:

1. ``bench/single_connection.py`` -- one connection: one-way 200 B and 16 KiB, WaitAck
   with 1, 32 and 256 in flight; backbone vs. raw aioquic vs. websockets over TLS;
2. ``bench/latency.py`` -- connect time (sequential connects) and one-way latency at
   1,000 and 10,000 msgs/s, with ``docs/latency.png``;
3. ``bench/scale.py`` -- thousands of clients on one server (skipped with a message if
   the file is not there).

Each script writes its JSON into ``bench/results/`` and its own section of
``docs/benchmarks.md``; this one then writes ``bench/results/run_all.json`` and the
"Aims" section (met / missed, from those JSON files).

    PYTHONPATH=. python3 bench/run_all.py              # full: about 25 min on 2 cores
    PYTHONPATH=. python3 bench/run_all.py --quick      # under 3 min, for a smoke test
    PYTHONPATH=. python3 bench/run_all.py --summary-only   # rewrite the aims from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import (
    DOCS,
    RESULTS_DIR,
    ROOT,
    command_line,
    loadavg,
    machine_info,
    machine_line,
    overloaded,
    section_markers,
    write_docs_section,
    write_json,
)

SECTION_START, SECTION_END = section_markers("bench/run_all.py")
INTRO_END = "<!-- bench:intro-end -->"

# (script, arguments for a full run, arguments for --quick)
STEPS: list[tuple[str, list[str], list[str]]] = [
    ("bench/single_connection.py", [], ["--quick"]),
    ("bench/latency.py", [], ["--quick"]),
    ("bench/scale.py", [], ["--quick"]),
]

AIM_ONEWAY = 0.8  # one-way throughput >= 0.8 x raw aioquic, same framing
AIM_ACK32 = 0.8  # WaitAck, 32 in flight >= 0.8 x raw aioquic request/response, 32 in flight
AIM_P99_1000_MS = 5.0  # p99 < 5 ms at 1,000 msgs/s on loopback
AIM_CONNECT_P99_MS = 50.0  # connect p99 < 50 ms


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / name
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def aims_rows() -> list[str]:
    """One Markdown table row per aim, from the latest JSON results."""
    rows = []
    single = _load("single_connection.json")
    s = single["summary"] if single else {}

    def ratio_row(key: str, label: str, aim: float) -> None:
        e = s.get(key)
        r = e.get("ratio_backbone_over_raw") if e else None
        if r is None:
            rows.append(f"| {label} ≥ {aim:g} × raw aioquic | not measured | - |")
            return
        bb, raw = e["backbone"]["median_msgs_per_s"], e["raw"]["median_msgs_per_s"]
        miss = "" if r >= aim else f" ({(aim - r) / aim:.0%} short of the aim)"
        ws = e.get("ratio_backbone_over_websockets")
        ws_text = f"; backbone/websockets {ws:.2f}" if ws is not None else ""
        rows.append(
            f"| {label} ≥ {aim:g} × raw aioquic | **{r:.2f}** × raw ({bb:,.0f} vs. "
            f"{raw:,.0f} msgs/s){miss}{ws_text} | {_verdict(r >= aim)} |"
        )

    ratio_row("oneway", "One-way throughput, 200 B", AIM_ONEWAY)
    ratio_row("oneway16k", "One-way throughput, 16 KiB", AIM_ONEWAY)
    ratio_row("ack32", "WaitAck results/s, 32 in flight", AIM_ACK32)

    lat = _load("latency.json")
    paced = (lat or {}).get("paced", {}).get("1000", {}).get("backbone")
    if paced:
        p99 = paced["p99_ms"]
        miss = "" if p99 < AIM_P99_1000_MS else f" ({p99 / AIM_P99_1000_MS:.1f}× the aim)"
        stalls = paced.get("machine_stalls") or {}
        outside = stalls.get("p99_outside_episodes_ms")
        machine = (
            f"; {stalls['tail_in_episodes']:.0%} of the p99 tail was in flight during "
            f"the machine's stall episodes, the other messages' p99 {outside:.2f} ms"
            if outside is not None and "tail_in_episodes" in stalls
            else ""
        )
        rows.append(
            f"| One-way latency p99 < {AIM_P99_1000_MS:g} ms at 1,000 msgs/s | "
            f"**{p99:.2f} ms** (p50 {paced['p50_ms']:.2f}, p99.9 {paced['p99.9_ms']:.2f}){miss}"
            f"{machine} | {_verdict(p99 < AIM_P99_1000_MS)} |"
        )
    else:
        rows.append(
            f"| One-way latency p99 < {AIM_P99_1000_MS:g} ms at 1,000 msgs/s | not measured | - |"
        )
    conn = (lat or {}).get("connect", {}).get("backbone")
    if conn:
        p99 = conn["p99_ms"]
        miss = "" if p99 < AIM_CONNECT_P99_MS else f" ({p99 / AIM_CONNECT_P99_MS:.1f}× the aim)"
        rows.append(
            f"| Connect time p99 < {AIM_CONNECT_P99_MS:g} ms (incl. HELLO/WELCOME) | "
            f"**{p99:.1f} ms** (p50 {conn['p50_ms']:.1f}){miss} "
            f"| {_verdict(p99 < AIM_CONNECT_P99_MS)} |"
        )
    else:
        rows.append(f"| Connect time p99 < {AIM_CONNECT_P99_MS:g} ms | not measured | - |")
    return rows


def scale_aims() -> list[str]:
    """``bench/scale.py``'s own aims lines, if it and its results are there."""
    data = _load("scale.json")
    if data is None or not (ROOT / "bench" / "scale.py").exists():
        return []
    try:
        from bench import scale

        lines: list[str] = scale.aims(data)
    except Exception as exc:  # the scale script is another helper's; never fail here
        return [f"(scale aims not available: {type(exc).__name__}: {exc})"]
    return [ln for ln in lines if ln.startswith("- ")]


def render_section(run: dict[str, Any] | None) -> str:
    single = _load("single_connection.json")
    lat = _load("latency.json")
    lines = [
        SECTION_START,
        "## Aims (issue #6)",
        "",
        "Written by `bench/run_all.py` from `bench/results/*.json` (do not edit by hand).",
        "",
    ]
    if run:
        lines += [
            f"Last suite run: `{run['command']}`, {run['machine']['date']}, "
            f"{run['elapsed_s'] / 60:.1f} min; load average at the start "
            + ", ".join(f"{x:.2f}" for x in run["machine"]["loadavg"])
            + ", at the end "
            + ", ".join(f"{x:.2f}" for x in run["loadavg_end"])
            + ".",
            "",
        ]
        steps = []
        for st in run.get("steps", []):
            name = Path(st["script"]).name
            if "skipped" in st:
                steps.append(f"`{name}` skipped ({st['skipped']})")
            else:
                ok = "" if st["exit"] == 0 else f", **exit {st['exit']}**"
                steps.append(f"`{name}` {st['seconds']:.0f} s{ok}")
        if steps:
            lines += ["Steps: " + "; ".join(steps) + ".", ""]
        if overloaded(run["machine"], run["loadavg_end"]):
            lines += [
                "**That run was on a contended machine (load average above the CPU count): "
                "the verdicts below describe that machine, not the stacks; rerun the suite "
                "on a quiet machine before drawing conclusions.**",
                "",
            ]
    for name, data in (("single_connection", single), ("latency", lat)):
        if data:
            lines.append(
                f"* `{name}`: `{data['command']}` ({data['machine']['date']}; load "
                + ", ".join(f"{x:.2f}" for x in data["machine"].get("loadavg", []))
                + ")"
            )
    lines += [
        "",
        "| aim | measured | |",
        "|---|---|---|",
        *aims_rows(),
    ]
    sa = scale_aims()
    if sa:
        sdata = _load("scale.json") or {}
        when = (sdata.get("machine") or {}).get("at")
        cmd = sdata.get("command")
        source = "`bench/results/scale.json`" + (f", {when}" if when else "")
        source += f", `{cmd}`" if cmd else ""
        lines += ["", f"Scale aims (from {source}; details in its section below):", "", *sa]
    lines += ["", SECTION_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every script in its quick mode")
    ap.add_argument("--only", help="comma list of script names to run (e.g. latency,scale)")
    ap.add_argument("--skip", default="", help="comma list of script names to skip")
    ap.add_argument(
        "--summary-only", action="store_true", help="run nothing; rewrite the aims section"
    )
    args = ap.parse_args(argv)

    if args.summary_only:
        write_docs_section(
            SECTION_START, SECTION_END, render_section(_load("run_all.json")), DOCS, after=INTRO_END
        )
        print("\n".join(aims_rows()))
        return 0

    only = {s for s in (args.only or "").split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    machine = machine_info()
    print(machine_line(machine), flush=True)
    env = dict(os.environ)
    # the caller's PYTHONPATH first (it may point at another checkout of backbone)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    failed = False
    for script, full, quick in STEPS:
        name = Path(script).stem
        if (only and name not in only) or name in skip:
            continue
        if not (ROOT / script).exists():
            print(f"\n=== {script}: not there, skipped", flush=True)
            steps.append({"script": script, "skipped": "file not found"})
            continue
        cmd = [sys.executable, script, *(quick if args.quick else full)]
        print(f"\n=== {' '.join(['PYTHONPATH=.', 'python3', *cmd[1:]])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        dt = time.perf_counter() - t
        print(f"=== {script}: exit {rc} after {dt:.0f} s, load {loadavg()}", flush=True)
        steps.append({"script": script, "args": cmd[2:], "exit": rc, "seconds": round(dt, 1)})
        failed |= rc != 0
    run = {
        "command": command_line("bench/run_all.py", argv),
        "machine": machine,
        "loadavg_end": loadavg(),
        "elapsed_s": time.perf_counter() - t0,
        "steps": steps,
        "aims": aims_rows(),
    }
    write_json("run_all.json", run)
    write_docs_section(SECTION_START, SECTION_END, render_section(run), DOCS, after=INTRO_END)
    print(f"\n(total {run['elapsed_s'] / 60:.1f} min)\n")
    print("\n".join(run["aims"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
