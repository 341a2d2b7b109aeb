"""IKEv2 message codec: header, generic payload chain, one class per payload.

RFC 7296 §3. ``decode_message(data)`` turns a UDP payload (without the
non-ESP marker) into a :class:`Message`; ``encode_message(msg)`` is its exact
inverse for every message it can produce. Decoding raises only
:class:`MessageError` for malformed input. The SK payload (§3.14) is kept
encrypted (:class:`EncryptedPayload`); once decrypted, its body is decoded with
:func:`decode_payloads` and the exchange rules are checked with
:func:`check_payload_rules` (§1.2-1.5).

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Union

from agent.iana import ExchangeType, NotifyType, PayloadType, ProtocolId, TsType

HEADER_LEN = 28
GENERIC_HEADER_LEN = 4
IKE_MAJOR_VERSION = 2
MAX_MESSAGE_LEN = 65535 - 8  # one UDP datagram

# Header flags (§3.1)
FLAG_INITIATOR = 0x08
FLAG_VERSION = 0x10
FLAG_RESPONSE = 0x20


class MessageError(Exception):
    """Malformed IKE message; ``reason`` says what was wrong (never raises anything else)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MessageLimitError(MessageError):
    """A count limit was exceeded (payloads per chain, proposals, transforms, attributes):
    refused before anything more is decoded, as the sender is not authenticated yet.
    ``kind``: "payloads", "proposals", "transforms" or "attributes". The manager refuses an
    IKE_SA_INIT over a limit (counted ``init_refused_<kind>``), other messages count
    ``payload_limit``."""

    def __init__(self, reason: str, kind: str = "payloads"):
        super().__init__(reason)
        self.kind = kind


# Count limits (§3.2, §3.3), checked while decoding, before any authentication. Far above
# what real peers send (strongSwan sends about 12 payloads in IKE_SA_INIT and caps notifies
# and vendor IDs at 20 each), low enough that a 64 KiB datagram of tiny payloads is refused
# after a few dozen of them instead of costing milliseconds.
MAX_PAYLOADS = 64  # per payload chain: the outer one, or the decrypted one inside SK
MAX_PROPOSALS = 16  # per SA payload (strongSwan's default IKE offer is 2, ours 1-4)
MAX_TRANSFORMS = 128  # per SA payload, all proposals together (strongSwan's default: about 60)
MAX_ATTRIBUTES = 4  # per transform (real ones carry at most Key Length)
MAX_ATTRIBUTES_TOTAL = MAX_TRANSFORMS  # per SA payload: only ENCR transforms carry one (Key Length)


# --------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformAttribute:
    """§3.3.5. ``tv`` True = 2-byte value in the header (AF=1), else ``value`` bytes."""
    type: int
    value: Union[int, bytes]
    tv: bool = True


@dataclass(frozen=True)
class Transform:
    """§3.3.2 Transform Substructure: type (TransformType), id, attributes."""
    type: int
    id: int
    attributes: tuple[TransformAttribute, ...] = ()

    @property
    def key_length(self) -> int | None:
        for a in self.attributes:
            if a.type == 14 and a.tv and isinstance(a.value, int):
                return a.value
        return None


@dataclass(frozen=True)
class Proposal:
    """§3.3.1 Proposal Substructure. ``spi`` raw bytes (0, 4 or 8 octets)."""
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]


@dataclass(frozen=True)
class SaPayload:
    """§3.3 Security Association payload."""
    proposals: tuple[Proposal, ...]
    payload_type = PayloadType.SA


@dataclass(frozen=True)
class KePayload:
    """§3.4 Key Exchange payload: KE method (KeId) and the public value."""
    group: int
    data: bytes
    payload_type = PayloadType.KE


