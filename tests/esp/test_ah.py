"""AH (RFC 4302): ICV truncation vectors, scapy interop both ways, mutable vs
immutable fields, replay, alignment, malformed input.

Outside implementation: scapy's ``SecurityAssociation(AH, ...)``
(scapy/layers/ipsec.py), which zeroes the mutable fields itself.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, RouterAlert, HBHOptUnknown
from scapy.layers.ipsec import AH, SecurityAssociation
from scapy.packet import Raw

from agent.esp import AhSa, EspError
from agent.esp.ah import zero_mutable
from agent.iana import IntegId
from agent.model import EspKeys

ALGS = {  # integ id -> (scapy name, key length, ICV length)
    IntegId.AUTH_HMAC_SHA2_256_128: ("SHA2-256-128", 32, 16),
    IntegId.AUTH_HMAC_SHA2_384_192: ("SHA2-384-192", 48, 24),
    IntegId.AUTH_HMAC_SHA2_512_256: ("SHA2-512-256", 64, 32),
}
SPI = 0x0A0B0C0D


def keys(integ=IntegId.AUTH_HMAC_SHA2_256_128, esn=False, spi=SPI) -> EspKeys:
    kl = ALGS[integ][1]
    return EspKeys(spi=spi, encr_id=0, encr_key=b"", integ_id=integ, integ_key=bytes(range(1, kl + 1)), esn=esn)


def v4(payload=b"hello AH" * 8, **kw):
    return IP(src="10.1.0.1", dst="10.2.0.1", tos=0x28, ttl=41, flags="DF", **kw) / UDP(sport=4000, dport=53) / Raw(payload)


def v6(payload=b"hello AH6" * 8, ext=True):
    p = IPv6(src="fd00:1::1", dst="fd00:2::1", tc=0x28, fl=0x12345, hlim=9)
    if ext:
        # one option with the "may change" bit (type 0x3e), one without (Router Alert 0x05)
        p = p / IPv6ExtHdrHopByHop(options=[RouterAlert(), HBHOptUnknown(otype=0x3E, optdata=b"\x01\x02")])
    return p / UDP(sport=4000, dport=53) / Raw(payload)


TUN4 = IP(src="198.51.100.1", dst="198.51.100.2")
TUN6 = IPv6(src="2001:db8::1", dst="2001:db8::2")

# RFC 4868 §2.7.2.1-2.7.2.3, test case 1 ("Hi There", key 0x0b repeated), AUTH truncation
RFC4868_AUTH = {
    IntegId.AUTH_HMAC_SHA2_256_128: "198a607eb44bfbc69903a0f1cf2bbdc5",
    IntegId.AUTH_HMAC_SHA2_384_192: "b6a8d5636f5c6a7224f9977dcf7ee6c7fb6d0c48cbdee973",
    IntegId.AUTH_HMAC_SHA2_512_256: "637edc6e01dce7e6742a99451aae82df23da3e92439e590e43e761b33e910fb8",
}


@pytest.mark.parametrize("integ", list(RFC4868_AUTH))
def test_icv_truncation_rfc4868(integ) -> None:
    kl, icv_len = ALGS[integ][1], ALGS[integ][2]
    sa = AhSa(EspKeys(spi=SPI, encr_id=0, encr_key=b"", integ_id=integ, integ_key=b"\x0b" * kl))
    h = sa._hmac.copy()
    h.update(b"Hi There")
    assert sa.icv_len == icv_len
    assert h.finalize()[:sa.icv_len].hex() == RFC4868_AUTH[integ]


def _pair(integ, mode, version, esn=False):
    tun = TUN4 if version == 4 else TUN6
    kw = dict(tunnel_src=tun.src, tunnel_dst=tun.dst) if mode == "tunnel" else {}
    ours_tx = AhSa(keys(integ, esn), mode=mode, **kw)
    ours_rx = AhSa(keys(integ, esn), mode=mode, **kw)
    theirs = SecurityAssociation(AH, spi=SPI, auth_algo=ALGS[integ][0], auth_key=keys(integ).integ_key,
                                 tunnel_header=tun if mode == "tunnel" else None, esn_en=esn)
    return ours_tx, ours_rx, theirs


@pytest.mark.parametrize("integ", list(ALGS))
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("version", [4, 6])
def test_scapy_interop(integ, mode, version) -> None:
    tx, rx, theirs = _pair(integ, mode, version)
    for inner_v in (4, 6) if mode == "tunnel" else (version,):
        pkt = v4() if inner_v == 4 else v6()
        raw_pkt = bytes(pkt)
        # scapy -> us
        s = bytes(theirs.encrypt(pkt))
        assert rx.decapsulate_batch([s]) == [raw_pkt], rx.counters
        # us -> scapy
        o = tx.encapsulate_batch([raw_pkt])
        assert len(o) == 1
        outer = (IP if version == 4 else IPv6)(o[0])
        assert outer[AH].spi == SPI and outer[AH].seq == tx.seq_out
        assert bytes(theirs.decrypt(outer)) == raw_pkt
    assert rx.counters["icv"] == 0 and tx.counters["packets_out"] == rx.counters["packets_in"]


def test_scapy_interop_esn() -> None:
    """ESN: the high 32 bits are appended for the ICV only (RFC 4302 §2.5.1, §3.3.3.1)."""
    tx, rx, theirs = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "transport", 4, esn=True)
    tx.seq_out = (5 << 32) + 9
    o = tx.encapsulate_batch([bytes(v4())])[0]
    assert IP(o)[AH].seq == 10
    assert bytes(theirs.decrypt(IP(o), esn_en=True, esn=5)) == bytes(v4())
    with pytest.raises(Exception):
        theirs.decrypt(IP(o), esn_en=True, esn=4)
    rx.replay.top = (5 << 32) + 3
    assert rx.decapsulate_batch([o]) == [bytes(v4())]
    assert rx.replay.top == (5 << 32) + 10


@pytest.mark.parametrize("version,expected", [(4, {16: 28, 24: 36, 32: 44}), (6, {16: 32, 24: 40, 32: 48})])
def test_header_alignment(version, expected) -> None:
    """IPv4: multiple of 4 octets, IPv6: multiple of 8 (RFC 4302 §3.3.3.2.1)."""
    for integ, (_, _, icv) in ALGS.items():
        sa = AhSa(keys(integ))
        pkt = bytes(v4() if version == 4 else v6(ext=False))
        o = sa.encapsulate(pkt)
        assert len(o) - len(pkt) == expected[icv] == sa.ah_len[version]
        off = 20 if version == 4 else 40
        assert (o[off + 1] + 2) * 4 == expected[icv]


def _mutate(pkt: bytes, off: int, value: int) -> bytes:
    b = bytearray(pkt)
    b[off] = value
    return bytes(b)


def test_mutable_fields_ipv4_do_not_matter() -> None:
    tx, rx, _ = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "transport", 4)
    o = tx.encapsulate(bytes(v4()))
    # TOS, flags, TTL, header checksum: routers change them
    for off, val in ((1, 0xB8), (6, 0x00), (8, 3), (10, 0x12)):
        assert len(rx.decapsulate_batch([_mutate(o, off, val)])) == 1, off
        rx.replay = type(rx.replay)(1024)
    assert rx.counters["icv"] == 0


def test_mutable_fields_ipv6_do_not_matter() -> None:
    tx, rx, _ = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "transport", 6)
    o = tx.encapsulate(bytes(v6()))
    # traffic class, flow label, hop limit, and the data of option 0x3e (bit 0x20 set)
    hbh = 40
    opt_data = o.index(bytes([0x3E, 2, 1, 2]), hbh) + 2
    for off, val in ((0, 0x6F), (1, 0xFF), (3, 0x99), (7, 1), (opt_data, 0xEE)):
        rx.replay = type(rx.replay)(1024)
        assert len(rx.decapsulate_batch([_mutate(o, off, val)])) == 1, off
    assert rx.counters["icv"] == 0


@pytest.mark.parametrize("integ", list(ALGS))
@pytest.mark.parametrize("version,offs", [
    (4, (12, 16, 9, 2, -1)),          # source, destination, protocol, total length, payload
    (6, (8, 24, 6, 4, -1, 44)),       # source, destination, next header, payload length, payload, Router Alert data
])
def test_immutable_change_is_icv_drop(integ, version, offs) -> None:
    tx, rx, _ = _pair(integ, "transport", version)
    o = tx.encapsulate(bytes(v4() if version == 4 else v6()))
    for off in offs:
        bad = _mutate(o, off, o[off] ^ 0x01)
        assert rx.decapsulate_batch([bad]) == []
    # the length/protocol changes may be caught as malformed before the ICV; all are drops
    drops = rx.counters["icv"] + rx.counters["malformed"]
    assert drops == len(offs) and rx.counters["icv"] >= len(offs) - 2
    assert rx.replay.top == 0  # forged packets never move the window
    assert rx.decapsulate_batch([o]) != []


def test_replay_and_window_edges() -> None:
    tx, rx, _ = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "transport", 4)
    pkts = [tx.encapsulate(bytes(v4(b"%d" % i))) for i in range(1, 1100)]
    assert len(rx.decapsulate_batch([pkts[-1]])) == 1            # seq 1099
    assert rx.decapsulate_batch([pkts[-1]]) == []                # duplicate
    assert len(rx.decapsulate_batch([pkts[1099 - 1024]])) == 1   # seq 76: last in the window
    assert rx.decapsulate_batch([pkts[1099 - 1025]]) == []       # seq 75: left of it
    assert rx.counters["replay"] == 2
    # replay is checked before the ICV: a forged old packet counts as replay, not icv
    forged = _mutate(pkts[-1], len(pkts[-1]) - 1, 0)
    rx.decapsulate_batch([forged])
    assert rx.counters["replay"] == 3 and rx.counters["icv"] == 0


def test_refusals_are_counted() -> None:
    tx, rx, _ = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "transport", 4)
    good = tx.encapsulate(bytes(v4()))
    frag = bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="MF") / Raw(b"x" * 40))
    assert tx.encapsulate_batch([b"", b"\x50" * 30, frag]) == []
    assert tx.counters["bad_inner"] == 3
    other = AhSa(keys(spi=0x999)).encapsulate(bytes(v4()))
    no_ah = bytes(v4())
    assert rx.decapsulate_batch([other, no_ah, good[:30], good[:-1], b"", b"\x45"]) == []
    assert rx.counters["spi"] == 1 and rx.counters["malformed"] == 5
    with pytest.raises(EspError) as ei:
        rx.decapsulate(other)
    assert ei.value.reason == "spi"
    tx.seq_out = tx.seq_max
    assert tx.encapsulate_batch([bytes(v4())]) == [] and tx.counters["seq_exhausted"] == 1 and tx.needs_rekey


def test_tunnel_refuses_non_ip_inner() -> None:
    tx, rx, theirs = _pair(IntegId.AUTH_HMAC_SHA2_256_128, "tunnel", 4)
    # scapy-built AH tunnel packet whose next header says UDP (17): not IP-in-IP
    bad = IP(src=TUN4.src, dst=TUN4.dst) / UDP() / Raw(b"z" * 30)
    s = bytes(SecurityAssociation(AH, spi=SPI, auth_algo="SHA2-256-128", auth_key=keys().integ_key).encrypt(bad))
    assert rx.decapsulate_batch([s]) == [] and rx.counters["next_header"] == 1


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="tunnel_src"):
        AhSa(keys(), mode="tunnel")
    with pytest.raises(ValueError, match="encryption key"):
        AhSa(EspKeys(spi=1, encr_id=12, encr_key=b"k" * 16, integ_id=12, integ_key=b"k" * 32))
    with pytest.raises(ValueError, match="integrity"):
        AhSa(EspKeys(spi=1, encr_id=0, encr_key=b""))
    with pytest.raises(ValueError, match="32 bytes"):
        AhSa(EspKeys(spi=1, encr_id=0, encr_key=b"", integ_id=12, integ_key=b"short"))
    with pytest.raises(ValueError, match="mode"):
        AhSa(keys(), mode="beet")
    assert "integ_key" not in repr(AhSa(keys())) and keys().integ_key.hex() not in repr(AhSa(keys()))


def test_zero_mutable_ipv4_options() -> None:
    """Appendix A.1: Router Alert (148) kept, Record Route (7) zeroed, as scapy does."""
    hdr = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=[])) [:20]
    opts = bytes([148, 4, 0, 0, 7, 7, 4, 10, 0, 0, 1, 0])  # RA, RR(len 7), EOL
    h = bytearray(hdr)
    h[0] = 0x48  # IHL 8 words
    h = bytes(h) + opts
    z = zero_mutable(h)
    assert z[20:24] == bytes([148, 4, 0, 0]) and z[24:31] == bytes(7) and z[8] == 0 and z[1] == 0
    with pytest.raises(EspError):
        zero_mutable(bytes([0x46]) + hdr[1:] + bytes([7, 40, 0, 0]))
