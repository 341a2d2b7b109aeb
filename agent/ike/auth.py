"""IKEv2 authentication: signed octets, PSK AUTH, RFC 7427 digital
signatures, certificate chains and identities (RFC 7296 §2.15, §3.5, §3.8).

Pure module: no clock (``now`` is passed in), no I/O. ECDSA and RSASSA-PSS
signing draw their nonce / salt from OpenSSL's RNG inside ``cryptography``;
that is the only randomness here, and it is not ours to inject (Ed25519 is
deterministic). Keys never appear in an error message or a repr.
"""
from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import constant_time, hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.iana import HashAlgorithm, IdType, name_of
from agent.ike.crypto import CryptoError, Prf
from agent.ike.errors import AuthError  # re-exported
from agent.ike.identity import (_parse_tlv, _oid_to_str, dn_for_identity, id_for_identity, id_text,  # re-exported
                                identity_has_forms, parse_der_dn, same_identity)

__all__ = [
    "AuthError",
    "rest_of_id_payload",
    "signed_octets",
    "psk_auth",
    "verify_psk_auth",
    "load_private_key",
    "SUPPORTED_HASH_ALGORITHMS",
    "sign_digital_signature",
    "verify_digital_signature",
    "verify_certificate_chain",
    "identity_matches_certificate",
    "parse_der_dn",
    "id_text",
    "same_identity",
    "id_for_identity",
    "dn_for_identity",
    "certreq_hash",
    "find_by_certreq_hash",
    "MAX_CHAIN_LEN",
]

MAX_CHAIN_LEN = 8

# SIGNATURE_HASH_ALGORITHMS we send and accept (RFC 7427 §4, RFC 8420 for IDENTITY).
SUPPORTED_HASH_ALGORITHMS: tuple[int, ...] = (
    HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512, HashAlgorithm.IDENTITY,
)


# ---------------------------------------------------------------- §2.15 octets, PSK

def rest_of_id_payload(id_type: int, id_data: bytes) -> bytes:
    """RestOfInitIDPayload / RestOfRespIDPayload: ID Type | 3 RESERVED | data (§2.15, §3.5)."""
    if not 0 <= id_type <= 255:
        raise AuthError(f"ID type {id_type} out of range")
    return bytes([id_type, 0, 0, 0]) + bytes(id_data)


def signed_octets(prf_id: int, real_message: bytes, nonce: bytes, sk_p: bytes, rest_of_id: bytes,
                  int_auth: bytes = b"") -> bytes:
    """InitiatorSignedOctets = RealMessage1 | NonceRData | prf(SK_pi, RestOfInitIDPayload),
    ResponderSignedOctets = RealMessage2 | NonceIData | prf(SK_pr, RestOfRespIDPayload) (§2.15).

    ``real_message`` is the whole IKE_SA_INIT message the signer sent,
    ``nonce`` the *peer's* nonce data, ``sk_p`` the signer's SK_pi / SK_pr,
    ``rest_of_id`` from ``rest_of_id_payload``. ``int_auth``: IntAuth_iN | IntAuth_rN |
    IKE_AUTH_MID after IKE_INTERMEDIATE exchanges (RFC 9242 §3.3.2), appended last.
    """
    try:
        return bytes(real_message) + bytes(nonce) + Prf(prf_id).prf(sk_p, rest_of_id) + bytes(int_auth)
    except CryptoError as e:
        raise AuthError(str(e)) from None


_KEY_PAD = b"Key Pad for IKEv2"


def psk_auth(prf_id: int, psk: bytes, octets: bytes) -> bytes:
    """AUTH data for SHARED_KEY_MESSAGE_INTEGRITY_CODE (§2.15):
    prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    if not psk:
        raise AuthError("empty pre-shared key")
    try:
        p = Prf(prf_id)
    except CryptoError as e:
        raise AuthError(str(e)) from None
    return p.prf(p.prf(psk, _KEY_PAD), octets)


def verify_psk_auth(prf_id: int, psk: bytes, octets: bytes, auth_data: bytes) -> None:
    """Check a peer's PSK AUTH data in constant time; AuthError if it differs."""
    if not constant_time.bytes_eq(psk_auth(prf_id, psk, octets), bytes(auth_data)):
        raise AuthError("PSK AUTH data does not match (wrong pre-shared key or altered IKE_SA_INIT)")


