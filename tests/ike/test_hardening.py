"""IKE core hardening (docs/ike-hardening.md), sans-I/O with a fake clock.

One section per review finding: bounded half-open state under IKE_SA_INIT floods,
dpd 0 = off, recovery after a peer restart (INVALID_IKE_SPI, unknown-SPI hints,
RFC 7296 §2.21.4 / §1.5), no acquire storms, identical retransmissions (§2.1),
traffic selector narrowing on protocol/ports/addresses (§2.9), bad policy data,
endpoint binding, revocation and new credentials in the PAD.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike import child as ch
from agent.ike.events import (ChildSaDeleted, ChildSaEstablished, ChildSaRefused, HalfOpenDropped, IkeSaDeleted,
                              IkeSaEstablished, PeerRefused)
from agent.ike.manager import IkeManager
from agent.ike.message import (EncryptedPayload, KePayload, Message, NoncePayload, TrafficSelector,
                               decode_message, encode_message)
from agent.ike.sa import IkeSa
from agent.ike.tasks.ike_auth import IkeAuth
from agent.model import Credentials, NodeView, Peer, PeerPolicy

from tests.ike.conftest import (A_ADDR, A_NET, B_ADDR, B_NET, CLASSICAL, DetRng, Net, T0, cert_creds, make_net,
                                view)
from tests.ike.helpers import inner

PSK = b"hardening tests psk 0123456789ab"
NOLIFE = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0)


def _psk_net(a_policy=NOLIFE, b_policy=None, **kw):
    return make_net(view("node-a", "node-b", policy=a_policy, **kw.get("a", {})), Credentials(psk=PSK),
                    view("node-b", "node-a", policy=b_policy or a_policy, **kw.get("b", {})), Credentials(psk=PSK))


def _up(n):
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def _sent(n, src, exchange):
    return [decode_message(d.data) for s, d in n.log if s == src and decode_message(d.data).exchange == exchange]


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
    n = _psk_net()
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
    n = _psk_net(replace(NOLIFE, dpd_interval_s=0))
    _up(n)
    n.log.clear()
    assert n.a.get_timer() is None and n.b.get_timer() is None
    n.advance(T0 + 3600)
    assert n.log == []


def test_dpd_interval_positive_still_probes():
    n = _psk_net(replace(NOLIFE, dpd_interval_s=10))
    _up(n)
    n.log.clear()
    n.advance(T0 + 10.5)
    assert len(_sent(n, "a", ExchangeType.INFORMATIONAL)) + len(_sent(n, "b", ExchangeType.INFORMATIONAL)) >= 2


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
    n = _psk_net(replace(NOLIFE, dpd_interval_s=30), b={"initiate": False})
    _up(n)
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
    n = _psk_net(b={"initiate": False})
    _up(n)
    _restart_b(n, initiate=False)
    n.events = {"a": [], "b": []}
    assert n.b.hint_unknown_spi((A_ADDR, 4500), n.now) == "initiated"
    n.pump()
    assert n.of("b", ChildSaEstablished) and n.of("a", ChildSaEstablished)
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["peer sent INITIAL_CONTACT"]
    assert n.b.hint_unknown_spi(A_ADDR, n.now + 1) == "rate_limited"


def test_hint_unknown_spi_with_an_ike_sa_starts_a_liveness_check():
    n = _psk_net()
    _up(n)
    n.log.clear()
    assert n.a.hint_unknown_spi("203.0.113.99", n.now) == "unknown_address"
    assert n.a.hint_unknown_spi(B_ADDR, n.now) == "liveness_check"
    (probe,) = _sent(n.__class__(n.a, n.b, log=[("a", d) for d in n.a.datagrams_to_send()]), "a",
                     ExchangeType.INFORMATIONAL)
    assert not probe.is_response
    assert n.a.hint_unknown_spi(B_ADDR, n.now + 1) == "rate_limited"
    assert n.a.hint_unknown_spi(B_ADDR, n.now + 6) == "liveness_check"  # request still outstanding


def test_hint_for_a_live_peer_changes_nothing():
    n = _psk_net()
    _up(n)
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
    assert len(_sent(n, "a", ExchangeType.IKE_SA_INIT)) == 1
    assert n.a.counters["initiate_backoff"] == 19
    fails = lambda: [e for e in n.of("a", IkeSaDeleted) if "AUTHENTICATION_FAILED" in e.reason]  # noqa: E731
    assert len(fails()) == 1
    # one acquire per second for 10 minutes: the handshakes follow the doubling backoff (8, 16, 32, ...)
    for t in range(2, 600):
        n.advance(T0 + t)
        n.a.initiate("node-b", n.now)
        n.pump()
    inits = len(_sent(n, "a", ExchangeType.IKE_SA_INIT))
    assert 5 <= inits <= 9 and len(fails()) == inits
    assert n.a._backoff["node-b"] == 120.0


# ------------------------------------------------------------------ 5. retransmissions

def test_same_message_id_different_bytes_is_dropped_and_counted(pki):
    n = make_net(view("node-a", "node-b"), cert_creds(pki, "a"), view("node-b", "node-a"), cert_creds(pki, "b"))
    _up(n)
    auth_req = [d for s, d in n.log if s == "a"][1]
    forged = bytearray(auth_req.data)
    forged[-1] ^= 1
    n.b.receive_datagram(bytes(forged), auth_req.remote, auth_req.local, n.now)
    assert n.b.datagrams_to_send() == [] and n.b.counters == {"retransmission_mismatch": 1}
    n.b.receive_datagram(auth_req.data, auth_req.remote, auth_req.local, n.now)  # the real retransmission
    assert len(n.b.datagrams_to_send()) == 1


def test_ike_sa_init_with_same_spi_but_other_content_is_not_a_retransmission():
    n = _psk_net()
    n.a.initiate("node-b", n.now)
    (init,) = n.a.datagrams_to_send()
    n.b.receive_datagram(init.data, init.remote, init.local, n.now)
    n.b.datagrams_to_send()
    other = bytearray(init.data)
    other[-1] ^= 1  # same SPIi and Message ID 0, a different nonce/NAT-D byte
    n.b.receive_datagram(bytes(other), init.remote, init.local, n.now)
    assert n.b.datagrams_to_send() == [] and n.b.counters == {"retransmission_mismatch": 1}


# ------------------------------------------------------------------ 6. traffic selectors

def _ts(proto, p1, p2, a, b):
    a, b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return TrafficSelector(7 if a.version == 4 else 8, proto, p1, p2, a.packed, b.packed)


def test_ts_intersection_of_each_field():
    anyv4 = _ts(0, 0, 65535, "0.0.0.0", "255.255.255.255")
    # protocol: any meets 6 -> 6; 6 meets 17 -> nothing
    assert ch.ts_intersect(_ts(6, 0, 65535, "10.0.0.0", "10.0.0.255"), anyv4) == _ts(6, 0, 65535, "10.0.0.0", "10.0.0.255")
    assert ch.ts_intersect(_ts(6, 0, 65535, "10.0.0.0", "10.0.0.255"), _ts(17, 0, 65535, "10.0.0.0", "10.0.0.255")) is None
    # ports: [80, 443] meets [400, 1000] -> [400, 443]; disjoint -> nothing; OPAQUE meets only OPAQUE or any
    assert ch.ts_intersect(_ts(6, 80, 443, "10.0.0.1", "10.0.0.1"), _ts(6, 400, 1000, "10.0.0.0", "10.0.0.9")) \
        == _ts(6, 400, 443, "10.0.0.1", "10.0.0.1")
    assert ch.ts_intersect(_ts(6, 80, 80, "10.0.0.1", "10.0.0.1"), _ts(6, 81, 90, "10.0.0.1", "10.0.0.1")) is None
    assert ch.ts_intersect(_ts(6, 65535, 0, "10.0.0.1", "10.0.0.1"), _ts(6, 80, 80, "10.0.0.1", "10.0.0.1")) is None
    assert ch.ts_intersect(_ts(6, 65535, 0, "10.0.0.1", "10.0.0.1"), anyv4) == _ts(6, 65535, 0, "10.0.0.1", "10.0.0.1")
    # addresses: ranges, not only CIDR blocks
    assert ch.ts_intersect(_ts(0, 0, 65535, "10.0.0.5", "10.0.0.20"), _ts(0, 0, 65535, "10.0.0.10", "10.0.1.0")) \
        == _ts(0, 0, 65535, "10.0.0.10", "10.0.0.20")
    assert ch.ts_intersect(_ts(0, 0, 65535, "10.0.0.5", "10.0.0.9"), _ts(0, 0, 65535, "10.0.0.10", "10.0.1.0")) is None
    # IPv4 never meets IPv6
    assert ch.ts_intersect(_ts(0, 0, 65535, "::", "::ffff"), anyv4) is None
    assert ch.narrow_ts([_ts(6, 80, 80, "10.9.0.1", "10.9.0.1")], ch.ts_from_networks([A_NET])) == []
    assert ch.ts_within([_ts(6, 80, 80, "10.1.0.1", "10.1.0.1")], ch.ts_from_networks([A_NET]))
    assert not ch.ts_within([_ts(0, 0, 65535, "10.1.0.1", "10.1.0.1")], [_ts(6, 0, 65535, "10.1.0.0", "10.1.255.255")])


def _a_proposes(monkeypatch, make):
    """A's IKE_AUTH proposes the selectors ``make(networks)`` instead of whole networks."""
    orig = IkeAuth.start

    def patched(task, now):
        if task.sa.initiator and task.sa.cfg.identity == "node-a":
            with monkeypatch.context() as mp:
                mp.setattr(ch, "ts_from_networks", make)
                return orig(task, now)
        return orig(task, now)
    monkeypatch.setattr(IkeAuth, "start", patched)


