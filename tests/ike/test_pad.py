"""The PAD (agent.ike.pad, RFC 4301 §4.4.3): identity lookup, identity match, revocation,
endpoint binding and the selectors a peer may claim, each checked on its own."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from agent.iana import IdType
from agent.ike.errors import AuthError
from agent.ike.pad import Pad, PeerIndex
from agent.model import Peer, PeerPolicy

NET_B = ipaddress.ip_network("10.2.0.0/16")


def _peer(name="node-b", identity="node-b", action="protect", bind=False, encap="none", endpoints=("203.0.113.2",)):
    return Peer(name, identity, endpoints, (NET_B,),
                PeerPolicy(action=action, bind_endpoints=bind, encapsulation=encap))


@dataclass
class _Cfg:
    peers: tuple = ()
    revoked_serials: frozenset = frozenset()
    problems: dict = field(default_factory=dict)

    def find_peer(self, identity):
        return PeerIndex(self.peers).find(identity)

    def revoked(self):
        return self.revoked_serials

    def policy_problem(self, peer):
        return self.problems.get(peer.name)


def test_index_holds_protect_peers_and_finds_other_spellings():
    fqdn = _peer()
    addr = _peer("gw4", "192.0.2.7")
    dn = _peer("gw-dn", "CN=gw,O=Example")
    bypass = _peer("plain", "plain", action="bypass")
    ix = PeerIndex((fqdn, addr, dn, bypass))
    assert ix.find("node-b") is fqdn
    assert ix.find("192.0.2.7") is addr
    assert ix.find("O=Example,CN=gw") is dn  # RDNs in the other order
    assert ix.find("plain") is None  # BYPASS: no PAD entry
    assert ix.find("node-c") is None


def test_first_peer_with_an_identity_wins():
    a, b = _peer("first"), _peer("second")
    assert PeerIndex((a, b)).find("node-b") is a


def test_lookup_of_an_unknown_or_unreadable_identity_is_an_auth_error():
    pad = Pad(_Cfg(peers=(_peer(),)))
    assert pad.lookup(int(IdType.ID_FQDN), b"node-b").name == "node-b"
    with pytest.raises(AuthError, match="no configured peer has identity 'node-c'"):
        pad.lookup(int(IdType.ID_FQDN), b"node-c")
    with pytest.raises(AuthError, match="no configured peer"):
        pad.lookup(int(IdType.ID_KEY_ID), b"\x01\x02")


def test_identity_must_name_the_expected_peer():
    Pad.check_identity(_peer(), int(IdType.ID_FQDN), b"node-b")
    with pytest.raises(AuthError, match="is not the expected 'node-b'"):
        Pad.check_identity(_peer(), int(IdType.ID_FQDN), b"node-x")
    with pytest.raises(AuthError, match="not supported or malformed"):
        Pad.check_identity(_peer(), int(IdType.ID_KEY_ID), b"k")
    Pad.check_wanted("node-a", int(IdType.ID_FQDN), b"node-a")
    with pytest.raises(AuthError, match="wants to talk to 'node-z'"):
        Pad.check_wanted("node-a", int(IdType.ID_FQDN), b"node-z")


def test_revoked_certificate_serial_is_refused():
    pad = Pad(_Cfg(revoked_serials=frozenset({42})))
    pad.check_revoked(_peer(), 41)
    with pytest.raises(AuthError, match=r"serial 42\) is revoked"):
        pad.check_revoked(_peer(), 42)


def test_endpoint_binding():
    loose, bound = _peer(), _peer(bind=True)
    Pad.check_binding(loose, ("198.51.100.9", 500), nat_remote=False)  # binding off: anywhere
    Pad.check_binding(bound, ("203.0.113.2", 500), nat_remote=False)
    with pytest.raises(AuthError, match="not one of its endpoints"):
        Pad.check_binding(bound, ("198.51.100.9", 500), nat_remote=False)
    Pad.check_binding(bound, ("198.51.100.9", 4500), nat_remote=True)  # behind a NAT: any address
    # forced encapsulation fakes NAT-D, so it proves nothing: strict again
    with pytest.raises(AuthError, match="bind_endpoints is on"):
        Pad.check_binding(_peer(bind=True, encap="udp"), ("198.51.100.9", 4500), nat_remote=True)


def test_selectors_a_peer_may_claim():
    p = _peer()
    assert Pad.remote_selectors(p, ()) == (NET_B,)
    assert Pad.remote_selectors(p, ("10.99.0.5",)) == (ipaddress.ip_network("10.99.0.5/32"),)
    ours = (ipaddress.ip_network("10.1.0.0/16"),)
    assert Pad.local_selectors(ours, ()) == ours
    assert Pad.local_selectors(ours, ("10.99.0.6",)) == (ipaddress.ip_network("10.99.0.6/32"),)


def test_policy_problem_comes_from_the_configuration():
    pad = Pad(_Cfg(problems={"node-b": "esp_proposals: bad"}))
    assert pad.policy_problem(_peer()) == "esp_proposals: bad"
    assert pad.policy_problem(_peer("other")) is None
