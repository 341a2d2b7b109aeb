"""Liveness (RFC 7296 §2.4) aware of inbound ESP/AH (IkeManager.note_inbound), and
INITIAL_CONTACT on an IKE_SA rebuilt after "peer did not respond" (issue 9)."""
from __future__ import annotations

from dataclasses import replace

from agent.iana import ExchangeType
from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.ike.message import decode_message
from agent.ike.sa import State
from agent.model import Credentials

from .conftest import CLASSICAL, T0, make_net, view

PSK = Credentials(psk=b"liveness tests psk 0123456789abcd")
POL = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=10)


def _net(b_initiate=True, b_policy=POL):
    n = make_net(view("node-a", "node-b", policy=POL), PSK,
                 view("node-b", "node-a", policy=b_policy, initiate=b_initiate), PSK)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    n.log.clear()
    return n


def _probes(n, src):
    """Times of liveness checks (INFORMATIONAL requests) sent by ``src``."""
    return [t for t, s, m in ((t, s, decode_message(d.data)) for t, s, d in n.timed) if s == src
            and m.exchange == ExchangeType.INFORMATIONAL and not m.is_response]


def _timed(n):
    n.timed = []
    orig = n.pump

    def pump(max_rounds=50):
        k = len(n.log)
        orig(max_rounds)
        n.timed += [(n.now, s, d) for s, d in n.log[k:]]
    n.pump = pump
    return n


def test_without_inbound_traffic_the_check_comes_dpd_interval_after_the_last_ike_message():
    n = _timed(_net())
    n.advance(T0 + 10.0)
    assert _probes(n, "a") == [T0 + 10.0]


def test_inbound_esp_postpones_the_liveness_check():
    """Authenticated ESP from b at 8 s: a's check is due at 18 s, not 10 s (before the fix a probed
    at 10 s whatever the traffic)."""
    n = _timed(_net())
    n.a.note_inbound("node-b", T0 + 8.0)
    n.b.note_inbound(["node-a"], T0 + 8.0)  # any iterable of peer names
    n.advance(T0 + 17.9)
    assert _probes(n, "a") == [] and _probes(n, "b") == []
    n.advance(T0 + 18.0)
    assert _probes(n, "a") == [T0 + 18.0]


def test_inbound_that_stops_is_noticed_dpd_interval_after_the_last_packet():
    n = _timed(_net(b_policy=replace(POL, dpd_interval_s=0)))  # b's own checks would refresh a
    for t in (3.0, 6.0, 9.0, 12.0):  # traffic flows, then stops (the peer restarted)
        n.advance(T0 + t)
        n.a.note_inbound(("node-b",), n.now)
    n.advance(T0 + 21.9)
    assert _probes(n, "a") == []
    n.advance(T0 + 22.0)
    assert _probes(n, "a") == [T0 + 22.0]


def test_note_inbound_for_unknown_or_absent_peers_is_ignored():
    n = _net()
    n.a.note_inbound(["node-z", ""], T0 + 1)
    n.a.note_inbound([], T0 + 1)
    assert len(n.a.status()) == 1


def test_ike_sa_rebuilt_after_peer_did_not_respond_carries_initial_contact():
    """The peer went silent (it may have restarted and lost its state): the IKE_SA built next
    says INITIAL_CONTACT, so a peer still holding stale IKE_SAs with us drops them (§2.4).
    Before the fix only the very first IKE_SA with a peer carried it."""
    n = _net(b_initiate=False)
    n.drop = lambda src, d: True
    n.advance(T0 + 10.0 + 63.0)
    assert "peer did not respond" in [e.reason for e in n.of("a", IkeSaDeleted)]
    n.drop = None
    n.advance(T0 + 10.0 + 63.0 + 2.0)  # re-initiation after the 2 s backoff
    new_b = [sa for sa in n.b._sas.values() if sa.state == State.ESTABLISHED]
    assert len(new_b) == 1 and new_b[0].peer_initial_contact
    new_a = [sa for sa in n.a._sas.values() if sa.state == State.ESTABLISHED]
    assert len(new_a) == 1 and new_a[0].cfg.initial_contact


def test_ike_sa_after_a_normal_delete_has_no_initial_contact():
    n = _net(b_initiate=False)
    n.b.delete_all(n.now)  # b shuts down cleanly; a does not re-initiate with INITIAL_CONTACT
    n.pump()
    assert all(e.reason != "peer did not respond" for e in n.of("a", IkeSaDeleted))
    assert "node-b" in n.a._contacted


def test_note_inbound_by_ike_sa_spis():
    """The runtime may name IKE_SAs by (SPIi, SPIr) instead of peers; a wrong pair is ignored."""
    n = _timed(_net(b_policy=replace(POL, dpd_interval_s=0)))
    (sa,) = [s for s in n.a._sas.values()]
    n.a.note_inbound({(sa.spi_i, sa.spi_r + 1), (1, 2), (3,)}, T0 + 5.0)  # no match: nothing moves
    assert sa.last_inbound == float("-inf")
    n.a.note_inbound({(sa.spi_i, sa.spi_r)}, T0 + 5.0)
    n.advance(T0 + 14.9)
    assert _probes(n, "a") == []
    n.advance(T0 + 15.0)
    assert _probes(n, "a") == [T0 + 15.0]
