"""TUN offloads done in userspace: virtio-net headers, GSO split and receive coalescing.

With IFF_VNET_HDR every packet read from or written to the TUN device starts with a
10-byte ``struct virtio_net_hdr`` (include/uapi/linux/virtio_net.h, native byte order,
little-endian here): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
With TUNSETOFFLOAD (TSO4/TSO6/USO) the kernel hands us "super-packets" of up to 64 KB
whose transport checksum is only partial (NEEDS_CSUM: the pseudo-header sum sits in the
checksum field). ``split`` turns one such read into MTU-sized IP packets with every
header and checksum as the kernel's own GSO would have made them (tcp_gso_segment /
__udp_gso_segment: IPv4 ID +1 per segment, TCP seq advanced, FIN/PSH on the last
segment only, CWR on the first only).

``coalesce`` is the other direction: consecutive in-order TCP segments of one flow (as
Linux GRO would merge them: same addresses and ports, contiguous sequence numbers,
equal sizes but the last, identical ACK, window and options, only ACK/PSH flags) are
written as one GSO_TCPV4/TCPV6 super-packet marked NEEDS_CSUM with the pseudo-header
sum in the checksum field. (DATA_VALID is ignored on TUN writes by this kernel.) The
segments' own checksums are not verified: they travelled under the ESP ICV. Everything
else is written as it came, and the order within a flow never changes.

Per-byte work (checksums) is vectorised with numpy. Nothing here raises on bad input:
a malformed header or inconsistent GSO lengths are dropped and counted in the caller's
``counters`` dict (``COUNTER_NAMES``).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
GSO_ECN = 0x80
ZERO_HDR = bytes(VNET_HDR_LEN)
_H, _HH, _I = struct.Struct("!H"), struct.Struct("!HH"), struct.Struct("!I")

PROTO_TCP, PROTO_UDP = 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
MAX_GSO_BYTES = 65535  # IPv4 total length / IPv6 payload length field
# Smallest gso_size split: Linux never sends TCP segments under net.ipv4.tcp_min_snd_mss
# (48 by default). A smaller one (gso_size 1 turns 64 KiB into 65,495 packets, ~0.1 s of
# work per read) is dropped and counted: it bounds one read at 1,365 segments.
MIN_GSO_SIZE = 48
MAX_GSO_SEGMENTS = -(-MAX_GSO_BYTES // MIN_GSO_SIZE)
MAX_COALESCE_SEGMENTS = 64

COUNTER_NAMES = (
    "vnet_malformed",     # shorter than the header, unknown flags/gso_type, bad csum offsets
    "gso_bad_length",     # GSO super-packet whose lengths do not add up
    "gso_unsupported",    # GSO on something we do not split (IP options/extension headers)
    "gso_too_small",      # gso_size under MIN_GSO_SIZE (too many segments for one read)
    "gso_super_in",       # super-packets split
    "gso_segments_out",   # packets they became
    "csum_completed",     # single packets whose partial checksum we finished
    "coalesced_segments",  # packets merged into super-packets on write
    "coalesced_super",    # super-packets written
)


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_NAMES, 0)


class VnetHdr(NamedTuple):
    """``struct virtio_net_hdr`` (without num_buffers)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


