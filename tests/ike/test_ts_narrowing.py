"""Traffic selector narrowing (RFC 7296 §2.9, docs/ike-hardening.md), sans-I/O: the
intersection of each field (protocol, ports, address ranges), a responder that narrows
and never widens, an initiator that refuses a widened reply, TS_UNACCEPTABLE when
nothing is left.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace

from agent.iana import PayloadType
from agent.ike import child as ch
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRefused, IkeSaDeleted
from agent.ike.message import TrafficSelector
from agent.ike.tasks.ike_auth import IkeAuth

from tests.ike.conftest import A_NET, B_NET
from tests.ike.helpers import inner, psk_net


# ------------------------------------------------------------------ 6. traffic selectors

def _ts(proto, p1, p2, a, b):
    a, b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return TrafficSelector(7 if a.version == 4 else 8, proto, p1, p2, a.packed, b.packed)


def test_ts_intersection_of_each_field():
    anyv4 = _ts(0, 0, 65535, "0.0.0.0", "255.255.255.255")
    # protocol: any meets 6 -> 6; 6 meets 17 -> nothing
    assert ch.ts_intersect(_ts(6, 0, 65535, "10.0.0.0", "10.0.0.255"), anyv4) == _ts(6, 0, 65535, "10.0.0.0", "10.0.0.255")
    assert ch.ts_intersect(_ts(6, 0, 65535, "10.0.0.0", "10.0.0.255"), _ts(17, 0, 65535, "10.0.0.0", "10.0.0.255")) is None
    # ports: [80, 443] meets [400, 1000] -> [400, 443]; disjoint -> nothing; OPAQUE meets only OPAQUE or any
    assert ch.ts_intersect(_ts(6, 80, 443, "10.0.0.1", "10.0.0.1"), _ts(6, 400, 1000, "10.0.0.0", "10.0.0.9")) \
        == _ts(6, 400, 443, "10.0.0.1", "10.0.0.1")
    assert ch.ts_intersect(_ts(6, 80, 80, "10.0.0.1", "10.0.0.1"), _ts(6, 81, 90, "10.0.0.1", "10.0.0.1")) is None
    assert ch.ts_intersect(_ts(6, 65535, 0, "10.0.0.1", "10.0.0.1"), _ts(6, 80, 80, "10.0.0.1", "10.0.0.1")) is None
    assert ch.ts_intersect(_ts(6, 65535, 0, "10.0.0.1", "10.0.0.1"), anyv4) == _ts(6, 65535, 0, "10.0.0.1", "10.0.0.1")
    # addresses: ranges, not only CIDR blocks
    assert ch.ts_intersect(_ts(0, 0, 65535, "10.0.0.5", "10.0.0.20"), _ts(0, 0, 65535, "10.0.0.10", "10.0.1.0")) \
        == _ts(0, 0, 65535, "10.0.0.10", "10.0.0.20")
    assert ch.ts_intersect(_ts(0, 0, 65535, "10.0.0.5", "10.0.0.9"), _ts(0, 0, 65535, "10.0.0.10", "10.0.1.0")) is None
    # IPv4 never meets IPv6
    assert ch.ts_intersect(_ts(0, 0, 65535, "::", "::ffff"), anyv4) is None
    assert ch.narrow_ts([_ts(6, 80, 80, "10.9.0.1", "10.9.0.1")], ch.ts_from_networks([A_NET])) == []
    assert ch.ts_within([_ts(6, 80, 80, "10.1.0.1", "10.1.0.1")], ch.ts_from_networks([A_NET]))
    assert not ch.ts_within([_ts(0, 0, 65535, "10.1.0.1", "10.1.0.1")], [_ts(6, 0, 65535, "10.1.0.0", "10.1.255.255")])


def _a_proposes(monkeypatch, make):
    """A's IKE_AUTH proposes the selectors ``make(networks)`` instead of whole networks."""
    orig = IkeAuth.start

    def patched(task, now):
        if task.sa.initiator and task.sa.cfg.identity == "node-a":
            with monkeypatch.context() as mp:
                mp.setattr(ch, "ts_from_networks", make)
                return orig(task, now)
        return orig(task, now)
    monkeypatch.setattr(IkeAuth, "start", patched)


def test_responder_narrows_protocol_and_ports_and_returns_no_wider_selectors(monkeypatch):
    """HDR, SK {..., TSi(TCP 80-443, 10.1.0.0/16), TSr(TCP 80-443, 10.0.0.0/8)} -->
    <-- HDR, SK {..., TSi(TCP 80-443, 10.1.0.0/16), TSr(TCP 80-443, 10.2.0.0/16)}."""
    def web(nets):
        return tuple(replace(TrafficSelector.from_network(x), ip_protocol=6, start_port=80, end_port=443)
                     for x in nets)
    _a_proposes(monkeypatch, web)
    n = psk_net(b={"my_net": B_NET}, a={"peer_net": ipaddress.ip_network("10.0.0.0/8")})
    n.a.initiate("node-b", n.now)
    n.pump()
    auth_resp = [d for s, d in n.log if s == "b"][1]
    _msg, pl = inner(n, auth_resp.data)
    tsi = next(p for p in pl if p.payload_type == PayloadType.TSi)
    tsr = next(p for p in pl if p.payload_type == PayloadType.TSr)
    assert [(s.ip_protocol, s.start_port, s.end_port) for s in (*tsi.selectors, *tsr.selectors)] == [(6, 80, 443)] * 2
    assert tsr.selectors[0].networks() == [B_NET]  # narrowed from 10.0.0.0/8
    (cb,) = n.of("b", ChildSaEstablished)
    assert cb.remote_selectors == tsi.selectors and cb.local_ts == (B_NET,)
    (ca,) = n.of("a", ChildSaEstablished)
    assert ca.local_selectors == tsi.selectors and ca.remote_ts == (B_NET,)


def test_initiator_refuses_a_responder_that_widens_the_protocol(monkeypatch):
    def udp53(nets):
        return tuple(replace(TrafficSelector.from_network(x), ip_protocol=17, start_port=53, end_port=53)
                     for x in nets)
    _a_proposes(monkeypatch, udp53)
    monkeypatch.setattr(ch, "narrow_ts", lambda proposed, allowed: list(allowed))  # a careless responder
    n = psk_net()
    n.a.initiate("node-b", n.now)
    n.pump()
    # the IKE_SA stays (§1.2); the CHILD_SA B installed is deleted again, and retried later
    assert not n.of("a", IkeSaDeleted) and not n.of("a", ChildSaEstablished)
    assert [(e.reason, e.notify) for e in n.of("a", ChildSaRefused)] == [
        ("CHILD_SA refused: responder widened the traffic selectors", None)]
    assert len(n.of("b", ChildSaDeleted)) == 1 and not n.b._live()[0].children


def test_responder_ts_unacceptable_when_the_intersection_is_empty(monkeypatch):
    def elsewhere(nets):
        return tuple(TrafficSelector.from_network(ipaddress.ip_network("10.77.0.0/16")) for _ in nets)
    _a_proposes(monkeypatch, elsewhere)
    n = psk_net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", IkeSaDeleted)
    assert [e.reason for e in n.of("a", ChildSaRefused)] == ["CHILD_SA refused: TS_UNACCEPTABLE"]
