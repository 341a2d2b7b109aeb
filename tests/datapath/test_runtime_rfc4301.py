"""Runtime with transport mode, raw ESP, SA bundles (nesting), MTU/ICMP and MSS clamping,
in memory (FakeTun / FakeUdp / FakeRaw). CHILD_SAs are installed from scripted
ChildSaEstablished events with mirrored keys; packets are checked with scapy."""
from __future__ import annotations

import ipaddress
import logging
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.packet import Raw, raw

from agent.datapath import packets as pk
from agent.datapath.runtime import Runtime
from agent.esp import EspSa
from agent.iana import EncrId
from agent.ike.events import ChildSaEstablished
from agent.model import EspKeys, NodeView, Peer, PeerPolicy
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import ScriptedIke

R_IP, G_IP, H_IP = "198.51.100.21", "198.51.100.2", "10.2.0.2"
NET = ipaddress.ip_network


def keys(spi: int) -> EspKeys:
    return EspKeys(spi, int(EncrId.ENCR_AES_GCM_16), bytes([spi & 0xFF]) * 20)


def child(peer, in_spi, out_spi, local_ts, remote_ts, mode, remote, udp=True):
    return ChildSaEstablished(peer=peer, ike_spi_i=1, ike_spi_r=2, inbound=keys(in_spi), outbound=keys(out_spi),
                              local_ts=tuple(NET(n) for n in local_ts), remote_ts=tuple(NET(n) for n in remote_ts),
                              mode=mode, udp_encap=udp, local=("x", 4500), remote=(remote, 4500),
                              algorithms="ENCR_AES_GCM_16_128/NO_ESN")


def node(net, ip, peers, subnets, **kw):
    view = NodeView(name=ip, identity=ip, subnets=tuple(NET(s) for s in subnets), local_address=ip, peers=tuple(
        Peer(name=n, identity=n, endpoints=(e,), subnets=tuple(NET(s) for s in sn), policy=PeerPolicy(mode=m),
             initiate=False) for n, e, sn, m in peers))
    ike = ScriptedIke()
    tun = FakeTun(mtu=kw.pop("tun_mtu", 1400))
    rt = Runtime(view, ike, tun=tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                 local_address=ip, raw_esp=kw.pop("raw", None), **kw)
    return rt, ike, tun


def install(rt, ike, *events):
    ike.events.extend(events)
    rt._flush_ike(rt.clock())


def icmp_echo(src, dst, size=0, df=True):
    return raw(IP(src=src, dst=dst, flags="DF" if df else 0) / ICMP() / Raw(b"x" * size))


def test_transport_esp_in_udp_rebuilds_the_packet_and_fixes_checksums():
    net = FakeNetwork()
    a, ia, ta = node(net, "198.51.100.11", [("b", "198.51.100.12", ["198.51.100.12/32"], "transport")],
                     ["198.51.100.11/32"])
    b, ib, tb = node(net, "198.51.100.12", [("a", "198.51.100.11", ["198.51.100.11/32"], "transport")],
                     ["198.51.100.12/32"])
    install(a, ia, child("b", 0x1001, 0x2002, ["198.51.100.11/32"], ["198.51.100.12/32"], "transport",
                         "198.51.100.12"))
    install(b, ib, child("a", 0x2002, 0x1001, ["198.51.100.12/32"], ["198.51.100.11/32"], "transport",
                         "198.51.100.11"))
    sent = raw(IP(src="198.51.100.11", dst="198.51.100.12") / UDP(sport=5, dport=7) / Raw(b"payload"))
    ta.inject([sent])
    a.pump()
    b.pump()
    wire = [p for s, d, p in net.log if d == ("198.51.100.12", 4500)]
    assert len(wire) == 1 and b"payload" not in wire[0]
    # transport mode: ESP carries the UDP segment only (SPI/seq, IV, 15 bytes + 3 pad + 2, ICV): no inner IP header
    assert len(wire[0]) == 8 + 8 + (15 + 3 + 2) + 16
    (got,) = tb.take_written()
    g = IP(got)
    assert (g.src, g.dst, g.proto, bytes(g[UDP].payload)) == ("198.51.100.11", "198.51.100.12", 17, b"payload")
    c_ip, c_udp = g.chksum, g[UDP].chksum
    del g.chksum, g[UDP].chksum
    again = IP(raw(g))
    assert (again.chksum, again[UDP].chksum) == (c_ip, c_udp)
    st = a.status()
    assert [e["hits"] for e in st["spd"] if e["name"] == "child:b"] == [1]
    assert st["child_sas"][0]["mode"] == "transport" and "esp/transport/udp" in st["spd"][0]["bundle"]