class OffloadError(ValueError):
    """A virtio-net header or super-packet we cannot accept; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_vnet_hdr(buf) -> VnetHdr:
    """The virtio-net header at the start of ``buf``; OffloadError("vnet_malformed") if
    ``buf`` is shorter than 10 bytes or flags / gso_type hold unknown values."""
    if len(buf) < VNET_HDR_LEN:
        raise OffloadError("vnet_malformed", f"{len(buf)} bytes, the header alone is {VNET_HDR_LEN}")
    h = VnetHdr._make(VNET_HDR.unpack_from(buf))
    if h.flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise OffloadError("vnet_malformed", f"flags 0x{h.flags:02x}")
    if h.gso_type & ~GSO_ECN not in (GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4):
        raise OffloadError("vnet_malformed", f"gso_type 0x{h.gso_type:02x}")
    return h


def build_vnet_hdr(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
                   csum_start: int = 0, csum_offset: int = 0) -> bytes:
    """The 10-byte virtio-net header with these fields."""
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# ---- checksums (RFC 1071), vectorised ----------------------------------------------------

def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _fold_np(s: np.ndarray) -> np.ndarray:
    # up to 48 bits in: three folds bring it under 2^16 (+1 carry at most, taken by the last)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def word_sum(a: np.ndarray) -> int:
    """Uncomplemented sum of the 16-bit big-endian words of the uint8 array ``a`` (odd length:
    a zero byte appended), not folded."""
    n = a.shape[0]
    s = int(a[:n & ~1].view(">u2").sum(dtype=np.uint64)) if n > 1 else 0
    if n & 1:
        s += int(a[n - 1]) << 8
    return s


def internet_checksum(data) -> int:
    """RFC 1071 checksum of ``data`` (bytes-like), computed with numpy."""
    return ~_fold(word_sum(np.frombuffer(data, dtype=np.uint8))) & 0xFFFF


def _segment_sums(pay: np.ndarray, mss: int, nseg: int) -> np.ndarray:
    """Word sums (int64; unfolded, or already reduced mod 0xFFFF) of ``pay`` cut in ``nseg``
    pieces of ``mss`` bytes (last shorter): each is congruent mod 0xFFFF to the sum of the
    piece's big-endian 16-bit words, which is all a one's-complement checksum needs."""
    n = pay.shape[0]
    full = nseg - 1
    if mss & 3 == 0 and full:
        # sum as native little-endian 32-bit words (fewer, aligned-size adds): since
        # 2^16 = 1 (mod 0xFFFF) that is the little-endian 16-bit word sum, and swapping the
        # bytes of every word multiplies the sum by 2^8 (mod 0xFFFF) (RFC 1071 §2(B))
        le = pay[:full * mss].view("<u4").reshape(full, mss >> 2).sum(axis=1, dtype=np.uint64)
        sums = np.empty(nseg, dtype=np.int64)
        sums[:full] = ((le % 0xFFFF) << 8) % 0xFFFF
        sums[full] = word_sum(pay[full * mss:])
        return sums
    if mss & 1:
        # pieces start at odd offsets every other time: sum the octets at even and at odd
        # positions of each piece apart; a piece's first octet is a high (<< 8) one
        starts = np.arange(nseg, dtype=np.intp) * mss
        even = np.add.reduceat(np.where(np.arange(n) & 1, 0, pay).astype(np.uint64), starts)
        odd = np.add.reduceat(np.where(np.arange(n) & 1, pay, 0).astype(np.uint64), starts)
        odd_start = (starts & 1).astype(bool)
        hi = np.where(odd_start, odd, even).astype(np.int64)
        lo = np.where(odd_start, even, odd).astype(np.int64)
        return (hi << 8) + lo
    m = n >> 1
    sums = np.zeros(nseg, dtype=np.int64)
    starts = np.arange(nseg, dtype=np.intp) * (mss >> 1)
    k = nseg if starts[-1] < m else nseg - 1  # a last piece of one odd byte has no whole word
    if k:
        sums[:k] = np.add.reduceat(pay[:m * 2].view(">u2"), starts[:k], dtype=np.uint64).astype(np.int64)
    if n & 1:
        sums[-1] += int(pay[n - 1]) << 8
    return sums


def _pseudo_base(pkt: np.ndarray, v6: bool, proto: int) -> int:
    """Sum of the pseudo-header's addresses and protocol (length added per segment)."""
    return word_sum(pkt[8:40] if v6 else pkt[12:20]) + proto


# ---- split: TUN read -> MTU-sized IP packets ----------------------------------------------

