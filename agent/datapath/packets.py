"""Packet helpers the datapath needs around transport mode, nesting and MTU.

Pure functions on bytes (no I/O): IPv4/IPv6 header building, the Internet
checksum (RFC 1071), TCP/UDP checksum recomputation after transport-mode
decapsulation behind NAT (RFC 3948 §3.1.2), ICMP "fragmentation needed"
(RFC 792 / RFC 1191) and ICMPv6 Packet Too Big (RFC 4443 §3.2), TCP MSS
clamping, and the per-SA overhead used for the TUN MTU.
"""
from __future__ import annotations

import ipaddress
import struct

PROTO_TCP, PROTO_UDP, PROTO_ESP, PROTO_AH, PROTO_ICMP, PROTO_ICMPV6 = 6, 17, 50, 51, 1, 58
IKE_NATT_PORT = 4500


def _sum_be(data: bytes) -> int:
    """Unfolded big-endian 16-bit word sum (for pseudo-headers)."""
    if len(data) & 1:
        data = data + b"\x00"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (big-endian words, folded, complemented)."""
    s = _sum_be(data)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64,
                ident: int = 0, df: bool = True, tos: int = 0) -> bytes:
    """20-byte IPv4 header with a correct header checksum. ``src``/``dst``: 4 packed bytes."""
    h = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + payload_len, ident, 0x4000 if df else 0, ttl, proto, 0,
                    src, dst)
    c = checksum(h)
    return h[:10] + struct.pack("!H", c) + h[12:]


def ipv6_header(src: bytes, dst: bytes, nh: int, payload_len: int, *, hop_limit: int = 64) -> bytes:
    """40-byte IPv6 header. ``src``/``dst``: 16 packed bytes."""
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, nh, hop_limit, src, dst)


def ip_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """A whole IPv4 or IPv6 packet (by the address family) around ``payload``."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        return ipv4_header(s.packed, d.packed, proto, len(payload)) + payload
    return ipv6_header(s.packed, d.packed, proto, len(payload)) + payload


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """IP + UDP packet with a correct UDP checksum (required for IPv6)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = l4_checksum(s.packed, d.packed, PROTO_UDP, udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    return ip_packet(src, dst, PROTO_UDP, udp)


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    """TCP/UDP/ICMPv6 checksum of ``segment`` (its checksum field must be zero) with the pseudo-header."""
    pseudo = src + dst + (struct.pack("!BBH", 0, proto, len(segment)) if len(src) == 4
                          else struct.pack("!IxxxB", len(segment), proto))
    return checksum(pseudo + segment)


def rebuild_transport(src: bytes, dst: bytes, proto: int, payload: bytes, *, fix_checksum: bool) -> bytes:
    """The IP packet a transport-mode SA protected: a fresh header from the outer
    addresses ``src``/``dst`` (packed, 4 or 16 bytes) + ``payload``.

    ``fix_checksum``: recompute the TCP/UDP checksum (RFC 3948 §3.1.2: NAT may
    have changed the addresses the sender's checksum covered).
    """
    if fix_checksum and proto in (PROTO_TCP, PROTO_UDP):
        off = 16 if proto == PROTO_TCP else 6
        if len(payload) >= off + 2 and not (proto == PROTO_UDP and len(src) == 4
                                             and payload[6:8] == b"\x00\x00"):
            seg = payload[:off] + b"\x00\x00" + payload[off + 2:]
            c = l4_checksum(src, dst, proto, seg)
            if proto == PROTO_UDP and c == 0:
                c = 0xFFFF
            payload = payload[:off] + struct.pack("!H", c) + payload[off + 2:]
    if len(src) == 4:
        return ipv4_header(src, dst, proto, len(payload)) + payload
    return ipv6_header(src, dst, proto, len(payload)) + payload


def too_big(packet: bytes, mtu: int) -> bytes | None:
    """ICMP reply telling the sender of ``packet`` to use ``mtu``, or None.

    IPv4: type 3 code 4 "fragmentation needed and DF set" with the next-hop
    MTU (RFC 1191 §4), only for DF packets that are not ICMP errors
    themselves; quotes the IP header + 8 bytes. IPv6: Packet Too Big (RFC 4443
    §3.2), quoting as much as fits in 1280 bytes. The reply goes from the
    original destination to the original source (we stand in for the path).
    """
    v = packet[0] >> 4 if packet else 0
    if v == 4 and len(packet) >= 20:
        if not packet[6] & 0x40:
            return None  # no DF: the kernel may fragment the outer packet
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] == PROTO_ICMP and len(packet) > ihl and packet[ihl] in (3, 11, 12):
            return None  # never answer an ICMP error with one (RFC 1122 §3.2.2)
        quote = packet[:ihl + 8]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        return ipv4_header(packet[16:20], packet[12:16], PROTO_ICMP, len(icmp), df=False) + icmp
    if v == 6 and len(packet) >= 40:
        if packet[6] == PROTO_ICMPV6 and len(packet) > 40 and packet[40] < 128:
            return None
        quote = packet[:1280 - 48]
        src, dst = packet[24:40], packet[8:24]
        icmp = struct.pack("!BBHI", 2, 0, 0, mtu) + quote
        c = l4_checksum(src, dst, PROTO_ICMPV6, icmp)
        icmp = icmp[:2] + struct.pack("!H", c) + icmp[4:]
        return ipv6_header(src, dst, PROTO_ICMPV6, len(icmp)) + icmp
    return None


def clamp_mss(packet: bytes, mss: int) -> bytes:
    """``packet`` with the MSS option of a TCP SYN / SYN-ACK lowered to ``mss`` (checksum fixed);
    other packets (and SYNs already at or below ``mss``) unchanged."""
    v = packet[0] >> 4 if packet else 0
    if v == 4:
        if len(packet) < 40 or packet[9] != PROTO_TCP or packet[6] & 0x1F or packet[7]:
            return packet
        off = (packet[0] & 0x0F) * 4
        src, dst = packet[12:16], packet[16:20]
    elif v == 6:
        if len(packet) < 60 or packet[6] != PROTO_TCP:
            return packet
        off = 40
        src, dst = packet[8:24], packet[24:40]
    else:
        return packet
    if len(packet) < off + 20 or not packet[off + 13] & 0x02:  # SYN flag
        return packet
    doff = (packet[off + 12] >> 4) * 4
    end = min(off + doff, len(packet))
    i = off + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2:
            break
        if kind == 2 and packet[i + 1] == 4 and i + 4 <= end:
            cur = packet[i + 2] << 8 | packet[i + 3]
            if cur <= mss:
                return packet
            b = bytearray(packet)
            b[i + 2:i + 4] = struct.pack("!H", mss)
            b[off + 16:off + 18] = b"\x00\x00"
            c = l4_checksum(src, dst, PROTO_TCP, bytes(b[off:]))
            b[off + 16:off + 18] = struct.pack("!H", c)
            return bytes(b)
        i += packet[i + 1]
    return packet


# ESP overhead per transform family: (IV bytes, ICV bytes, block alignment).
_ESP_SHAPES = {"gcm": (8, 16, 4), "chacha": (8, 16, 4), "cbc": (16, 16, 16), "null": (0, 16, 4)}


def esp_overhead(algorithms: str, *, mode: str, udp_encap: bool, outer_v6: bool) -> int:
    """Worst-case bytes one ESP SA adds to a packet (RFC 4303 §2): outer IP
    header (tunnel only) + UDP (RFC 3948) + SPI/seq + IV + max padding +
    pad length/next header + ICV. ``algorithms`` is the CHILD_SA's proposal
    string (e.g. ``aes128gcm16``); unknown ones get the CBC (largest) shape."""
    a = algorithms.lower()
    shape = _ESP_SHAPES["cbc"]
    for k in ("gcm", "chacha", "null"):
        if k in a:
            shape = _ESP_SHAPES[k]
            break
    if "sha384" in a:
        shape = (shape[0], 24, shape[2])
    elif "sha512" in a:
        shape = (shape[0], 32, shape[2])
    iv, icv, align = shape
    n = 8 + iv + (align - 1) + 2 + icv
    if udp_encap:
        n += 8
    if mode == "tunnel":
        n += 40 if outer_v6 else 20
    return n


def ah_overhead(algorithms: str, *, mode: str, outer_v6: bool) -> int:
    """Bytes AH (RFC 4302 §2) adds: 12-byte header + ICV (+ IPv6 alignment), + outer header in tunnel mode."""
    a = algorithms.lower()
    icv = 24 if "384" in a else 32 if "512" in a else 16
    n = 12 + icv
    if outer_v6 and n % 8:
        n += 8 - n % 8
    if mode == "tunnel":
        n += 40 if outer_v6 else 20
    return n
