"""The one module that touches aioquic — including its private internals.

Everything here was written against aioquic 1.7.2 (see pyproject for the pinned range).
Private attributes used, each wrapped in one small function below:

* ``QuicConnection._streams[sid].sender._buffer_start/_buffer_stop`` — bytes queued on a
  stream and not yet acknowledged by the peer (aioquic has no send backpressure);
* ``QuicConnection._loss._rtt_smoothed`` / ``_rtt_initialized`` — the QUIC RTT estimate;
* ``QuicConnection._close_event`` — to notice a peer's CONNECTION_CLOSE at once instead
  of after the 3×PTO draining period;
* ``QuicServer._transport`` — to learn the bound port when listening on port 0;
* ``QuicConnection._initialize`` / ``tls._supported_groups`` — a client offers one key share
  (X25519) instead of four;
* ``QuicConnection._initialize`` / ``_loss.spaces`` / ``_loss._cc`` / ``_loss._pto_count``
  — a client resets loss recovery when a Retry restarts its handshake (RFC 9002 §6.3;
  aioquic keeps the PTO backoff and the old Initials' bytes in flight):
  :func:`reset_recovery_on_retry`; ``_handshake_complete``, ``_retry_count``,
  ``_remote_initial_source_connection_id``, ``_packet_number`` — where a timed-out connect
  attempt stalled (:func:`handshake_progress`);
* ``QuicConnection._initialize`` / ``tls._request_client_certificate`` — to make the server
  ask for a client certificate (mutual TLS), and ``tls._peer_certificate`` /
  ``_peer_certificate_chain`` to read what the client sent (aioquic validates neither; see
  :mod:`backbone.identity`).  Session tickets are never issued, so no resumed handshake
  skips the certificate.
* ``QuicConnectionProtocol._quic`` / ``_transmit_soon`` (protected API meant for subclasses).
* ``QuicConnection._spaces[ONE_RTT].ack_at`` and ``_ack_delay`` — a pending ACK is sent
  with our stream data rather than in a datagram of its own a millisecond later
  (:meth:`QuicEndpoint.write_now`, :meth:`QuicEndpoint.queue`), and the ACK of a message
  that asks for a result waits a little for that result (:meth:`QuicEndpoint.hold_ack`).
* ``QuicConnectionProtocol._process_events`` — a server connection handles a datagram
  without transmitting at once; the server's :class:`SocketReader` transmits once per
  connection at the end of each batch of datagrams (:meth:`_GatedServer.end_batch`).
* ``QuicConnection._spaces`` / ``_crypto_buffers`` / ``_crypto_streams`` — a server
  connection gives back its Initial and Handshake CRYPTO buffers once both epochs are
  discarded (:func:`release_handshake_memory`), and ``aioquic.quic.connection.EPOCHS`` is
  memoised (immutable frozensets, otherwise built again for every connection).
* ``QuicServer._protocols`` / ``_configuration`` — to tell a new connection's Initial from
  one of a known connection, before aioquic creates any state for it (:class:`_GatedServer`);
  ``_protocols`` is replaced by a :class:`ProtocolTable`, and ``_connection_terminated``
  overridden to use its reverse index (aioquic scans the whole table per ended connection);
  ``aioquic._buffer.Buffer`` to parse its header (``aioquic.buffer`` does not export it to
  the type checker).
* Stateless reset (RFC 9000 §10.3; aioquic neither sends nor detects one, see
  :mod:`backbone.reset`): ``QuicConnection._host_cids`` / ``_replenish_connection_ids`` —
  every connection ID a server connection issues (the first one, whose token goes into the
  ``stateless_reset_token`` transport parameter, and those of NEW_CONNECTION_ID) carries the
  token derived from the server's reset key (:func:`issue_reset_tokens`);
  ``QuicConnection._peer_cid`` / ``_network_paths[].peer_cid`` — the tokens of the server
  connection IDs a client uses (:func:`peer_reset_tokens`; ``_peer_cid_available`` too in
  :meth:`QuicEndpoint.peer_connection_ids`, for tests); ``QuicConnection._close_event`` /
  ``_close_end`` and ``QuicConnectionProtocol._process_events`` — a client that receives a
  reset ends the connection at once, without a draining period and without sending
  anything (:meth:`QuicEndpoint.reset_received`).

And of asyncio (CPython's selector event loop):

* ``_SelectorDatagramTransport._sock`` / ``_conn_lost`` and ``loop._add_reader`` — the
  server's socket is read by :class:`SocketReader` instead of the transport's own reader,
  which takes one datagram per event-loop pass.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import socket
import ssl
import struct
import sys
import time
from asyncio import selector_events
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import connection as _aioquic_connection
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch, Group
from cryptography.hazmat.primitives import serialization

from .admission import RecentRefusals
from .errors import ErrorCode
from .frames import ALPN
from .reset import is_stateless_reset

log = logging.getLogger("backbone.quic")

# aioquic's TLS alerts arrive as QUIC CRYPTO_ERROR 0x100 + alert
CRYPTO_ERROR_BASE = 0x100
CRYPTO_ERROR_MAX = 0x1FF
#: the transport close code of a connection refused before its handshake
CONNECTION_REFUSED = int(QuicErrorCode.CONNECTION_REFUSED)
#: the reason phrase of a connection ended by a stateless reset (it carries no code)
STATELESS_RESET_REASON = "stateless reset: the server no longer knows this connection"


def server_configuration(
    certfile: str,
    keyfile: str | None,
    idle_timeout: float,
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_frame_size=None,
    )
    config.load_cert_chain(certfile, keyfile)
    return config


def client_configuration(
    *,
    server_name: str,
    cafile: str | None,
    verify: bool,
    idle_timeout: float,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        server_name=server_name,
    )
    if verify:
        config.verify_mode = ssl.CERT_REQUIRED
        if cafile:
            config.load_verify_locations(cafile)
    else:
        config.verify_mode = ssl.CERT_NONE
    if certfile:
        config.load_cert_chain(certfile, keyfile)
    return config


#: how long the ACK of a message that asks for a result may wait for that result, from
#: the packet's arrival (:meth:`QuicEndpoint.hold_ack`).  Below aioquic's advertised
#: ``max_ack_delay`` (25 ms), which the peer adds to its retransmission timeout.
ACK_HOLD = 0.015


class QuicEndpoint(QuicConnectionProtocol):
    """A QUIC connection that reports stream data, handshake and termination to hooks.

    Subclasses override :meth:`stream_data`, :meth:`handshake_done` and
    :meth:`terminated`.  ``terminated`` is called exactly once, as early as possible:
    when our own close is requested, when the peer's CONNECTION_CLOSE arrives, or when
    aioquic reports the end of the connection.
    """

    #: a connection read by a :class:`SocketReader` (the server's, or a client's own): the
    #: connections that received a datagram in the current batch, transmitted once each
    #: at its end (None: transmit after every datagram, as aioquic does)
    _batch: list[QuicEndpoint] | None = None
    _in_batch = False
    #: a client connection's own socket reader (None for the server's connections, which
    #: share the server's)
    reader: SocketReader | None = None
    #: a server connection's: the server's socket reader (read before its timers fire)
    shared_reader: SocketReader | None = None
    #: where a client's connect attempt had got to when it was abandoned
    #: (:func:`handshake_progress`, taken before the connection is closed)
    abandoned_at = ""
    #: (stream, bytes, future): resolved once the peer has taken the stream's data down
    #: to that many bytes (:meth:`wait_unacked_below`)
    _drain_waiter: tuple[int, int, asyncio.Future[None]] | None = None

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self.terminated_reported = False
        self.refused = False
        self.close_code: int | None = None
        #: the close was a QUIC transport close (CONNECTION_CLOSE 0x1c, e.g. the server's
        #: CONNECTION_REFUSED before the handshake), not one of backbone's application codes
        self.close_by_transport = False
        self.close_reason = ""
        self.closed_by_peer = False
        #: the connection ended because a stateless reset from the server arrived
        self.stateless_reset = False
        self._detect_reset = quic.configuration.is_client
        self.reason: str | None = None  # our reason, when we closed it
        #: resolved when the handshake completes, failed if the connection ends first
        self.ready: asyncio.Future[None] = self._loop.create_future()

    # --- hooks --------------------------------------------------------------------
    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        raise NotImplementedError

    def handshake_done(self) -> None:
        pass

    def terminated(self, error_code: int, reason: str, by_peer: bool) -> None:
        pass

    def ended(self) -> None:
        """aioquic is done with this connection (:func:`release_connection`): drop what
        refers back to it."""

    def ping_acknowledged(self, uid: int) -> None:
        """The peer acknowledged the packet that carried :meth:`request_ack` ``uid``."""

    def stop_sending_received(self, stream_id: int, error_code: int) -> None:
        """The peer sent STOP_SENDING for ``stream_id``: aioquic reset our sending side, so
        nothing more can be written there.  Backbone's streams stay open for the
        connection's life: subclasses close the connection as a protocol violation."""
        self.shut(
            "protocol_violation",
            ErrorCode.PROTOCOL_ERROR,
            f"peer sent STOP_SENDING on stream {stream_id}, which must stay open",
        )

    def read_waiting(self) -> bool:
        """Read, now, what waits in this connection's own socket (a client's), before a
        verdict that depends on what the peer sent: an event loop that fell behind may
        run a timer in the same pass as the datagram that answers it arrived, before
        reading it.  False when the connection has no reader of its own."""
        reader = self.reader
        if reader is None or self.terminated_reported:
            return False
        reader.read_now("before a heartbeat verdict")
        return True

    def end_batch(self) -> None:
        """A client connection read by its own :class:`SocketReader`: the reader's batch
        of datagrams is done; transmit once for all of them."""
        batch = self._batch
        if batch:
            batch.clear()
            self._in_batch = False
            self.transmit()

    # --- aioquic plumbing -----------------------------------------------------------
    def _handle_timer(self) -> None:
        """aioquic's timer (loss detection and probes, ACK delay, idle timeout), after
        reading what waits in the socket (:meth:`SocketReader.catch_up`).

        asyncio runs every timer that is due in one pass, after one read of the socket.
        When thousands of connections' loss-detection timers come due together (a
        broadcast to 10,000 clients: each copy's probe timeout is about 30 ms after it was
        written), the pass declares their packets lost and resends them while the
        acknowledgements that would have cancelled the timers wait unread in the socket;
        the resends draw more acknowledgements, and the server spends its time resending
        (79 % of its samples in a 10,000-client broadcast, 0.6 % reading).  Reading
        first lets the acknowledgements that have arrived re-arm the timers instead."""
        reader = self.reader or self.shared_reader
        handle = self._timer
        if reader is not None and handle is not None:
            reader.catch_up()
            if self._timer is not handle:
                return  # what was read re-armed this connection's timer: that one decides
        super()._handle_timer()

    def quic_event_received(self, event: QuicEvent) -> None:
        if type(event) is StreamDataReceived:
            if self.terminated_reported:
                return
            self.stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, HandshakeCompleted):
            if not self._quic.configuration.is_client:
                release_handshake_memory(self._quic)
            if not self.ready.done():
                self.ready.set_result(None)
            self.handshake_done()
        elif isinstance(event, PingAcknowledged):
            if not self.terminated_reported:
                self.ping_acknowledged(event.uid)
        elif isinstance(event, StopSendingReceived):
            # aioquic has reset our side of the stream: every later write would raise
            if not self.terminated_reported:
                self.stop_sending_received(event.stream_id, event.error_code)
        elif isinstance(event, StreamReset):
            if not self.terminated_reported:
                self.stream_data(event.stream_id, b"", True)
        elif isinstance(event, ConnectionTerminated):
            self.close_by_transport = event.frame_type is not None
            self._report_terminated(event.error_code, event.reason_phrase, by_peer=True)
            # aioquic is done with it (TERMINATED: no timer, no datagram in or out); once
            # this event has been handled by everyone, break its reference cycles
            self._loop.call_soon(release_connection, self)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # a client checks every datagram before aioquic sees it (RFC 9000 §10.3.1 allows
        # it; a reset cannot be decrypted, so aioquic would only drop it)
        if (
            self._detect_reset
            and not self.terminated_reported
            and is_stateless_reset(cast(bytes, data), peer_reset_tokens(self._quic))
        ):
            self.reset_received()
            return
        batch = self._batch
        if batch is None:
            super().datagram_received(data, addr)
        else:
            # aioquic's datagram_received without its transmit: the reader transmits once
            # per connection at the end of its batch, so a burst of datagrams from one
            # peer (results, ACKs) costs one transmit, and its ACK goes with our answers
            self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
            self._process_events()
            if not self._in_batch:
                self._in_batch = True
                batch.append(self)
        if self._drain_waiter is not None:
            self._check_drained()
        close_event = self._quic._close_event
        if close_event is not None and not self.terminated_reported:
            self.close_by_transport = close_event.frame_type is not None
            # a CONNECTION_CLOSE from the peer puts aioquic in DRAINING; its own close (a
            # frame or limit the peer broke: a transport error) is pending or CLOSING.
            # Only after the handshake: a failed handshake (TLS) is reported as such
            # (connect.failed on a client, authentication events on a server).
            by_peer = not (
                self._quic._handshake_complete
                and (
                    self._quic._close_pending
                    or self._quic._state is _aioquic_connection.QuicConnectionState.CLOSING
                )
            )
            if not by_peer:
                self.transport_violation(close_event.error_code, close_event.reason_phrase)
            self._report_terminated(close_event.error_code, close_event.reason_phrase, by_peer)

    def transport_violation(self, error_code: int, reason: str) -> None:
        """aioquic closed the connection for a transport error of the peer's (a frame not
        negotiated, a flow-control or stream limit broken): the close is ours, for this
        reason; subclasses report it as the peer's protocol violation."""
        if self.reason is None:
            self.reason = "transport_error"

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected client socket: nobody listens there
        if isinstance(exc, ConnectionRefusedError):
            self.refused = True
            if not self.ready.done():  # still connecting: fail now, not at the timeout
                self.ready.set_exception(ConnectionRefusedError("nothing listens there"))
                self.ready.exception()

    def reset_received(self) -> None:
        """A stateless reset from the server: the connection is dead on its side (it
        restarted, or lost the connection's state).  End it at once: no draining period,
        nothing sent (anything sent would only draw another reset); :meth:`terminated`
        runs with ``stateless_reset`` set and ``close_code`` None."""
        self.stateless_reset = True
        quic = self._quic
        if quic._close_event is None:
            quic._close_event = ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR,
                frame_type=None,
                reason_phrase=STATELESS_RESET_REASON,
            )
        quic._close_end()  # TERMINATED: aioquic sends nothing and needs no timer any more
        self._process_events()  # the ConnectionTerminated: reported as closed by the peer
        self.transmit()  # cancels aioquic's timer

    def _report_terminated(self, error_code: int, reason: str, by_peer: bool) -> None:
        if self.terminated_reported:
            return
        self.terminated_reported = True
        self.close_code = None if self.stateless_reset else error_code
        self.close_reason = reason
        self.closed_by_peer = by_peer
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(describe_close(self.close_code, reason)))
            self.ready.exception()  # retrieved: nobody may be waiting
        self.terminated(error_code, reason, by_peer)

    # --- sending ----------------------------------------------------------------------
    def transmit(self) -> None:
        # a crashed or closed socket: nothing can be sent any more
        transport = self._transport
        if transport is not None and transport.is_closing():
            return
        super().transmit()

    def write(self, stream_id: int, data: bytes) -> None:
        """Queue stream data; it goes out on the next transmit (coalesced per loop pass)."""
        self._quic.send_stream_data(stream_id, data)
        self._transmit_soon()

    def queue(self, stream_id: int, data: bytes) -> None:
        """Queue stream data for the transmit that follows (the caller makes sure one
        does), with any pending acknowledgement: see :meth:`write_now`."""
        self._quic.send_stream_data(stream_id, data)
        self.ack_now()

    def write_now(self, stream_id: int, data: bytes) -> None:
        """Queue stream data and transmit at once (the caller already coalesced).

        An acknowledgement that is pending goes out with the data.  aioquic sends an ACK
        ``K_GRANULARITY`` (1 ms) after the packet that needs it, and only when due, so a
        RESULT written in the loop pass after its MESSAGE arrived left in one datagram
        and the ACK of that MESSAGE in another one a millisecond later: twice the
        datagrams, each costing both ends a full receive path.  Acknowledging early is
        always allowed (RFC 9000 §13.2.1)."""
        self.queue(stream_id, data)
        self.transmit()

    def _app_space(self) -> QuicPacketSpace | None:
        """aioquic's 1-RTT packet space (its ACK state and sent packets), once keys exist."""
        return self._quic._spaces.get(Epoch.ONE_RTT)

    def request_ack(self, uid: int) -> None:
        """Put a QUIC PING frame into the next packet: the peer's acknowledgement of that
        packet comes back as :meth:`ping_acknowledged` ``uid``.  (aioquic resends the
        PING if the packet is lost.)

        The packet also acknowledges whatever the peer sent since our last ACK, even
        packets that asked for none: when the peer only ever answers with ACK-only
        packets (a server answering heartbeats), nothing else would acknowledge them,
        and aioquic keeps every sent packet until it is acknowledged or declared lost —
        about 600 bytes more on the server per heartbeat of an idle client, for ever."""
        self._quic.send_ping(uid)
        space = self._app_space()
        if space is not None and space.ack_at is None and len(space.ack_queue):
            space.ack_at = self._loop.time()

    def sent_packets_unacked(self) -> int:
        """Packets sent in the 1-RTT space that the peer has not acknowledged yet (nor
        have they been declared lost): what aioquic keeps per connection."""
        space = self._app_space()
        return 0 if space is None else len(space.sent_packets)

    def ack_now(self) -> None:
        """Send the pending acknowledgement with the next transmit instead of
        ``K_GRANULARITY`` later on aioquic's timer: one transmit instead of two when
        nothing else is to be sent (a heartbeat the peer expects no frame for)."""
        space = self._app_space()
        if space is not None and space.ack_at is not None:
            space.ack_at = min(space.ack_at, self._loop.time())

    def hold_ack(self, delay: float = ACK_HOLD) -> None:
        """Let the pending acknowledgement wait up to ``delay`` after the packet that
        needs it (instead of aioquic's 1 ms), because an answer is on its way: a RESULT
        written by then carries the ACK (:meth:`write_now`), one datagram instead of two.
        Called while the packet that brought a message asking for a result is handled;
        RFC 9000 §13.2.1 allows up to the advertised ``max_ack_delay``."""
        space = self._app_space()
        if space is None or space.ack_at is None:
            return
        # aioquic set ack_at to the arrival of the oldest unacknowledged packet + 1 ms
        held = space.ack_at - self._quic._ack_delay + delay
        if held > space.ack_at:
            space.ack_at = held

    def shut(self, reason: str, code: int, detail: str = "") -> None:
        """Close from our side, remembering ``reason`` for the Disconnected event."""
        if self.reason is None:
            self.reason = reason
        self.close_with(int(code), f"{reason}: {detail}" if detail else reason)

    def close_with(self, error_code: int, reason: str) -> None:
        """Close the connection now (CONNECTION_CLOSE with an application code)."""
        self._report_terminated(error_code, reason, by_peer=False)
        if self._quic._close_event is None:
            self._quic.close(error_code=error_code, reason_phrase=reason[:200])
            self.transmit()

    def wait_unacked_below(self, stream_id: int, limit: int) -> asyncio.Future[None]:
        """Done once no more than ``limit`` bytes of ``stream_id`` wait for the peer
        (unsent, or sent and not acknowledged): checked after each datagram from the
        peer, whose acknowledgements and flow-control credit are what lower it."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiter = (stream_id, limit, fut)
        self._check_drained()
        return fut

    def _check_drained(self) -> None:
        assert self._drain_waiter is not None
        stream_id, limit, fut = self._drain_waiter
        if fut.done():
            self._drain_waiter = None
        elif self.unacked_bytes(stream_id) <= limit:
            self._drain_waiter = None
            fut.set_result(None)

    # --- introspection (private aioquic state) ---------------------------------------
    def unacked_bytes(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def smoothed_rtt(self) -> float | None:
        loss = self._quic._loss
        return float(loss._rtt_smoothed) if loss._rtt_initialized else None

    def peer_address(self) -> str:
        try:
            addr = self._quic._network_paths[0].addr
        except (AttributeError, IndexError):
            return "?"
        return format_address(addr)

    def is_closed(self) -> bool:
        return self.terminated_reported

    def peer_connection_ids(self) -> list[tuple[bytes, bytes]]:
        """(connection ID, stateless reset token) of every connection ID the peer issued
        to us that we know: the one in use first, then the unused ones (for tests and
        diagnostics; a token is empty until the peer has sent it)."""
        quic = self._quic
        cids = [quic._peer_cid, *quic._peer_cid_available]
        return [(c.cid, bytes(c.stateless_reset_token or b"")) for c in cids]

    def loop_time(self) -> float:
        return self._loop.time()


def release_handshake_memory(quic: QuicConnection) -> bool:
    """Give back the Initial and Handshake CRYPTO buffers (16 KiB each) and streams of a
    server connection whose handshake is done; True if released.

    aioquic keeps them for the connection's life, although once both epochs are
    discarded (their keys torn down) nothing is read from or written to them again: a
    packet of those epochs fails decryption before any frame is parsed, and
    ``_write_handshake`` returns at once without send keys.  Measured in
    ``bench/scale.py``'s memory study: about 16 KiB of RSS less per connection (the
    pages TLS wrote into).  The 1-RTT buffer stays (a server that issues no session
    tickets never writes it, but it costs little to keep it whole)."""
    spaces = quic._spaces
    if not (spaces[Epoch.INITIAL].discarded and spaces[Epoch.HANDSHAKE].discarded):
        return False
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE):
        quic._crypto_buffers[epoch] = Buffer(capacity=0)
        quic._crypto_streams[epoch] = QuicStream()
    return True


def issue_reset_tokens(quic: QuicConnection, token_for: Callable[[bytes], bytes]) -> None:
    """Server side, on a connection just created: every connection ID it issues carries
    ``token_for(cid)`` as its stateless reset token instead of aioquic's random one.

    The first ID's token goes into the ``stateless_reset_token`` transport parameter,
    which is serialised during the handshake, after this; later IDs are made by
    ``_replenish_connection_ids`` and their NEW_CONNECTION_ID frames written after it
    (the token is read when the frame is written, retransmissions included)."""
    for connection_id in quic._host_cids:
        connection_id.stateless_reset_token = token_for(connection_id.cid)
    original = quic._replenish_connection_ids

    def _replenish_connection_ids() -> None:
        original()
        for connection_id in quic._host_cids:
            if not connection_id.was_sent:
                connection_id.stateless_reset_token = token_for(connection_id.cid)

    quic._replenish_connection_ids = _replenish_connection_ids  # type: ignore[method-assign]


def peer_reset_tokens(quic: QuicConnection) -> list[bytes]:
    """The stateless reset tokens a received datagram is compared with: those of the
    peer connection IDs in use — the current one, and one reserved for a path being
    probed.  Unused and retired IDs are left out (RFC 9000 §10.3.1).  A token is empty
    until the peer sent it (transport parameters or NEW_CONNECTION_ID)."""
    tokens = [quic._peer_cid.stateless_reset_token or b""]
    for path in quic._network_paths:
        if path.peer_cid is not None:
            tokens.append(path.peer_cid.stateless_reset_token or b"")
    return tokens


def private_key_material(configuration: QuicConfiguration) -> bytes:
    """The TLS private key the configuration loaded, as PKCS#8 DER: the same bytes for
    the same key whatever the file's format (PEM or DER, alone or with the certificate,
    encrypted or not), from which the stateless reset key is derived."""
    key = configuration.private_key
    if key is None:
        raise ValueError("the QUIC configuration has no private key")
    der: bytes = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return der


# aioquic builds ~19 frozensets per connection for its frame table from EPOCHS(shortcut);
# the sets are immutable, so one of each is enough for every connection (~7 KiB each)
if not hasattr(_aioquic_connection.EPOCHS, "cache_info"):
    _aioquic_connection.EPOCHS = functools.lru_cache(maxsize=None)(_aioquic_connection.EPOCHS)


def format_address(addr: Any) -> str:
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"{host}:{addr[1]}"


UDP_BUFFER = 4 * 1024 * 1024


def _grow_buffers(sock: socket.socket | None, size: int) -> None:
    """Bigger kernel buffers: a burst of handshakes or a busy loop overflows the default
    208 KiB receive buffer and every dropped packet costs a QUIC retransmission timeout.
    Best effort (the kernel caps it at net.core.rmem_max)."""
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            log.debug("could not set socket buffer option %s", opt)


#: datagrams read per readiness callback, and seconds spent on them at most: enough to drain
#: a backlog quickly, little enough that timers and other callbacks still run between batches
READ_BUDGET = 128
READ_TIME_BUDGET = 0.010
#: a connection's aioquic timer reads the socket first when the last read ended at least
#: this long ago (:meth:`SocketReader.catch_up`)
CATCH_UP_AFTER = 0.001

# Linux stamps each datagram with its arrival time (SO_TIMESTAMPNS, a struct timespec in
# CLOCK_REALTIME); Python's socket module does not export the option's number.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


def _enable_timestamps(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        return bool(sock.getsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS))
    except OSError:
        return False


class SocketReader:
    """Reads a UDP socket (the server's, and each client connection's) in place of
    asyncio's own reader.

    CPython's ``_SelectorDatagramTransport._read_ready`` reads **one** datagram per
    event-loop pass, so a loop busy with other work starves its own socket: datagrams
    queue in the kernel for seconds.  This reader drains the socket each time it is
    readable, up to ``budget`` datagrams or ``time_budget`` seconds per callback.

    On Linux the kernel stamps each datagram's arrival (unless ``timestamps`` is False:
    a client neither drops nor reports late datagrams), so the reader knows how long each
    one ``waited`` in the socket.  A datagram that waited longer than ``max_wait`` is
    dropped unread (0: never): its sender has retransmitted anything that mattered by then,
    and reading stale datagrams is how a server stays behind.  ``late_at`` is the last
    time (loop clock) a datagram waited longer than ``late_after`` or was dropped: the
    server was behind its input then.

    After each batch the protocol's ``end_batch()`` (if it has one) transmits, once per
    connection, what the batch's datagrams called for.  ``lag`` tells whether the batch
    left datagrams behind, and how old they are (about: the last one read had waited
    that long).
    """

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        protocol: asyncio.DatagramProtocol,
        *,
        budget: int = READ_BUDGET,
        time_budget: float = READ_TIME_BUDGET,
        max_wait: float = 0.0,
        late_after: float = math.inf,
        timestamps: bool = True,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._sock: socket.socket = transport._sock  # type: ignore[attr-defined]
        self._loop = asyncio.get_running_loop()
        self.budget = budget
        self.time_budget = time_budget
        self.max_wait = max_wait
        self.late_after = late_after
        self.timestamps = _enable_timestamps(self._sock) if timestamps else False
        #: how long the datagram being handled waited in the socket (0 if unknown)
        self.waited = 0.0
        self.late_at = -math.inf
        self.dropped = 0
        self.batches = 0
        self.datagrams = 0
        #: how long the last datagram read had waited, when the last batch ended with
        #: datagrams still in the socket (it hit its budget); 0 when it emptied the socket
        self.lag = 0.0
        #: the protocol's end-of-batch hook (:meth:`_GatedServer.end_batch`)
        self._end_batch: Callable[[], None] | None = getattr(protocol, "end_batch", None)
        #: loop time at which the last read ended
        self.last_read_at = -math.inf
        self.catch_up_after = CATCH_UP_AFTER
        self._reading = False
        self._loop._add_reader(  # type: ignore[attr-defined]
            self._sock.fileno(), self._read_ready
        )

    def catch_up(self) -> None:
        """Read now (one batch), unless a read ended less than ``catch_up_after``
        seconds ago or is under way: called before a connection's timer fires
        (:meth:`QuicEndpoint._handle_timer`), so that a pass of many due timers reads
        the socket between them instead of once, with at least ``catch_up_after`` of
        other work between two reads (a batch itself may take up to ``time_budget``).
        A read under way is left alone by :meth:`_read_ready` itself."""
        if self._loop.time() - self.last_read_at < self.catch_up_after:
            return
        self.read_now("before a timer")

    def read_now(self, purpose: str) -> None:
        """One batch now, out of the loop's turn (``purpose`` names the caller in the
        log); a failure is logged, as the loop would report its own callback's."""
        try:
            self._read_ready()
        except Exception:
            log.exception("reading the socket %s failed", purpose)

    def _read_ready(self) -> None:
        transport = self._transport
        if transport._conn_lost or self._reading:  # type: ignore[attr-defined]
            return
        sock, protocol = self._sock, self._protocol
        max_wait, late_after = self.max_wait, self.late_after
        self.batches += 1
        stop_at = time.time() + self.time_budget
        lag = 0.0
        self._reading = True
        try:
            for _ in range(self.budget):
                try:
                    data, ancillary, _flags, addr = sock.recvmsg(65536, _ANCILLARY_SPACE)
                except (BlockingIOError, InterruptedError):
                    lag = 0.0
                    break
                except OSError as exc:
                    protocol.error_received(exc)
                    break
                self.datagrams += 1
                now = time.time()
                waited = 0.0
                for level, kind, raw in ancillary:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack(raw)
                        waited = now - (sec + nsec * 1e-9)
                lag = waited
                if waited > late_after:
                    self.late_at = self._loop.time()
                if max_wait and waited > max_wait:
                    self.dropped += 1
                    continue
                self.waited = waited
                try:
                    protocol.datagram_received(data, addr)
                except Exception:  # one connection's failure must not end everyone's batch
                    log.exception("handling a datagram from %s failed", format_address(addr))
                if transport.is_closing() or time.time() > stop_at:
                    break
        finally:
            self.waited = 0.0
            self.lag = lag
            end_batch = self._end_batch
            try:
                if end_batch is not None:
                    end_batch()
            finally:
                self._reading = False
                self.last_read_at = self._loop.time()


