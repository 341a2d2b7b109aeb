"""Sans-I/O IKEv2 exchanges between two IkeManagers (RFC 7296 §1.2-1.4, §2.1, §2.7, §2.9,
§2.15, §2.17, §2.23) over an in-memory wire with a fake clock and deterministic rng.

Certificates come from a test CA built in conftest.py (ECDSA P-256, SAN dNSName = node name).
"""
from __future__ import annotations

import ipaddress
import struct

import pytest

from agent.iana import EncrId, ExchangeType, NotifyType, PayloadType
from agent.ike.events import (ChildSaDeleted, ChildSaEstablished, ChildSaRefused, IkeKeysDerived, IkeSaDeleted,
                              IkeSaEstablished)
from agent.ike.message import (KePayload, Message, NoncePayload, NotifyPayload, UnknownPayload, decode_message,
                               encode_message)
from agent.ike.proposals import parse_ike_proposal
from agent.ike import child as ch
from agent.model import Credentials, PeerPolicy

from tests.ike.conftest import A_ADDR, B_ADDR, A_NET, B_NET, T0, cert_creds, make_net, view

PSK = b"correct horse battery staple 0123"


def _exchanges(n, src):
    return [(decode_message(d.data).exchange, decode_message(d.data).is_response) for s, d in n.log if s == src]


# ------------------------------------------------------------------ happy paths

def test_cert_ike_sa_init_and_ike_auth_establish_mirrored_child_sa(cert_net):
    """HDR, SA, KEi, Ni, N(NAT_D), N(SIGNATURE_HASH_ALGORITHMS) -->
    <-- HDR, SA, KEr, Nr, N(NAT_D), CERTREQ, N(SIGNATURE_HASH_ALGORITHMS)
    HDR, SK {IDi, CERT, CERTREQ, N(INITIAL_CONTACT), IDr, AUTH, SA, TSi, TSr} -->
    <-- HDR, SK {IDr, CERT, AUTH, SA, TSi, TSr}"""
    n = cert_net
    n.a.initiate("node-b", n.now)
    n.pump()
    assert _exchanges(n, "a") == [(34, False), (35, False)]
    assert _exchanges(n, "b") == [(34, True), (35, True)]
    (ea,), (eb,) = n.of("a", IkeSaEstablished), n.of("b", IkeSaEstablished)
    assert ea.peer == "node-b" and eb.peer == "node-a" and ea.initiator and not eb.initiator
    assert (ea.spi_i, ea.spi_r) == (eb.spi_i, eb.spi_r)
    assert ea.algorithms == eb.algorithms == parse_ike_proposal("aes128gcm16-prfsha256-x25519").describe()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    # §2.17: A's outbound keys are B's inbound keys and vice versa
    assert ca.outbound == cb.inbound and ca.inbound == cb.outbound
    assert ca.inbound.spi != ca.outbound.spi
    assert ca.inbound.encr_id == EncrId.ENCR_AES_GCM_16 and len(ca.inbound.encr_key) == 16 + 4  # key + salt
    assert ca.local_ts == (A_NET,) and ca.remote_ts == (B_NET,)
    assert cb.local_ts == (B_NET,) and cb.remote_ts == (A_NET,)
    assert ca.mode == "tunnel" and ca.rekey_of is None
    # default policy encapsulation "udp": forced NAT-T, IKE_AUTH and ESP on 4500 (RFC 3948)
    assert ca.udp_encap and cb.udp_encap
    assert ca.local == (A_ADDR, 4500) and ca.remote == (B_ADDR, 4500) and cb.remote == (A_ADDR, 4500)
    ports = [(d.local[1], d.remote[1]) for s, d in n.log]
    assert ports == [(500, 500), (500, 500), (4500, 4500), (4500, 4500)]
    ka, kb = n.of("a", IkeKeysDerived), n.of("b", IkeKeysDerived)
    assert ka == kb and ka[0].encr_wireshark == "AES-GCM-128 with 16 octet ICV [RFC5282]"
    assert "sk_ei" not in repr(ka[0]) or ka[0].sk_ei.hex() not in repr(ka[0])
    assert ca.inbound.encr_key.hex() not in repr(ca)


