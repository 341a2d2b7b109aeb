"""Several CHILD_SAs with one peer (issue 9): outbound SA selection per SPD entry and per
CHILD_SA selectors (RFC 4301 §5.1), inbound checks per SA (§5.2), a CREATE_CHILD_SA for a
selector pair no CHILD_SA carries (e.g. one the peer's narrowing left out, RFC 7296 §2.9),
rekey successors taking over exactly their predecessor's selectors. Real IkeManagers on
both sides, in memory."""
from __future__ import annotations

import ipaddress
import logging
import os

import pytest

from agent.datapath.batch import Batch
from agent.datapath.runtime import Runtime
from agent.model import Credentials, NodeView, Peer
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, ipv4, pump

pytest.importorskip("agent.ike.manager")

N = ipaddress.ip_network
A1, A3, B2, B4 = N("10.1.0.0/24"), N("10.3.0.0/24"), N("10.2.0.0/24"), N("10.4.0.0/24")


def view(me, ip, nets, peer, pip, pnets, init):
    return NodeView(name=me, identity=me, subnets=tuple(nets), local_address=ip,
                    peers=(Peer(name=peer, identity=peer, endpoints=(pip,), subnets=tuple(pnets), initiate=init),))


class RealNode:
    def __init__(self, net, clock, v, ip):
        from agent.ike.manager import IkeManager
        self.view = v
        self.ike = IkeManager(v, Credentials(psk=b"multichild-psk"), os.urandom, local_address=ip)
        self.tun = FakeTun()
        self.rt = Runtime(v, self.ike, tun=self.tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                          local_address=ip, clock=clock)


def settle(clock, *nodes, until, rounds=40):
    for _ in range(rounds):
        pump(*nodes, rounds=2)
        if until():
            return
        clock.advance(0.05)
    assert until()


def sending(node, peer):
    return node.rt.sad.sending.get(peer, ())


def carries(ch):
    return (tuple(map(str, ch.local_ts)), tuple(map(str, ch.remote_ts)))


@pytest.fixture
def narrowed(caplog):
    """a (10.1/24, 10.3/24) initiates to b, whose first view offers only 10.2/24 <-> 10.1/24:
    the IKE_AUTH CHILD_SA is narrowed to 10.1/24 <-> 10.2/24. Then b's view grows to the
    full set (10.2/24, 10.4/24 <-> 10.1/24, 10.3/24), as a strongSwan gateway with one
    CHILD_SA per subnet pair would accept."""
    caplog.set_level(logging.INFO, logger="meshsec.runtime")
    net, clock = FakeNetwork(), FakeClock()
    a = RealNode(net, clock, view("a", A_IP, (A1, A3), "b", B_IP, (B2, B4), True), A_IP)
    b = RealNode(net, clock, view("b", B_IP, (B2,), "a", A_IP, (A1,), False), B_IP)
    a.rt.start()
    b.rt.start()
    settle(clock, a, b, until=lambda: sending(a, "b") and sending(b, "a"))
    full = view("b", B_IP, (B2, B4), "a", A_IP, (A1, A3), False)
    b.rt.submit_view(full)
    pump(a, b)
    # the established IKE_SA keeps the selectors it was set up with; give it the full set, as a
    # gateway whose further CHILD_SA configurations accept the other pairs
    (sa,) = b.ike._sas_of("a")
    sa.cfg.local_subnets = full.subnets
    sa.peer = full.peers[0]
    return net, clock, a, b


def test_narrowed_child_sa_carries_only_its_selectors_and_the_rest_gets_its_own(narrowed, caplog):
    net, clock, a, b = narrowed
    (sa1,) = sending(a, "b")
    assert carries(sa1) == (("10.1.0.0/24",), ("10.2.0.0/24",))
    # the narrowing is logged, naming the pairs left out
    assert any("carries only 10.1.0.0/24 -> 10.2.0.0/24" in r.getMessage() and "10.3.0.0/24 -> 10.4.0.0/24"
               in r.getMessage() for r in caplog.get_records("setup"))
    out_before = sa1.out_sa.counters["packets_out"]
    # 10.3 -> 10.4 is outside SA1: never sent through it (RFC 4301 §5.1); it asks for a CHILD_SA
    a.tun.inject([ipv4("10.3.0.5", "10.4.0.7", b"left-out")])
    pump(a, b, rounds=1)
    assert sa1.out_sa.counters["packets_out"] == out_before
    assert b.tun.take_written() == []
    settle(clock, a, b, until=lambda: len(sending(a, "b")) == 2 and len(sending(b, "a")) == 2)
    assert a.rt.counters["child_acquires"] >= 1
    # the packet that asked for it waited (agent/datapath/hold.py) and went through the new SA
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.3.0.5", "10.4.0.7", b"left-out")]
    by_sel = {carries(c): c for c in sending(a, "b")}
    sa2 = by_sel[(("10.3.0.0/24",), ("10.4.0.0/24",))]
    # both pairs reachable, each way, each through its own CHILD_SA
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"p12"), ipv4("10.3.0.5", "10.4.0.7", b"p34")])
    pump(a, b)
    assert sorted(b.tun.take_written()) == sorted([ipv4("10.1.0.5", "10.2.0.7", b"p12"),
                                                   ipv4("10.3.0.5", "10.4.0.7", b"p34")])
    assert sa1.out_sa.counters["packets_out"] == out_before + 1
    assert sa2.out_sa.counters["packets_out"] == 2  # the held "left-out" and p34
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"r21"), ipv4("10.4.0.7", "10.3.0.5", b"r43")])
    pump(a, b)
    assert sorted(a.tun.take_written()) == sorted([ipv4("10.2.0.7", "10.1.0.5", b"r21"),
                                                   ipv4("10.4.0.7", "10.3.0.5", b"r43")])
    assert sa1.in_sa.counters["packets_in"] == 1 and sa2.in_sa.counters["packets_in"] == 1
    assert a.rt.counters["policy"] == 0 and b.rt.counters["policy"] == 0