@dataclass(frozen=True)
class IdPayload:
    """§3.5 Identification payload; ``ptype`` is IDi or IDr."""
    ptype: int
    id_type: int
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype

    @property
    def body(self) -> bytes:
        """RestOfInitIDPayload / RestOfRespIDPayload for AUTH (§2.15)."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(frozen=True)
class CertPayload:
    """§3.6 Certificate payload (encoding CertEncoding, DER data)."""
    encoding: int
    data: bytes = field(repr=False)
    payload_type = PayloadType.CERT


@dataclass(frozen=True)
class CertReqPayload:
    """§3.7 Certificate Request (concatenated SHA-1 hashes of CA SPKIs)."""
    encoding: int
    data: bytes
    payload_type = PayloadType.CERTREQ


@dataclass(frozen=True)
class AuthPayload:
    """§3.8 Authentication payload (method AuthMethod)."""
    method: int
    data: bytes = field(repr=False)
    payload_type = PayloadType.AUTH


@dataclass(frozen=True)
class NoncePayload:
    """§3.9 Nonce payload (Ni / Nr)."""
    data: bytes = field(repr=False)
    payload_type = PayloadType.NONCE


@dataclass(frozen=True)
class NotifyPayload:
    """§3.10 Notify payload: protocol (0 or ProtocolId), type (NotifyType), SPI, data."""
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""
    payload_type = PayloadType.NOTIFY

    @property
    def is_error(self) -> bool:
        return self.notify_type < 16384


@dataclass(frozen=True)
class DeletePayload:
    """§3.11 Delete payload. IKE: spi_size 0 and no SPIs; ESP/AH: 4-byte SPIs."""
    protocol: int
    spi_size: int = 0
    spis: tuple[bytes, ...] = ()
    payload_type = PayloadType.DELETE


@dataclass(frozen=True)
class VendorPayload:
    """§3.12 Vendor ID payload."""
    data: bytes
    payload_type = PayloadType.VENDOR_ID


@dataclass(frozen=True)
class OpaqueSelector:
    """§3.13.1 a selector of a type we do not implement (e.g. TS_SECLABEL, RFC 9478), kept as
    received (``raw``: the whole selector, header included) so the message still decodes;
    narrowing ignores it (agent.ike.child.ts_intersect never matches it)."""
    ts_type: int
    raw: bytes

    def networks(self) -> list:
        return []


@dataclass(frozen=True)
class TrafficSelector:
    """§3.13.1 one selector: type, IP protocol (0 any), ports, addresses (packed)."""
    ts_type: int
    ip_protocol: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes

    @classmethod
    def from_network(cls, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> "TrafficSelector":
        ts_type = TsType.TS_IPV4_ADDR_RANGE if net.version == 4 else TsType.TS_IPV6_ADDR_RANGE
        return cls(int(ts_type), 0, 0, 65535, net.network_address.packed, net.broadcast_address.packed)

    @property
    def start(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.start_addr)

    @property
    def end(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.end_addr)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The address range as CIDR blocks (empty if start > end)."""
        if int(self.start) > int(self.end):
            return []
        return list(ipaddress.summarize_address_range(self.start, self.end))


@dataclass(frozen=True)
class TsPayload:
    """§3.13 Traffic Selector payload; ``ptype`` is TSi or TSr."""
    ptype: int
    selectors: tuple[TrafficSelector, ...]

    @property
    def payload_type(self) -> int:
        return self.ptype


@dataclass(frozen=True)
class EncryptedPayload:
    """§3.14 Encrypted and Authenticated payload, kept as received.

    ``first`` is the Next Payload of the SK header (type of the first inner
    payload); ``body`` is IV | ciphertext | ICV.
    """
    first: int
    body: bytes = field(repr=False)
    payload_type = PayloadType.SK


@dataclass(frozen=True)
class EncryptedFragmentPayload:
    """RFC 7383 §2.5 Encrypted Fragment payload (SKF), kept as received.

    ``first``: Next Payload (inner type in fragment 1, else 0); ``number`` /
    ``total``: Fragment Number and Total Fragments; ``body``: IV | ciphertext | ICV.
    """
    first: int
    number: int
    total: int
    body: bytes = field(repr=False)
    payload_type = PayloadType.SKF


@dataclass(frozen=True)
class RawPayload:
    """A known payload we do not interpret (CP, EAP, GSPM, SKF): body kept raw."""
    ptype: int
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype


@dataclass(frozen=True)
class UnknownPayload:
    """Unregistered payload type. ``critical`` set -> UNSUPPORTED_CRITICAL_PAYLOAD (§2.5)."""
    ptype: int
    critical: bool
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype


Payload = Union[SaPayload, KePayload, IdPayload, CertPayload, CertReqPayload, AuthPayload,
                NoncePayload, NotifyPayload, DeletePayload, VendorPayload, TsPayload,
                EncryptedPayload, EncryptedFragmentPayload, RawPayload, UnknownPayload]

