"""agent.ike.auth: §2.15 signed octets, PSK AUTH, RFC 7427 signatures,
certificate chains, identities, CERTREQ hashes.

Certificates are generated here with ``cryptography`` at fixed dates; the
fake clock is a plain float ``NOW``.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac as std_hmac
import ipaddress

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from agent.iana import HashAlgorithm, IdType, PrfId
from agent.ike.auth import (
    AuthError,
    _pss_alg_id,
    certreq_hash,
    find_by_certreq_hash,
    identity_matches_certificate,
    load_private_key,
    psk_auth,
    rest_of_id_payload,
    sign_digital_signature,
    signed_octets,
    verify_certificate_chain,
    verify_digital_signature,
    verify_psk_auth,
)

UTC = datetime.timezone.utc
T0 = datetime.datetime(2030, 1, 1, tzinfo=UTC)
NOW = (T0 + datetime.timedelta(days=10)).timestamp()
DAY = 86400.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshsec"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject_key, cn, issuer_key=None, issuer_name=None, *, ca=False, sans=None,
              days=30, start=T0, bc=True, sign_hash=hashes.SHA256()):
    issuer_key = issuer_key or subject_key
    b = (x509.CertificateBuilder()
         .subject_name(_name(cn))
         .issuer_name(issuer_name or _name(cn))
         .public_key(subject_key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(start)
         .not_valid_after(start + datetime.timedelta(days=days)))
    if bc:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    h = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else sign_hash
    return b.sign(issuer_key, h)


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki():
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert(ca_key, "meshsec CA", ca=True, days=3650)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_cert(int_key, "meshsec intermediate", ca_key, ca.subject, ca=True, days=365)
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = make_cert(node_key, "node-a", ca_key, ca.subject,
                     sans=[x509.DNSName("node-a"), x509.IPAddress(ipaddress.ip_address("198.51.100.1")),
                           x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
                           x509.RFC822Name("ops@node-a.example")])
    leaf2_key = ec.generate_private_key(ec.SECP256R1())
    leaf2 = make_cert(leaf2_key, "node-b", int_key, inter.subject, sans=[x509.DNSName("node-b")])
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = make_cert(other_ca_key, "meshsec CA", ca=True, days=3650)  # same name, other key
    return dict(ca_key=ca_key, ca=ca, int_key=int_key, inter=inter, node_key=node_key, node=node,
                leaf2=leaf2, leaf2_key=leaf2_key, other_ca=other_ca, other_ca_key=other_ca_key)


# ---------------------------------------------------------------- §2.15

def test_signed_octets_layout():
    msg, nonce, sk_p = b"IKE_SA_INIT bytes", b"N" * 32, b"k" * 32
    rest = rest_of_id_payload(IdType.ID_FQDN, b"node-a")
    assert rest == b"\x02\x00\x00\x00node-a"
    got = signed_octets(PrfId.PRF_HMAC_SHA2_256, msg, nonce, sk_p, rest)
    # independent check with the standard library HMAC
    assert got == msg + nonce + std_hmac.new(sk_p, rest, hashlib.sha256).digest()
    with pytest.raises(AuthError):
        rest_of_id_payload(300, b"")
    with pytest.raises(AuthError, match="unsupported prf"):
        signed_octets(99, msg, nonce, sk_p, rest)


def test_psk_auth():
    octets = b"octets to authenticate"
    psk = b"correct horse battery staple"
    got = psk_auth(PrfId.PRF_HMAC_SHA2_256, psk, octets)
    pad_key = std_hmac.new(psk, b"Key Pad for IKEv2", hashlib.sha256).digest()
    assert got == std_hmac.new(pad_key, octets, hashlib.sha256).digest()
    verify_psk_auth(PrfId.PRF_HMAC_SHA2_256, psk, octets, got)
    with pytest.raises(AuthError, match="PSK AUTH data does not match"):
        verify_psk_auth(PrfId.PRF_HMAC_SHA2_256, b"wrong psk", octets, got)
    with pytest.raises(AuthError, match="does not match"):
        verify_psk_auth(PrfId.PRF_HMAC_SHA2_256, psk, octets + b"x", got)
    with pytest.raises(AuthError, match="does not match"):
        verify_psk_auth(PrfId.PRF_HMAC_SHA2_256, psk, octets, got[:-1])
    with pytest.raises(AuthError, match="empty"):
        psk_auth(PrfId.PRF_HMAC_SHA2_256, b"", octets)
    assert len(psk_auth(PrfId.PRF_HMAC_SHA2_512, psk, octets)) == 64


# ---------------------------------------------------------------- RFC 7427

# DER AlgorithmIdentifiers as listed in RFC 7427 Appendix A (ecdsa-with-SHA256) and RFC 8420 (id-Ed25519)
ALG_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ALG_ED25519 = bytes.fromhex("300506032b6570")


def test_ecdsa_p256_sign_verify(pki):
    octets = b"InitiatorSignedOctets"
    auth = sign_digital_signature(pki["node_key"], octets, (HashAlgorithm.SHA2_256,))
    assert auth[0] == len(ALG_ECDSA_SHA256) and auth[1:1 + auth[0]] == ALG_ECDSA_SHA256
    # the signature is a DER Ecdsa-Sig-Value (SEQUENCE of two INTEGERs)
    sig = auth[1 + auth[0]:]
    assert sig[0] == 0x30 and sig[1] == len(sig) - 2
    assert verify_digital_signature(pki["node"], octets, auth) == "ECDSA-SHA256"
    assert verify_digital_signature(pki["node_key"].public_key(), octets, auth) == "ECDSA-SHA256"
    # PEM input works too
    pem = pki["node_key"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    assert verify_digital_signature(pki["node"], octets, sign_digital_signature(pem, octets))


def test_ed25519_sign_verify():
    k = ed25519.Ed25519PrivateKey.generate()
    auth = sign_digital_signature(k, b"octets")
    assert auth[1:1 + auth[0]] == ALG_ED25519 and len(auth) == 1 + 7 + 64
    assert verify_digital_signature(k.public_key(), b"octets", auth) == "Ed25519"
    with pytest.raises(AuthError, match="IDENTITY"):
        sign_digital_signature(k, b"octets", (HashAlgorithm.SHA2_256,))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rsa_pss_sign_verify(rsa_key):
    auth = sign_digital_signature(rsa_key, b"octets")
    alg = auth[1:1 + auth[0]]
    assert alg == _pss_alg_id(hashes.SHA256)
    assert verify_digital_signature(rsa_key.public_key(), b"octets", auth) == "RSASSA-PSS-SHA256"
    # the signature really is PSS / MGF1-SHA-256 / salt 32
    rsa_key.public_key().verify(auth[1 + auth[0]:], b"octets",
                                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())


def test_rsa_pss_algorithm_identifier_matches_openssl(rsa_key):
    # OpenSSL's encoding of the same parameters in a certificate's signatureAlgorithm
    cert = (x509.CertificateBuilder().subject_name(_name("x")).issuer_name(_name("x"))
            .public_key(rsa_key.public_key()).serial_number(1)
            .not_valid_before(T0).not_valid_after(T0 + datetime.timedelta(days=1))
            .sign(rsa_key, hashes.SHA256(),
                  rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)))
    assert _pss_alg_id(hashes.SHA256) in der(cert)


def test_rsa_pkcs1_verify_accepted(rsa_key):
    alg = bytes.fromhex("300d06092a864886f70d01010b0500")  # sha256WithRSAEncryption, RFC 7427 Appendix A
    sig = rsa_key.sign(b"octets", padding.PKCS1v15(), hashes.SHA256())
    assert verify_digital_signature(rsa_key.public_key(), b"octets", bytes([len(alg)]) + alg + sig) == \
        "RSA-PKCS1-SHA256"


def test_bad_signatures_rejected(pki, rsa_key):
    octets = b"ResponderSignedOctets"
    auth = sign_digital_signature(pki["node_key"], octets)
    # altered octets (e.g. a modified IKE_SA_INIT)
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(pki["node"], octets + b"!", auth)
    # flipped signature byte
    bad = bytearray(auth)
    bad[-1] ^= 1
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(pki["node"], octets, bytes(bad))
    # another key's certificate
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(pki["leaf2"], octets, auth)
    # truncated / garbage AUTH data
    for junk in (b"", b"\x0a", auth[:5], b"\xff" + auth[1:], b"\x02\x30\x00sig"):
        with pytest.raises(AuthError):
            verify_digital_signature(pki["node"], octets, junk)
    # Ed25519 and PSS tampering
    k = ed25519.Ed25519PrivateKey.generate()
    a = bytearray(sign_digital_signature(k, octets))
    a[20] ^= 0x80
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(k.public_key(), octets, bytes(a))
    a = bytearray(sign_digital_signature(rsa_key, octets))
    a[-3] ^= 0x80
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(rsa_key.public_key(), octets, bytes(a))


def test_algorithm_identifier_must_match_key(pki, rsa_key):
    octets = b"octets"
    ec_auth = sign_digital_signature(pki["node_key"], octets)
    ed = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(AuthError, match="ECDSA does not match the peer's RSA-2048 key"):
        verify_digital_signature(rsa_key.public_key(), octets, ec_auth)
    with pytest.raises(AuthError, match="ECDSA does not match the peer's Ed25519 key"):
        verify_digital_signature(ed.public_key(), octets, ec_auth)
    # ECDSA signature relabelled as Ed25519
    sig = ec_auth[1 + ec_auth[0]:]
    relabelled = bytes([len(ALG_ED25519)]) + ALG_ED25519 + sig
    with pytest.raises(AuthError, match="Ed25519 does not match the peer's EC secp256r1 key"):
        verify_digital_signature(pki["node"], octets, relabelled)
    rsa_auth = sign_digital_signature(rsa_key, octets)
    with pytest.raises(AuthError, match="RSA does not match"):
        verify_digital_signature(pki["node"], octets, rsa_auth)
    # ECDSA with a hash other than the one used: relabel SHA-256 as SHA-384
    alg384 = bytes.fromhex("300a06082a8648ce3d040303")
    with pytest.raises(AuthError, match="does not verify"):
        verify_digital_signature(pki["node"], octets, bytes([len(alg384)]) + alg384 + sig)
    # unknown OID (sha1WithRSAEncryption is not accepted)
    alg_sha1 = bytes.fromhex("300d06092a864886f70d0101050500")
    with pytest.raises(AuthError, match="unsupported signature algorithm OID 1.2.840.113549.1.1.5"):
        verify_digital_signature(rsa_key.public_key(), octets, bytes([len(alg_sha1)]) + alg_sha1 + b"s" * 256)
    # PSS without parameters (SHA-1 defaults) is refused
    alg_pss_bare = bytes.fromhex("300d06092a864886f70d01010a3000")
    with pytest.raises(AuthError, match="RSASSA-PSS"):
        verify_digital_signature(rsa_key.public_key(), octets, bytes([len(alg_pss_bare)]) + alg_pss_bare + b"s")


def test_load_private_key_errors():
    with pytest.raises(AuthError, match="cannot load"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(AuthError, match="cannot load"):
        sign_digital_signature(b"not a key", b"x")


# ---------------------------------------------------------------- chains

def test_chain_direct_and_intermediate(pki):
    leaf = verify_certificate_chain([der(pki["node"])], [der(pki["ca"])], NOW)
    assert leaf == pki["node"]
    leaf = verify_certificate_chain([der(pki["leaf2"]), der(pki["inter"])], [der(pki["ca"])], NOW)
    assert leaf.subject == pki["leaf2"].subject
    # with several anchors, the right one is found
    assert verify_certificate_chain([der(pki["node"])], [der(pki["other_ca"]), der(pki["ca"])], NOW)


def test_chain_expired_and_not_yet_valid(pki):
    with pytest.raises(AuthError, match="peer certificate .*node-a.* expired"):
        verify_certificate_chain([der(pki["node"])], [der(pki["ca"])], NOW + 40 * DAY)
    with pytest.raises(AuthError, match="not yet valid"):
        verify_certificate_chain([der(pki["node"])], [der(pki["ca"])], NOW - 20 * DAY)
    # expired trust anchor
    old_ca_key = ec.generate_private_key(ec.SECP256R1())
    old_ca = make_cert(old_ca_key, "old CA", ca=True, days=5)
    leaf = make_cert(pki["node_key"], "node-a", old_ca_key, old_ca.subject, days=30)
    with pytest.raises(AuthError, match="trust anchor .*old CA.* expired"):
        verify_certificate_chain([der(leaf)], [der(old_ca)], NOW)


def test_chain_wrong_issuer(pki):
    # same issuer name, different key
    with pytest.raises(AuthError, match="not signed by any trusted CA"):
        verify_certificate_chain([der(pki["node"])], [der(pki["other_ca"])], NOW)
    forged = make_cert(pki["node_key"], "node-a", pki["other_ca_key"], pki["ca"].subject,
                       sans=[x509.DNSName("node-a")])
    with pytest.raises(AuthError, match="not signed by any trusted CA"):
        verify_certificate_chain([der(forged)], [der(pki["ca"])], NOW)
    # intermediate missing from the chain
    with pytest.raises(AuthError, match="not signed by any trusted CA"):
        verify_certificate_chain([der(pki["leaf2"])], [der(pki["ca"])], NOW)
    # wrong intermediate
    with pytest.raises(AuthError, match="not signed by the next certificate"):
        verify_certificate_chain([der(pki["leaf2"]), der(pki["node"])], [der(pki["ca"])], NOW)


def test_chain_issuer_must_be_ca(pki):
    # node-a (CA=false) "issues" a certificate
    fake = make_cert(ec.generate_private_key(ec.SECP256R1()), "evil", pki["node_key"], pki["node"].subject)
    with pytest.raises(AuthError, match="intermediate .*node-a.* is not a CA"):
        verify_certificate_chain([der(fake), der(pki["node"])], [der(pki["ca"])], NOW)
    # a non-CA anchor
    with pytest.raises(AuthError, match="trust anchor .*node-a.* is not a CA"):
        verify_certificate_chain([der(fake)], [der(pki["node"])], NOW)
    nobc_key = ec.generate_private_key(ec.SECP256R1())
    nobc = make_cert(nobc_key, "no bc", bc=False, days=3650)
    leaf = make_cert(pki["node_key"], "node-a", nobc_key, nobc.subject)
    with pytest.raises(AuthError, match="no basicConstraints"):
        verify_certificate_chain([der(leaf)], [der(nobc)], NOW)


def test_chain_malformed_inputs(pki):
    with pytest.raises(AuthError, match="no certificate"):
        verify_certificate_chain([], [der(pki["ca"])], NOW)
    with pytest.raises(AuthError, match="no trust anchors"):
        verify_certificate_chain([der(pki["node"])], [], NOW)
    with pytest.raises(AuthError, match="certificate 0 is not a DER"):
        verify_certificate_chain([b"\x30\x03garbage"], [der(pki["ca"])], NOW)
    with pytest.raises(AuthError, match="trust anchor 0 is not a DER"):
        verify_certificate_chain([der(pki["node"])], [b"junk"], NOW)
    with pytest.raises(AuthError, match="exceeds"):
        verify_certificate_chain([der(pki["node"])] * 9, [der(pki["ca"])], NOW)


def test_ed25519_and_rsa_chains(rsa_key):
    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = make_cert(ca_key, "ed CA", ca=True, days=3650)
    leaf = make_cert(rsa_key, "rsa-node", ca_key, ca.subject, sans=[x509.DNSName("rsa-node")])
    assert verify_certificate_chain([der(leaf)], [der(ca)], NOW) == leaf


# ---------------------------------------------------------------- identities

def test_identity_matches(pki):
    c = pki["node"]
    assert identity_matches_certificate(IdType.ID_FQDN, b"node-a", c)
    assert identity_matches_certificate(IdType.ID_FQDN, b"NODE-A", c)
    assert identity_matches_certificate(IdType.ID_IPV4_ADDR, bytes([198, 51, 100, 1]), c)
    assert identity_matches_certificate(IdType.ID_IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed, c)
    assert identity_matches_certificate(IdType.ID_RFC822_ADDR, b"ops@node-a.example", c)
    assert identity_matches_certificate(IdType.ID_DER_ASN1_DN, c.subject.public_bytes(), c)


@pytest.mark.parametrize("id_type,data,fragment", [
    (IdType.ID_FQDN, b"node-b", "ID_FQDN identity 'node-b' not among the certificate's dNSName SANs"),
    (IdType.ID_FQDN, b"\xff\xfe", "not ASCII"),
    (IdType.ID_IPV4_ADDR, bytes([198, 51, 100, 2]), "198.51.100.2 not among the certificate's iPAddress"),
    (IdType.ID_IPV4_ADDR, b"\x01\x02\x03", "must be 4 bytes"),
    (IdType.ID_IPV6_ADDR, bytes(16), ":: not among"),
    (IdType.ID_RFC822_ADDR, b"root@node-a.example", "rfc822Name"),
    (IdType.ID_DER_ASN1_DN, _name("node-b").public_bytes(), "does not equal the certificate subject"),
    (IdType.ID_KEY_ID, b"abc", "ID_KEY_ID is not supported"),
])
def test_identity_mismatch(pki, id_type, data, fragment):
    with pytest.raises(AuthError, match=fragment):
        identity_matches_certificate(id_type, data, pki["node"])


def test_identity_without_san(pki):
    c = make_cert(pki["node_key"], "node-a", pki["ca_key"], pki["ca"].subject)
    with pytest.raises(AuthError, match=r"dNSName SANs \[\]"):
        identity_matches_certificate(IdType.ID_FQDN, b"node-a", c)


# ---------------------------------------------------------------- CERTREQ

def test_certreq_hash(pki):
    spki = pki["ca"].public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    h = certreq_hash(der(pki["ca"]))
    assert h == hashlib.sha1(spki).digest() and len(h) == 20
    assert h != certreq_hash(der(pki["other_ca"]))  # same name, other key
    data = certreq_hash(der(pki["other_ca"])) + h
    assert find_by_certreq_hash(data, [der(pki["ca"]), der(pki["inter"])]) == [der(pki["ca"])]
    assert find_by_certreq_hash(b"", [der(pki["ca"])]) == []
    with pytest.raises(AuthError, match="not a list of SHA-1"):
        find_by_certreq_hash(h[:-1], [der(pki["ca"])])
    with pytest.raises(AuthError, match="not a DER"):
        certreq_hash(b"junk")


def test_chain_pinned_leaf_and_key_usage(pki):
    # a peer certificate configured directly as the trust anchor (pinned)
    assert verify_certificate_chain([der(pki["node"])], [der(pki["node"])], NOW) == pki["node"]
    with pytest.raises(AuthError, match="expired"):
        verify_certificate_chain([der(pki["node"])], [der(pki["node"])], NOW + 40 * DAY)
    # keyUsage without digitalSignature cannot sign AUTH
    b = (x509.CertificateBuilder().subject_name(_name("enc-only")).issuer_name(pki["ca"].subject)
         .public_key(pki["node_key"].public_key()).serial_number(7)
         .not_valid_before(T0).not_valid_after(T0 + datetime.timedelta(days=30))
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True))
    c = b.sign(pki["ca_key"], hashes.SHA256())
    with pytest.raises(AuthError, match="lacks digitalSignature"):
        verify_certificate_chain([der(c)], [der(pki["ca"])], NOW)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_fuzz_verify_raises_only_auth_error(data):
    key = _FUZZ_KEY.public_key()
    try:
        verify_digital_signature(key, b"octets", data)
    except AuthError:
        pass
    # also with a valid ECDSA AlgorithmIdentifier prefix
    with pytest.raises(AuthError):
        verify_digital_signature(key, b"octets", bytes([len(ALG_ECDSA_SHA256)]) + ALG_ECDSA_SHA256 + data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=60), id_type=st.integers(0, 255))
def test_fuzz_identity_raises_only_auth_error(data, id_type):
    try:
        identity_matches_certificate(id_type, data, _FUZZ_CERT)
    except AuthError:
        pass


_FUZZ_KEY = ec.generate_private_key(ec.SECP256R1())
_FUZZ_CERT = make_cert(_FUZZ_KEY, "fuzz", sans=[x509.DNSName("fuzz")])


# ---------------------------------------------------------------- IkeSa regressions found against strongSwan

def _ed25519_creds(ca_key, ca, name):
    from agent.model import Credentials
    key = ed25519.Ed25519PrivateKey.generate()
    start = datetime.datetime.fromtimestamp(1_700_000_000 - 3600, UTC)
    leaf = make_cert(key, name, ca_key, ca.subject, sans=[x509.DNSName(name)], start=start)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return Credentials(private_key_pem=pem, certificate_chain=(der(leaf),), ca_certificates=(der(ca),))


def test_signature_hash_algorithms_include_identity_so_ed25519_works():
    """strongSwan 5.9.8 refused to sign with Ed25519 ("no common hash algorithm") because our
    N(SIGNATURE_HASH_ALGORITHMS) lacked IDENTITY (5) (RFC 8420 §2). Both sides Ed25519 here,
    so each one's signer checks the other's announcement."""
    from agent.iana import NotifyType
    from agent.ike.events import IkeSaEstablished
    from agent.ike.message import decode_message
    from tests.ike.conftest import make_net, view

    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = make_cert(ca_key, "ed CA", ca=True, days=3650,
                   start=datetime.datetime.fromtimestamp(1_700_000_000 - 86400, UTC))
    net = make_net(view("node-a", "node-b"), _ed25519_creds(ca_key, ca, "node-a"),
                   view("node-b", "node-a"), _ed25519_creds(ca_key, ca, "node-b"))
    net.a.initiate("node-b", net.now)
    net.pump()
    init = decode_message(net.log[0][1].data)
    n = init.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
    algs = {int.from_bytes(n.data[i:i + 2], "big") for i in range(0, len(n.data), 2)}
    assert HashAlgorithm.IDENTITY in algs and HashAlgorithm.SHA2_256 in algs
    assert net.of("a", IkeSaEstablished) and net.of("b", IkeSaEstablished)