class Refusal(NamedTuple):
    """Why a new connection is refused, and how: ``close`` answers its Initial with
    CONNECTION_REFUSED, so the client gives up this attempt at once; ``retry`` answers
    it with a QUIC Retry (the client comes back at once with a token that proves its
    address); otherwise the packet is dropped unanswered and the client retransmits it
    after its timeout."""

    reason: str
    close: bool
    retry: bool = False
    #: the CONNECTION_REFUSED reason phrase (``reason`` when empty)
    phrase: str = ""


#: a gate sees a new connection's first packet (its peer address, and whether it carries
#: a token, i.e. answers a Retry) and admits it (None)
Gate = Callable[[str, bool], Refusal | None]
#: answers a packet for a connection the server does not know, given its destination
#: connection ID, the datagram's size and the peer address: the stateless reset to send
#: back, or None
ResetHook = Callable[[bytes, int, str], bytes | None]


class ResetHooks(NamedTuple):
    """A server's stateless resets: ``token(cid)`` is the reset token of each connection
    ID it issues; ``answer`` (None: never) answers packets of unknown connections."""

    token: Callable[[bytes], bytes]
    answer: ResetHook | None


class ProtocolTable(dict[bytes, QuicConnectionProtocol]):
    """aioquic's server table, connection ID -> protocol, with the reverse index it lacks.

    aioquic's ``QuicServer._connection_terminated`` finds an ended connection's IDs by
    scanning the whole table (about nine IDs per connection): O(all connections) for each
    one that ends.  With 10,000 connected clients and a few hundred handshakes ending a
    second while others connect, that scan was 70 % of the server's time and stalled its
    socket past the drop limit (docs/benchmarks.md).  Here each protocol's IDs are also
    kept in a set, so :meth:`drop` costs what that one connection has.  Lookups stay
    plain ``dict`` lookups; only assignment and deletion (new or retired IDs) are
    overridden."""

    __slots__ = ("_ids_of",)

    def __init__(self) -> None:
        super().__init__()
        self._ids_of: dict[int, set[bytes]] = {}  # id(protocol) -> its connection IDs

    def __setitem__(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        old = self.get(cid)
        if old is not None and old is not protocol:
            self._forget_id(old, cid)
        super().__setitem__(cid, protocol)
        self._ids_of.setdefault(id(protocol), set()).add(cid)

    def __delitem__(self, cid: bytes) -> None:
        protocol = self[cid]
        super().__delitem__(cid)
        self._forget_id(protocol, cid)

    def _forget_id(self, protocol: QuicConnectionProtocol, cid: bytes) -> None:
        ids = self._ids_of.get(id(protocol))
        if ids is not None:
            ids.discard(cid)
            if not ids:
                del self._ids_of[id(protocol)]

    def ids_of(self, protocol: QuicConnectionProtocol) -> frozenset[bytes]:
        return frozenset(self._ids_of.get(id(protocol), ()))

    def drop(self, protocol: QuicConnectionProtocol) -> None:
        """Remove every ID of ``protocol`` (what aioquic does when it has terminated)."""
        for cid in self._ids_of.pop(id(protocol), ()):
            if self.get(cid) is protocol:
                super().__delitem__(cid)

    def clear(self) -> None:  # aioquic's QuicServer.close()
        super().clear()
        self._ids_of.clear()

    _MISSING: Any = object()

    def pop(self, cid: bytes, default: Any = _MISSING) -> Any:
        if cid not in self:
            if default is ProtocolTable._MISSING:
                raise KeyError(cid)
            return default
        protocol = self[cid]
        del self[cid]
        return protocol

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("ProtocolTable: only item assignment, del, pop and clear change it")

    update = setdefault = popitem = __ior__ = _unsupported  # type: ignore[assignment]


class _GatedServer(QuicServer):
    """aioquic's server with a gate in front of new connections, and stateless resets for
    packets of connections it does not know.

    aioquic creates a connection, and starts the TLS work, for any Initial packet with an
    unknown connection ID.  Here the ``gate`` sees such a packet first.  A refused one is
    dropped, or answered with a stateless CONNECTION_CLOSE (CONNECTION_REFUSED) in an
    Initial packet, which costs a key derivation and one small packet instead of a
    handshake, and makes the client fail its connect attempt at once.

    aioquic drops any other packet with an unknown destination connection ID.  Here a
    short-header packet, or a Handshake packet, for an unknown connection ID goes to the
    ``reset`` hook, and the stateless reset it returns is sent back: the peer learns at
    once that its connection is gone (a restarted server knows none of its predecessor's
    connections).  Our connection IDs all have the configured length (aioquic: 8 bytes),
    which is how the destination connection ID of a short header is found.  0-RTT
    packets are not answered: their destination ID is the client's own choice, for which
    it holds no token.
    """

    gate: Gate | None = None
    reset: ResetHook | None = None
    reset_token: Callable[[bytes], bytes] | None = None
    #: read by a SocketReader: the connections to transmit at the end of its batch
    batch: list[QuicEndpoint] | None = None
    #: that reader (each connection reads through it before its timer fires)
    reader: SocketReader | None = None
    #: Retry tokens (aioquic's handler: AES-GCM over the address and connection IDs, valid
    #: 30 s), used only for the packets the gate sends through a Retry and those that come
    #: back with a token (aioquic's own ``_retry`` stays None otherwise)
    retry_tokens: QuicRetryTokenHandler | None = None

    def __init__(
        self, *, configuration: QuicConfiguration, create_protocol: Callable[..., QuicEndpoint]
    ) -> None:
        super().__init__(configuration=configuration, create_protocol=self._new_protocol)
        self._protocols: ProtocolTable = ProtocolTable()
        self._make_protocol = create_protocol
        #: Initials refused lately, by destination connection ID: their copies are refused
        #: again, never admitted
        self.refused = RecentRefusals()

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self._protocols.drop(protocol)

    def _new_protocol(self, quic: QuicConnection, **kw: Any) -> QuicEndpoint:
        if self.reset_token is not None:
            issue_reset_tokens(quic, self.reset_token)
        protocol = self._make_protocol(quic, **kw)
        protocol._batch = self.batch
        protocol.shared_reader = self.reader
        return protocol

    def end_batch(self) -> None:
        """The reader's batch is done: one transmit for each connection that received
        something in it (sends what the datagrams called for, ACKs that are due, and
        re-arms aioquic's timer)."""
        batch = self.batch
        if not batch:
            return
        endpoints = batch[:]
        batch.clear()
        for endpoint in endpoints:
            endpoint._in_batch = False  # all of them first: one failure must not strand others
        for endpoint in endpoints:
            try:
                endpoint.transmit()
            except Exception:  # as the loop would report a failed callback, and go on
                log.exception("transmit to %s failed", endpoint.peer_address())

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        if not data:
            return
        if not data[0] & 0x80:  # short header: the hot path of every live connection
            reset = self.reset
            if reset is not None:
                cid = data[1 : 1 + self._configuration.connection_id_length]
                if cid not in self._protocols:
                    self._send_reset(reset, cid, data, addr)
                    return
            super().datagram_received(data, addr)
            return
        header = self._unknown_long_header(data)
        if header is not None:
            if header.packet_type == QuicPacketType.INITIAL:
                gate = self.gate
                tokened = bool(header.token)
                # only an Initial of full size can open a connection
                if gate is not None and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:
                    refused = self.refused.get(header.destination_cid)
                    if refused is not None:
                        # a copy of an Initial already refused (the client resent it before
                        # our answer came): refused again with the same answer, never
                        # admitted — its client has given that attempt up, and the
                        # connection would hold a place until hello_timeout
                        if self._transport is not None:
                            self._transport.sendto(refusal_packet(header, refused), addr)
                        return
                    refusal = gate(format_address(addr), tokened)
                    if refusal is not None:
                        if refusal.retry:
                            self._with_retry(data, addr)  # aioquic sends the Retry
                        elif refusal.close and self._transport is not None:
                            phrase = refusal.phrase or refusal.reason
                            self.refused.remember(header.destination_cid, phrase)
                            self._transport.sendto(refusal_packet(header, phrase), addr)
                        return
                if tokened:
                    # the answer to our Retry: aioquic checks the token (INVALID_TOKEN if
                    # it is not ours, or too old) and binds the connection IDs it names
                    self._with_retry(data, addr)
                    return
            elif header.packet_type == QuicPacketType.HANDSHAKE and self.reset is not None:
                self._send_reset(self.reset, header.destination_cid, data, addr)
                return
        super().datagram_received(data, addr)

    def _with_retry(self, data: bytes, addr: Any) -> None:
        """aioquic's handling of a new connection's Initial with Retry on: without a token
        it answers with a Retry (stateless: no connection, no TLS work), with one it
        validates it and opens the connection."""
        if self.retry_tokens is None:
            self.retry_tokens = QuicRetryTokenHandler()
        self._retry = self.retry_tokens
        try:
            super().datagram_received(data, addr)
        finally:
            self._retry = None  # type: ignore[assignment]

    def _send_reset(self, reset: ResetHook, cid: bytes, data: bytes, addr: Any) -> None:
        packet = reset(cid, len(data), format_address(addr))
        if packet is not None and self._transport is not None:
            self._transport.sendto(packet, addr)

    def _unknown_long_header(self, data: bytes) -> QuicHeader | None:
        """The header of a long-header packet of a supported version whose destination
        connection ID belongs to no connection, else None."""
        configuration = self._configuration
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=configuration.connection_id_length
            )
        except ValueError:
            return None
        if (
            header.version not in configuration.supported_versions
            or header.destination_cid in self._protocols
        ):
            return None
        return header


