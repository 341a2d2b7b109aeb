"""IkeManager (docs/design.md): SPI demultiplexing, drop counters, idempotent initiate,
INITIAL_CONTACT, re-initiation backoff, status(), view updates. Sans-I/O, fake clock."""
from __future__ import annotations

import json

import pytest

from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeKeysDerived, IkeSaDeleted, IkeSaEstablished
from agent.ike.manager import IkeManager
from agent.ike.message import EncryptedPayload, Message, NotifyPayload, decode_message, encode_message
from agent.model import Credentials, NodeView

from tests.ike.conftest import A_ADDR, B_ADDR, DetRng, T0, Net, view

PSK = b"manager tests psk 0123456789"


def _net(seed="m"):
    a = IkeManager(view("node-a", "node-b"), Credentials(psk=PSK), DetRng(seed + "a"), local_address=A_ADDR)
    b = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng(seed + "b"), local_address=B_ADDR)
    return Net(a, b)


def _up(n):
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_initiate_is_idempotent_per_peer():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.a.initiate("node-b", n.now)
    assert len(n.a.datagrams_to_send()) == 1
    assert len(n.a.status()) == 1


def test_initiate_unknown_peer_is_a_clear_error():
    n = _net()
    with pytest.raises(ValueError, match="unknown peer 'node-z'"):
        n.a.initiate("node-z", n.now)


def test_unknown_spi_and_malformed_are_counted():
    n = _net()
    junk = Message(0x1111, 0x2222, 37, 5, True, False, (EncryptedPayload(0, b"\0" * 40),))
    n.b.receive_datagram(encode_message(junk), (B_ADDR, 4500), (A_ADDR, 4500), n.now)
    n.b.receive_datagram(b"\x01\x02", (B_ADDR, 500), (A_ADDR, 500), n.now)
    # an encrypted request for an unknown IKE SPI is answered by an unprotected
    # N(INVALID_IKE_SPI) (RFC 7296 §2.21.4); see tests/ike/test_half_open_and_peer_restart.py
    # and, since the sender is a configured peer we have no IKE_SA with, b initiates itself
    assert n.b.counters == {"unknown_spi": 1, "malformed": 1, "invalid_ike_spi_sent": 1,
                            "initiated_after_invalid_ike_spi": 1}
    reply, init = [decode_message(d.data) for d in n.b.datagrams_to_send()]
    assert reply.is_response and reply.notify(4) is not None  # INVALID_IKE_SPI (4)
    assert init.exchange == 34 and not init.is_response  # IKE_SA_INIT


def test_unexpected_payload_outside_sk_is_counted():
    n = _net()
    _up(n)
    st = n.a.status()[0]
    bad = Message(int(st["spi_i"], 16), int(st["spi_r"], 16), 37, 9, True, False,
                  (NotifyPayload(16384),))
    n.b.receive_datagram(encode_message(bad), (B_ADDR, 4500), (A_ADDR, 4500), n.now)
    assert n.b.counters == {"unexpected_payload": 1}


def test_forged_icv_is_counted_and_retransmission_recovers():
    """HDR, SK {...}(ICV altered) --> dropped as bad_icv; the retransmission succeeds."""
    n = _net()
    state = {"done": False}

    def tamper(src, d):
        if src == "a" and decode_message(d.data).exchange == 35 and not state["done"]:
            state["done"] = True
            forged = bytearray(d.data)
            forged[-1] ^= 1
            n.b.receive_datagram(bytes(forged), d.remote, d.local, n.now)
            return True
        return False
    n.drop = tamper
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.b.counters == {"bad_icv": 1} and not n.of("b", ChildSaEstablished)
    n.advance(n.now + 1.0)
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_stale_message_id_is_counted():
    n = _net()
    _up(n)
    auth_resp = [d for s, d in n.log if s == "b"][1]
    n.a.receive_datagram(auth_resp.data, auth_resp.remote, auth_resp.local, n.now)
    assert n.a.counters == {"invalid_message_id": 1}


def test_initial_contact_replaces_older_ike_sas():
    """A restarts (new manager, no state) and sends N(INITIAL_CONTACT): B drops its old IKE_SA."""
    n = _net()
    _up(n)
    old = n.b.status()[0]
    n.a = IkeManager(view("node-a", "node-b"), Credentials(psk=PSK), DetRng("rebooted"), local_address=A_ADDR)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(n.b.status()) == 1 and n.b.status()[0]["spi_i"] != old["spi_i"]
    dels = n.of("b", IkeSaDeleted)
    assert [d.reason for d in dels] == ["peer sent INITIAL_CONTACT"] and f"{dels[0].spi_i:016x}" == old["spi_i"]
    assert len(n.of("b", ChildSaDeleted)) == 1 and len(n.of("b", ChildSaEstablished)) == 2


F = 64.5  # an unanswered IKE_SA_INIT fails after this (agent.ike.retransmit defaults)


