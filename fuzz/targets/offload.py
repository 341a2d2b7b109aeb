"""Virtio-net headers and GSO super-packets (agent/datapath/offload.py).

Input: ``sel`` octet, then:

- ``sel`` bit 0 clear: one TUN read (10-octet virtio-net header + packet) to
  ``split``. With ``sel`` bit 1 the read is first inflated to the length in the
  next 2 octets (up to 65,545: the kernel's 64 KiB super-packets, which libFuzzer's
  4 KiB inputs cannot hold) by repeating its payload, with the IPv4 total length,
  IPv6 payload length and UDP length fixed up to match.
- ``sel`` bit 0 set: up to 32 IP packets (length-prefixed chunks) to ``coalesce``,
  as the ESP side hands decrypted packets to the TUN writer.

Allowed: ``OffloadError`` (the module's own error; ``split`` and ``coalesce`` count
drops instead, so in practice nothing escapes). Checked: a dropped read increments
exactly one drop counter; a split super-packet gives ceil(payload / gso_size)
segments of at most gso_size payload octets each, whose payloads concatenate to the
original's, every IP length field true and every TCP/UDP checksum valid
(agent/esp/packet.py, independent code); a finished partial checksum equals the
RFC 1071 checksum from ``csum_start`` computed by that other code; ``coalesce``
writes every packet exactly once, unmerged ones byte for byte, merged ones such that
splitting the write again gives them back (IPv4 ID and checksums excepted: those
are recomputed).
"""
from __future__ import annotations

import struct

from agent.datapath import offload as o
from agent.esp.packet import checksum, l4_checksum_ok

from fuzz.harness import Finding, Reader, Target

DROPS = ("vnet_malformed", "gso_bad_length", "gso_unsupported", "gso_too_small")


