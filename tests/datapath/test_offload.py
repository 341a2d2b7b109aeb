"""Userspace TUN offloads (agent.datapath.offload): virtio-net headers, GSO split, coalescing.

Expected packets are built independently with scapy (its own checksum code); the
segmentation rules are the kernel's (net/ipv4/tcp_offload.c tcp_gso_segment: seq
advanced, FIN/PSH on the last segment only, CWR on the first only; IPv4 ID +1 per
segment; net/ipv4/udp_offload.c for USO).
"""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from agent.datapath import offload as o
from agent.esp.packet import checksum, l4_checksum_ok


def pseudo_partial(pkt: bytes, v6: bool, proto: int) -> int:
    """The folded pseudo-header sum the kernel leaves in the checksum field (CHECKSUM_PARTIAL)."""
    if v6:
        addrs, l4len = pkt[8:40], len(pkt) - 40
    else:
        addrs, l4len = pkt[12:20], len(pkt) - (pkt[0] & 15) * 4
    return ~checksum(addrs + bytes([0, proto]) + l4len.to_bytes(2, "big")) & 0xFFFF


def super_tcp(payload: bytes, mss: int, *, v6=False, flags="PA", seq=1000, ident=7, options=(),
              src="10.0.0.1", dst="10.0.0.2") -> bytes:
    """vnet header + a TSO super-packet as the kernel hands it to a TUN reader."""
    l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src=src, dst=dst, id=ident, flags="DF")
    pkt = bytearray(bytes(l3 / TCP(sport=5001, dport=40000, seq=seq, ack=77, flags=flags, window=500,
                                    options=list(options), chksum=0) / payload))
    ihl = 40 if v6 else 20
    pkt[ihl + 16:ihl + 18] = pseudo_partial(bytes(pkt), v6, 6).to_bytes(2, "big")
    thl = (pkt[ihl + 12] >> 4) * 4
    hdr = o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV6 if v6 else o.GSO_TCPV4, ihl + thl, mss, ihl, 16)
    return hdr + bytes(pkt)


def expected_tcp(payload: bytes, mss: int, *, v6=False, flags="PA", seq=1000, ident=7, options=(),
                 src="10.0.0.1", dst="10.0.0.2") -> list[bytes]:
    out = []
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)]
    for i, c in enumerate(chunks):
        f = TCP(flags=flags).flags
        if i < len(chunks) - 1:
            f &= ~0x09  # FIN, PSH on the last only
        if i > 0:
            f &= ~0x80  # CWR on the first only
        l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src=src, dst=dst, id=(ident + i) & 0xFFFF, flags="DF")
        out.append(bytes(l3 / TCP(sport=5001, dport=40000, seq=(seq + i * mss) & 0xFFFFFFFF, ack=77, flags=int(f),
                                  window=500, options=list(options)) / c))
    return out


def run_split(frame: bytes, counters=None):
    counters = counters if counters is not None else o.new_counters()
    buf = bytearray(frame) + bytearray(64)  # the reader's buffer is larger than the read
    return o.split(buf, len(frame), counters), counters


# ---- virtio-net header ---------------------------------------------------------------

def test_vnet_hdr_roundtrip_and_layout():
    h = o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV4, 52, 1348, 20, 16)
    assert len(h) == 10
    assert h == bytes([1, 1, 52, 0, 0x44, 0x05, 20, 0, 16, 0])  # little-endian (x86 native)
    assert o.parse_vnet_hdr(h) == o.VnetHdr(1, 1, 52, 1348, 20, 16)


@pytest.mark.parametrize("frame, why", [
    (b"\x00" * 9, "vnet_malformed"),
    (o.build_vnet_hdr(flags=0x10) + b"\x45" + bytes(19), "vnet_malformed"),
    (o.build_vnet_hdr(gso_type=9) + b"\x45" + bytes(19), "vnet_malformed"),
])
def test_malformed_vnet_header_dropped_and_counted(frame, why):
    out, c = run_split(frame)
    assert out == [] and c[why] == 1


