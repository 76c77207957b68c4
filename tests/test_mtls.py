"""Mutual TLS: a client must present a certificate chaining to the client CA, valid now,
whose CN or SAN equals the client id it claims.  Each refusal has its own reason, on the
server (auth.failed event) and on the client (connect.failed reason "auth" + detail)."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate

from backbone import ClientState, NotConnected
from backbone.certs import issue, make_dev_certs, write_pem

from .test_e2e import running


def _issue_client(certs, tmp_path: Path, name: str, **kw) -> tuple[str, str]:
    ca = load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    cert, ckey = issue(ca, key, name, client=True, **kw)
    cp, kp = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    write_pem(cert, cp)
    kp.write_bytes(
        ckey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cp), str(kp)


@pytest.fixture
def mtls_server(make_server, certs):
    def factory(**kw):
        return make_server(require_client_cert=True, client_cafile=str(certs.ca_cert), **kw)

    return factory


async def test_client_with_its_certificate_is_accepted(mtls_server, make_client, certs):
    cert, key = certs.clients["dev-1"]
    async with mtls_server() as server:
        client = make_client("dev-1", server.port, certfile=str(cert), keyfile=str(key))
        client.handler(lambda m: "hi")
        async with running(client):
            assert await server.send_to("dev-1", 1, wait_ack=True) == "hi"


async def refused(server, client, events, reason: str) -> None:
    async with client:
        ev = await events.wait("auth.failed", timeout=10)
        assert ev.reason == reason, ev
        failed = await events.wait("connect.failed", timeout=10)
        assert failed.reason == "auth" and reason in failed.detail
        await events.wait("reconnect.scheduled")  # it keeps backing off
    assert server.clients() == []


async def test_no_certificate(mtls_server, make_client, events):
    async with mtls_server() as server:
        await refused(server, make_client("dev-1", server.port), events, "no_certificate")


async def test_unknown_ca(mtls_server, make_client, events, tmp_path):
    other = make_dev_certs(tmp_path / "other", client_ids=("dev-1",))
    cert, key = other.clients["dev-1"]
    async with mtls_server() as server:
        client = make_client("dev-1", server.port, certfile=str(cert), keyfile=str(key))
        await refused(server, client, events, "unknown_ca")


async def test_expired_certificate(mtls_server, make_client, events, certs, tmp_path):
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert, key = _issue_client(certs, tmp_path, "dev-1", not_before=long_ago, days=30)
    async with mtls_server() as server:
        client = make_client("dev-1", server.port, certfile=cert, keyfile=key)
        await refused(server, client, events, "expired")


async def test_not_yet_valid_certificate(mtls_server, make_client, events, certs, tmp_path):
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    cert, key = _issue_client(certs, tmp_path, "dev-1", not_before=later)
    async with mtls_server() as server:
        client = make_client("dev-1", server.port, certfile=cert, keyfile=key)
        await refused(server, client, events, "not_yet_valid")


async def test_id_not_matching_the_certificate(mtls_server, make_client, events, certs):
    cert, key = certs.clients["dev-1"]
    async with mtls_server() as server:
        client = make_client("impostor", server.port, certfile=str(cert), keyfile=str(key))
        await refused(server, client, events, "id_mismatch")


async def test_client_can_be_told_to_stop_after_an_auth_failure(mtls_server, make_client, events):
    async with mtls_server() as server:
        client = make_client("dev-1", server.port, stop_on_auth_failure=True)
        async with client:
            # a waiter learns that the client stopped for good (it waited for ever)
            waiting = asyncio.ensure_future(client.wait_connected())
            await events.wait("state.changed", new="closed", timeout=10)
            assert client.state is ClientState.CLOSED
            with pytest.raises(NotConnected, match="refused our certificate"):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(NotConnected, match="refused our certificate"):
                await client.wait_connected()
        assert not events.of("reconnect.scheduled")


async def test_expired_server_certificate_is_a_tls_failure(make_client, events, certs, tmp_path):
    from backbone import Server

    ca = load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    scert, skey = issue(
        ca, key, "localhost", server_names=["localhost"], not_before=long_ago, days=30
    )
    sp, kp = tmp_path / "old.pem", tmp_path / "old.key"
    write_pem(scert, sp)
    kp.write_bytes(
        skey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    async with Server("127.0.0.1", 0, certfile=str(sp), keyfile=str(kp)) as server:
        client = make_client("dev-1", server.port)
        async with client:
            ev = await events.wait("connect.failed", timeout=10)
            assert ev.reason == "tls"


def test_a_certificate_from_another_issuer_is_unknown_ca_whatever_its_extensions(certs):
    """A certificate signed by a key the client CA does not know, without an Authority
    Key Identifier, made the verifier say something the wording check did not recognise:
    it was 'invalid', not 'unknown_ca'.  The issuer is now compared before the verifier
    runs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from backbone.identity import AuthFailure, verify_client_certificate

    cas = x509.load_pem_x509_certificates(certs.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthFailure) as failure:
        verify_client_certificate(self_signed, [], cas)
    assert failure.value.reason == "unknown_ca", failure.value