def test_responder_narrows_protocol_and_ports_and_returns_no_wider_selectors(monkeypatch):
    """HDR, SK {..., TSi(TCP 80-443, 10.1.0.0/16), TSr(TCP 80-443, 10.0.0.0/8)} -->
    <-- HDR, SK {..., TSi(TCP 80-443, 10.1.0.0/16), TSr(TCP 80-443, 10.2.0.0/16)}."""
    def web(nets):
        return tuple(replace(TrafficSelector.from_network(x), ip_protocol=6, start_port=80, end_port=443)
                     for x in nets)
    _a_proposes(monkeypatch, web)
    n = _psk_net(b={"my_net": B_NET}, a={"peer_net": ipaddress.ip_network("10.0.0.0/8")})
    n.a.initiate("node-b", n.now)
    n.pump()
    auth_resp = [d for s, d in n.log if s == "b"][1]
    _msg, pl = inner(n, auth_resp.data)
    tsi = next(p for p in pl if p.payload_type == PayloadType.TSi)
    tsr = next(p for p in pl if p.payload_type == PayloadType.TSr)
    assert [(s.ip_protocol, s.start_port, s.end_port) for s in (*tsi.selectors, *tsr.selectors)] == [(6, 80, 443)] * 2
    assert tsr.selectors[0].networks() == [B_NET]  # narrowed from 10.0.0.0/8
    (cb,) = n.of("b", ChildSaEstablished)
    assert cb.remote_selectors == tsi.selectors and cb.local_ts == (B_NET,)
    (ca,) = n.of("a", ChildSaEstablished)
    assert ca.local_selectors == tsi.selectors and ca.remote_ts == (B_NET,)