# ---------------------------------------------------------------- RFC 7427 signatures

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _oid(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for v in parts[2:]:
        enc = [v & 0x7F]
        v >>= 7
        while v:
            enc.append(0x80 | (v & 0x7F))
            v >>= 7
        body += bytes(reversed(enc))
    return _tlv(0x06, bytes(body))


OID_ECDSA = {"1.2.840.10045.4.3.2": hashes.SHA256, "1.2.840.10045.4.3.3": hashes.SHA384,
             "1.2.840.10045.4.3.4": hashes.SHA512}
OID_RSA_PKCS1 = {"1.2.840.113549.1.1.11": hashes.SHA256, "1.2.840.113549.1.1.12": hashes.SHA384,
                 "1.2.840.113549.1.1.13": hashes.SHA512}
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_ED25519 = "1.3.101.112"
OID_HASH = {"2.16.840.1.101.3.4.2.1": hashes.SHA256, "2.16.840.1.101.3.4.2.2": hashes.SHA384,
            "2.16.840.1.101.3.4.2.3": hashes.SHA512}
_HASH_OID = {v: k for k, v in OID_HASH.items()}
_ECDSA_OID = {v: k for k, v in OID_ECDSA.items()}
_HASH_IANA = {hashes.SHA256: HashAlgorithm.SHA2_256, hashes.SHA384: HashAlgorithm.SHA2_384,
              hashes.SHA512: HashAlgorithm.SHA2_512}


def _hash_alg_id(h) -> bytes:
    # with explicit NULL parameters, as in RFC 7427 Appendix A and strongSwan
    return _tlv(0x30, _oid(_HASH_OID[h]) + b"\x05\x00")


def _pss_alg_id(h) -> bytes:
    """RSASSA-PSS-params (RFC 4055 §3.1): hash, MGF1 with the same hash, salt = hash length."""
    params = (_tlv(0xA0, _hash_alg_id(h))
              + _tlv(0xA1, _tlv(0x30, _oid(OID_MGF1) + _hash_alg_id(h)))
              + _tlv(0xA2, _tlv(0x02, bytes([h.digest_size]))))
    return _tlv(0x30, _oid(OID_RSASSA_PSS) + _tlv(0x30, params))


def _parse_hash_alg_id(der: bytes):
    tag, content, _ = _parse_tlv(der)
    if tag != 0x30:
        raise ValueError("hash AlgorithmIdentifier is not a SEQUENCE")
    tag, oid, _ = _parse_tlv(content)
    if tag != 0x06:
        raise ValueError("hash AlgorithmIdentifier has no OID")
    h = OID_HASH.get(_oid_to_str(oid))
    if h is None:
        raise ValueError(f"unsupported hash {_oid_to_str(oid)}")
    return h


def _parse_pss_params(content: bytes):
    """-> (hash, mgf1 hash, salt length). Defaults (SHA-1) are refused."""
    h = mgf_h = salt = None
    off = 0
    while off < len(content):
        tag, val, off = _parse_tlv(content, off)
        if tag == 0xA0:
            h = _parse_hash_alg_id(val)
        elif tag == 0xA1:
            t, seq, _ = _parse_tlv(val)
            t2, moid, off2 = _parse_tlv(seq)
            if t != 0x30 or t2 != 0x06 or _oid_to_str(moid) != OID_MGF1:
                raise ValueError("mask generation function is not MGF1")
            mgf_h = _parse_hash_alg_id(seq[off2:])
        elif tag == 0xA2:
            t, sv, _ = _parse_tlv(val)
            if t != 0x02:
                raise ValueError("salt length is not an INTEGER")
            salt = int.from_bytes(sv, "big")
        elif tag == 0xA3:
            t, tv, _ = _parse_tlv(val)
            if t != 0x02 or int.from_bytes(tv, "big") != 1:
                raise ValueError("trailerField must be 1")
    if h is None or mgf_h is None or salt is None:
        raise ValueError("RSASSA-PSS parameters must name the hash, MGF1 hash and salt length (no SHA-1 defaults)")
    return h, mgf_h, salt


def load_private_key(pem: bytes):
    """Load an unencrypted PEM private key (EC P-256/384, RSA, Ed25519). AuthError if unusable."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuthError("cannot load the private key (not an unencrypted PEM key)") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise AuthError(f"unsupported private key type {type(key).__name__}")
    return key


def _hash_for_key(key) -> tuple[int, object]:
    """(IANA hash algorithm, cryptography hash or None) our signer uses for a key type."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        h = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}.get(key.curve.key_size)
        if h is None:
            raise AuthError(f"unsupported ECDSA curve {key.curve.name}")
        return _HASH_IANA[h], h
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return HashAlgorithm.SHA2_256, hashes.SHA256
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return HashAlgorithm.IDENTITY, None
    raise AuthError(f"unsupported key type {type(key).__name__}")


def sign_digital_signature(private_key, octets: bytes,
                           peer_hash_algorithms: tuple[int, ...] | None = None) -> bytes:
    """AUTH data for DIGITAL_SIGNATURE (RFC 7427 §3): ASN.1 length (1 byte) |
    AlgorithmIdentifier DER | signature over ``octets``.

    ECDSA P-256/384/521 with SHA-256/384/512 (signature DER Ecdsa-Sig-Value,
    as strongSwan sends), RSASSA-PSS SHA-256/MGF1-SHA-256/salt 32, Ed25519
    (RFC 8420). ``private_key`` is a key object or PEM bytes.
    ``peer_hash_algorithms`` is the peer's SIGNATURE_HASH_ALGORITHMS (None:
    not checked); AuthError if it lacks the hash we need.
    """
    if isinstance(private_key, (bytes, bytearray)):
        private_key = load_private_key(bytes(private_key))
    iana_hash, h = _hash_for_key(private_key)
    if peer_hash_algorithms is not None and iana_hash not in peer_hash_algorithms:
        raise AuthError(f"peer does not accept hash {name_of(HashAlgorithm, iana_hash)} "
                        f"(offered {[name_of(HashAlgorithm, x) for x in peer_hash_algorithms]})")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        alg = _tlv(0x30, _oid(_ECDSA_OID[h]))
        sig = private_key.sign(octets, ec.ECDSA(h()))
    elif isinstance(private_key, rsa.RSAPrivateKey):
        alg = _pss_alg_id(h)
        sig = private_key.sign(octets, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size), h())
    else:
        alg = _tlv(0x30, _oid(OID_ED25519))
        sig = private_key.sign(octets)
    return bytes([len(alg)]) + alg + sig