def test_reinitiate_with_backoff_after_failure():
    n = _net()
    n.drop = lambda src, d: True
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + F)  # first IKE_SA fails (IKE_SA_INIT schedule: 64.5 s)
    assert len(n.of("a", IkeSaDeleted)) == 1
    assert n.a.get_timer() == T0 + F + 2.0
    inits = lambda: [d for s, d in n.log if decode_message(d.data).message_id == 0  # noqa: E731
                     and decode_message(d.data).spi_r == 0 and not decode_message(d.data).is_response]
    k = len({decode_message(d.data).spi_i for d in inits()})
    n.advance(T0 + F + 2)
    assert len({decode_message(d.data).spi_i for d in inits()}) == k + 1  # new IKE_SA_INIT
    n.advance(T0 + F + 2 + F)
    assert len(n.of("a", IkeSaDeleted)) == 2
    assert n.a.get_timer() == T0 + F + 2 + F + 4.0  # doubled
    n.drop = None
    n.advance(T0 + F + 2 + F + 4.0)
    assert n.of("a", ChildSaEstablished)


def test_no_reinitiate_when_peer_does_not_initiate():
    a_view = view("node-a", "node-b", initiate=False)
    n = Net(IkeManager(a_view, Credentials(psk=PSK), DetRng("x"), local_address=A_ADDR),
            IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("y"), local_address=B_ADDR))
    n.drop = lambda src, d: True
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + F)
    assert n.of("a", IkeSaDeleted) and n.a.get_timer() is None


def test_status_is_json_ready_and_has_no_keys():
    n = _net()
    _up(n)
    st = n.a.status()
    text = json.dumps(st)
    (entry,) = st
    assert entry["peer"] == "node-b" and entry["state"] == "ESTABLISHED" and entry["initiator"]
    assert entry["established"] == T0 and len(entry["children"]) == 1
    ch = n.of("a", ChildSaEstablished)[0]
    assert entry["children"][0]["inbound_spi"] == f"{ch.inbound.spi:08x}"
    keys = n.of("a", IkeKeysDerived)[0]
    for secret in (keys.sk_ei, keys.sk_er, ch.inbound.encr_key, ch.outbound.encr_key):
        assert secret.hex() not in text and secret.hex() not in repr(n.a._sas)


def test_update_view_removing_the_peer_deletes_its_ike_sa():
    n = _net()
    _up(n)
    v = n.a.view
    n.a.update_view(NodeView(v.name, v.identity, v.subnets, (), v.local_address, v.version + 1), n.now)
    n.pump()
    assert n.of("a", IkeSaDeleted)[0].reason == "peer removed from view"
    assert n.of("b", IkeSaDeleted)[0].reason == "deleted by peer"
    assert n.a.get_timer() is None


def test_delete_all_then_nothing_restarts():
    n = _net()
    _up(n)
    n.a.delete_all(n.now)
    n.pump()
    n.advance(n.now + 600)
    assert len(n.of("a", IkeSaEstablished)) == 1 and n.a.status() == []
    n.a.initiate("node-b", n.now)
    assert n.a.datagrams_to_send() == []


def test_simultaneous_initiation_leaves_both_sides_consistent():
    """Both ends initiate at once (both send INITIAL_CONTACT): no side may delete an IKE_SA the
    other still uses; every CHILD_SA installed on one side exists on the other."""
    n = _net("sim")
    n.a.initiate("node-b", n.now)
    n.b.initiate("node-a", n.now)
    n.pump()
    in_a = {e.inbound.spi for e in n.of("a", ChildSaEstablished)} - {e.inbound_spi for e in n.of("a", ChildSaDeleted)}
    out_b = {e.outbound.spi for e in n.of("b", ChildSaEstablished)} - {e.outbound_spi for e in n.of("b", ChildSaDeleted)}
    assert in_a and in_a == out_b
    # b dropped its crossed, unanswered IKE_SA_INIT (the higher name does); a drops its half-open
    # IKE_SA for it once the IKE_SA is up (it would wait for an IKE_AUTH that never comes)
    assert len(n.a.status()) == 1 and n.a.half_open() == 0
    assert n.b.counters["own_init_superseded"] == 1 and "own_init_superseded" not in n.a.counters
    assert n.a.counters["half_open_moot"] == 1


def test_status_has_created_and_established_on_the_callers_clock():
    """IkeManager.status(): ``created`` when IKE_SA_INIT was sent / received, ``established`` when
    IKE_AUTH completed (RFC 7296 §1.2), both on the ``now`` clock; None before IKE_AUTH."""
    from tests.ike.conftest import CLASSICAL, make_net, view
    psk = Credentials(psk=b"correct horse battery staple 0123")
    n = make_net(view("node-a", "node-b", policy=CLASSICAL), psk, view("node-b", "node-a", policy=CLASSICAL), psk)
    t0 = n.now
    n.a.initiate("node-b", t0)
    (row,) = n.a.status()
    assert row["created"] == t0 and row["established"] is None
    n.now = t0 + 0.25  # the wire takes a while
    n.pump()
    (a_row,), (b_row,) = n.a.status(), n.b.status()
    assert (a_row["created"], a_row["established"]) == (t0, t0 + 0.25)
    assert (b_row["created"], b_row["established"]) == (t0 + 0.25, t0 + 0.25)