def test_transport_raw_esp_uses_protocol_50_and_without_raw_socket_counts_drop():
    net = FakeNetwork()
    ra = net.raw("198.51.100.11", 50)
    rb = net.raw("198.51.100.12", 50)
    a, ia, ta = node(net, "198.51.100.11", [("b", "198.51.100.12", ["198.51.100.12/32"], "transport")],
                     ["198.51.100.11/32"], raw=ra)
    b, ib, tb = node(net, "198.51.100.12", [("a", "198.51.100.11", ["198.51.100.11/32"], "transport")],
                     ["198.51.100.12/32"], raw=rb)
    install(a, ia, child("b", 0x1001, 0x2002, ["198.51.100.11/32"], ["198.51.100.12/32"], "transport",
                         "198.51.100.12", udp=False))
    install(b, ib, child("a", 0x2002, 0x1001, ["198.51.100.12/32"], ["198.51.100.11/32"], "transport",
                         "198.51.100.11", udp=False))
    ping = icmp_echo("198.51.100.11", "198.51.100.12", 10)
    ta.inject([ping])
    a.pump()
    b.pump()
    (s, d, wire), = [x for x in net.log]
    assert d == ("198.51.100.12", -50) and IP(wire).proto == 50
    (got,) = tb.take_written()
    assert IP(got)[ICMP].type == 8 and bytes(IP(got)[Raw]) == b"x" * 10
    # the same policy without a raw socket: counted, not raised
    c, ic, tc = node(net, "198.51.100.13", [("b", "198.51.100.12", ["198.51.100.12/32"], "transport")],
                     ["198.51.100.13/32"])
    install(c, ic, child("b", 0x3003, 0x4004, ["198.51.100.13/32"], ["198.51.100.12/32"], "transport",
                         "198.51.100.12", udp=False))
    tc.inject([icmp_echo("198.51.100.13", "198.51.100.12")])
    c.pump()
    assert c.counters["no_raw_socket"] == 1


@pytest.fixture
def remote_host():
    """R has a tunnel SA to gateway G (10.2.0.0/24) and a transport SA to H (10.2.0.2) behind it."""
    net = FakeNetwork()
    r, ir, tr = node(net, R_IP, [("gw", G_IP, ["10.2.0.0/24"], "tunnel"), ("h", H_IP, [H_IP + "/32"], "transport")],
                     [R_IP + "/32"])
    install(r, ir, child("gw", 0x1001, 0x2002, [R_IP + "/32"], ["10.2.0.0/24"], "tunnel", G_IP),
            child("h", 0x3003, 0x4004, [R_IP + "/32"], [H_IP + "/32"], "transport", H_IP))
    g_in = EspSa(keys(0x2002), rng=os.urandom, mode="tunnel")   # G's inbound = R's outbound tunnel
    g_out = EspSa(keys(0x1001), rng=os.urandom, mode="tunnel")
    h_in = EspSa(keys(0x4004), rng=os.urandom, mode="transport")
    h_out = EspSa(keys(0x3003), rng=os.urandom, mode="transport")
    return net, r, tr, g_in, g_out, h_in, h_out


