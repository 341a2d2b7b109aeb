"""agent.datapath.policy: a NodeView becomes the SPD (RFC 4301 §4.4.1) the runtime uses:
BYPASS prefixes first, CHILD_SA entries and view entries most specific first, the
controller's action per peer; SA bundles (RFC 4301 §4.5) follow from the SPD."""
from __future__ import annotations

import ipaddress
import os

from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from agent.datapath.policy import Policy
from agent.esp import Action, EspSa, Sad
from agent.esp.sad import ChildEntry
from agent.iana import EncrId
from agent.model import EspKeys, NodeView, Peer, PeerPolicy

N = ipaddress.ip_network
ME = "198.51.100.1"
VIEW = NodeView(
    name="a", identity="a", subnets=(N("10.1.0.0/16"), N("fd00:1::/48")), local_address=ME,
    peers=(
        Peer("b", "b", ("198.51.100.2",), (N("10.2.0.0/16"), N("fd00:2::/48"))),
        Peer("x", "x", ("198.51.100.4",), (N("10.2.7.0/24"),), PeerPolicy(action="discard")),
        Peer("y", "y", ("198.51.100.6",), (N("10.2.8.0/24"),), PeerPolicy(action="bypass")),
        Peer("gw", "gw", ("203.0.113.9",), (N("198.51.100.0/24"),)),
    ))


def pkt(dst: str, src: str = "10.1.0.1") -> bytes:
    return raw(IP(src=src, dst=dst) / UDP(sport=1, dport=2))


def child(peer: str, spi: int, local: str, remote: str, remote_ip: str) -> ChildEntry:
    k = EspKeys(spi, int(EncrId.ENCR_AES_GCM_16), bytes(20))
    return ChildEntry(peer=peer, ike_spi_i=1, ike_spi_r=2, inbound_spi=spi, outbound_spi=spi + 1,
                      in_sa=EspSa(k, rng=os.urandom), out_sa=EspSa(k, rng=os.urandom), local_ts=(N(local),), remote_ts=(N(remote),),
                      remote=(remote_ip, 4500), mode="tunnel", udp_encap=True,
                      algorithms="ENCR_AES_GCM_16_128/NO_ESN", established=0.0, established_wall=0.0)


def test_view_becomes_the_spd_most_specific_first_with_the_controllers_actions():
    policy = Policy(Sad(), local_address=ME, bypass=["10.2.0.5/32"])
    policy.apply_view(VIEW)
    spd = policy.spd
    assert spd.entries[0].name == "bypass:10.2.0.5/32"  # BYPASS first, whatever its prefix
    names = [e.name for e in spd.entries if e.remote.version == 4]
    assert names.index("view:x") < names.index("view:b")  # /24 before /16
    assert spd.lookup_outbound(pkt("10.2.0.5")).action is Action.BYPASS
    assert spd.lookup_outbound(pkt("10.2.7.7")).action is Action.DISCARD
    assert spd.lookup_outbound(pkt("10.2.8.7")).action is Action.BYPASS  # a BYPASS peer
    hit = spd.lookup_outbound(pkt("10.2.9.7"))
    assert (hit.action, hit.peer, hit.name) == (Action.PROTECT, "b", "view:b")
    assert spd.lookup_outbound(pkt("10.9.0.1")) is spd.default_entry  # no policy: DISCARD


def test_child_sa_entries_join_the_spd_and_bundles_follow_it():
    sad = Sad()
    policy = Policy(sad, local_address=ME, underlay_mtu=1500)
    policy.apply_view(VIEW)
    # b's SA is sent to 198.51.100.2, inside gw's subnet: gw's SA carries it (iterated processing)
    sad.add(child("gw", 0x10, "198.51.100.1/32", "198.51.100.0/24", "203.0.113.9"))
    sad.add(child("b", 0x20, "10.1.0.0/16", "10.2.0.0/16", "198.51.100.2"))
    policy.rebuild(VIEW)
    assert [e.name for e in policy.spd.entries].count("child:b") == 1
    b, gw = sad.current["b"], sad.current["gw"]
    assert b.via == "gw" and gw.via is None and policy.nest_in
    assert b.max_inner == 1500 - b.overhead - gw.overhead < gw.max_inner == 1500 - gw.overhead
    assert policy.carrier("198.51.100.2", "b") == "gw" and policy.carrier("203.0.113.9", "gw") is None
    sad.remove(gw)
    policy.rebuild(VIEW)
    assert b.via is None and b.max_inner == 1500 - b.overhead