_RAW_TYPES = {PayloadType.CP, PayloadType.EAP, PayloadType.GSPM}


@dataclass(frozen=True)
class Message:
    """One IKE message (§3.1). SPIs as ints; ``payloads`` in wire order."""
    spi_i: int
    spi_r: int
    exchange: int
    message_id: int
    is_initiator: bool  # I flag: the sender is the original initiator
    is_response: bool  # R flag
    payloads: tuple[Payload, ...] = ()
    minor_version: int = 0
    version_flag: bool = False

    def get(self, ptype: int) -> list[Payload]:
        return [p for p in self.payloads if p.payload_type == ptype]

    def first(self, ptype: int) -> Payload | None:
        for p in self.payloads:
            if p.payload_type == ptype:
                return p
        return None

    def notifies(self) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload)]

    def notify(self, ntype: int) -> NotifyPayload | None:
        for p in self.payloads:
            if isinstance(p, NotifyPayload) and p.notify_type == ntype:
                return p
        return None

    @property
    def unsupported_critical(self) -> list[UnknownPayload]:
        return [p for p in self.payloads if isinstance(p, UnknownPayload) and p.critical]

    @property
    def flags(self) -> int:
        return ((FLAG_INITIATOR if self.is_initiator else 0) | (FLAG_RESPONSE if self.is_response else 0)
                | (FLAG_VERSION if self.version_flag else 0))


# --------------------------------------------------------------------------
# Body codecs
# --------------------------------------------------------------------------

def _u8(b: bytes, off: int) -> int:
    return b[off]


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) < n:
        raise MessageError(f"{what}: truncated ({len(data)} < {n} octets)")


def _decode_attributes(data, off: int, end: int, budget: int = MAX_ATTRIBUTES) -> tuple[TransformAttribute, ...]:
    """Attributes in ``data[off:end]`` (offsets, no copies: the caller's buffer is scanned once);
    at most ``budget`` of them (what is left of MAX_ATTRIBUTES_TOTAL for the SA payload)."""
    attrs = []
    while off < end:
        if len(attrs) >= MAX_ATTRIBUTES:
            raise MessageLimitError(f"transform: more than {MAX_ATTRIBUTES} attributes", "attributes")
        if len(attrs) >= budget:
            raise MessageLimitError(f"SA: more than {MAX_ATTRIBUTES_TOTAL} attributes", "attributes")
        if end - off < 4:
            raise MessageError(f"transform attribute: truncated ({end - off} < 4 octets)")
        atype, val = struct.unpack_from("!HH", data, off)
        if atype & 0x8000:
            attrs.append(TransformAttribute(atype & 0x7FFF, val, True))
            off += 4
        else:
            aend = off + 4 + val
            if aend > end:
                raise MessageError("transform attribute: length beyond transform")
            attrs.append(TransformAttribute(atype, bytes(data[off + 4:aend]), False))
            off = aend
    return tuple(attrs)


def _encode_attributes(attrs: tuple[TransformAttribute, ...]) -> bytes:
    out = bytearray()
    for a in attrs:
        if a.tv:
            out += struct.pack("!HH", 0x8000 | a.type, int(a.value))
        else:
            v = bytes(a.value)
            out += struct.pack("!HH", a.type, len(v)) + v
    return bytes(out)


