"""Sans-I/O tests of the per-connection protocol: a client and a server session exchange
bytes in memory, with explicit ``now`` values.  No sockets, no event loop."""

import struct

import pytest

from backbone.errors import ErrorCode, ProtocolViolation
from backbone.frames import (
    FrameType,
    encode_data_frame,
    encode_json_frame,
    encode_payload,
    encode_ping,
)
from backbone.session import (
    HEARTBEAT_STREAM,
    MSG_STREAM,
    ClientSession,
    Hello,
    PingReceived,
    PongReceived,
    ServerSession,
    Welcome,
)

MID = b"\x01" * 16


def server(now=0.0, **kw):
    args = dict(
        max_payload=1024, heartbeat_interval=15.0, heartbeat_misses=3, hello_timeout=10.0, now=now
    )
    args.update(kw)
    return ServerSession(**args)


def client(now=0.0, cid="dev-7"):
    return ClientSession(
        client_id=cid, max_payload=2048, heartbeat_interval=15.0, heartbeat_misses=3, now=now
    )


def pump(src, dst, now):
    out = []
    for sid, data in src.data_to_send():
        out += dst.receive_stream_data(sid, data, False, now)
    return out


def open_pair(now=0.0):
    c, s = client(now), server(now)
    (hello,) = pump(c, s, now)
    assert isinstance(hello, Hello)
    s.accept(hello, "sess-1", {}, now)
    (welcome,) = pump(s, c, now)
    assert isinstance(welcome, Welcome)
    return c, s


def test_hello_welcome_negotiates_payload_limits():
    c, s = open_pair()
    assert s.client_id == "dev-7" and s.state == "open"
    assert s.peer_max_payload == 2048
    assert c.state == "open" and c.session_id == "sess-1"
    assert c.peer_max_payload == 1024


def test_default_heartbeat_timing_15s_ping_45s_eviction():
    c, s = open_pair(now=100.0)
    # first ping at once after WELCOME, then every 15 s
    assert c.get_timer() == 100.0
    assert c.handle_timer(100.0) is None
    assert c.take_pings() == [1]  # the caller asks QUIC to acknowledge the PING's packet
    assert pump(c, s, 100.0) == [PingReceived(1)]
    assert s.data_to_send() == []  # no PONG: the client said so in its HELLO
    # the QUIC acknowledgement of the packet answers the PING
    pong = c.ping_acknowledged(1, 100.001)
    assert isinstance(pong, PongReceived) and pong.rtt == pytest.approx(0.001)
    assert c.ping_acknowledged(1, 100.002) is None  # once
    assert c.take_pings() == []
    assert c.get_timer() == 115.0
    assert s.get_timer() == 145.0
    # the client crashes: no more pings; eviction at exactly 100 + 45
    assert s.check_timer(144.999) is None
    v = s.check_timer(145.0)
    assert v is not None and v.code == ErrorCode.HEARTBEAT_TIMEOUT


def test_client_declares_server_dead_when_pongs_stop():
    c, _s = open_pair(now=0.0)
    t = 0.0
    while True:
        verdict = c.handle_timer(t)
        if verdict is not None:
            break
        c.data_to_send()  # pings vanish: the server died silently
        t = c.get_timer()
    assert verdict.code == ErrorCode.HEARTBEAT_TIMEOUT
    assert t == 45.0


def test_hello_timeout():
    s = server(now=5.0)
    assert s.get_timer() == 15.0
    assert s.check_timer(14.9) is None
    assert s.check_timer(15.0).code == ErrorCode.HELLO_TIMEOUT


def frame_bytes(ftype, **fields):
    return encode_json_frame(ftype, fields)