def test_psk_establishes_child_sa_without_certificates(psk_net):
    """HDR, SK {IDi, IDr, AUTH(SHARED_KEY_MESSAGE_INTEGRITY_CODE), SA, TSi, TSr} -->"""
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.outbound == cb.inbound and ca.inbound == cb.outbound
    auth_req = [d for s, d in n.log if s == "a"][1]
    assert decode_message(auth_req.data).exchange == ExchangeType.IKE_AUTH


def test_no_nat_no_forced_encap_stays_on_port_500(pki):
    pol = PeerPolicy(encapsulation="none", esp_proposals=("aes256-sha256",))
    n = make_net(view("node-a", "node-b", policy=pol), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=pol), cert_creds(pki, "b"))
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert not ca.udp_encap and not cb.udp_encap
    assert {d.local[1] for s, d in n.log} == {500}
    assert ca.outbound == cb.inbound and len(ca.outbound.integ_key) == 32 and len(ca.outbound.encr_key) == 32


def test_transport_mode_when_both_ask(psk_net):
    pol = PeerPolicy(mode="transport")
    n = make_net(view("node-a", "node-b", policy=pol), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=pol), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished)[0].mode == "transport" == n.of("b", ChildSaEstablished)[0].mode


# ------------------------------------------------------------------ INVALID_KE_PAYLOAD

def test_invalid_ke_payload_retry_with_the_named_group():
    """HDR, SA, KEi(x25519), Ni -->  <-- HDR, N(INVALID_KE_PAYLOAD, ECP_256)
    HDR, SA, KEi(ecp256), Ni -->  ... established."""
    a_pol = PeerPolicy(ike_proposals=("aes128gcm16-prfsha256-x25519-ecp256",))
    b_pol = PeerPolicy(ike_proposals=("aes128gcm16-prfsha256-ecp256",))
    n = make_net(view("node-a", "node-b", policy=a_pol), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=b_pol), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    msgs = [(s, decode_message(d.data)) for s, d in n.log]
    assert msgs[0][1].first(PayloadType.KE).group == 31
    assert msgs[1][1].notify(NotifyType.INVALID_KE_PAYLOAD).data == struct.pack("!H", 19)
    assert msgs[2][1].first(PayloadType.KE).group == 19 and msgs[2][1].spi_i == msgs[0][1].spi_i
    assert len(n.of("a", ChildSaEstablished)) == 1 and len(n.of("b", ChildSaEstablished)) == 1


