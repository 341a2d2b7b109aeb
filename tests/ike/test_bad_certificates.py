"""Certificates that ``cryptography`` loads but cannot fully parse (lazily: the version at load,
the subject, issuer or extensions when first read) end in AUTHENTICATION_FAILED with a reason
naming the certificate, never an exception out of agent.ike.auth.

Regression inputs: the four kinds fuzzing of the responder found (invalid X.509 version,
malformed subject, issuer, subjectAltName), rebuilt here by DER surgery on a real certificate
made with ``cryptography`` (tests/ike/conftest.py: node-b, issued by "meshsec test CA")."""
from __future__ import annotations

import pytest

from agent.ike import auth
from agent.ike.auth import AuthError
from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.model import Credentials

from tests.ike.conftest import T0, cert_creds, make_net, view


def _swap(der: bytes, needle: bytes, offset: int, new: int) -> bytes:
    """Replace one octet at ``offset`` from the (single) occurrence of ``needle``."""
    assert der.count(needle) == 1, needle
    i = der.index(needle) + offset
    return der[:i] + bytes([new]) + der[i + 1:]


def bad_certs(good: bytes) -> dict[str, bytes]:
    return {
        # [0] EXPLICIT Version INTEGER 2 (v3) -> 7: InvalidVersion, raised at load
        "version": _swap(good, bytes.fromhex("a003020102"), 4, 7),
        # subject CN "node-b" as INTEGER instead of UTF8String: ValueError when .subject is read
        "subject": _swap(good, b"\x0c\x06node-b", 0, 0x02),
        # subject CN as BIT STRING: TypeError when .subject is read
        "subject_bitstring": _swap(good, b"\x0c\x06node-b", 0, 0x03),
        # issuer CN as INTEGER: ValueError when .issuer is read
        "issuer": _swap(good, b"\x0c\x0fmeshsec test CA", 0, 0x02),
        # subjectAltName dNSName [2] -> [5] (ediPartyName, must be constructed): ValueError on .extensions
        "subject_alt_name": _swap(good, b"\x82\x06node-b", 0, 0x85),
    }


@pytest.fixture(scope="module")
def bad(pki):
    return bad_certs(pki["b"][1])


def test_the_surgery_makes_lazily_failing_certificates(bad):
    """Guard: each input really is one ``cryptography`` rejects (else the tests below prove nothing)."""
    from cryptography import x509
    for kind, der in bad.items():
        with pytest.raises((ValueError, TypeError, x509.InvalidVersion)):
            c = x509.load_der_x509_certificate(der)
            (c.version, c.subject, c.issuer, list(c.extensions))


@pytest.mark.parametrize("kind,field", [("version", "is not a DER X.509 certificate"),
                                        ("subject", "has a malformed subject"), ("subject_bitstring", "has a malformed subject"),
                                        ("issuer", "has a malformed issuer"), ("subject_alt_name", "has a malformed extensions")])
def test_chain_verification_names_the_bad_certificate(bad, pki, kind, field):
    with pytest.raises(AuthError) as ei:
        auth.verify_certificate_chain([bad[kind]], [pki["ca"]], T0)
    msg = str(ei.value)
    assert msg.startswith(f"certificate 0 {field}") and "; SHA-256 " in msg, msg


@pytest.mark.parametrize("kind", ["version", "subject", "subject_bitstring", "issuer", "subject_alt_name"])
def test_bad_intermediate_is_named_too(bad, pki, kind):
    with pytest.raises(AuthError, match=r"^certificate 1 .*; SHA-256 [0-9a-f]{16}"):
        auth.verify_certificate_chain([pki["a"][1], bad[kind]], [pki["ca"]], T0)


