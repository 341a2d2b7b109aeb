"""Configuration payload (RFC 7296 §3.15; RFC 4301 case 4: a remote host reaching a gateway).

Host: HDR, SK {IDi, AUTH, CP(CFG_REQUEST){INTERNAL_IP4_ADDRESS()}, SA, TSi(0.0.0.0/0), TSr} -->
Gateway: <-- HDR, SK {IDr, AUTH, CP(CFG_REPLY){INTERNAL_IP4_ADDRESS(a)}, SA, TSi(a/32), TSr}
"""
from __future__ import annotations

import ipaddress

import pytest
from scapy.contrib.ikev2 import IKEv2_CP  # decoder we did not write

from agent.iana import CfgType, NotifyType
from agent.ike import cp as cfgp
from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.model import Credentials, PeerPolicy

from tests.ike.conftest import make_net, view

PSK = b"correct horse battery staple 0123"
POOL = "10.99.0.0/30"  # two usable addresses: .1 and .2


def _net(host_policy=PeerPolicy(request_virtual_ip=(4,)), gw_policy=PeerPolicy(virtual_ip_pool=POOL),
         host="node-a", seed="cp"):
    return make_net(view(host, "node-b", policy=host_policy), Credentials(psk=PSK),
                    view("node-b", host, policy=gw_policy), Credentials(psk=PSK), seed=seed)


def test_host_gets_a_virtual_ip_and_its_tsi_becomes_it():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.virtual_ip == "10.99.0.1"
    assert ca.local_ts == (ipaddress.ip_network("10.99.0.1/32"),)
    assert cb.remote_ts == (ipaddress.ip_network("10.99.0.1/32"),) and cb.virtual_ip is None
    assert n.b.leases() == {POOL: {"node-a": "10.99.0.1"}}


def test_cp_codec_against_scapy():
    req = cfgp.request(True, True).encode()
    s = IKEv2_CP(b"\x00\x00" + (4 + len(req.data)).to_bytes(2, "big") + req.data)
    assert s.CFGType == CfgType.CFG_REQUEST
    assert [a.type for a in s.attributes] == [cfgp.INTERNAL_IP4_ADDRESS, cfgp.INTERNAL_IP6_ADDRESS]
    r4 = cfgp.reply([ipaddress.ip_address("10.99.0.7")]).encode()
    s4 = IKEv2_CP(b"\x00\x00" + (4 + len(r4.data)).to_bytes(2, "big") + r4.data)
    assert s4.CFGType == CfgType.CFG_REPLY and s4.attributes[0].value == "10.99.0.7"
    rep = cfgp.reply([ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("fd99::5")])
    dec = cfgp.ConfigPayload.decode(rep.encode().data)
    assert cfgp.reply_addresses(dec) == [ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("fd99::5")]
    with pytest.raises(cfgp.CpError, match="runs past"):
        cfgp.ConfigPayload.decode(b"\x02\x00\x00\x00\x00\x01\x00\x09abcd")
    with pytest.raises(cfgp.CpError, match="expected 4"):
        cfgp.reply_addresses(cfgp.ConfigPayload(2, ((cfgp.INTERNAL_IP4_ADDRESS, b"abc"),)))


def test_pool_is_stable_per_identity_exhausts_and_releases():
    pool = cfgp.AddressPool(POOL)
    a = pool.acquire("h1")
    b = pool.acquire("h2")
    assert {str(a), str(b)} == {"10.99.0.1", "10.99.0.2"} and pool.acquire("h1") == a
    assert pool.acquire("h3") is None  # exhausted
    pool.release("h1")
    assert pool.acquire("h3") is not None
    pool.release("h3")
    assert pool.acquire("h1") == a  # back to its old address
    with pytest.raises(ValueError, match="virtual_ip_pool"):
        cfgp.AddressPool("10.99.0.1/30")


def test_pool_exhaustion_is_internal_address_failure():
    n = _net(gw_policy=PeerPolicy(virtual_ip_pool="10.99.0.4/32"))
    n.b._assign_vip(n.b.view.peers[0].__class__(name="x", identity="other", endpoints=(), subnets=(),
                                                 policy=PeerPolicy(virtual_ip_pool="10.99.0.4/32")), (4,))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", ChildSaEstablished) and not n.of("b", ChildSaEstablished)
    (d,) = n.of("a", IkeSaDeleted)
    assert "INTERNAL_ADDRESS_FAILURE" in d.reason
    # the gateway logs its refusal (agent.ike.child_refusal)
    (r,) = [e for e in n.events["b"] if type(e).__name__ == "ChildSaRefused"]
    assert r.by == "us" and r.reason == "virtual IP pool 10.99.0.4/32 has no free address"


def test_host_without_cp_request_gets_failed_cp_required():
    n = _net(host_policy=PeerPolicy())
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert "FAILED_CP_REQUIRED" in d.reason and not n.of("b", ChildSaEstablished)
    (r,) = [e for e in n.events["b"] if type(e).__name__ == "ChildSaRefused"]
    assert r.notify == 37 and "no CP(CFG_REQUEST)" in r.reason  # FAILED_CP_REQUIRED


def test_gateway_without_pool_sends_no_cp_reply_and_the_host_refuses():
    n = _net(gw_policy=PeerPolicy())
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert "no CP(CFG_REPLY)" in d.reason


def test_lease_released_on_delete_and_stable_on_reconnect():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.b.leases()[POOL] == {"node-a": "10.99.0.1"}
    n.a.delete_all(n.now)
    n.pump()
    assert n.b.leases()[POOL] == {}
    n.a._shutdown = False
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.b.leases()[POOL] == {"node-a": "10.99.0.1"}
    assert n.of("a", ChildSaEstablished)[-1].virtual_ip == "10.99.0.1"


def test_virtual_ip_survives_child_sa_and_ike_sa_rekeys():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,) = n.of("a", ChildSaEstablished)
    n.a.rekey_ike("node-b", n.now)
    n.pump()
    n.a.rekey_child(ca.inbound.spi, n.now)
    n.pump()
    last = n.of("a", ChildSaEstablished)[-1]
    assert last.rekey_of == ca.inbound.spi and last.virtual_ip == "10.99.0.1"
    assert last.local_ts == (ipaddress.ip_network("10.99.0.1/32"),)
    assert n.b.leases()[POOL] == {"node-a": "10.99.0.1"}  # a rekey is no release
