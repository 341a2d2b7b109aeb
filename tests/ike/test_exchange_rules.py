"""Exchange rules of RFC 7296 at the corners (docs/ike-hardening.md "Exchange rules"): crossing
rekeys, SPI uniqueness, reassembly, NAT rebinding, retransmission digests, unknown selectors and
critical payloads, nonce sizes, delete with a request outstanding, policy change.
Sans-I/O: two IkeManagers on the in-memory wire of tests/ike/conftest.py."""
from __future__ import annotations

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeSaDeleted
from agent.ike.message import decode_message

from tests.ike.helpers import assert_mirrored, create_child_msgs, live_children, net


# ------------------------------------------------------------ 1. CHILD_SA rekey crossing an IKE_SA rekey
def test_child_rekey_crossing_ike_rekey_gets_temporary_failure_and_ike_rekey_retries():
    """a: HDR, SK {N(REKEY_SA), SA, Ni, TSi, TSr} --> while b: HDR, SK {SA, Ni, KEi} --> (both in
    flight). a answers b's IKE_SA rekey <-- HDR, SK {N(TEMPORARY_FAILURE)} (RFC 7296 §2.25.2), b
    answers the CHILD_SA rekey; b retries its IKE_SA rekey later and both ends keep one CHILD_SA."""
    n = net()
    sa_a = list(n.a._sas.values())[0]
    sa_b = list(n.b._sas.values())[0]
    old_in = sa_a.children[0].inbound_spi
    assert sa_a.rekey_child(old_in, n.now)
    n.a._collect(sa_a, n.now)
    assert sa_b.rekey_ike(n.now)
    n.b._collect(sa_b, n.now)
    da, db = n.a.datagrams_to_send(), n.b.datagrams_to_send()
    for d in db:  # a sees b's IKE_SA rekey first
        n.log.append(("b", d))
        n.a.receive_datagram(d.data, d.remote, d.local, n.now)
    for d in da:
        n.log.append(("a", d))
        n.b.receive_datagram(d.data, d.remote, d.local, n.now)
    n.pump()
    answers = [(src, by) for src, m, by in create_child_msgs(n) if src == "a" and m.is_response]
    notes = [p.notify_type for _src, by in answers for p in by.get(int(PayloadType.NOTIFY), [])]
    assert NotifyType.TEMPORARY_FAILURE in notes
    assert any("TEMPORARY_FAILURE" in e for e in sa_b.child_errors)
    # the CHILD_SA rekey went through on the still-current IKE_SA
    assert_mirrored(n, 1)
    assert old_in not in [i for i, _o in live_children(n.a)]
    # b retries the IKE_SA rekey (retry delay 1-30 s) and the new CHILD_SA moves with it
    n.advance(n.now + 60)
    assert sa_b.is_dead and sa_a.is_dead
    assert sa_b.delete_reason == "rekeyed" or any(
        isinstance(e, IkeSaDeleted) and e.rekeyed_to for e in n.events["b"])
    assert_mirrored(n, 1)
    new_b = [s for s in n.b._live()]
    assert len(new_b) == 1 and (new_b[0].spi_i, new_b[0].spi_r) != (sa_b.spi_i, sa_b.spi_r)
    # no CHILD_SA went down with the old IKE_SA
    assert not [e for e in n.events["a"] + n.events["b"]
                if isinstance(e, ChildSaDeleted) and e.reason not in ("rekeyed", "deleted by peer")]


