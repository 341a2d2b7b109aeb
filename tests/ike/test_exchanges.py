"""Sans-I/O IKEv2 exchanges between two IkeManagers (RFC 7296 §1.2-1.4), fake clock."""
from __future__ import annotations

from agent.ike.events import ChildSaEstablished, IkeKeysDerived, IkeSaDeleted, IkeSaEstablished


def test_cert_ike_sa_init_and_ike_auth_establish_mirrored_child_sa(cert_net):
    """HDR, SA, KEi, Ni -->  <-- HDR, SA, KEr, Nr, [CERTREQ]
    HDR, SK {IDi, CERT, CERTREQ, IDr, AUTH, SA, TSi, TSr} -->  <-- HDR, SK {IDr, CERT, AUTH, SA, TSi, TSr}"""
    n = cert_net
    n.a.initiate("node-b", n.now)
    n.pump()
    ca, cb = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert len(ca) == 1 and len(cb) == 1, (n.events, n.a.counters, n.b.counters)
    assert ca[0].outbound == cb[0].inbound and ca[0].inbound == cb[0].outbound