def _decode_sa(data) -> SaPayload:
    """§3.3, walked by offsets over ``data`` (bytes or a memoryview of the message): each octet is
    read once and nothing is copied but SPIs and variable attribute values, so the cost before
    authentication is linear in the payload and stops at the first count limit."""
    proposals = []
    off, end = 0, len(data)
    last = False
    ntotal = 0
    nattrs = 0
    while off < end:
        if last:
            raise MessageError("SA: data after the last proposal")
        if len(proposals) >= MAX_PROPOSALS:
            raise MessageLimitError(f"SA: more than {MAX_PROPOSALS} proposals", "proposals")
        if end - off < 8:
            raise MessageError(f"proposal: truncated ({end - off} < 8 octets)")
        more, _r, plen, num, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB", data, off)
        if more not in (0, 2):
            raise MessageError(f"SA: bad proposal 'last substruc' {more}")
        if plen < 8 + spi_size or off + plen > end:
            raise MessageError("SA: bad proposal length")
        spi = bytes(data[off + 8:off + 8 + spi_size])
        toff, tend = off + 8 + spi_size, off + plen
        transforms = []
        tlast = False
        while toff < tend:
            if tlast:
                raise MessageError("SA: data after the last transform")
            ntotal += 1
            if ntotal > MAX_TRANSFORMS:
                raise MessageLimitError(f"SA: more than {MAX_TRANSFORMS} transforms", "transforms")
            if tend - toff < 8:
                raise MessageError(f"transform: truncated ({tend - toff} < 8 octets)")
            tmore, _r1, tlen, ttype, _r2, tid = struct.unpack_from("!BBHBBH", data, toff)
            if tmore not in (0, 3):
                raise MessageError(f"SA: bad transform 'last substruc' {tmore}")
            if tlen < 8 or toff + tlen > tend:
                raise MessageError("SA: bad transform length")
            attrs = _decode_attributes(data, toff + 8, toff + tlen, MAX_ATTRIBUTES_TOTAL - nattrs) if tlen > 8 else ()
            nattrs += len(attrs)
            transforms.append(Transform(ttype, tid, attrs))
            toff += tlen
            tlast = tmore == 0
        if len(transforms) != ntrans:
            raise MessageError(f"SA: proposal says {ntrans} transforms, found {len(transforms)}")
        if transforms and not tlast:
            raise MessageError("SA: last transform not marked last")
        proposals.append(Proposal(num, proto, spi, tuple(transforms)))
        off += plen
        last = more == 0
    if proposals and not last:
        raise MessageError("SA: last proposal not marked last")
    return SaPayload(tuple(proposals))


def _encode_sa(p: SaPayload) -> bytes:
    out = bytearray()
    for i, prop in enumerate(p.proposals):
        tbytes = bytearray()
        for j, t in enumerate(prop.transforms):
            attrs = _encode_attributes(t.attributes)
            more = 3 if j < len(prop.transforms) - 1 else 0
            tbytes += struct.pack("!BBHBBH", more, 0, 8 + len(attrs), t.type, 0, t.id) + attrs
        more = 2 if i < len(p.proposals) - 1 else 0
        out += struct.pack("!BBHBBBB", more, 0, 8 + len(prop.spi) + len(tbytes), prop.number,
                           prop.protocol, len(prop.spi), len(prop.transforms)) + prop.spi + tbytes
    return bytes(out)


def _decode_ts(ptype: int, data: bytes) -> TsPayload:
    _need(data, 4, "TS")
    count = data[0]
    off = 4
    sels = []
    for _ in range(count):
        _need(data[off:], 8, "traffic selector")
        ts_type, proto, slen, sport, eport = struct.unpack_from("!BBHHH", data, off)
        if ts_type == TsType.TS_IPV4_ADDR_RANGE:
            alen = 4
        elif ts_type == TsType.TS_IPV6_ADDR_RANGE:
            alen = 16
        else:
            # e.g. TS_SECLABEL (RFC 9478): kept opaque, never matches in narrowing (§3.13.1)
            if slen < 4 or off + slen > len(data):
                raise MessageError("TS: bad selector length")
            sels.append(OpaqueSelector(ts_type, bytes(data[off:off + slen])))
            off += slen
            continue
        if slen != 8 + 2 * alen or off + slen > len(data):
            raise MessageError("TS: bad selector length")
        sels.append(TrafficSelector(ts_type, proto, sport, eport,
                                    bytes(data[off + 8:off + 8 + alen]),
                                    bytes(data[off + 8 + alen:off + 8 + 2 * alen])))
        off += slen
    if off != len(data):
        raise MessageError("TS: selector count does not match the payload length")
    return TsPayload(ptype, tuple(sels))


def _encode_ts(p: TsPayload) -> bytes:
    out = bytearray(struct.pack("!BBH", len(p.selectors), 0, 0))
    for s in p.selectors:
        if isinstance(s, OpaqueSelector):
            out += s.raw
            continue
        out += struct.pack("!BBHHH", s.ts_type, s.ip_protocol, 8 + len(s.start_addr) + len(s.end_addr),
                           s.start_port, s.end_port) + s.start_addr + s.end_addr
    return bytes(out)


