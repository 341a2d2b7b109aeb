"""Joining, endpoints brought by a view (issue 9): a pending negotiation restarts at once, the
joining node initiates too, and no duplicate IKE_SA results."""
from __future__ import annotations

from dataclasses import replace

from agent.ike.events import IkeSaEstablished
from agent.ike.manager import IkeManager
from agent.ike.sa import State
from agent.model import Credentials

from .conftest import A_ADDR, B_ADDR, CLASSICAL, T0, DetRng, Net, view

PSK = Credentials(psk=b"joining tests psk 0123456789abcde")
POL = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0, dpd_interval_s=0)


def _mgr(v, seed):
    return IkeManager(v, PSK, DetRng(seed), local_address=v.local_address)


def _up(m):
    return [sa for sa in m._sas.values() if sa.state == State.ESTABLISHED]


def test_joining_node_initiates_although_the_tie_break_leaves_it_to_the_peer():
    """a (initiator by the tie-break) started at the inventory edit; b was not running, so a's
    IKE_SA_INIT retransmits into the void (next try 16 s away at t=40 s). b starts at 40 s and
    initiates itself (join): the IKE_SA is up at once, a drops its unanswered IKE_SA_INIT (moot
    now) and exactly one IKE_SA exists (before: b waited for a's retransmission at 48.5 s)."""
    a = _mgr(view("node-a", "node-b", policy=POL), "a")
    b_down = _mgr(view("node-b", "node-a", policy=POL, initiate=False), "b0")
    n = Net(a, b_down)
    n.drop = lambda src, d: True  # b's host answers nothing yet
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 40.0)
    assert not n.of("a", IkeSaEstablished) and a.get_timer() > T0 + 48
    n.drop = None
    n.b = _mgr(view("node-b", "node-a", policy=POL, initiate=False), "b1")
    assert n.b.join(n.now) == ["node-a"]
    n.pump()
    assert len(_up(n.a)) == 1 and len(_up(n.b)) == 1
    assert (_up(n.a)[0].spi_i, _up(n.a)[0].spi_r) == (_up(n.b)[0].spi_i, _up(n.b)[0].spi_r)
    assert n.a.counters["own_init_moot"] == 1
    n.advance(T0 + 200.0)  # the abandoned exchange leaves nothing behind
    assert len(_up(n.a)) == 1 and len(_up(n.b)) == 1 and n.b.half_open() == 0


def test_view_bringing_the_endpoint_restarts_the_pending_negotiation_at_once():
    """a's view had a wrong endpoint for b; the corrected view starts IKE_SA_INIT to the new
    address at once (before: the old exchange kept retransmitting to the old address for 63 s
    and then backed off)."""
    wrong = view("node-a", "node-b", policy=POL, peer_addr="203.0.113.50")
    n = Net(_mgr(wrong, "a"), _mgr(view("node-b", "node-a", policy=POL, initiate=False), "b"))
    sent_to = []
    n.drop = lambda src, d: sent_to.append(d.remote[0]) or d.remote[0] == "203.0.113.50"
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 20.0)
    assert set(sent_to) == {"203.0.113.50"}
    n.a.update_view(view("node-a", "node-b", policy=POL), n.now)
    n.pump()
    assert n.of("a", IkeSaEstablished) and n.of("a", IkeSaEstablished)[0].remote[0] == B_ADDR
    assert n.a.counters["initiation_restarted"] == 1 and len(_up(n.a)) == 1
    n.advance(T0 + 200.0)
    assert len(_up(n.a)) == 1


def test_view_bringing_a_peer_back_starts_it_at_once():
    v = view("node-a", "node-b", policy=POL)
    a = _mgr(v, "a")
    n = Net(a, _mgr(view("node-b", "node-a", policy=POL), "b"))
    n.drop = lambda src, d: True
    a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 64.5)  # failed: re-initiation held for 2 s
    a.update_view(replace(v, peers=()), n.now)  # removed ...
    n.drop = None
    a.update_view(v, n.now)  # ... and brought back: started now, not after the backoff
    n.pump()
    assert n.of("a", IkeSaEstablished) and n.now == T0 + 64.5


