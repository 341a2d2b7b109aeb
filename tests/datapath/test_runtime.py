"""Runtime loop with FakeTun / FakeUdp / a fake clock: two nodes wired in memory."""
from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from agent.datapath.runtime import Runtime
from agent.model import Credentials, NodeView, Peer
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock, FakeIke

A_IP, B_IP, EVIL_IP = "198.51.100.1", "198.51.100.2", "198.51.100.66"
NET_A, NET_B = ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("10.2.0.0/24")


def ipv4(src: str, dst: str, payload: bytes = b"hello", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + payload


def make_view(me: str, ip: str, net, peers) -> NodeView:
    return NodeView(name=me, identity=me, subnets=(net,), local_address=ip, peers=tuple(
        Peer(name=n, identity=n, endpoints=(pip,), subnets=(pnet,), initiate=init) for n, pip, pnet, init in peers))


class Node:
    def __init__(self, net: FakeNetwork, clock, name, ip, subnet, peers):
        self.view = make_view(name, ip, subnet, peers)
        self.ike = FakeIke(self.view, Credentials(psk=b"x"), os.urandom, local_address=ip)
        self.tun = FakeTun()
        self.u500 = net.socket(ip, 500)
        self.u4500 = net.socket(ip, 4500)
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=self.u500, udp4500=self.u4500,
                          local_address=ip, clock=clock)


@pytest.fixture
def mesh():
    net = FakeNetwork()
    clock = FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    return net, clock, a, b


def pump(*nodes, rounds: int = 5) -> None:
    for _ in range(rounds):
        for n in nodes:
            n.rt.pump()


def establish(a, b):
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current and "a" in b.rt.current


def test_establish_and_traffic_both_ways(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    pkts = [ipv4("10.1.0.5", "10.2.0.7", bytes([i]) * (50 + i)) for i in range(10)]
    a.tun.inject(pkts)
    pump(a, b)
    assert b.tun.take_written() == pkts
    back = [ipv4("10.2.0.7", "10.1.0.5", b"reply%d" % i) for i in range(3)]
    b.tun.inject(back)
    pump(a, b)
    assert a.tun.take_written() == back
    # Wire: ESP-in-UDP from 4500 to 4500, no inner plaintext visible.
    esp = [(s, d, p) for s, d, p in net.log if s[1] == 4500 and p[:4] != b"\0\0\0\0"]
    assert len(esp) == 13 and all(d[1] == 4500 for _, d, _ in esp)
    assert not any(b"reply" in p for _, _, p in esp)
    st = a.rt.status()
    (ch,) = st["child_sas"]
    assert ch["peer"] == "b" and ch["packets_out"] == 10 and ch["packets_in"] == 3
    assert ch["bytes_in"] == sum(len(p) for p in back)


def test_no_sa_triggers_initiate_and_holds_the_packet_until_the_sa_is_up(mesh):
    net, clock, a, b = mesh
    # b does not initiate at start; traffic from b's side is an acquire (RFC 4301 §5.1).
    first = ipv4("10.2.0.7", "10.1.0.5")
    b.tun.inject([first])
    b.rt.pump()
    assert (b.rt.counters["held"], b.rt.counters["no_sa"]) == (1, 0)  # held, not dropped
    assert b.ike.initiate_calls == ["a"]
    pump(a, b)
    assert "a" in b.rt.current  # the acquire brought the SA up
    assert a.tun.take_written() == [first]  # the packet that asked for it went through it
    assert b.rt.counters["held_sent"] == 1
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"second")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.2.0.7", "10.1.0.5", b"second")]


