"""The hold queue (agent/datapath/hold.py): packets that triggered an acquire wait for
their CHILD_SA, within per-key, byte and age bounds; and in the runtime: what waited
goes out through the new CHILD_SA, what waited too long is dropped and counted."""
from __future__ import annotations

from agent.datapath.hold import HOLD_MAX_AGE_S, HoldQueue
from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, Node, ipv4, pump


def test_holds_in_order_up_to_the_per_key_cap():
    c = {}
    h = HoldQueue(c, max_packets=3)
    assert h.put("b", [b"1", b"2"], 0.0) == 2
    assert h.put("b", [b"3", b"4", b"5"], 0.1) == 1  # the caller counts the 2 left as no_sa
    assert h.put(("b", "10.1.0.0/24", "10.4.0.0/24"), [b"x"], 0.1) == 1  # a pair key: a queue of its own
    assert h.put("c", [b"c1"], 0.1) == 1
    assert len(h) == 5 and c["held"] == 5
    assert h.take("b", 0.2) == [b"1", b"2", b"3", b"x"]  # every key of the peer
    assert h.take("b", 0.2) == [] and len(h) == 1 and h.bytes == 2


def test_byte_cap_over_all_keys():
    h = HoldQueue({}, max_bytes=1000)
    assert h.put("b", [b"a" * 600], 0.0) == 1
    assert h.put("c", [b"b" * 600], 0.0) == 0  # would pass 1000 octets held in all
    assert h.put("c", [b"c" * 400], 0.0) == 1
    assert h.bytes == 1000
    h.take("b", 0.0)
    assert h.bytes == 400


def test_old_packets_expire_and_are_counted():
    c = {}
    h = HoldQueue(c, max_age_s=3.0)
    h.put("b", [b"old"], 0.0)
    h.put("b", [b"new"], 2.5)
    assert h.take("b", 3.2) == [b"new"]
    assert c["held_expired"] == 1 and h.bytes == 0


def test_forget_and_release():
    c = {}
    h = HoldQueue(c)
    h.put("b", [b"1"], 0.0)
    h.put("c", [b"2", b"3"], 0.0)
    h.forget("c")  # the peer left the view
    assert c["held_expired"] == 2
    h.ready.add("b")
    assert h.release(0.5) == [b"1"] and not h.ready and c["held_sent"] == 1


def _mesh():
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    return net, clock, a, b


def test_a_packet_held_longer_than_the_bound_is_dropped_not_sent():
    net, clock, a, b = _mesh()
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"stale")])
    b.rt.pump()  # acquire: held; a does not answer yet
    assert b.rt.counters["held"] == 1
    clock.advance(HOLD_MAX_AGE_S + 0.5)
    pump(a, b)
    assert "a" in b.rt.current
    assert a.tun.take_written() == []  # too old to be "the first packet" of anything
    assert b.rt.counters["held_expired"] == 1 and b.rt.counters["held_sent"] == 0
    assert b.rt.status()["drops"]["held_expired"] == 1


def test_more_than_the_cap_counts_the_rest_as_no_sa_and_the_held_ones_arrive_in_order():
    net, clock, a, b = _mesh()
    pkts = [ipv4("10.2.0.7", "10.1.0.5", b"p%03d" % i) for i in range(100)]
    b.tun.inject(pkts)
    b.rt.pump()
    b.rt.pump()  # two TUN batches (64 packets per read)
    assert (b.rt.counters["held"], b.rt.counters["no_sa"]) == (64, 36)
    pump(a, b)
    assert a.tun.take_written() == pkts[:64]
    assert b.rt.counters["tun_in"] == 100  # held packets are not counted twice


def test_a_peer_that_leaves_the_view_drops_what_waited_for_it():
    net, clock, a, b = _mesh()
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5")])
    b.rt.pump()
    from dataclasses import replace
    b.rt.submit_view(replace(b.view, peers=(), version=b.view.version + 1))
    b.rt.pump()
    assert b.rt.counters["held_expired"] == 1 and len(b.rt.hold) == 0
