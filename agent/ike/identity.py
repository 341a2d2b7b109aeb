"""Identities of ID payloads (RFC 7296 §3.5): ID_FQDN, ID_RFC822_ADDR, ID_IPV4_ADDR,
ID_IPV6_ADDR and ID_DER_ASN1_DN as text, their comparison with configured identities, and
the ID payload data for our own identity. Used by IKE_AUTH and the PAD (agent.ike.pad).

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from agent.iana import IdType
from agent.ike.errors import AuthError

__all__ = ["parse_der_dn", "id_text", "same_identity", "identity_has_forms", "id_for_identity", "dn_for_identity"]

_CERT_ERRORS = (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm)


def _parse_tlv(data: bytes, off: int = 0) -> tuple[int, bytes, int]:
    """One DER TLV at ``off`` -> (tag, content, next offset). ValueError if malformed."""
    if off + 2 > len(data):
        raise ValueError("truncated DER")
    tag, ln = data[off], data[off + 1]
    off += 2
    if ln & 0x80:
        k = ln & 0x7F
        if k == 0 or k > 4 or off + k > len(data):
            raise ValueError("bad DER length")
        ln = int.from_bytes(data[off:off + k], "big")
        off += k
    if off + ln > len(data):
        raise ValueError("truncated DER")
    return tag, data[off:off + ln], off + ln


def _oid_to_str(content: bytes) -> str:
    if not content:
        raise ValueError("empty OID")
    parts = [content[0] // 40, content[0] % 40]
    v = 0
    for b in content[1:]:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


# ---------------------------------------------------------------- identities (§3.5)

_DN_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x12: "ascii", 0x1A: "ascii", 0x14: "latin-1",
               0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def parse_der_dn(data: bytes) -> x509.Name:
    """An ID_DER_ASN1_DN body (DER Name, RFC 5280 §4.1.2.4) as an ``x509.Name``; attribute
    values compare equal whatever string type carried them. ValueError if malformed."""
    tag, seq, end = _parse_tlv(bytes(data))
    if tag != 0x30 or end != len(data):
        raise ValueError("a DN is one DER SEQUENCE")
    rdns, off = [], 0
    while off < len(seq):
        tag, rdn, off = _parse_tlv(seq, off)
        if tag != 0x31:
            raise ValueError("a DN holds SETs of attributes")
        attrs, o2 = [], 0
        while o2 < len(rdn):
            tag, atv, o2 = _parse_tlv(rdn, o2)
            t_oid, oid, o3 = _parse_tlv(atv)
            t_val, val, o4 = _parse_tlv(atv, o3)
            if tag != 0x30 or t_oid != 0x06 or o4 != len(atv) or t_val not in _DN_STRINGS:
                raise ValueError("unsupported DN attribute")
            attrs.append(x509.NameAttribute(x509.ObjectIdentifier(_oid_to_str(oid)), val.decode(_DN_STRINGS[t_val])))
        if not attrs:
            raise ValueError("empty RDN")
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)


def _configured_dn(identity: str) -> x509.Name | None:
    """A configured identity written as a DN ("CN=gw,O=Example" or strongSwan's "C=CH, O=x, CN=gw"),
    else None."""
    if "=" not in identity:
        return None
    for text in (identity, ",".join(part.strip() for part in identity.split(","))):
        try:
            return x509.Name.from_rfc4514_string(text)
        except ValueError:
            continue
    return None


def id_text(id_type: int, data: bytes) -> str | None:
    """The identity of an ID payload (§3.5) as text: ID_FQDN / ID_RFC822_ADDR as sent, ID_IPV4_ADDR /
    ID_IPV6_ADDR as an address, ID_DER_ASN1_DN in RFC 4514 form. None: a type we do not take
    (ID_KEY_ID, ...) or a malformed value."""
    data = bytes(data)
    try:
        if id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
            return data.decode("utf-8")
        if id_type == IdType.ID_IPV4_ADDR and len(data) == 4 or id_type == IdType.ID_IPV6_ADDR and len(data) == 16:
            return str(ipaddress.ip_address(data))
        if id_type == IdType.ID_DER_ASN1_DN:
            return parse_der_dn(data).rfc4514_string()
    except (UnicodeDecodeError, ValueError, TypeError):
        return None
    return None


def same_identity(configured: str, text: str) -> bool:
    """Does an identity from id_text() equal a configured one? Addresses compare as addresses, DNs
    as names (RDNs in either order, as RFC 4514 and strongSwan write them), the rest exactly."""
    if configured == text:
        return True
    try:
        return ipaddress.ip_address(configured) == ipaddress.ip_address(text)
    except ValueError:
        pass
    want = _configured_dn(configured)
    if want is None:
        return False
    try:
        got = x509.Name.from_rfc4514_string(text)
    except ValueError:
        return False
    return got == want or got == x509.Name(list(reversed(want.rdns)))


def identity_has_forms(configured: str) -> bool:
    """Can a text other than ``configured`` itself name it (an address or a DN)? See same_identity."""
    try:
        ipaddress.ip_address(configured)
        return True
    except ValueError:
        return _configured_dn(configured) is not None


def id_for_identity(identity: str) -> tuple[int, bytes] | None:
    """ID payload (type, data) naming a configured identity: an address as ID_IPV4_ADDR /
    ID_IPV6_ADDR, anything else as ID_FQDN; None for a DN (its RDN order is ambiguous in text,
    so an optional IDr is better left out than sent wrong)."""
    try:
        ip = ipaddress.ip_address(identity)
        return (int(IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR), ip.packed)
    except ValueError:
        pass
    if _configured_dn(identity) is not None:
        return None
    return int(IdType.ID_FQDN), identity.encode()


def dn_for_identity(identity: str, own_certificate: tuple | list = ()) -> bytes:
    """DER of our own DN identity: the subject of ``own_certificate`` (DER, at most one) when it is
    that DN in either RDN order, so the ID equals the certificate subject byte for byte (RFC 4945
    §3.1.5); else the DN as written (RFC 4514 order). AuthError if ``identity`` is no DN."""
    want = _configured_dn(identity)
    if want is None:
        raise AuthError(f"identity {identity!r} is not a distinguished name")
    for der in own_certificate:
        try:
            subject = x509.load_der_x509_certificate(bytes(der)).subject
            if subject == want or subject == x509.Name(list(reversed(want.rdns))):
                return subject.public_bytes()
        except _CERT_ERRORS:
            pass
    return want.public_bytes()