def test_no_policy_and_malformed_tun_packets_are_counted(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    a.tun.inject([ipv4("10.1.0.5", "10.9.0.1"), b"\x45\x00", b"\x75" + bytes(30)])
    a.rt.pump()
    assert a.rt.counters["no_policy"] == 1
    assert a.rt.counters["malformed"] == 2


def test_garbage_from_third_address_counted_others_unaffected(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    evil = net.socket(EVIL_IP, 4500)
    evil500 = net.socket(EVIL_IP, 500)
    evil.send_batch([(os.urandom(100), (A_IP, 4500)) for _ in range(5)])   # random "ESP"
    evil.send_batch([(b"\x00\x00\x00\x00" + b"garbage-ike" * 4, (A_IP, 4500))])  # marker + junk IKE
    evil.send_batch([(b"\x01\x02", (A_IP, 4500)), (b"\xff", (A_IP, 4500))])  # short, keepalive
    evil500.send_batch([(b"junk", (A_IP, 500))])
    a.rt.pump()
    c = a.rt.counters
    assert c["unknown_spi"] == 5 and c["malformed"] == 1 and c["keepalives"] == 1
    assert a.ike.counters["malformed"] == 2
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"still-works")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.2.0.7", "10.1.0.5", b"still-works")]


def _esp_to_b(net):
    return [(s, p) for s, d, p in net.log if d == (B_IP, 4500) and p[:4] != b"\0\0\0\0"]


def test_replay_and_forged_icv_counted(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"once")])
    pump(a, b)
    assert len(b.tun.take_written()) == 1
    src, esp = _esp_to_b(net)[-1]
    b.u4500.inject([(esp, src)])  # replay
    forged = bytearray(esp)
    forged[4:8] = struct.pack("!I", 77)  # fresh sequence number: passes the window, fails the ICV
    forged[-1] ^= 1
    b.u4500.inject([(bytes(forged), src)])
    b.rt.pump()
    assert b.tun.take_written() == []
    (ch,) = b.rt.status()["child_sas"]
    assert ch["drops"] == {"replay": 1, "icv": 1}
    assert b.rt.status()["drops"] == {"replay": 1, "icv": 1}


