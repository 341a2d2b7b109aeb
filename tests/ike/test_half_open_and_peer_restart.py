"""Half-open IKE_SAs and peers that lost their state (docs/ike-hardening.md), sans-I/O
with a fake clock: bounded half-open state under IKE_SA_INIT floods (RFC 7296 §2.6),
dpd 0 = off, recovery after a peer restart (INVALID_IKE_SPI, unknown-SPI hints,
RFC 7296 §2.21.4 / §1.5), no acquire storms (re-initiation backoff), identical
retransmissions (§2.1).
"""
from __future__ import annotations

from dataclasses import replace

from agent.iana import ExchangeType, NotifyType
from agent.ike import child as ch
from agent.ike.events import ChildSaEstablished, HalfOpenDropped, IkeSaDeleted
from agent.ike.manager import IkeManager
from agent.ike.message import (EncryptedPayload, KePayload, Message, NoncePayload, decode_message,
                               encode_message)
from agent.ike.sa import IkeSa
from agent.model import Credentials

from tests.ike.conftest import A_ADDR, B_ADDR, DetRng, T0, cert_creds, make_net, view
from tests.ike.helpers import NOLIFE, PSK, psk_net, sent, up


# ------------------------------------------------------------------ 1. IKE_SA_INIT floods

def _init_template():
    from agent.ike.crypto import KeyExchange
    from agent.ike.proposals import parse_ike_proposal
    ke = KeyExchange(31, DetRng("flood-ke"))
    pl = [ch.ike_sa_payload([parse_ike_proposal("aes128gcm16-prfsha256-x25519")]),
          KePayload(31, ke.public_bytes()), NoncePayload(b"N" * 32)]
    return bytearray(encode_message(Message(1, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(pl))))


def _flood(m, count, sources, now):
    """``count`` spoofed IKE_SA_INITs (random SPIi) from ``sources`` addresses in 203.0.113.0/24."""
    req, rng = _init_template(), DetRng("spis")
    for i in range(count):
        req[0:8] = rng(8)
        m.receive_datagram(bytes(req), (B_ADDR, 500), (f"203.0.113.{1 + i % sources}", 500), now)
    return m.datagrams_to_send()


