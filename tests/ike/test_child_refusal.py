"""A refused CHILD_SA keeps its IKE_SA (RFC 7296 §1.2, §2.21.2) and backs off
(agent.ike.child_refusal); refusals on both sides are events and the peer's last error."""
from __future__ import annotations

import ipaddress
from dataclasses import replace

from agent.iana import ExchangeType, NotifyType
from agent.ike import child as ch
from agent.ike import child_refusal as cr
from agent.ike.events import ChildSaEstablished, ChildSaRefused, IkeSaDeleted, IkeSaEstablished
from agent.ike.message import decode_message
from agent.model import Credentials

from tests.ike.conftest import CLASSICAL, make_net, view

PSK = b"child refusal tests psk 0123456789"
NOLIFE = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=0)
ELSEWHERE = ipaddress.ip_network("10.9.0.0/16")  # not the subnet B has configured for A


def _net(a_net=None, a_policy=NOLIFE, b_policy=NOLIFE, b_initiates=True):
    return make_net(view("node-a", "node-b", my_net=a_net, policy=a_policy), Credentials(psk=PSK),
                    view("node-b", "node-a", policy=b_policy, initiate=b_initiates), Credentials(psk=PSK))


def _sent(n, src, exchange):
    return [(d, decode_message(d.data)) for s, d in n.log if s == src and decode_message(d.data).exchange == exchange]


def test_ts_unacceptable_in_ike_auth_keeps_the_ike_sa_and_backs_off_exponentially():
    """B refuses A's selectors (TS_UNACCEPTABLE) for ten minutes: one IKE_SA_INIT, one IKE_SA on
    each side, CREATE_CHILD_SA retries after 2, 4, 8 ... s capped at 120 s (was: the IKE_SA
    deleted and rebuilt every 2 s)."""
    n = _net(a_net=ELSEWHERE)
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(n.now + 600)
    assert len(_sent(n, "a", ExchangeType.IKE_SA_INIT)) == 1
    assert not n.of("a", IkeSaDeleted) and not n.of("b", IkeSaDeleted)
    assert len(n.of("a", IkeSaEstablished)) == 1 and [s.state for s in n.a._live()] == ["ESTABLISHED"]
    refusals = n.of("a", ChildSaRefused)
    assert all(e.notify == NotifyType.TS_UNACCEPTABLE and e.by == "peer" for e in refusals)
    assert [e.retry_in_s for e in refusals] == [2, 4, 8, 16, 32, 64, 120, 120, 120, 120]
    requests = [m for _d, m in _sent(n, "a", ExchangeType.CREATE_CHILD_SA) if not m.is_response]
    assert len(requests) == len(refusals) - 1
    # the responder logs each refusal with what was offered
    theirs = n.of("b", ChildSaRefused)
    assert len(theirs) == len(refusals) and all(e.by == "us" and "TSi 10.9.0.0/16" in e.offered for e in theirs)
    # `meshsec status`: the last error per peer, on both sides
    (row,) = n.a.status()
    assert row["last_error"] == ("CHILD_SA refused by the peer: CREATE_CHILD_SA refused: TS_UNACCEPTABLE "
                                 "(retry in 120 s)")
    (row_b,) = n.b.status()
    assert "we refused its CHILD_SA: traffic selectors do not overlap" in row_b["last_error"]
    assert "TSi 10.9.0.0/16" in row_b["last_error"]
    assert n.a.counters["child_sa_refused_by_peer"] == len(refusals)


def test_the_retried_child_sa_comes_up_and_the_backoff_starts_over(monkeypatch):
    """A transient refusal: B refuses the selectors of IKE_AUTH only; the CREATE_CHILD_SA retry
    2 s later succeeds, the last error is cleared."""
    real, calls = ch.narrow_ts, []

    def refuse_first(proposed, allowed):
        calls.append(1)
        return [] if len(calls) <= 2 else real(proposed, allowed)
    monkeypatch.setattr(ch, "narrow_ts", refuse_first)
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    t0 = n.now
    assert [e.retry_in_s for e in n.of("a", ChildSaRefused)] == [2.0] and not n.of("a", ChildSaEstablished)
    assert n.a.status()[0]["last_error"] is not None
    n.advance(t0 + 1.9)
    assert not n.of("a", ChildSaEstablished)
    n.advance(t0 + 2.1)
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.inbound.spi == cb.outbound.spi
    sa = n.a._live()[0]
    assert sa.child_refusals == 0 and sa.refusals.retry_at is None and sa.next_timer() is None
    assert n.a.status()[0]["last_error"] is None and n.a.last_errors == {}
    n.advance(t0 + 300)
    assert len(n.of("a", ChildSaEstablished)) == 1 and len(_sent(n, "a", ExchangeType.IKE_SA_INIT)) == 1


