"""CHILD_SA lifetimes in bytes and packets (RFC 4301 §4.4.2.1) through the runtime, with the
real IKE core on both sides, an in-memory underlay and a fake clock.

- IkeManager.delete_child (sans-I/O): HDR, SK {D(ESP, SPI)} --> removes the CHILD_SA on both ends.
- Soft limit: the sending SA reaches 90 % -> one CREATE_CHILD_SA rekey (RFC 7296 §1.3.3); traffic
  continues on the new SA with no packet lost, the receiver does not start its own rekey.
- Hard limit without a successful rekey: nothing beyond the limit is sent or accepted, the CHILD_SA
  is deleted through IKE on both sides, and traffic stops (counted drops, no exception).
"""
from __future__ import annotations

import dataclasses
import os

import pytest

from agent.datapath.runtime import Runtime
from agent.ike.events import ChildSaDeleted, ChildSaEstablished
from agent.ike.manager import IkeManager
from agent.model import Credentials, PeerPolicy
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, make_view

PSK = Credentials(psk=b"runtime lifetime test psk 0123456789")


def view_with(name, ip, subnet, peers, **policy):
    v = make_view(name, ip, subnet, peers)
    pol = PeerPolicy(**policy)
    return dataclasses.replace(v, peers=tuple(dataclasses.replace(p, policy=pol) for p in v.peers))


# ---- IkeManager.delete_child, sans-I/O ------------------------------------------------

def _shuttle(a: IkeManager, b: IkeManager, now: float, rounds: int = 10) -> None:
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for d in src.datagrams_to_send():
                dst.receive_datagram(d.data, d.remote, d.local, now)
                moved = True
        if not moved:
            return


def _events(m: IkeManager) -> list:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def test_ike_manager_delete_child_deletes_on_both_sides():
    va = view_with("a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    vb = view_with("b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a = IkeManager(va, PSK, os.urandom, local_address=A_IP)
    b = IkeManager(vb, PSK, os.urandom, local_address=B_IP)
    now = 100.0
    a.initiate("b", now)
    _shuttle(a, b, now)  # IKE_SA_INIT, IKE_AUTH
    (ca,) = [e for e in _events(a) if isinstance(e, ChildSaEstablished)]
    (cb,) = [e for e in _events(b) if isinstance(e, ChildSaEstablished)]
    assert ca.inbound.spi == cb.outbound.spi

    assert a.delete_child(0xDEADBEEF, now) is False  # unknown SPI: nothing sent, no exception
    assert a.datagrams_to_send() == []

    assert a.delete_child(ca.inbound.spi, now, reason="CHILD_SA byte/packet lifetime expired") is True
    (da,) = _events(a)  # ChildSaDeleted at once on our side
    assert isinstance(da, ChildSaDeleted) and da.inbound_spi == ca.inbound.spi
    assert da.reason == "CHILD_SA byte/packet lifetime expired"
    _shuttle(a, b, now + 0.1)  # INFORMATIONAL: HDR, SK {D(ESP, SPIi)} -->  <-- HDR, SK {D(ESP, SPIr)}
    (db,) = [e for e in _events(b) if isinstance(e, ChildSaDeleted)]
    assert db.inbound_spi == cb.inbound.spi and db.outbound_spi == ca.inbound.spi
    assert all(not s["children"] for s in a.status()) and all(not s["children"] for s in b.status())
    assert a.delete_child(ca.inbound.spi, now + 0.2) is False  # already gone
    assert [s["state"] for s in a.status()] == ["ESTABLISHED"]  # the IKE_SA stays


# ---- the runtime ------------------------------------------------------------------------

class Node:
    def __init__(self, net, clock, name, ip, subnet, peers, **policy):
        self.view = view_with(name, ip, subnet, peers, **policy)
        self.ike = IkeManager(self.view, PSK, os.urandom, local_address=ip)
        self.tun = FakeTun()
        self.rekeys: list[int] = []
        real = self.ike.rekey_child

        def rekey(spi, now):
            self.rekeys.append(spi)
            return real(spi, now)
        self.ike.rekey_child = rekey
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=net.socket(ip, 500),
                          udp4500=net.socket(ip, 4500), local_address=ip, clock=clock)


def pump(*nodes, rounds=6):
    for _ in range(rounds):
        for n in nodes:
            n.rt.pump()