def quic_error_name(code: int) -> str:
    """A QUIC transport error code's name (``FLOW_CONTROL_ERROR``, ``CRYPTO_ERROR 0x12a``)."""
    if CRYPTO_ERROR_BASE <= code <= CRYPTO_ERROR_MAX:
        return f"CRYPTO_ERROR {code:#x}"
    try:
        return QuicErrorCode(code).name
    except ValueError:
        return f"{code:#x}"


def refusal_packet(header: QuicHeader, reason: str) -> bytes:
    """A server Initial packet closing the connection with CONNECTION_REFUSED: stateless,
    keyed from the client's own destination connection ID (aioquic builds its
    INVALID_TOKEN close the same way)."""
    assert header.version is not None
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    phrase = reason.encode()[:100]
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY + len(phrase)
    )
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)  # the frame that caused it: none in particular
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


async def start_server(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicEndpoint],
    *,
    gate: Gate | None = None,
    resets: Callable[[int], ResetHooks] | None = None,
    max_wait: float = 0.0,
    late_after: float = math.inf,
) -> tuple[QuicServer, SocketReader | None, int]:
    """Listen; returns the server, the reader of its socket (None on an event loop whose
    transport this module does not know, which then reads one datagram per pass) and
    the bound port.  ``resets(bound port)`` gives the server's stateless reset hooks
    (:class:`_GatedServer`)."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: _GatedServer(configuration=configuration, create_protocol=create_protocol),
        local_addr=(host, port),
    )
    sockname = transport.get_extra_info("sockname")
    bound = int(sockname[1]) if sockname else port
    server.gate = gate
    if resets is not None:
        server.reset_token, server.reset = resets(bound)
    _grow_buffers(transport.get_extra_info("socket"), UDP_BUFFER)
    reader: SocketReader | None = None
    if isinstance(loop, selector_events.BaseSelectorEventLoop) and hasattr(transport, "_sock"):
        server.batch = []  # before any connection exists: each one is handed the list
        reader = SocketReader(transport, server, max_wait=max_wait, late_after=late_after)
        server.reader = reader
        if not reader.timestamps:
            log.info("no arrival timestamps on this platform: no datagram is dropped for age")
    else:
        log.warning("event loop %s: reading one datagram per loop pass", type(loop).__name__)
    return server, reader, bound


def server_connections(server: QuicServer) -> list[QuicConnectionProtocol]:
    return list(set(server._protocols.values()))


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> tuple[socket.AddressFamily, Any]:
    """The address to connect to.  An IP literal needs no lookup: ``loop.getaddrinfo``
    would still go through the default thread pool, a few ms on a busy machine (and
    every client of a reconnect storm queueing for the same few threads)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        return family, addr
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