def _decode_notify(data: bytes) -> NotifyPayload:
    _need(data, 4, "N")
    proto, spi_size, ntype = struct.unpack_from("!BBH", data, 0)
    _need(data, 4 + spi_size, "N SPI")
    return NotifyPayload(ntype, bytes(data[4 + spi_size:]), proto, bytes(data[4:4 + spi_size]))


def _decode_delete(data: bytes) -> DeletePayload:
    _need(data, 4, "D")
    proto, spi_size, n = struct.unpack_from("!BBH", data, 0)
    if len(data) != 4 + spi_size * n:
        raise MessageError("D: length does not match SPI size x count")
    if proto == ProtocolId.IKE and (spi_size not in (0, 8)):
        raise MessageError("D: bad IKE SPI size")
    if spi_size == 0 and n != 0:
        raise MessageError("D: SPIs of size 0")
    spis = tuple(bytes(data[4 + i * spi_size:4 + (i + 1) * spi_size]) for i in range(n))
    return DeletePayload(proto, spi_size, spis)


def _decode_body(ptype: int, critical: bool, data: bytes) -> Payload:
    if ptype == PayloadType.SA:
        return _decode_sa(data)
    if ptype == PayloadType.KE:
        _need(data, 4, "KE")
        return KePayload(struct.unpack_from("!H", data, 0)[0], bytes(data[4:]))
    if ptype in (PayloadType.IDi, PayloadType.IDr):
        _need(data, 4, "ID")
        return IdPayload(ptype, data[0], bytes(data[4:]))
    if ptype == PayloadType.CERT:
        _need(data, 1, "CERT")
        return CertPayload(data[0], bytes(data[1:]))
    if ptype == PayloadType.CERTREQ:
        _need(data, 1, "CERTREQ")
        return CertReqPayload(data[0], bytes(data[1:]))
    if ptype == PayloadType.AUTH:
        _need(data, 4, "AUTH")
        return AuthPayload(data[0], bytes(data[4:]))
    if ptype == PayloadType.NONCE:
        return NoncePayload(bytes(data))
    if ptype == PayloadType.NOTIFY:
        return _decode_notify(data)
    if ptype == PayloadType.DELETE:
        return _decode_delete(data)
    if ptype == PayloadType.VENDOR_ID:
        return VendorPayload(bytes(data))
    if ptype in (PayloadType.TSi, PayloadType.TSr):
        return _decode_ts(ptype, data)
    if ptype in _RAW_TYPES:
        return RawPayload(ptype, bytes(data))
    return UnknownPayload(ptype, critical, bytes(data))


def _encode_body(p: Payload) -> bytes:
    if isinstance(p, SaPayload):
        return _encode_sa(p)
    if isinstance(p, KePayload):
        return struct.pack("!HH", p.group, 0) + p.data
    if isinstance(p, IdPayload):
        return p.body
    if isinstance(p, (CertPayload, CertReqPayload)):
        return bytes([p.encoding]) + p.data
    if isinstance(p, AuthPayload):
        return bytes([p.method, 0, 0, 0]) + p.data
    if isinstance(p, (NoncePayload, VendorPayload, RawPayload, UnknownPayload)):
        return p.data
    if isinstance(p, NotifyPayload):
        return struct.pack("!BBH", p.protocol, len(p.spi), p.notify_type) + p.spi + p.data
    if isinstance(p, DeletePayload):
        return struct.pack("!BBH", p.protocol, p.spi_size, len(p.spis)) + b"".join(p.spis)
    if isinstance(p, TsPayload):
        return _encode_ts(p)
    if isinstance(p, EncryptedPayload):
        return p.body
    if isinstance(p, EncryptedFragmentPayload):
        return struct.pack("!HH", p.number, p.total) + p.body
    raise TypeError(f"not a payload: {type(p).__name__}")


# --------------------------------------------------------------------------
# Payload chain
# --------------------------------------------------------------------------

