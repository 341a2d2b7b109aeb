"""SPD (RFC 4301 §4.4.1): ordering, lists, ICMP type/code selectors, ports,
IPv6, BYPASS before PROTECT, inbound checks, hits; replay-window policy.
(The SPD built from a view is the datapath's: tests/datapath/test_policy.py.)"""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6

from agent.esp import Action, AhSa, Spd, SpdEntry, check_replay_window, parse_selectors
from agent.model import EspKeys

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
    spd = Spd([
        SpdEntry(protocol=17, remote_ports=(500, 500), action=Action.BYPASS, name="ike"),
        SpdEntry(protocol=17, remote_ports=(4500, 4500), action=Action.BYPASS, name="natt"),
        SpdEntry(protocol=6, remote=N("10.2.0.5/32"), remote_ports=(7443, 7444), action=Action.BYPASS, name="ctl"),
        SpdEntry(local=N("10.1.0.0/16"), remote=N("10.2.0.0/16"), peer="b", name="view:b"),
        SpdEntry(local=N("fd00:1::/48"), remote=N("fd00:2::/48"), peer="b", name="view:b6"),
    ])
    assert [e.name for e in spd.entries[:3]] == ["ike", "natt", "ctl"]
    ike = bytes(IP(src="10.1.0.1", dst="10.2.0.9") / UDP(sport=500, dport=500))
    assert spd.lookup_outbound(ike).name == "ike"
    ctl = bytes(IP(src="10.1.0.1", dst="10.2.0.5") / TCP(sport=40000, dport=7444))
    assert spd.lookup_outbound(ctl).name == "ctl"
    other = bytes(IP(src="10.1.0.1", dst="10.2.0.5") / TCP(sport=40000, dport=7445))
    assert spd.lookup_outbound(other).name == "view:b" and spd.lookup_outbound(other).action is Action.PROTECT
    v6 = bytes(IPv6(src="fd00:1::1", dst="fd00:2::7") / UDP(sport=1, dport=2))
    assert spd.lookup_outbound(v6).name == "view:b6"
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


def test_replay_window_policy_and_entry_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"peers\[b\]\.policy\.replay_window: 0 turns anti-replay off.*allow_no_replay"):
        check_replay_window(0, False, "peers[b].policy.replay_window")
    assert check_replay_window(0, True) == 0
    with pytest.raises(ValueError, match="multiple of 32"):
        check_replay_window(100)
    with pytest.raises(ValueError, match="not a window size"):
        check_replay_window(-1)
    assert check_replay_window(1024) == 1024
    with pytest.raises(ValueError, match="PROTECT needs a peer"):
        SpdEntry(remote=N("10.2.0.0/16"))
    with pytest.raises(ValueError, match="empty list"):
        SpdEntry(peer="b", remote=())


AH_KEYS = EspKeys(spi=0x200, encr_id=0, encr_key=b"", integ_id=12, integ_key=bytes(32))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decapsulation_on_random_bytes_only_counts(data) -> None:
    ah = AhSa(AH_KEYS)
    tun = AhSa(AH_KEYS, mode="tunnel", tunnel_src="198.51.100.1", tunnel_dst="198.51.100.2")
    inputs = [data, b"\x45" + data, b"\x60" + data,
              bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=51)) + data,
              bytes(IPv6(src="fd00::1", dst="fd00::2", nh=51)) + data]
    for sa in (ah, tun):
        sa.decapsulate_batch(inputs)
        assert sa.counters["packets_in"] + sum(sa.counters[k] for k in
                                               ("malformed", "spi", "replay", "icv", "next_header")) == len(inputs)
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
