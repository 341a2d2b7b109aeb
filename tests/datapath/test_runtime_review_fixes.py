"""Runtime side of the protocol review fixes (agent/datapath/runtime.py targeted edits): IP
fragments for a transport-mode CHILD_SA, an inbound SPI clash, peer address changes. In memory
(FakeTun / FakeNetwork), packets built with scapy."""
from __future__ import annotations

import logging

from scapy.layers.inet import IP, UDP, fragment
from scapy.packet import Raw, raw

from tests.datapath.test_runtime_rfc4301 import child, install, node
from agent.datapath.udp import FakeNetwork


def _pair():
    net = FakeNetwork()
    a, ia, ta = node(net, "198.51.100.11", [("b", "198.51.100.12", ["198.51.100.12/32"], "transport")],
                     ["198.51.100.11/32"])
    b, ib, tb = node(net, "198.51.100.12", [("a", "198.51.100.11", ["198.51.100.11/32"], "transport")],
                     ["198.51.100.12/32"])
    install(a, ia, child("b", 0x1001, 0x2002, ["198.51.100.11/32"], ["198.51.100.12/32"], "transport",
                         "198.51.100.12"))
    install(b, ib, child("a", 0x2002, 0x1001, ["198.51.100.12/32"], ["198.51.100.11/32"], "transport",
                         "198.51.100.11"))
    return net, a, ia, ta, b, tb


def test_transport_mode_fragments_from_the_tun_are_dropped_counted_and_logged_once(caplog):
    net, a, _ia, ta, b, tb = _pair()
    big = IP(src="198.51.100.11", dst="198.51.100.12", flags=0) / UDP(sport=5, dport=7) / Raw(b"F" * 3000)
    frags = [raw(f) for f in fragment(big, fragsize=1200)]
    whole = raw(IP(src="198.51.100.11", dst="198.51.100.12") / UDP(sport=5, dport=7) / Raw(b"whole"))
    with caplog.at_level(logging.WARNING):
        ta.inject(frags + [whole])
        a.pump()
        ta.inject(frags)
        a.pump()
    b.pump()
    assert a.counters["fragment"] == 2 * len(frags)
    assert sum("fragments" in r.getMessage() for r in caplog.records) == 1
    got = [IP(p) for p in tb.take_written()]
    assert [bytes(g[UDP].payload) for g in got] == [b"whole"]  # no fragment arrives as a bogus whole datagram


def test_inbound_spi_clash_keeps_the_live_child_sa_and_counts_an_internal_error(caplog):
    net, a, ia, ta, b, tb = _pair()
    live = a.children[0x1001]
    with caplog.at_level(logging.ERROR):
        install(a, ia, child("c", 0x1001, 0x3003, ["198.51.100.11/32"], ["198.51.100.13/32"], "transport",
                             "198.51.100.13"))
    assert a.children[0x1001] is live and live.peer == "b"
    assert a.counters["internal_errors"] == 1
    assert any("internal error" in r.getMessage() and "01001" in r.getMessage() for r in caplog.records)


def test_peer_address_changed_moves_the_udp_encapsulation_endpoint():
    from agent.ike.events import PeerAddressChanged
    net, a, ia, ta, b, tb = _pair()
    install(a, ia, PeerAddressChanged("b", 1, 2, ("198.51.100.12", 61000)))
    assert a.children[0x1001].remote == ("198.51.100.12", 61000)
    ta.inject([raw(IP(src="198.51.100.11", dst="198.51.100.12") / UDP(sport=5, dport=7) / Raw(b"x"))])
    a.pump()
    assert [d for s, d, p in net.log if s[0] == "198.51.100.11" and d[0] == "198.51.100.12"][-1] == \
        ("198.51.100.12", 61000)
    # another IKE_SA's event moves nothing
    install(a, ia, PeerAddressChanged("b", 7, 8, ("198.51.100.12", 62000)))
    assert a.children[0x1001].remote == ("198.51.100.12", 61000)
