"""Property-based tests of the frame decoder (hypothesis), against a reference model.

The properties, for any byte string and any way of cutting it into reads:

* the decoder yields exactly the frames the unsplit input yields, or it raises one
  ``ProtocolViolation`` — with the same code the unsplit input raises — having yielded
  only a prefix of the model's frames; it never raises anything else;
* after every read it buffers at most ``max_frame + 5`` bytes (the model: at most one
  incomplete frame, whose declared length is within the limit);
* data frames it yields parse to a DataFrame or a ``ProtocolViolation``, nothing else.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backbone.errors import ErrorCode, ProtocolViolation
from backbone.frames import (
    FrameDecoder,
    FrameType,
    decode_payload,
    encode_credit,
    encode_data_frame,
    encode_json_frame,
    encode_ping,
    parse_data_frame,
)

KNOWN = sorted(int(t) for t in FrameType)


def model(data: bytes, max_frame: int) -> tuple[list[tuple[int, bytes]], ErrorCode | None, int]:
    """Reference decoder: (frames, error code or None, bytes left incomplete)."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while len(data) - pos >= 5:
        length = int.from_bytes(data[pos : pos + 4], "big")
        ftype = data[pos + 4]
        if length == 0:
            return frames, ErrorCode.PROTOCOL_ERROR, len(data) - pos
        if length > max_frame:
            return frames, ErrorCode.FRAME_TOO_LARGE, len(data) - pos
        if ftype not in KNOWN:
            return frames, ErrorCode.PROTOCOL_ERROR, len(data) - pos
        if pos + 4 + length > len(data):
            break
        frames.append((ftype, data[pos + 5 : pos + 4 + length]))
        pos += 4 + length
    return frames, None, len(data) - pos


def feed_split(
    data: bytes, cuts: list[int], max_frame: int
) -> tuple[list[tuple[int, bytes]], ProtocolViolation | None, list[int]]:
    """Feed ``data`` cut at ``cuts``; returns frames, the violation, and the buffered
    size after each successful read."""
    d = FrameDecoder(max_frame)
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    out: list[tuple[int, bytes]] = []
    sizes: list[int] = []
    for a, b in itertools.pairwise(points):
        try:
            out += d.feed(data[a:b])
        except ProtocolViolation as pv:
            return out, pv, sizes
        sizes.append(d.buffered)
    return out, None, sizes


# --- streams worth decoding: valid frames, with corruption sprinkled in ---------------------

mids = st.binary(min_size=16, max_size=16)
header_values = st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)


@st.composite
def valid_frame(draw: st.DrawFn, max_frame: int) -> bytes:
    kind = draw(st.sampled_from(["data", "json", "ping", "credit", "raw"]))
    if kind == "data":
        ftype = draw(st.sampled_from([FrameType.MESSAGE, FrameType.RESULT]))
        body = draw(st.binary(max_size=64))
        headers = draw(st.none() | header_values)
        frame = encode_data_frame(ftype, draw(st.integers(0, 7)), draw(mids), body, headers)
    elif kind == "json":
        ftype = draw(st.sampled_from([FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY]))
        fields = st.dictionaries(st.text(max_size=6), st.integers(-(2**63), 2**63 - 1), max_size=3)
        frame = encode_json_frame(ftype, draw(fields))
    elif kind == "ping":
        frame = encode_ping(draw(st.integers(0, 2**64 - 1)))
    elif kind == "credit":
        frame = encode_credit(draw(st.integers(0, 2**64 - 1)))
    else:  # any known type with any body: the decoder does not look inside
        body = draw(st.binary(max_size=80))
        frame = struct.pack("!IB", len(body) + 1, draw(st.sampled_from(KNOWN))) + body
    if len(frame) - 4 > max_frame:  # too big for this limit: keep its head, cut the body
        frame = struct.pack("!IB", max_frame, frame[4]) + frame[5 : 4 + max_frame]
    return frame


@st.composite
def bad_bytes(draw: st.DrawFn, max_frame: int) -> bytes:
    kind = draw(st.sampled_from(["zero", "huge", "type", "garbage", "flip"]))
    if kind == "zero":
        return struct.pack("!IB", 0, draw(st.sampled_from(KNOWN)))
    if kind == "huge":
        return struct.pack(
            "!IB", draw(st.integers(max_frame + 1, 2**32 - 1)), draw(st.sampled_from(KNOWN))
        )
    if kind == "type":
        return struct.pack(
            "!IB",
            draw(st.integers(1, max_frame)),
            draw(st.integers(0, 255).filter(lambda t: t not in KNOWN)),
        )
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=40))
    frame = draw(valid_frame(max_frame))
    i = draw(st.integers(0, len(frame) - 1))
    return frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1 :]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    max_frame = draw(st.sampled_from([9, 32, 100, 512, 4096]))
    parts = draw(
        st.lists(
            st.one_of(valid_frame(max_frame), valid_frame(max_frame), bad_bytes(max_frame)),
            max_size=12,
        )
    )
    data = b"".join(parts)
    if draw(st.booleans()) and data:  # a truncated tail
        data = data[: draw(st.integers(0, len(data)))]
    cuts = draw(st.lists(st.integers(0, max(0, len(data))), max_size=20))
    return data, max_frame, cuts