def test_unknown_spi_counted(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    b.u4500.inject([(struct.pack("!II", 0xDEADBEEF, 1) + bytes(40), (A_IP, 4500))])
    b.rt.pump()
    assert b.rt.counters["unknown_spi"] == 1 and b.tun.take_written() == []


def test_inbound_policy_check(mesh):
    """A packet that decrypts fine but whose inner src is outside the SA's TS is dropped."""
    net, clock, a, b = mesh
    establish(a, b)
    ch = a.rt.current["b"]
    spoof = ch.out_sa.encapsulate_batch([ipv4("10.66.0.1", "10.2.0.7", b"spoof")])
    b.u4500.inject([(spoof[0], (A_IP, 4500))])
    b.rt.pump()
    assert b.tun.take_written() == []
    assert b.rt.counters["policy"] == 1
    assert b.rt.status()["child_sas"][0]["drops"] == {"policy": 1}


def test_retransmit_via_timer(mesh):
    net, clock, a, b = mesh
    a.rt.start()
    inits = [p for s, d, p in net.log if d == (B_IP, 500)]
    assert len(inits) == 1
    clock.advance(1.5)
    a.rt.pump()  # timer due -> handle_timer -> retransmission sent
    assert len([p for s, d, p in net.log if d == (B_IP, 500)]) == 2


def test_view_update_adds_and_removes_peer(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    a.rt.submit_view(make_view("a", A_IP, NET_A, []))
    a.rt.pump()
    assert a.rt.current == {} and a.rt.children == {}
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7")])
    a.rt.pump()
    assert a.rt.counters["no_policy"] == 1


def test_shutdown_deletes_and_closes(mesh):
    net, clock, a, b = mesh
    establish(a, b)
    a.rt.shutdown()
    assert a.tun.closed
    b.rt.pump()
    assert b.rt.current == {}  # the peer saw our delete


def test_ike_on_4500_gets_marker(mesh):
    """Datagrams the IKE core sends from port 4500 carry the non-ESP marker; received ones lose it."""
    net, clock, a, b = mesh
    from tests.datapath.fakes import Datagram
    a.ike._out.append(Datagram(FakeIke.MAGIC + b"{}" + b" " * 40, (A_IP, 4500), (B_IP, 4500)))
    a.rt.pump()
    (s, d, p) = net.log[-1]
    assert s == (A_IP, 4500) and p.startswith(b"\0\0\0\0" + FakeIke.MAGIC)
    b.rt.pump()
    assert b.ike.counters["malformed"] == 1  # reached the IKE core without the marker (json lacks fields)


# -- with the real IKE core --------------------------------------------------

def _real_node(net, clock, name, ip, subnet, peers):
    from agent.ike.manager import IkeManager
    n = Node.__new__(Node)
    n.view = make_view(name, ip, subnet, peers)
    n.ike = IkeManager(n.view, Credentials(psk=b"runtime-test-psk"), os.urandom, local_address=ip)
    n.tun = FakeTun()
    n.u500 = net.socket(ip, 500)
    n.u4500 = net.socket(ip, 4500)
    n.rt = Runtime(n.view, n.ike, tun=n.tun, udp500=n.u500, udp4500=n.u4500, local_address=ip, clock=clock)
    return n


def real_pair(net, clock, before_start=None):
    """Two runtimes with the real IKE core, a initiating to b, pumped until both have a
    CHILD_SA (AssertionError with both statuses if not within 20 rounds of 10 ms).
    ``before_start(a, b)`` runs before the runtimes start (e.g. to attach metrics)."""
    a = _real_node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = _real_node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    if before_start is not None:
        before_start(a, b)
    a.rt.start()
    b.rt.start()
    for _ in range(20):
        pump(a, b, rounds=1)
        clock.advance(0.01)
        if "b" in a.rt.current and "a" in b.rt.current:
            break
    assert "b" in a.rt.current and "a" in b.rt.current, (a.rt.status(), b.rt.status())
    return a, b


def test_real_ike_establishes_and_carries_traffic():
    pytest.importorskip("agent.ike.manager")
    net, clock = FakeNetwork(), FakeClock()
    a, b = real_pair(net, clock)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"real-ike")])
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.7", b"real-ike")]
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"back")])
    pump(a, b)
    assert a.tun.take_written() == [ipv4("10.2.0.7", "10.1.0.5", b"back")]
    st = a.rt.status()
    assert len(st["ike_sas"]) == 1 and st["ike_sas"][0]["peer"] == "b"
    assert st["child_sas"][0]["packets_out"] == 1 and st["child_sas"][0]["packets_in"] == 1
    # Shutdown: delete reaches b, whose SAs go away.
    a.rt.shutdown()
    pump(b)
    assert b.rt.current == {}


def test_ike_before_the_first_view_is_dropped_then_retransmission_succeeds():
    """Controller mode: until the first view arrives the agent knows no peer;
    IKE requests are dropped and counted (not refused), and the initiator's
    retransmission establishes once the view is there."""
    pytest.importorskip("agent.ike.manager")
    from agent.ike.manager import IkeManager
    net, clock = FakeNetwork(), FakeClock()
    a = _real_node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = _real_node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    full_view_b = b.view
    empty = NodeView(name="b", identity="b", subnets=(), peers=(), local_address=B_IP)
    b.ike = IkeManager(empty, Credentials(psk=b"runtime-test-psk"), os.urandom, local_address=B_IP)
    b.rt = Runtime(empty, b.ike, tun=b.tun, udp500=b.u500, udp4500=b.u4500, local_address=B_IP,
                   clock=clock, awaiting_view=True)
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert b.rt.counters["no_view_yet"] >= 1
    assert b.ike.counters.get("auth_failed", 0) == 0
    b.rt.submit_view(full_view_b)
    for _ in range(40):
        clock.advance(0.5)
        pump(a, b, rounds=2)
        if "b" in a.rt.current and "a" in b.rt.current:
            break
    assert "b" in a.rt.current and "a" in b.rt.current