@pytest.mark.parametrize("kind", ["subject", "subject_bitstring", "issuer", "subject_alt_name"])
def test_accessors_of_an_unchecked_certificate_never_raise_anything_but_auth_error(bad, kind):
    """The helpers that take a certificate object are guarded as well."""
    from cryptography import x509
    c = x509.load_der_x509_certificate(bad[kind])
    assert auth._subject(c) in ("<unreadable subject>", "CN=node-b")
    for call in (lambda: auth.identity_matches_certificate(2, b"node-b", c),
                 lambda: auth.verify_digital_signature(c, b"x", b"\x01\x30" + b"\x00" * 8)):
        try:
            call()
        except AuthError:
            pass


@pytest.mark.parametrize("kind", ["version", "subject", "subject_bitstring", "issuer", "subject_alt_name"])
def test_responder_answers_authentication_failed(bad, pki, kind):
    """A (initiator) sends the malformed certificate in IKE_AUTH: B answers AUTHENTICATION_FAILED
    and logs the certificate; nothing escapes (no internal_error)."""
    a_creds = cert_creds(pki, "a")
    a_creds = Credentials(private_key_pem=a_creds.private_key_pem, certificate_chain=(bad[kind],),
                          ca_certificates=a_creds.ca_certificates)
    n = make_net(view("node-a", "node-b"), a_creds, view("node-b", "node-a"), cert_creds(pki, "b"))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", ChildSaEstablished) and not n.of("b", ChildSaEstablished)
    (db,) = n.of("b", IkeSaDeleted)
    assert db.reason.startswith("AUTHENTICATION_FAILED: certificate 0 ") and "SHA-256" in db.reason, db.reason
    (da,) = n.of("a", IkeSaDeleted)
    assert "AUTHENTICATION_FAILED" in da.reason
    assert "internal_error" not in n.a.counters and "internal_error" not in n.b.counters
    assert n.b.half_open() == 0


@pytest.mark.parametrize("kind", ["version", "subject", "issuer", "subject_alt_name"])
def test_initiator_refuses_a_responder_with_a_malformed_certificate(bad, pki, kind):
    b_creds = cert_creds(pki, "b")
    b_creds = Credentials(private_key_pem=b_creds.private_key_pem, certificate_chain=(bad[kind],),
                          ca_certificates=b_creds.ca_certificates)
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"), view("node-b", "node-a", initiate=False), b_creds)
    n.a.initiate("node-b", n.now)
    n.pump()
    (da,) = n.of("a", IkeSaDeleted)
    assert da.reason.startswith("AUTHENTICATION_FAILED: certificate 0 ") and "SHA-256" in da.reason, da.reason
    assert "internal_error" not in n.a.counters and "internal_error" not in n.b.counters


def test_mutated_certificates_end_in_auth_error_or_pass(pki):
    """A small deterministic mutation fuzz of a real leaf: every one-octet change either still
    verifies or is an AuthError; nothing else escapes (the property the responder relies on)."""
    import hashlib
    import warnings
    from cryptography.utils import CryptographyDeprecationWarning
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # pytest restores the filters
    good = pki["b"][1]
    outcomes = {"ok": 0, "auth_error": 0}
    for i in range(600):
        h = hashlib.sha256(b"mutate%d" % i).digest()
        pos = int.from_bytes(h[:4], "big") % len(good)
        bad = good[:pos] + bytes([h[4] if h[4] != good[pos] else h[4] ^ 1]) + good[pos + 1:]
        try:
            leaf = auth.verify_certificate_chain([bad], [pki["ca"]], T0)
            auth.identity_matches_certificate(2, b"node-b", leaf)
            outcomes["ok"] += 1
        except AuthError:
            outcomes["auth_error"] += 1
    assert outcomes["auth_error"] > 500, outcomes


def test_non_positive_serial_is_refused(pki):
    """RFC 5280 §4.1.2.2: serial numbers are positive; cryptography only warns about 0."""
    import warnings
    from cryptography.utils import CryptographyDeprecationWarning
    good = pki["b"][1]
    bad = _swap(good, bytes.fromhex("a003020102" "02010c"), 7, 0)  # serial 12 -> 0 (conftest: seed 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        with pytest.raises(AuthError, match="serial number that is not positive"):
            auth.verify_certificate_chain([bad], [pki["ca"]], T0)