def split(buf, n: int, counters: dict, arr: np.ndarray | None = None) -> list[bytes]:
    """IP packets from one TUN read: ``buf[:n]`` = virtio-net header + packet.

    ``arr``: optional ``np.frombuffer(buf, np.uint8)`` made once by the caller (the buffer
    is reused read after read). Returns [] for a dropped read (counted in ``counters``).
    """
    if n <= _SMALL and buf[1] == GSO_NONE and buf[0] == F_NEEDS_CSUM:
        out = _complete_small(buf, n)
        if out is not None:
            counters["csum_completed"] += 1
            return [out]
    try:
        h = parse_vnet_hdr(memoryview(buf)[:n])
        gso = h.gso_type & ~GSO_ECN
        if arr is None:
            arr = np.frombuffer(buf, dtype=np.uint8)
        pkt = arr[VNET_HDR_LEN:n]
        mv = memoryview(buf)[VNET_HDR_LEN:n]
        plen = n - VNET_HDR_LEN
        if gso == GSO_NONE:
            if not h.flags & F_NEEDS_CSUM:
                return [bytes(mv)]
            return [_complete_csum(mv, pkt, h, counters)]
        # without NEEDS_CSUM (a forwarded GRO packet: DATA_VALID, the checksum field stale)
        # the split is the same: every segment's checksum is computed from scratch
        if h.gso_size == 0:
            raise OffloadError("gso_bad_length", "gso_size 0")
        if h.gso_size < MIN_GSO_SIZE:
            raise OffloadError("gso_too_small", f"gso_size {h.gso_size} < {MIN_GSO_SIZE}")
        if plen < 1:
            raise OffloadError("gso_bad_length", "empty packet")
        v = pkt[0] >> 4
        if gso == GSO_TCPV4 and v != 4 or gso == GSO_TCPV6 and v != 6:
            raise OffloadError("gso_bad_length", f"gso_type {gso} on an IPv{v} packet")
        if gso == GSO_UDP:
            raise OffloadError("gso_unsupported", "UFO (IP fragmentation offload) is never enabled")
        out = _split_l4(mv, pkt, plen, h, gso, counters)
        counters["gso_super_in"] += 1
        counters["gso_segments_out"] += len(out)
        return out
    except OffloadError as e:
        counters[e.reason] += 1
        return []


def _ip_layout(pkt: np.ndarray, plen: int, proto_want: int) -> tuple[bool, int]:
    """(is IPv6, IP header length) of a super-packet; checks version, length fields, protocol."""
    if plen < 20:
        raise OffloadError("gso_bad_length", f"{plen}-byte packet")
    v = int(pkt[0]) >> 4
    if v == 4:
        ihl = (int(pkt[0]) & 0x0F) * 4
        if ihl != 20:
            raise OffloadError("gso_unsupported", "IPv4 options")
        if (int(pkt[2]) << 8 | int(pkt[3])) != plen:
            raise OffloadError("gso_bad_length", "IPv4 total length != bytes read")
        if int(pkt[6]) & 0x3F or int(pkt[7]):
            raise OffloadError("gso_bad_length", "IPv4 fragment")
        if int(pkt[9]) != proto_want:
            raise OffloadError("gso_bad_length", f"IP protocol {int(pkt[9])}")
        return False, ihl
    if v == 6:
        if plen < 40 or 40 + (int(pkt[4]) << 8 | int(pkt[5])) != plen:
            raise OffloadError("gso_bad_length", "IPv6 payload length != bytes read")
        if int(pkt[6]) != proto_want:
            raise OffloadError("gso_unsupported", f"IPv6 next header {int(pkt[6])} (extension headers)")
        return True, 40
    raise OffloadError("gso_bad_length", f"IP version {v}")


_SMALL = 1024 + VNET_HDR_LEN


def _complete_small(buf, n: int) -> bytes | None:
    """``_complete_csum`` for a short packet: one big-integer conversion and a modulo (no numpy
    call overhead); None when the offsets are bad (the general path then counts it)."""
    cs = buf[6] | buf[7] << 8
    co = buf[8] | buf[9] << 8
    start, at = VNET_HDR_LEN + cs, VNET_HDR_LEN + cs + co
    if at + 2 > n:
        return None
    x = int.from_bytes(buf[start:n], "big")
    if (n - start) & 1:
        x <<= 8
    s = x % 0xFFFF  # 2^16 = 1 (mod 0xFFFF): the word sum, with a non-zero multiple meaning 0xFFFF
    if not s and x:
        s = 0xFFFF
    c = 0xFFFF - s
    if co == 6 and c == 0:
        c = 0xFFFF  # UDP: 0 means "no checksum" (RFC 768)
    out = bytearray(buf[VNET_HDR_LEN:n])
    out[at - VNET_HDR_LEN] = c >> 8
    out[at - VNET_HDR_LEN + 1] = c & 0xFF
    return bytes(out)


def _complete_csum(mv: memoryview, pkt: np.ndarray, h: VnetHdr, counters: dict) -> bytes:
    """A packet with CHECKSUM_PARTIAL: fold the sum from csum_start over the field's pseudo sum."""
    cs, co = h.csum_start, h.csum_offset
    at = cs + co
    if cs >= len(mv) or at + 2 > len(mv):
        raise OffloadError("vnet_malformed", f"csum_start {cs} + csum_offset {co} beyond {len(mv)} bytes")
    c = ~_fold(word_sum(pkt[cs:])) & 0xFFFF
    if co == 6 and c == 0:
        c = 0xFFFF  # UDP: 0 means "no checksum" (RFC 768)
    out = bytearray(mv)
    out[at] = c >> 8
    out[at + 1] = c & 0xFF
    counters["csum_completed"] += 1
    return bytes(out)