def test_initiator_refuses_a_responder_that_widens_the_protocol(monkeypatch):
    def udp53(nets):
        return tuple(replace(TrafficSelector.from_network(x), ip_protocol=17, start_port=53, end_port=53)
                     for x in nets)
    _a_proposes(monkeypatch, udp53)
    monkeypatch.setattr(ch, "narrow_ts", lambda proposed, allowed: list(allowed))  # a careless responder
    n = _psk_net()
    n.a.initiate("node-b", n.now)
    n.pump()
    # the IKE_SA stays (§1.2); the CHILD_SA B installed is deleted again, and retried later
    assert not n.of("a", IkeSaDeleted) and not n.of("a", ChildSaEstablished)
    assert [(e.reason, e.notify) for e in n.of("a", ChildSaRefused)] == [
        ("CHILD_SA refused: responder widened the traffic selectors", None)]
    assert len(n.of("b", ChildSaDeleted)) == 1 and not n.b._live()[0].children


def test_responder_ts_unacceptable_when_the_intersection_is_empty(monkeypatch):
    def elsewhere(nets):
        return tuple(TrafficSelector.from_network(ipaddress.ip_network("10.77.0.0/16")) for _ in nets)
    _a_proposes(monkeypatch, elsewhere)
    n = _psk_net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("a", IkeSaDeleted)
    assert [e.reason for e in n.of("a", ChildSaRefused)] == ["CHILD_SA refused: TS_UNACCEPTABLE"]


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
    n = _psk_net(bad, NOLIFE)
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
    n = _psk_net(replace(NOLIFE, **{field: value}), NOLIFE)
    n.a.initiate("node-b", n.now)
    assert n.a.datagrams_to_send() == []
    assert words in n.a.policy_errors["node-b"] and "node-b" in n.a.policy_errors["node-b"]