def verify_digital_signature(public_key, octets: bytes, auth_data: bytes) -> str:
    """Verify DIGITAL_SIGNATURE AUTH data (RFC 7427 §3) with the peer's key.

    ``public_key`` is a key object or an ``x509.Certificate``. The
    AlgorithmIdentifier must fit the key type (ecdsa-with-SHA2 for EC,
    RSASSA-PSS or sha*WithRSAEncryption for RSA, id-Ed25519 for Ed25519).
    Returns a short algorithm name; AuthError says what failed.
    """
    if isinstance(public_key, x509.Certificate):
        try:
            public_key = public_key.public_key()
        except _CERT_ERRORS as e:
            raise AuthError(f"certificate {_subject(public_key)}: unusable public key ({_short(e)})") from None
    auth_data = bytes(auth_data)
    if len(auth_data) < 2 or auth_data[0] + 1 >= len(auth_data):
        raise AuthError("DIGITAL_SIGNATURE AUTH data too short for its AlgorithmIdentifier length")
    alg_der, sig = auth_data[1:1 + auth_data[0]], auth_data[1 + auth_data[0]:]
    try:
        tag, content, end = _parse_tlv(alg_der)
        if tag != 0x30 or end != len(alg_der):
            raise ValueError("AlgorithmIdentifier is not one SEQUENCE")
        tag, oid_c, off = _parse_tlv(content)
        if tag != 0x06:
            raise ValueError("AlgorithmIdentifier has no OID")
        oid = _oid_to_str(oid_c)
        params = content[off:]
    except ValueError as e:
        raise AuthError(f"malformed signature AlgorithmIdentifier: {e}") from None

    try:
        if oid in OID_ECDSA:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise AuthError(f"signature algorithm ECDSA does not match the peer's {_key_kind(public_key)} key")
            h = OID_ECDSA[oid]
            public_key.verify(sig, octets, ec.ECDSA(h()))
            return f"ECDSA-{h.name.upper()}"
        if oid == OID_ED25519:
            if not isinstance(public_key, ed25519.Ed25519PublicKey):
                raise AuthError(f"signature algorithm Ed25519 does not match the peer's {_key_kind(public_key)} key")
            public_key.verify(sig, octets)
            return "Ed25519"
        if oid == OID_RSASSA_PSS or oid in OID_RSA_PKCS1:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise AuthError(f"signature algorithm RSA does not match the peer's {_key_kind(public_key)} key")
            if oid in OID_RSA_PKCS1:
                h = OID_RSA_PKCS1[oid]
                public_key.verify(sig, octets, padding.PKCS1v15(), h())
                return f"RSA-PKCS1-{h.name.upper()}"
            try:
                tag, pc, _ = _parse_tlv(params)
                if tag != 0x30:
                    raise ValueError("RSASSA-PSS parameters are not a SEQUENCE")
                h, mgf_h, salt = _parse_pss_params(pc)
            except ValueError as e:
                raise AuthError(f"malformed RSASSA-PSS AlgorithmIdentifier: {e}") from None
            public_key.verify(sig, octets, padding.PSS(mgf=padding.MGF1(mgf_h()), salt_length=salt), h())
            return f"RSASSA-PSS-{h.name.upper()}"
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        raise AuthError(f"signature does not verify ({oid}) with the peer's {_key_kind(public_key)} key") from None
    raise AuthError(f"unsupported signature algorithm OID {oid}")


