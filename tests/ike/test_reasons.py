"""Typed reasons (agent.ike.errors): every end of an IKE_SA carries a DeleteReason kind, and the
manager decides re-initiation from the kind, not from words in the reason text."""
from __future__ import annotations

import json

import pytest

from agent.ike.errors import (AUTH_BACKOFF, NO_RETRY, DeleteReason, Drop, IkeSaState, LocalProtocolError, Mode,
                              Protocol, RemoteProtocolError)
from agent.ike.events import IkeSaDeleted, InitsRefused
from agent.ike.manager import REINITIATE_AUTH_BASE_S, REINITIATE_BASE_S, IkeManager
from agent.iana import NotifyType
from agent.model import Credentials

from tests.ike.conftest import A_ADDR, B_ADDR, DetRng, T0, Net, view

PSK = b"reasons tests psk 0123456789 abc"


def _net(b_psk=PSK):
    a = IkeManager(view("node-a", "node-b"), Credentials(psk=PSK), DetRng("ra"), local_address=A_ADDR)
    b = IkeManager(view("node-b", "node-a"), Credentials(psk=b_psk), DetRng("rb"), local_address=B_ADDR)
    return Net(a, b)


def _kinds(n, side):
    return [e.kind for e in n.of(side, IkeSaDeleted)]


def test_enums_keep_their_string_values():
    assert IkeSaState.ESTABLISHED == "ESTABLISHED" and f"{IkeSaState.CONNECTING}" == "CONNECTING"
    assert Mode.TRANSPORT == "transport" and Protocol.AH == "ah"
    assert {"bad_icv": 1}[Drop.BAD_ICV] == 1  # counters keyed by the old names still match
    assert json.loads(json.dumps({"k": DeleteReason.TIMEOUT})) == {"k": "timeout"}


def test_protocol_errors_carry_their_notify():
    e = RemoteProtocolError("bad nonce", NotifyType.INVALID_SYNTAX)
    assert e.notify == NotifyType.INVALID_SYNTAX and e.kind == DeleteReason.PROTOCOL_ERROR and str(e) == "bad nonce"
    e = LocalProtocolError("IKE_SA_INIT refused", NotifyType.NO_PROPOSAL_CHOSEN)
    assert e.notify == NotifyType.NO_PROPOSAL_CHOSEN and isinstance(e, Exception)


def test_silent_peer_ends_with_timeout():
    n = _net()
    n.drop = lambda src, d: True
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 200)
    assert _kinds(n, "a")[0] == DeleteReason.TIMEOUT


def test_wrong_psk_ends_with_auth_failed_on_both_sides():
    n = _net(b_psk=b"another psk entirely 0123456789")
    n.a.initiate("node-b", n.now)
    n.pump()
    assert _kinds(n, "a") == [DeleteReason.AUTH_FAILED] and _kinds(n, "b") == [DeleteReason.AUTH_FAILED]
    assert n.a.counters.get("auth_failed") == 1 and n.b.counters.get("auth_failed") == 1


def test_local_delete_and_peer_delete_kinds():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    n.a.delete_all(n.now)
    n.pump()
    assert DeleteReason.LOCAL in _kinds(n, "a")
    assert _kinds(n, "b") == [DeleteReason.PEER_DELETED]


def _failed_sa(n):
    n.drop = lambda src, d: True
    n.a.initiate("node-b", n.now)
    n.pump()
    sa = next(iter(n.a._sas.values()))
    n.advance(T0 + 200)
    assert sa.is_dead and not list(n.a._sas_of("node-b"))
    return sa


@pytest.mark.parametrize("kind", list(DeleteReason))
def test_reinitiation_follows_the_kind_not_the_words(kind):
    n = _net()
    sa = _failed_sa(n)
    n.a._backoff.clear()
    # words that used to decide (AUTHENTICATION_FAILED, refused:, redundant, shutdown) say nothing now
    text = "refused: redundant shutdown AUTHENTICATION_FAILED revoked peer did not respond"
    n.a._timers.schedule_retry(sa, IkeSaDeleted("node-b", sa.spi_i, sa.spi_r, text, None, kind), n.now)
    if kind in NO_RETRY:
        assert "node-b" not in n.a._backoff
    elif kind in AUTH_BACKOFF:
        assert n.a._backoff["node-b"] == REINITIATE_AUTH_BASE_S
    else:
        assert n.a._backoff["node-b"] == REINITIATE_BASE_S


def test_a_refused_ike_sa_init_is_a_protocol_error_on_both_sides():
    from dataclasses import replace
    from agent.model import PeerPolicy
    pol_a = PeerPolicy(ike_proposals=("aes128gcm16-prfsha256-x25519",))
    pol_b = replace(pol_a, ike_proposals=("aes256gcm16-prfsha384-ecp384",))
    a = IkeManager(view("node-a", "node-b", policy=pol_a), Credentials(psk=PSK), DetRng("pa"), local_address=A_ADDR)
    b = IkeManager(view("node-b", "node-a", policy=pol_b), Credentials(psk=PSK), DetRng("pb"), local_address=B_ADDR)
    n = Net(a, b)
    n.a.initiate("node-b", n.now)
    n.pump()
    (ea,), (rb,) = n.of("a", IkeSaDeleted), n.of("b", InitsRefused)
    # b raised RemoteProtocolError(NO_PROPOSAL_CHOSEN): answered statelessly, counted and summarised
    # (an IKE_SA that never was makes no IkeSaDeleted, issue 13); a got LocalProtocolError
    assert not n.of("b", IkeSaDeleted) and rb.counts == {"no_proposal_chosen": 1}
    assert rb.detail.startswith("IKE_SA_INIT: no proposal chosen")
    assert ea.kind == DeleteReason.PROTOCOL_ERROR and ea.reason.startswith("IKE_SA_INIT refused: NO_PROPOSAL_CHOSEN")
