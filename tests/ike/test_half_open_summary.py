"""Half-open IKE_SAs dropped (evicted, expired) are counted and summarised, not one IkeSaDeleted
(= one INFO log line) each: 17,507 lines in 30 s under a COOKIE-answering flood (issue 13)."""
from __future__ import annotations

from agent.ike.errors import DeleteReason
from agent.ike.events import HalfOpenDropped, IkeSaDeleted

from tests.ike.conftest import A_ADDR, B_ADDR, T0, make_net, view
from tests.ike.test_admission import LOCAL, PSK, _request, _responder
from agent.model import Credentials


def _src(i: int) -> tuple[str, int]:
    return (f"203.0.113.{i % 250 + 1}", 500 + i)


def _events(m):
    return list(iter(m.next_event, None))


def test_evicted_and_expired_half_open_ike_sas_are_summarised_not_one_event_each():
    m = _responder(half_open_max=4, half_open_per_source=1000, init_rate=0, cookie_threshold=1000)
    for i in range(200):
        m.receive_datagram(_request(0x1000 + i), LOCAL, _src(i), T0 + i * 0.01)
    m.datagrams_to_send()
    evs = _events(m)
    assert m.counters["half_open_evicted"] == 196
    assert not [e for e in evs if isinstance(e, IkeSaDeleted)]
    (first,) = [e for e in evs if isinstance(e, HalfOpenDropped)]  # the first at once
    assert first.counts == {"dropped": 1}
    # the rest once REFUSAL_SUMMARY_S passed, by a timer
    assert m.get_timer() == T0 + 0.04 + 10  # the first eviction came with request 4
    m.handle_timer(T0 + 10.04)
    (ev,) = [e for e in _events(m) if isinstance(e, HalfOpenDropped)]
    assert ev.counts == {"dropped": 195} and ev.last == _src(195) and "too many half-open" in ev.detail
    # the last 4 expire (30 s): one more summary, still no IkeSaDeleted
    evs = []
    t = T0 + 10
    while (t := m.get_timer()) is not None and t < T0 + 100:
        m.handle_timer(t)
        evs += _events(m)
    assert m.half_open() == 0 and not [e for e in evs if isinstance(e, IkeSaDeleted)]
    assert sum(sum(e.counts.values()) for e in evs if isinstance(e, HalfOpenDropped)) == 4
    assert {k for e in evs if isinstance(e, HalfOpenDropped) for k in e.counts} == {DeleteReason.SETUP_TIMEOUT}
    assert m.counters["half_open_dropped_setup_timeout"] == 4 and m.counters["half_open_dropped_dropped"] == 196


def test_our_own_half_open_initiation_still_reports_its_ike_sa_deleted():
    """An IKE_SA we initiated to a configured peer that never answers still ends in IkeSaDeleted
    (the operator's log line and the peer's last error)."""
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK), view("node-b", "node-a"), Credentials(psk=PSK))
    n.drop = lambda src, d: True  # node-b never hears us
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(n.now + 400)
    dels = n.of("a", IkeSaDeleted)
    assert dels and dels[0].kind in (DeleteReason.TIMEOUT, DeleteReason.SETUP_TIMEOUT)
    assert not n.of("a", HalfOpenDropped)
