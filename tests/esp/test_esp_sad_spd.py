"""SAD and SPD (RFC 4301 §4.4), RFC 3948 helpers."""
from __future__ import annotations

import ipaddress as ip

import pytest

from agent.esp import (Action, EspSa, Sad, Spd, SpdEntry, add_non_esp_marker, classify_udp4500,
                       parse_selectors, strip_non_esp_marker)
from agent.iana import EncrId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng, ipv4_packet, ipv6_packet

N = ip.ip_network


def sa(spi: int) -> EspSa:
    return EspSa(EspKeys(spi=spi, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20)), rng=DetRng())


def test_sad_rekey_keeps_old_inbound() -> None:
    sad = Sad()
    in1, out1, in2, out2 = sa(0x101), sa(0x201), sa(0x102), sa(0x202)
    assert sad.install("b", in1, out1) is None
    assert sad.install("b", in2, out2) is out1  # rekey: outbound switched
    assert sad.lookup_outbound("b") is out2
    assert sad.lookup_inbound(0x101) is in1 and sad.lookup_inbound(0x102) is in2
    assert sad.inbound_peer(0x101) == "b"
    assert sad.remove_outbound("b", spi=0x201) is None  # old one already replaced
    assert sad.remove_inbound(0x101) is in1 and sad.lookup_inbound(0x101) is None
    assert len(sad) == 2
    assert [(e.direction, e.peer, e.sa.spi) for e in sad] == [("in", "b", 0x102), ("out", "b", 0x202)]
    st = sad.status()
    assert st[0]["spi"] == "0x00000102" and st[0]["algorithm"] == "ENCR_AES_GCM_16_128"
    assert "0000000000" not in repr(st)  # no key bytes
    with pytest.raises(ValueError, match="0x00000102 already installed"):
        sad.add_inbound("c", sa(0x102))
    assert len(sad.remove_peer("b")) == 2 and len(sad) == 0


def test_sad_demux_inbound() -> None:
    sad = Sad()
    a, b = sa(0xA), sa(0xB)
    sad.add_inbound("a", a)
    sad.add_inbound("b", b)
    ta, tb = sa(0xA), sa(0xB)
    pa = ta.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(3)])
    pb = tb.encapsulate_batch([ipv4_packet(10)])
    unknown = sa(0xC).encapsulate(ipv4_packet(10))
    groups = sad.demux_inbound([pa[0], pb[0], b"\x00\x00", pa[1], unknown, pa[2]])
    assert [(s.spi, pk) for s, pk in groups] == [(0xA, pa), (0xB, pb)]
    assert sad.counters == {"no_sa": 1, "malformed": 1}


def test_spd_first_match_ports_protocol_default() -> None:
    spd = Spd([
        SpdEntry(remote=N("10.0.1.0/24"), protocol=17, remote_ports=(53, 53), action=Action.BYPASS, name="dns"),
        SpdEntry(local=N("10.0.0.0/24"), remote=N("10.0.1.0/24"), peer="b", name="to-b"),
        SpdEntry(remote=N("10.0.2.0/24"), action=Action.DISCARD, name="blocked"),
        SpdEntry(remote=N("fd00:1::/64"), peer="b6", mode="transport", name="v6"),
    ], default=Action.BYPASS)
    assert spd.lookup_outbound(ipv4_packet(20, dport=53)).name == "dns"
    assert spd.lookup_outbound(ipv4_packet(20, dport=54)).name == "to-b"
    assert spd.lookup_outbound(ipv4_packet(20, proto=6, dport=53)).name == "to-b"
    e = spd.lookup_outbound(ipv4_packet(20, dst="10.0.2.9"))
    assert e.action is Action.DISCARD
    assert spd.lookup_outbound(ipv4_packet(20, src="10.9.0.1")) is spd.default_entry
    assert spd.default_entry.action is Action.BYPASS
    v6 = spd.lookup_outbound(ipv6_packet(20))
    assert v6.name == "v6" and v6.peer == "b6" and v6.mode == "transport"
    for bad in (b"", b"\x45" * 10, b"\x70" + bytes(40), ipv4_packet(20)[:19], b"\x4f" + bytes(30)):
        assert spd.lookup_outbound(bad) is spd.malformed_entry
        assert spd.malformed_entry.action is Action.DISCARD
    groups = spd.group_outbound([ipv4_packet(20), ipv6_packet(20), ipv4_packet(30)])
    assert [(g.name, len(p)) for g, p in groups] == [("to-b", 2), ("v6", 1)]