def test_fixed_policy_in_a_new_view_clears_the_error():
    n = _psk_net(replace(NOLIFE, replay_window=100), NOLIFE)
    n.a.initiate("node-b", n.now)
    assert "node-b" in n.a.policy_errors
    n.a.update_view(view("node-a", "node-b", policy=NOLIFE), n.now)
    assert n.a.policy_errors == {}
    _up(n)


# ------------------------------------------------------------------ 8. endpoint binding

def test_bind_endpoints_refuses_an_authenticated_peer_from_another_address():
    bound = replace(NOLIFE, bind_endpoints=True)
    n = _psk_net(NOLIFE, bound, b={"peer_addr": "198.51.100.77"})
    n.a.initiate("node-b", n.now)
    n.pump()
    (d,) = n.of("b", IkeSaDeleted)
    assert "198.51.100.1" in d.reason and "198.51.100.77" in d.reason and "bind_endpoints" in d.reason
    assert not n.of("b", ChildSaEstablished)


def test_bind_endpoints_accepts_the_configured_address_and_is_off_by_default():
    for b_policy, addr in ((replace(NOLIFE, bind_endpoints=True), A_ADDR), (NOLIFE, "198.51.100.77")):
        n = _psk_net(NOLIFE, b_policy, b={"peer_addr": addr})
        _up(n)


def test_bind_endpoints_allows_a_peer_behind_a_detected_nat():
    """encapsulation none (no faked NAT-D): A's packets reach B from 203.0.113.9 after a NAPT."""
    pol = replace(NOLIFE, encapsulation="none")
    n = _psk_net(pol, replace(pol, bind_endpoints=True))
    nat_ip = "203.0.113.9"

    def napt(src, d):
        if src == "a":
            n.b.receive_datagram(d.data, d.remote, (nat_ip, 40000 + d.local[1]), n.now)
            return True
        if d.remote[0] == nat_ip:
            n.a.receive_datagram(d.data, (A_ADDR, d.remote[1] - 40000), d.local, n.now)
            return True
        return False
    n.drop = napt
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("b", ChildSaEstablished)
    assert n.b.status()[0]["nat"]["remote"] is True


# ------------------------------------------------------------------ PAD: revocation, credentials

def test_revoked_certificate_deletes_its_ike_sa_and_cannot_authenticate_again(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    _up(n)
    assert n.b._live()[0].peer_cert_serial == 11  # conftest: node-a's certificate serial
    n.b.set_revoked_serials(frozenset({999}), n.now)
    assert len(n.b.status()) == 1  # other serials: nothing happens
    n.b.set_revoked_serials(frozenset({11}), n.now)
    n.pump()
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == ["peer certificate revoked (serial 11)"]
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == ["deleted by peer"]
    n.advance(n.now + 3)  # A re-initiates after 2 s; B refuses the revoked certificate
    assert any("serial 11" in e.reason and "revoked" in e.reason for e in n.of("b", IkeSaDeleted))
    assert n.b.status() == [] and n.a.status() == [] and len(n.of("a", ChildSaEstablished)) == 1
    # A, whose certificate is still good, keeps refusing B's revoked one likewise
    n.a.set_revoked_serials(frozenset({12}), n.now)
    assert n.a.status() == []


def test_update_credentials_applies_to_new_ike_sas_only(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    _up(n)
    n.b.update_credentials(cert_creds(pki, "b", ca="other_ca"), n.now)  # node-a's CA no longer trusted
    assert len(n.b.status()) == 1  # established: authenticated already
    n.a.delete_all(n.now)
    n.pump()
    n.a = IkeManager(n.a.view, n.a.credentials, DetRng("a2"), local_address=A_ADDR)
    n.events = {"a": [], "b": []}
    n.a.initiate("node-b", n.now)
    n.pump()
    assert not n.of("b", ChildSaEstablished)
    assert any("AUTHENTICATION_FAILED" in e.reason for e in n.of("b", IkeSaDeleted))
    n.b.update_credentials(cert_creds(pki, "b"), n.now)
    n.a = IkeManager(n.a.view, n.a.credentials, DetRng("a3"), local_address=A_ADDR)
    _up(n)


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


def test_revoked_serials_in_a_new_view_delete_like_set_revoked_serials(pki):
    n = make_net(view("node-a", "node-b", policy=NOLIFE), cert_creds(pki, "a"),
                 view("node-b", "node-a", policy=NOLIFE), cert_creds(pki, "b"))
    _up(n)
    n.b.update_view(replace(n.b.view, revoked_serials=frozenset({11})), n.now)
    n.pump()
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == ["peer certificate revoked (serial 11)"]