def test_invalid_ke_payload_for_a_group_we_did_not_offer_fails(psk_net):
    n = psk_net
    n.a.initiate("node-b", n.now)
    req = decode_message(n.a.datagrams_to_send()[0].data)
    resp = Message(req.spi_i, 0, 34, 0, False, True, (NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, b"\x00\x0e"),))
    n.a.receive_datagram(encode_message(resp), (A_ADDR, 500), (B_ADDR, 500), n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert "did not offer" in d.reason
    assert n.a.datagrams_to_send() == []


def test_no_proposal_chosen_fails_initiator():
    a_pol = PeerPolicy(ike_proposals=("aes256-sha256-prfsha256-modp2048",))
    n = make_net(view("node-a", "node-b", policy=a_pol), Credentials(psk=PSK),
                 view("node-b", "node-a"), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("a", IkeSaDeleted)
    assert d.reason == "IKE_SA_INIT refused: NO_PROPOSAL_CHOSEN"
    assert n.b.status() == []


# ------------------------------------------------------------------ retransmission

def test_dropped_first_message_is_retransmitted_after_0_1s(psk_net):
    """A lost IKE_SA_INIT (the peer was not listening yet) is retransmitted after 0.1 s, not 1 s
    (agent.ike.retransmit: quick first retransmissions of IKE_SA_INIT)."""
    n = psk_net
    dropped = []
    n.drop = lambda src, d: (len(dropped) == 0 and src == "a") and not dropped.append(d)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(dropped) == 1 and not n.of("a", IkeSaEstablished)
    assert n.a.get_timer() == pytest.approx(T0 + 0.1)
    n.advance(T0 + 0.099)
    assert len(n.log) == 1
    n.advance(T0 + 0.1)
    assert n.log[1][1].data == n.log[0][1].data  # same bytes retransmitted (§2.1)
    assert len(n.of("a", ChildSaEstablished)) == 1
    assert len(n.b.status()) == 1  # one IKE_SA at the responder


def test_no_answer_retransmits_with_backoff_then_fails(psk_net):
    """IKE_SA_INIT: sends at 0, 0.1, 0.3, 0.7, 1.5 s (quick phase), then 2.5, 4.5, 8.5, 16.5,
    32.5 s; fails at 64.5 s with 'peer did not respond'."""
    n = psk_net
    sent_at = []
    n.drop = lambda src, d: sent_at.append(n.now) or True
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 64.4)
    assert [t - T0 for t in sent_at] == pytest.approx([0, 0.1, 0.3, 0.7, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5])
    assert not n.of("a", IkeSaDeleted)
    n.advance(T0 + 64.5)
    (d,) = n.of("a", IkeSaDeleted)
    assert d.reason == "peer did not respond"


def test_repeated_ike_auth_request_gets_the_cached_response(cert_net):
    n = cert_net
    n.a.initiate("node-b", n.now)
    n.pump()
    auth_req = [d for s, d in n.log if s == "a"][1]
    auth_resp = [d for s, d in n.log if s == "b"][1]
    n.b.receive_datagram(auth_req.data, auth_req.remote, auth_req.local, n.now)
    (again,) = n.b.datagrams_to_send()
    assert again.data == auth_resp.data
    assert n.b.next_event() is None  # nothing re-established


def test_repeated_ike_sa_init_request_gets_the_same_response(psk_net):
    n = psk_net
    n.a.initiate("node-b", n.now)
    (init,) = n.a.datagrams_to_send()
    n.b.receive_datagram(init.data, init.remote, init.local, n.now)
    (r1,) = n.b.datagrams_to_send()
    n.b.receive_datagram(init.data, init.remote, init.local, n.now + 0.5)
    (r2,) = n.b.datagrams_to_send()
    assert r1.data == r2.data and len(n.b.status()) == 1


# ------------------------------------------------------------------ authentication failures

def _assert_no_child(n):
    assert not n.of("a", ChildSaEstablished) and not n.of("b", ChildSaEstablished)


def test_wrong_identity_is_authentication_failed(pki):
    """B expects the identity 'node-x' for its peer; A says IDi=node-a --> <-- N(AUTHENTICATION_FAILED)."""
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"),
                 view("node-b", "node-a", peer_identity="node-x"), cert_creds(pki, "b"))
    n.a.initiate("node-b", n.now)
    n.pump()
    _assert_no_child(n)
    (da,) = n.of("a", IkeSaDeleted)
    assert "AUTHENTICATION_FAILED" in da.reason
    (db,) = n.of("b", IkeSaDeleted)
    assert "no configured peer has identity 'node-a'" in db.reason
    assert n.b.counters["auth_failed"] == 1 and n.a.status() == [] and n.b.status() == []


def test_initiator_cert_from_another_ca_rejected_by_responder(pki):
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"),
                 view("node-b", "node-a"), cert_creds(pki, "b", ca="other_ca"))
    n.a.initiate("node-b", n.now)
    n.pump()
    _assert_no_child(n)
    (db,) = n.of("b", IkeSaDeleted)
    assert "AUTHENTICATION_FAILED" in db.reason and "trusted CA" in db.reason
    assert "AUTHENTICATION_FAILED" in n.of("a", IkeSaDeleted)[0].reason


def test_responder_cert_from_another_ca_rejected_by_initiator(pki):
    """<-- HDR, SK {IDr, CERT(foreign CA), AUTH, ...}; HDR, SK {N(AUTHENTICATION_FAILED)} -->"""
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"),
                 view("node-b", "node-a"), cert_creds(pki, "b_other_ca"))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", ChildSaEstablished)
    (da,) = n.of("a", IkeSaDeleted)
    assert "trusted CA" in da.reason
    # the responder had installed its CHILD_SA; the initiator's notify removes it
    assert [type(e) for e in n.events["b"]][-2:] == [ChildSaDeleted, IkeSaDeleted]
    assert n.of("b", IkeSaDeleted)[0].reason == "peer reported AUTHENTICATION_FAILED"
    assert n.b.status() == []


