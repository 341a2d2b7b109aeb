"""The agent's I/O shell against bad input and lost state, with the
real IkeManager or the toy FakeIke, FakeTun / FakeNetwork and a fake clock.

- a callback that raises is logged once, counted (``internal_errors``), the loop goes on;
- a TUN device that disappears stops the loop cleanly (IKE deletes sent, routes removed);
- an acquire for a peer without endpoints is counted (``no_endpoint``), never raised;
- a proposal typo in one peer's policy refuses that peer only (PeerRefused, policy_errors);
- ESP with an unknown SPI makes the IKE core re-initiate (hint_unknown_spi, RFC 7296 §1.5);
- narrowed CHILD_SA selectors (protocol, ports: RFC 7296 §2.9) are enforced both ways;
- renewed credentials reach IKE: a new IKE_SA presents the new certificate;
- routes never capture our underlay address or tunnel-mode peers' endpoints.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
import threading
from dataclasses import replace

import pytest

from agent.datapath.runtime import Runtime, selector_entries
from agent.datapath.tun import TunGone
from agent.ike.events import ChildSaEstablished
from agent.ike.manager import IkeManager
from agent.ike.message import TrafficSelector
from agent.model import Credentials, NodeView, Peer, PeerPolicy
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock, FakeIke
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, make_view
from tests.ike.conftest import CLASSICAL, T0, make_ca, make_node_cert

PSK = b"hardshell tests psk 0123456789abcdef"
C_IP = "198.51.100.3"
NET_C = ipaddress.ip_network("10.3.0.0/24")


def pump(*nodes, rounds=8):
    for _ in range(rounds):
        for n in nodes:
            n.rt.pump()


class RecordingRoutes:
    """RouteManager stand-in: records sync() calls and shutdown."""

    def __init__(self):
        self.syncs = []
        self.removed = False
        self.closed = False
        self.carve_outs = []

    def sync(self, nets, keep_out=(), cleartext=()):
        self.syncs.append((set(nets), set(keep_out)))

    def set_mtu(self, mtu):
        pass

    def remove_all(self):
        self.removed = True

    def close(self):
        self.closed = True


class Node:
    """One agent: real IkeManager (PSK unless ``creds``) and Runtime on a FakeNetwork."""

    def __init__(self, net, clock, name, ip, view, creds=None, routes=None):
        self.view = view
        self.ike = IkeManager(view, creds or Credentials(psk=PSK), os.urandom, local_address=ip,
                              wall_offset=T0 - clock())
        self.tun = FakeTun()
        self.rt = Runtime(view, self.ike, tun=self.tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                          local_address=ip, clock=clock, routes=routes, wall_clock=lambda: T0 + clock() - 1000.0)


def peer(name, ip, net, initiate=True, policy=CLASSICAL, endpoints=None):
    return Peer(name=name, identity=name, endpoints=(ip,) if endpoints is None else endpoints, subnets=(net,),
                policy=policy, initiate=initiate)


def view(me, ip, net, *peers):
    return NodeView(name=me, identity=me, subnets=(net,), local_address=ip, peers=tuple(peers))


def pair(a_peers=None, b_peers=None, a_creds=None, b_creds=None):
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, view("a", A_IP, NET_A, *(a_peers or [peer("b", B_IP, NET_B)])), a_creds)
    b = Node(net, clock, "b", B_IP, view("b", B_IP, NET_B, *(b_peers or [peer("a", A_IP, NET_A, False)])), b_creds)
    return net, clock, a, b


# ------------------------------------------------------------------ 1. the loop survives bad input

class ExplodingIke(FakeIke):
    def receive_datagram(self, data, local, remote, now):
        raise RuntimeError("boom in the IKE core")


def test_callback_exception_is_logged_once_counted_and_the_loop_keeps_serving(caplog):
    net, clock = FakeNetwork(), FakeClock()
    v = make_view("a", A_IP, NET_A, [("b", B_IP, NET_B, False)])
    ike = ExplodingIke(v, Credentials(psk=b"x"), os.urandom, local_address=A_IP)
    tun = FakeTun()
    rt = Runtime(v, ike, tun=tun, udp500=net.socket(A_IP, 500), udp4500=net.socket(A_IP, 4500),
                 local_address=A_IP, clock=clock)
    other = net.socket(B_IP, 500)
    caplog.set_level(logging.ERROR, logger="meshsec.runtime")
    for _ in range(3):
        other.send_batch([(b"any IKE datagram", (A_IP, 500))])
        rt.pump()  # before the guard: RuntimeError out of pump / run
    assert rt.counters["internal_errors"] == 3
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 1 and "udp500" in logged[0].getMessage() and "boom in the IKE core" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # with its traceback, once
    # still serving: a TUN packet is looked up and counted as before
    tun.inject([ipv4("10.1.0.5", "10.9.9.9")])
    rt.pump()
    assert rt.counters["no_policy"] == 1
    assert rt.status()["internal_errors"] == 3


class DyingTun(FakeTun):
    def __init__(self):
        super().__init__(name="meshsec0")
        self.dead = False

    def read_batch(self, max_packets=64):
        if self.dead:
            raise TunGone("TUN device meshsec0 is gone (File descriptor in bad state; was it deleted with "
                          "`ip link del`?)")
        return super().read_batch(max_packets)


def test_dead_tun_stops_the_loop_cleanly_with_deletes_sent_and_routes_removed(caplog):
    net, clock = FakeNetwork(), FakeClock()
    va = view("a", A_IP, NET_A, peer("b", B_IP, NET_B))
    a = Node(net, clock, "a", A_IP, va, routes=RecordingRoutes())
    a.tun = a.rt.tun = DyingTun()
    b = Node(net, clock, "b", B_IP, view("b", B_IP, NET_B, peer("a", A_IP, NET_A, False)))
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current and "a" in b.rt.current
    caplog.set_level(logging.ERROR, logger="meshsec.runtime")
    t = threading.Thread(target=a.rt.run)
    t.start()
    a.tun.dead = True
    a.tun.inject([b"\x45"])  # makes the fd readable: the loop reads, the read fails
    t.join(5)
    assert not t.is_alive(), "run() must return on a dead TUN device"
    assert a.rt.fatal and "is gone" in a.rt.fatal
    assert a.rt.routes.removed and a.rt.routes.closed
    assert a.rt.counters["internal_errors"] == 0
    assert any("shutting down" in r.getMessage() for r in caplog.records)
    b.rt.pump()  # b got our INFORMATIONAL Delete (RFC 7296 §1.4.1) and dropped its SAs
    assert "a" not in b.rt.current


def test_acquire_for_a_peer_without_endpoints_is_counted_not_raised():
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, view("a", A_IP, NET_A, peer("b", B_IP, NET_B, initiate=False, endpoints=())))
    a.rt.start()
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7"), ipv4("10.1.0.5", "10.2.0.8")])
    a.rt.pump()  # before: ValueError "initiate: peer 'b' has no endpoint" killed the gateway
    assert a.rt.counters["no_endpoint"] == 2 and a.rt.counters["no_sa"] == 0
    assert a.rt.counters["internal_errors"] == 0
    assert a.rt.status()["drops"]["no_endpoint"] == 2


def test_a_proposal_typo_refuses_that_peer_only(caplog):
    bad = replace(CLASSICAL, ike_proposals=("aes128gcm16-prfsha256-x25519-typo",))
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, view("a", A_IP, NET_A, peer("b", B_IP, NET_B)))
    b = Node(net, clock, "b", B_IP, view("b", B_IP, NET_B, peer("a", A_IP, NET_A, False)))
    a.rt.start()
    b.rt.start()
    pump(a, b)
    caplog.set_level(logging.WARNING, logger="meshsec.runtime")
    # a new view adds peer c with a typo in its IKE proposal (an inventory error)
    a.rt.submit_view(replace(a.view, peers=a.view.peers + (peer("c", C_IP, NET_C, policy=bad),), version=2))
    pump(a, b)
    st = a.rt.status()
    assert "c" in st["policy_errors"] and "typo" in st["policy_errors"]["c"]
    assert st["internal_errors"] == 0 and st["view_version"] == 2
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "peer c refused" in r.getMessage()]
    assert len(warn) == 1
    # b still works
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"still here")])
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.7", b"still here")]


# ------------------------------------------------------------------ 2. unknown SPI hints

def test_esp_with_unknown_spi_after_a_peer_restart_brings_the_pair_back():
    net, clock, a, b = pair()
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current
    # b restarts: new IkeManager and runtime, no SAs; it does not initiate to a by itself (a
    # restarted agent joins, IkeManager.join, which is switched off here to test the hint path)
    b2 = Node(net, clock, "b", B_IP, b.view)
    b2.ike.join = lambda now, names=None: []
    b2.rt.start()
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"lost")])
    a.rt.pump()
    b2.rt.pump()  # ESP with an SPI b2 does not know, from a's endpoint
    assert b2.rt.counters["unknown_spi"] == 1
    assert b2.rt.counters["unknown_spi_hints"] == 1  # IkeManager.hint_unknown_spi -> "initiated"
    pump(a, b2, rounds=10)
    assert "a" in b2.rt.current
    b2.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"back")])
    pump(a, b2)
    assert ipv4("10.2.0.7", "10.1.0.5", b"back") in a.tun.take_written()


def test_unknown_spi_from_a_stranger_is_only_counted():
    net, clock, a, b = pair()
    a.rt.start()
    evil = net.socket("198.51.100.66", 4500)
    evil.send_batch([(os.urandom(64), (A_IP, 4500)) for _ in range(3)])
    a.rt.pump()
    assert a.rt.counters["unknown_spi"] == 3 and a.rt.counters["unknown_spi_hints"] == 0
    assert a.ike.counters.get("hint_unknown_address", 0) == 1  # once per source per batch


# ------------------------------------------------------------------ 2. narrowed selectors

def tcp(src, dst, sport, dport, payload=b"x"):
    seg = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x18, 1024, 0, 0) + payload
    return ipv4(src, dst, seg, proto=6)


def udp(src, dst, sport, dport, payload=b"x"):
    return ipv4(src, dst, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, proto=17)


def _ts(net, proto=0, ports=(0, 65535)):
    return TrafficSelector(7, proto, ports[0], ports[1], net.network_address.packed, net.broadcast_address.packed)


def test_selector_entries_none_for_whole_networks_and_ports_for_tcp():
    assert selector_entries("b", "tunnel", [_ts(NET_A)], [_ts(NET_B)]) is None
    (e,) = selector_entries("b", "tunnel", [_ts(NET_A, 6)], [_ts(NET_B, 6, (80, 80))])
    assert (e.protocol, e.local_ports, e.remote_ports, str(e.remote)) == (6, None, (80, 80), str(NET_B))
    (icmp,) = selector_entries("b", "tunnel", [_ts(NET_A, 1, (0x0800, 0x0800))], [_ts(NET_B, 1)])
    assert (icmp.local_ports, icmp.remote_ports) == ((8, 8), (0, 0))  # echo request: type 8, code 0


class NarrowIke(FakeIke):
    """FakeIke whose CHILD_SAs carry selectors narrowed to TCP to/from port 80 on the b side."""

    def _establish(self, peer, *args, **kw):
        super()._establish(peer, *args, **kw)
        ev = self._events[-1]
        me_a = self.view.name == "a"
        lsel = [_ts(self.view.subnets[0], 6, (0, 65535) if me_a else (80, 80))]
        rsel = [_ts(peer.subnets[0], 6, (80, 80) if me_a else (0, 65535))]
        self._events[-1] = replace(ev, local_selectors=tuple(lsel), remote_selectors=tuple(rsel))


def test_narrowed_selectors_are_enforced_outbound_and_inbound():
    net, clock = FakeNetwork(), FakeClock()
    nodes = {}
    for name, ip, mynet, other, onet, init in (("a", A_IP, NET_A, "b", NET_B, True), ("b", B_IP, NET_B, "a", NET_A, False)):
        v = make_view(name, ip, mynet, [(other, B_IP if name == "a" else A_IP, onet, init)])
        ike = NarrowIke(v, Credentials(psk=b"x"), os.urandom, local_address=ip)
        tun = FakeTun()
        nodes[name] = (Runtime(v, ike, tun=tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                               local_address=ip, clock=clock), tun)
    (ra, ta), (rb, tb) = nodes["a"], nodes["b"]
    ra.start()
    rb.start()
    for _ in range(5):
        ra.pump()
        rb.pump()
    assert "b" in ra.current and ra.current["b"].narrow is not None
    web = tcp("10.1.0.5", "10.2.0.7", 40000, 80)
    ta.inject([web, udp("10.1.0.5", "10.2.0.7", 40000, 53), tcp("10.1.0.5", "10.2.0.7", 40000, 22)])
    ra.pump()
    rb.pump()
    assert tb.take_written() == [web]  # before: all three were sent through the SA
    assert ra.counters["policy"] == 2 and ra.counters["esp_out"] == 1
    rows = [e for e in ra.status()["spd"] if e["name"] == "child:b"]
    assert rows and rows[0]["protocol"] == 6 and rows[0]["remote_ports"] == "(80, 80)"
    # inbound: b's side is narrowed the other way round; a UDP packet b's peer slips in is dropped
    reply = tcp("10.2.0.7", "10.1.0.5", 80, 40000)
    rb.pump()
    out_sa = ra.current["b"]  # a's inbound SA: b sends with it; craft b-side packets through b's SA
    tb.inject([reply])
    rb.pump()
    ra.pump()
    assert ta.take_written() == [reply]
    sneaky = rb.current["a"].out_sa.encapsulate_batch([udp("10.2.0.7", "10.1.0.5", 53, 40000)])
    rb.udp4500.send_batch([(x, (A_IP, 4500)) for x in sneaky])
    before = ra.counters["policy"]
    ra.pump()
    assert ta.take_written() == [] and ra.counters["policy"] == before + 1 and out_sa.drops["policy"] >= 1


# ------------------------------------------------------------------ 3. renewed credentials reach IKE

@pytest.fixture(scope="module")
def pki():
    ca = make_ca("meshsec hardshell CA", 7001)
    from cryptography.hazmat.primitives import serialization
    der = ca[1].public_bytes(serialization.Encoding.DER)
    return {"ca": der, "a": make_node_cert(ca, "a", 71), "a_renewed": make_node_cert(ca, "a", 72),
            "b": make_node_cert(ca, "b", 73)}


def creds(pki, who):
    pem, der = pki[who]
    return Credentials(private_key_pem=pem, certificate_chain=(der,), ca_certificates=(pki["ca"],))


def test_renewed_certificate_is_presented_by_new_ike_sas(pki):
    net, clock, a, b = pair(a_creds=creds(pki, "a"), b_creds=creds(pki, "b"))
    a.rt.start()
    b.rt.start()
    pump(a, b)
    (sa,) = [s for s in b.ike._live() if s.peer_name == "a"]
    assert sa.peer_cert_serial == 71
    # the controller watch thread renews: Runtime.submit_credentials from another thread
    t = threading.Thread(target=a.rt.submit_credentials, args=(creds(pki, "a_renewed"),))
    t.start()
    t.join()
    assert a.ike.credentials.certificate_chain != creds(pki, "a_renewed").certificate_chain  # not yet: loop thread
    a.rt.pump()
    assert a.ike.credentials.certificate_chain == creds(pki, "a_renewed").certificate_chain
    assert a.rt.counters["credentials_updates"] == 1
    assert a.rt.status()["child_sas"]  # established SAs stay
    # a new IKE_SA (not a rekey, which keeps the authentication): b restarts and comes back
    clock.advance(1.0)
    b2 = Node(net, clock, "b", B_IP, b.view, creds(pki, "b"))
    b2.rt.start()
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7")])  # ESP with an SPI b2 does not know: it initiates
    pump(a, b2, rounds=10)
    serials = sorted(s.peer_cert_serial for s in b2.ike._live() if s.peer_name == "a")
    assert serials == [72], serials  # IKE_AUTH CERT payload (RFC 7296 §3.6) is the renewed one


# ------------------------------------------------------------------ 5. routes keep underlay addresses out

def test_runtime_keeps_its_address_and_tunnel_peers_endpoints_out_of_the_tun():
    net, clock = FakeNetwork(), FakeClock()
    wide = ipaddress.ip_network("198.51.100.0/24")  # b's subnet covers both underlay addresses
    transport = replace(CLASSICAL, mode="transport")
    routes = RecordingRoutes()
    a = Node(net, clock, "a", A_IP, view("a", A_IP, NET_A, peer("b", B_IP, wide), peer("c", C_IP, NET_C),
                                         peer("h", "10.2.0.9", ipaddress.ip_network("10.2.0.9/32"),
                                              policy=transport)), routes=routes)
    a.rt.start()
    nets, keep = routes.syncs[-1]
    assert wide in nets
    # c's endpoint (inside b's subnet) and our own address stay out of the TUN; b's endpoint is
    # inside b's own subnet (a remote host whose tunnel protects its own address, RFC 4301
    # case 4: traffic to it belongs in b's SA); the transport-mode host's address is captured
    assert keep == {A_IP, C_IP}


def test_status_shows_the_before_first_view_drop_apart_from_drops():
    net, clock = FakeNetwork(), FakeClock()
    v = NodeView(name="a", identity="a", subnets=(), peers=(), local_address=A_IP)
    rt = Runtime(v, FakeIke(v, Credentials(psk=b"x"), os.urandom, local_address=A_IP), tun=FakeTun(),
                 udp500=net.socket(A_IP, 500), udp4500=net.socket(A_IP, 4500), local_address=A_IP, clock=clock,
                 awaiting_view=True)
    net.socket(B_IP, 500).send_batch([(b"IKE_SA_INIT", (A_IP, 500))])
    rt.pump()
    st = rt.status()
    assert "no_view_yet" not in st["drops"] and st["before_first_view"] == {"ike_dropped": 1}
    assert st["view_source"] == "none"
    rt.submit_stored_view(replace(v, version=7))
    rt.pump()
    assert rt.status()["view_source"] == "stored" and rt.view.version == 7
    rt.submit_view(replace(v, version=8))
    rt.submit_stored_view(replace(v, version=7))  # a controller view wins over a stored one
    rt.pump()
    assert rt.status()["view_source"] == "controller" and rt.view.version == 8