async def open_connection(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicEndpoint],
) -> QuicEndpoint:
    """Start a QUIC client connection and wait for the handshake.  The caller applies the
    timeout; on failure the socket is closed and the error propagates."""
    loop = asyncio.get_running_loop()
    family, addr = await _resolve(loop, host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        sock.connect(addr)  # a connected UDP socket reports ICMP port unreachable
        _grow_buffers(sock, UDP_BUFFER // 4)
    except OSError:
        sock.close()
        raise
    connection = client_connection(configuration)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: create_protocol(connection), sock=sock
    )
    assert isinstance(protocol, QuicEndpoint)
    if isinstance(loop, selector_events.BaseSelectorEventLoop) and hasattr(transport, "_sock"):
        # drain the socket per readiness and transmit once per batch, as the server does:
        # one datagram per loop pass cost a pass, a handler wake-up and a transmit (an
        # ACK) per datagram of a busy connection
        protocol._batch = []
        protocol.reader = SocketReader(transport, protocol, timestamps=False)
    try:
        protocol.connect(addr)
        await protocol.ready
    except BaseException:
        protocol.abandoned_at = handshake_progress(connection)
        if not protocol.terminated_reported:
            protocol.close_with(0, "connect abandoned")
        discard_connection(protocol)
        raise
    return protocol


def release_connection(protocol: QuicEndpoint) -> None:
    """Break the reference cycles of a connection that has ended, so that reference
    counting frees it instead of the cyclic garbage collector (whose full collections walk
    every object still tracked: with thousands of connections, pauses of a second and
    more).  Only once aioquic's state is TERMINATED: it then has no timer and neither
    reads nor writes a datagram, so nothing calls what is cleared here.

    The cycles (found with ``gc.DEBUG_SAVEALL``): aioquic's per-connection frame-handler
    table and TLS, loss-recovery and key-logging callbacks (bound methods of the
    connection), our own patches of ``_initialize`` and ``_replenish_connection_ids``
    (closures over the connection), the protocol's CID callbacks (partials holding the
    protocol), a client connection's own ``reader`` (which holds the protocol and its
    ``end_batch``), and the endpoint's ``ended()`` hook for what the subclass holds."""
    quic = protocol._quic
    if quic._state is not _aioquic_connection.QuicConnectionState.TERMINATED:
        return
    state = quic.__dict__
    state["_QuicConnection__frame_handlers"] = {}
    for name in ("_initialize", "_replenish_connection_ids"):
        state.pop(name, None)  # instance patches; the class's methods remain
    quic._loss._send_probe = _nothing
    tls = getattr(quic, "tls", None)  # none before connect() (an attempt cancelled early)
    if tls is not None:
        tls.alpn_cb = tls.get_session_ticket_cb = tls.new_session_ticket_cb = None
        tls.update_traffic_key_cb = _nothing_with
    quic._cryptos = {}
    quic._cryptos_initial = {}
    protocol._connection_id_issued_handler = _nothing_with
    protocol._connection_id_retired_handler = _nothing_with
    protocol._connection_terminated_handler = _nothing
    protocol.reader = None  # a client's own SocketReader holds the protocol
    protocol.shared_reader = None
    protocol.ended()


def discard_connection(protocol: QuicEndpoint) -> None:
    """Close a client's failed connect attempt: close its socket; then nothing can arrive
    or leave any more, so end aioquic's connection now instead of after its closing or
    draining period, and break its reference cycles (:func:`release_connection`).

    Without this its timer is never armed again (``transmit`` skips a closed socket), it
    never reaches TERMINATED, and it waits for the cyclic collector (a restart storm's
    refused attempts: tens of thousands in a process hosting thousands of clients)."""
    close_transport(protocol)
    timer = protocol._timer
    if timer is not None:
        timer.cancel()
        protocol._timer = None
    quic = protocol._quic
    if quic._state is not _aioquic_connection.QuicConnectionState.TERMINATED:
        if quic._close_event is None:
            quic._close_event = ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR,
                frame_type=None,
                reason_phrase="connect attempt abandoned",
            )
        quic._close_end()
    release_connection(protocol)