# ------------------------------------------------------------ 2. inbound SPIs unique per node
def test_inbound_child_spis_are_unique_over_all_ike_sas_of_the_node():
    """RFC 4301 §4.1: the receiver's SPI identifies the SA. The rng of node a repeats its first
    4-octet draw; a's CHILD_SAs with b and c must still get different inbound SPIs."""
    import ipaddress
    from agent.ike.manager import IkeManager
    from agent.model import Credentials, NodeView, Peer
    from tests.ike.conftest import CLASSICAL, DetRng
    from tests.ike.helpers import PSK

    class RepeatRng(DetRng):
        repeats = 6

        def __call__(self, k):
            if k == 4 and self.repeats:
                self.repeats -= 1
                return b"\x0a\xbc\xde\xf0"
            return super().__call__(k)

    addr = {"a": "198.51.100.1", "b": "198.51.100.2", "c": "198.51.100.3"}
    nets = {"a": "10.1.0.0/16", "b": "10.2.0.0/16", "c": "10.3.0.0/16"}

    def peer(x):
        return Peer(x, x, (addr[x],), (ipaddress.ip_network(nets[x]),), CLASSICAL)

    def mgr(me, peers, rng):
        v = NodeView(me, me, (ipaddress.ip_network(nets[me]),), tuple(peer(p) for p in peers),
                     local_address=addr[me])
        return IkeManager(v, Credentials(psk=PSK), rng, local_address=addr[me])

    m = {"a": mgr("a", "bc", RepeatRng("a")), "b": mgr("b", "a", DetRng("b")), "c": mgr("c", "a", DetRng("c"))}
    by_addr = {addr[k]: k for k in m}
    m["a"].initiate("b", 0.0)
    m["a"].initiate("c", 0.0)
    for _ in range(30):
        for mm in m.values():
            for d in mm.datagrams_to_send():
                m[by_addr[d.remote[0]]].receive_datagram(d.data, d.remote, d.local, 0.0)
    spis = []
    while (e := m["a"].next_event()) is not None:
        if isinstance(e, ChildSaEstablished):
            spis.append(e.inbound.spi)
    assert len(spis) == 2 and len(set(spis)) == 2
    # a rekey allocates past every SPI in use, on any IKE_SA
    sa_b = next(sa for sa in m["a"]._live() if sa.peer_name == "b")
    used = m["a"]._child_spis_in_use()
    assert set(spis) <= used
    assert sa_b._new_child_spi() not in used


# ------------------------------------------------------------ 4. request and response reassembled apart
def _skf(sa_from, mid, response, payloads, rng):
    from agent.ike import fragment as frag
    from agent.ike.message import encode_payloads
    first, plain = encode_payloads(payloads)
    k = sa_from._keys
    sk_e, sk_a = (k.sk_ei, k.sk_ai) if sa_from.initiator else (k.sk_er, k.sk_ar)
    flags = (0x08 if sa_from.initiator else 0) | (0x20 if response else 0)
    return frag.fragment(spi_i=sa_from.spi_i, spi_r=sa_from.spi_r, exchange=int(ExchangeType.INFORMATIONAL),
                         flags=flags, message_id=mid, first=first, plaintext=plain, cipher=sa_from._cipher,
                         sk_e=sk_e, sk_a=sk_a, rng=rng, budget=300)


def test_fragments_of_a_request_and_a_response_interleaved_both_reassemble():
    """RFC 7383 §2.6: b's request (Message ID 0) and b's response to a's liveness check
    (Message ID 2) arrive as SKF fragments interleaved; a reassembles both."""
    from agent.ike.message import NotifyPayload
    from tests.ike.conftest import DetRng
    n = net()
    sa_a = list(n.a._sas.values())[0]
    sa_b = list(n.b._sas.values())[0]
    assert sa_a.check_liveness(n.now)
    n.a._collect(sa_a, n.now)
    n.a.datagrams_to_send()
    mid_rsp = sa_a._pending.message_id
    mid_req = sa_a._peer_mid
    assert mid_req != mid_rsp
    rng = DetRng("frag")
    req = _skf(sa_b, mid_req, False, [NotifyPayload(40000, b"R" * 500)], rng)  # status type, ignored
    rsp = _skf(sa_b, mid_rsp, True, [NotifyPayload(40001, b"S" * 500)], rng)
    assert len(req) >= 2 and len(rsp) >= 2
    for i in range(max(len(req), len(rsp))):
        for fr in (req, rsp):
            if i < len(fr):
                n.a.receive_datagram(fr[i], sa_a.local, sa_a.remote, n.now)
    assert sa_a._pending is None  # the response completed the liveness check
    out = [decode_message(d.data) for d in n.a.datagrams_to_send()]
    assert [(m.message_id, m.is_response) for m in out] == [(mid_req, True)]  # the request was answered
    assert sa_a.state == "ESTABLISHED"