def test_certificate_naming_someone_else_rejected(pki):
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"),
                 view("node-b", "node-a"), cert_creds(pki, "b_wrong_san"))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", ChildSaEstablished)
    assert "node-b" in n.of("a", IkeSaDeleted)[0].reason


def test_wrong_psk_is_authentication_failed():
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK),
                 view("node-b", "node-a"), Credentials(psk=b"another secret, not the same"))
    n.a.initiate("node-b", n.now)
    n.pump()
    _assert_no_child(n)
    assert "PSK" in n.of("b", IkeSaDeleted)[0].reason
    assert n.of("a", IkeSaDeleted)[0].reason == "peer refused our authentication (AUTHENTICATION_FAILED)"


def test_per_peer_psk_chosen_by_idi():
    """A PSK responder picks the PSK by the IDi (Peer.psk overrides Credentials.psk)."""
    n = make_net(view("node-a", "node-b", psk=b"per-peer secret for a<->b"), Credentials(psk=b"global a"),
                 view("node-b", "node-a", psk=b"per-peer secret for a<->b"), Credentials(psk=b"global b"))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(n.of("b", ChildSaEstablished)) == 1


# ------------------------------------------------------------------ traffic selectors

def test_ts_outside_the_peers_subnets_is_refused():
    """A proposes TSi 10.9.0.0/16, B allows only 10.1.0.0/16 for A: <-- N(TS_UNACCEPTABLE)."""
    n = make_net(view("node-a", "node-b", my_net=ipaddress.ip_network("10.9.0.0/16")), Credentials(psk=PSK),
                 view("node-b", "node-a"), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    _assert_no_child(n)
    # RFC 7296 §1.2: the IKE_SA stays up without the CHILD_SA
    assert not n.of("a", IkeSaDeleted) and n.a._live()[0].state == "ESTABLISHED"
    assert [e.notify for e in n.of("a", ChildSaRefused)] == [NotifyType.TS_UNACCEPTABLE]
    (r,) = n.of("b", ChildSaRefused)
    assert "TSi 10.9.0.0/16" in r.offered and "we allow TSi 10.1.0.0/16" in r.reason


def test_responder_narrows_traffic_selectors():
    narrow_a = ipaddress.ip_network("10.1.5.0/24")
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK),
                 view("node-b", "node-a", peer_net=narrow_a), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.local_ts == (narrow_a,) == cb.remote_ts and ca.remote_ts == (B_NET,)


def test_narrow_helper():
    N = ipaddress.ip_network
    assert ch.narrow([N("0.0.0.0/0")], (N("10.1.0.0/16"),)) == [N("10.1.0.0/16")]
    assert ch.narrow([N("10.1.2.0/24")], (N("10.1.0.0/16"),)) == [N("10.1.2.0/24")]
    assert ch.narrow([N("10.3.0.0/16")], (N("10.1.0.0/16"),)) == []
    assert ch.narrow([N("fd00::/8")], (N("10.1.0.0/16"),)) == []


# ------------------------------------------------------------------ INFORMATIONAL

def _established(n):
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def test_delete_from_initiator_both_report(cert_net):
    """HDR, SK {D(IKE)} -->  <-- HDR, SK {}"""
    n = cert_net
    _established(n)
    n.a.delete_all(n.now)
    n.pump()
    for side in "ab":
        (cd,) = n.of(side, ChildSaDeleted)
        (idel,) = n.of(side, IkeSaDeleted)
    assert n.of("a", IkeSaDeleted)[0].reason == "shutdown"
    assert n.of("b", IkeSaDeleted)[0].reason == "deleted by peer"
    ca = n.of("a", ChildSaEstablished)[0]
    assert n.of("b", ChildSaDeleted)[0].inbound_spi == ca.outbound.spi
    assert n.a.status() == [] and n.b.status() == []