@pytest.mark.parametrize(
    ("stream", "data", "code"),
    [
        (MSG_STREAM, b"\x00\x00\x00\x09garbage!!", ErrorCode.PROTOCOL_ERROR),  # garbage
        (MSG_STREAM, b"\xff" * 64, ErrorCode.FRAME_TOO_LARGE),  # garbage read as a length
        (MSG_STREAM, struct.pack("!IB", 2**32 - 1, FrameType.MESSAGE), ErrorCode.FRAME_TOO_LARGE),
        (MSG_STREAM, encode_data_frame(FrameType.MESSAGE, 0, MID, b"1"), ErrorCode.PROTOCOL_ERROR),
        (
            MSG_STREAM,
            frame_bytes(FrameType.HELLO, version=1, client_id=""),
            ErrorCode.INVALID_CLIENT_ID,
        ),
        (
            MSG_STREAM,
            frame_bytes(FrameType.HELLO, version=1, client_id="a\x00b"),
            ErrorCode.INVALID_CLIENT_ID,
        ),
        (
            MSG_STREAM,
            frame_bytes(FrameType.HELLO, version=1, client_id="x" * 257),
            ErrorCode.INVALID_CLIENT_ID,
        ),
        (
            MSG_STREAM,
            frame_bytes(FrameType.HELLO, version=99, client_id="ok"),
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        (MSG_STREAM, frame_bytes(FrameType.WELCOME, version=1), ErrorCode.PROTOCOL_ERROR),
        (HEARTBEAT_STREAM, encode_ping(1), ErrorCode.PROTOCOL_ERROR),  # ping before hello
        (8, encode_ping(1), ErrorCode.PROTOCOL_ERROR),  # unexpected stream
    ],
)
def test_bad_input_before_or_in_the_hello(stream, data, code):
    s = server()
    with pytest.raises(ProtocolViolation) as e:
        s.receive_stream_data(stream, data, False, 0.0)
    assert e.value.code == code


def test_second_hello_is_refused():
    _c, s = open_pair()
    with pytest.raises(ProtocolViolation, match="second HELLO"):
        s.receive_stream_data(
            MSG_STREAM, frame_bytes(FrameType.HELLO, version=1, client_id="dev-7"), False, 1.0
        )


def test_ending_a_stream_is_a_protocol_error():
    _c, s = open_pair()
    with pytest.raises(ProtocolViolation, match="must stay open"):
        s.receive_stream_data(MSG_STREAM, b"", True, 1.0)


def test_messages_flow_after_open_and_frame_limit_follows_max_payload():
    _c, s = open_pair()
    flags, body = encode_payload({"op": 1})
    frame = encode_data_frame(FrameType.MESSAGE, flags, MID, body)
    (df,) = s.receive_stream_data(MSG_STREAM, frame, False, 1.0)
    assert df.msg_id == MID
    big = encode_data_frame(FrameType.MESSAGE, 0, MID, b"1" * (1024 + 9000))
    with pytest.raises(ProtocolViolation) as e:
        s.receive_stream_data(MSG_STREAM, big, False, 1.0)
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE


def test_heartbeat_stream_carries_only_pings():
    _c, s = open_pair()
    with pytest.raises(ProtocolViolation, match="heartbeat stream"):
        s.receive_stream_data(HEARTBEAT_STREAM, frame_bytes(FrameType.HELLO), False, 1.0)


def test_a_client_that_wants_pongs_gets_them():
    """A HELLO without ``"pong": false`` (a client that reads PONG frames, not QUIC
    acknowledgements) gets a PONG for every PING, and a client takes a PONG as an answer
    as well as an acknowledgement."""
    s = server(now=0.0)
    hello = encode_json_frame(
        FrameType.HELLO, {"version": 1, "client_id": "old-1", "max_payload": 1024}
    )
    (h,) = s.receive_stream_data(MSG_STREAM, hello, False, 0.0)
    s.accept(h, "sess-2", {}, 0.0)
    s.data_to_send()  # the WELCOME
    assert s.receive_stream_data(HEARTBEAT_STREAM, encode_ping(7), False, 1.0) == [PingReceived(7)]
    ((sid, pong),) = s.data_to_send()
    assert sid == HEARTBEAT_STREAM and pong[4] == FrameType.PONG
    # and backbone's client accepts a PONG from such a server
    c, s2 = open_pair(now=0.0)
    assert c.handle_timer(0.0) is None
    (nonce,) = c.take_pings()
    pump(c, s2, 0.0)
    s2.answer_pings = True
    s2.receive_stream_data(HEARTBEAT_STREAM, encode_ping(nonce), False, 0.0)
    (answer,) = pump(s2, c, 0.002)
    assert isinstance(answer, PongReceived) and answer.rtt == pytest.approx(0.002)