# ---- split -----------------------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size, mss", [(5000, 1348), (1348 * 3, 1348), (65000 - 60, 1348), (1, 1348),
                                       (4001, 1000), (2001, 1000), (3000, 999), (2697, 1348)])
def test_tso_split_matches_scapy(v6, size, mss):
    payload = os.urandom(size)
    out, c = run_split(super_tcp(payload, mss, v6=v6))
    want = expected_tcp(payload, mss, v6=v6)
    assert out == want
    assert all(l4_checksum_ok(p) for p in out)
    assert c["gso_super_in"] == 1 and c["gso_segments_out"] == len(want)


def test_tso_split_fin_cwr_options_seq_wrap_and_id_wrap():
    payload = os.urandom(3500)
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]
    kw = dict(flags="FPAC", seq=0xFFFFF000, ident=0xFFFF, options=opts)
    out, _ = run_split(super_tcp(payload, 1000, **kw))
    assert out == expected_tcp(payload, 1000, **kw)
    flags = [IP(p)[TCP].flags for p in out]
    assert [int(f) & 0x89 for f in flags] == [0x80, 0, 0, 0x09]
    assert [IP(p).id for p in out] == [0xFFFF, 0, 1, 2]


@pytest.mark.parametrize("flags", [0, o.F_DATA_VALID])
def test_gso_without_needs_csum_is_split_with_fresh_checksums(flags):
    # a GRO packet forwarded into the TUN: DATA_VALID (or nothing), no csum offsets, the TCP
    # checksum field stale: every segment's checksum is computed from scratch anyway
    payload = os.urandom(4000)
    frame = bytearray(super_tcp(payload, 1000))
    frame[0] = flags
    frame[6:10] = bytes(4)
    frame[10 + 36:10 + 38] = b"\xde\xad"
    out, c = run_split(bytes(frame))
    assert out == expected_tcp(payload, 1000) and c["gso_super_in"] == 1


def test_uso_split_matches_scapy():
    payload = os.urandom(1200 * 5 + 17)
    pkt = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=100) / UDP(sport=1, dport=2, chksum=0) / payload))
    pkt[26:28] = pseudo_partial(bytes(pkt), False, 17).to_bytes(2, "big")
    frame = o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, 28, 1200, 20, 6) + bytes(pkt)
    out, c = run_split(frame)
    want = [bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=100 + i) / UDP(sport=1, dport=2) / payload[k:k + 1200])
            for i, k in enumerate(range(0, len(payload), 1200))]
    assert out == want and c["gso_segments_out"] == 6


def test_uso_split_ipv6():
    payload = os.urandom(3000)
    pkt = bytearray(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2, chksum=0) / payload))
    pkt[46:48] = pseudo_partial(bytes(pkt), True, 17).to_bytes(2, "big")
    frame = o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, 48, 1400, 40, 6) + bytes(pkt)
    out, _ = run_split(frame)
    assert out == [bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / payload[k:k + 1400])
                   for k in range(0, 3000, 1400)]


@pytest.mark.parametrize("size", [3, 1301])  # the short path (big integer) and the numpy one
@pytest.mark.parametrize("v6, proto", [(False, 6), (False, 17), (True, 6), (True, 17)])
def test_single_packet_partial_checksum_completed(v6, proto, size):
    l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    l4 = TCP(sport=1, dport=2, flags="S", chksum=0) if proto == 6 else UDP(sport=1, dport=2, chksum=0)
    data = bytes(range(256)) * 5 + b"abcdefghijklmnopqrstu"
    data = data[:size]
    pkt = bytearray(bytes(l3 / l4 / data))
    ihl, off = (40 if v6 else 20), (16 if proto == 6 else 6)
    pkt[ihl + off:ihl + off + 2] = pseudo_partial(bytes(pkt), v6, proto).to_bytes(2, "big")
    out, c = run_split(o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, ihl, off) + bytes(pkt))
    l4 = TCP(sport=1, dport=2, flags="S") if proto == 6 else UDP(sport=1, dport=2)
    assert out == [bytes(l3 / l4 / data)] and c["csum_completed"] == 1


