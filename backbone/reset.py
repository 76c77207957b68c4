"""QUIC stateless reset (RFC 9000 §10.3): derivation, building and detection, sans-I/O.

aioquic neither sends nor detects stateless resets, so a client of a server that died and
came back on the same port used to notice only at its heartbeat timeout.  Backbone adds
both sides (the aioquic plumbing is in :mod:`backbone._quic`):

* **Server.**  A static *reset key*, derived from the server's TLS private key (or an
  explicit ``stateless_reset_key`` setting) and its UDP port (:func:`derive_reset_key`),
  so a server restarted on the same port has the same key without any setup.  Every
  connection ID the server issues carries the token ``HMAC-SHA256(key, cid)[:16]``
  (:func:`reset_token`) instead of aioquic's random one.  A packet for a connection ID
  the server does not know is answered with a stateless reset ending in that ID's token
  (:func:`build_stateless_reset`), rate-limited (:class:`StatelessResetter`).
* **Client.**  A datagram whose last 16 bytes equal the token of the server connection ID
  it uses is a stateless reset (:func:`is_stateless_reset`): the connection is dead on the
  server, so the client drops it at once and reconnects.

Nobody without the key can compute a token, so nobody else can forge a reset: a client
learns its tokens inside the encrypted handshake and NEW_CONNECTION_ID frames, and a token
travels in clear only in a reset, when its connection is already dead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .admission import TokenBucket

#: a stateless reset token, and the trailing bytes of a stateless reset
TOKEN_SIZE = 16
#: the smallest stateless reset: 5 unpredictable bytes (RFC 9000 §10.3) and the token
MIN_RESET_SIZE = 5 + TOKEN_SIZE
#: a reset is always smaller than the packet that triggered it, so that two endpoints
#: cannot keep resetting each other's resets: smaller triggers are not answered
MIN_TRIGGER_SIZE = MIN_RESET_SIZE + 1
#: triggers up to this size get a reset one byte shorter (RFC 9000 §10.3: indistinguishable
#: from a short-header packet); larger ones a reset of 43 to 63 bytes
_SHORT_TRIGGER = 43
#: key material given explicitly must have at least this many bytes
MIN_KEY_MATERIAL = 16

_KEY_LABEL = b"backbone/1 stateless reset key"
_HEX_KEY = re.compile(r"(?:[0-9a-fA-F]{2}){16,}")

RandomBytes = Callable[[int], bytes]


def derive_reset_key(material: bytes, port: int) -> bytes:
    """The 32-byte reset key of a server listening on UDP ``port``, from key material (the
    server's TLS private key, or an explicit secret):
    ``HMAC-SHA256(label, port as 2 bytes ‖ material)``.

    Deterministic, so a server restarted on the same port derives the same key; one-way,
    so the reset key reveals nothing of the TLS key.  The port makes servers that share a
    certificate on one host (one process per core, each on its own port) have different
    keys: otherwise one would be an oracle for the others' tokens (RFC 9000 §21.11) —
    anyone could send it a packet with another server's connection ID and get back the
    reset that kills that connection."""
    return hmac.new(_KEY_LABEL, port.to_bytes(2, "big") + material, hashlib.sha256).digest()


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token of connection ID ``cid``: the first 16 bytes of
    ``HMAC-SHA256(key, cid)``."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:TOKEN_SIZE]


def is_hex_key(value: str) -> bool:
    """True if a ``stateless_reset_key`` setting is a hex key (at least 16 bytes) rather
    than the path of a key file."""
    return _HEX_KEY.fullmatch(value) is not None


def key_material(setting: str) -> bytes:
    """The key material a ``stateless_reset_key`` setting names: its bytes if it is hex,
    else the bytes of the file at that path.  Raises ``ValueError`` (too short) or
    ``OSError`` (file not readable)."""
    if is_hex_key(setting):
        return bytes.fromhex(setting)
    material = Path(setting).read_bytes()
    if len(material) < MIN_KEY_MATERIAL:
        raise ValueError(
            f"stateless_reset_key file {setting!r} holds {len(material)} bytes; "
            f"at least {MIN_KEY_MATERIAL} are needed"
        )
    return material


def build_stateless_reset(
    token: bytes, trigger_size: int, random_bytes: RandomBytes = os.urandom
) -> bytes | None:
    """A stateless reset answering a datagram of ``trigger_size`` bytes, or None if that
    datagram is too small to be answered (< 22 bytes: the reset must be smaller than its
    trigger and at least 21 bytes).

    The reset looks like a short-header packet: a first byte ``0b01xxxxxx`` (header form 0,
    fixed bit 1), unpredictable bytes, then ``token``."""
    if trigger_size < MIN_TRIGGER_SIZE:
        return None
    if trigger_size <= _SHORT_TRIGGER:
        size = trigger_size - 1
    else:
        size = min(trigger_size - 1, _SHORT_TRIGGER + random_bytes(1)[0] % 21)
    head = bytearray(random_bytes(size - TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)
    return bytes(head) + token


def is_stateless_reset(datagram: bytes, tokens: Iterable[bytes]) -> bool:
    """True if ``datagram`` is a stateless reset carrying one of ``tokens``: a short-header
    packet (header form bit 0) of at least 21 bytes whose last 16 bytes are one of the
    tokens.  Compared in constant time (``hmac.compare_digest``), every token each time;
    empty tokens (not known yet) never match."""
    if len(datagram) < MIN_RESET_SIZE or datagram[0] & 0x80:
        return False
    tail = datagram[-TOKEN_SIZE:]
    found = False
    for token in tokens:
        if len(token) == TOKEN_SIZE and hmac.compare_digest(tail, token):
            found = True
    return found


class StatelessResetter:
    """The server's answer to packets for connections it does not know.

    :meth:`answer` returns the stateless reset to send, or None: the trigger is too small
    (``too_small``), or the token bucket (``rate`` per second, bursts of ``burst``) is
    empty (``limited``).  A ``rate`` of 0 sends none.  ``sent`` counts the resets
    returned.  Time comes in as ``now``.
    """

    __slots__ = ("_bucket", "_random", "key", "limited", "sent", "too_small")

    def __init__(
        self,
        key: bytes,
        rate: float,
        burst: int,
        now: float,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.key = key
        self._bucket = TokenBucket(rate, burst, now) if rate > 0 else None
        self._random = random_bytes
        self.sent = 0
        self.limited = 0
        self.too_small = 0

    @property
    def enabled(self) -> bool:
        return self._bucket is not None

    def token(self, cid: bytes) -> bytes:
        return reset_token(self.key, cid)

    def answer(self, cid: bytes, trigger_size: int, now: float) -> bytes | None:
        if self._bucket is None:
            return None
        if trigger_size < MIN_TRIGGER_SIZE:
            self.too_small += 1
            return None
        if not self._bucket.try_take(now):
            self.limited += 1
            return None
        self.sent += 1
        return build_stateless_reset(self.token(cid), trigger_size, self._random)
