"""Simultaneous rekeys (RFC 7296 §2.8.1): both ends rekey the same CHILD_SA / IKE_SA at once.

The SA created by the exchange holding the lowest of the four nonces is redundant and deleted by
the end that initiated that exchange; the other initiator deletes the old SA. Checked with
in-order delivery, a lost CREATE_CHILD_SA response, and a DELETE overtaking a response.
Nonces are read off the wire (decrypted with the IKE_SA keys, see test_rekey.inner).
"""
from __future__ import annotations

import pytest

from agent.iana import ExchangeType, PayloadType
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted
from agent.ike.message import decode_message

from tests.ike.helpers import assert_mirrored, create_child_msgs, live_children, net, sas

SEEDS = ["c1", "c2", "c3", "c4", "c5", "c6"]


def _grab(m):
    return list(m.datagrams_to_send())


def _deliver(n, src, dgrams):
    dst = n.b if src == "a" else n.a
    for d in dgrams:
        n.log.append((src, d))
        dst.receive_datagram(d.data, d.remote, d.local, n.now)
    n._drain_events()


def _losing_exchange(n):
    """Which end initiated the CREATE_CHILD_SA exchange holding the lowest nonce."""
    msgs = create_child_msgs(n)
    nonces: dict = {}
    for src, m, by in msgs:
        if PayloadType.NONCE in by:
            init = src if not m.is_response else ("a" if src == "b" else "b")
            nonces.setdefault(init, []).append(by[PayloadType.NONCE][0].data)
    low = min((min(v), k) for k, v in nonces.items() if len(v) == 2)
    return low[1], nonces


@pytest.mark.parametrize("seed", SEEDS)
def test_simultaneous_child_sa_rekey_leaves_one_new_child_sa(seed):
    """HDR, SK {N(REKEY_SA), SA, Ni, TSi, TSr} --> crosses <-- HDR, SK {N(REKEY_SA), SA, Ni', TSi, TSr};
    both answer; the redundant one and the old one are deleted."""
    n = net(seed=seed)
    sas(n)
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    n.a.rekey_child(old_a[0], n.now)
    n.b.rekey_child(old_b[0], n.now)
    n.pump()
    assert_mirrored(n)
    loser, nonces = _losing_exchange(n)
    assert set(nonces) == {"a", "b"}  # both exchanges completed
    # the surviving CHILD_SA is the winner's: its initiator's new inbound SPI is in the winner's request
    winner = "b" if loser == "a" else "a"
    w_new = [e for e in n.of(winner, ChildSaEstablished)]
    live_w = live_children(n.a if winner == "a" else n.b)
    assert any(e.inbound.spi == live_w[0][0] for e in w_new)
    # the winner deleted the old CHILD_SA, the loser its redundant one
    reasons = {e.reason for e in n.of(loser, ChildSaDeleted)}
    assert "redundant CHILD_SA of a simultaneous rekey" in reasons
    assert old_a not in live_children(n.a) and old_b not in live_children(n.b)
    assert all(sa.state == "ESTABLISHED" for sa in n.a._live() + n.b._live())


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_simultaneous_child_sa_rekey_with_a_lost_response(seed):
    """The first CREATE_CHILD_SA response from B is lost: A retransmits, B re-sends its cached
    response (§2.1), and the collision still ends with one CHILD_SA."""
    n = net(seed=seed)
    sas(n)
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    lost = []

    def drop(src, d):
        m = decode_message(d.data)
        if src == "b" and m.exchange == ExchangeType.CREATE_CHILD_SA and m.is_response and not lost:
            lost.append(d)
            return True
        return False
    n.drop = drop
    n.a.rekey_child(old_a[0], n.now)
    n.b.rekey_child(old_b[0], n.now)
    n.pump()
    n.advance(n.now + 3)
    assert lost
    assert_mirrored(n)
    assert all(sa.state == "ESTABLISHED" for sa in n.a._live() + n.b._live())


