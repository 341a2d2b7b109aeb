"""Bad policy data (docs/ike-hardening.md), sans-I/O: a proposal typo or another bad
field in one peer's policy refuses that peer only, before any exchange on the initiator
and at IKE_AUTH on the responder, with a clear reason; a fixed policy clears the error.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from agent.ike.events import ChildSaEstablished, IkeSaDeleted, IkeSaEstablished, PeerRefused
from agent.ike.manager import IkeManager
from agent.model import Credentials, NodeView, Peer

from tests.ike.conftest import A_ADDR, A_NET, B_ADDR, B_NET, DetRng, T0, view
from tests.ike.helpers import NOLIFE, PSK, psk_net, up


# ------------------------------------------------------------------ 7. bad policy data

def _three(b_peers_policy, *, a_policy=NOLIFE, c_policy=NOLIFE):
    """node-b configured with node-a and node-c; node-a and node-c each know only node-b."""
    C_ADDR = "198.51.100.3"
    c_net = ipaddress.ip_network("10.3.0.0/16")
    b_view = NodeView("node-b", "node-b", (B_NET,), (
        Peer("node-a", "node-a", (A_ADDR,), (A_NET,), policy=b_peers_policy.get("node-a", NOLIFE)),
        Peer("node-c", "node-c", (C_ADDR,), (c_net,), policy=b_peers_policy.get("node-c", NOLIFE))), B_ADDR)
    a = IkeManager(view("node-a", "node-b", policy=a_policy), Credentials(psk=PSK), DetRng("3a"), local_address=A_ADDR)
    c_view = NodeView("node-c", "node-c", (c_net,), (Peer("node-b", "node-b", (B_ADDR,), (B_NET,), policy=c_policy),),
                      C_ADDR)
    c = IkeManager(c_view, Credentials(psk=PSK), DetRng("3c"), local_address=C_ADDR)
    b = IkeManager(b_view, Credentials(psk=PSK), DetRng("3b"), local_address=B_ADDR)
    nodes = {A_ADDR: a, B_ADDR: b, C_ADDR: c}
    events = {k: [] for k in nodes}

    def pump():
        for _ in range(50):
            moved = False
            for addr, m in nodes.items():
                for d in m.datagrams_to_send():
                    moved = True
                    nodes[d.remote[0]].receive_datagram(d.data, d.remote, d.local, T0)
            for addr, m in nodes.items():
                while (e := m.next_event()) is not None:
                    events[addr].append(e)
            if not moved:
                return
    return a, b, c, pump, events, C_ADDR


def test_bad_ike_proposal_in_policy_refuses_that_peer_only():
    bad = replace(NOLIFE, ike_proposals=("aes128gcm16x-prfsha256-x25519",))
    a, b, c, pump, events, C_ADDR = _three({"node-a": bad}, a_policy=bad)
    a.initiate("node-b", T0)  # no exception out of initiate
    pump()
    assert a.counters["bad_policy"] == 1 and "aes128gcm16x" in a.policy_errors["node-b"]
    (refused,) = [e for e in events[A_ADDR] if isinstance(e, PeerRefused)]
    assert refused.peer == "node-b" and "aes128gcm16x-prfsha256-x25519" in refused.reason
    assert a.status() == [] and a.get_timer() is None
    # node-b's own typo for node-a does not stop node-c (pre-fix: NO_PROPOSAL_CHOSEN for all)
    c.initiate("node-b", T0)
    pump()
    assert any(isinstance(e, ChildSaEstablished) for e in events[C_ADDR])


def test_bad_esp_proposal_on_the_initiator_is_refused_before_any_exchange():
    bad = replace(NOLIFE, esp_proposals=("aes128gcm17",))
    n = psk_net(bad, NOLIFE)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.log == [] and "aes128gcm17" in n.a.policy_errors["node-b"]
    assert n.a.counters.get("internal_error") is None


def test_responder_with_bad_child_policy_refuses_ike_auth_and_keeps_no_ike_sa():
    """HDR, SK {IDi, AUTH, SA, TSi, TSr} --> <-- HDR, SK {N(NO_PROPOSAL_CHOSEN)}: never an
    ESTABLISHED IKE_SA whose CHILD_SA the ESP core would refuse (replay_window 100)."""
    a, b, c, pump, events, C_ADDR = _three({"node-a": replace(NOLIFE, replay_window=100),
                                            "node-c": replace(NOLIFE, esp_proposals=("nonsense",))})
    for m in (a, c):
        m.initiate("node-b", T0)
    pump()
    assert not any(isinstance(e, (IkeSaEstablished, ChildSaEstablished)) for e in events[B_ADDR])
    assert b.status() == [] and b.counters.get("internal_error") is None
    assert "replay_window" in b.policy_errors["node-a"] and "nonsense" in b.policy_errors["node-c"]
    assert [e.reason for e in events[A_ADDR] if isinstance(e, IkeSaDeleted)] == ["IKE_AUTH failed: NO_PROPOSAL_CHOSEN"]
    assert {e.peer for e in events[B_ADDR] if isinstance(e, PeerRefused)} == {"node-a", "node-c"}


@pytest.mark.parametrize("field,value,words", [
    ("replay_window", 100, "multiple of 32"),
    ("replay_window", 0, "allow_no_replay"),
    ("virtual_ip_pool", "10.99.0.0/33", "virtual_ip_pool"),
    ("request_virtual_ip", (5,), "request_virtual_ip"),
    ("fragment_size", 100, "fragment_size"),
    ("esp_proposals", ("sha256x",), "sha256x"),
    ("dpd_interval_s", -1, "dpd_interval_s"),
])
def test_initiator_refuses_each_bad_policy_field_with_a_clear_reason(field, value, words):
    n = psk_net(replace(NOLIFE, **{field: value}), NOLIFE)
    n.a.initiate("node-b", n.now)
    assert n.a.datagrams_to_send() == []
    assert words in n.a.policy_errors["node-b"] and "node-b" in n.a.policy_errors["node-b"]


def test_fixed_policy_in_a_new_view_clears_the_error():
    n = psk_net(replace(NOLIFE, replay_window=100), NOLIFE)
    n.a.initiate("node-b", n.now)
    assert "node-b" in n.a.policy_errors
    n.a.update_view(view("node-a", "node-b", policy=NOLIFE), n.now)
    assert n.a.policy_errors == {}
    up(n)