def test_no_proposal_chosen_in_ike_auth_keeps_the_ike_sa_and_names_the_offer():
    a_pol = replace(NOLIFE, esp_proposals=("aes256gcm16",))
    b_pol = replace(NOLIFE, esp_proposals=("chacha20poly1305",))
    n = _net(a_policy=a_pol, b_policy=b_pol)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", IkeSaDeleted) and not n.of("b", IkeSaDeleted)
    (mine,) = n.of("a", ChildSaRefused)
    assert mine.notify == NotifyType.NO_PROPOSAL_CHOSEN and mine.retry_in_s == cr.CHILD_RETRY_BASE_S
    (theirs,) = n.of("b", ChildSaRefused)
    assert theirs.notify == NotifyType.NO_PROPOSAL_CHOSEN and theirs.peer == "node-a"
    assert "ENCR_AES_GCM_16_256" in theirs.offered and "TSi 10.1.0.0/16 TSr 10.2.0.0/16" in theirs.offered


def test_a_child_error_that_is_not_a_refusal_still_deletes_the_ike_sa(monkeypatch):
    """Only CHILD_SA_REFUSALS keep the IKE_SA (decided from the notify type): e.g. INVALID_SYNTAX
    is fatal for the IKE_SA (§2.21.3)."""
    from agent.ike.message import NotifyPayload
    from agent.ike.tasks.ike_auth import IkeAuth
    orig = IkeAuth.process_request

    def answer_with_invalid_syntax(self, msg, inner, now):
        return orig(self, msg, inner, now)[:2] + [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]  # IDr, AUTH, N
    monkeypatch.setattr(IkeAuth, "process_request", answer_with_invalid_syntax)
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["CHILD_SA refused: INVALID_SYNTAX"]
    assert not n.of("a", ChildSaRefused)


def test_reinitiation_backoff_is_not_reset_by_an_ike_sa_whose_child_sa_fails():
    """The manager's re-initiation backoff ends when a CHILD_SA is up, not at IKE_AUTH: an IKE_SA
    that must be deleted after IKE_AUTH (here: we asked for a virtual IP and the gateway has no
    pool, so no CP reply) is set up again after 2, 4, 8, 16 ... s, not every 2 s."""
    a_pol = replace(NOLIFE, request_virtual_ip=(4,))
    n = _net(a_policy=a_pol, b_initiates=False)
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(n.now + 60)
    inits = [m for _d, m in _sent(n, "a", ExchangeType.IKE_SA_INIT) if not m.is_response]
    deleted = n.of("a", IkeSaDeleted)
    assert deleted and all("virtual IP" in e.reason for e in deleted)
    assert 4 <= len(inits) <= 6, len(inits)  # 0, 2, 6, 14, 30 (+62): was 30 in a minute


def test_acquires_during_the_backoff_do_not_ask_the_peer_again():
    """The runtime asks for a CHILD_SA on every acquire (at most every 5 s): while the refused
    CHILD_SA backs off, those asks are held, so the peer still sees only the backoff schedule."""
    n = _net(a_net=ELSEWHERE)
    n.a.initiate("node-b", n.now)
    n.pump()
    t0 = n.now
    held = 0
    for i in range(1, 61):  # an acquire every second for a minute
        n.advance(t0 + i)
        held += not n.a.create_child("node-b", n.now)
        n.pump()
    requests = [m for _d, m in _sent(n, "a", ExchangeType.CREATE_CHILD_SA) if not m.is_response]
    assert len(requests) == 4  # at +2, +6, +14, +30 s; the next is due at +62 s
    assert held == 60
    assert [e.retry_in_s for e in n.of("a", ChildSaRefused)] == [2, 4, 8, 16, 32]


def test_the_retry_moves_with_an_ike_sa_rekey():
    n = _net(a_net=ELSEWHERE)
    n.a.initiate("node-b", n.now)
    n.pump()
    old = n.a._live()[0]
    assert n.a.rekey_ike("node-b", n.now)
    n.pump()
    (new,) = n.a._live()
    assert new is not old and new.refusals.wanted == old.refusals.wanted and new.refusals.retry_at is not None
    n.advance(n.now + 10)
    spis = {(e.ike_spi_i, e.ike_spi_r) for e in n.of("a", ChildSaRefused)[1:]}
    assert spis == {(new.spi_i, new.spi_r)} and [e.retry_in_s for e in n.of("a", ChildSaRefused)] == [2, 4, 8]


