"""Retransmission schedule (RFC 7296 §2.1; agent.ike.retransmit): quick IKE_SA_INIT
retransmissions, per-peer configuration, and no duplicate IKE_SA from a late retransmission."""
from __future__ import annotations

from dataclasses import replace

import pytest

from agent.iana import ExchangeType
from agent.ike.events import ChildSaEstablished, IkeSaDeleted, IkeSaEstablished
from agent.ike.message import decode_message
from agent.ike.retransmit import DEFAULT_SCHEDULE, RetransmitSchedule, schedule_of
from agent.model import Credentials

from .conftest import CLASSICAL, T0, make_net, view

PSK = Credentials(psk=b"correct horse battery staple 0123")


def test_default_schedule_waits():
    s = DEFAULT_SCHEDULE
    assert [s.wait(i) for i in range(6)] == [1, 2, 4, 8, 16, 32]
    assert s.max_tries() == 5 and s.total() == 63
    assert [s.wait(i, init=True) for i in range(10)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 2, 4, 8, 16, 32])
    assert s.max_tries(init=True) == 9 and s.total(init=True) == pytest.approx(64.5)


def test_quick_phase_off_when_zero_or_not_shorter():
    for init in (0, 1.0, 5.0):
        s = RetransmitSchedule(init_timeout_s=init)
        assert s.max_tries(init=True) == s.max_tries() == 5
        assert [s.wait(i, init=True) for i in range(6)] == [s.wait(i) for i in range(6)]


@pytest.mark.parametrize("kw, field", [({"timeout_s": 0}, "timeout"), ({"base": 0.5}, "base"),
                                       ({"tries": -1}, "tries"), ({"tries": 2.5}, "tries"),
                                       ({"init_timeout_s": -1}, "IKE_SA_INIT")])
def test_bad_values_are_refused_with_the_field_named(kw, field):
    with pytest.raises(ValueError, match=field):
        RetransmitSchedule(**kw)


def test_schedule_of_policy_and_fallback():
    pol = replace(CLASSICAL, retransmit_timeout_s=0.5, retransmit_base=1.5, retransmit_tries=3,
                  init_retransmit_timeout_s=0)
    assert schedule_of(pol) == RetransmitSchedule(0.5, 1.5, 3, 0)
    assert schedule_of(CLASSICAL) is DEFAULT_SCHEDULE
    assert schedule_of(object()) is DEFAULT_SCHEDULE  # fields missing: defaults
    assert schedule_of(replace(CLASSICAL, retransmit_tries=-3)) is DEFAULT_SCHEDULE


def _net(policy=CLASSICAL):
    return make_net(view("node-a", "node-b", policy=policy), PSK, view("node-b", "node-a", policy=policy), PSK)


def test_configured_schedule_drives_retransmissions_and_failure():
    pol = replace(CLASSICAL, retransmit_timeout_s=0.5, retransmit_base=3.0, retransmit_tries=2,
                  init_retransmit_timeout_s=0)
    n = _net(pol)
    sent = []
    n.drop = lambda src, d: sent.append(n.now) or True
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 6.4)
    assert [t - T0 for t in sent] == pytest.approx([0, 0.5, 2.0])  # waits 0.5, 1.5, then 4.5
    assert not n.of("a", IkeSaDeleted)
    n.advance(T0 + 6.5)
    assert [d.reason for d in n.of("a", IkeSaDeleted)] == ["peer did not respond"]


def test_ike_auth_is_retransmitted_on_the_normal_schedule():
    """Only IKE_SA_INIT gets the quick phase: a lost IKE_AUTH request waits the full 1 s."""
    n = _net()
    lost = []
    n.drop = lambda src, d: (src == "a" and decode_message(d.data).exchange == ExchangeType.IKE_AUTH
                             and not lost and not lost.append(n.now))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert lost == [T0] and n.a.get_timer() == pytest.approx(T0 + 1.0)
    n.advance(T0 + 1.0)
    assert n.of("a", ChildSaEstablished)


def test_peer_starting_late_is_reached_within_the_quick_phase_with_one_ike_sa():
    """b is not listening for the first 0.25 s (every datagram to it lost): the IKE_SA is up at
    the third IKE_SA_INIT (0.3 s), and both sides hold exactly one IKE_SA."""
    n = _net()
    n.drop = lambda src, d: src == "a" and n.now < T0 + 0.25
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 0.29)
    assert not n.of("a", IkeSaEstablished)
    n.advance(T0 + 0.3)
    assert len(n.of("a", IkeSaEstablished)) == 1 and len(n.of("b", IkeSaEstablished)) == 1
    assert len(n.a.status()) == 1 and len(n.b.status()) == 1


def test_late_ike_sa_init_retransmission_opens_no_second_ike_sa():
    """A retransmitted IKE_SA_INIT reaching the responder after the IKE_SA is ESTABLISHED (the
    quick phase sent it before the response arrived) is ignored and counted, not answered with a
    new half-open IKE_SA."""
    n = _net()
    n.a.initiate("node-b", n.now)
    first = n.a.datagrams_to_send()[0]
    n.b.receive_datagram(first.data, first.remote, first.local, n.now)
    n.a.receive_datagram(*_one(n.b), n.now)
    n.pump()
    assert len(n.b.status()) == 1 and n.b.status()[0]["state"] == "ESTABLISHED"
    n.b.receive_datagram(first.data, first.remote, first.local, n.now + 0.1)  # the late copy
    assert n.b.datagrams_to_send() == []
    assert n.b.half_open() == 0 and len(n.b.status()) == 1
    assert n.b.counters.get("init_retransmit_late") == 1


def _one(m):
    (d,) = m.datagrams_to_send()
    return d.data, d.remote, d.local
