"""Runtime + real IkeManager: an outbound ESP SA nearing sequence-number exhaustion
(EspSa.needs_rekey, RFC 4303 §3.3.3) makes the runtime call IkeManager.rekey_child once;
the CHILD_SA is rekeyed by CREATE_CHILD_SA (RFC 7296 §1.3.3), traffic moves to the new SA
with no packet lost, and the old SA goes on ChildSaDeleted. An IKE_SA rekey keeps the
CHILD_SAs installed (IkeSaDeleted.rekeyed_to)."""
from __future__ import annotations

import ipaddress
import os

from agent.datapath.runtime import Runtime
from agent.esp import EspSa
from agent.ike.manager import IkeManager
from agent.model import Credentials
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, make_view

SOFT = 6  # sequence number at which the test's EspSa says needs_rekey


class Node:
    def __init__(self, net, clock, name, ip, subnet, peers):
        self.view = make_view(name, ip, subnet, peers)
        self.ike = IkeManager(self.view, Credentials(psk=b"runtime rekey test psk 0123456789"), os.urandom,
                              local_address=ip)
        self.tun = FakeTun()
        self.made = []

        def factory(keys, **kw):
            # only the first CHILD_SA (its two SAs) gets the tiny soft limit
            sa = EspSa(keys, soft_limit=SOFT if len(self.made) < 2 else None, **kw)
            self.made.append(sa)
            return sa
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=net.socket(ip, 500),
                          udp4500=net.socket(ip, 4500), local_address=ip, clock=clock, esp_factory=factory)


def pump(*nodes, rounds=8):
    for _ in range(rounds):
        for n in nodes:
            n.rt.pump()


def _setup():
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current and "a" in b.rt.current
    return net, clock, a, b


def test_needs_rekey_triggers_one_child_sa_rekey_and_no_packet_is_lost():
    net, clock, a, b = _setup()
    first = a.rt.current["b"]
    sent = []
    for i in range(4):  # batches of 3: the soft limit (6) is reached in the 2nd batch
        batch = [ipv4("10.1.0.5", "10.2.0.7", b"pkt%d-%d" % (i, j)) for j in range(3)]
        sent += batch
        a.tun.inject(batch)
        pump(a, b)
    assert b.tun.take_written() == sent  # nothing lost across the rekey
    now_cur = a.rt.current["b"]
    assert now_cur.inbound_spi != first.inbound_spi  # sending on the new CHILD_SA
    assert first.inbound_spi not in a.rt.children  # the old one went with ChildSaDeleted
    assert len(a.rt.children) == len(b.rt.children) == 1
    assert now_cur.outbound_spi == b.rt.current["a"].inbound_spi
    assert now_cur.out_sa.seq_out > 0  # the later batches went out on the new SA


def test_needs_rekey_asks_ike_once_per_child_sa():
    net, clock, a, b = _setup()
    calls = []
    real = a.ike.rekey_child
    a.ike.rekey_child = lambda spi, now: calls.append(spi) or real(spi, now)
    ch = a.rt.current["b"]
    ch.out_sa.needs_rekey = True
    for i in range(3):  # three TUN batches through the same SA: one request, handed over after the batch
        a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x%d" % i)])
        a.rt.pump()
    assert calls == [ch.inbound_spi]


def test_ike_sa_rekey_keeps_the_child_sas_installed():
    net, clock, a, b = _setup()
    before = set(a.rt.children)
    assert a.ike.rekey_ike("b", clock())
    a.rt._flush_ike(clock())
    pump(a, b)
    assert set(a.rt.children) == before and len(b.rt.children) == 1
    (sa,) = a.ike._live()
    assert all((c.ike_spi_i, c.ike_spi_r) == (sa.spi_i, sa.spi_r) for c in a.rt.children.values())
    pkts = [ipv4("10.1.0.5", "10.2.0.7", b"after ike rekey")]
    a.tun.inject(pkts)
    pump(a, b)
    assert b.tun.take_written() == pkts