def test_acquire_driven_child_sa_refused_backs_off_too():
    """The IKE_SA's responder (B) asks for the CHILD_SA on acquires (every 5 s from the runtime):
    refused, those asks back off the same way (2, 4, 8 ... s) instead of every 5 s."""
    n = _net(a_net=ELSEWHERE)
    n.a.initiate("node-b", n.now)
    n.pump()
    t0 = n.now
    for i in range(0, 61, 5):
        n.advance(t0 + i)
        n.b.create_child("node-a", n.now)
        n.pump()
    n.advance(t0 + 61)
    requests = [m for _d, m in _sent(n, "b", ExchangeType.CREATE_CHILD_SA) if not m.is_response]
    assert len(requests) == 5  # at 0, +2, +6, +14, +30 s (was 13: one per acquire)
    assert [e.retry_in_s for e in n.of("b", ChildSaRefused) if e.by == "peer"] == [2, 4, 8, 16, 32]


def test_a_refused_child_sa_for_a_selector_pair_backs_off_and_is_reported():
    """Issue 9: the runtime asks for a CHILD_SA per selector pair (every 5 s while traffic is
    offered); the peer refuses that pair (TS_UNACCEPTABLE, as strongSwan does for a subnet its
    configuration lacks). Each refusal is a ChildSaRefused event naming the pair and the notify,
    the peer's last error says so, and the pair backs off 2, 4, 8 ... s (was: asked every 5 s
    for ever, silently, with child_errors growing by one entry per refusal)."""
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.a.status()[0]["last_error"] is None
    t0, local = n.now, ipaddress.ip_network("10.1.5.0/24")
    asked = 0
    for i in range(0, 61, 5):  # the runtime's acquire_pair: at most every 5 s
        n.advance(t0 + i)
        asked += n.a.create_child("node-b", n.now, local_ts=(local,), remote_ts=(ELSEWHERE,))
        n.pump()
    requests = [m for _d, m in _sent(n, "a", ExchangeType.CREATE_CHILD_SA) if not m.is_response]
    assert len(requests) == asked == 5  # at 0, +5, +10, +20, +40 s (was 13: one per ask)
    refusals = n.of("a", ChildSaRefused)
    assert [e.retry_in_s for e in refusals] == [2, 4, 8, 16, 32]
    assert all(e.by == "peer" and e.notify == NotifyType.TS_UNACCEPTABLE for e in refusals)
    assert all("TSi 10.1.5.0/24 TSr 10.9.0.0/16" in e.offered for e in refusals)
    (row,) = n.a.status()
    assert "TS_UNACCEPTABLE" in row["last_error"] and "TSi 10.1.5.0/24 TSr 10.9.0.0/16" in row["last_error"]
    assert n.a.counters["child_sa_refused_by_peer"] == 5
    # the IKE_SA and its CHILD_SA stay; the default selectors are not held by the pair's backoff
    assert len(n.of("a", ChildSaEstablished)) == 1 and not n.of("a", IkeSaDeleted)


def test_child_errors_stay_bounded_over_many_refusals():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    sa = n.a._live()[0]
    t = n.now
    for i in range(40):  # 40 different refused pairs: none waits for another's backoff
        local = ipaddress.ip_network(f"10.1.{i}.0/24")
        assert n.a.create_child("node-b", t, local_ts=(local,), remote_ts=(ELSEWHERE,))
        n.pump()
    assert len(n.of("a", ChildSaRefused)) == 40
    assert len(sa.child_errors) == cr.CHILD_ERRORS_MAX and "TS_UNACCEPTABLE" in sa.child_errors[-1]


def test_a_pair_that_comes_up_later_starts_its_backoff_over():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    sa = n.a._live()[0]
    local = ipaddress.ip_network("10.1.5.0/24")
    assert n.a.create_child("node-b", n.now, local_ts=(local,), remote_ts=(ELSEWHERE,))
    n.pump()
    key = ((local,), (ELSEWHERE,), "esp")
    assert sa.refusals.pair_holds(key, n.now) and not n.a.create_child("node-b", n.now, local_ts=(local,),
                                                                       remote_ts=(ELSEWHERE,))
    # B now accepts the pair (its configuration grew)
    (sb,) = n.b._live()
    sb.peer = replace(sb.peer, subnets=(ipaddress.ip_network("10.1.0.0/16"),))
    sb.cfg.local_subnets = (ipaddress.ip_network("10.2.0.0/16"), ELSEWHERE)
    n.advance(n.now + 3)
    assert n.a.create_child("node-b", n.now, local_ts=(local,), remote_ts=(ELSEWHERE,))
    n.pump()
    assert len(n.of("a", ChildSaEstablished)) == 2 and key not in sa.refusals.pairs
