"""Keeping live connections out of CPython's cyclic garbage collector.

Every QUIC connection is a graph of a few hundred container objects (aioquic's streams,
crypto state, handler tables; backbone's link and session).  CPython's collector walks
all of them in each full collection, and it runs a full collection whenever the objects
that survived into the oldest generation grew by a quarter: with 2,000 connections one
pass took 0.5-0.7 s, with 4,000 1.1 s, and while 10,000 clients connected the server spent
about 80 % of its CPU there and fell behind its socket (docs/benchmarks.md, "What stands
in the way").

:class:`ConnectionFreezer` moves what exists into the collector's permanent generation
(:func:`gc.freeze`) each time enough connections were made since the last time: a tenth of
those alive, at least ``min_batch``.  A collection of the young generations runs first,
so short-lived garbage is not frozen with them.  Frozen objects are still freed by
reference counting when their connection ends: backbone breaks an ended connection's
reference cycles (:func:`backbone._quic.release_connection`), so the collector is not
needed for them.

The cost: an object alive at a freeze that later becomes part of unreachable *cyclic*
garbage is never reclaimed.  That is why it is the server's ``gc_freeze`` setting,
on for ``backbone serve`` (the process is backbone's) and off for an embedded
:class:`~backbone.Server` (the process is the application's); :meth:`stop` undoes it.
Both are process-wide: ``gc.unfreeze()`` at a server's stop also gives back what the
application, or another server in the process, froze.  And the collection before each
freeze covers the young generations only (a full one is the pause this avoids), so
cyclic garbage already in the oldest generation is frozen with the rest and never
reclaimed; with backbone's own cycles broken that is little, but it is not nothing.

The same setting raises the collector's thresholds while the server runs
(:data:`SERVER_THRESHOLDS`, from CPython's 700, 10, 10): a collection of the youngest
generation after 50,000 net allocations instead of 700, of the middle one after 20 of
those, and a full one considered after 100 middle ones.  Most of what a server allocates
(packets, frames, events) dies young by reference counting; with a small threshold the
collector walks it while it is still alive, promotes it, and walks it again in the older
generations.  In a broadcast to 10,000 clients (then a WaitAck one) the server spent
0.75-1.82 s of the two broadcasts in the collector with CPython's thresholds and
0.09-0.25 s with these (docs/benchmarks.md, session 12).  A young collection now walks up
to 50,000 objects (a few milliseconds) instead of 700, and a full one is considered only
after 2,000 young ones instead of 100 (CPython 3.11-3.13's generational collector; 3.14's
incremental one reads the thresholds differently).  The thresholds are raised while at
least one server with ``gc_freeze`` runs in the process (:class:`RaisedThresholds`): the
first to start saves those in force, the last to stop puts them back, including over
any the application set in between.

A client's ``gc_freeze`` (on for ``backbone client``) is simpler: :func:`freeze_setup`
once, when it starts.  A process that imported backbone and its dependencies holds about
50,000 objects the collector tracks; a full collection walks them all, about 14 ms on
the test machine, and every message that arrives meanwhile waits (it was the maximum of
the paced latency benchmark, docs/benchmarks.md).  Frozen, they are skipped: the same
collection takes well under a millisecond.  What is frozen then is the process's
imports and setup, which live as long as the process anyway.  Connections are made
after it and are not frozen.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

log = logging.getLogger("backbone.server")

#: how many times :func:`freeze_setup` froze (process-wide, for tests and logs)
setup_freezes = 0


def freeze_setup() -> int:
    """A full collection, then :func:`gc.freeze` of everything that survived it: the
    process's imports and setup stop costing every later full collection.  Not undone.
    Returns how many objects were frozen."""
    global setup_freezes
    gc.collect()
    gc.freeze()
    setup_freezes += 1
    frozen = gc.get_freeze_count()
    log.debug("froze %d objects of the process's setup", frozen)
    return frozen


#: the collector's thresholds while a server with ``gc_freeze`` runs (see above)
SERVER_THRESHOLDS = (50_000, 20, 100)


class RaisedThresholds:
    """The collector's thresholds, raised while at least one holder wants them: the
    first :meth:`hold` saves those in force, the last :meth:`release` puts them back
    (pure apart from the injected ``gc`` functions)."""

    def __init__(
        self,
        get_threshold: Callable[[], tuple[int, int, int]] = gc.get_threshold,
        set_threshold: Callable[..., None] = gc.set_threshold,
    ) -> None:
        self._get_threshold = get_threshold
        self._set_threshold = set_threshold
        self.holders = 0
        self._saved: tuple[int, int, int] | None = None

    def hold(self, thresholds: tuple[int, int, int]) -> None:
        if self.holders == 0:
            self._saved = self._get_threshold()
            self._set_threshold(*thresholds)
        self.holders += 1

    def release(self) -> None:
        if self.holders == 0:
            return
        self.holders -= 1
        if self.holders == 0 and self._saved is not None:
            self._set_threshold(*self._saved)
            self._saved = None


#: the process's: every server's freezer holds this one
PROCESS_THRESHOLDS = RaisedThresholds()


class ConnectionFreezer:
    """Decides when to freeze (pure apart from the injected ``gc`` functions).

    Call :meth:`connected` for each new session and :meth:`tick` periodically with the
    number of live sessions; :meth:`tick` freezes when ``new >= max(min_batch, growth *
    live)`` and says whether it did."""

    def __init__(
        self,
        *,
        min_batch: int = 100,
        growth: float = 0.1,
        collect_young: Callable[[], object] = lambda: gc.collect(1),
        freeze: Callable[[], None] = gc.freeze,
        unfreeze: Callable[[], None] = gc.unfreeze,
        frozen_count: Callable[[], int] = gc.get_freeze_count,
        thresholds: tuple[int, int, int] | None = SERVER_THRESHOLDS,
        raised: RaisedThresholds = PROCESS_THRESHOLDS,
    ) -> None:
        self.min_batch = min_batch
        self.growth = growth
        self._collect_young = collect_young
        self._freeze = freeze
        self._unfreeze = unfreeze
        self._frozen_count = frozen_count
        self.new_since_freeze = 0
        self.freezes = 0
        self.thresholds = thresholds
        self._raised = raised
        self._holding = False

    def start(self) -> None:
        """Raise the collector's thresholds to :attr:`thresholds` (None: leave them)."""
        if self.thresholds is None or self._holding:
            return
        self._raised.hold(self.thresholds)
        self._holding = True

    def connected(self) -> None:
        self.new_since_freeze += 1

    def due(self, live: int) -> bool:
        return self.new_since_freeze >= max(self.min_batch, self.growth * live)

    def tick(self, live: int) -> bool:
        if not self.due(live):
            return False
        self._collect_young()
        self._freeze()
        self.freezes += 1
        log.debug(
            "froze %d objects out of the garbage collector's reach (%d new sessions, %d live)",
            self._frozen_count(),
            self.new_since_freeze,
            live,
        )
        self.new_since_freeze = 0
        return True

    def stop(self) -> None:
        """Give the frozen objects back to the collector (if this froze any), and let
        go of the raised thresholds (put back when no other server holds them)."""
        if self.freezes:
            self._unfreeze()
            self.freezes = 0
        if self._holding:
            self._holding = False
            self._raised.release()