class _Calls:
    """Counts IkeSa.next_timer calls: the work get_timer/handle_timer/delete_all do per IKE_SA."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = IkeSa.next_timer

        def counted(sa):
            self.n += 1
            return orig(sa)
        monkeypatch.setattr(IkeSa, "next_timer", counted)


def test_flood_of_spoofed_ike_sa_init_leaves_bounded_state_that_expires():
    """10,000 HDR(SPIi random, 0), SA, KEi, Ni --> from 250 spoofed sources: the COOKIE threshold
    (responder IKE_SA in AUTHENTICATING counts as half-open) caps the state; it is gone after
    the half-open timeout."""
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR)
    replies = _flood(m, 10_000, 250, T0)
    assert len(m._sas) == m.half_open() == m.cookie_threshold == 50
    assert all(sa.state == "AUTHENTICATING" for sa in m._sas.values())
    assert m.counters["cookie_required"] == 10_000 - 50 and len(replies) == 10_000
    assert m.get_timer() == T0 + 30.0  # every half-open IKE_SA has a deadline
    m.handle_timer(T0 + 30.0)
    assert m._sas == {} and m.half_open() == 0 and m._half_open_by_ip == {}
    assert m.get_timer() == T0 + 40.0  # only the summary of the dropped half-open IKE_SAs is due
    m.handle_timer(T0 + 40.0)
    assert m.get_timer() is None and m.timer_entries() == 0
    events = list(iter(m.next_event, None))
    # summarised (issue 13: one log line each before), not one IkeSaDeleted per half-open IKE_SA
    assert not [e for e in events if isinstance(e, IkeSaDeleted)]
    assert [e.counts for e in events if isinstance(e, HalfOpenDropped)] == [{"setup_timeout": 1},
                                                                           {"setup_timeout": 49}]
    assert {e.detail for e in events if isinstance(e, HalfOpenDropped)} == {"half-open IKE_SA timed out"}


def test_per_source_limit_of_half_open_ike_sas():
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR,
                   cookie_threshold=1_000_000, half_open_per_source=20, init_rate=0)
    _flood(m, 10_000, 10, T0)
    assert len(m._sas) == m.half_open() == 200
    assert m.counters["half_open_per_source"] == 10_000 - 200
    assert set(m._half_open_by_ip.values()) == {20}


def test_half_open_timeout_is_configurable():
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR,
                   half_open_timeout_s=5.0)
    _flood(m, 3, 3, T0)
    assert m.get_timer() == T0 + 5.0
    m.handle_timer(T0 + 4.9)
    assert len(m._sas) == 3
    m.handle_timer(T0 + 5.0)
    assert m._sas == {}


def test_timers_and_shutdown_cost_does_not_grow_with_half_open_state(monkeypatch):
    """get_timer does no per-IKE_SA work (a heap); handle_timer touches only due IKE_SAs;
    delete_all is linear (no scan of the half-open table per dying IKE_SA)."""
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR,
                   cookie_threshold=1_000_000, half_open_per_source=1_000_000, half_open_max=1_000_000,
                   init_rate=0, half_open_bytes_max=1 << 40)
    _flood(m, 2_000, 250, T0)
    assert len(m._sas) == 2_000 and m.timer_entries() <= 4 * 2_000 + 64
    calls = _Calls(monkeypatch)
    for _ in range(100):
        assert m.get_timer() == T0 + 30.0
    m.handle_timer(T0 + 10.0)  # nothing due
    assert calls.n == 0
    m.delete_all(T0 + 11.0)
    assert m._sas == {} and m._half_open == {} and m._half_open_key == {} and m._half_open_by_ip == {}
    assert calls.n <= 2 * 2_000
    assert m.get_timer() is None


def test_initiator_setup_is_bounded_too():
    n = psk_net()
    n.drop = lambda src, d: src == "a" and decode_message(d.data).exchange == ExchangeType.IKE_AUTH
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(T0 + 29.9)
    assert n.b.half_open() == 1
    n.advance(T0 + 30.0)  # the responder waits for IKE_AUTH 30 s (pre-fix: forever)
    assert [e.detail for e in n.of("b", HalfOpenDropped)] == ["half-open IKE_SA timed out"] and n.b._sas == {}
    assert not n.of("b", IkeSaDeleted)
    n.advance(T0 + 63.0)
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["peer did not respond"]


# ------------------------------------------------------------------ 2. dpd_interval_s 0

def test_dpd_interval_zero_means_no_liveness_checks():
    n = psk_net(replace(NOLIFE, dpd_interval_s=0))
    up(n)
    n.log.clear()
    assert n.a.get_timer() is None and n.b.get_timer() is None
    n.advance(T0 + 3600)
    assert n.log == []


def test_dpd_interval_positive_still_probes():
    n = psk_net(replace(NOLIFE, dpd_interval_s=10))
    up(n)
    n.log.clear()
    n.advance(T0 + 10.5)
    assert len(sent(n, "a", ExchangeType.INFORMATIONAL)) + len(sent(n, "b", ExchangeType.INFORMATIONAL)) >= 2


# ------------------------------------------------------------------ 3. peer restart

def _restart_b(n, initiate=True):
    n.b = IkeManager(view("node-b", "node-a", policy=n.b.view.peers[0].policy, initiate=initiate),
                     Credentials(psk=PSK), DetRng("b-restarted"), local_address=B_ADDR)


def test_unknown_ike_spi_request_gets_unprotected_invalid_ike_spi_rate_limited_and_no_state():
    """From an address that is no configured peer's: answered, no state kept."""
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR)
    req = encode_message(Message(0x1111, 0x2222, 37, 7, True, False, (EncryptedPayload(0, b"\0" * 40),)))
    A_ADDR = "203.0.113.9"  # noqa: N806 - a stranger here
    for _ in range(10):
        m.receive_datagram(req, (B_ADDR, 4500), (A_ADDR, 4500), T0)
    (reply,) = [decode_message(d.data) for d in m.datagrams_to_send()]
    # <-- HDR(same SPIs, same Message ID, R), N(INVALID_IKE_SPI), not encrypted
    assert (reply.spi_i, reply.spi_r, reply.message_id) == (0x1111, 0x2222, 7)
    assert reply.is_response and not reply.is_initiator and reply.exchange == ExchangeType.INFORMATIONAL
    assert [p.notify_type for p in reply.payloads] == [NotifyType.INVALID_IKE_SPI]
    assert m.counters["invalid_ike_spi_rate_limited"] == 9 and m._sas == {}
    m.receive_datagram(req, (B_ADDR, 4500), (A_ADDR, 4500), T0 + 1.0)  # next interval
    assert len(m.datagrams_to_send()) == 1
    # never in answer to a response, nor to an unencrypted message
    resp = encode_message(Message(0x1111, 0x2222, 37, 8, True, True, (EncryptedPayload(0, b"\0" * 40),)))
    m.receive_datagram(resp, (B_ADDR, 4500), (A_ADDR, 4500), T0 + 5)
    assert m.datagrams_to_send() == [] and m._sas == {}