@pytest.mark.parametrize("action,counter", [("discard", "discard"), ("bypass", None)])
def test_controller_actions_bypass_and_discard_reach_the_spd(action, counter):
    """A pair the controller set to DISCARD is dropped and counted (never an acquire); one set
    to BYPASS is not captured at all: its SPD entry is BYPASS and no route sends it into the
    TUN (RFC 4301 §4.4.1)."""
    from dataclasses import replace
    from agent.model import PeerPolicy
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    view = replace(a.view, peers=tuple(replace(p, policy=PeerPolicy(action=action)) for p in a.view.peers))

    class Routes:
        synced = None

        def sync(self, nets, **kw):
            Routes.synced = set(nets)

    a.rt = Runtime(view, a.ike, tun=a.tun, udp500=a.u500, udp4500=a.u4500, local_address=A_IP,
                   clock=clock, routes=Routes())
    a.rt.start()
    rows = [r for r in a.rt.status()["spd"] if "b" in str(r.get("name", ""))]
    assert rows and all(r["action"].upper() == action.upper() for r in rows), rows
    calls = len(a.ike.initiate_calls)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7")])
    pump(a)
    assert len(a.ike.initiate_calls) == calls, "no acquire for a pair that is not PROTECT"
    if counter:
        assert a.rt.counters[counter] == 1 and a.rt.counters["no_sa"] == 0
    assert Routes.synced is not None, "the runtime must sync its routes at start"
    assert (NET_B in Routes.synced) == (action != "bypass")


def test_inbound_batches_name_the_ike_sas_whose_child_sas_authenticated_traffic(mesh):
    """Batch.inbound_ike_sas: the IKE_SAs (SPIi, SPIr) of CHILD_SAs that authenticated at least
    one inbound packet in the batch (for IKE liveness); forged or unknown ESP adds nothing."""
    from agent.datapath.batch import Batch

    net, clock, a, b = mesh
    establish(a, b)
    seen = []
    finish = b.rt._finish
    b.rt._finish = lambda out: (seen.append(set(out.inbound_ike_sas)), finish(out))[1]
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"alive")])
    pump(a, b)
    ch = b.rt.current["a"]
    assert {(ch.ike_spi_i, ch.ike_spi_r)} in seen
    (esp,) = a.rt.current["b"].out_sa.encapsulate_batch([ipv4("10.1.0.5", "10.2.0.7", b"x")])
    forged = esp[:-1] + bytes([esp[-1] ^ 1])
    unknown = b"\x00\x00\x99\x99" + esp[4:]
    out = Batch()
    b.rt.outside.udp4500([(forged, (A_IP, 4500)), (unknown, (A_IP, 4500))], out)
    assert out.inbound_ike_sas == set() and out.tun == [] and b.rt.counters["unknown_spi"] == 1
    assert ch.in_sa.counters["icv"] == 1
    out = Batch()
    b.rt.outside.udp4500([(esp, (A_IP, 4500))], out)
    assert out.inbound_ike_sas == {(ch.ike_spi_i, ch.ike_spi_r)} and len(out.tun) == 1


def test_interleaved_batch_keeps_order_and_counts_exact(mesh):
    """One TUN batch mixing protected packets with no-policy and malformed ones: the protected
    ones go through in order (one group, however interleaved), the rest are counted."""
    net, clock, a, b = mesh
    establish(a, b)
    good = [ipv4("10.1.0.5", "10.2.0.7", b"p%d" % i) for i in range(4)]
    other = ipv4("10.1.0.5", "10.2.0.9", b"same entry, other host")
    batch = [good[0], ipv4("10.1.0.5", "10.9.0.1"), good[1], b"\x45\x00", other, good[2],
             ipv4("10.1.0.5", "10.9.0.2"), good[3]]
    a.tun.inject(batch)
    pump(a, b)
    assert b.tun.take_written() == [good[0], good[1], other, good[2], good[3]]
    assert (a.rt.counters["no_policy"], a.rt.counters["malformed"]) == (2, 1)
    (ch,) = a.rt.status()["child_sas"]
    assert ch["packets_out"] == 5
