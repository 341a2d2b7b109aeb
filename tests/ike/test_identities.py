"""IKE identities besides ID_FQDN (RFC 7296 §3.5, RFC 4945 §3.1): ID_DER_ASN1_DN equal to the
certificate subject, ID_IPV4_ADDR / ID_IPV6_ADDR in the subjectAltName (and as PSK identities,
strongSwan's default), or a refusal whose reason names the mismatch."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent.iana import ExchangeType, IdType, PayloadType
from agent.ike import auth
from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.model import Credentials

from tests.ike.conftest import B_ADDR, T0, _key, cert_creds, make_ca, make_net, view
from tests.ike.helpers import inner


def _cert(name_attrs, san, seed):
    """A node certificate from the conftest CA (same key: make_ca is deterministic)."""
    ca_key, ca_cert = make_ca("meshsec test CA", 1001)
    key = _key(seed)
    nb = datetime.datetime.fromtimestamp(T0 - 3600, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name(name_attrs)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(seed).not_valid_before(nb)
            .not_valid_after(nb + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san), critical=False).sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, cert.public_bytes(serialization.Encoding.DER)


def _creds(pki, pem_der):
    return Credentials(private_key_pem=pem_der[0], certificate_chain=(pem_der[1],), ca_certificates=(pki["ca"],))


def _b_as(ident, b_creds, pki, a_expects=None):
    """node-b calls itself ``ident``; node-a expects ``a_expects`` (default the same)."""
    a_view = view("node-a", "node-b", peer_identity=a_expects or ident)
    b_view = replace(view("node-b", "node-a"), identity=ident)
    return make_net(a_view, cert_creds(pki, "a"), b_view, b_creds)


def _idr_sent_by_b(n):
    for src, d in n.log:
        if src == "b":
            from agent.ike.message import decode_message
            msg = decode_message(d.data)
            if msg.exchange == ExchangeType.IKE_AUTH and msg.is_response:
                _m, pl = inner(n, d.data)
                return next(p for p in pl if p.payload_type == PayloadType.IDr)
    return None


ORG = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"), x509.NameAttribute(NameOID.COMMON_NAME, "gw-b")]


@pytest.mark.parametrize("written", ["CN=gw-b,O=Example",  # RFC 4514 order
                                     "O=Example, CN=gw-b"])  # strongSwan / openssl order
def test_der_asn1_dn_equal_to_the_certificate_subject(pki, written):
    b = _cert(ORG, [x509.DNSName("gw-b")], 21)
    n = _b_as(written, _creds(pki, b), pki)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    idr = _idr_sent_by_b(n)
    assert idr.id_type == IdType.ID_DER_ASN1_DN
    assert idr.data == x509.load_der_x509_certificate(b[1]).subject.public_bytes()  # the subject, byte for byte


def test_der_asn1_dn_as_initiator_identity(pki):
    """B initiates with IDi = its subject DN; A (responder) finds the peer by that DN."""
    b = _cert(ORG, [x509.DNSName("gw-b")], 22)
    n = _b_as("CN=gw-b,O=Example", _creds(pki, b), pki)
    n.b.initiate("node-a", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_der_asn1_dn_not_the_expected_one_is_refused_naming_both(pki):
    b = _cert(ORG, [x509.DNSName("gw-b")], 23)
    n = _b_as("CN=gw-b,O=Example", _creds(pki, b), pki, a_expects="CN=gw-x,O=Example")
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert ("peer identity 'CN=gw-b,O=Example' (ID_DER_ASN1_DN) is not the expected 'CN=gw-x,O=Example'"
            in d.reason), d.reason


def test_der_asn1_dn_that_is_not_the_certificate_subject_is_refused(pki):
    """B claims a DN its certificate does not carry (RFC 4945 §3.1.5)."""
    b = _cert(ORG, [x509.DNSName("gw-b")], 24)
    n = _b_as("CN=gw-b,O=Other", _creds(pki, b), pki)
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert "ID_DER_ASN1_DN identity 'CN=gw-b,O=Other' does not equal the certificate subject CN=gw-b,O=Example" \
        in d.reason, d.reason


@pytest.mark.parametrize("addr", ["198.51.100.2", "2001:db8::2"])
def test_ip_address_identity_in_the_subject_alt_name(pki, addr):
    b = _cert([x509.NameAttribute(NameOID.COMMON_NAME, "gw-b")], [x509.IPAddress(ipaddress.ip_address(addr))], 25)
    n = _b_as(addr, _creds(pki, b), pki, a_expects=addr.upper())  # another spelling of the same address
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    idr = _idr_sent_by_b(n)
    assert idr.id_type == (IdType.ID_IPV4_ADDR if ":" not in addr else IdType.ID_IPV6_ADDR)
    assert idr.data == ipaddress.ip_address(addr).packed


def test_ip_address_identity_missing_from_the_certificate_is_refused(pki):
    b = _cert([x509.NameAttribute(NameOID.COMMON_NAME, "gw-b")], [x509.DNSName("gw-b")], 26)
    n = _b_as(B_ADDR, _creds(pki, b), pki)
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert "ID_IPV4_ADDR identity 198.51.100.2 not among the certificate's iPAddress SANs []" in d.reason, d.reason


def test_psk_with_address_identities_both_ways():
    """strongSwan's default identity with a PSK is its IP address (ID_IPV4_ADDR)."""
    psk = b"identities tests psk 0123456789ab"
    a_view = replace(view("node-a", "node-b", peer_identity="198.51.100.2"), identity="198.51.100.1")
    b_view = replace(view("node-b", "node-a", peer_identity="198.51.100.1"), identity="198.51.100.2")
    n = make_net(a_view, Credentials(psk=psk), b_view, Credentials(psk=psk))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_identity_helpers():
    dn = x509.Name.from_rfc4514_string("CN=moon,O=strongSwan,C=CH")
    text = auth.id_text(IdType.ID_DER_ASN1_DN, dn.public_bytes())
    assert text == "CN=moon,O=strongSwan,C=CH"
    assert auth.same_identity("C=CH, O=strongSwan, CN=moon", text)
    assert not auth.same_identity("C=CH, O=strongSwan, CN=sun", text)
    assert not auth.same_identity("moon", text)
    assert auth.id_text(IdType.ID_DER_ASN1_DN, b"\x30\x03\x31\x01") is None  # malformed: no crash
    assert auth.id_text(IdType.ID_IPV4_ADDR, b"\x01\x02\x03") is None
    assert auth.id_text(IdType.ID_KEY_ID, b"k") is None
    assert auth.id_for_identity("gw.example") == (IdType.ID_FQDN, b"gw.example")
    assert auth.id_for_identity("CN=x") is None  # IDr left out: the DN's RDN order is ambiguous in text