def _split_l4(mv: memoryview, pkt: np.ndarray, plen: int, h: VnetHdr, gso: int,
              counters: dict) -> list[bytes]:
    tcp = gso in (GSO_TCPV4, GSO_TCPV6)
    v6, ihl = _ip_layout(pkt, plen, PROTO_TCP if tcp else PROTO_UDP)
    if h.flags & F_NEEDS_CSUM and (h.csum_start != ihl or h.csum_offset != (16 if tcp else 6)):
        raise OffloadError("gso_bad_length", f"csum_start {h.csum_start}/offset {h.csum_offset} "
                                             f"do not point at the {'TCP' if tcp else 'UDP'} checksum")
    if tcp:
        if plen < ihl + 20:
            raise OffloadError("gso_bad_length", "no room for the TCP header")
        l4 = (int(pkt[ihl + 12]) >> 4) * 4
        if l4 < 20 or ihl + l4 > plen:
            raise OffloadError("gso_bad_length", f"TCP data offset {l4}")
    else:
        l4 = 8
        if plen < ihl + 8 or (int(pkt[ihl + 4]) << 8 | int(pkt[ihl + 5])) != plen - ihl:
            raise OffloadError("gso_bad_length", "UDP length != bytes read")
    hl = ihl + l4
    data = plen - hl
    mss = h.gso_size
    if data <= 0:
        raise OffloadError("gso_bad_length", "GSO packet without payload")
    nseg = -(-data // mss)
    last = data - (nseg - 1) * mss
    # payload sums vectorised; the few header fields per segment in plain ints (fewer numpy
    # calls: their fixed cost dominates for the short super-packets TCP sends at low rates)
    paysum = _segment_sums(pkt[hl:], mss, nseg).tolist()
    w = hl + mss
    out_buf = bytearray(nseg * w)
    rows = np.frombuffer(out_buf, dtype=np.uint8).reshape(nseg, w)
    full = nseg - 1
    if full:
        rows[:full, hl:] = pkt[hl:hl + full * mss].reshape(full, mss)
    rows[full, hl:hl + last] = pkt[hl + full * mss:]
    hdr = bytes(mv[:hl])
    addr = hdr[8:40] if v6 else hdr[12:20]
    pseudo = int.from_bytes(addr, "big") % 0xFFFF + (PROTO_TCP if tcp else PROTO_UDP)
    pack_h, pack_hh, pack_i = _H.pack_into, _HH.pack_into, _I.pack_into
    if not v6:
        # IPv4 header sum without total length, ID and checksum
        ipbase = int.from_bytes(hdr[:2] + hdr[6:10] + hdr[12:20], "big") % 0xFFFF
        ident0 = hdr[4] << 8 | hdr[5]
    if tcp:
        seq0 = int.from_bytes(hdr[ihl + 4:ihl + 8], "big")
        fl0 = hdr[ihl + 13]
        doff = hdr[ihl + 12]
        # TCP header sum without seq, flags byte, checksum; the data offset byte is constant
        tbase = (int.from_bytes(hdr[ihl:ihl + 4] + hdr[ihl + 8:ihl + 12] + hdr[ihl + 14:ihl + 16]
                                + hdr[ihl + 18:hl], "big") % 0xFFFF) + (doff << 8) + pseudo
        mid = fl0 & ~(TCP_FIN | TCP_PSH)
    else:
        ubase = int.from_bytes(hdr[ihl:ihl + 4], "big") % 0xFFFF + pseudo
    for i in range(nseg):
        o = i * w
        ln = mss if i < full else last
        l4len = l4 + ln
        out_buf[o:o + hl] = hdr
        if v6:
            pack_h(out_buf, o + 4, l4len)
        else:
            tot = ihl + l4len
            ident = (ident0 + i) & 0xFFFF
            x = ipbase + tot + ident
            x = (x & 0xFFFF) + (x >> 16)
            pack_hh(out_buf, o + 2, tot, ident)
            pack_h(out_buf, o + 10, ~((x & 0xFFFF) + (x >> 16)) & 0xFFFF)
        if tcp:
            seq = (seq0 + i * mss) & 0xFFFFFFFF
            if nseg == 1:
                fl = fl0
            else:
                fl = mid if i < full else mid | (fl0 & (TCP_FIN | TCP_PSH))
                if i:
                    fl &= ~TCP_CWR
            x = tbase + l4len + (seq >> 16) + (seq & 0xFFFF) + fl + paysum[i]
            x = (x & 0xFFFF) + (x >> 16)  # x < 2^32: two folds and the carry below suffice
            x = (x & 0xFFFF) + (x >> 16)
            pack_i(out_buf, o + ihl + 4, seq)
            out_buf[o + ihl + 13] = fl
            pack_h(out_buf, o + ihl + 16, ~((x & 0xFFFF) + (x >> 16)) & 0xFFFF)
        else:
            c = ~_fold(ubase + 2 * l4len + paysum[i]) & 0xFFFF
            pack_hh(out_buf, o + ihl + 4, l4len, c or 0xFFFF)  # RFC 768: 0 means "no checksum"
    b = bytes(out_buf)
    out = [b[i:i + w] for i in range(0, full * w, w)]
    out.append(b[full * w:full * w + hl + last])
    return out


# ---- coalesce: packets to write -> super-packets ------------------------------------------

class _Run:
    __slots__ = ("first", "hl", "ihl", "v6", "mss", "next_seq", "payloads", "closed", "total", "psh", "flen",
                 "fk", "seqb")

    def __init__(self, p: bytes, ihl: int, hl: int, v6: bool, seq: int, plen: int) -> None:
        self.first = p
        self.ihl = ihl
        self.hl = hl
        self.v6 = v6
        self.mss = plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.seqb = self.next_seq.to_bytes(4, "big")
        self.payloads = [p]
        self.total = hl + plen
        self.closed = False
        self.psh = False
        self.flen = len(p)
        # what a next full-sized segment must repeat byte for byte (see coalesce's fast path):
        # all but IPv4 ID/checksum, sequence number and TCP checksum
        if v6:
            self.fk = (p[:44], p[48:56], p[58:hl])
        else:
            self.fk = (p[:4], p[6:10], p[12:24], p[28:36], p[38:hl])

    def frames(self) -> list:
        """The buffers of one TUN write: virtio-net header, IP+TCP header, payloads."""
        ps = self.payloads
        if len(ps) == 1:
            return [ZERO_HDR, ps[0]]
        f, ihl, hl = self.first, self.ihl, self.hl
        h = bytearray(f[:hl])
        total = self.total
        l4len = total - ihl
        if self.v6:
            h[4:6] = l4len.to_bytes(2, "big")
            addr = f[8:40]
        else:
            h[2:4] = total.to_bytes(2, "big")
            h[10:12] = b"\x00\x00"
            h[10:12] = (~_fold(int.from_bytes(h[:ihl], "big") % 0xFFFF) & 0xFFFF).to_bytes(2, "big")
            addr = f[12:20]
        if self.psh:
            h[ihl + 13] |= TCP_PSH
        a = int.from_bytes(addr, "big")
        pseudo = _fold(a % 0xFFFF + PROTO_TCP + l4len)
        h[ihl + 16:ihl + 18] = pseudo.to_bytes(2, "big")
        vh = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if self.v6 else GSO_TCPV4, hl, self.mss, ihl, 16)
        iov = [vh, h, memoryview(f)[hl:]]
        iov += [memoryview(p)[hl:] for p in ps[1:]]
        return iov