def _setup(**policy):
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)], **policy)
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)], **policy)
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current and "a" in b.rt.current
    return net, clock, a, b


def batch(i: int, n: int = 10, size: int = 100) -> list[bytes]:
    """``n`` IPv4 packets of ``size`` octets each from site A to site B."""
    return [ipv4("10.1.0.5", "10.2.0.7", (b"%03d-%03d-" % (i, j)).ljust(size - 20, b"x")) for j in range(n)]


@pytest.mark.parametrize("policy", [dict(child_lifetime_packets=100), dict(child_lifetime_bytes=10_000),
                                    dict(child_lifetime_bytes=10_000, child_lifetime_packets=500)])
def test_soft_limit_rekeys_once_and_no_packet_is_lost(policy):
    net, clock, a, b = _setup(**policy)
    first = a.rt.current["b"]
    st = first.status(clock())["lifetime"]
    assert st["packets"]["limit"] == policy.get("child_lifetime_packets", 0)
    assert st["bytes"]["limit"] == policy.get("child_lifetime_bytes", 0)
    sent = []
    for i in range(15):  # 100-octet packets, 10 per batch: 90 % (soft, sender) after batch 9
        pkts = batch(i)
        sent += pkts
        a.tun.inject(pkts)
        pump(a, b)
        clock.advance(0.01)
    assert b.tun.take_written() == sent  # nothing lost across the rekey
    assert a.rekeys == [first.inbound_spi]  # the sender asked once
    assert b.rekeys == []  # the receiver's softer limit (95 %) was never reached
    assert a.rt.counters["lifetime_rekeys"] == 1 and a.rt.counters["lifetime_deletes"] == 0
    now_cur = a.rt.current["b"]
    assert now_cur.inbound_spi != first.inbound_spi and first.inbound_spi not in a.rt.children
    assert len(a.rt.children) == len(b.rt.children) == 1
    assert now_cur.out_sa.counters["packets_out"] == 60  # batches 10..15 on the new SA
    assert first.out_sa.counters["lifetime_expired"] == 0
    st = a.rt.status()["child_sas"][0]["lifetime"]
    assert st["packets"]["used_out"] == 60 and st["expired"] is False


@pytest.mark.parametrize("policy", [dict(child_lifetime_packets=100), dict(child_lifetime_bytes=10_000)])
def test_hard_limit_without_a_rekey_stops_traffic_and_deletes_on_both_sides(policy):
    net, clock, a, b = _setup(**policy)
    for n in (a, b):  # the rekey fails (e.g. the peer answers TEMPORARY_FAILURE every time)
        n.ike.rekey_child = lambda spi, now, n=n: n.rekeys.append(spi) and False
    ch = a.rt.current["b"]
    sent = []
    for i in range(7):  # 15 packets of 100 octets per batch: the 7th crosses the hard limit
        pkts = batch(i, n=15)
        sent += pkts
        a.tun.inject(pkts)
        pump(a, b)
        clock.advance(0.01)
    got = b.tun.take_written()
    assert got == sent[:100]  # exactly up to the hard limit, in order; nothing beyond
    assert ch.out_sa.counters["lifetime_expired"] == 5  # the rest of the 7th batch
    assert ch.out_sa.expired and a.rekeys == [ch.inbound_spi]  # at 90 %, after the 6th batch
    assert a.rt.counters["lifetime_deletes"] == 1
    # deleted through IKE: gone on both sides, the IKE_SA stays up
    assert a.rt.children == {} and b.rt.children == {}
    assert "b" not in a.rt.current and "a" not in b.rt.current
    assert [s["state"] for s in a.ike.status()] == ["ESTABLISHED"]
    assert all(not s["children"] for s in b.ike.status())
    a.tun.inject(batch(7, n=15))
    pump(a, b)
    assert "b" in a.rt.current and a.rt.counters["child_acquires"] == 1
    # the 8th batch found no SA (never an exception); being an acquire on an established
    # IKE_SA it asked for a new CHILD_SA (CREATE_CHILD_SA), and waited for it (hold.py)
    assert b.tun.take_written() == batch(7, n=15)
    assert a.rt.counters["held"] == a.rt.counters["held_sent"] == 15
    assert a.rt.counters["no_sa"] == 0 and a.rt.counters["internal_errors"] == 0
    assert b.rt.counters["internal_errors"] == 0


