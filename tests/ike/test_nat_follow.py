"""RFC 7296 §2.23: only the side not behind a NAT follows the peer's address changes, also
under forced UDP encapsulation (faked NAT_DETECTION_SOURCE_IP, the default; issue 9)."""
from __future__ import annotations

from dataclasses import replace

from agent.ike.events import ChildSaEstablished, PeerAddressChanged
from agent.model import Credentials

from .conftest import A_ADDR, B_ADDR, CLASSICAL, make_net, view

PSK = Credentials(psk=b"nat follow tests psk 0123456789ab")
NAT_IP = "203.0.113.7"  # a's NAT, public side


def _behind_nat():
    """a behind a NAPT (a's port p leaves as NAT_IP:40000+p), b on a public address; both force
    UDP encapsulation (the default)."""
    pol = replace(CLASSICAL, dpd_interval_s=0)
    assert pol.encapsulation == "udp"
    n = make_net(view("node-a", "node-b", policy=pol), PSK, view("node-b", "node-a", policy=pol), PSK, seed="natf")
    b_rx, a_rx = n.b.receive_datagram, n.a.receive_datagram
    n.b_src = None  # b's source as a sees it, once b "moves"
    n.b.receive_datagram = lambda data, local, remote, now: b_rx(
        data, local, (NAT_IP, 40000 + remote[1]) if remote[0] == A_ADDR else remote, now)
    n.a.receive_datagram = lambda data, local, remote, now: a_rx(
        data, (A_ADDR, local[1] - 40000) if local[0] == NAT_IP else local, n.b_src or remote, now)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    (sa_a,), (sa_b,) = list(n.a._sas.values()), list(n.b._sas.values())
    assert sa_a.nat.local and sa_a.nat.remote  # behind a NAT; b fakes its source hash
    assert sa_b.nat.remote and not sa_b.nat.local
    assert sa_b.remote == (NAT_IP, 44500) and sa_a.remote == (B_ADDR, 4500)
    return n, sa_a, sa_b


def _probe(n, m, sa):
    sa.check_liveness(n.now)
    m._collect(sa, n.now)
    n.pump()


def test_side_behind_the_nat_does_not_follow_the_peer():
    """b's authenticated request arrives from another address: a (behind the NAT) keeps
    sending to b's configured address (before the fix it moved there: PeerAddressChanged)."""
    n, sa_a, sa_b = _behind_nat()
    n.b_src = ("198.51.100.99", 4500)
    _probe(n, n.b, sa_b)
    assert sa_a.remote == (B_ADDR, 4500) and n.of("a", PeerAddressChanged) == []


def test_side_not_behind_the_nat_follows_the_rebound_mapping():
    n, sa_a, sa_b = _behind_nat()
    b_rx = n.b.receive_datagram
    n.b.receive_datagram = lambda data, local, remote, now: b_rx(data, local, (A_ADDR, 5500), now)  # -> 45500
    _probe(n, n.a, sa_a)
    assert sa_b.remote == (NAT_IP, 45500)
    assert n.of("b", PeerAddressChanged) == [PeerAddressChanged("node-a", sa_b.spi_i, sa_b.spi_r, (NAT_IP, 45500))]