def test_delete_from_responder_both_report(psk_net):
    n = psk_net
    _established(n)
    n.b.delete_all(n.now)
    n.pump()
    assert len(n.of("a", ChildSaDeleted)) == 1 and len(n.of("b", ChildSaDeleted)) == 1
    assert n.of("a", IkeSaDeleted)[0].reason == "deleted by peer"


def test_child_sa_delete_from_one_side(psk_net):
    """HDR, SK {D(ESP, SPI)} -->  <-- HDR, SK {D(ESP, SPI)}; the IKE_SA stays."""
    n = psk_net
    _established(n)
    sa = next(iter(n.a._sas.values()))
    sa.delete_child(sa.children[0].inbound_spi, n.now)
    n.a._collect(sa, n.now)
    n.pump()
    assert len(n.of("a", ChildSaDeleted)) == 1 and len(n.of("b", ChildSaDeleted)) == 1
    assert not n.of("a", IkeSaDeleted) and n.b.status()[0]["state"] == "ESTABLISHED"
    assert n.b.status()[0]["children"] == []


def test_liveness_check_after_dpd_interval(psk_net):
    """HDR, SK {} -->  <-- HDR, SK {} after dpd_interval_s of silence (§1.4, §2.4)."""
    n = psk_net
    _established(n)
    before = len(n.log)
    n.advance(n.now + 30.0)
    new = [(s, decode_message(d.data)) for s, d in n.log[before:]]
    # both sides were silent for 30 s: each checks, each answers the other's empty request
    assert sorted((s, m.exchange, m.is_response, len(m.payloads)) for s, m in new) == [
        ("a", 37, False, 1), ("a", 37, True, 1), ("b", 37, False, 1), ("b", 37, True, 1)]
    assert n.a.get_timer() == n.now + 30.0
    assert not n.of("a", IkeSaDeleted) and not n.of("b", IkeSaDeleted)


def test_dead_peer_detected_by_liveness_check(psk_net):
    n = psk_net
    _established(n)
    n.drop = lambda src, d: True
    n.advance(n.now + 30 + 64)
    assert n.of("a", IkeSaDeleted)[0].reason == "peer did not respond"
    assert n.of("a", ChildSaDeleted)


# ------------------------------------------------------------------ critical payloads

def test_unknown_critical_payload_gets_unsupported_critical_payload(psk_net):
    """HDR, SA, KEi, Ni, UNKNOWN(critical) -->  <-- HDR, N(UNSUPPORTED_CRITICAL_PAYLOAD, type)"""
    n = psk_net
    n.a.initiate("node-b", n.now)
    (init,) = n.a.datagrams_to_send()
    m = decode_message(init.data)
    forged = Message(m.spi_i, 0, 34, 0, True, False, m.payloads + (UnknownPayload(222, True, b"x"),))
    n.b.receive_datagram(encode_message(forged), init.remote, init.local, n.now)
    (resp,) = n.b.datagrams_to_send()
    r = decode_message(resp.data)
    assert r.is_response and r.notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD).data == bytes([222])
    assert n.b.status() == []
    # non-critical unknown payloads are skipped
    ok = Message(m.spi_i, 0, 34, 0, True, False, m.payloads + (UnknownPayload(222, False, b"x"),))
    n.b.receive_datagram(encode_message(ok), init.remote, init.local, n.now)
    (resp,) = n.b.datagrams_to_send()
    assert decode_message(resp.data).first(PayloadType.SA) is not None


# ------------------------------------------------------------------ CREATE_CHILD_SA: TS and PAD

def _created(n):
    n.events = {"a": [], "b": []}
    n.log.clear()