def test_invalid_ike_spi_never_answers_an_invalid_ike_spi():
    """Two nodes that both lost state must not ping-pong notifications."""
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR)
    from agent.ike.message import NotifyPayload
    note = encode_message(Message(5, 6, 37, 0, False, True, (NotifyPayload(int(NotifyType.INVALID_IKE_SPI)),)))
    m.receive_datagram(note, (B_ADDR, 4500), (A_ADDR, 4500), T0)
    assert m.datagrams_to_send() == [] and m.counters == {"unsolicited_notify": 1}


def test_invalid_ike_spi_after_peer_restart_fast_recovery():
    """B (responder only by the tie-break, initiate: false) restarts. A's next liveness check -->
    gets <-- N(INVALID_IKE_SPI), and B, knowing A as a peer it has no IKE_SA with, initiates at
    once with INITIAL_CONTACT (a peer such as strongSwan ignores INVALID_IKE_SPI): A drops the
    old IKE_SA for the new one, one IKE_SA on each side, at the same instant (not 15-63 s later)."""
    n = psk_net(replace(NOLIFE, dpd_interval_s=30), b={"initiate": False})
    up(n)
    _restart_b(n, initiate=False)
    n.events = {"a": [], "b": []}
    n.advance(T0 + 30.0)  # A's liveness check: HDR, SK {} -->  <-- HDR, N(INVALID_IKE_SPI)
    assert n.b.counters["invalid_ike_spi_sent"] >= 1
    assert n.b.counters["initiated_after_invalid_ike_spi"] == 1
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["peer sent INITIAL_CONTACT"]
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    assert len(n.a.status()) == 1 and len(n.b.status()) == 1
    n.advance(T0 + 30.0 + 70.0)  # nothing left to fail later
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["peer sent INITIAL_CONTACT"]
    assert len(n.a.status()) == 1 and len(n.b.status()) == 1


def test_invalid_ike_spi_from_a_peer_we_are_negotiating_with_starts_nothing_more():
    """No duplicate: B already has an IKE_SA (here: being set up) with A, so an unknown-SPI
    request from A only gets N(INVALID_IKE_SPI)."""
    m = IkeManager(view("node-b", "node-a", initiate=False), Credentials(psk=PSK), DetRng("b"),
                   local_address=B_ADDR)
    m.initiate("node-a", T0)
    m.datagrams_to_send()
    req = encode_message(Message(0x1111, 0x2222, 37, 7, True, False, (EncryptedPayload(0, b"\0" * 40),)))
    m.receive_datagram(req, (B_ADDR, 4500), (A_ADDR, 4500), T0)
    assert len(m.datagrams_to_send()) == 1 and "initiated_after_invalid_ike_spi" not in m.counters
    assert len(m._sas) == 1


def test_hint_unknown_spi_initiates_when_we_lost_the_state():
    """B restarted and only responds by the tie-break; ESP from A arrives with an SPI B does not
    know: the runtime calls hint_unknown_spi and B initiates at once (INITIAL_CONTACT)."""
    n = psk_net(b={"initiate": False})
    up(n)
    _restart_b(n, initiate=False)
    n.events = {"a": [], "b": []}
    assert n.b.hint_unknown_spi((A_ADDR, 4500), n.now) == "initiated"
    n.pump()
    assert n.of("b", ChildSaEstablished) and n.of("a", ChildSaEstablished)
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["peer sent INITIAL_CONTACT"]
    assert n.b.hint_unknown_spi(A_ADDR, n.now + 1) == "rate_limited"


def test_hint_unknown_spi_with_an_ike_sa_starts_a_liveness_check():
    n = psk_net()
    up(n)
    n.log.clear()
    assert n.a.hint_unknown_spi("203.0.113.99", n.now) == "unknown_address"
    assert n.a.hint_unknown_spi(B_ADDR, n.now) == "liveness_check"
    (probe,) = sent(n.__class__(n.a, n.b, log=[("a", d) for d in n.a.datagrams_to_send()]), "a",
                     ExchangeType.INFORMATIONAL)
    assert not probe.is_response
    assert n.a.hint_unknown_spi(B_ADDR, n.now + 1) == "rate_limited"
    assert n.a.hint_unknown_spi(B_ADDR, n.now + 6) == "liveness_check"  # request still outstanding