def _nothing() -> None:
    pass


def _nothing_with(*args: Any, **kw: Any) -> None:
    pass


def close_transport(protocol: QuicEndpoint) -> None:
    if protocol._transport is not None:
        protocol._transport.close()


def client_connection(configuration: QuicConfiguration) -> QuicConnection:
    """aioquic's client connection with our client-side patches applied."""
    connection = QuicConnection(configuration=configuration)
    offer_one_key_share(connection)
    reset_recovery_on_retry(connection)
    return connection


def offer_one_key_share(quic: QuicConnection) -> None:
    """Client side: offer only an X25519 key share.  aioquic's client otherwise generates a
    key for every group it supports (P-256, P-384, X25519, X448) on every connect, which
    triples the client's handshake CPU — and a reconnect storm is all handshakes.  The
    backbone server (aioquic) supports X25519."""
    original = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        quic.tls._supported_groups = [Group.X25519]

    quic._initialize = _initialize  # type: ignore[method-assign]


def reset_recovery_on_retry(quic: QuicConnection) -> None:
    """Client side: when a Retry restarts the handshake, reset loss recovery as RFC 9002
    §6.3 requires ("Clients that receive a Retry packet reset congestion control and loss
    recovery state, including resetting any pending timers").

    aioquic 1.7 (``_connect`` → ``_initialize``) replaces the packet number spaces but
    keeps the PTO backoff count and the bytes of the Initials sent before the Retry in
    flight for good.  A client that had to resend its Initial k times before the Retry
    came (a server behind its socket drops Initials) then waits 0.2 s × 2^k before it
    resends the Initial that carries the token, and twice that each time after: with k = 5
    the resends go out 6.4, 12.8 and 25.6 s apart, past a 20 s connect timeout.  That was
    the connect timeouts of the restart storms with Retry (docs/benchmarks.md)."""
    original = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        loss = quic._loss
        before = [
            packet
            for space in loss.spaces
            for packet in space.sent_packets.values()
            if packet.in_flight
        ]
        original(peer_cid)
        if before:  # not the first call (connect): a Retry or a version negotiation
            loss._cc.on_packets_expired(packets=before)
        loss._pto_count = 0

    quic._initialize = _initialize  # type: ignore[method-assign]