def _key_kind(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


# ---------------------------------------------------------------- certificates

# what ``cryptography`` raises for a certificate it cannot parse, at load or lazily when a field
# is first read (an invalid version, a malformed subject, issuer or extension)
_CERT_ERRORS = (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm)


def _fingerprint(der: bytes) -> str:
    h = hashes.Hash(hashes.SHA256())
    h.update(bytes(der))
    return h.finalize().hex()[:16]


def _load_cert(der: bytes, what: str) -> x509.Certificate:
    """Parse a DER certificate completely: every field read later is read here once, so a
    malformed certificate (even one ``cryptography`` parses lazily) fails now with an AuthError
    naming it (``what``, e.g. "certificate 0", and the first 16 hex digits of its SHA-256
    fingerprint, since its subject may be unreadable)."""
    der = bytes(der)
    fp = f"SHA-256 {_fingerprint(der)}..."
    try:
        cert = x509.load_der_x509_certificate(der)
    except _CERT_ERRORS as e:
        raise AuthError(f"{what} is not a DER X.509 certificate ({_short(e)}; {fp})") from None
    for field, read in (("version", lambda: cert.version), ("serial number", lambda: cert.serial_number),
                        ("subject", lambda: cert.subject.rfc4514_string()),
                        ("issuer", lambda: cert.issuer.rfc4514_string()),
                        ("validity", lambda: (cert.not_valid_before_utc, cert.not_valid_after_utc)),
                        ("extensions", lambda: list(cert.extensions)),
                        ("public key", cert.public_key)):
        try:
            read()
        except _CERT_ERRORS as e:
            raise AuthError(f"{what} has a malformed {field} ({_short(e)}; {fp})") from None
    if cert.serial_number <= 0:  # cryptography only warns (for now)
        raise AuthError(f"{what} has a serial number that is not positive (RFC 5280 §4.1.2.2; {fp})")
    return cert


def _short(e: Exception) -> str:
    """An exception text bounded for a log line (parser errors can be long)."""
    text = str(e) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string() or "<empty subject>"
    except _CERT_ERRORS:  # only certificates that passed _load_cert get here; still never raise
        return "<unreadable subject>"


def _check_validity(cert: x509.Certificate, now: float, what: str) -> None:
    t = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    if t < cert.not_valid_before_utc:
        raise AuthError(f"{what} {_subject(cert)} is not yet valid (from {cert.not_valid_before_utc.isoformat()})")
    if t > cert.not_valid_after_utc:
        raise AuthError(f"{what} {_subject(cert)} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_ca(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise AuthError(f"{what} {_subject(cert)} has no basicConstraints, cannot issue certificates") from None
    if not bc.ca:
        raise AuthError(f"{what} {_subject(cert)} is not a CA (basicConstraints CA=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise AuthError(f"{what} {_subject(cert)} keyUsage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_certificate_chain(chain_der: list[bytes], trust_anchors_der: list[bytes],
                             now: float) -> x509.Certificate:
    """See _verify_chain; any parser error of ``cryptography`` becomes an AuthError."""
    try:
        return _verify_chain(chain_der, trust_anchors_der, now)
    except _CERT_ERRORS as e:  # _load_cert reads every field first: this is the last guard
        raise AuthError(f"malformed certificate in the peer's chain ({_short(e)})") from None


def _verify_chain(chain_der: list[bytes], trust_anchors_der: list[bytes], now: float) -> x509.Certificate:
    """Verify a peer's chain (leaf first, DER; from CERT payloads) up to one of
    ``trust_anchors_der`` (DER CA certificates) at time ``now`` (Unix seconds).

    Each certificate must be within its validity period; every issuer
    (intermediates and the anchor) must have basicConstraints CA=true;
    signatures are checked with cryptography's ``verify_directly_issued_by``.
    A leaf that is itself one of the anchors (a pinned peer certificate) is
    accepted when valid. A leaf keyUsage, if present, must allow
    digitalSignature. Returns the leaf certificate; AuthError names the
    failing certificate. Revocation is not checked here.
    """
    if not chain_der:
        raise AuthError("peer sent no certificate")
    if len(chain_der) > MAX_CHAIN_LEN:
        raise AuthError(f"certificate chain of {len(chain_der)} exceeds {MAX_CHAIN_LEN}")
    if not trust_anchors_der:
        raise AuthError("no trust anchors configured")
    chain = [_load_cert(d, f"certificate {i}") for i, d in enumerate(chain_der)]
    anchors = [_load_cert(d, f"trust anchor {i}") for i, d in enumerate(trust_anchors_der)]
    leaf = chain[0]
    _check_validity(leaf, now, "peer certificate")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise AuthError(f"peer certificate {_subject(leaf)} keyUsage lacks digitalSignature")
    except x509.ExtensionNotFound:
        pass
    if any(chain_der[0] == a for a in trust_anchors_der):
        return leaf  # the peer's own certificate is pinned as a trust anchor
    cur = leaf
    for depth in range(len(chain)):
        # an anchor issued the current certificate: done
        for a in anchors:
            if _issued_by(cur, a):
                _check_ca(a, "trust anchor")
                _check_validity(a, now, "trust anchor")
                return leaf
        if depth + 1 >= len(chain):
            break
        nxt = chain[depth + 1]
        if not _issued_by(cur, nxt):
            raise AuthError(f"certificate {_subject(cur)} is not signed by the next certificate "
                            f"in the chain {_subject(nxt)}")
        _check_ca(nxt, "intermediate")
        _check_validity(nxt, now, "intermediate")
        cur = nxt
    raise AuthError(f"certificate {_subject(cur)} (issuer {_issuer(cur)}) is not signed by any trusted CA")


def _issuer(cert: x509.Certificate) -> str:
    try:
        return cert.issuer.rfc4514_string() or "<empty issuer>"
    except _CERT_ERRORS:
        return "<unreadable issuer>"


def identity_matches_certificate(id_type: int, id_data: bytes, cert: x509.Certificate) -> bool:
    """Check that the IKE identity (IDi/IDr, RFC 7296 §3.5) is bound to ``cert``
    (RFC 4945 §3.1): ID_FQDN vs a dNSName SAN, ID_RFC822_ADDR vs an rfc822Name
    SAN (both case-insensitive), ID_IPV4_ADDR / ID_IPV6_ADDR vs an iPAddress
    SAN, ID_DER_ASN1_DN vs the subject (DER equality).
    Returns True; raises AuthError naming the mismatch otherwise.
    """
    id_data = bytes(id_data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    except _CERT_ERRORS as e:
        raise AuthError(f"certificate {_subject(cert)}: subjectAltName is malformed ({_short(e)})") from None
    tname = name_of(IdType, id_type)
    if id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        try:
            want = id_data.decode("ascii").lower()
        except UnicodeDecodeError:
            raise AuthError(f"{tname} identity is not ASCII") from None
        kind = x509.DNSName if id_type == IdType.ID_FQDN else x509.RFC822Name
        have = [n.lower() for n in san.get_values_for_type(kind)]
        if want in have:
            return True
        raise AuthError(f"{tname} identity {want!r} not among the certificate's "
                        f"{'dNSName' if kind is x509.DNSName else 'rfc822Name'} SANs {have}")
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        n = 4 if id_type == IdType.ID_IPV4_ADDR else 16
        if len(id_data) != n:
            raise AuthError(f"{tname} identity must be {n} bytes, got {len(id_data)}")
        want_ip = ipaddress.ip_address(id_data)
        have_ips = san.get_values_for_type(x509.IPAddress)
        if want_ip in have_ips:
            return True
        raise AuthError(f"{tname} identity {want_ip} not among the certificate's iPAddress SANs "
                        f"{[str(a) for a in have_ips]}")
    if id_type == IdType.ID_DER_ASN1_DN:
        try:
            if id_data == cert.subject.public_bytes() or parse_der_dn(id_data) == cert.subject:
                return True
        except _CERT_ERRORS:
            pass
        raise AuthError(f"ID_DER_ASN1_DN identity {id_text(id_type, id_data) or id_data.hex()!r} does not equal "
                        f"the certificate subject {_subject(cert)}")
    raise AuthError(f"identity type {tname} is not supported for certificate authentication")


def certreq_hash(ca_cert_der: bytes) -> bytes:
    """CERTREQ Certification Authority entry: SHA-1 of the CA's
    SubjectPublicKeyInfo DER (RFC 7296 §3.7), 20 bytes."""
    cert = _load_cert(ca_cert_der, "CA certificate")
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashes.Hash(hashes.SHA1())
    h.update(spki)
    return h.finalize()


def find_by_certreq_hash(certreq_data: bytes, ca_certs_der: list[bytes]) -> list[bytes]:
    """The CA certificates (DER) whose SPKI hash appears in a CERTREQ's
    concatenated 20-byte hashes. Malformed data (length not a multiple of 20)
    -> AuthError."""
    if len(certreq_data) % 20:
        raise AuthError(f"CERTREQ data of {len(certreq_data)} bytes is not a list of SHA-1 hashes")
    wanted = {bytes(certreq_data[i:i + 20]) for i in range(0, len(certreq_data), 20)}
    return [d for d in ca_certs_der if certreq_hash(d) in wanted]