def test_the_responder_side_acquires_a_pair_too(narrowed):
    """b (IKE responder) sends 10.4 -> 10.1, a pair no CHILD_SA carries: b starts the
    CREATE_CHILD_SA itself, and the packets after it go through."""
    net, clock, a, b = narrowed
    b.tun.inject([ipv4("10.4.0.9", "10.1.0.5", b"first")])
    settle(clock, a, b, until=lambda: any(carries(c) == (("10.4.0.0/24",), ("10.1.0.0/24",))
                                          for c in sending(b, "a")))
    pump(a, b)  # the first packet waited for the CHILD_SA it asked for, then went through it
    assert a.tun.take_written() == [ipv4("10.4.0.9", "10.1.0.5", b"first")]
    b.tun.inject([ipv4("10.4.0.9", "10.1.0.5", b"second")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.4.0.9", "10.1.0.5", b"second")]


def test_inbound_packet_outside_its_sa_selectors_is_dropped(narrowed):
    """RFC 4301 §5.2: a packet that authenticates on SA1 but carries SA2's pair is dropped
    and counted, even though another SA with the same peer would allow it."""
    net, clock, a, b = narrowed
    a.tun.inject([ipv4("10.3.0.5", "10.4.0.7")])
    settle(clock, a, b, until=lambda: len(sending(a, "b")) == 2)
    b.tun.take_written()
    sa1 = next(c for c in sending(a, "b") if carries(c) == (("10.1.0.0/24",), ("10.2.0.0/24",)))
    out = Batch()
    a.rt.inside.protect(sa1, [ipv4("10.3.0.5", "10.4.0.7", b"smuggled")], 0, out)
    a.rt._send(out)
    before = b.rt.counters["policy"]
    pump(b)
    assert b.tun.take_written() == []
    assert b.rt.counters["policy"] == before + 1


def test_partly_covered_pair_is_dropped_without_asking_again(caplog):
    """A pair that overlaps an SA's selectors but is not inside them is what the peer narrowed
    away: counted as ``narrowed``, no CREATE_CHILD_SA (it would get the same answer)."""
    net, clock = FakeNetwork(), FakeClock()
    a = RealNode(net, clock, view("a", A_IP, (A1,), "b", B_IP, (N("10.2.0.0/16"),), True), A_IP)
    b = RealNode(net, clock, view("b", B_IP, (B2,), "a", A_IP, (A1,), False), B_IP)
    a.rt.start()
    b.rt.start()
    settle(clock, a, b, until=lambda: sending(a, "b") and sending(b, "a"))
    (sa1,) = sending(a, "b")
    assert carries(sa1) == (("10.1.0.0/24",), ("10.2.0.0/24",))
    a.tun.inject([ipv4("10.1.0.5", "10.2.9.9", b"outside")])
    pump(a, b)
    assert a.rt.counters["narrowed"] == 1
    assert a.rt.counters.get("child_acquires", 0) == 0
    assert sa1.out_sa.counters["packets_out"] == 0
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.9", b"inside")])
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.9", b"inside")]


def test_rekey_successor_takes_over_exactly_its_selectors(narrowed):
    net, clock, a, b = narrowed
    a.tun.inject([ipv4("10.3.0.5", "10.4.0.7")])
    settle(clock, a, b, until=lambda: len(sending(a, "b")) == 2)
    b.tun.take_written()
    old = {carries(c): c for c in sending(a, "b")}
    sa1 = old[(("10.1.0.0/24",), ("10.2.0.0/24",))]
    assert a.ike.rekey_child(sa1.inbound_spi, clock())
    settle(clock, a, b, until=lambda: sa1 not in sending(a, "b") and len(sending(a, "b")) == 2)
    now = {carries(c): c for c in sending(a, "b")}
    assert set(now) == set(old)
    new1 = now[(("10.1.0.0/24",), ("10.2.0.0/24",))]
    assert new1.rekey_of == sa1.inbound_spi
    assert now[(("10.3.0.0/24",), ("10.4.0.0/24",))] is old[(("10.3.0.0/24",), ("10.4.0.0/24",))]
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x"), ipv4("10.3.0.5", "10.4.0.7", b"y")])
    pump(a, b)
    assert len(b.tun.take_written()) == 2
    assert new1.out_sa.counters["packets_out"] == 1
