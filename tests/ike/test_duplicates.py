"""Duplicate IKE_SAs (both sides initiate at once, issue 9): both sides keep the same one and
delete the other (the IKE_SA holding the lowest nonce goes, as for rekey collisions §2.25.2)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted, IkeSaEstablished
from agent.ike.sa import State
from agent.model import Credentials

from .conftest import CLASSICAL, T0, make_net, view

PSK = Credentials(psk=b"duplicate tests psk 0123456789abc")
POL = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=0)


def _live(m):
    return [sa for sa in m._sas.values() if sa.state == State.ESTABLISHED]


class _Seen(dict):
    """IkeManager._sas that remembers every IKE_SA it ever held."""

    def __init__(self):
        super().__init__()
        self.all = []

    def __setitem__(self, k, v):
        self.all.append(v)
        super().__setitem__(k, v)


def _both_initiate(seed, policy=POL):
    n = make_net(view("node-a", "node-b", policy=policy), PSK, view("node-b", "node-a", policy=policy), PSK, seed=seed)
    n.a._sas = _Seen()
    # the IKE_SA_INIT responses crossed (or the peer lacks the rule): both exchanges complete
    n.a._supersede_own_init = n.b._supersede_own_init = lambda ip, now: None
    n.a.initiate("node-b", n.now)  # both IKE_SA_INITs leave before either arrives
    n.b.initiate("node-a", n.now)
    n.pump()
    return n


@pytest.mark.parametrize("seed", ["d1", "d2", "d3", "d4", "d5", "d6"])
def test_simultaneous_initiation_leaves_one_ike_sa_the_same_on_both_sides(seed):
    n = _both_initiate(seed)
    assert len(n.of("a", IkeSaEstablished)) == 2 and len(n.of("b", IkeSaEstablished)) == 2  # both completed
    (sa_a,), (sa_b,) = _live(n.a), _live(n.b)  # before the fix: two on each side, for good
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    gone = {(e.spi_i, e.spi_r) for e in n.of("a", IkeSaDeleted) + n.of("b", IkeSaDeleted)}
    assert len(gone) == 1 and (sa_a.spi_i, sa_a.spi_r) not in gone
    # the deleted one held the lowest nonce
    (loser,) = [sa for sa in n.a._sas.all if (sa.spi_i, sa.spi_r) in gone]
    assert min(loser._ni, loser._nr) < min(sa_a._ni, sa_a._nr)
    # one CHILD_SA pair left: each side deleted the loser's CHILD_SA
    assert len(n.of("a", ChildSaEstablished)) - len(n.of("a", ChildSaDeleted)) == 1
    assert len(n.of("b", ChildSaEstablished)) - len(n.of("b", ChildSaDeleted)) == 1
    assert n.a.counters.get("duplicate_ike_sa_deleted", 0) + n.b.counters.get("duplicate_ike_sa_deleted", 0) >= 1
    n.advance(T0 + 300)  # nothing is re-initiated afterwards
    assert len(_live(n.a)) == 1 and len(_live(n.b)) == 1
    assert n.a.get_timer() is None and n.b.get_timer() is None


def test_a_peer_that_keeps_duplicates_is_made_to_drop_ours_choice():
    """b never resolves duplicates (as strongSwan): a alone deletes the one with the lowest nonce,
    and b ends with the same single IKE_SA."""
    n = make_net(view("node-a", "node-b", policy=POL), PSK, view("node-b", "node-a", policy=POL), PSK, seed="ss")
    n.b._resolve_duplicates = lambda sa, peer, now: None
    n.a._supersede_own_init = n.b._supersede_own_init = lambda ip, now: None
    n.a.initiate("node-b", n.now)
    n.b.initiate("node-a", n.now)
    n.pump()
    (sa_a,), (sa_b,) = _live(n.a), _live(n.b)
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    assert n.a.counters["duplicate_ike_sa_deleted"] == 1


def test_ike_sa_rekey_is_not_taken_for_a_duplicate():
    n = make_net(view("node-a", "node-b", policy=POL), PSK, view("node-b", "node-a", policy=POL), PSK, seed="rk")
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.a.rekey_ike("node-b", n.now)
    n.pump()
    (sa_a,), (sa_b,) = _live(n.a), _live(n.b)
    assert [e.reason for e in n.of("a", IkeSaDeleted)][-1:] != ["duplicate IKE_SA (both sides initiated): "
                                                                 "the other one is kept"]
    assert "duplicate_ike_sa_deleted" not in n.a.counters and "duplicate_ike_sa_deleted" not in n.b.counters
