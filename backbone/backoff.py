"""Reconnect backoff: exponential, capped, jittered downward.  Pure: no I/O, no clock."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays ``initial × factor^n`` capped at ``maximum``, each randomized downward.

    With ``jitter=0.2`` every delay lies in ``[0.8 × base, base]`` — also at the cap, so
    a crowd of clients that lost the same server never retries in lockstep.  ``reset()``
    starts the sequence again; the client calls it once a connection has been stable.
    """

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng
        self.attempt = 0

    def base_delay(self, attempt: int) -> float:
        # min() before pow overflow: factor^attempt can be huge after days of retrying
        base = self.initial
        for _ in range(attempt):
            base *= self.factor
            if base >= self.maximum:
                return self.maximum
        return min(base, self.maximum)

    def next_delay(self) -> float:
        base = self.base_delay(self.attempt)
        self.attempt += 1
        return base * (1.0 - self.jitter * self._rng())

    def reset(self) -> None:
        self.attempt = 0