def handshake_progress(quic: QuicConnection) -> str:
    """Where a client's connect attempt got to, for the reason of a connect timeout:
    whether a Retry came, whether any packet of the server was processed, the TLS state,
    how many packets went out and the PTO backoff (the loss timer's doublings)."""
    if quic._handshake_complete:
        step = "QUIC handshake complete"
    elif quic._remote_initial_source_connection_id is None:
        step = "no packet from the server processed"
    else:
        tls = getattr(quic, "tls", None)
        state = tls.state.name.lower() if tls is not None else "none"
        step = f"TLS at {state}"
    retry = ", after a Retry" if quic._retry_count else ""
    spaces = getattr(quic, "_spaces", None) or {}
    received = "/".join(
        "yes" if space.largest_received_packet >= 0 else "no" for space in spaces.values()
    )
    return (
        f"{step}{retry}; {quic._packet_number} packet(s) sent; a server packet in "
        f"Initial/Handshake/1-RTT: {received or 'none'}; PTO backoff {quic._loss._pto_count}"
    )


def request_client_certificate(quic: QuicConnection) -> None:
    """Make this server-side connection send a TLS CertificateRequest."""
    original = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = _initialize  # type: ignore[method-assign]


def peer_certificates(quic: QuicConnection) -> tuple[Any, list[Any]]:
    """The certificate the peer presented (or None) and its intermediates."""
    tls = getattr(quic, "tls", None)
    if tls is None:
        return None, []
    return tls._peer_certificate, list(tls._peer_certificate_chain or [])


def describe_close(error_code: int | None, reason: str) -> str:
    if error_code is None:  # a stateless reset carries no code
        return reason
    if CRYPTO_ERROR_BASE <= error_code <= CRYPTO_ERROR_MAX:
        return f"TLS alert {error_code - CRYPTO_ERROR_BASE}: {reason}"
    return f"code 0x{error_code:x}: {reason}"