def test_receiver_refuses_beyond_its_hard_limit_and_deletes():
    """A sender without volume limits (like a peer that does not enforce them): the receiving
    SA refuses what is past its limit, asks for one rekey at 95 %, and at the hard limit deletes
    the CHILD_SA through IKE so the sender stops too."""
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])  # no limits
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)], child_lifetime_packets=50)
    b.ike.rekey_child = lambda spi, now: b.rekeys.append(spi) and False  # the rekey fails
    a.rt.start()
    b.rt.start()
    pump(a, b)
    ch_b = b.rt.current["a"]
    sent = []
    for i in range(8):  # 8 packets per batch: 48 after the 6th, 56 offered after the 7th
        pkts = batch(i, n=8)
        sent += pkts
        a.tun.inject(pkts)
        pump(a, b)
    # up to the limit, then the 8th batch: it found no SA at a (learned from the D payload),
    # waited, and went through the CHILD_SA its acquire asked for
    assert b.tun.take_written() == sent[:50] + sent[56:]
    assert b.rekeys == [ch_b.inbound_spi]  # at 95 % (47 packets), once
    assert ch_b.in_sa.counters["lifetime_expired"] == 6  # the rest of the 7th batch
    assert b.rt.counters["lifetime_deletes"] == 1
    assert a.rt.counters["held"] == a.rt.counters["held_sent"] == 8 and a.rt.counters["no_sa"] == 0
    # ... and, as an acquire on the established IKE_SA, asked for a new CHILD_SA
    assert a.rt.counters["child_acquires"] == 1 and "a" in b.rt.current


def test_status_shows_limits_and_use():
    net, clock, a, b = _setup(child_lifetime_bytes=1_000_000, child_lifetime_packets=1000)
    a.tun.inject(batch(0, n=5, size=200))
    pump(a, b)
    (row,) = a.rt.status()["child_sas"]
    life = row["lifetime"]
    assert life["bytes"] == {"limit": 1_000_000, "soft_in": 950_000, "soft_out": 900_000,
                             "used_in": 0, "used_out": 1000}
    assert life["packets"] == {"limit": 1000, "soft_in": 950, "soft_out": 900, "used_in": 0, "used_out": 5}
    assert life["expired"] is False
    (row_b,) = b.rt.status()["child_sas"]
    assert row_b["lifetime"]["packets"]["used_in"] == 5 and row_b["lifetime"]["bytes"]["used_in"] == 1000


def test_no_limits_by_default():
    net, clock, a, b = _setup()
    ch = a.rt.current["b"]
    assert ch.out_sa.lifetime_bytes == 0 and ch.out_sa.lifetime_packets == 0
    assert a.rt.status()["child_sas"][0]["lifetime"]["packets"]["limit"] == 0


def test_meshsec_status_text_shows_lifetime_use():
    from meshsec.cli import format_status
    net, clock, a, b = _setup(child_lifetime_bytes=1 << 20, child_lifetime_packets=1000)
    a.tun.inject(batch(0, n=5, size=200))
    pump(a, b)
    text = format_status(a.rt.status())
    assert "LIFETIME USED" in text and "1000B/1.0MiB 5/1000p" in text
    plain = format_status(_setup()[2].rt.status())
    assert "CHILD_SAs (1)" in plain and "LIFETIME USED" not in plain  # no limits: no column


def test_bad_limit_in_a_policy_is_reported_and_ignored_not_fatal(caplog):
    # e.g. a hand-edited stored view: the CHILD_SA still comes up, the error is logged
    net, clock, a, b = _setup(child_lifetime_packets=-5)
    assert "b" in a.rt.current and a.rt.current["b"].out_sa.lifetime_packets == 0
    assert "child_lifetime_packets -5 is not a whole number >= 0" in caplog.text
    assert a.rt.counters["internal_errors"] == 0
    pkts = batch(0, n=3)
    a.tun.inject(pkts)
    pump(a, b)
    assert b.tun.take_written() == pkts