_ALL = (b"", None)


def _tcp_view(p: bytes):
    """(key, ihl, hl, v6, seq, payload length, flags) of a TCP packet that may be coalesced, or
    (key, None, ...) for a TCP packet that may not (its flow's run must end), or None."""
    n = len(p)
    v = p[0] >> 4 if n else 0
    if n < 40:
        # a TCP packet too short to read its ports: no run may move past it
        return _ALL if n >= 10 and (v == 4 and p[9] == PROTO_TCP or v == 6 and p[6] == PROTO_TCP) else None
    if v == 4:
        ihl = (p[0] & 0x0F) * 4
        if p[9] != PROTO_TCP or ihl < 20 or n < ihl + 20:
            return None
        key = p[12:20] + p[ihl:ihl + 4]
        if ihl != 20 or p[6] & 0x3F or p[7] or (p[2] << 8 | p[3]) != n:
            return key, None
        v6 = False
    elif v == 6:
        if n < 60 or p[6] != PROTO_TCP:
            return None
        ihl = 40
        key = p[8:40] + p[40:44]
        if 40 + (p[4] << 8 | p[5]) != n:
            return key, None
        v6 = True
    else:
        return None
    hl = ihl + (p[ihl + 12] >> 4) * 4
    fl = p[ihl + 13]
    if hl < ihl + 20 or hl >= n or fl & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) or not fl & TCP_ACK:
        return key, None
    seq = p[ihl + 4] << 24 | p[ihl + 5] << 16 | p[ihl + 6] << 8 | p[ihl + 7]
    return key, ihl, hl, v6, seq, n - hl, fl


