"""Authenticated ESP from a rebound NAT port moves the ESP destination (issue 9; RFC 3948,
RFC 7296 §2.23 "as for IKE"): real IkeManagers on both sides, default UDP encapsulation
(each side sees the other as behind a NAT), in memory."""
from __future__ import annotations

import logging

import pytest

from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, ipv4, pump, real_pair

pytest.importorskip("agent.ike.manager")
NEW = (A_IP, 61000)


@pytest.fixture
def pair():
    net, clock = FakeNetwork(), FakeClock()
    a, b = real_pair(net, clock)
    assert b.rt.current["a"].udp_encap and b.rt.current["a"].remote == (A_IP, 4500)
    return net, clock, a, b


def rebind(net, a):
    """a's NAT gives it a new public port; the old mapping is gone."""
    del net.endpoints[(A_IP, 4500)]
    a.u4500.local = NEW
    net.endpoints[NEW] = a.u4500


def test_authenticated_esp_from_a_new_port_moves_the_sa_and_the_ike_sa(pair, caplog):
    net, clock, a, b = pair
    rebind(net, a)
    caplog.set_level(logging.INFO, logger="meshsec.runtime")
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"from-new-port")])
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.7", b"from-new-port")]
    assert b.rt.current["a"].remote == NEW
    assert b.rt.counters["esp_followed"] == 1
    (ike,) = [s for s in b.ike.status() if s.get("peer") == "a"]
    assert "61000" in str(ike["remote"]), ike
    assert any("NAT mapping moved" in r.getMessage() for r in caplog.records)
    # the reply reaches a at once, without waiting for an IKE message
    lost = net.undeliverable
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"reply")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.2.0.7", "10.1.0.5", b"reply")]
    assert net.undeliverable == lost


def _esp_to_b(net, a, payload):
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", payload)])
    start = len(net.log)
    a.rt.pump()
    return [d for s, dst, d in net.log[start:] if dst == (B_IP, 4500)][-1]


def test_forged_or_replayed_esp_from_a_new_port_moves_nothing(pair):
    net, clock, a, b = pair
    esp = _esp_to_b(net, a, b"genuine")
    b.rt.pump()
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.7", b"genuine")]
    forged = esp[:-1] + bytes([esp[-1] ^ 1])
    b.u4500.inject([(forged, NEW), (esp, NEW)])  # bad ICV, then a replay
    b.rt.pump()
    assert b.tun.take_written() == []
    assert b.rt.current["a"].remote == (A_IP, 4500)
    assert b.rt.counters.get("esp_followed", 0) == 0


def test_a_batch_from_the_old_and_a_new_address_decides_nothing(pair):
    """One of the sources may be a forgery that failed: a group from several addresses
    never moves the SA (and the old address is in it anyway)."""
    net, clock, a, b = pair
    three, four = _esp_to_b(net, a, b"three"), _esp_to_b(net, a, b"four")
    b.u4500.recv_batch(64)  # take what was delivered; re-inject from two addresses in one batch
    b.u4500.inject([(three, (A_IP, 4500)), (four, NEW)])
    b.rt.pump()
    assert len(b.tun.take_written()) == 2
    assert b.rt.current["a"].remote == (A_IP, 4500)
    assert b.rt.counters.get("esp_followed", 0) == 0
