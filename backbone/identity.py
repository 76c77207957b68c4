"""Client identity for mutual TLS: chain, validity and name checks with ``cryptography``.

aioquic's server does not validate client certificates (it only checks the
CertificateVerify signature), so backbone does it here, after the handshake and before
the HELLO is accepted.  Pure: the certificates and ``now`` come in, a verdict goes out.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


@dataclass(frozen=True)
class ClientIdentity:
    """Who a verified client certificate says the client is."""

    common_name: str | None
    names: frozenset[str]  # the CN and every DNS / URI / other SAN value

    def allows(self, client_id: str) -> bool:
        return client_id in self.names


class AuthFailure(Exception):
    """A client certificate was refused; ``reason`` is one of ``no_certificate``,
    ``unknown_ca``, ``expired``, ``not_yet_valid``, ``id_mismatch``, ``invalid``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_ca_certificates(path: str | Path) -> list[x509.Certificate]:
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    if not certs:
        raise ValueError(f"no certificate in {path}")
    return certs


def _names(cert: x509.Certificate) -> tuple[str | None, frozenset[str]]:
    names: set[str] = set()
    cn: str | None = None
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        cn = cn or value
        names.add(value)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names.update(san.get_values_for_type(x509.DNSName))
        names.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    return cn, frozenset(names)


def verify_client_certificate(
    leaf: x509.Certificate | None,
    chain: list[x509.Certificate],
    cas: list[x509.Certificate],
    now: datetime.datetime | None = None,
) -> ClientIdentity:
    """Verify ``leaf`` (with intermediates ``chain``) against the trusted ``cas`` at
    ``now``; raise :class:`AuthFailure` with a distinct reason, or return the identity."""
    if leaf is None:
        raise AuthFailure("no_certificate", "the client presented no certificate")
    now = now or datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc:
        raise AuthFailure(
            "not_yet_valid", f"certificate valid only from {leaf.not_valid_before_utc:%Y-%m-%d}"
        )
    if now > leaf.not_valid_after_utc:
        raise AuthFailure("expired", f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    known = {ca.subject for ca in cas} | {c.subject for c in chain}
    if leaf.issuer not in known:  # told apart before the verifier, not from its wording
        raise AuthFailure(
            "unknown_ca",
            f"certificate issued by {leaf.issuer.rfc4514_string()!r}, not by the client CA "
            "or an intermediate presented with it",
        )
    verifier = PolicyBuilder().store(Store(cas)).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, chain)
    except VerificationError as exc:
        text = str(exc)
        if "issuer" in text or "candidates" in text or "trust" in text:
            raise AuthFailure("unknown_ca", f"certificate does not chain to the client CA ({text})")
        raise AuthFailure("invalid", text)
    cn, names = _names(leaf)
    return ClientIdentity(cn, names)


def check_client_id(identity: ClientIdentity, client_id: str) -> None:
    if not identity.allows(client_id):
        shown = ", ".join(sorted(identity.names)) or "none"
        raise AuthFailure(
            "id_mismatch",
            f"client id {client_id!r} is not in the certificate (names: {shown})",
        )
