"""ICMP "packet too big" builders for the datapath (pure): the answer to a
packet that does not fit the tunnel's MTU, written back into the TUN device
so the sender's path-MTU discovery shrinks its packets.

IPv4: ICMP Destination Unreachable, code 4 "fragmentation needed and DF
set" with the next-hop MTU (RFC 792, RFC 1191 §4), quoting as much of the
original as fits in 576 bytes (RFC 1812 §4.3.2.3). IPv6: ICMPv6 Packet Too
Big (RFC 4443 §3.2), quoting as much as fits in the minimum MTU of 1280
(RFC 4443 §2.4 (c)).
"""
from __future__ import annotations

import ipaddress
import struct

from agent.esp.errors import EspError
from agent.esp.packet import PROTO_ICMP, PROTO_ICMPV6, build_ip, checksum, l4_checksum, parse_ip

ICMP_MAX_V4 = 576
ICMP_MAX_V6 = 1280
_V4_ERRORS = frozenset((3, 4, 5, 11, 12))  # ICMP error types (RFC 792)


def _no_error_for(h, packet: bytes) -> bool:
    """RFC 1122 §3.2.2 / RFC 4443 §2.4 (e): no error about an error message,
    a non-first fragment, or a packet from an unspecified/multicast source."""
    src = ipaddress.ip_address(h.src)
    if src.is_unspecified or src.is_multicast:
        return True
    if h.version == 4:
        if packet[6] & 0x1F or packet[7]:
            return True
        if h.protocol == PROTO_ICMP and len(packet) > h.header_len and packet[h.header_len] in _V4_ERRORS:
            return True
    elif h.protocol == PROTO_ICMPV6 and len(packet) > h.header_len and packet[h.header_len] < 128:
        return True  # ICMPv6 types below 128 are errors
    return False


def frag_needed(original: bytes, mtu: int, src=None) -> bytes | None:
    """ICMPv4 type 3 code 4 for ``original`` with next-hop ``mtu`` (bytes,
    68..65535). ``src``: the ICMP message's source address (default: the
    original's destination). Returns None where no error may be sent (see
    module notes, or DF clear). Raises EspError("malformed") for a bad
    original, ValueError for a bad ``mtu``."""
    if not 68 <= mtu <= 0xFFFF:
        raise ValueError(f"mtu {mtu}: must be 68..65535 for IPv4")
    h = parse_ip(original)
    if h.version != 4:
        raise EspError("malformed", "frag_needed needs an IPv4 packet")
    if not original[6] & 0x40 or _no_error_for(h, original):
        return None
    quote = original[:min(len(original), h.total_len, ICMP_MAX_V4 - 20 - 8)]
    msg = bytearray(struct.pack(">BBHHH", 3, 4, 0, 0, mtu) + quote)
    c = checksum(msg)
    msg[2:4] = c.to_bytes(2, "big")
    return build_ip(src if src is not None else h.dst, h.src, PROTO_ICMP, bytes(msg), df=False)


def packet_too_big(original: bytes, mtu: int, src=None) -> bytes | None:
    """ICMPv6 Packet Too Big (type 2, code 0) for ``original`` with ``mtu``
    (bytes, >= 1280). ``src`` as ``frag_needed``. Returns None where no error
    may be sent. Raises EspError("malformed") / ValueError."""
    if not 1280 <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"mtu {mtu}: must be at least 1280 for IPv6 (RFC 8200 §5)")
    h = parse_ip(original)
    if h.version != 6:
        raise EspError("malformed", "packet_too_big needs an IPv6 packet")
    if _no_error_for(h, original):
        return None
    s = ipaddress.ip_address(src).packed if src is not None else h.dst
    quote = original[:min(len(original), h.total_len, ICMP_MAX_V6 - 40 - 8)]
    msg = bytearray(struct.pack(">BBHI", 2, 0, 0, mtu) + quote)
    c = l4_checksum(s, h.src, PROTO_ICMPV6, msg)
    msg[2:4] = c.to_bytes(2, "big")
    return build_ip(s, h.src, PROTO_ICMPV6, bytes(msg))


def too_big(original: bytes, mtu: int, src=None) -> bytes | None:
    """``frag_needed`` or ``packet_too_big`` by the original's IP version;
    None when no error is due. Never raises for a malformed original (None)."""
    try:
        if original and original[0] >> 4 == 6:
            return packet_too_big(original, max(mtu, 1280), src)
        return frag_needed(original, max(mtu, 68), src)
    except EspError:
        return None
