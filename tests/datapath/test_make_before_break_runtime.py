"""Runtime: a policy change (ESP proposal here) on both nodes re-negotiates without a gap:
packets sent during the change all arrive (make before break, issue 9)."""
from __future__ import annotations

from dataclasses import replace

from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_liveness_inbound import _node
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, pump


def _with(view, **kw):
    return replace(view, version=view.version + 1,
                   peers=tuple(replace(p, policy=replace(p.policy, **kw)) for p in view.peers))


def test_traffic_flows_through_a_policy_change():
    net, clock = FakeNetwork(), FakeClock()
    a = _node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = _node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    for _ in range(20):
        pump(a, b, rounds=1)
        clock.advance(0.01)
    old_spi = a.rt.current["b"].in_sa.spi
    a.rt._apply_view(_with(a.rt.view, esp_proposals=("aes256gcm16",)))
    b.rt._apply_view(_with(b.rt.view, esp_proposals=("aes256gcm16",)))
    sent = []
    for i in range(30):  # one packet per round while the new SAs come up and the old ones go
        p = ipv4("10.1.0.5", "10.2.0.7", b"pkt%d" % i)
        sent.append(p)
        a.tun.inject([p])
        pump(a, b, rounds=1)
        clock.advance(0.01)
    pump(a, b)
    assert b.tun.take_written() == sent  # before: dropped (no_sa) for the 2 s re-initiation backoff
    assert a.rt.counters.get("no_sa", 0) == 0
    assert a.rt.current["b"].in_sa.spi != old_spi and len(a.rt.status()["ike_sas"]) == 1
