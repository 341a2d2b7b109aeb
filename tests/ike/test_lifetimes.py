"""Lifetimes from PeerPolicy (RFC 7296 §2.8): soft expiry (rekey) at 80-90 % with jitter from rng,
hard expiry (delete) at 100 %, a failed rekey retried before the hard limit. Fake clock."""
from __future__ import annotations

from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted, IkeSaEstablished
from agent.model import PeerPolicy

from tests.ike.helpers import assert_mirrored, create_child_msgs, live_children, net, sas


def test_child_sa_soft_lifetime_rekeys_between_80_and_90_percent():
    n = net(PeerPolicy(child_lifetime_s=100.0, dpd_interval_s=1000.0), seed="lt1")
    t0 = n.now
    (old,) = live_children(n.a)
    n.advance(t0 + 79.9)
    assert not n.of("a", ChildSaEstablished) and not n.of("b", ChildSaEstablished)
    n.advance(t0 + 90.0)
    rekeys = n.of("a", ChildSaEstablished) + n.of("b", ChildSaEstablished)
    assert len(rekeys) == 2 and all(e.rekey_of is not None for e in rekeys)  # one rekey, seen on both ends
    assert old not in live_children(n.a)
    assert_mirrored(n)


def test_jitter_differs_between_rng_seeds_and_stays_in_range():
    times = set()
    for seed in ("j1", "j2", "j3", "j4"):
        n = net(PeerPolicy(child_lifetime_s=1000.0, ike_lifetime_s=5000.0), seed=seed)
        for sa in n.a._live() + n.b._live():
            c = sa.children[0]
            assert 800.0 <= c.rekey_at - c.established_at <= 900.0 and c.expire_at - c.established_at == 1000.0
            assert 4000.0 <= sa.rekey_at - sa.established_at <= 4500.0
            times.add(round(c.rekey_at - c.established_at, 3))
    assert len(times) == 8  # every end of every run picked its own moment


def test_failed_rekey_is_retried_then_hard_expiry_deletes_the_child_sa():
    """A offers no PFS, B demands it: every CREATE_CHILD_SA gets NO_PROPOSAL_CHOSEN; A retries
    before the hard limit, then deletes the CHILD_SA at 100 %; the IKE_SA stays."""
    n = net(PeerPolicy(child_lifetime_s=100.0, dpd_interval_s=1000.0),
            PeerPolicy(child_lifetime_s=0, esp_proposals=("aes128gcm16-ecp256",), dpd_interval_s=1000.0),
            seed="lt2")
    t0 = n.now
    (old,) = live_children(n.a)
    n.advance(t0 + 99.9)
    sa = n.a._sas_of("node-b")[0]
    assert len(sa.child_errors) >= 2 and all("NO_PROPOSAL_CHOSEN" in e for e in sa.child_errors)
    assert live_children(n.a) == [old]
    n.advance(t0 + 100.0)
    (d,) = n.of("a", ChildSaDeleted)
    assert d.reason == "CHILD_SA lifetime expired" and d.inbound_spi == old[0]
    assert n.of("b", ChildSaDeleted)  # B learned it by DELETE
    assert sa.state == "ESTABLISHED" and not live_children(n.b)


def test_ike_sa_soft_lifetime_rekeys_the_ike_sa():
    n = net(PeerPolicy(ike_lifetime_s=200.0, child_lifetime_s=0, dpd_interval_s=1000.0), seed="lt3")
    t0 = n.now
    old = n.a._live()[0]
    kids = live_children(n.a)
    n.advance(t0 + 181.0)
    dels = n.of("a", IkeSaDeleted)
    assert dels and dels[0].spi_i == old.spi_i and dels[0].rekeyed_to is not None
    assert len(n.a._live()) == len(n.b._live()) == 1 and live_children(n.a) == kids
    assert not n.of("a", ChildSaDeleted)


def test_ike_sa_hard_lifetime_deletes_when_rekeys_go_unanswered():
    """B never answers CREATE_CHILD_SA: A's IKE_SA rekey retransmits until the hard limit, where
    the IKE_SA is deleted (reason says why) and A re-initiates per policy."""
    n = net(PeerPolicy(ike_lifetime_s=20.0, child_lifetime_s=0, dpd_interval_s=1000.0),
            PeerPolicy(ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=1000.0), seed="lt4")
    t0 = n.now
    n.drop = lambda src, d: src == "a" and d.data[18] == 36  # exchange type CREATE_CHILD_SA
    n.advance(t0 + 20.5)
    dels = [e for e in n.of("a", IkeSaDeleted) if e.reason == "IKE_SA lifetime expired"]
    assert len(dels) == 1 and dels[0].rekeyed_to is None
    assert "node-b" in n.a._retry  # re-initiation scheduled


def test_zero_lifetime_means_no_rekey():
    n = net(PeerPolicy(ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=1e6), seed="lt5")
    sa = n.a._live()[0]
    assert sa.rekey_at is None and sa.expire_at is None and sa.children[0].rekey_at is None
    n.advance(n.now + 1e5)
    assert not n.of("a", ChildSaEstablished) and not n.of("a", IkeSaEstablished)