def decode_payloads(first: int, data: bytes, *, allow_sk: bool = True) -> tuple[Payload, ...]:
    """Decode a generic payload chain (§3.2) starting with type ``first``.

    The chain must end exactly at the end of ``data`` with Next Payload 0;
    an SK payload must be the last one (§3.14) and is returned undecrypted.
    Raises MessageError.
    """
    payloads: list[Payload] = []
    off = 0
    ptype = first
    data = memoryview(data)
    while ptype != PayloadType.NO_NEXT_PAYLOAD:
        if len(payloads) >= MAX_PAYLOADS:
            raise MessageLimitError(f"more than {MAX_PAYLOADS} payloads in one chain")
        if len(data) - off < GENERIC_HEADER_LEN:
            raise MessageError(f"payload {ptype}: truncated generic header")
        nxt, flags, plen = struct.unpack_from("!BBH", data, off)
        if plen < GENERIC_HEADER_LEN or off + plen > len(data):
            raise MessageError(f"payload {ptype}: bad length {plen}")
        if ptype == PayloadType.SA:  # decoded in place: its substructures are walked by offsets
            payloads.append(_decode_sa(data[off + GENERIC_HEADER_LEN:off + plen]))
            off += plen
            ptype = nxt
            continue
        body = bytes(data[off + GENERIC_HEADER_LEN:off + plen])
        off += plen
        if ptype == PayloadType.SK:
            if not allow_sk:
                raise MessageError("SK payload inside SK")
            if off != len(data):
                raise MessageError("SK payload is not the last payload")
            payloads.append(EncryptedPayload(nxt, body))
            return tuple(payloads)
        if ptype == PayloadType.SKF:  # RFC 7383 §2.5: like SK, the last payload
            if not allow_sk:
                raise MessageError("SKF payload inside SK")
            if off != len(data):
                raise MessageError("SKF payload is not the last payload")
            if len(body) < 4:
                raise MessageError("SKF: truncated Fragment Number / Total Fragments")
            number, total = struct.unpack_from("!HH", body, 0)
            payloads.append(EncryptedFragmentPayload(nxt, number, total, body[4:]))
            return tuple(payloads)
        payloads.append(_decode_body(ptype, bool(flags & 0x80), body))
        ptype = nxt
    if off != len(data):
        raise MessageError(f"{len(data) - off} octets after the last payload")
    return tuple(payloads)


def scan_payloads(first: int, data: bytes, off: int = 0) -> list[tuple[int, int, int]]:
    """Walk a payload chain (§3.2) by its generic headers only, decoding no body:
    ``[(payload type, body start, body end)]`` (offsets into ``data``), stopping after an
    SK/SKF payload. For checks that must come before decoding (the COOKIE, §2.6).
    Raises MessageError (bad lengths) or MessageLimitError (over MAX_PAYLOADS)."""
    out: list[tuple[int, int, int]] = []
    ptype = first
    while ptype != PayloadType.NO_NEXT_PAYLOAD:
        if len(out) >= MAX_PAYLOADS:
            raise MessageLimitError(f"more than {MAX_PAYLOADS} payloads in one chain")
        if len(data) - off < GENERIC_HEADER_LEN:
            raise MessageError(f"payload {ptype}: truncated generic header")
        nxt, _flags, plen = struct.unpack_from("!BBH", data, off)
        if plen < GENERIC_HEADER_LEN or off + plen > len(data):
            raise MessageError(f"payload {ptype}: bad length {plen}")
        out.append((ptype, off + GENERIC_HEADER_LEN, off + plen))
        off += plen
        if ptype in (PayloadType.SK, PayloadType.SKF):
            break
        ptype = nxt
    return out


def encode_payloads(payloads: tuple[Payload, ...] | list[Payload]) -> tuple[int, bytes]:
    """Encode a payload chain; returns (type of the first payload, bytes).

    For an SK payload last in the chain, its Next Payload is its ``first``.
    """
    out = bytearray()
    for i, p in enumerate(payloads):
        body = _encode_body(p)
        if isinstance(p, (EncryptedPayload, EncryptedFragmentPayload)):
            if i != len(payloads) - 1:
                raise ValueError("SK/SKF payload must be last")
            nxt = p.first
        else:
            nxt = int(payloads[i + 1].payload_type) if i + 1 < len(payloads) else 0
        crit = 0x80 if isinstance(p, UnknownPayload) and p.critical else 0
        if len(body) + 4 > 0xFFFF:
            raise ValueError("payload too long")
        out += struct.pack("!BBH", nxt, crit, len(body) + 4) + body
    first = int(payloads[0].payload_type) if payloads else 0
    return first, bytes(out)


# --------------------------------------------------------------------------
# Header and message
# --------------------------------------------------------------------------