@pytest.mark.parametrize("size", [8, 1300])
def test_icmpv6_partial_checksum_completed(size):
    # ICMPv6 (checksum at offset 2) also comes with NEEDS_CSUM when the TUN offers TUN_F_CSUM
    from scapy.layers.inet6 import ICMPv6EchoRequest
    want = bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=2, data=bytes(size)))
    pkt = bytearray(want)
    pkt[42:44] = pseudo_partial(want, True, 58).to_bytes(2, "big")
    out, c = run_split(o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 40, 2) + bytes(pkt))
    assert out == [want] and c["csum_completed"] == 1


def test_udp_checksum_zero_is_sent_as_ffff():
    # find a payload whose UDP checksum computes to 0: RFC 768 sends it as 0xFFFF
    for i in range(200000):
        payload = i.to_bytes(4, "big")
        u = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / payload)
        if checksum(u[12:20] + b"\x00\x11" + (len(u) - 20).to_bytes(2, "big") + u[20:]) == 0:
            break
    else:  # pragma: no cover
        pytest.fail("no zero-checksum payload found")
    pkt = bytearray(u)
    pkt[26:28] = pseudo_partial(u, False, 17).to_bytes(2, "big")
    out, _ = run_split(o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(pkt))
    assert out[0][26:28] == b"\xff\xff"


def test_plain_packet_passes_unchanged():
    p = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"x")
    out, c = run_split(o.ZERO_HDR + p)
    assert out == [p] and not any(c.values())


def _bad(frame: bytearray, at: int, value: bytes) -> bytes:
    frame = bytearray(frame)
    frame[at:at + len(value)] = value
    return bytes(frame)


GOOD = super_tcp(bytes(5000), 1348)


@pytest.mark.parametrize("frame, reason", [
    (_bad(GOOD, 10 + 2, (4000).to_bytes(2, "big")), "gso_bad_length"),      # IPv4 total length lies
    (GOOD[:-10], "gso_bad_length"),                                         # truncated read
    (_bad(GOOD, 6, b"\x00\x00"), "gso_bad_length"),                         # gso_size 0
    (_bad(GOOD, 8, b"\x00\x00"), "gso_bad_length"),                         # csum_start not the TCP header
    (_bad(GOOD, 1, bytes([o.GSO_TCPV6])), "gso_bad_length"),                # TCPV6 on an IPv4 packet
    (_bad(GOOD, 1, bytes([o.GSO_UDP_L4])), "gso_bad_length"),               # USO on a TCP packet
    (_bad(GOOD, 1, bytes([o.GSO_UDP])), "gso_unsupported"),                 # UFO
    (_bad(GOOD, 10 + 32, b"\x10"), "gso_bad_length"),                       # TCP data offset 4 bytes
    (_bad(GOOD, 10, b"\x46"), "gso_unsupported"),                           # IPv4 options
    (o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV4, 40, 1000, 20, 16) + GOOD[10:50], "gso_bad_length"),
    (o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 400) + GOOD[10:200], "vnet_malformed"),  # csum beyond
    (o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 4000) + GOOD[10:2000], "vnet_malformed"),  # (numpy path)
])
def test_inconsistent_super_packets_dropped_and_counted(frame, reason):
    out, c = run_split(frame)
    assert out == [], out
    assert c[reason] == 1, c


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(1, 400))
def test_segment_sums_equal_word_sums_piece_by_piece(pay, mss):
    # the odd-mss path sums even and odd positions apart (no Python loop per segment)
    import numpy as np
    nseg = -(-len(pay) // mss)
    a = np.frombuffer(pay, dtype=np.uint8)
    got = o._segment_sums(a, mss, nseg)
    for i in range(nseg):
        assert int(got[i]) % 0xFFFF == o.word_sum(a[i * mss:(i + 1) * mss]) % 0xFFFF


@pytest.mark.parametrize("v6", [False, True])
def test_gso_size_below_the_floor_is_dropped_and_counted(v6):
    # gso_size 1 on a 64 KiB super-packet was split into 65,495 packets (~0.1 s for one read)
    payload = bytes(65535 - 80)
    out, c = run_split(super_tcp(payload, o.MIN_GSO_SIZE - 1, v6=v6))
    assert out == [] and c["gso_too_small"] == 1 and c["gso_super_in"] == 0
    out, c = run_split(super_tcp(payload, 1, v6=v6))
    assert out == [] and c["gso_too_small"] == 1
    # at the floor itself the split goes ahead, every segment as the kernel would make it
    out, c = run_split(super_tcp(payload, o.MIN_GSO_SIZE, v6=v6))
    assert len(out) == c["gso_segments_out"] == -(-len(payload) // o.MIN_GSO_SIZE) <= o.MAX_GSO_SEGMENTS
    assert out == expected_tcp(payload, o.MIN_GSO_SIZE, v6=v6)


def test_udp_gso_size_below_the_floor_is_dropped_and_counted():
    pkt = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / bytes(3000)))
    pkt[26:28] = pseudo_partial(bytes(pkt), False, 17).to_bytes(2, "big")
    frame = o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, 28, 8, 20, 6) + bytes(pkt)
    out, c = run_split(frame)
    assert out == [] and c["gso_too_small"] == 1


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 255), st.integers(0, 255))
def test_fuzzed_reads_never_raise(body, gso, flags):
    frame = o.build_vnet_hdr(flags & 3, gso, 40, 100, 20, 16) + bytes(GOOD[10:60]) + body
    c = o.new_counters()
    out = o.split(bytearray(frame), len(frame), c)
    assert isinstance(out, list)
    if not out:
        assert sum(c.values()) >= 1


