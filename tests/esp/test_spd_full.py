"""SPD (RFC 4301 §4.4.1): ordering, lists, ICMP type/code selectors, ports,
IPv6, BYPASS before PROTECT, inbound checks, hits; compile_spd from views;
replay-window policy; SAD lookup by (SPI, destination, protocol)."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6

from agent.esp import (Action, AhSa, EspSa, SaBundle, SaTemplate, Sad, Spd, SpdEntry, check_replay_window,
                       compile_spd, parse_selectors)
from agent.model import EspKeys, NodeView, Peer, PeerPolicy
from tests.esp.esp_helpers import DetRng

N = ipaddress.ip_network


def test_first_match_ordering_and_lists() -> None:
    spd = Spd([
        SpdEntry(remote=(N("10.2.0.0/24"), N("10.3.0.0/24")), action=Action.DISCARD, name="lists"),
        SpdEntry(remote=N("10.0.0.0/8"), peer="gw", name="wide"),
    ], default=Action.BYPASS)
    pk = lambda d: bytes(IP(src="10.1.0.1", dst=d) / UDP())
    assert spd.lookup_outbound(pk("10.3.0.9")).name == "lists"
    assert spd.lookup_outbound(pk("10.2.0.9")).name == "lists"
    assert spd.lookup_outbound(pk("10.4.0.9")).name == "wide"
    assert spd.lookup_outbound(pk("192.168.0.1")).name == "default"


def test_icmp_type_code_selectors() -> None:
    spd = Spd([
        SpdEntry(protocol=1, icmp_type=3, icmp_code=4, action=Action.BYPASS, name="pmtu"),
        SpdEntry(protocol=58, icmp_type=2, action=Action.BYPASS, name="ptb"),
        SpdEntry(protocol=1, local_ports=(8, 8), action=Action.DISCARD, name="echo"),
        SpdEntry(peer="gw", name="rest"),
    ])
    v4 = lambda t, c: bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=t, code=c))
    assert parse_selectors(v4(3, 4))[3:] == (1, 3, 4)
    assert spd.lookup_outbound(v4(3, 4)).name == "pmtu"
    assert spd.lookup_outbound(v4(3, 1)).name == "rest"
    assert spd.lookup_outbound(v4(8, 0)).name == "echo"
    ptb = bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6PacketTooBig())
    echo6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest())
    assert spd.lookup_outbound(ptb).name == "ptb" and spd.lookup_outbound(echo6).name == "rest"
    # inbound: ICMP type/code are not swapped like ports
    assert spd.lookup_inbound(v4(3, 4)).name == "pmtu"
    with pytest.raises(ValueError, match="icmp_type needs protocol"):
        SpdEntry(protocol=6, icmp_type=3, peer="x")
    with pytest.raises(ValueError, match="type/code range"):
        SpdEntry(protocol=1, local_ports=(0, 300), peer="x")


def test_ports_ipv6_and_bypass_first() -> None:
    spd = Spd(compile_spd(VIEW, bypass=[
        SpdEntry(protocol=17, remote_ports=(500, 500), action=Action.BYPASS, name="ike"),
        SpdEntry(protocol=17, remote_ports=(4500, 4500), action=Action.BYPASS, name="natt"),
        SpdEntry(protocol=6, remote=N("10.2.0.5/32"), remote_ports=(7443, 7444), action=Action.BYPASS, name="ctl"),
    ]))
    assert [e.name for e in spd.entries[:3]] == ["ike", "natt", "ctl"]
    ike = bytes(IP(src="10.1.0.1", dst="10.2.0.9") / UDP(sport=500, dport=500))
    assert spd.lookup_outbound(ike).name == "ike"
    ctl = bytes(IP(src="10.1.0.1", dst="10.2.0.5") / TCP(sport=40000, dport=7444))
    assert spd.lookup_outbound(ctl).name == "ctl"
    other = bytes(IP(src="10.1.0.1", dst="10.2.0.5") / TCP(sport=40000, dport=7445))
    assert spd.lookup_outbound(other).name == "view:b" and spd.lookup_outbound(other).action is Action.PROTECT
    v6 = bytes(IPv6(src="fd00:1::1", dst="fd00:2::7") / UDP(sport=1, dport=2))
    assert spd.lookup_outbound(v6).name == "view:b"
    # cached path gives the same answers
    assert spd.lookup_outbound(ctl).name == "ctl" and spd.lookup_outbound(other).name == "view:b"
    groups = spd.group_outbound([ike, ike, other])
    assert sorted(len(g) for _, g in groups) == [1, 2]
    st_ = {r["name"]: r["hits"] for r in spd.status()}
    assert st_["ike"] == 2 and st_["view:b"] >= 1


def test_inbound_clear_and_entry_allows() -> None:
    e = SpdEntry(local=N("10.1.0.0/16"), remote=N("10.2.0.0/16"), protocol=6, remote_ports=(80, 80), peer="b")
    spd = Spd([e], default=Action.BYPASS)
    # a clear-text packet that should have been protected must be dropped (RFC 4301 §5.2)
    inbound = bytes(IP(src="10.2.0.1", dst="10.1.0.1") / TCP(sport=80, dport=5555))
    assert spd.lookup_inbound(inbound) is e
    assert spd.entry_allows(e, inbound)
    assert not spd.entry_allows(e, bytes(IP(src="10.2.0.1", dst="10.1.0.1") / TCP(sport=81, dport=5555)))
    assert not spd.entry_allows(e, bytes(IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=80, dport=5555)))
    assert not spd.entry_allows(e, bytes(IP(src="10.3.0.1", dst="10.1.0.1") / TCP(sport=80)))
    assert not spd.entry_allows(e, b"junk")
    assert spd.entry_allows(e, bytes(IP(src="10.1.0.1", dst="10.2.0.1") / TCP(sport=5, dport=80)), inbound=False)


VIEW = NodeView(
    name="a", identity="a", subnets=(N("10.1.0.0/16"), N("fd00:1::/48")), local_address="198.51.100.1",
    peers=(
        Peer("b", "b", ("198.51.100.2",), (N("10.2.0.0/16"), N("fd00:2::/48"))),
        Peer("h", "h", ("198.51.100.3",), (), PeerPolicy(mode="transport", protocol="ah+esp")),
        Peer("x", "x", ("198.51.100.4",), (N("10.2.7.0/24"),), PeerPolicy(action="discard")),
        Peer("c", "c", ("198.51.100.5",), (N("10.5.0.0/16"),), PeerPolicy(protocol="ah", encapsulation="none")),
    ))


def test_compile_spd_from_view() -> None:
    es = compile_spd(VIEW)
    # most specific first within a family (entries of different families never compete)
    names = [(e.name, str(e.remote)) for e in es if e.remote.version == 4]
    assert names[0][0] == "view:h" and names[0][1] == "198.51.100.3/32"
    assert ("view:x", "10.2.7.0/24") in names
    assert names.index(("view:x", "10.2.7.0/24")) < names.index(("view:b", "10.2.0.0/16"))
    h = [e for e in es if e.name == "view:h"]
    assert {str(e.local) for e in h} == {"198.51.100.1/32", "10.1.0.0/16"}
    assert h[0].templates == (SaTemplate("esp", "transport", "h", "none"), SaTemplate("ah", "transport", "h", "none"))
    b6 = [e for e in es if e.name == "view:b" and e.remote.version == 6]
    assert b6 and str(b6[0].local) == "fd00:1::/48" and b6[0].templates == (SaTemplate("esp", "tunnel", "b", "udp"),)
    x = [e for e in es if e.name == "view:x"][0]
    assert x.action is Action.DISCARD and x.templates == ()
    c = [e for e in es if e.name == "view:c"][0]
    assert c.templates == (SaTemplate("ah", "tunnel", "c", "none"),)
    spd = Spd(es)
    assert spd.lookup_outbound(bytes(IP(src="10.1.0.1", dst="10.2.7.7") / UDP())).action is Action.DISCARD
    assert spd.lookup_outbound(bytes(IP(src="10.1.0.1", dst="10.2.8.7") / UDP())).peer == "b"


def test_compile_spd_errors_name_the_field() -> None:
    bad = NodeView("a", "a", (), (Peer("b", "b", ("198.51.100.2",), (N("10.2.0.0/16"),), PeerPolicy(replay_window=0)),))
    with pytest.raises(ValueError, match=r"peers\[b\]\.policy\.replay_window: 0 turns anti-replay off.*allow_no_replay"):
        compile_spd(bad)
    ok = NodeView("a", "a", (), (Peer("b", "b", ("198.51.100.2",), (N("10.2.0.0/16"),),
                                      PeerPolicy(replay_window=0, allow_no_replay=True)),))
    assert compile_spd(ok)[0].peer == "b"
    with pytest.raises(ValueError, match="multiple of 32"):
        compile_spd(NodeView("a", "a", (), (Peer("b", "b", ("198.51.100.2",), (N("10.2.0.0/16"),),
                                                 PeerPolicy(replay_window=100)),)))
    with pytest.raises(ValueError, match="not a window size"):
        check_replay_window(-1)
    assert check_replay_window(1024) == 1024
    with pytest.raises(ValueError, match="AH cannot be UDP"):
        SpdEntry(peer="b", bundle=(SaTemplate("ah", "tunnel", "b", "udp"),))
    with pytest.raises(ValueError, match="only goes with PROTECT"):
        SpdEntry(action=Action.BYPASS, bundle=(SaTemplate("esp", "tunnel", "b"),))
    with pytest.raises(ValueError, match="empty list"):
        SpdEntry(peer="b", remote=())


def test_sad_lookup_by_spi_destination_protocol() -> None:
    sad = Sad()
    esp = EspSa(EspKeys(spi=0x100, encr_id=20, encr_key=bytes(20)), rng=DetRng())
    ah = AhSa(EspKeys(spi=0x200, encr_id=0, encr_key=b"", integ_id=12, integ_key=bytes(32)))
    sad.add_inbound("b", esp, dst="198.51.100.1")
    sad.add_inbound("c", ah)
    assert sad.lookup_inbound(0x100) is esp
    assert sad.lookup_inbound(0x100, "198.51.100.1", "esp") is esp
    assert sad.lookup_inbound(0x100, "198.51.100.9") is None
    assert sad.lookup_inbound(0x100, protocol="ah") is None
    assert sad.lookup_inbound(0x200, "203.0.113.1", "ah") is ah  # not bound to a destination
    assert {r["algorithm"] for r in sad.status()} == {"ENCR_AES_GCM_16_128", "AH-AUTH_HMAC_SHA2_256_128"}
    sad.remove_inbound(0x100)
    assert sad.lookup_inbound(0x100) is None


AH_KEYS = EspKeys(spi=0x200, encr_id=0, encr_key=b"", integ_id=12, integ_key=bytes(32))
ESP_KEYS = EspKeys(spi=0x100, encr_id=20, encr_key=bytes(20))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decapsulation_on_random_bytes_only_counts(data) -> None:
    ah = AhSa(AH_KEYS)
    tun = AhSa(AH_KEYS, mode="tunnel", tunnel_src="198.51.100.1", tunnel_dst="198.51.100.2")
    b = SaBundle([EspSa(ESP_KEYS, rng=DetRng(), mode="transport"), AhSa(AH_KEYS)])
    inputs = [data, b"\x45" + data, b"\x60" + data,
              bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=51)) + data,
              bytes(IPv6(src="fd00::1", dst="fd00::2", nh=51)) + data]
    for sa in (ah, tun):
        sa.decapsulate_batch(inputs)
        assert sa.counters["packets_in"] + sum(sa.counters[k] for k in
                                               ("malformed", "spi", "replay", "icv", "next_header")) == len(inputs)
    b.decapsulate_batch(inputs)
    c = b.counters
    assert c["packets_in"] + c["policy"] + c["layer_drop"] + c["malformed"] == len(inputs)
    Spd([SpdEntry(peer="b")]).lookup_outbound(data)


def test_empty_spd_lookups_are_total() -> None:
    """Issue 13: Spd() with no entries answered lookups with AttributeError."""
    import struct as _struct

    from agent.esp.spd import Action as _Action, Spd as _Spd
    pkt = bytes([0x45, 0, 0, 28]) + bytes(4) + bytes([64, 17, 0, 0]) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) \
        + _struct.pack("!HHHH", 1000, 2000, 8, 0)
    for default in (_Action.DISCARD, _Action.BYPASS):
        spd = _Spd(default=default)
        assert spd.lookup_outbound(pkt) is spd.default_entry
        assert spd.lookup_inbound(pkt) is spd.default_entry
        assert spd.lookup_outbound(b"\x45") is spd.malformed_entry
        assert spd.group_outbound([pkt]) == [(spd.default_entry, [pkt])]
        assert spd.status() == []
