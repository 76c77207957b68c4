"""How long a full collection of CPython's cyclic garbage collector pauses a process that
runs a backbone client, with and without the client's ``gc_freeze``.

A process that imported backbone and its dependencies holds tens of thousands of objects
the collector tracks; each full collection walks all of them while every message waits.
``gc_freeze`` (on for ``backbone client``) freezes what the process set up when the
client starts (:func:`backbone.gc_freeze.freeze_setup`), so a full collection walks only
what was made after.  Measured in a fresh interpreter per variant: the imports of a
client process (backbone, its plugins, the OpenTelemetry SDK), then ``--rounds`` full
collections, the median and the maximum reported.  Baseline: the same interpreter
without backbone imported (only the standard library's asyncio and ssl).

Run::

    PYTHONPATH=. python3 bench/gc_pause.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import gc, json, statistics, sys, time
variant = sys.argv[1]
if variant == "stdlib":
    import asyncio, ssl  # noqa: F401
else:
    import backbone, backbone.client, plugins.logs, plugins.metrics, plugins.otel  # noqa: F401
    from backbone.gc_freeze import freeze_setup
gc.collect()
tracked = len(gc.get_objects())
if variant == "frozen":
    freeze_setup()
pauses = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    gc.collect()
    pauses.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"variant": variant, "tracked": tracked, "frozen": gc.get_freeze_count(),
                  "median_ms": statistics.median(pauses), "max_ms": max(pauses)}))
"""


def measure(variant: str, rounds: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(rounds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="full collections per variant")
    args = ap.parse_args()
    for variant in ("stdlib", "backbone", "frozen"):
        r = measure(variant, args.rounds)
        label = {
            "stdlib": "asyncio + ssl only",
            "backbone": "client process, gc_freeze off",
            "frozen": "client process, gc_freeze on",
        }[variant]
        print(
            f"{label:32s} tracked {r['tracked']:>7,}  frozen {r['frozen']:>7,}  "
            f"full collection median {r['median_ms']:6.2f} ms, max {r['max_ms']:6.2f} ms"
        )


if __name__ == "__main__":
    main()