def test_ah_sas_get_the_limits_and_expire_without_an_ike_delete_api():
    """AH (RFC 4302) CHILD_SAs carry the same limits; with an IKE stand-in that has no
    delete_child the runtime removes the expired CHILD_SA itself. AH ICVs on the wire are
    checked by tests/datapath/test_runtime_ah.py with scapy; here: counts and removal."""
    import ipaddress as ipa

    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw, raw

    from agent.model import NodeView, Peer
    from tests.datapath.test_runtime_ah import ah_keys, ev
    from tests.datapath.test_runtime_rfc4301 import ScriptedIke, install

    A, B = "198.51.100.11", "198.51.100.12"
    net = FakeNetwork()

    def node(me, other, peer_name):
        pol = PeerPolicy(mode="transport", protocol="ah", encapsulation="none", child_lifetime_packets=100)
        view = NodeView(name=me, identity=me, subnets=(ipa.ip_network(me + "/32"),), local_address=me, peers=(
            Peer(name=peer_name, identity=peer_name, endpoints=(other,), subnets=(ipa.ip_network(other + "/32"),),
                 policy=pol, initiate=False),))
        ike, tun = ScriptedIke(), FakeTun(mtu=1400)
        rt = Runtime(view, ike, tun=tun, udp500=net.socket(me, 500), udp4500=net.socket(me, 4500),
                     local_address=me, raw_esp=net.raw(me, 50))
        rt.start()
        return rt, ike, tun
    a, ike_a, ta = node(A, B, "b")
    b, ike_b, tb = node(B, A, "a")
    install(a, ike_a, ev("b", ah_keys(0x1001), ah_keys(0x2002), A, B))
    install(b, ike_b, ev("a", ah_keys(0x2002), ah_keys(0x1001), B, A))
    ch = a.current["b"]
    assert (ch.protocol, ch.out_sa.lifetime_packets, ch.in_sa.lifetime_packets) == ("ah", 100, 100)
    assert (ch.out_sa.soft_packets, ch.in_sa.soft_packets) == (90, 95)
    got = 0
    for i in range(8):  # 15 pings per batch: the 7th crosses the hard limit
        ta.inject([raw(IP(src=A, dst=B, id=i * 15 + j + 1) / ICMP() / Raw(b"x")) for j in range(15)])
        a.pump()
        b.pump()
        got += len(tb.take_written())
    assert got == 100
    assert ch.out_sa.counters["lifetime_expired"] == 5 and ch.out_sa.expired
    assert a.children == {} and "b" not in a.current  # removed locally (no IKE delete API here)
    # the 8th batch waits for a CHILD_SA this IKE stand-in never brings (hold.py: expires)
    assert a.counters["lifetime_deletes"] == 1 and a.counters["held"] == 15
    assert b.children == {} and b.counters["lifetime_deletes"] == 1  # its inbound SA reached 100 too


def test_traffic_after_a_hard_limit_delete_opens_a_new_child_sa():
    """After a CHILD_SA is gone by its hard limit (the rekey having failed), the IKE_SA is still
    up: the next packet to the peer is an acquire (RFC 4301 §5.1) that asks for a new CHILD_SA
    with CREATE_CHILD_SA (RFC 7296 §1.3.1) on that IKE_SA, and traffic flows again."""
    net, clock, a, b = _setup(child_lifetime_packets=100)
    for n in (a, b):
        n.ike.rekey_child = lambda spi, now, n=n: n.rekeys.append(spi) and False
    for i in range(7):  # the 7th batch crosses the hard limit: the CHILD_SA is deleted
        a.tun.inject(batch(i, n=15))
        pump(a, b)
        clock.advance(0.01)
    b.tun.take_written()
    assert "b" not in a.rt.current and a.rt.counters["lifetime_deletes"] == 1
    ike_spis = [s["spi_i"] for s in a.ike.status()]
    again = batch(99, n=3)
    a.tun.inject(again)  # acquire: held, and a CHILD_SA is asked for
    pump(a, b)
    assert b.tun.take_written() == again  # sent through the new CHILD_SA once it was up
    assert a.rt.counters["child_acquires"] == 1
    assert "b" in a.rt.current and "a" in b.rt.current
    assert [s["spi_i"] for s in a.ike.status()] == ike_spis  # same IKE_SA, no new IKE_SA_INIT
    later = batch(100, n=3)
    a.tun.inject(later)
    pump(a, b)
    assert b.tun.take_written() == later
