"""Configuration payload over IPv6 (RFC 7296 §3.15.1 INTERNAL_IP6_ADDRESS; RFC 4301 case 4):

Host: HDR, SK {IDi, AUTH, CP(CFG_REQUEST){INTERNAL_IP6_ADDRESS()}, SA, TSi(::/0), TSr} -->
Gateway: <-- HDR, SK {IDr, AUTH, CP(CFG_REPLY){INTERNAL_IP6_ADDRESS(a/128)}, SA, TSi(a/128), TSr}

An IPv6 pool never hands out its Subnet-Router anycast address (RFC 4291 §2.6.1).
"""
from __future__ import annotations

import ipaddress

from agent.ike import cp as cfgp
from agent.ike.events import ChildSaEstablished
from agent.model import Credentials, PeerPolicy

from tests.ike.conftest import make_net, view

PSK = b"correct horse battery staple 0123"
POOL6 = "fd00:99::/126"  # ::1, ::2, ::3 usable; fd00:99:: is the Subnet-Router anycast address


def test_ipv6_pool_skips_the_subnet_router_anycast_address():
    pool = cfgp.AddressPool(POOL6)
    got = [pool.acquire(f"h{i}") for i in range(4)]
    assert [str(a) if a else None for a in got] == ["fd00:99::1", "fd00:99::2", "fd00:99::3", None]
    assert ipaddress.ip_address("fd00:99::") not in got


def test_ipv6_point_to_point_pools_hand_out_every_address():
    assert str(cfgp.AddressPool("fd00:99::7/128").acquire("h")) == "fd00:99::7"
    p = cfgp.AddressPool("fd00:99::/127")  # RFC 6164: both addresses usable
    assert [str(p.acquire("a")), str(p.acquire("b"))] == ["fd00:99::", "fd00:99::1"]


def test_host_gets_an_ipv6_virtual_ip():
    n = make_net(view("node-a", "node-b", policy=PeerPolicy(request_virtual_ip=(6,))), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=PeerPolicy(virtual_ip_pool=POOL6)), Credentials(psk=PSK), seed="cp6")
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.virtual_ip == "fd00:99::1"
    assert ca.local_ts == (ipaddress.ip_network("fd00:99::1/128"),)
    assert cb.remote_ts == (ipaddress.ip_network("fd00:99::1/128"),)
    assert n.b.leases() == {POOL6: {"node-a": "fd00:99::1"}}