def test_additional_child_sa_with_no_ts_overlap_is_ts_unacceptable_and_the_ike_sa_stays(psk_net):
    """HDR, SK {SA, Ni, TSi(10.1/16), TSr(10.77/16)} --> ; <-- HDR, SK {N(TS_UNACCEPTABLE)}."""
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    _created(n)
    assert n.a.create_child("node-b", n.now, remote_ts=(ipaddress.ip_network("10.77.0.0/16"),))
    n.pump()
    sa = n.a._live()[0]
    assert sa.child_errors == ["CREATE_CHILD_SA refused: TS_UNACCEPTABLE"]
    assert sa.state == "ESTABLISHED" and len(sa.children) == 1
    assert [(e.by, e.notify) for e in n.events["b"]] == [("us", NotifyType.TS_UNACCEPTABLE)]  # logged by B
    # and by A, naming what it asked for (issue 9: was silent)
    assert [(e.by, e.notify, e.offered) for e in n.events["a"]] == [
        ("peer", NotifyType.TS_UNACCEPTABLE, "asked for ESP TSi 10.1.0.0/16 TSr 10.77.0.0/16")]


def test_pad_rule_at_create_child_sa_peer_may_claim_only_its_own_subnets(psk_net):
    """A claims TSi 10.9.0.0/16 (not its own): TS_UNACCEPTABLE; A claims 10.0.0.0/8: narrowed to 10.1.0.0/16."""
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    _created(n)
    n.a.create_child("node-b", n.now, local_ts=(ipaddress.ip_network("10.9.0.0/16"),))
    n.pump()
    assert n.a._live()[0].child_errors[-1] == "CREATE_CHILD_SA refused: TS_UNACCEPTABLE"
    n.a.create_child("node-b", n.now, local_ts=(ipaddress.ip_network("10.0.0.0/8"),))
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.local_ts == (A_NET,) == cb.remote_ts


def test_pad_rule_at_ike_auth_peer_claiming_anothers_subnet_is_refused():
    """A claims B's own subnet as TSi in IKE_AUTH: the PAD gives A only 10.1/16: TS_UNACCEPTABLE."""
    n = make_net(view("node-a", "node-b", my_net=B_NET), Credentials(psk=PSK),
                 view("node-b", "node-a"), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("b", ChildSaEstablished)
    assert not n.of("a", IkeSaDeleted)
    assert [e.notify for e in n.of("a", ChildSaRefused)] == [NotifyType.TS_UNACCEPTABLE]


# ------------------------------------------------------------------ message IDs (§2.1-2.3)

def test_repeated_create_child_sa_request_gets_the_cached_response_and_no_second_child_sa(psk_net):
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    _created(n)
    n.a.create_child("node-b", n.now)
    (req,) = n.a.datagrams_to_send()
    for _ in range(2):
        n.b.receive_datagram(req.data, req.remote, req.local, n.now)
    r1, r2 = n.b.datagrams_to_send()
    assert r1.data == r2.data
    n._drain_events()
    assert len(n.of("b", ChildSaEstablished)) == 1


def test_future_message_id_is_counted_and_dropped(psk_net):
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    sa = n.a._live()[0]
    sa._next_mid += 5  # a request from the future (window size 1)
    n.a.create_child("node-b", n.now)
    (req,) = n.a.datagrams_to_send()
    n.b.receive_datagram(req.data, req.remote, req.local, n.now)
    assert n.b.counters == {"invalid_message_id": 1} and not n.b.datagrams_to_send()


# ------------------------------------------------------------------ liveness (§2.4)

def test_liveness_retransmission_schedule_and_final_timeout_then_reinitiation(psk_net):
    """HDR, SK {} --> at dpd_interval; retransmitted after 1, 2, 4, 8, 16 s; dead 32 s later;
    the IKE_SA and its CHILD_SAs are removed and A re-initiates per policy (initiate=True)."""
    n = psk_net
    n.a.initiate("node-b", n.now)
    n.pump()
    t_est = n.now
    n.log.clear()
    n.drop = lambda src, d: True
    n.advance(t_est + 30 + 63 + 0.5)
    sent = [n_ for n_ in n.log if n_[0] == "a"]
    assert len(sent) == 6  # the check and 5 retransmissions, all the same bytes
    assert len({d.data for _, d in sent}) == 1
    ev = n.of("a", IkeSaDeleted)
    assert ev and ev[0].reason == "peer did not respond" and n.of("a", ChildSaDeleted)
    assert "node-b" in n.a._retry and n.a._live() == []
