"""IKEv2 payload bodies and the generic payload chain (RFC 7296 §3.2-3.16), both ways.

``decode_payloads(first, data)`` walks a chain (§3.2) and decodes each body; ``scan_payloads``
reads only the generic headers (for checks before decoding, e.g. the COOKIE, §2.6);
``encode_payloads`` is the inverse. Count limits (agent.ike.payloads) are enforced while
decoding, before authentication; the SA payload is walked by offsets, once. Raises only
MessageError / MessageLimitError. Pure module: no I/O.
"""
from __future__ import annotations

import struct

from agent.iana import PayloadType, ProtocolId, TsType
from agent.ike.payloads import (_RAW_TYPES, MAX_ATTRIBUTES, MAX_ATTRIBUTES_TOTAL, MAX_PAYLOADS, MAX_PROPOSALS,
                                MAX_TRANSFORMS, AuthPayload, CertPayload, CertReqPayload, DeletePayload,
                                EncryptedFragmentPayload, EncryptedPayload, IdPayload, KePayload, MessageError,
                                MessageLimitError, NoncePayload, NotifyPayload, OpaqueSelector, Payload, Proposal,
                                RawPayload, SaPayload, TrafficSelector, Transform, TransformAttribute, TsPayload,
                                UnknownPayload, VendorPayload)

GENERIC_HEADER_LEN = 4


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


def _decode_sa(data, used: list[int] | None = None) -> SaPayload:
    """§3.3, walked by offsets over ``data`` (bytes or a memoryview of the message): each octet is
    read once and nothing is copied but SPIs and variable attribute values, so the cost before
    authentication is linear in the payload and stops at the first count limit. ``used``:
    [proposals, transforms, attributes] already decoded in earlier SA payloads of the same
    message, updated in place: the limits hold for the whole message, not per SA payload
    (40 SA payloads of 128 transforms each passed before, issue 13)."""
    proposals = []
    off, end = 0, len(data)
    last = False
    nprop0, ntotal, nattrs = used if used is not None else (0, 0, 0)
    while off < end:
        if last:
            raise MessageError("SA: data after the last proposal")
        if nprop0 + len(proposals) >= MAX_PROPOSALS:
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
    if used is not None:
        used[:] = (nprop0 + len(proposals), ntotal, nattrs)
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
    used = [0, 0, 0]  # SA substructures in the whole chain (_decode_sa)
    while ptype != PayloadType.NO_NEXT_PAYLOAD:
        if len(payloads) >= MAX_PAYLOADS:
            raise MessageLimitError(f"more than {MAX_PAYLOADS} payloads in one chain")
        if len(data) - off < GENERIC_HEADER_LEN:
            raise MessageError(f"payload {ptype}: truncated generic header")
        nxt, flags, plen = struct.unpack_from("!BBH", data, off)
        if plen < GENERIC_HEADER_LEN or off + plen > len(data):
            raise MessageError(f"payload {ptype}: bad length {plen}")
        if ptype == PayloadType.SA:  # decoded in place: its substructures are walked by offsets
            payloads.append(_decode_sa(data[off + GENERIC_HEADER_LEN:off + plen], used))
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


__all__ = ["decode_payloads", "scan_payloads", "encode_payloads", "GENERIC_HEADER_LEN"]