def test_join_respects_policy_gateway_role_and_existing_sas():
    pool = replace(POL, virtual_ip_pool="10.99.0.0/24")
    gw = _mgr(view("node-a", "node-b", policy=pool, initiate=False), "gw")
    assert gw.join(T0) == [] and gw._sas == {}  # CP gateway: only the host may start
    bypass = _mgr(view("node-a", "node-b", policy=replace(POL, action="bypass")), "by")
    assert bypass.join(T0) == [] and bypass._sas == {}
    m = _mgr(view("node-a", "node-b", policy=POL), "m")
    assert m.join(T0) == ["node-b"] and m.join(T0) == []  # idempotent while negotiating
    assert len(m._sas) == 1


def test_cold_start_both_join_one_ike_sa():
    """Both agents start at once and both join: their IKE_SA_INITs cross, b (the higher name,
    left to respond by the tie-break) drops its own, a's completes; one IKE_SA on each side."""
    n = Net(_mgr(view("node-a", "node-b", policy=POL), "a"),
            _mgr(view("node-b", "node-a", policy=POL, initiate=False), "b"))
    n.a.join(n.now)
    n.b.join(n.now)
    n.pump()
    (sa_a,), (sa_b,) = _up(n.a), _up(n.b)
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r) and sa_a.initiator
    assert A_ADDR == sa_b.remote[0] and n.b.counters["own_init_superseded"] == 1


def test_half_open_of_another_peer_behind_the_same_address_is_kept():
    """Hosts behind one NAT share an address: an IKE_SA coming up with one of them drops no
    half-open IKE_SA from that address (it may be the other host's)."""
    from agent.model import Peer
    v = view("node-a", "node-b", policy=POL)
    c = Peer(name="node-c", identity="node-c", endpoints=(B_ADDR,), subnets=v.peers[0].subnets, policy=POL)
    a = _mgr(replace(v, peers=(*v.peers, c)), "a")
    n = Net(a, _mgr(view("node-b", "node-a", policy=POL, initiate=False), "b"))
    stranger = _mgr(view("node-c", "node-a", policy=POL, my_addr=B_ADDR), "c")
    stranger.initiate("node-a", n.now)  # node-c's IKE_SA_INIT from the shared address
    (d,) = stranger.datagrams_to_send()
    a.receive_datagram(d.data, d.remote, d.local, n.now)
    a.datagrams_to_send()
    assert a.half_open() == 1
    n.b.initiate("node-a", n.now)  # node-b's IKE_SA comes up at a (responder)
    n.pump()
    assert len(_up(n.a)) == 1 and a.half_open() == 1 and "half_open_moot" not in a.counters


def test_join_skips_a_peer_the_operator_marked_initiate_false():
    """``initiate: false`` written in the standalone config (Peer.responder_only): no IKE_SA_INIT at
    start-up towards a gateway that initiates to us itself (strongSwan does not follow our
    crossed-init rule); left to the tie-break (initiate False, not written), join still starts."""
    v = view("node-b", "node-a", policy=POL, initiate=False)
    only = replace(v, peers=tuple(replace(p, responder_only=True) for p in v.peers))
    m = _mgr(only, "ro")
    assert m.join(T0) == [] and m._sas == {}
    assert _mgr(v, "tb").join(T0) == ["node-a"]


def test_config_marks_an_explicit_initiate_false_as_responder_only(tmp_path):
    from agent.config import load_config
    base = ("name: b\nlocal_address: 198.51.100.2\nsubnets: [10.2.0.0/24]\n"
            "auth: {psk: 'joining tests psk 0123456789abcde'}\npeers:\n"
            "  - name: a\n    endpoints: [198.51.100.1]\n    subnets: [10.1.0.0/24]\n")
    for extra, want in (("", False), ("    initiate: false\n", True), ("    initiate: true\n", False)):
        f = tmp_path / "c.yaml"
        f.write_text(base + extra)
        view_, _creds = load_config(str(f))[:2]
        assert view_.peers[0].responder_only is want, extra