# ------------------------------------------------------------ 5. NAT rebinding
def _nat_net():
    from agent.model import Credentials
    from tests.ike.conftest import CLASSICAL, make_net, replace, view
    from tests.ike.helpers import PSK
    pol = replace(CLASSICAL, encapsulation="udp", dpd_interval_s=30)
    n = make_net(view("node-a", "node-b", policy=pol), Credentials(psk=PSK), view("node-b", "node-a", policy=pol),
                 Credentials(psk=PSK), seed="nat")
    n.a.initiate("node-b", n.now)
    n.pump()
    return n


def test_nat_rebinding_follows_the_last_authenticated_address_and_reports_it():
    """RFC 7296 §2.23: a's NAT mapping moves to port 61000; after a's authenticated
    HDR, SK {} --> from there, b sends to 61000 and emits PeerAddressChanged."""
    from agent.ike.events import PeerAddressChanged
    n = _nat_net()
    sa_a, sa_b = list(n.a._sas.values())[0], list(n.b._sas.values())[0]
    assert sa_b.nat.remote and sa_b.remote == ("198.51.100.1", 4500)
    orig = n.b.receive_datagram
    n.b.receive_datagram = lambda data, local, remote, now: orig(
        data, local, (remote[0], 61000) if remote[1] == 4500 else remote, now)
    # an unauthenticated datagram from the new port moves nothing
    n.b.receive_datagram(b"\x00" * 4 + bytes(28), ("198.51.100.2", 4500), ("198.51.100.1", 4500), n.now)
    assert sa_b.remote == ("198.51.100.1", 4500)
    sa_a.check_liveness(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert sa_b.remote == ("198.51.100.1", 61000)
    ev = n.of("b", PeerAddressChanged)
    assert ev == [PeerAddressChanged("node-a", sa_b.spi_i, sa_b.spi_r, ("198.51.100.1", 61000))]
    sa_b.check_liveness(n.now)
    n.b._collect(sa_b, n.now)
    assert [d.remote for d in n.b.datagrams_to_send()] == [("198.51.100.1", 61000)]
    assert n.of("a", PeerAddressChanged) == []  # b's address did not change


def test_no_rebinding_when_the_peer_is_not_behind_a_nat():
    from agent.ike.events import PeerAddressChanged
    from tests.ike.conftest import CLASSICAL, replace
    n = net(replace(CLASSICAL, encapsulation="none"))
    sa_a, sa_b = list(n.a._sas.values())[0], list(n.b._sas.values())[0]
    assert not sa_b.nat.remote
    before = sa_b.remote
    orig = n.b.receive_datagram
    n.b.receive_datagram = lambda data, local, remote, now: orig(data, local, (remote[0], 61000), now)
    sa_a.check_liveness(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert sa_b.remote == before and n.of("b", PeerAddressChanged) == []


# ------------------------------------------------------------ 6. retransmission digests after the ICV
def test_forged_datagram_with_the_expected_message_id_never_triggers_a_cached_response():
    """A 36-octet HDR, SK {JUNK} with the IKE_AUTH request's Message ID is dropped (bad ICV /
    malformed); replayed after the genuine request was answered, it gets no response (§2.1)."""
    import struct
    from tests.ike.conftest import make_net, view
    from tests.ike.helpers import PSK
    from agent.model import Credentials
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK), view("node-b", "node-a"), Credentials(psk=PSK),
                 seed="d")
    held = []

    def drop(src, d):
        m = decode_message(d.data)
        if src == "a" and m.exchange == ExchangeType.IKE_AUTH and not m.is_response and not held:
            held.append(d)
            return True
        return False
    n.drop = drop
    n.a.initiate("node-b", n.now)
    n.pump()
    real = held[0]
    m = decode_message(real.data)
    junk = (struct.pack("!QQBBBBII", m.spi_i, m.spi_r, 46, 0x20, 35, 0x08, m.message_id, 36)
            + struct.pack("!BBH", 35, 0, 8) + b"JUNK")
    n.b.receive_datagram(junk, real.remote, ("203.0.113.66", 500), n.now)
    assert n.b.datagrams_to_send() == []
    n.b.receive_datagram(real.data, real.remote, real.local, n.now)
    assert len(n.b.datagrams_to_send()) == 1  # <-- HDR, SK {IDr, AUTH, SA, TSi, TSr}
    n.b.receive_datagram(junk, real.remote, ("203.0.113.66", 4500), n.now + 1)
    assert n.b.datagrams_to_send() == []
    assert n.b.counters.get("retransmission_mismatch", 0) >= 1
    # the genuine retransmission still gets the cached response
    n.b.receive_datagram(real.data, real.remote, real.local, n.now + 2)
    assert [d.remote for d in n.b.datagrams_to_send()] == [real.local]


