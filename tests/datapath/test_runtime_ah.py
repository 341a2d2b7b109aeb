"""AH in the runtime (RFC 4302), in memory: AH transport and tunnel, "ah+esp" (ESP then AH,
RFC 4301 §4.5), tampering, missing layers. AH ICVs are checked with scapy's AH (not ours)."""
from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.ipsec import AH, ESP, SecurityAssociation
from scapy.packet import Raw, raw

from agent.datapath.batch import Batch
from agent.datapath.runtime import Runtime
from agent.iana import EncrId, IntegId
from agent.ike.events import ChildSaEstablished
from agent.model import EspKeys, NodeView, Peer, PeerPolicy

from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.test_runtime_rfc4301 import ScriptedIke, install

A, B = "198.51.100.11", "198.51.100.12"
NET = ipaddress.ip_network


def ah_keys(spi: int, esn=False) -> EspKeys:
    return EspKeys(spi, 0, b"", int(IntegId.AUTH_HMAC_SHA2_256_128), bytes([spi & 0xFF]) * 32, esn)


def esp_keys(spi: int) -> EspKeys:
    return EspKeys(spi, int(EncrId.ENCR_AES_GCM_16), bytes([spi & 0xFF]) * 20)


def ev(peer, k_in, k_out, me, other, mode="transport", alg="AH/AUTH_HMAC_SHA2_256_128/NO_ESN"):
    return ChildSaEstablished(peer=peer, ike_spi_i=1, ike_spi_r=2, inbound=k_in, outbound=k_out,
                              local_ts=(NET(me + "/32"),), remote_ts=(NET(other + "/32"),), mode=mode,
                              udp_encap=False, local=(me, 500), remote=(other, 500), algorithms=alg,
                              protocol="esp" if k_in.encr_id else "ah")


def node(net, me, other, peer_name, protocol, mode="transport"):
    view = NodeView(name=me, identity=me, subnets=(NET(me + "/32"),), local_address=me, peers=(
        Peer(name=peer_name, identity=peer_name, endpoints=(other,), subnets=(NET(other + "/32"),),
             policy=PeerPolicy(mode=mode, protocol=protocol, encapsulation="none"), initiate=False),))
    ike, tun = ScriptedIke(), FakeTun(mtu=1400)
    rt = Runtime(view, ike, tun=tun, udp500=net.socket(me, 500), udp4500=net.socket(me, 4500),
                 local_address=me, raw_esp=net.raw(me, 50))
    rt.start()
    return rt, ike, tun


def pair(protocol, mode="transport"):
    net = FakeNetwork()
    a = node(net, A, B, "b", protocol, mode)
    b = node(net, B, A, "a", protocol, mode)
    install(a[0], a[1], ev("b", ah_keys(0x1001), ah_keys(0x2002), A, B, mode))
    install(b[0], b[1], ev("a", ah_keys(0x2002), ah_keys(0x1001), B, A, mode))
    return net, a, b


def ping(src=A, dst=B, ident=0):
    return raw(IP(src=src, dst=dst, id=ident, flags="DF") / ICMP() / Raw(b"integrity only"))


def test_ah_transport_on_the_wire_verified_by_scapy_and_delivered():
    net, (a, _, ta), (b, _, tb) = pair("ah")
    assert a.raw_ah is not None and a.raw_ah.hdrincl  # opened next to the raw ESP socket
    ta.inject([ping()])
    a.pump()
    b.pump()
    (wire,) = [p for s, d, p in net.log if d == (B, -51)]
    w = IP(wire)
    assert w.proto == 51 and w[AH].spi == 0x2002 and w.id != 0  # the runtime gave ID 0 a value
    assert b"integrity only" in wire  # AH: the payload stays readable
    sa = SecurityAssociation(AH, spi=0x2002, auth_algo="SHA2-256-128", auth_key=bytes([0x02]) * 32)
    clear = IP(raw(sa.decrypt(w)))  # decrypt raises if scapy's ICV differs
    assert clear[ICMP].type == 8
    (got,) = tb.take_written()
    assert IP(got)[Raw].load == b"integrity only" and IP(got).proto == 1
    st = b.status()
    (c,) = st["child_sas"]
    assert (c["protocol"], c["mode"], c["encapsulation"]) == ("ah", "transport", "none")
    assert a.counters["ah_out"] == 1 and b.counters["ah_in"] == 1


def ah_in(rt, pkts):
    """Whole AH packets straight into the runtime's outside, as a raw AH socket batch would."""
    out = Batch()
    rt.outside.ah_in(pkts, out)
    rt._finish(out)


