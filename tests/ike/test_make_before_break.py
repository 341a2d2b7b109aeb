"""A pair's policy changes (mode, protocol, proposals) while PROTECT: the new IKE_SA and CHILD_SA
are up before the old ones go (make before break, issue 9)."""
from __future__ import annotations

from dataclasses import replace

from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted
from agent.ike.manager import REPLACE_WAIT_S
from agent.ike.sa import State
from agent.model import Credentials

from .conftest import CLASSICAL, T0, make_net, view

PSK = Credentials(psk=b"make before break psk 0123456789a")
OLD = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=0, esp_proposals=("aes128gcm16",))
NEW = replace(OLD, esp_proposals=("aes256gcm16",))


def _net():
    n = make_net(view("node-a", "node-b", policy=OLD), PSK, view("node-b", "node-a", policy=OLD, initiate=False), PSK,
                 seed="mbb")
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    n.events = {"a": [], "b": []}
    return n


def _with(m, pol):
    v = m.view
    return replace(v, peers=tuple(replace(p, policy=pol) for p in v.peers))


def _up(m):
    return [sa for sa in m._sas.values() if sa.state == State.ESTABLISHED]


def _order(n, side):
    return [type(e).__name__ for e in n.events[side] if isinstance(e, (ChildSaEstablished, ChildSaDeleted))]


def test_policy_change_on_both_sides_brings_the_new_sas_up_before_the_old_go():
    n = _net()
    n.a.update_view(_with(n.a, NEW), n.now)
    n.b.update_view(_with(n.b, NEW), n.now)
    n.pump()
    # no instant without a CHILD_SA: the new one is installed before the old one is deleted
    # (before the fix: deleted first, then re-created only after the 2 s re-initiation backoff)
    assert _order(n, "a") == ["ChildSaEstablished", "ChildSaDeleted"]
    assert _order(n, "b") == ["ChildSaEstablished", "ChildSaDeleted"]
    (new_a,) = n.of("a", ChildSaEstablished)
    assert "AES_GCM_16_256" in new_a.algorithms
    (sa_a,), (sa_b,) = _up(n.a), _up(n.b)
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    assert n.a.counters["make_before_break"] == 1 and n.b.counters["make_before_break_wait"] == 1
    assert any("replaced, make before break" in e.reason for e in n.of("a", IkeSaDeleted))
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == ["peer sent INITIAL_CONTACT"]
    # a's Delete of the old one is answered N(INVALID_IKE_SPI) (b dropped it already): done
    assert len(n.a.status()) == 1 and n.a.counters["delete_answered_invalid_ike_spi"] == 1
    n.advance(T0 + 300)
    assert len(_up(n.a)) == 1 and len(_up(n.b)) == 1 and _order(n, "a") == ["ChildSaEstablished", "ChildSaDeleted"]


def test_side_that_does_not_initiate_waits_then_deletes_as_before():
    """Only b (left to respond by the tie-break) got the new policy: it keeps the old IKE_SA for
    REPLACE_WAIT_S, then deletes it (RFC 4301 §4.4.1); a re-initiates."""
    n = _net()
    n.b.update_view(_with(n.b, NEW), n.now)
    n.pump()
    assert not n.of("b", IkeSaDeleted)
    n.advance(T0 + REPLACE_WAIT_S - 0.01)
    assert not n.of("b", IkeSaDeleted)
    n.advance(T0 + REPLACE_WAIT_S)
    (d,) = n.of("b", IkeSaDeleted)
    assert "none came in time" in d.reason


def test_failed_replacement_deletes_the_old_ike_sa():
    """a's new proposal is refused by b: the old IKE_SA (old policy) does not stay for good."""
    n = _net()
    n.a.update_view(_with(n.a, replace(OLD, esp_proposals=("chacha20poly1305",))), n.now)
    n.b.update_view(_with(n.b, replace(OLD, esp_proposals=("aes256gcm16",))), n.now)
    n.pump()
    n.advance(T0 + 1)
    reasons = [e.reason for e in n.of("a", IkeSaDeleted)]
    assert any("its replacement failed" in r for r in reasons), reasons


def test_policy_change_to_discard_still_deletes_at_once():
    n = _net()
    n.a.update_view(_with(n.a, replace(OLD, action="discard")), n.now)
    n.pump()
    assert any("policy changed (now discard" in e.reason for e in n.of("a", IkeSaDeleted))
    assert not _up(n.a) and "make_before_break" not in n.a.counters
