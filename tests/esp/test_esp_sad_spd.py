"""SAD and SPD (RFC 4301 §4.4), RFC 3948 helpers."""
from __future__ import annotations

import ipaddress as ip

import pytest

from agent.esp import (Action, ChildEntry, EspSa, Sad, Spd, SpdEntry, add_non_esp_marker, classify_udp4500,
                       parse_selectors, strip_non_esp_marker)
from agent.iana import EncrId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng, ipv4_packet, ipv6_packet

N = ip.ip_network


def sa(spi: int) -> EspSa:
    return EspSa(EspKeys(spi=spi, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20)), rng=DetRng())


def child(spi_in: int, spi_out: int, peer: str = "b", established: float = 0.0, protocol: str = "esp",
          **kw) -> ChildEntry:
    return ChildEntry(peer=peer, ike_spi_i=1, ike_spi_r=2, inbound_spi=spi_in, outbound_spi=spi_out,
                      in_sa=sa(spi_in), out_sa=sa(spi_out), local_ts=(N("10.1.0.0/16"),),
                      remote_ts=(N("10.2.0.0/16"),), remote=("198.51.100.2", 4500), mode="tunnel",
                      udp_encap=True, algorithms="ENCR_AES_GCM_16_128", established=established,
                      established_wall=0.0, protocol=protocol, **kw)


def test_sad_rekey_keeps_old_inbound() -> None:
    sad = Sad()
    old, new = child(0x101, 0x201, established=1.0), child(0x102, 0x202, established=2.0)
    assert sad.add(old) is None and sad.current["b"] is old
    assert sad.add(new) is None and sad.current["b"] is new  # rekey: the newest sends
    assert sad.lookup(0x101) is old and sad.lookup(0x102) is new  # both receive
    assert sad.of_peer("b") == [old, new] and sad.of_ike_sa(1, 2) == [old, new] and len(sad) == 2
    assert sad.add(child(0x102, 0x999, peer="c")) is new  # SPI clash: the live one stays
    assert sad.lookup(0x102).peer == "b" and "c" not in sad.current
    assert sad.remove(new) and sad.current["b"] is old  # back to the older one
    assert not sad.remove(new)
    assert sad.remove(old) and sad.current == {} and sad.children == {}
    st = old.status(10.0)
    assert st["spi_in"] == "00000101" and st["age_s"] == 9.0
    assert "key" not in repr(st)  # no key material


def test_sad_ah_outside_esp_for_ah_plus_esp() -> None:
    sad = Sad()
    esp = child(0x101, 0x201, established=1.0, needs_ah=True)
    sad.add(esp)
    assert sad.current["b"] is esp and esp.ah is None  # the AH SA is not up yet
    ah = child(0x102, 0x202, established=2.0, protocol="ah")
    sad.add(ah)
    assert sad.current["b"] is esp and esp.ah is ah
    assert sad.lookup(0x102, "ah") is ah and sad.lookup(0x102, "esp") is None


def test_sad_demux_esp() -> None:
    sad = Sad()
    a, b = child(0xA, 0x1A, peer="a"), child(0xB, 0x1B, peer="b")
    sad.add(a)
    sad.add(b)
    sad.add(child(0xD, 0x1D, peer="d", protocol="ah"))
    ta, tb = sa(0xA), sa(0xB)
    pa = ta.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(3)])
    pb = tb.encapsulate_batch([ipv4_packet(10)])
    unknown = sa(0xC).encapsulate(ipv4_packet(10))
    ah_spi = sa(0xD).encapsulate(ipv4_packet(10))  # ESP with an AH SA's SPI
    groups = sad.demux_esp([pa[0], pb[0], b"\x00\x00", pa[1], unknown, pa[2], ah_spi])
    assert [(c.inbound_spi, pk) for c, pk in groups] == [(0xA, pa), (0xB, pb)]
    assert sad.counters == {"no_sa": 2, "malformed": 1}


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


def test_removed_child_sa_drops_stay_counted_per_peer() -> None:
    """The soak rekeys every CHILD_SA every 10 s: a replay counted on an SA removed before the
    next status read must not vanish (it is the evidence of (SPI, sequence) reuse)."""
    sad = Sad()
    old, new = child(0x101, 0x201, established=1.0), child(0x102, 0x202, established=2.0)
    sad.add(old)
    sad.add(new)
    old.in_sa.counters["replay"] += 3
    old.drops["policy"] = 1
    new.in_sa.counters["icv"] += 1
    assert sad.retired_drops == {}
    sad.remove(old)
    assert sad.retired_drops == {"b": {"replay": 3, "policy": 1}}
    sad.remove(new)
    assert sad.retired_drops == {"b": {"replay": 3, "policy": 1, "icv": 1}}
    assert not sad.remove(new) and sad.retired_drops["b"]["icv"] == 1  # counted once


def test_allows_inbound_cache_answers_per_selector_set_never_for_another() -> None:
    """The compiled-selector cache (by identity for tuples, by value for lists) never answers
    for other selectors: fresh tuples, a list changed in place, many sets past the cache size."""
    spd = Spd()
    pkt = ipv4_packet(20, src="10.0.1.5", dst="10.0.0.7")
    for i in range(1100):  # more than the cache holds: cleared and refilled
        third = i % 256
        ts_local, ts_remote = (N("10.0.0.0/24"),), (N(f"10.0.{third}.0/24"),)
        assert spd.allows_inbound(ts_local, ts_remote, pkt) is (third == 1)
    lst = [N("10.0.1.0/24")]
    assert spd.allows_inbound((N("10.0.0.0/24"),), lst, pkt)
    lst[0] = N("10.0.2.0/24")  # a list is looked up by value: the change is seen
    assert not spd.allows_inbound((N("10.0.0.0/24"),), lst, pkt)


def test_spd_entry_hash_is_by_value_like_equality() -> None:
    """SpdEntry hashes once at construction; equal entries (status rows look hits up by an
    equal entry) still hash equal, different ones differ in equality."""
    a = SpdEntry(local=N("10.1.0.0/24"), remote=N("10.2.0.0/24"), peer="b", name="x")
    b = SpdEntry(local=N("10.1.0.0/24"), remote=N("10.2.0.0/24"), peer="b", name="x")
    c = SpdEntry(local=N("10.1.0.0/24"), remote=N("10.3.0.0/24"), peer="b", name="x")
    assert a == b and hash(a) == hash(b) and {a: 5}[b] == 5
    assert a != c and c not in {a: 5}
    icmp = SpdEntry(remote=N("10.2.0.0/24"), protocol=1, icmp_type=8, peer="b")
    twin = SpdEntry(remote=N("10.2.0.0/24"), protocol=1, icmp_type=8, peer="b")
    assert icmp.local_ports == (8, 8) and icmp == twin and hash(icmp) == hash(twin)  # after __post_init__