def test_ah_tampered_or_unknown_spi_is_dropped_and_counted():
    net, (a, _, ta), (b, _, tb) = pair("ah")
    ta.inject([ping(ident=7)])
    a.pump()
    (wire,) = [p for s, d, p in net.log if d == (B, -51)]
    bad = bytearray(wire)
    bad[-1] ^= 1  # payload bit
    ah_in(b, [bytes(bad)])
    assert tb.take_written() == [] and b.counters["ah_drops"] == 1
    assert b.children[0x2002].in_sa.counters["icv"] == 1
    unknown = bytearray(wire)
    unknown[20 + 4:20 + 8] = (0x9999).to_bytes(4, "big")
    ah_in(b, [bytes(unknown), b"\x45"])
    assert b.counters["unknown_spi"] == 1 and b.counters["malformed"] == 1
    ah_in(b, [wire])  # the original still passes
    assert len(tb.take_written()) == 1
    assert b.status()["drops"]["ah_drops"] == 1


def test_ah_tunnel_mode_builds_our_own_outer_header():
    net, (a, _, ta), (b, _, tb) = pair("ah", "tunnel")
    ta.inject([ping()])
    a.pump()
    b.pump()
    (wire,) = [p for s, d, p in net.log if d == (B, -51)]
    w = IP(wire)
    assert w.proto == 51 and w[AH].nh == 4 and w.id != 0
    sa = SecurityAssociation(AH, spi=0x2002, auth_algo="SHA2-256-128", auth_key=bytes([0x02]) * 32,
                             tunnel_header=IP(src=A, dst=B))
    assert IP(raw(sa.decrypt(w)))[ICMP].type == 8
    (got,) = tb.take_written()
    assert IP(got).src == A and IP(got)[Raw].load == b"integrity only"


def test_ah_esp_bundle_esp_inside_ah_both_ways_and_layers_enforced():
    net = FakeNetwork()
    a, ia, ta = node(net, A, B, "b", "ah+esp")
    b, ib, tb = node(net, B, A, "a", "ah+esp")
    esp_alg = "ENCR_AES_GCM_16_128/NO_ESN"
    install(a, ia, ev("b", esp_keys(0x3003), esp_keys(0x4004), A, B, alg=esp_alg))
    install(b, ib, ev("a", esp_keys(0x4004), esp_keys(0x3003), B, A, alg=esp_alg))
    ta.inject([ping()])
    a.pump()
    assert a.counters["no_sa"] == 1  # ESP alone is not the policy's bundle: nothing sent
    install(a, ia, ev("b", ah_keys(0x1001), ah_keys(0x2002), A, B))
    install(b, ib, ev("a", ah_keys(0x2002), ah_keys(0x1001), B, A))
    ta.inject([ping()])
    a.pump()
    b.pump()
    (wire,) = [p for s, d, p in net.log if d == (B, -51)]
    w = IP(wire)
    assert w.proto == 51 and w[AH].nh == 50 and b"integrity only" not in wire
    inner = SecurityAssociation(AH, spi=0x2002, auth_algo="SHA2-256-128", auth_key=bytes([2]) * 32).decrypt(w)
    inner = IP(raw(inner))
    assert inner.proto == 50 and inner[ESP].spi == 0x4004
    (got,) = tb.take_written()
    assert IP(got)[Raw].load == b"integrity only"
    assert "esp/transport/none 00004004_o + ah/transport/none 00002002_o" in a.status()["spd"][0]["bundle"]
    # the same ESP packet without its AH layer violates the bundle (RFC 4301 §5.2)
    b.raw_esp.inject([(raw(inner), (A, 0))])
    b.pump()
    assert tb.take_written() == [] and b.counters["policy"] == 1
    # and back: b -> a
    tb.inject([ping(B, A)])
    b.pump()
    a.pump()
    assert len(ta.take_written()) == 1


def test_runtime_takes_the_protocol_from_the_event_and_logs_ah_keys_via_keylog(tmp_path):
    """The runtime installs an AH SA because the event says protocol "ah" (not from encr_id),
    and hands the event to KeyLog.child_sa, which writes ``ah_sa`` (not esp_sa)."""
    from agent.keylog import AH_TABLE, ESP_TABLE, KeyLog
    net = FakeNetwork()
    rt, ike, _tun = node(net, A, B, "b", "ah")
    rt.keylog = KeyLog(str(tmp_path / "keys"))
    install(rt, ike, ev("b", ah_keys(0x1001), ah_keys(0x2002), A, B))
    (c,) = rt.status()["child_sas"]
    from agent.esp import AhSa
    assert c["protocol"] == "ah" and isinstance(rt.children[0x1001].in_sa, AhSa)
    assert rt.sad.lookup(0x1001, "esp") is None  # an AH SA: ESP with its SPI finds nothing
    lines = (tmp_path / "keys" / AH_TABLE).read_text().splitlines()
    assert [ln.split(",")[1] for ln in lines] == ["0x00001001", "0x00002002"]
    assert not (tmp_path / "keys" / ESP_TABLE).exists()
