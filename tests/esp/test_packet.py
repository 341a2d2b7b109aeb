"""Packet helpers (agent.esp.packet / icmp): checked against scapy's own
checksums and dissectors; ESP transport mode over IPv6 with extension
headers against scapy's SecurityAssociation."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from agent.esp import EspError, EspSa
from agent.esp.icmp import frag_needed, packet_too_big, too_big
from agent.esp.packet import (checksum, clamp_mss, fix_l4_checksum, l4_checksum_ok, parse_ip,
                              restore_transport, transport_split)
from agent.iana import EncrId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng


def ref_checksum(d: bytes) -> int:
    if len(d) % 2:
        d += b"\0"
    s = sum(int.from_bytes(d[i:i + 2], "big") for i in range(0, len(d), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071_loop(data) -> None:
    assert checksum(data) == ref_checksum(data)


def test_checksum_edges() -> None:
    # RFC 1071 §3 example words 0001 f203 f4f5 f6f7 sum to ddf2 -> checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    for d in (b"", b"\0\0", b"\xff\xff", b"\xff\xff\xff\xff", b"\x01"):
        assert checksum(d) == ref_checksum(d)


def _scapy_l4(p):
    return p.__class__(bytes(p))


@pytest.mark.parametrize("mk", [
    lambda: IP(src="10.0.0.1", dst="10.9.0.2") / TCP(sport=1, dport=2, flags="PA") / Raw(b"a" * 101),
    lambda: IP(src="10.0.0.1", dst="10.9.0.2") / UDP(sport=1, dport=2) / Raw(b"b" * 33),
    lambda: IPv6(src="fd00::1", dst="fd00::9") / TCP(sport=1, dport=2) / Raw(b"c" * 64),
    lambda: IPv6(src="fd00::1", dst="fd00::9") / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2) / Raw(b"d" * 7),
])
def test_fix_l4_checksum_matches_scapy(mk) -> None:
    good = bytes(mk())
    assert l4_checksum_ok(good)
    # a NAT rewrote the source address: checksum now wrong, fix_l4_checksum repairs it
    p = mk()
    p.src = "10.0.0.77" if p.version == 4 else "fd00::77"
    rebuilt = bytes(p)  # scapy computes the right checksum for the new address
    stale = bytearray(rebuilt)
    h = parse_ip(rebuilt)
    off = h.header_len + (16 if h.protocol == 6 else 6)
    stale[off:off + 2] = good[off:off + 2]
    assert not l4_checksum_ok(bytes(stale))
    assert fix_l4_checksum(bytes(stale)) == rebuilt


def test_fix_l4_checksum_leaves_others() -> None:
    icmp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())
    assert fix_l4_checksum(icmp) == icmp
    zero = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"x")))
    zero[26:28] = b"\0\0"  # IPv4 UDP without checksum (RFC 768) stays so
    assert fix_l4_checksum(bytes(zero)) == bytes(zero)
    with pytest.raises(EspError):
        fix_l4_checksum(bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=6) / Raw(b"abc")))


def test_restore_transport() -> None:
    orig = IP(src="10.0.0.1", dst="10.0.0.2", ttl=7, options=[]) / UDP(sport=9, dport=10) / Raw(b"p" * 20)
    payload = bytes(orig[UDP])
    outer = bytes(IP(src="10.0.0.1", dst="10.0.0.2", ttl=7, proto=50) / Raw(b"E" * 60))
    got = restore_transport(outer, 17, payload)
    assert got == bytes(orig)  # scapy computes total length and checksum the same
    got2 = restore_transport(("10.0.0.1", "10.0.0.2"), 17, payload)
    assert IP(got2)[UDP].load == b"p" * 20 and IP(got2).len == len(got2)
    o6 = IPv6(src="fd00::1", dst="fd00::2", hlim=3) / IPv6ExtHdrHopByHop(nh=50) / Raw(b"E" * 50)
    got6 = restore_transport(bytes(o6), 6, b"T" * 20)
    x = IPv6(got6)
    assert x.plen == 8 + 20 and x[IPv6ExtHdrHopByHop].nh == 6 and got6.endswith(b"T" * 20)
    with pytest.raises(EspError):
        restore_transport(b"\x45\x00", 17, b"")


def test_transport_split_ipv6_extension_headers() -> None:
    base = IPv6(src="fd00::1", dst="fd00::2")
    cases = [
        (base / UDP(), 40, 6, 17),
        (base / IPv6ExtHdrHopByHop() / UDP(), 48, 40, 17),
        (base / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrFragment() / UDP(), 64, 56, 17),
        # destination options after routing go inside ESP/AH; before routing, outside
        (base / IPv6ExtHdrDestOpt() / UDP(), 40, 6, 60),
        (base / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / UDP(), 56, 48, 17),
    ]
    for p, ins, nh_off, nh in cases:
        assert transport_split(bytes(p)) == (ins, nh_off, nh), p.summary()


GCM = bytes(range(20))


@pytest.mark.parametrize("ext", [False, True])
def test_esp_transport_ipv6_vs_scapy(ext) -> None:
    """ESP transport mode over IPv6 (with a Hop-by-Hop header) both ways with scapy."""
    p = IPv6(src="fd00::1", dst="fd00::2")
    if ext:
        p = p / IPv6ExtHdrHopByHop()
    p = p / TCP(sport=5, dport=6) / Raw(b"v6" * 30)
    raw = bytes(p)
    theirs = SecurityAssociation(ESP, spi=0x4242, crypt_algo="AES-GCM", crypt_key=GCM)
    keys = EspKeys(spi=0x4242, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=GCM)
    tx, rx = EspSa(keys, rng=DetRng(), mode="transport"), EspSa(keys, rng=DetRng(), mode="transport")
    ins, nh_off, _ = transport_split(raw)
    esp = tx.encapsulate_batch([raw])[0]
    from agent.esp.packet import set_payload
    wire = set_payload(raw[:ins], nh_off, 50, esp)
    assert bytes(theirs.decrypt(IPv6(wire))) == raw
    s = bytes(theirs.encrypt(p))
    ins2, nh_off2, proto = transport_split(s)
    h = parse_ip(s, stop_at=frozenset((50,)))
    assert h.protocol == 50
    nh, payload = rx.decapsulate_batch_nh([s[h.header_len:]])[0]
    assert restore_transport(s, nh, payload) == raw


def syn(mss=1460, flags="S", v=4):
    ip = IP(src="10.0.0.1", dst="10.0.0.2") if v == 4 else IPv6(src="fd00::1", dst="fd00::2")
    return bytes(ip / TCP(sport=1234, dport=80, flags=flags,
                          options=[("NOP", None), ("MSS", mss), ("SAckOK", b""), ("WScale", 7)]))


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("flags", ["S", "SA"])
def test_clamp_mss(v, flags) -> None:
    out = clamp_mss(syn(1460, flags, v), 1360)
    x = (IP if v == 4 else IPv6)(out)
    assert dict(x[TCP].options)["MSS"] == 1360
    c = x[TCP].chksum
    del x[TCP].chksum
    assert (IP if v == 4 else IPv6)(bytes(x))[TCP].chksum == c  # scapy agrees with the recomputed checksum


def test_clamp_mss_no_change() -> None:
    small = syn(1200)
    assert clamp_mss(small, 1360) is small
    ack = syn(1460, "A")
    assert clamp_mss(ack, 1360) is ack
    nopt = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="S"))
    assert clamp_mss(nopt, 1360) is nopt
    for junk in (b"", b"\x45", syn()[:30], bytes(IP() / UDP())):
        assert clamp_mss(junk, 1360) is junk


def test_frag_needed_vs_scapy() -> None:
    orig = bytes(IP(src="10.0.0.1", dst="10.9.0.2", flags="DF") / UDP(sport=7, dport=8) / Raw(b"z" * 1472))
    msg = frag_needed(orig, 1400, src="10.0.0.254")
    x = IP(msg)
    assert (x.src, x.dst, x[ICMP].type, x[ICMP].code, x[ICMP].nexthopmtu) == ("10.0.0.254", "10.0.0.1", 3, 4, 1400)
    assert len(msg) == 576  # RFC 1812 §4.3.2.3
    assert bytes(x[ICMP].payload)[:28] == orig[:28]
    c = x[ICMP].chksum
    del x[ICMP].chksum
    del x.chksum
    assert IP(bytes(x))[ICMP].chksum == c and IP(bytes(x)).chksum == IP(msg).chksum
    assert frag_needed(bytes(IP(dst="10.0.0.2") / UDP()), 1400) is None  # DF clear
    err = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="DF") / ICMP(type=3, code=1) / Raw(b"x" * 30))
    assert frag_needed(err, 1400) is None  # never an error about an error


def test_packet_too_big_vs_scapy() -> None:
    orig = bytes(IPv6(src="fd00::1", dst="fd00:9::2") / UDP() / Raw(b"y" * 1452))
    msg = packet_too_big(orig, 1300)
    x = IPv6(msg)
    assert x.dst == "fd00::1" and x.src == "fd00:9::2" and x[ICMPv6PacketTooBig].mtu == 1300
    assert len(msg) == 1280  # RFC 4443 §2.4 (c)
    c = x[ICMPv6PacketTooBig].cksum
    del x[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(x))[ICMPv6PacketTooBig].cksum == c
    assert too_big(orig, 1300) == msg and too_big(b"junk", 1300) is None
    with pytest.raises(ValueError):
        packet_too_big(orig, 1000)
    multicast_src = bytes(IPv6(src="ff02::1", dst="fd00::2") / UDP() / Raw(b"m" * 1400))
    assert packet_too_big(multicast_src, 1300) is None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_parsers_on_random_bytes_raise_only_esp_error(data) -> None:
    for fn in (parse_ip, transport_split, fix_l4_checksum):
        try:
            fn(data)
        except EspError:
            pass
    assert clamp_mss(data, 1000) is not None
    too_big(data, 1400)
    for v in (0x45, 0x60):
        b = bytes([v]) + data
        for fn in (parse_ip, transport_split, fix_l4_checksum):
            try:
                fn(b)
            except EspError:
                pass
        clamp_mss(b, 1000)
        too_big(b, 1400)
