"""Certificate validity is checked in Unix time while timers run on a
monotonic `now` (RFC 5280 validity is calendar time). The shell supplies
`IkeManager.wall_offset` = Unix time - now; these tests run `now` on a
monotonic-like clock (seconds since boot) far from the certificates' dates."""
from __future__ import annotations

from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.ike.manager import IkeManager

from tests.ike.conftest import A_ADDR, B_ADDR, T0, DetRng, Net, cert_creds, view

BOOT_NOW = 12_345.0  # what time.monotonic() looks like on a machine up for a few hours


def _net(pki, offset_a: float, offset_b: float) -> Net:
    a = IkeManager(view("node-a", "node-b"), cert_creds(pki, "a"), DetRng("wa"), local_address=A_ADDR,
                   wall_offset=offset_a)
    b = IkeManager(view("node-b", "node-a"), cert_creds(pki, "b"), DetRng("wb"), local_address=B_ADDR,
                   wall_offset=offset_b)
    return Net(a, b, now=BOOT_NOW)


def test_certificates_checked_against_wall_time_not_the_monotonic_clock(pki):
    n = _net(pki, T0 - BOOT_NOW, T0 - BOOT_NOW)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_without_the_offset_the_certificate_is_not_yet_valid(pki):
    # responder's clock offset is wrong: the initiator's certificate looks not yet valid
    n = _net(pki, T0 - BOOT_NOW, 0.0)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("b", ChildSaEstablished)
    reasons = [e.reason for e in n.of("b", IkeSaDeleted)]
    assert any("not yet valid" in r for r in reasons), reasons


def test_peer_whose_policy_is_not_protect_cannot_authenticate(pki):
    """PAD (RFC 4301 §4.4.3): a pair the controller set to BYPASS or DISCARD
    has no PAD entry, so the responder refuses that peer's IKE_AUTH."""
    from dataclasses import replace
    from agent.model import PeerPolicy
    n = _net(pki, T0 - BOOT_NOW, T0 - BOOT_NOW)
    vb = n.b.view
    n.b.update_view(replace(vb, peers=tuple(replace(p, policy=PeerPolicy(action="discard")) for p in vb.peers)),
                    n.now)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("b", ChildSaEstablished)
    assert any("no configured peer" in e.reason or "identity" in e.reason for e in n.of("b", IkeSaDeleted)), \
        [e.reason for e in n.of("b", IkeSaDeleted)]
