"""PAD additions at the manager level (RFC 4301 §4.4.3, docs/ike-hardening.md), sans-I/O: endpoint binding
(off by default, NAT-aware), revoked certificates delete their IKE_SA and cannot
authenticate again, new credentials apply to new IKE_SAs only.
"""
from __future__ import annotations

from dataclasses import replace

from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.ike.manager import IkeManager

from tests.ike.conftest import A_ADDR, DetRng, cert_creds, make_net, view
from tests.ike.helpers import NOLIFE, psk_net, up


# ------------------------------------------------------------------ 8. endpoint binding

def test_bind_endpoints_refuses_an_authenticated_peer_from_another_address():
    bound = replace(NOLIFE, bind_endpoints=True)
    n = psk_net(NOLIFE, bound, b={"peer_addr": "198.51.100.77"})
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("b", IkeSaDeleted)
    assert "198.51.100.1" in d.reason and "198.51.100.77" in d.reason and "bind_endpoints" in d.reason
    assert not n.of("b", ChildSaEstablished)


def test_bind_endpoints_accepts_the_configured_address_and_is_off_by_default():
    for b_policy, addr in ((replace(NOLIFE, bind_endpoints=True), A_ADDR), (NOLIFE, "198.51.100.77")):
        n = psk_net(NOLIFE, b_policy, b={"peer_addr": addr})
        up(n)


def test_bind_endpoints_allows_a_peer_behind_a_detected_nat():
    """encapsulation none (no faked NAT-D): A's packets reach B from 203.0.113.9 after a NAPT."""
    pol = replace(NOLIFE, encapsulation="none")
    n = psk_net(pol, replace(pol, bind_endpoints=True))
    nat_ip = "203.0.113.9"

    def napt(src, d):
        if src == "a":
            n.b.receive_datagram(d.data, d.remote, (nat_ip, 40000 + d.local[1]), n.now)
            return True
        if d.remote[0] == nat_ip:
            n.a.receive_datagram(d.data, (A_ADDR, d.remote[1] - 40000), d.local, n.now)
            return True
        return False
    n.drop = napt
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("b", ChildSaEstablished)
    assert n.b.status()[0]["nat"]["remote"] is True


# ------------------------------------------------------------------ PAD: revocation, credentials

def test_revoked_certificate_deletes_its_ike_sa_and_cannot_authenticate_again(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    up(n)
    assert n.b._live()[0].peer_cert_serial == 11  # conftest: node-a's certificate serial
    n.b.set_revoked_serials(frozenset({999}), n.now)
    assert len(n.b.status()) == 1  # other serials: nothing happens
    n.b.set_revoked_serials(frozenset({11}), n.now)
    n.pump()
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == ["peer certificate revoked (serial 11)"]
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["deleted by peer"]
    n.advance(n.now + 3)  # A re-initiates after 2 s; B refuses the revoked certificate
    assert any("serial 11" in e.reason and "revoked" in e.reason for e in n.of("b", IkeSaDeleted))
    assert n.b.status() == [] and n.a.status() == [] and len(n.of("a", ChildSaEstablished)) == 1
    # A, whose certificate is still good, keeps refusing B's revoked one likewise
    n.a.set_revoked_serials(frozenset({12}), n.now)
    assert n.a.status() == []


def test_update_credentials_applies_to_new_ike_sas_only(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    up(n)
    n.b.update_credentials(cert_creds(pki, "b", ca="other_ca"), n.now)  # node-a's CA no longer trusted
    assert len(n.b.status()) == 1  # established: authenticated already
    n.a.delete_all(n.now)
    n.pump()
    n.a = IkeManager(n.a.view, n.a.credentials, DetRng("a2"), local_address=A_ADDR)
    n.events = {"a": [], "b": []}
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("b", ChildSaEstablished)
    assert any("AUTHENTICATION_FAILED" in e.reason for e in n.of("b", IkeSaDeleted))
    n.b.update_credentials(cert_creds(pki, "b"), n.now)
    n.a = IkeManager(n.a.view, n.a.credentials, DetRng("a3"), local_address=A_ADDR)
    up(n)


def test_revoked_serials_in_a_new_view_delete_like_set_revoked_serials(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    up(n)
    n.b.update_view(replace(n.b.view, revoked_serials=frozenset({11})), n.now)
    n.pump()
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == ["peer certificate revoked (serial 11)"]