# ------------------------------------------------------------ 8. unknown traffic selector types
SECLABEL = 10  # TS_SECLABEL (RFC 9478)


def test_unknown_ts_type_decodes_opaque_and_round_trips():
    import struct
    from agent.ike.message import OpaqueSelector, TsPayload, decode_payloads, encode_payloads
    v4 = struct.pack("!BBHHH", 7, 0, 16, 0, 65535) + bytes([10, 1, 0, 0, 10, 1, 255, 255])
    label = struct.pack("!BBH", SECLABEL, 0, 9) + b"sys:x"
    body = struct.pack("!BBH", 2, 0, 0) + v4 + label
    (ts,) = decode_payloads(int(PayloadType.TSi), struct.pack("!BBH", 0, 0, 4 + len(body)) + body)
    assert isinstance(ts, TsPayload) and ts.selectors[1] == OpaqueSelector(SECLABEL, label)
    assert ts.selectors[1].networks() == []
    first, plain = encode_payloads([ts])
    assert first == int(PayloadType.TSi) and plain[4:] == body
    # a selector length that runs past the payload is still an error
    bad = struct.pack("!BBH", 1, 0, 0) + struct.pack("!BBH", SECLABEL, 0, 40) + b"sys:x"
    import pytest
    from agent.ike.message import MessageError
    with pytest.raises(MessageError, match="selector length"):
        decode_payloads(int(PayloadType.TSi), struct.pack("!BBH", 0, 0, 4 + len(bad)) + bad)


def _with_label(sa, only_label=False):
    from agent.ike.message import OpaqueSelector, TsPayload
    orig = sa.child_create.build_request
    lab = OpaqueSelector(SECLABEL, bytes([SECLABEL, 0, 0, 9]) + b"sys:x")

    def build(task, now):
        out = orig(task, now)
        return [TsPayload(p.payload_type, ((lab,) if only_label else (*p.selectors, lab)))
                if isinstance(p, TsPayload) else p for p in out]
    sa.child_create.build_request = build