def encode_header(spi_i: int, spi_r: int, first: int, exchange: int, flags: int,
                  message_id: int, length: int, minor_version: int = 0) -> bytes:
    """§3.1 IKE header (28 octets)."""
    return struct.pack("!QQBBBBII", spi_i, spi_r, first, (IKE_MAJOR_VERSION << 4) | minor_version,
                       exchange, flags, message_id, length)


@dataclass(frozen=True)
class Header:
    spi_i: int
    spi_r: int
    first: int
    major: int
    minor: int
    exchange: int
    flags: int
    message_id: int
    length: int


def decode_header(data: bytes) -> Header:
    """Parse and check the §3.1 header; ``length`` must equal len(data)."""
    if len(data) < HEADER_LEN:
        raise MessageError(f"header: truncated ({len(data)} octets)")
    spi_i, spi_r, first, ver, exch, flags, mid, length = struct.unpack_from("!QQBBBBII", data, 0)
    if ver >> 4 != IKE_MAJOR_VERSION:
        raise MessageError(f"header: unsupported major version {ver >> 4}")
    if length != len(data):
        raise MessageError(f"header: length {length} != datagram length {len(data)}")
    if spi_i == 0:
        raise MessageError("header: SPIi is zero")
    return Header(spi_i, spi_r, first, ver >> 4, ver & 0x0F, exch, flags, mid, length)


def decode_message(data: bytes) -> Message:
    """Decode one IKE message (§3.1, §3.2). Raises only MessageError."""
    try:
        h = decode_header(data)
        try:
            scan_payloads(h.first, data, HEADER_LEN)  # count limit on the headers alone, before any body
        except MessageLimitError:
            raise
        except MessageError:
            pass  # decode_payloads names the problem in more detail
        payloads = decode_payloads(h.first, memoryview(data)[HEADER_LEN:])
    except MessageError:
        raise
    except Exception as e:  # a codec bug must not escape as anything else
        raise MessageError(f"internal decode error: {type(e).__name__}") from e
    return Message(h.spi_i, h.spi_r, h.exchange, h.message_id,
                   bool(h.flags & FLAG_INITIATOR), bool(h.flags & FLAG_RESPONSE),
                   payloads, h.minor, bool(h.flags & FLAG_VERSION))


def encode_message(msg: Message) -> bytes:
    """Encode ``msg`` (the SK payload, if any, already encrypted)."""
    first, body = encode_payloads(msg.payloads)
    return encode_header(msg.spi_i, msg.spi_r, first, msg.exchange, msg.flags, msg.message_id,
                         HEADER_LEN + len(body), msg.minor_version) + body


# --------------------------------------------------------------------------
# Exchange rules (§1.2-1.5): allowed payloads per exchange and direction
# --------------------------------------------------------------------------

MANY = 1 << 30


@dataclass(frozen=True)
class PayloadRule:
    ptype: int
    min: int
    max: int


def _rules(*items: tuple[int, int, int]) -> dict[int, PayloadRule]:
    return {int(t): PayloadRule(int(t), lo, hi) for t, lo, hi in items}