# ---- coalesce --------------------------------------------------------------------------

def _frames_to_packets(items):
    """Re-split what coalesce would write (the kernel's view of each write)."""
    pkts = []
    for bufs, k in items:
        frame = b"".join(bytes(b) for b in bufs)
        out, c = run_split(frame)
        h = o.parse_vnet_hdr(frame)
        if h.gso_type:
            assert h.flags == o.F_NEEDS_CSUM and h.csum_offset == 16
            # the checksum field holds the pseudo-header sum (what the kernel expects)
            ihl = h.csum_start
            assert frame[10 + ihl + 16:10 + ihl + 18] == pseudo_partial(frame[10:], ihl == 40, 6).to_bytes(2, "big")
        else:
            assert frame[:10] == o.ZERO_HDR
        assert len(out) == k
        pkts += out
    return pkts


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_one_flow_into_one_super_packet_and_back(v6):
    payload = os.urandom(1348 * 10 + 500)
    segs = expected_tcp(payload, 1348, v6=v6)
    c = o.new_counters()
    items = o.coalesce(segs, c)
    assert len(items) == 1 and items[0][1] == 11
    h = o.parse_vnet_hdr(items[0][0][0])
    assert h.gso_type == (o.GSO_TCPV6 if v6 else o.GSO_TCPV4) and h.gso_size == 1348
    assert h.hdr_len == (60 if v6 else 40) and h.csum_start == (40 if v6 else 20)
    assert _frames_to_packets(items) == segs
    assert c["coalesced_segments"] == 11 and c["coalesced_super"] == 1