def test_spd_cache_address_only_and_invalidation() -> None:
    spd = Spd([SpdEntry(remote=N("10.0.1.0/24"), peer="b")])
    p = ipv4_packet(20)
    assert spd.lookup_outbound(p).peer == "b"
    assert spd.lookup_outbound(p).peer == "b"  # cached
    spd.add(SpdEntry(remote=N("10.0.1.1/32"), action=Action.DISCARD), index=0)
    assert spd.lookup_outbound(p).action is Action.DISCARD  # cache cleared on change
    spd.remove(spd.entries[0])
    assert spd.lookup_outbound(p).peer == "b"
    assert spd.remove_peer("b") == 1 and spd.lookup_outbound(p) is spd.default_entry


def test_spd_ports_on_fragments_and_v6_ext_headers() -> None:
    spd = Spd([SpdEntry(protocol=17, remote_ports=(53, 53), action=Action.BYPASS)])
    frag = bytearray(ipv4_packet(20, dport=53))
    frag[7] = 1  # fragment offset 8: no ports in it
    assert spd.lookup_outbound(bytes(frag)) is spd.default_entry
    v6 = ipv6_packet(20, dport=53, proto=60)  # destination options header first
    ext = bytes([17, 0]) + bytes(6)
    v6 = v6[:40] + ext + v6[40:]
    assert parse_selectors(v6)[3:] == (17, 1234, 53)
    assert spd.lookup_outbound(v6).action is Action.BYPASS


@pytest.mark.parametrize("kw,match", [
    (dict(), "PROTECT needs a peer"),
    (dict(peer="b", mode="beet"), "mode"),
    (dict(peer="b", local=N("10.0.0.0/8"), remote=N("fd00::/8")), "IP version"),
    (dict(peer="b", remote_ports=(1, 2)), "needs protocol"),
    (dict(peer="b", protocol=6, remote_ports=(5, 1)), "port range"),
    (dict(peer="b", protocol=300), "protocol 300"),
    (dict(peer="b", local="10.0.0.0/8"), "not an IP network"),
    (dict(action="allow"), "not an Action"),
])
def test_spd_entry_validation(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        SpdEntry(**kw)
    with pytest.raises(ValueError, match="default action"):
        Spd(default=Action.PROTECT)


def test_allows_inbound_traffic_selectors() -> None:
    spd = Spd()
    ts_local = (N("10.0.0.0/24"), N("fd00::/64"))
    ts_remote = (N("10.0.1.0/24"), N("fd00:1::/64"))
    # inbound: source = remote side, destination = local side
    assert spd.allows_inbound(ts_local, ts_remote, ipv4_packet(20, src="10.0.1.5", dst="10.0.0.7"))
    assert spd.allows_inbound(ts_local, ts_remote, ipv6_packet(20, src="fd00:1::5", dst="fd00::7"))
    assert not spd.allows_inbound(ts_local, ts_remote, ipv4_packet(20, src="10.0.9.5", dst="10.0.0.7"))
    assert not spd.allows_inbound(ts_local, ts_remote, ipv4_packet(20, src="10.0.1.5", dst="10.0.3.7"))
    assert not spd.allows_inbound(ts_local, ts_remote, ipv4_packet(20, src="10.0.0.7", dst="10.0.1.5"))
    assert not spd.allows_inbound(ts_local, ts_remote, b"\x45\x00")
    assert not spd.allows_inbound((), ts_remote, ipv4_packet(20, src="10.0.1.5", dst="10.0.0.7"))


def test_udp4500_classification() -> None:
    ike = bytes(8) + bytes(20) + b"\x21\x20\x22\x08" + bytes(4)
    assert classify_udp4500(add_non_esp_marker(ike)) == "ike"
    assert strip_non_esp_marker(add_non_esp_marker(ike)) == ike
    assert classify_udp4500(b"\xff") == "keepalive"
    assert classify_udp4500(b"\x00") == "invalid"
    assert classify_udp4500(b"") == "invalid"
    assert classify_udp4500(bytes(4) + b"short") == "invalid"
    assert classify_udp4500(b"\x00\x00\x00\x05" + bytes(20)) == "invalid"  # reserved SPI 1..255
    assert classify_udp4500(b"\xc0\xff\xee\x01" + bytes(28)) == "esp"
    assert classify_udp4500(b"\xc0\xff\xee\x01" + bytes(4)) == "invalid"
    with pytest.raises(ValueError, match="no non-ESP marker"):
        strip_non_esp_marker(b"\xc0\xff\xee\x01" + bytes(28))
    with pytest.raises(ValueError):
        strip_non_esp_marker(b"\x00\x00")
