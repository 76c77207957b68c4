"""Header injection: the one way a plugin may add to an outgoing frame (trace context).

An injector is called as ``injector(sender, kind, msg_id, client_id, headers)`` right
before a frame is encoded, where ``kind`` is ``"message"``, ``"broadcast"`` (client_id
``"*"``) or ``"result"``, and ``headers`` is a dict it may add string entries to.  Like
event receivers, an injector that raises is logged and never breaks the send.  With no
injector registered nothing is called and nothing is allocated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import signals

log = logging.getLogger("backbone.propagation")

Injector = Callable[[Any, str, str, str, dict[str, str]], None]

_injectors: list[Injector] = []


def add_injector(injector: Injector) -> None:
    if injector not in _injectors:
        _injectors.append(injector)


def remove_injector(injector: Injector) -> None:
    if injector in _injectors:
        _injectors.remove(injector)


def active() -> bool:
    return bool(_injectors)


def outgoing(
    sender: Any, kind: str, msg_id: bytes, client_id: str, headers: dict[str, str] | None
) -> dict[str, str] | None:
    """The headers an application's message goes out with: never the caller's own dict
    (the events hold them until plugins are done, and the caller may change its dict
    after the send), with what the injectors add."""
    if _injectors:
        return inject(sender, kind, msg_id.hex(), client_id, headers)  # a new dict
    return dict(headers) if headers else headers


def inject(
    sender: Any, kind: str, msg_id: str, client_id: str, headers: dict[str, str] | None
) -> dict[str, str] | None:
    if not _injectors:
        return headers
    out = dict(headers) if headers else {}
    for injector in list(_injectors):
        try:
            injector(sender, kind, msg_id, client_id, out)
        except signals.RECEIVER_FAILURES:  # a plain function raised it itself
            log.exception("header injector %r raised; the message is sent without it", injector)
    return out or None