def test_bundle_outbound_applies_transport_then_tunnel(remote_host):
    net, r, tr, g_in, g_out, h_in, h_out = remote_host
    assert r.children[0x3003].via == "gw" and r.children[0x1001].via is None
    tr.inject([icmp_echo(R_IP, H_IP, 20)])
    r.pump()
    (s, d, wire), = [x for x in net.log if x[1] == (G_IP, 4500)]
    inner = IP(g_in.decapsulate(wire))  # G peels the tunnel: UDP 4500 from R to H holding ESP
    assert (inner.src, inner.dst, inner[UDP].dport) == (R_IP, H_IP, 4500)
    nh, payload = h_in.decapsulate_nh(bytes(inner[UDP].payload))
    assert nh == 1 and ICMP(payload).type == 8
    st = r.status()
    row = next(e for e in st["spd"] if e["peer"] == "h")
    assert row["bundle"].startswith("h:esp/transport/udp") and "-> gw:esp/tunnel/udp" in row["bundle"]
    assert r.counters["nested_out"] == 1


def test_bundle_inbound_peels_both_layers_and_refuses_the_bypass(remote_host):
    net, r, tr, g_in, g_out, h_in, h_out = remote_host
    reply = icmp_echo(H_IP, R_IP, 20)
    esp_h = h_out.encapsulate(raw(IP(reply).payload), next_header=1)
    udp = pk.udp_datagram(H_IP, R_IP, 4500, 4500, esp_h)
    r.udp4500.inject([(g_out.encapsulate(udp), (G_IP, 4500))])
    r.pump()
    (got,) = tr.take_written()
    assert (IP(got).src, IP(got).dst, IP(got)[ICMP].type, bytes(IP(got)[Raw])) == (H_IP, R_IP, 8, b"x" * 20)
    assert r.counters["nested_in"] == 1
    # the transport SA's packets arriving outside the tunnel violate the bundle (RFC 4301 §5.2)
    r.udp4500.inject([(h_out.encapsulate(raw(IP(reply).payload), next_header=1), (H_IP, 4500))])
    r.pump()
    assert tr.take_written() == [] and r.counters["policy"] == 1


def test_too_big_df_packet_gets_icmp_fragmentation_needed():
    net = FakeNetwork()
    a, ia, ta = node(net, G_IP, [("r", R_IP, ["10.9.0.0/24"], "tunnel")], ["10.2.0.0/24"],
                     tun_mtu=1500, underlay_mtu=1500)
    install(a, ia, child("r", 0x1001, 0x2002, ["10.2.0.0/24"], ["10.9.0.0/24"], "tunnel", R_IP))
    lim = a.children[0x1001].max_inner
    assert lim == 1500 - (20 + 8 + 8 + 8 + 3 + 2 + 16)
    big = icmp_echo("10.2.0.5", "10.9.0.1", 1500 - 28)
    nodf = icmp_echo("10.2.0.5", "10.9.0.1", 1500 - 28, df=False)
    ta.inject([big, nodf])
    a.pump()
    (icmp,) = ta.take_written()
    i = IP(icmp)
    assert (i.src, i.dst, i[ICMP].type, i[ICMP].code, i[ICMP].nexthopmtu) == ("10.9.0.1", "10.2.0.5", 3, 4, lim)
    assert a.counters["too_big"] == 1 and a.counters["esp_out"] == 1  # the non-DF one is sent


def test_mss_clamping_on_syn():
    net = FakeNetwork()
    a, ia, ta = node(net, G_IP, [("r", R_IP, ["10.9.0.0/24"], "tunnel")], ["10.2.0.0/24"],
                     tun_mtu=1500, underlay_mtu=1500, mss_clamp=True)
    install(a, ia, child("r", 0x1001, 0x2002, ["10.2.0.0/24"], ["10.9.0.0/24"], "tunnel", R_IP))
    syn = raw(IP(src="10.2.0.5", dst="10.9.0.1") / TCP(flags="S", options=[("MSS", 1460)]))
    ta.inject([syn])
    a.pump()
    (s, d, wire), = net.log
    inner = IP(EspSa(keys(0x2002), rng=os.urandom).decapsulate(wire))
    assert dict(inner[TCP].options)["MSS"] == a.children[0x1001].max_inner - 40
    c = inner[TCP].chksum
    del inner[TCP].chksum
    assert IP(raw(inner))[TCP].chksum == c
    assert a.counters["mss_clamped"] == 1


