"""`meshsec status` byte counts are the same at both ends of a CHILD_SA: both count
RFC 4303 payload bytes (§2.3 Payload Data: the inner IP packet in tunnel mode, the
upper-layer payload after the IP header in transport mode), never the ESP header, IV,
padding, trailer, ICV or (transport mode) the IP header. Issue 10, status bullet."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw

from agent.esp import EspSa
from agent.model import EspKeys
from agent.iana import EncrId
from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.test_runtime_rfc4301 import child, install, node

A, B = "198.51.100.11", "198.51.100.12"


def _pair(net, mode: str):
    a, ia, ta = node(net, A, [("b", B, [B + "/32"], mode)], [A + "/32"])
    b, ib, tb = node(net, B, [("a", A, [A + "/32"], mode)], [B + "/32"])
    install(a, ia, child("b", 0x1001, 0x2002, [A + "/32"], [B + "/32"], mode, B))
    install(b, ib, child("a", 0x2002, 0x1001, [B + "/32"], [A + "/32"], mode, A))
    return (a, ta), (b, tb)


def _sa(rt) -> dict:
    (ch,) = rt.status()["child_sas"]
    return ch


def test_transport_mode_bytes_equal_at_both_ends():
    net = FakeNetwork()
    (a, ta), (b, tb) = _pair(net, "transport")
    there = [raw(IP(src=A, dst=B) / UDP(sport=5, dport=7) / Raw(b"x" * n)) for n in (1, 100, 1000)]
    back = [raw(IP(src=B, dst=A) / TCP(sport=7, dport=5) / Raw(b"y" * n)) for n in (10, 300)]
    ta.inject(there)
    a.pump()
    b.pump()
    tb.inject(back)
    b.pump()
    a.pump()
    assert len(tb.take_written()) == 3 and len(ta.take_written()) == 2
    sa_a, sa_b = _sa(a), _sa(b)
    # payload bytes: what follows the 20-byte IPv4 header (the UDP / TCP segment)
    assert sa_a["bytes_out"] == sa_b["bytes_in"] == sum(len(p) - 20 for p in there)
    assert sa_b["bytes_out"] == sa_a["bytes_in"] == sum(len(p) - 20 for p in back)
    assert sa_a["packets_out"] == sa_b["packets_in"] == 3


def test_tunnel_mode_bytes_equal_at_both_ends():
    net = FakeNetwork()
    (a, ta), (b, tb) = _pair(net, "tunnel")
    there = [raw(IP(src=A, dst=B) / UDP(sport=5, dport=7) / Raw(b"x" * n)) for n in (1, 500)]
    ta.inject(there)
    a.pump()
    b.pump()
    assert tb.take_written() == there
    # tunnel mode: the payload is the whole inner IP packet
    assert _sa(a)["bytes_out"] == _sa(b)["bytes_in"] == sum(map(len, there))


def test_esp_sa_transport_counts_payload_both_ways_ipv4_and_ipv6():
    """The SA's own counters (and so its byte lifetime) count the same quantity on each
    side, on the batch path and the single-packet path."""
    k = EspKeys(0x77, int(EncrId.ENCR_AES_GCM_16), b"\x07" * 20)
    pkts = [raw(IP(src=A, dst=B) / UDP() / Raw(b"a" * 33)), raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / Raw(b"b" * 7))]
    want = (len(pkts[0]) - 20) + (len(pkts[1]) - 40)
    for limit in (0, 10_000):  # 0: the batch fast path; a byte lifetime: packet by packet
        tx = EspSa(k, rng=bytes, mode="transport", lifetime_bytes=limit)
        rx = EspSa(k, rng=bytes, mode="transport", lifetime_bytes=limit)
        got = rx.decapsulate_batch_nh(tx.encapsulate_batch(pkts))
        assert len(got) == 2
        assert tx.counters["bytes_out"] == rx.counters["bytes_in"] == want, limit