def test_create_child_with_an_unknown_selector_type_is_narrowed_to_the_known_ones():
    """HDR, SK {SA, Ni, TSi(v4 range, SECLABEL), TSr(v4 range, SECLABEL)} --> is answered with
    the IPv4 ranges only (the unknown type ignored in narrowing, §2.9)."""
    n = net()
    sa_a = list(n.a._sas.values())[0]
    _with_label(sa_a)
    assert sa_a.create_child(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert len(n.of("a", ChildSaEstablished)) == 1 and len(n.of("b", ChildSaEstablished)) == 1
    resp = [by for src, m, by in create_child_msgs(n) if src == "b" and m.is_response][0]
    for t in (PayloadType.TSi, PayloadType.TSr):
        assert {s.ts_type for s in resp[int(t)][0].selectors} == {7}


def test_create_child_with_only_unknown_selectors_gets_ts_unacceptable():
    n = net()
    sa_a = list(n.a._sas.values())[0]
    _with_label(sa_a, only_label=True)
    assert sa_a.create_child(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert n.of("b", ChildSaEstablished) == []
    assert any("TS_UNACCEPTABLE" in e for e in sa_a.child_errors)
    assert sa_a.state == "ESTABLISHED"


# ------------------------------------------------------------ 9. unknown critical payload in a response
def test_response_with_an_unknown_critical_payload_fails_its_exchange():
    """<-- HDR, SK {SA, Nr, TSi, TSr, <unknown type 200, critical>}: a cannot understand the
    response fully, so the CREATE_CHILD_SA fails (§2.5) and no CHILD_SA is installed."""
    from agent.ike.message import UnknownPayload
    n = net()
    sa_a = list(n.a._sas.values())[0]
    sa_b = list(n.b._sas.values())[0]
    orig = sa_b.child_create.process_request
    sa_b.child_create.process_request = lambda msg, inner, now: [*orig(msg, inner, now),
                                                                   UnknownPayload(200, True, b"new")]
    assert sa_a.create_child(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) == []
    assert any("UNSUPPORTED_CRITICAL_PAYLOAD" in e for e in sa_a.child_errors)
    assert sa_a.state == "ESTABLISHED" and sa_a._pending is None
    assert not sa_a.create_child(n.now)  # the failed CHILD_SA backs off (child_refusal, issue 9)
    # a non-critical unknown payload is ignored (§2.5)
    sa_b.child_create.process_request = lambda msg, inner, now: [*orig(msg, inner, now),
                                                                   UnknownPayload(200, False, b"new")]
    n.advance(n.now + 2.5)
    assert sa_a.create_child(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert len(n.of("a", ChildSaEstablished)) == 1


# ------------------------------------------------------------ 9. nonce at least half the PRF key size
def test_nonce_ok_bounds():
    """RFC 7296 §2.10: at least 128 bits and at least half the negotiated PRF's key size."""
    from agent.iana import PrfId
    from agent.ike.crypto import nonce_ok
    assert nonce_ok(bytes(16), PrfId.PRF_HMAC_SHA2_256) and not nonce_ok(bytes(15), PrfId.PRF_HMAC_SHA2_256)
    assert not nonce_ok(bytes(23), PrfId.PRF_HMAC_SHA2_384) and nonce_ok(bytes(24), PrfId.PRF_HMAC_SHA2_384)
    assert not nonce_ok(bytes(31), PrfId.PRF_HMAC_SHA2_512) and nonce_ok(bytes(32), PrfId.PRF_HMAC_SHA2_512)
    assert not nonce_ok(bytes(257), PrfId.PRF_HMAC_SHA2_256)


def test_short_ni_for_a_sha512_prf_is_refused_in_ike_sa_init_and_create_child(monkeypatch):
    from agent.ike.tasks import child_create as cc
    from agent.ike.tasks import ike_init
    from tests.ike.conftest import CLASSICAL, replace
    pol = replace(CLASSICAL, ike_proposals=("aes256gcm16-prfsha512-x25519",))
    n = net(pol)
    sa_a = list(n.a._sas.values())[0]
    assert "SHA2_512" in sa_a.algorithms
    # HDR, SK {SA, Ni(20 octets), TSi, TSr} --> ; <-- HDR, SK {N(INVALID_SYNTAX)}
    monkeypatch.setattr(cc, "NONCE_LEN", 20)
    assert sa_a.create_child(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert n.of("b", ChildSaEstablished) == []
    # RFC 7296 §2.21.3: INVALID_SYNTAX is fatal for the IKE_SA in both peers
    assert [e.reason for e in n.of("a", IkeSaDeleted)] == [
        "CREATE_CHILD_SA refused: INVALID_SYNTAX (fatal for the IKE_SA, RFC 7296 §2.21.3)"]
    assert [e.reason for e in n.of("b", IkeSaDeleted)] == [
        "peer sent an invalid CREATE_CHILD_SA request; answered INVALID_SYNTAX (RFC 7296 §2.21.3)"]
    # HDR, SA, KEi, Ni(20 octets) --> ; <-- HDR, N(INVALID_SYNTAX)
    from tests.ike.conftest import make_net, view
    from tests.ike.helpers import PSK
    from agent.model import Credentials
    monkeypatch.setattr(ike_init, "NONCE_LEN", 20)
    m = make_net(view("node-a", "node-b", policy=pol), Credentials(psk=PSK), view("node-b", "node-a", policy=pol),
                 Credentials(psk=PSK), seed="nonce")
    m.a.initiate("node-b", m.now)
    m.pump()
    assert m.of("a", ChildSaEstablished) == [] and m.of("b", ChildSaEstablished) == []
    assert any(getattr(e, "reason", "").endswith("INVALID_SYNTAX") for e in m.events["a"]), m.events["a"]


# ------------------------------------------------------------ 9. delete() with a request outstanding
def test_delete_waits_for_the_outstanding_request_so_the_peer_accepts_the_delete():
    """a's liveness check (Message ID 2) is lost; a then deletes the IKE_SA. The D(IKE) request
    must follow the outstanding one (window size 1, §2.3), so b gets it and deletes too."""
    n = net()
    sa_a, sa_b = list(n.a._sas.values())[0], list(n.b._sas.values())[0]
    lost = []
    n.drop = lambda src, d: (src == "a" and not lost and (lost.append(d) or True))
    sa_a.check_liveness(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    n.drop = None
    sa_a.delete(n.now, "deleted locally")
    n.a._collect(sa_a, n.now)
    n.pump()
    n.advance(n.now + 10)
    assert sa_b.state == "DELETED" and sa_b.delete_reason == "deleted by peer"
    assert sa_a.state == "DELETED"
    assert n.b.counters.get("invalid_message_id", 0) == 0


def test_delete_with_a_silent_peer_ends_after_a_short_bound():
    n = net()
    sa_a = list(n.a._sas.values())[0]
    n.drop = lambda src, d: src == "a"
    sa_a.check_liveness(n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    t0 = n.now
    sa_a.delete(n.now, "deleted locally")
    n.a._collect(sa_a, n.now)
    n.advance(t0 + 4)  # 2 more retransmissions of the outstanding request: 1 + 2 s
    assert sa_a._pending is not None and sa_a._pending.exchange == ExchangeType.INFORMATIONAL
    n.advance(t0 + 200)
    assert sa_a.state == "DELETED"


# ------------------------------------------------------------ 9. delete_child keeps the inbound SA until the response
def test_rekeyed_child_sa_stays_until_the_delete_response_and_rekey_of_it_gets_temporary_failure():
    """After a CHILD_SA rekey, a sends HDR, SK {D(ESP, old SPI)} -->; its ChildSaDeleted (which
    removes the inbound SA) comes with b's response, not before (§1.4.1). A CHILD_SA rekey
    request from b for it meanwhile gets TEMPORARY_FAILURE (§2.25.1)."""
    n = net()
    sa_a = list(n.a._sas.values())[0]
    old = sa_a.children[0]
    held = []
    n.drop = lambda src, d: (src == "b" and decode_message(d.data).exchange == ExchangeType.INFORMATIONAL
                             and decode_message(d.data).is_response and (held.append(d) or True))
    sa_a.rekey_child(old.inbound_spi, n.now)
    n.a._collect(sa_a, n.now)
    n.pump()
    assert held  # b answered the Delete; the answer is in flight
    assert not [e for e in n.events["a"] if isinstance(e, ChildSaDeleted) and e.inbound_spi == old.inbound_spi]
    # b (not knowing yet) asks to rekey the CHILD_SA a is closing
    rsp = sa_a.child_create.process_request(
        type("M", (), {"spi_i": sa_a.spi_i, "spi_r": sa_a.spi_r, "exchange": 36, "message_id": 9,
                       "is_initiator": True})(),
        _rekey_request_payloads(sa_a, old), n.now)
    assert [p.notify_type for p in rsp] == [NotifyType.TEMPORARY_FAILURE]
    n.drop = None
    for d in held:
        n.a.receive_datagram(d.data, d.remote, d.local, n.now)
    n.pump()
    assert [e.reason for e in n.events["a"] if isinstance(e, ChildSaDeleted)] == ["rekeyed"]
    assert_mirrored(n, 1)


def _rekey_request_payloads(sa, old):
    """HDR, SK {N(REKEY_SA), SA, Ni, TSi, TSr} payloads as the peer would send them."""
    from agent.ike import child as ch
    from agent.ike.message import NoncePayload, NotifyPayload, TsPayload
    props = ch.offers(sa.peer.policy, old.protocol)
    return [NotifyPayload(int(NotifyType.REKEY_SA), b"", int(old.protocol_id), old.outbound_spi.to_bytes(4, "big")),
            ch.esp_sa_payload(props, 0x12345678, ke=True), NoncePayload(bytes(32)),
            TsPayload(int(PayloadType.TSi), ch.ts_from_networks(old.remote_ts)),
            TsPayload(int(PayloadType.TSr), ch.ts_from_networks(old.local_ts))]


def test_child_sa_not_found_names_the_protocol_of_the_request():
    """§2.25.1 / §3.10: the CHILD_SA_NOT_FOUND notify carries the Protocol ID and SPI of the REKEY_SA."""
    from agent.iana import ProtocolId
    from agent.ike.message import NotifyPayload
    n = net()
    sa_a = list(n.a._sas.values())[0]
    old = sa_a.children[0]
    payloads = _rekey_request_payloads(sa_a, old)
    payloads[0] = NotifyPayload(int(NotifyType.REKEY_SA), b"", int(ProtocolId.AH), b"\x00\x00\x99\x99")
    m = type("M", (), {"spi_i": sa_a.spi_i, "spi_r": sa_a.spi_r, "exchange": 36, "message_id": 9,
                       "is_initiator": True})()
    (nf,) = sa_a.child_create.process_request(m, payloads, n.now)
    assert (nf.notify_type, nf.protocol, nf.spi) == (NotifyType.CHILD_SA_NOT_FOUND, ProtocolId.AH, b"\x00\x00\x99\x99")


def test_spi_allocation_with_a_stuck_random_source_fails_instead_of_hanging():
    """A random source that repeats one value forever must not hang the agent's loop."""
    import pytest
    from agent.ike.manager import IkeManager
    from agent.model import Credentials
    from tests.ike.conftest import A_ADDR, view
    m = IkeManager(view("node-a", "node-b"), Credentials(psk=b"p" * 32), lambda n: b"\0" * n, local_address=A_ADDR)
    with pytest.raises(RuntimeError, match="random source"):
        m._new_child_spi()


def test_a_policy_change_deletes_the_sas_negotiated_under_the_old_policy():
    """A running mesh whose controller changes a pair's policy (here to DISCARD, a
    quarantine) must not keep the SAs negotiated under the old one (RFC 4301 §4.4.1);
    and nobody initiates to a peer that is not PROTECT."""
    from dataclasses import replace
    from agent.ike.events import ChildSaEstablished, IkeSaDeleted
    from agent.ike.manager import IkeManager
    from agent.model import Credentials, PeerPolicy
    from tests.ike.conftest import A_ADDR, B_ADDR, CLASSICAL, DetRng, Net, view
    psk = Credentials(psk=b"policy-change-psk-0123456789")
    a = IkeManager(view("node-a", "node-b"), psk, DetRng("pa"), local_address=A_ADDR)
    b = IkeManager(view("node-b", "node-a"), psk, DetRng("pb"), local_address=B_ADDR)
    n = Net(a, b)
    a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    va = a.view
    quarantined = replace(va, peers=tuple(replace(p, policy=replace(CLASSICAL, action="discard"))
                                          for p in va.peers))
    a.update_view(quarantined, n.now)
    n.pump()
    assert any("policy changed (now discard" in e.reason for e in n.of("a", IkeSaDeleted))
    assert n.of("b", IkeSaDeleted), "the peer learns it from the Delete"
    assert not [s for s in a.status() if s.get("state") == "ESTABLISHED"]
    a.initiate("node-b", n.now)  # an acquire for a DISCARD peer starts nothing
    assert a.datagrams_to_send() == []
    # a change of protocol/mode re-negotiates: the old SAs go
    n2a = IkeManager(view("node-a", "node-b"), psk, DetRng("qa"), local_address=A_ADDR)
    n2b = IkeManager(view("node-b", "node-a"), psk, DetRng("qb"), local_address=B_ADDR)
    n2 = Net(n2a, n2b)
    n2a.initiate("node-b", n2.now)
    n2.pump()
    v2 = n2a.view
    n2a.update_view(replace(v2, peers=tuple(replace(p, policy=replace(p.policy, mode="transport"))
                                            for p in v2.peers)), n2.now)
    n2.pump()
    assert any("policy changed (now protect, esp/transport" in e.reason for e in n2.of("a", IkeSaDeleted))