def test_hint_for_a_live_peer_changes_nothing():
    n = psk_net()
    up(n)
    n.a.hint_unknown_spi(B_ADDR, n.now)
    n.pump()
    n.advance(n.now + 100)
    assert not n.of("a", IkeSaDeleted) and len(n.a.status()) == 1


# ------------------------------------------------------------------ 4. acquire storm

def test_acquires_during_backoff_start_no_exchange_and_backoff_grows_on_auth_failures():
    n = make_net(view("node-a", "node-b", policy=NOLIFE), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=NOLIFE), Credentials(psk=b"a different psk 0123456789abcd"))
    for i in range(20):  # 20 pings -> 20 acquires, 0.1 s apart
        n.now = T0 + i * 0.1
        n.a.initiate("node-b", n.now)
        n.pump()
    assert len(sent(n, "a", ExchangeType.IKE_SA_INIT)) == 1
    assert n.a.counters["initiate_backoff"] == 19
    fails = lambda: [e for e in n.of("a", IkeSaDeleted) if "AUTHENTICATION_FAILED" in e.reason]  # noqa: E731
    assert len(fails()) == 1
    # one acquire per second for 10 minutes: the handshakes follow the doubling backoff (8, 16, 32, ...)
    for t in range(2, 600):
        n.advance(T0 + t)
        n.a.initiate("node-b", n.now)
        n.pump()
    inits = len(sent(n, "a", ExchangeType.IKE_SA_INIT))
    assert 5 <= inits <= 9 and len(fails()) == inits
    assert n.a._backoff["node-b"] == 120.0


# ------------------------------------------------------------------ 5. retransmissions

def test_same_message_id_different_bytes_is_dropped_and_counted(pki):
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"), view("node-b", "node-a"), cert_creds(pki, "b"))
    up(n)
    auth_req = [d for s, d in n.log if s == "a"][1]
    forged = bytearray(auth_req.data)
    forged[-1] ^= 1
    n.b.receive_datagram(bytes(forged), auth_req.remote, auth_req.local, n.now)
    assert n.b.datagrams_to_send() == [] and n.b.counters == {"retransmission_mismatch": 1}
    n.b.receive_datagram(auth_req.data, auth_req.remote, auth_req.local, n.now)  # the real retransmission
    assert len(n.b.datagrams_to_send()) == 1


def test_ike_sa_init_with_same_spi_but_other_content_is_not_a_retransmission():
    n = psk_net()
    n.a.initiate("node-b", n.now)
    (init,) = n.a.datagrams_to_send()
    n.b.receive_datagram(init.data, init.remote, init.local, n.now)
    n.b.datagrams_to_send()
    other = bytearray(init.data)
    other[-1] ^= 1  # same SPIi and Message ID 0, a different nonce/NAT-D byte
    n.b.receive_datagram(bytes(other), init.remote, init.local, n.now)
    assert n.b.datagrams_to_send() == [] and n.b.counters == {"retransmission_mismatch": 1}




def test_invalid_ike_spi_reply_as_scapy_reads_it():
    """The unprotected reply checked with an implementation we did not write (scapy's IKEv2)."""
    from scapy.contrib.ikev2 import IKEv2, IKEv2_Notify
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR)
    req = encode_message(Message(0xAB, 0xCD, 37, 42, True, False, (EncryptedPayload(0, b"\0" * 40),)))
    m.receive_datagram(req, (B_ADDR, 4500), (A_ADDR, 4500), T0)
    d = m.datagrams_to_send()[0]  # then b's own IKE_SA_INIT to that peer
    p = IKEv2(d.data)
    assert (p.init_SPI, p.resp_SPI, p.id) == ((0xAB).to_bytes(8, "big"), (0xCD).to_bytes(8, "big"), 42)
    assert p.exch_type == 37 and p.flags == 0x20  # INFORMATIONAL, Response, not Initiator
    n = p[IKEv2_Notify]
    assert n.type == 4 and n.proto == 0 and n.SPIsize == 0  # INVALID_IKE_SPI
