"""CA: node certificate issue / verify round trip, CSR rejection, persistence."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.ca import CertificateAuthority, CsrError
from controller.store import Store

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def csr_der(key, cn: str | None = "node-a") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(NOW)


def test_issue_and_verify(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_for_csr(csr_der(key), "node-a", dt.timedelta(hours=24), NOW)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=node-a"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["node-a"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    other = ca.issue_for_csr(csr_der(key), "node-a", dt.timedelta(hours=24), NOW)
    assert other.serial_number != cert.serial_number


def test_empty_subject_accepted(ca: CertificateAuthority) -> None:
    cert = ca.issue_for_csr(csr_der(ec.generate_private_key(ec.SECP256R1()), None), "node-a",
                            dt.timedelta(hours=1), NOW)
    assert cert.subject.rfc4514_string() == "CN=node-a"


def test_garbage_csr(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="not a DER PKCS#10 request"):
        ca.issue_for_csr(b"\x30\x03junk", "node-a", dt.timedelta(hours=1), NOW)


def test_rsa_key_refused(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CsrError, match="must be ECDSA P-256.*got RSA 2048"):
        ca.issue_for_csr(csr_der(key), "node-a", dt.timedelta(hours=1), NOW)


def test_other_curve_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="got ECDSA secp384r1"):
        ca.issue_for_csr(csr_der(ec.generate_private_key(ec.SECP384R1())), "node-a", dt.timedelta(hours=1), NOW)


def test_wrong_subject_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="subject must be empty or CN=node-a, got 'CN=node-b'"):
        ca.issue_for_csr(csr_der(ec.generate_private_key(ec.SECP256R1()), "node-b"), "node-a",
                         dt.timedelta(hours=1), NOW)


def test_bad_signature_refused(ca: CertificateAuthority) -> None:
    der = bytearray(csr_der(ec.generate_private_key(ec.SECP256R1())))
    der[-5] ^= 0x01  # inside the ECDSA signature
    with pytest.raises(CsrError):
        ca.issue_for_csr(bytes(der), "node-a", dt.timedelta(hours=1), NOW)


def test_server_cert_names(ca: CertificateAuthority) -> None:
    _, pem = ca.issue_server(["127.0.0.1", "ctl.example"], NOW)
    san = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["meshsec-controller", "ctl.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_ca_persists_in_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    first = CertificateAuthority.load_or_create(store, NOW)
    store.close()
    store = Store(tmp_path / "state")
    again = CertificateAuthority.load_or_create(store, NOW)
    assert again.certificate_der == first.certificate_der
    assert repr(again).find("key=") == -1
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
    assert (tmp_path / "state" / "controller.db").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("cn,tag", [(b"\xff\xfe node-a", 0x0C), (b"\xc3\x28", 0x0C)])
def test_subject_that_does_not_decode_is_a_csr_error(ca: CertificateAuthority, cn: bytes, tag: int) -> None:
    """Issue 13: the subject is parsed lazily; a value that is not valid UTF-8 (or PrintableString)
    raised ValueError out of issue_for_csr, so Enroll answered UNKNOWN."""
    from tests.controller.test_capacity_and_bad_requests import csr_with_raw_cn
    with pytest.raises(CsrError, match="CSR subject is unreadable .*make it empty or CN=node-a"):
        ca.issue_for_csr(csr_with_raw_cn(cn, tag), "node-a", dt.timedelta(hours=1), dt.datetime.now(dt.timezone.utc))