def check(data: bytes, max_frame: int, cuts: list[int]) -> None:
    want, want_error, left = model(data, max_frame)
    unsplit, unsplit_pv, _ = feed_split(data, [], max_frame)
    got, pv, sizes = feed_split(data, cuts, max_frame)
    # never more than one incomplete frame, within the limit
    assert all(s <= max_frame + 5 for s in sizes), (sizes, max_frame)
    if want_error is None:
        assert pv is None and unsplit_pv is None
        assert got == want == unsplit
        assert sizes[-1:] == ([left] if data else [])
    else:
        assert pv is not None and unsplit_pv is not None
        assert pv.code == unsplit_pv.code == want_error
        assert got == want[: len(got)]  # only frames before the bad one came out
    for ftype, body in got:
        if ftype in (FrameType.MESSAGE, FrameType.RESULT):
            try:
                df = parse_data_frame(ftype, body)
                decode_payload(df.flags, df.body)
            except ProtocolViolation:
                pass


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_any_split_of_a_structured_stream_matches_the_model(case):
    check(*case)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=3000),
    st.sampled_from([1, 9, 64, 512]),
    st.lists(st.integers(0, 3000), max_size=30),
)
def test_any_split_of_arbitrary_bytes_matches_the_model(data, max_frame, cuts):
    check(data, max_frame, cuts)


@settings(max_examples=60, deadline=None)
@given(st.lists(valid_frame(512), min_size=1, max_size=12))
def test_one_byte_reads_of_valid_frames(frames):
    data = b"".join(frames)
    got, pv, sizes = feed_split(data, list(range(len(data))), 512)
    assert pv is None and got == model(data, 512)[0] and len(got) == len(frames)
    assert max(sizes) <= 512 + 5 and sizes[-1] == 0


def test_largest_allowed_frame_is_buffered_up_to_the_bound_and_one_more_is_refused():
    max_frame = 1000
    body = b"\x00" * (max_frame - 1)
    frame = struct.pack("!IB", max_frame, FrameType.PING) + body
    d = FrameDecoder(max_frame)
    assert d.feed(frame[:-1]) == [] and d.buffered == max_frame + 3
    assert d.feed(frame[-1:]) == [(FrameType.PING, body)] and d.buffered == 0
    with pytest.raises(ProtocolViolation) as e:
        FrameDecoder(max_frame).feed(struct.pack("!IB", max_frame + 1, FrameType.PING))
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE


class DecoderMachine(RuleBasedStateMachine):
    """Reads of any size, in any order of valid and invalid input: the decoder always
    agrees with the model run over everything fed so far."""

    @initialize(max_frame=st.sampled_from([9, 64, 300]))
    def setup(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.decoder = FrameDecoder(max_frame)
        self.pending = b""  # generated, not yet fed
        self.fed = b""
        self.got: list[tuple[int, bytes]] = []
        self.error: ProtocolViolation | None = None

    @rule(data=st.data())
    def produce_valid(self, data: st.DataObject) -> None:
        self.pending += data.draw(valid_frame(self.max_frame))

    @rule(data=st.data())
    def produce_bad(self, data: st.DataObject) -> None:
        self.pending += data.draw(bad_bytes(self.max_frame))

    @precondition(lambda self: self.error is None and self.pending)
    @rule(n=st.integers(1, 200))
    def read(self, n: int) -> None:
        chunk, self.pending = self.pending[:n], self.pending[n:]
        self.fed += chunk
        try:
            self.got += self.decoder.feed(chunk)
        except ProtocolViolation as pv:
            self.error = pv

    @invariant()
    def agrees_with_the_model(self) -> None:
        want, want_error, left = model(self.fed, self.max_frame)
        if self.error is None:
            assert want_error is None
            assert self.got == want
            assert self.decoder.buffered == left <= self.max_frame + 5
        else:
            assert self.error.code == want_error
            assert self.got == want[: len(self.got)]


DecoderMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_decoder_state_machine = DecoderMachine.TestCase
