"""The runtime reports authenticated inbound ESP to the IKE side (IkeManager.note_inbound), so
liveness checks wait for silence (RFC 7296 §2.4; issue 9). Two runtimes with the real IKE core."""
from __future__ import annotations

import os

from agent.datapath.runtime import Runtime
from agent.ike.manager import IkeManager
from agent.model import Credentials
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, Node, ipv4, make_view, pump


def _node(net, clock, name, ip, subnet, peers):
    n = Node.__new__(Node)
    n.view = make_view(name, ip, subnet, peers)
    n.ike = IkeManager(n.view, Credentials(psk=b"liveness-runtime-psk"), os.urandom, local_address=ip)
    n.tun = FakeTun()
    n.u500, n.u4500 = net.socket(ip, 500), net.socket(ip, 4500)
    n.rt = Runtime(n.view, n.ike, tun=n.tun, udp500=n.u500, udp4500=n.u4500, local_address=ip, clock=clock)
    return n


def _ike_sa(node):
    (sa,) = [sa for sa in node.ike._sas.values() if not sa.is_dead]
    return sa


def test_inbound_esp_moves_the_liveness_deadline_and_garbage_does_not():
    net, clock = FakeNetwork(), FakeClock()
    a = _node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = _node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    for _ in range(20):
        pump(a, b, rounds=1)
        clock.advance(0.01)
    assert "b" in a.rt.current and "a" in b.rt.current
    sa = _ike_sa(a)
    before = sa.next_timer()
    assert before == sa.last_received + 30.0  # dpd_interval_s default
    clock.advance(20.0)
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"alive")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.2.0.7", "10.1.0.5", b"alive")]
    assert sa.last_inbound == clock() and sa.next_timer() == clock() + 30.0
    # an ESP packet that fails its ICV proves nothing
    t = clock()
    clock.advance(5.0)
    ch = a.rt.current["b"]
    forged = ch.in_sa.spi.to_bytes(4, "big") + (10 ** 6).to_bytes(4, "big") + os.urandom(60)
    net.deliver((B_IP, 4500), (A_IP, 4500), forged)
    pump(a)
    assert ch.in_sa.counters.get("icv", 0) == 1 and sa.last_inbound == t