def _compatible(r: _Run, p: bytes, ihl: int, hl: int) -> bool:
    f = r.first
    if hl != r.hl:
        return False
    if r.v6:
        # traffic class, flow label, hop limit
        if p[:4] != f[:4] or p[7] != f[7]:
            return False
    elif p[1] != f[1] or p[6] != f[6] or p[8] != f[8]:  # TOS/ECN, DF, TTL
        return False
    # ACK number, data offset, window, options identical; flags equal but PSH
    return (p[ihl + 8:ihl + 13] == f[ihl + 8:ihl + 13] and (p[ihl + 13] | TCP_PSH) == (f[ihl + 13] | TCP_PSH)
            and p[ihl + 14:ihl + 16] == f[ihl + 14:ihl + 16] and p[ihl + 20:hl] == f[ihl + 20:hl])


def coalesce(packets: list[bytes], counters: dict) -> list[tuple[list, int]]:
    """TUN writes for ``packets`` (IP packets, in order): a list of (buffers for one writev,
    number of packets in it). See the module docstring for what is merged."""
    items: list = []  # _Run or bytes, in write order
    runs: dict[bytes, _Run] = {}
    last = None  # the open run the previous TCP packet went to
    append = items.append
    for p in packets:
        r = last
        if r is not None and len(p) == r.flen:
            # fast path: the next full-sized in-order segment of the same flow, same headers
            fk = r.fk
            if r.v6:
                ok = p[44:48] == r.seqb and p[:44] == fk[0] and p[48:56] == fk[1] and p[58:r.hl] == fk[2]
            else:
                ok = (p[24:28] == r.seqb and p[12:24] == fk[2] and p[28:36] == fk[3] and p[:4] == fk[0]
                      and p[6:10] == fk[1] and p[38:r.hl] == fk[4])
            if ok and len(r.payloads) < MAX_COALESCE_SEGMENTS and r.total + r.mss <= MAX_GSO_BYTES:
                r.payloads.append(p)
                r.total += r.mss
                r.next_seq = (r.next_seq + r.mss) & 0xFFFFFFFF
                r.seqb = r.next_seq.to_bytes(4, "big")
                continue
        t = _tcp_view(p)
        if t is None:
            append(p)
            continue
        key = t[0]
        r = runs.get(key)
        if t[1] is None:
            if t is _ALL:
                runs.clear()
                last = None
            elif r is not None:
                del runs[key]
                if r is last:
                    last = None
            append(p)
            continue
        _, ihl, hl, v6, seq, plen, fl = t
        if r is not None:
            if (seq == r.next_seq and plen <= r.mss and len(r.payloads) < MAX_COALESCE_SEGMENTS
                    and r.total + plen <= MAX_GSO_BYTES and _compatible(r, p, ihl, hl)):
                r.payloads.append(p)
                r.total += plen
                r.next_seq = (seq + plen) & 0xFFFFFFFF
                r.seqb = r.next_seq.to_bytes(4, "big")
                if plen < r.mss or fl & TCP_PSH:
                    r.psh = bool(fl & TCP_PSH)
                    del runs[key]  # a short or PSH segment ends the run (as GRO flushes)
                    if r is last:
                        last = None
                else:
                    last = r
                continue
            del runs[key]
        r = _Run(p, ihl, hl, v6, seq, plen)
        append(r)
        if fl & TCP_PSH:
            r.psh = True
            last = None
        else:
            runs[key] = r
            last = r
    out = []
    for it in items:
        if type(it) is _Run:
            k = len(it.payloads)
            if k > 1:
                counters["coalesced_segments"] += k
                counters["coalesced_super"] += 1
            out.append((it.frames(), k))
        else:
            out.append(([ZERO_HDR, it], 1))
    return out