@pytest.mark.parametrize("seed", SEEDS)
def test_delete_of_the_old_child_sa_overtakes_the_create_child_sa_response(seed):
    """A's rekey request and B's cross; B answers A at once but A's answer to B is held back.
    B's DELETE of the old CHILD_SA (if B won) reaches A before B's ... and every order ends
    mirrored with one CHILD_SA."""
    n = net(seed=seed)
    sas(n)
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    n.a.rekey_child(old_a[0], n.now)
    n.b.rekey_child(old_b[0], n.now)
    req_a, req_b = _grab(n.a), _grab(n.b)
    _deliver(n, "a", req_a)  # B answers A's request (B knows of the collision)
    resp_to_a = _grab(n.b)
    _deliver(n, "b", req_b)  # A answers B's request
    resp_to_b = _grab(n.a)
    _deliver(n, "b", resp_to_a)  # A completes: deletes old (winner) or its redundant one (loser)
    follow_a = _grab(n.a)  # A's INFORMATIONAL DELETE
    _deliver(n, "a", follow_a)  # the DELETE reaches B before the response to B's request
    _deliver(n, "a", resp_to_b)
    n.pump()
    assert_mirrored(n)
    assert all(sa.state == "ESTABLISHED" for sa in n.a._live() + n.b._live())


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_response_before_the_crossing_request_ends_consistent(seed):
    """B's rekey request is delayed until after A's exchange completed and A deleted the old
    CHILD_SA: B's request gets CHILD_SA_NOT_FOUND (§2.25) and nothing redundant is left."""
    n = net(seed=seed)
    sas(n)
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    n.a.rekey_child(old_a[0], n.now)
    n.b.rekey_child(old_b[0], n.now)
    req_a, req_b = _grab(n.a), _grab(n.b)
    _deliver(n, "a", req_a)
    _deliver(n, "b", _grab(n.b))  # A gets its response before B's request
    _deliver(n, "a", _grab(n.a))  # A's DELETE of the old CHILD_SA
    _deliver(n, "b", _grab(n.b))  # B's answer to the DELETE
    _deliver(n, "b", req_b)  # now B's request for the old (deleted) CHILD_SA
    n.pump()
    assert_mirrored(n)


@pytest.mark.parametrize("seed", SEEDS)
def test_simultaneous_ike_sa_rekey_leaves_one_ike_sa_with_the_child_sas(seed):
    """HDR, SK {SA, Ni, KEi} --> crosses <-- HDR, SK {SA, Ni', KEi'}; the IKE_SA from the exchange
    with the lowest nonce is deleted by its initiator, the old one by the other initiator."""
    n = net(seed=seed)
    children_a = live_children(n.a)
    old = n.a._sas_of("node-b")[0]
    old_spis = (old.spi_i, old.spi_r)
    sas(n)
    n.a.rekey_ike("node-b", n.now)
    n.b.rekey_ike("node-a", n.now)
    n.pump()
    la, lb = n.a._live(), n.b._live()
    assert len(la) == len(lb) == 1, (la, lb)
    assert (la[0].spi_i, la[0].spi_r) == (lb[0].spi_i, lb[0].spi_r) != old_spis
    assert live_children(n.a) == children_a
    assert_mirrored(n)
    for side in ("a", "b"):
        dels = n.of(side, IkeSaDeleted)
        old_del = [e for e in dels if (e.spi_i, e.spi_r) == old_spis]
        assert len(old_del) == 1 and old_del[0].rekeyed_to is not None
        assert not n.of(side, ChildSaDeleted)  # CHILD_SAs were never dropped
    # the survivor carries a CHILD_SA rekey
    n.events = {"a": [], "b": []}
    assert n.a.rekey_child(children_a[0][0], n.now)
    n.pump()
    assert_mirrored(n)
    assert n.a.get_timer() is not None and not n.a._retry


def test_ike_sa_rekey_with_a_lost_response_completes_by_retransmission():
    n = net(seed="l1")
    lost = []

    def drop(src, d):
        m = decode_message(d.data)
        if m.exchange == ExchangeType.CREATE_CHILD_SA and m.is_response and not lost:
            lost.append(d)
            return True
        return False
    n.drop = drop
    children = live_children(n.a)
    n.a.rekey_ike("node-b", n.now)
    n.pump()
    assert len(n.a._live()) == 1  # still the old one, waiting
    n.advance(n.now + 2)
    assert lost and len(n.a._live()) == len(n.b._live()) == 1
    assert (n.a._live()[0].spi_i, n.a._live()[0].spi_r) == (n.b._live()[0].spi_i, n.b._live()[0].spi_r)
    assert live_children(n.a) == children
