"""The table of results being waited for.  Pure: no I/O; time comes in as ``now``.

Entries are keyed by ``(peer, msg_id)`` — a broadcast shares one MsgID across many
peers.  The table is bounded per peer and in total, and every entry leaves it exactly
once: by :meth:`resolve`, :meth:`expire` or :meth:`drop_peer`.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import TooManyPending

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class PendingEntry(Generic[T]):
    peer: str
    msg_id: bytes
    deadline: float
    created_at: float
    timeout: float
    token: T
    done: bool = field(default=False)
    #: the message's number in its peer's order (a late result still counts up to it)
    order: int = 0


def check_timeout(timeout: float | None) -> None:
    """A result timeout: None (the configured one) or seconds > 0.  A NaN would otherwise
    sit at the top of the deadline heap and stop every expiry."""
    if timeout is not None and not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")


class PendingTable(Generic[T]):
    def __init__(self, max_per_peer: int, max_total: int, recent_expired: int = 4096) -> None:
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self._by_peer: dict[str, dict[bytes, PendingEntry[T]]] = {}
        self._heap: list[tuple[float, int, PendingEntry[T]]] = []
        self._seq = 0
        self._total = 0
        # MsgIDs that expired recently, per peer, with their order: a late result for
        # one of them is expected (not a protocol violation) and is dropped quietly.
        self._recent_limit = recent_expired
        self._recent: dict[str, OrderedDict[bytes, int]] = {}

    def __len__(self) -> int:
        return self._total

    def count(self, peer: str) -> int:
        entries = self._by_peer.get(peer)
        return len(entries) if entries else 0

    def check_capacity(self, peer: str) -> None:
        """Raise :class:`TooManyPending` if one more entry for ``peer`` would not fit."""
        if self._total >= self.max_total:
            raise TooManyPending("total", self.max_total)
        if self.count(peer) >= self.max_per_peer:
            raise TooManyPending(f"per-peer for {peer!r}", self.max_per_peer)

    def add(
        self, peer: str, msg_id: bytes, timeout: float, now: float, token: T, order: int = 0
    ) -> PendingEntry[T]:
        check_timeout(timeout)
        self.check_capacity(peer)
        entries = self._by_peer.setdefault(peer, {})
        if msg_id in entries:
            raise ValueError(f"message {msg_id.hex()} is already pending for {peer!r}")
        entry = PendingEntry(peer, msg_id, now + timeout, now, timeout, token, order=order)
        entries[msg_id] = entry
        self._total += 1
        self._seq += 1
        heapq.heappush(self._heap, (entry.deadline, self._seq, entry))
        return entry

    def _remove(self, entry: PendingEntry[T]) -> None:
        entry.done = True
        entries = self._by_peer[entry.peer]
        del entries[entry.msg_id]
        if not entries:
            del self._by_peer[entry.peer]
        self._total -= 1

    def resolve(self, peer: str, msg_id: bytes) -> PendingEntry[T] | None:
        """Remove and return the entry for a result that arrived, or None if unknown."""
        entries = self._by_peer.get(peer)
        entry = entries.get(msg_id) if entries else None
        if entry is None:
            return None
        self._remove(entry)
        self._compact()
        return entry

    def abandon(self, peer: str, msg_id: bytes) -> PendingEntry[T] | None:
        """The waiter gave up (cancelled): remove the entry and treat a result that still
        comes as late rather than unknown."""
        entry = self.resolve(peer, msg_id)
        if entry is not None:
            self._remember(entry)
        return entry

    def _remember(self, entry: PendingEntry[T]) -> None:
        recent = self._recent.setdefault(entry.peer, OrderedDict())
        recent[entry.msg_id] = entry.order
        if len(recent) > self._recent_limit:
            recent.popitem(last=False)

    def late(self, peer: str, msg_id: bytes) -> int | None:
        """The order of a message whose entry expired or was abandoned recently (a
        result for it is late, not unknown), else None."""
        recent = self._recent.get(peer)
        return None if recent is None else recent.get(msg_id)

    def expire(self, now: float) -> list[PendingEntry[T]]:
        """Remove and return every entry whose deadline is ``<= now``."""
        out: list[PendingEntry[T]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, entry = heapq.heappop(heap)
            if entry.done:
                continue
            self._remove(entry)
            self._remember(entry)
            out.append(entry)
        self._compact()
        return out

    def drop_peer(self, peer: str) -> list[PendingEntry[T]]:
        """Remove and return every entry of a peer that went away."""
        self._recent.pop(peer, None)
        entries = self._by_peer.pop(peer, None)
        if not entries:
            return []
        out = list(entries.values())
        for entry in out:
            entry.done = True
        self._total -= len(out)
        self._compact()
        return out

    def drop_all(self) -> list[PendingEntry[T]]:
        out: list[PendingEntry[T]] = []
        for peer in list(self._by_peer):
            out.extend(self.drop_peer(peer))
        self._heap.clear()
        self._recent.clear()
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _compact(self) -> None:
        # resolved entries stay in the heap until they reach the top; rebuild it when
        # they dominate so memory follows the live entries, not the history.
        if len(self._heap) > 64 and len(self._heap) > 4 * self._total:
            self._heap = [item for item in self._heap if not item[2].done]
            heapq.heapify(self._heap)

    def snapshot(self) -> dict[str, Any]:
        return {"total": self._total, "peers": len(self._by_peer), "heap": len(self._heap)}