_P = PayloadType
# (exchange, is_response) -> (encrypted, rules). Requests that fail are answered
# with only N payloads, so responses have minimums of 0 (checked by the tasks).
PAYLOAD_RULES: dict[tuple[int, bool], tuple[bool, dict[int, PayloadRule]]] = {
    (ExchangeType.IKE_SA_INIT, False): (False, _rules(
        (_P.SA, 1, 1), (_P.KE, 1, 1), (_P.NONCE, 1, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_SA_INIT, True): (False, _rules(
        (_P.SA, 0, 1), (_P.KE, 0, 1), (_P.NONCE, 0, 1), (_P.CERTREQ, 0, MANY),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_AUTH, False): (True, _rules(
        (_P.IDi, 1, 1), (_P.CERT, 0, 4), (_P.CERTREQ, 0, MANY), (_P.IDr, 0, 1), (_P.AUTH, 0, 1),
        (_P.SA, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1), (_P.CP, 0, 1), (_P.EAP, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_AUTH, True): (True, _rules(
        (_P.IDr, 0, 1), (_P.CERT, 0, 4), (_P.AUTH, 0, 1), (_P.SA, 0, 1), (_P.TSi, 0, 1),
        (_P.TSr, 0, 1), (_P.CP, 0, 1), (_P.EAP, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.CREATE_CHILD_SA, False): (True, _rules(
        (_P.SA, 1, 1), (_P.NONCE, 1, 1), (_P.KE, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.CREATE_CHILD_SA, True): (True, _rules(
        (_P.SA, 0, 1), (_P.NONCE, 0, 1), (_P.KE, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.INFORMATIONAL, False): (True, _rules(
        (_P.NOTIFY, 0, MANY), (_P.DELETE, 0, MANY), (_P.CP, 0, 1), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.INFORMATIONAL, True): (True, _rules(
        (_P.NOTIFY, 0, MANY), (_P.DELETE, 0, MANY), (_P.CP, 0, 1), (_P.VENDOR_ID, 0, MANY))),
    # RFC 9242 §3.2 / RFC 9370 §2.2.2: SK {KEi(n)} / SK {KEr(n)}; errors as N
    (ExchangeType.IKE_INTERMEDIATE, False): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_INTERMEDIATE, True): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    # RFC 9370 §2.2.4: SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)} / SK {KEr(n), [N(ADDITIONAL_KEY_EXCHANGE)]}
    (ExchangeType.IKE_FOLLOWUP_KE, False): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_FOLLOWUP_KE, True): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
}


def check_outer(msg: Message) -> None:
    """Check the unencrypted part of ``msg`` against the exchange table.

    Exchanges other than IKE_SA_INIT carry exactly one SK payload (§3.14)
    and nothing else outside it. Raises MessageError("unexpected_payload: ...").
    """
    key = (msg.exchange, msg.is_response)
    if key not in PAYLOAD_RULES:
        raise MessageError(f"unexpected_payload: unsupported exchange {msg.exchange}")
    encrypted, rules = PAYLOAD_RULES[key]
    if encrypted:
        if len(msg.payloads) != 1 or not isinstance(msg.payloads[0], (EncryptedPayload, EncryptedFragmentPayload)):
            raise MessageError("unexpected_payload: exchange must carry only an SK or SKF payload")
    else:
        check_payload_rules(msg.exchange, msg.is_response, msg.payloads)


def check_payload_rules(exchange: int, is_response: bool, payloads: tuple[Payload, ...]) -> None:
    """Check the (decrypted) payloads against the table; unknown non-critical ones pass.

    Raises MessageError whose reason starts with "unexpected_payload".
    """
    key = (exchange, is_response)
    if key not in PAYLOAD_RULES:
        raise MessageError(f"unexpected_payload: unsupported exchange {exchange}")
    _enc, rules = PAYLOAD_RULES[key]
    counts: dict[int, int] = {}
    for p in payloads:
        if isinstance(p, UnknownPayload):
            continue
        t = int(p.payload_type)
        if t not in rules:
            raise MessageError(f"unexpected_payload: {_name(t)} not allowed in "
                               f"{_xname(exchange)} {'response' if is_response else 'request'}")
        counts[t] = counts.get(t, 0) + 1
    for r in rules.values():
        n = counts.get(r.ptype, 0)
        if n < r.min or n > r.max:
            raise MessageError(f"unexpected_payload: {n} x {_name(r.ptype)} in "
                               f"{_xname(exchange)} {'response' if is_response else 'request'}")


def _name(t: int) -> str:
    try:
        return PayloadType(t).name
    except ValueError:
        return str(t)


def _xname(t: int) -> str:
    try:
        return ExchangeType(t).name
    except ValueError:
        return str(t)


__all__ = [
    "MessageError", "MessageLimitError", "MAX_PAYLOADS", "MAX_PROPOSALS", "MAX_TRANSFORMS", "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTES_TOTAL",
    "scan_payloads", "Message", "Header", "Payload", "SaPayload", "Proposal", "Transform",
    "TransformAttribute", "KePayload", "IdPayload", "CertPayload", "CertReqPayload", "AuthPayload",
    "NoncePayload", "NotifyPayload", "DeletePayload", "VendorPayload", "TsPayload",
    "TrafficSelector", "OpaqueSelector", "EncryptedPayload", "EncryptedFragmentPayload", "RawPayload", "UnknownPayload", "decode_message",
    "encode_message", "decode_header", "encode_header", "decode_payloads", "encode_payloads",
    "check_outer", "check_payload_rules", "PAYLOAD_RULES", "HEADER_LEN", "NotifyType",
]