def test_coalesce_keeps_per_flow_order_and_passes_the_rest():
    a = expected_tcp(os.urandom(4000), 1000)                 # flow A: 4 segments
    b = [bytes(IP(src="10.0.0.9", dst="10.0.0.2", id=i) / TCP(sport=7, dport=8, seq=100 + 500 * i, ack=1, flags="A")
               / bytes(500)) for i in range(3)]               # flow B: 3 segments
    udp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"u")
    syn = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5001, dport=40000, flags="S"))
    mixed = [a[0], b[0], a[1], udp, b[1], a[2], b[2], a[3], syn]
    items = o.coalesce(mixed, o.new_counters())
    assert [k for _, k in items] == [4, 3, 1, 1]
    got = _frames_to_packets(items)
    assert sorted(got) == sorted(mixed)
    for flow in (a, b):
        assert [p for p in got if p in flow] == flow


def test_coalesce_refuses_what_gro_refuses():
    base = expected_tcp(os.urandom(3000), 1000, flags="A")
    gap = expected_tcp(os.urandom(3000), 1000, flags="A", seq=1000 + 4000)  # sequence gap
    p = IP(base[1])
    p[TCP].ack = 99
    del p[TCP].chksum, p[IP].chksum
    changed_ack = bytes(p)
    items = o.coalesce([base[0], changed_ack, base[2]], o.new_counters())
    assert [k for _, k in items] == [1, 1, 1]
    items = o.coalesce([base[0], base[1], gap[0], gap[1]], o.new_counters())
    assert [k for _, k in items] == [2, 2]
    # a segment longer than the first: never merged (sizes equal but the last)
    big = expected_tcp(os.urandom(2500), 1500, flags="A", seq=1000 + 1000)
    assert [k for _, k in o.coalesce([base[0], big[0]], o.new_counters())] == [1, 1]
    # a short segment ends the run
    short = expected_tcp(os.urandom(1500), 1000, flags="A")
    assert [k for _, k in o.coalesce(short + [expected_tcp(os.urandom(1000), 1000, flags="A", seq=2500)[0]],
                                     o.new_counters())] == [2, 1]


def test_coalesce_psh_ends_run_and_is_kept():
    segs = expected_tcp(os.urandom(3000), 1000, flags="PA")  # PSH on the last only
    nxt = expected_tcp(os.urandom(2000), 1000, flags="A", seq=4000)
    items = o.coalesce(segs + nxt, o.new_counters())
    assert [k for _, k in items] == [3, 2]
    assert _frames_to_packets(items) == segs + nxt


def test_coalesce_respects_64k_limit():
    segs = expected_tcp(os.urandom(1400 * 60), 1400, flags="A")
    items = o.coalesce(segs, o.new_counters())
    assert all(sum(len(b) for b in bufs) - 10 <= 65535 for bufs, _ in items)
    assert sum(k for _, k in items) == 60 and len(items) == 2
    assert _frames_to_packets(items) == segs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=30), st.randoms())
def test_coalesce_property_same_packets_same_per_flow_order(plan, rnd):
    flows = {f: 1000 for f in range(3)}
    pkts = []
    for f, n in plan:
        size = [500, 500, 300][rnd.randint(0, 2)]
        p = IP(src=f"10.0.0.{f + 1}", dst="10.0.0.9", id=rnd.randint(0, 65535)) / \
            TCP(sport=1000 + f, dport=80, seq=flows[f], ack=5, flags=rnd.choice(["A", "A", "PA", "FA"])) / bytes(size * n)
        flows[f] += size * n if rnd.random() < 0.9 else 7
        pkts.append(bytes(p))
    items = o.coalesce(pkts, o.new_counters())
    assert sum(k for _, k in items) == len(pkts)
    got = _frames_to_packets(items)
    for f in range(3):
        mine = [p for p in pkts if p[12:16] == bytes([10, 0, 0, f + 1])]
        theirs = [p for p in got if p[12:16] == bytes([10, 0, 0, f + 1])]
        # payload bytes in the same order (headers of merged segments are re-made)
        assert [p[40:] for p in theirs] == [p[40:] for p in mine]


def test_internet_checksum_matches_rfc1071_reference():
    for n in (0, 1, 2, 3, 1399, 1400, 65535):
        d = random.Random(n).randbytes(n)
        assert o.internet_checksum(d) == checksum(d)