def test_rebuild_transport_fixes_checksum_after_nat():
    # sender computed the UDP checksum with its private address; NAT changed the outer source
    seg = raw(UDP(sport=1, dport=2) / Raw(b"data"))
    orig = IP(raw(IP(src="10.0.0.5", dst="198.51.100.2") / UDP(sport=1, dport=2) / Raw(b"data")))
    seg = raw(orig[UDP])
    nat_src = ipaddress.ip_address("203.0.113.9").packed
    dst = ipaddress.ip_address("198.51.100.2").packed
    fixed = IP(pk.rebuild_transport(nat_src, dst, 17, seg, fix_checksum=True))
    c = fixed[UDP].chksum
    del fixed[UDP].chksum
    assert IP(raw(fixed))[UDP].chksum == c != orig[UDP].chksum
    kept = IP(pk.rebuild_transport(nat_src, dst, 17, seg, fix_checksum=False))
    assert kept[UDP].chksum == orig[UDP].chksum


def test_overheads():
    assert pk.esp_overhead("ENCR_AES_GCM_16_128/NO_ESN", mode="tunnel", udp_encap=True, outer_v6=False) == 65
    assert pk.esp_overhead("ENCR_AES_GCM_16_128", mode="transport", udp_encap=False, outer_v6=False) == 37
    assert pk.esp_overhead("ENCR_AES_CBC_128/AUTH_HMAC_SHA2_256_128", mode="tunnel", udp_encap=True,
                           outer_v6=True) == 40 + 8 + 8 + 16 + 15 + 2 + 16
    assert pk.ah_overhead("AUTH_HMAC_SHA2_256_128", mode="transport", outer_v6=True) == 32


def test_ipv6_packet_too_big():
    from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6
    p = raw(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(data=b"x" * 1400))
    r = IPv6(pk.too_big(p, 1300))
    assert r.src == "fd00::2" and r.dst == "fd00::1" and r[ICMPv6PacketTooBig].mtu == 1300
    c = r[ICMPv6PacketTooBig].cksum
    del r[ICMPv6PacketTooBig].cksum
    assert IPv6(raw(r))[ICMPv6PacketTooBig].cksum == c
    assert len(raw(r)) <= 1280


# ---- transport-mode IP fragments, an inbound SPI clash, a peer address change (NAT rebinding)

def _transport_pair():
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
    net, a, _ia, ta, b, tb = _transport_pair()
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
    net, a, ia, ta, b, tb = _transport_pair()
    live = a.children[0x1001]
    with caplog.at_level(logging.ERROR):
        install(a, ia, child("c", 0x1001, 0x3003, ["198.51.100.11/32"], ["198.51.100.13/32"], "transport",
                             "198.51.100.13"))
    assert a.children[0x1001] is live and live.peer == "b"
    assert a.counters["internal_errors"] == 1
    assert any("internal error" in r.getMessage() and "01001" in r.getMessage() for r in caplog.records)


def test_peer_address_changed_moves_the_udp_encapsulation_endpoint():
    from agent.ike.events import PeerAddressChanged
    net, a, ia, ta, b, tb = _transport_pair()
    install(a, ia, PeerAddressChanged("b", 1, 2, ("198.51.100.12", 61000)))
    assert a.children[0x1001].remote == ("198.51.100.12", 61000)
    ta.inject([raw(IP(src="198.51.100.11", dst="198.51.100.12") / UDP(sport=5, dport=7) / Raw(b"x"))])
    a.pump()
    assert [d for s, d, p in net.log if s[0] == "198.51.100.11" and d[0] == "198.51.100.12"][-1] == \
        ("198.51.100.12", 61000)
    # another IKE_SA's event moves nothing
    install(a, ia, PeerAddressChanged("b", 7, 8, ("198.51.100.12", 62000)))
    assert a.children[0x1001].remote == ("198.51.100.12", 61000)
