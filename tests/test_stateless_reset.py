"""QUIC stateless reset (RFC 9000 §10.3): the server answers packets of connections it
does not know with a reset carrying a token derived from its key, and the client drops a
connection the server reset at once instead of waiting for its heartbeat timeout.

The first half is sans-I/O (token derivation, building, detection, rate limit); the
second runs over loopback QUIC: a server that dies without a word and comes back on the
same port.  Tests wait on events, never on bare sleeps."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from backbone import Server
from backbone.certs import DevCerts
from backbone.client import _close_category
from backbone.config import ServerConfig
from backbone.reset import (
    MIN_RESET_SIZE,
    MIN_TRIGGER_SIZE,
    StatelessResetter,
    build_stateless_reset,
    derive_reset_key,
    is_hex_key,
    is_stateless_reset,
    key_material,
    reset_token,
)
from backbone.settings import ServeSettings, SettingsError

KEY = derive_reset_key(b"k" * 32, 4433)
CID = bytes(range(8))


# --- sans-I/O --------------------------------------------------------------------------


def test_token_is_deterministic_per_key_and_differs_per_cid_and_key() -> None:
    token = reset_token(KEY, CID)
    assert len(token) == 16
    assert reset_token(KEY, CID) == token  # a restarted server computes the same
    assert reset_token(KEY, bytes(8)) != token
    assert reset_token(derive_reset_key(b"other key material", 4433), CID) != token


def test_reset_key_derivation_is_deterministic_and_one_way() -> None:
    material = os.urandom(64)
    key = derive_reset_key(material, 4433)
    assert len(key) == 32
    assert derive_reset_key(material, 4433) == key  # the same server, restarted
    assert derive_reset_key(material + b"x", 4433) != key
    assert material.find(key) < 0 and key != material[:32]
    # servers sharing a certificate on other ports: no oracle for each other's tokens
    assert derive_reset_key(material, 4434) != key


@pytest.mark.parametrize("trigger", [22, 23, 30, 42, 43, 44, 60, 100, 1200, 1500])
def test_a_reset_is_shorter_than_its_trigger_and_ends_with_the_token(trigger: int) -> None:
    token = reset_token(KEY, CID)
    rng = random.Random(trigger)
    for _ in range(50):
        packet = build_stateless_reset(token, trigger, rng.randbytes)
        assert packet is not None
        assert MIN_RESET_SIZE <= len(packet) < trigger
        assert packet[0] & 0xC0 == 0x40  # short header form, fixed bit set
        assert packet.endswith(token)
        if trigger <= 43:  # RFC 9000 §10.3: one byte shorter than a short trigger
            assert len(packet) == trigger - 1
        else:
            assert 43 <= len(packet) <= 63


def test_the_bytes_before_the_token_are_unpredictable() -> None:
    token = reset_token(KEY, CID)
    packets = {build_stateless_reset(token, 100) for _ in range(20)}
    assert len(packets) == 20


def test_no_reset_for_a_trigger_under_22_bytes() -> None:
    assert MIN_TRIGGER_SIZE == 22
    for size in range(MIN_TRIGGER_SIZE):
        assert build_stateless_reset(reset_token(KEY, CID), size) is None
    resetter = StatelessResetter(KEY, rate=100, burst=10, now=0.0)
    assert resetter.answer(CID, 21, 0.0) is None
    assert (resetter.sent, resetter.too_small) == (0, 1)


def test_detection() -> None:
    token = reset_token(KEY, CID)
    other = reset_token(KEY, bytes(8))
    reset = build_stateless_reset(token, 60)
    assert reset is not None
    assert is_stateless_reset(reset, [token])
    assert is_stateless_reset(reset, [b"", other, token])  # any token of ours
    assert not is_stateless_reset(reset, [other])  # a wrong token (another key or CID)
    assert not is_stateless_reset(reset, [])
    assert not is_stateless_reset(reset, [b""])  # token not known yet
    # an ordinary short-header packet: its last 16 bytes are an AEAD tag
    assert not is_stateless_reset(bytes([0x41]) + os.urandom(50), [token])
    # a long-header packet that happens to end with the token
    assert not is_stateless_reset(bytes([0xC0]) + os.urandom(40) + token, [token])
    # too short to be a reset, even when it ends with the token
    assert not is_stateless_reset(bytes([0x40]) + os.urandom(3) + token, [token])
    assert is_stateless_reset(bytes([0x40]) + os.urandom(4) + token, [token])


def test_rate_limit_with_an_injected_clock() -> None:
    resetter = StatelessResetter(KEY, rate=4.0, burst=3, now=100.0)
    assert resetter.enabled
    answers = [resetter.answer(CID, 60, 100.0) for _ in range(5)]
    assert [a is not None for a in answers] == [True, True, True, False, False]
    assert (resetter.sent, resetter.limited) == (3, 2)
    assert resetter.answer(CID, 60, 100.125) is None  # half a token
    assert resetter.answer(CID, 60, 100.25) is not None  # 0.25 s at 4/s: one more
    assert resetter.answer(CID, 60, 100.25) is None
    assert all(resetter.answer(CID, 60, 200.0) for _ in range(3))  # full burst again
    assert resetter.sent == 7
    off = StatelessResetter(KEY, rate=0, burst=10, now=0.0)
    assert not off.enabled and off.answer(CID, 60, 0.0) is None


def test_every_answer_carries_the_token_of_its_cid() -> None:
    resetter = StatelessResetter(KEY, rate=100, burst=10, now=0.0)
    for cid in (CID, b"\xff" * 8):
        packet = resetter.answer(cid, 80, 0.0)
        assert packet is not None and packet.endswith(reset_token(KEY, cid))


def test_explicit_key_setting(tmp_path: Any) -> None:
    hex_key = "0123456789abcdef" * 2
    assert is_hex_key(hex_key) and is_hex_key(hex_key.upper() * 2)
    assert not is_hex_key(hex_key[:-2])  # 15 bytes
    assert not is_hex_key(hex_key + "0")  # odd
    assert key_material(hex_key) == bytes.fromhex(hex_key)
    path = tmp_path / "reset.key"
    path.write_bytes(b"s" * 16)
    assert key_material(str(path)) == b"s" * 16
    path.write_bytes(b"s" * 15)
    with pytest.raises(ValueError, match="at least 16"):
        key_material(str(path))
    with pytest.raises(OSError):
        key_material(str(tmp_path / "missing"))
    assert ServerConfig(stateless_reset_key=hex_key).stateless_reset_key is not None
    assert ServerConfig(stateless_reset_key="").stateless_reset_key is None
    with pytest.raises(ValidationError, match="at least 32"):
        ServerConfig(stateless_reset_key="abcd")
    # a secret: never shown in the model's repr, nor by --print-config or in an error
    assert hex_key not in repr(ServerConfig(stateless_reset_key=hex_key))
    settings = ServeSettings.load(None, {"stateless_reset_key": hex_key})
    assert 'stateless_reset_key = "**********"' in settings.to_toml()
    with pytest.raises(SettingsError) as refused:
        ServeSettings.load(None, {"stateless_reset_key": hex_key[:-2]})
    assert hex_key[:-2] not in str(refused.value)


def test_the_client_names_a_reset_stateless_reset() -> None:
    assert _close_category(None, stateless_reset=True) == "stateless_reset"
    assert _close_category(0, by_transport=True, stateless_reset=True) == "stateless_reset"
    assert _close_category(None) == "error"
    assert _close_category(0x8) == "rejected"


# --- over loopback QUIC -----------------------------------------------------------------


def tls_reset_key(certs: DevCerts, port: int) -> bytes:
    """The reset key a server on ``port`` derives from its TLS private key, computed
    independently."""
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return derive_reset_key(der, port)


async def vanish(server: Server) -> None:
    """The server dies as under SIGKILL: its socket closes and nothing is sent — no
    GOAWAY, no CONNECTION_CLOSE.  Returns once the port is free."""
    transport = server._quic_server._transport
    sock = transport.get_extra_info("socket")
    transport.abort()
    async with asyncio.timeout(5):
        while sock.fileno() != -1:  # closed in the next loop pass (connection_lost)
            await asyncio.sleep(0)


async def test_server_issued_connection_ids_carry_the_derived_tokens(
    make_server, make_client, certs
):
    async with make_server() as server:
        key = tls_reset_key(certs, server.port)
        client = make_client("dev-1", server.port)
        async with client:
            await client.wait_connected(5)
            conn = client._conn
            assert conn is not None
            ids = conn.peer_connection_ids()
            # the initial ID (token from the transport parameters) and NEW_CONNECTION_IDs
            assert len(ids) >= 2
            for cid, token in ids:
                assert len(cid) == 8
                assert token == reset_token(key, cid)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


def handshake_packet(dcid: bytes, payload_size: int) -> bytes:
    """A QUIC v1 Handshake packet header (long header, type 2) with a junk payload."""
    scid = os.urandom(8)
    length = payload_size.to_bytes(2, "big")
    return (
        bytes([0xE0])
        + (1).to_bytes(4, "big")
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + bytes([0x40 | length[0], length[1]])
        + os.urandom(payload_size)
    )


async def test_server_answers_unknown_connections_with_a_reset(make_server, certs, caplog):
    caplog.set_level(logging.INFO, logger="backbone.server")
    loop = asyncio.get_running_loop()
    async with make_server() as server:
        key = tls_reset_key(certs, server.port)
        transport, receiver = await loop.create_datagram_endpoint(
            _Receiver, remote_addr=("127.0.0.1", server.port)
        )
        try:
            cid = os.urandom(8)
            transport.sendto(bytes([0x40]) + cid + os.urandom(12))  # 21 bytes: no answer
            transport.sendto(bytes([0x41]) + cid + os.urandom(40))  # 49 bytes
            reset = await asyncio.wait_for(receiver.queue.get(), 5)
            assert MIN_RESET_SIZE <= len(reset) < 49  # the answer to the 49-byte one
            assert reset[0] & 0xC0 == 0x40
            assert reset.endswith(reset_token(key, cid))
            assert server.stats().stateless_resets == 1

            # a Handshake packet for an unknown connection is answered too
            other = os.urandom(8)
            transport.sendto(handshake_packet(other, 40))
            reset = await asyncio.wait_for(receiver.queue.get(), 5)
            assert reset.endswith(reset_token(key, other))
            assert server.stats().stateless_resets == 2

            # summed up in the log (once a second, by the stats sampler)
            server._report_resets()
            logged = re.findall(r"sent (\d+) stateless reset\(s\)", caplog.text)
            assert sum(map(int, logged)) == 2
        finally:
            transport.close()


@pytest.mark.parametrize("key", ["from_tls_key", "key_file"])
async def test_restarted_server_resets_the_old_connection_and_the_client_reconnects(
    make_server, make_client, events, tmp_path, key
):
    # heartbeat timeout 0.2 s × 100 = 20 s: detection by heartbeat would take far longer
    # than the bound below; the client pings every 0.2 s, so it sends a packet soon
    hb: dict[str, Any] = dict(heartbeat_interval=0.2, heartbeat_misses=100)
    srv = dict(hb)
    if key == "key_file":  # both runs read the same explicit key
        (tmp_path / "reset.key").write_bytes(os.urandom(32))
        srv["stateless_reset_key"] = str(tmp_path / "reset.key")
    loop = asyncio.get_running_loop()
    async with make_server(**srv) as first:
        port = first.port
        client = make_client("dev-1", port, **hb)
        async with client:
            await client.wait_connected(5)
            before = await events.wait("connected", role="client")
            # steady state: a ping answered; the client's next packet is its next ping
            await events.wait_new("heartbeat.acknowledged", role="client", timeout=5)
            reconnected = events.expect("connected", role="client", timeout=10)
            await vanish(first)
            t_kill = loop.time()
            async with make_server(port, **srv) as second:
                second.handler(lambda m: m.payload)
                gone = await events.wait("disconnected", role="client", timeout=5)
                noticed = loop.time() - t_kill
                assert gone.reason == "stateless_reset", gone
                assert gone.code is None and "stateless reset" in gone.detail
                assert gone.session_id == before.session_id
                assert noticed < 2.0  # a ping interval and a round trip, not 20 s
                assert second.stats().stateless_resets >= 1
                back = await reconnected
                assert back.session_id != before.session_id
                assert second.client("dev-1") is not None
                assert await client.send({"n": 1}, wait_ack=True, timeout=5) == {"n": 1}
                print(f"\n  reset noticed {noticed * 1000:.0f} ms after the kill")
    assert not events.of("heartbeat.timed_out", role="client")
    assert not events.of("connect.failed")
    states = [(e.old, e.new, e.reason) for e in events.of("state.changed")]
    assert ("connected", "backoff", "stateless_reset") in states
    sched = events.of("reconnect.scheduled")
    assert sched and sched[0].reason == "stateless_reset"


async def test_a_reset_with_another_key_does_not_drop_the_connection(
    make_server, make_client, events
):
    # heartbeat timeout 0.2 s × 4 = 0.8 s keeps this fast; the new server has another
    # reset key, so its resets carry tokens the client does not know
    hb: dict[str, Any] = dict(heartbeat_interval=0.2, heartbeat_misses=4)
    loop = asyncio.get_running_loop()
    async with make_server(**hb) as first:
        port = first.port
        client = make_client("dev-1", port, **hb)
        async with client:
            await client.wait_connected(5)
            reconnected = events.expect("connected", role="client", timeout=10)
            await vanish(first)
            t_kill = loop.time()
            async with make_server(port, stateless_reset_key="ab" * 16, **hb) as second:
                gone = await events.wait("disconnected", role="client", timeout=5)
                noticed = loop.time() - t_kill
                # the resets arrived and were ignored: the heartbeat decided
                resets = second.stats().stateless_resets
                assert resets >= 1
                assert gone.reason == "heartbeat_timeout", gone
                assert events.of("heartbeat.timed_out", role="client")
                assert noticed >= 0.8 - 0.2 - 0.05  # the last PONG came before the kill
                await reconnected
                assert second.client("dev-1") is not None
                print(f"\n  {resets} foreign reset(s) ignored; dead after {noticed:.2f} s")
