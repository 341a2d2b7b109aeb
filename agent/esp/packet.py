"""IP packet helpers for the datapath (pure): parse IPv4/IPv6 headers, find
where ESP/AH goes in transport mode, rebuild a packet after transport-mode
decapsulation, Internet checksums, TCP/UDP checksum repair, TCP MSS clamping.

Every function takes and returns ``bytes``; malformed input raises
``EspError("malformed", detail)`` (never IndexError/struct.error).
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from agent.esp.errors import EspError

PROTO_HOPOPT = 0
PROTO_ICMP = 1
PROTO_IPV4 = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60

# IPv6 extension headers with the generic (next header, length in 8-octet units - 1) shape.
_V6_GENERIC_EXT = frozenset((PROTO_HOPOPT, PROTO_ROUTING, PROTO_DSTOPTS))
_MAX_EXT = 16  # bound on the extension-header walk (hostile chains)


class IpHeader(NamedTuple):
    """Parsed IPv4/IPv6 header (RFC 791 / RFC 8200).

    ``src``/``dst``: packed addresses (4 or 16 bytes). ``protocol``: the
    upper-layer protocol after the extension-header walk (IPv4: the Protocol
    field). ``header_len``: bytes before the upper-layer payload (IPv4 IHL*4
    incl. options; IPv6 40 + the extension headers walked). ``nh_offset``:
    offset of the byte holding ``protocol`` (IPv4: 9; IPv6: 6 or inside the
    last extension header). ``total_len``: length the header claims (IPv4
    Total Length, IPv6 40 + Payload Length). ``fragment``: True for any
    fragment (MF set or offset non-zero, or an IPv6 Fragment header).
    """

    version: int
    src: bytes
    dst: bytes
    protocol: int
    header_len: int
    nh_offset: int
    total_len: int
    fragment: bool


def _bad(detail: str) -> EspError:
    return EspError("malformed", detail)


def parse_ip(packet: bytes, *, stop_at: frozenset[int] | None = None) -> IpHeader:
    """Parse an IPv4/IPv6 packet's header (RFC 791 §3.1, RFC 8200 §3-4).

    IPv6: walks Hop-by-Hop, Routing, Fragment and Destination Options headers
    (and AH, whose length is in 4-octet units, RFC 4302 §2.2) until an
    upper-layer protocol, or until a protocol in ``stop_at`` (e.g.
    ``{PROTO_ESP, PROTO_AH}`` to find a security header). Raises
    ``EspError("malformed")`` for a short or inconsistent header.
    """
    n = len(packet)
    if not n:
        raise _bad("empty packet")
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or n < ihl:
            raise _bad(f"IPv4 header length {ihl} with {n} bytes")
        total = packet[2] << 8 | packet[3]
        if total < ihl:
            raise _bad(f"IPv4 total length {total} below header length {ihl}")
        frag = bool(packet[6] & 0x3F or packet[7])  # MF or offset
        return IpHeader(4, packet[12:16], packet[16:20], packet[9], ihl, 9, total, frag)
    if v == 6:
        if n < 40:
            raise _bad(f"IPv6 header needs 40 bytes, got {n}")
        nh = packet[6]
        nh_off = 6
        off = 40
        frag = False
        for _ in range(_MAX_EXT):
            if stop_at is not None and nh in stop_at:
                break
            if nh in _V6_GENERIC_EXT:
                if n < off + 2:
                    raise _bad("truncated IPv6 extension header")
                nxt, ln = packet[off], (packet[off + 1] + 1) * 8
            elif nh == PROTO_FRAGMENT:
                if n < off + 8:
                    raise _bad("truncated IPv6 fragment header")
                frag = True
                nxt, ln = packet[off], 8
            elif nh == PROTO_AH:
                if n < off + 2:
                    raise _bad("truncated AH header")
                nxt, ln = packet[off], (packet[off + 1] + 2) * 4
            else:
                break
            if n < off + ln:
                raise _bad("truncated IPv6 extension header")
            nh_off = off
            nh = nxt
            off += ln
        else:
            raise _bad(f"more than {_MAX_EXT} IPv6 extension headers")
        return IpHeader(6, packet[8:24], packet[24:40], nh, off, nh_off, 40 + (packet[4] << 8 | packet[5]), frag)
    raise _bad(f"IP version {v}")


def transport_split(packet: bytes) -> tuple[int, int, int]:
    """Where ESP/AH goes in transport mode: (insert offset, offset of the byte
    naming the next protocol, that protocol).

    IPv4: after the header and options. IPv6: after Hop-by-Hop, Routing and
    Fragment headers, and before Destination Options unless they precede a
    Routing header (RFC 4303 §3.1.1, RFC 4302 §3.1.1). Raises EspError.
    """
    n = len(packet)
    if not n:
        raise _bad("empty packet")
    v = packet[0] >> 4
    if v == 4:
        h = parse_ip(packet)
        return h.header_len, 9, h.protocol
    if v != 6:
        raise _bad(f"IP version {v}")
    if n < 40:
        raise _bad(f"IPv6 header needs 40 bytes, got {n}")
    nh, nh_off, off = packet[6], 6, 40
    for _ in range(_MAX_EXT):
        if nh in (PROTO_HOPOPT, PROTO_ROUTING):
            pass
        elif nh == PROTO_DSTOPTS:
            # Destination options before a Routing header stay outside ESP/AH.
            if n < off + 2:
                raise _bad("truncated IPv6 extension header")
            if packet[off] != PROTO_ROUTING:
                break
        elif nh != PROTO_FRAGMENT:
            break
        if n < off + 2:
            raise _bad("truncated IPv6 extension header")
        ln = 8 if nh == PROTO_FRAGMENT else (packet[off + 1] + 1) * 8
        if n < off + ln:
            raise _bad("truncated IPv6 extension header")
        nh, nh_off, off = packet[off], off, off + ln
    else:
        raise _bad(f"more than {_MAX_EXT} IPv6 extension headers")
    return off, nh_off, nh


def set_payload(header: bytes, nh_offset: int, next_header: int, payload: bytes) -> bytes:
    """``header`` (IPv4 with options, or IPv6 with extension headers) followed by
    ``payload``, with the byte at ``nh_offset`` set to ``next_header`` and the
    length fields (IPv4 Total Length + header checksum, IPv6 Payload Length)
    fixed. Raises EspError("malformed") for a bad header or a packet over 65535
    bytes (IPv6 jumbograms are not supported).
    """
    if not header:
        raise _bad("empty header")
    v = header[0] >> 4
    h = bytearray(header)
    if not 0 <= nh_offset < len(h):
        raise _bad(f"next header offset {nh_offset} outside a {len(h)}-byte header")
    h[nh_offset] = next_header
    if v == 4:
        if len(h) < 20:
            raise _bad("short IPv4 header")
        total = len(h) + len(payload)
        if total > 0xFFFF:
            raise _bad(f"IPv4 packet of {total} bytes")
        h[2] = total >> 8
        h[3] = total & 0xFF
        h[10] = h[11] = 0
        c = checksum(h)
        h[10] = c >> 8
        h[11] = c & 0xFF
    elif v == 6:
        if len(h) < 40:
            raise _bad("short IPv6 header")
        plen = len(h) - 40 + len(payload)
        if plen > 0xFFFF:
            raise _bad(f"IPv6 payload of {plen} bytes")
        h[4] = plen >> 8
        h[5] = plen & 0xFF
    else:
        raise _bad(f"IP version {v}")
    return bytes(h) + payload


def _addr(a: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(a, bytes):
        if len(a) not in (4, 16):
            raise ValueError(f"packed address of {len(a)} bytes: must be 4 or 16")
        return a
    return ipaddress.ip_address(a).packed


def build_ip(src, dst, protocol: int, payload: bytes, *, ttl: int = 64, tos: int = 0,
             ident: int = 0, df: bool = True) -> bytes:
    """A new IPv4 (RFC 791) or IPv6 (RFC 8200) packet; version from the
    addresses (str, ip_address or packed bytes; both the same family).
    Raises ValueError for mixed families, EspError("malformed") when too long."""
    s, d = _addr(src), _addr(dst)
    if len(s) != len(d):
        raise ValueError(f"source {src!r} and destination {dst!r} differ in IP version")
    if len(s) == 4:
        h = struct.pack(">BBHHHBBH4s4s", 0x45, tos, 0, ident & 0xFFFF, 0x4000 if df else 0,
                        ttl, protocol, 0, s, d)
        return set_payload(h, 9, protocol, payload)
    h = struct.pack(">IHBB16s16s", 0x60000000 | (tos << 20), 0, protocol, ttl, s, d)
    return set_payload(h, 6, protocol, payload)


def restore_transport(outer, next_header: int, payload: bytes, *, ttl: int = 64) -> bytes:
    """The IP packet after transport-mode decapsulation (RFC 4303 §3.4.4.1 /
    RFC 4302 §3.4.4): the outer header with its protocol set back to
    ``next_header``, lengths and IPv4 checksum fixed, then ``payload``.

    ``outer``: either the received outer header bytes (IPv4 incl. options, or
    IPv6 incl. any extension headers before ESP/AH; more bytes after the
    header are ignored) or a ``(src, dst)`` address pair when only the
    addresses are known (UDP-encapsulated ESP: build a fresh header, ``ttl``).
    Raises EspError("malformed").
    """
    if isinstance(outer, tuple):
        src, dst = outer
        return build_ip(src, dst, next_header, payload, ttl=ttl, df=False)
    h = parse_ip(outer, stop_at=frozenset((PROTO_ESP, PROTO_AH, PROTO_UDP)))
    return set_payload(outer[:h.header_len], h.nh_offset, next_header, payload)


def build_udp(src, dst, sport: int, dport: int, payload: bytes, *, checksum_ipv4: bool = False) -> bytes:
    """A UDP header + payload (RFC 768). The checksum is computed for IPv6
    (mandatory, RFC 8200 §8.1) and for IPv4 only if ``checksum_ipv4``
    (RFC 3948 §2.1 lets ESP-in-UDP senders send 0)."""
    s, d = _addr(src), _addr(dst)
    ln = 8 + len(payload)
    if ln > 0xFFFF:
        raise _bad(f"UDP datagram of {ln} bytes")
    seg = struct.pack(">HHHH", sport, dport, ln, 0) + payload
    if len(s) == 16 or checksum_ipv4:
        c = l4_checksum(s, d, PROTO_UDP, seg) or 0xFFFF
        seg = seg[:6] + c.to_bytes(2, "big") + seg[8:]
    return seg


# ---- checksums ----------------------------------------------------------------

def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Internet checksum (RFC 1071): one's complement of the one's-complement
    sum of 16-bit words, odd length padded with a zero byte. ``initial``: a
    partial sum (e.g. the pseudo-header) to add, not yet complemented.

    One big-integer conversion of the whole buffer and one modulo: faster in
    CPython than a per-word loop (measured in tests/esp/bench_packet.py).
    """
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    x = int.from_bytes(data, "big")
    # 2^16 = 1 (mod 0xFFFF): the word sum is the whole number mod 0xFFFF; a
    # non-zero multiple of 0xFFFF is one's-complement "negative zero" 0xFFFF.
    s = x % 0xFFFF
    if not s and x:
        s = 0xFFFF
    s += initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Uncomplemented sum of the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 8200 §8.1)."""
    # 2^16 = 1 (mod 0xFFFF): each address's word sum is the address mod 0xFFFF
    s = int.from_bytes(src, "big") % 0xFFFF + int.from_bytes(dst, "big") % 0xFFFF
    s += protocol + (length & 0xFFFF) + (length >> 16)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes) -> int:
    """TCP/UDP/ICMPv6 checksum of ``segment`` (its checksum field zeroed by the
    caller) with the pseudo-header of ``src``/``dst`` (packed addresses)."""
    return checksum(segment, pseudo_header_sum(src, dst, protocol, len(segment)))


_CSUM_OFFSET = {PROTO_TCP: 16, PROTO_UDP: 6}


def fix_l4_checksum(packet: bytes) -> bytes:
    """``packet`` with its TCP or UDP checksum recomputed from its own
    addresses (RFC 3948 §3.1.2: after transport-mode decapsulation behind a
    NAT the original addresses are gone, so recompute in full). Other
    protocols, fragments and IPv4 UDP with checksum 0 are returned unchanged.
    Raises EspError("malformed") for a truncated header or segment."""
    h = parse_ip(packet)
    off = _CSUM_OFFSET.get(h.protocol)
    if off is None or h.fragment:
        return packet
    end = min(len(packet), h.total_len)
    seg = bytearray(packet[h.header_len:end])
    if len(seg) < off + 2:
        raise _bad(f"truncated {'TCP' if h.protocol == PROTO_TCP else 'UDP'} header")
    if h.protocol == PROTO_UDP and h.version == 4 and not (seg[6] or seg[7]):
        return packet  # no checksum sent (RFC 768)
    seg[off] = seg[off + 1] = 0
    c = l4_checksum(h.src, h.dst, h.protocol, seg)
    if h.protocol == PROTO_UDP and c == 0:
        c = 0xFFFF
    seg[off] = c >> 8
    seg[off + 1] = c & 0xFF
    return packet[:h.header_len] + bytes(seg) + packet[end:]


def l4_checksum_ok(packet: bytes) -> bool:
    """True if the TCP/UDP checksum of ``packet`` verifies (other protocols: True)."""
    try:
        return fix_l4_checksum(packet) == packet
    except EspError:
        return False


# ---- TCP MSS clamping -----------------------------------------------------------

def clamp_mss(packet: bytes, mss: int) -> bytes:
    """Clamp the MSS option of a TCP SYN or SYN-ACK to ``mss`` (RFC 9293
    §3.7.1), recomputing the TCP checksum. Returns
    ``packet`` itself (same object) when there is nothing to change: not TCP,
    not SYN, no MSS option, already small enough, or malformed."""
    try:
        h = parse_ip(packet)
    except EspError:
        return packet
    if h.protocol != PROTO_TCP or h.fragment:
        return packet
    t = h.header_len
    n = len(packet)
    if n < t + 20 or not packet[t + 13] & 0x02:  # SYN flag
        return packet
    doff = (packet[t + 12] >> 4) * 4
    end = t + doff
    if doff < 20 or n < end:
        return packet
    i = t + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        ln = packet[i + 1]
        if ln < 2 or i + ln > end:
            break
        if kind == 2 and ln == 4:
            old = packet[i + 2] << 8 | packet[i + 3]
            if old <= mss:
                return packet
            b = bytearray(packet)
            b[i + 2] = mss >> 8
            b[i + 3] = mss & 0xFF
            # the option may sit at an odd offset: recompute rather than patch (SYNs are rare)
            try:
                return fix_l4_checksum(bytes(b))
            except EspError:
                return packet
        i += ln
    return packet