def _inflate(frame: bytes, want: int) -> bytes:
    """``frame`` grown to ``want`` octets by repeating what follows its headers, length fields fixed."""
    if len(frame) < o.VNET_HDR_LEN + 28 or want <= len(frame):
        return frame
    pkt = bytearray(frame[o.VNET_HDR_LEN:])
    v = pkt[0] >> 4
    ihl = 40 if v == 6 else (pkt[0] & 15) * 4 or 20
    hl = min(max(frame[2] | frame[3] << 8, ihl), len(pkt) - 1)  # hdr_len from the header, sane
    body = bytes(pkt[hl:])
    total = min(want - o.VNET_HDR_LEN, 65535 if v == 4 else 65535 + 40)
    if body and len(pkt) < total:
        need = total - len(pkt)
        pkt += (body * (need // len(body) + 1))[:need]
    if v == 4:
        struct.pack_into("!H", pkt, 2, min(len(pkt), 0xFFFF))
    elif v == 6 and len(pkt) >= 40:  # a shorter one stays as it is (split drops it)
        struct.pack_into("!H", pkt, 4, min(len(pkt) - 40, 0xFFFF))
    if (pkt[9] if v == 4 else pkt[6] if v == 6 else 0) == 17 and len(pkt) >= ihl + 8:
        struct.pack_into("!H", pkt, ihl + 4, min(len(pkt) - ihl, 0xFFFF))
    return frame[:o.VNET_HDR_LEN] + bytes(pkt)


def _ip_len_ok(p: bytes) -> bool:
    if p[0] >> 4 == 4:
        return (p[2] << 8 | p[3]) == len(p)
    return 40 + (p[4] << 8 | p[5]) == len(p)


def check_split(frame: bytes) -> None:
    c = o.new_counters()
    buf = bytearray(frame) + bytearray(64)  # the reader's buffer is larger than the read
    out = o.split(buf, len(frame), c)
    with TARGET.fixture():  # the checks below are not the code under the 10 ms bound
        _check_split(frame, out, c)


def _check_split(frame: bytes, out: list[bytes], c: dict) -> None:
    if not out:
        if sum(c[k] for k in DROPS) != 1 or sum(c.values()) != 1:
            raise Finding(f"dropped read counted {c}")
        return
    if sum(c[k] for k in DROPS):
        raise Finding(f"packets returned and a drop counted: {c}")
    h = o.parse_vnet_hdr(frame)
    pkt = frame[o.VNET_HDR_LEN:]
    gso = h.gso_type & ~o.GSO_ECN
    if gso == o.GSO_NONE:
        if len(out) != 1 or len(out[0]) != len(pkt):
            raise Finding("a plain read became something else")
        if not h.flags & o.F_NEEDS_CSUM:
            if out[0] != pkt:
                raise Finding("a read without offload was changed")
            return
        at = h.csum_start + h.csum_offset
        want = checksum(pkt[h.csum_start:])
        if h.csum_offset == 6 and want == 0:
            want = 0xFFFF
        got = out[0]
        if got[:at] != pkt[:at] or got[at + 2:] != pkt[at + 2:] or (got[at] << 8 | got[at + 1]) != want:
            raise Finding(f"partial checksum finished wrong at {at}: {got[at:at + 2].hex()} != {want:04x}")
        if c["csum_completed"] != 1:
            raise Finding(f"csum_completed {c['csum_completed']}")
        return
    tcp = gso in (o.GSO_TCPV4, o.GSO_TCPV6)
    ihl = 40 if pkt[0] >> 4 == 6 else 20
    hl = ihl + ((pkt[ihl + 12] >> 4) * 4 if tcp else 8)
    data = pkt[hl:]
    if len(out) != -(-len(data) // h.gso_size) or c["gso_segments_out"] != len(out) or c["gso_super_in"] != 1:
        raise Finding(f"{len(out)} segments for {len(data)} octets at gso_size {h.gso_size}")
    for s in out:
        if not _ip_len_ok(s) or len(s) - hl > h.gso_size or len(s) <= hl:
            raise Finding("segment with a wrong length")
        if not l4_checksum_ok(s):
            raise Finding("segment with a bad TCP/UDP checksum")
    if b"".join(s[hl:] for s in out) != data:
        raise Finding("segments do not carry the super-packet's payload")


def _masked(p: bytes) -> bytes:
    """``p`` without what a re-split recomputes: IPv4 ID and header checksum, TCP checksum
    (at the offsets of a coalescible packet: IPv4 without options, or IPv6)."""
    if len(p) < 60:
        return p
    b = bytearray(p)
    if b[0] >> 4 == 4:
        b[4:6] = b[10:12] = b[36:38] = b"\0\0"
    elif b[0] >> 4 == 6:
        b[56:58] = b"\0\0"
    return bytes(b)


def check_coalesce(packets: list[bytes]) -> None:
    c = o.new_counters()
    items = o.coalesce(packets, c)
    with TARGET.fixture():
        _check_coalesce(packets, items, c)


def _check_coalesce(packets: list[bytes], items: list, c: dict) -> None:
    if sum(k for _, k in items) != len(packets):
        raise Finding("coalesce lost or duplicated packets")
    got: list[bytes] = []
    merged = 0
    for bufs, k in items:
        frame = b"".join(bytes(b) for b in bufs)
        if k == 1:
            if frame[:o.VNET_HDR_LEN] != o.ZERO_HDR:
                raise Finding("a single packet written with a virtio-net header")
            got.append(frame[o.VNET_HDR_LEN:])
            continue
        merged += k
        h = o.parse_vnet_hdr(frame)
        if h.gso_type not in (o.GSO_TCPV4, o.GSO_TCPV6) or h.flags != o.F_NEEDS_CSUM:
            raise Finding(f"coalesced write with a bad header {h}")
        floor = o.MIN_GSO_SIZE
        o.MIN_GSO_SIZE = 1  # the kernel splits any gso_size we write; only reads are floored
        try:
            seg_c = o.new_counters()
            segs = o.split(bytearray(frame), len(frame), seg_c)
        finally:
            o.MIN_GSO_SIZE = floor
        if len(segs) != k:
            raise Finding(f"coalesced write of {k} re-splits into {len(segs)} ({seg_c})")
        got += segs
    if merged != c["coalesced_segments"]:
        raise Finding(f"coalesced_segments {c['coalesced_segments']} != {merged}")
    # every packet written exactly once, unchanged but for the fields a split recomputes
    if sorted(map(_masked, got)) != sorted(map(_masked, packets)):
        raise Finding("coalesce changed, lost or invented a packet")


def one_input(data: bytes) -> None:
    r = Reader(data)
    sel = r.u8()
    if sel & 1:
        packets = []
        while r.left() and len(packets) < 32:
            p = r.chunk()
            if p:
                packets.append(p)
        check_coalesce(packets)
        return
    if sel & 2:
        want = r.u16() + (sel >> 2) * 0x10000 // 64  # up to ~65 KiB
        with TARGET.fixture():  # building the input is not the code under the bound
            frame = _inflate(r.rest(), want)
        check_split(frame)
    else:
        check_split(r.rest())


TARGET = Target("offload", one_input, allowed=(o.OffloadError,), packages=("agent",))
