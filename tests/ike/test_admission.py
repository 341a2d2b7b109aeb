"""Admission of IKE_SA_INIT before authentication (issue 13, D7-D9): COOKIE mode on the request
rate, decode caps answered statelessly, refusals counted and summarised, the IKE_SA_INIT size
cap and the byte budget of half-open state. Sans-I/O, fake clock."""
from __future__ import annotations

import pytest

import datetime
from dataclasses import replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.iana import ExchangeType, NotifyType
from agent.ike import admission
from agent.ike import child as ch
from agent.ike import manager as manager_mod
from agent.ike.cookie import CookieJar
from agent.ike.events import IkeSaDeleted, InitsRefused
from agent.ike.manager import IkeManager
from agent.ike.message import (EncryptedPayload, Message, NoncePayload, Proposal,
                               SaPayload, Transform, TransformAttribute, VendorPayload, decode_message,
                               encode_message)
from agent.model import Credentials, NodeView, Peer

from tests.ike.helpers import init_request, replies, responder
from tests.ike.conftest import A_ADDR, B_ADDR, CLASSICAL, DetRng, T0, view

LOCAL = (B_ADDR, 500)
PSK = b"admission tests pre-shared key 0"
X25519_ONLY = replace(CLASSICAL, ike_proposals=("aes128gcm16-prfsha256-x25519",))


_request = init_request


def _responder(policy=X25519_ONLY, **kw):
    return responder(PSK, policy, **kw)


_replies = replies


class _CountingView:
    """A NodeView whose ``peers`` reads are counted."""

    def __init__(self, view: NodeView) -> None:
        self._view, self.reads = view, 0

    @property
    def peers(self):
        self.reads += 1
        return self._view.peers

    def __getattr__(self, name):
        return getattr(self._view, name)


def _big_cert_creds(ca, name: str, seed: int) -> Credentials:
    """ECDSA certificate padded with 80 dNSName SANs so IKE_AUTH exceeds 1,500 octets (fragmented)."""
    ca_key, ca_cert = ca
    key = ec.derive_private_key(seed, ec.SECP256R1())
    sans = [x509.DNSName(name)] + [x509.DNSName(f"alias-{i:03d}.{name}.interop.example") for i in range(80)]
    nb = datetime.datetime.fromtimestamp(T0 - 3600, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(seed)
            .not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return Credentials(private_key_pem=pem, certificate_chain=(cert.public_bytes(serialization.Encoding.DER),),
                       ca_certificates=(ca_cert.public_bytes(serialization.Encoding.DER),))


def _src(i: int) -> tuple[str, int]:
    return (f"203.0.113.{i % 250 + 1}" if i < 250 else f"2001:db8::{i:x}", 500)


def _refused(spi: int) -> bytes:
    """An IKE_SA_INIT the responder refuses: no proposal it accepts (NO_PROPOSAL_CHOSEN)."""
    return _request(spi, proposal="aes256-sha256-modp2048", group=14)


def _sa(proposals: int, transforms: int, attributes: int) -> SaPayload:
    return SaPayload(tuple(Proposal(i + 1, 1, b"", tuple(
        Transform(1 + j % 4, 1000 + j, tuple(TransformAttribute(14, 128 + k) for k in range(attributes)))
        for j in range(transforms))) for i in range(proposals)))


def _notifies(m):
    return [getattr(r.payloads[0], "notify_type", None) for r in _replies(m)]


# ------------------------------------------------------------ D7: COOKIE mode on the init rate

def test_refused_inits_engage_cookie_mode_by_rate(monkeypatch):
    """Refused IKE_SA_INITs leave no half-open IKE_SA, so the half-open threshold never asked for
    a COOKIE: every one was decoded and matched (ms each for crafted ones). Past ``init_rate``
    per second they get N(COOKIE) before anything is decoded."""
    m = _responder(cookie_threshold=50, init_rate=20)
    decoded = []
    orig = manager_mod.decode_message
    monkeypatch.setattr(manager_mod, "decode_message", lambda d: decoded.append(1) or orig(d))
    got = []
    for i in range(100):
        m.receive_datagram(_refused(0x100 + i), LOCAL, _src(i), T0)
        got += _notifies(m)
    assert got[:20] == [NotifyType.NO_PROPOSAL_CHOSEN] * 20
    assert got[20:] == [NotifyType.COOKIE] * 80
    assert len(decoded) == 20 and m.half_open() == 0 and m._sas == {} and m.half_open_bytes() == 0
    assert m.counters["cookie_required"] == 80 and m.counters["cookie_mode_init_rate"] == 80
    # a legitimate initiator answers its COOKIE and gets through while the mode lasts
    m.receive_datagram(_request(0x7777), LOCAL, (A_ADDR, 500), T0 + 0.01)
    (cookie,) = _replies(m)
    m.receive_datagram(_request(0x7777, cookie=cookie.notify(NotifyType.COOKIE).data), LOCAL, (A_ADDR, 500), T0 + 0.02)
    (reply,) = _replies(m)
    assert reply.spi_r != 0 and m.half_open() == 1
    # the bucket refills: one second later requests are let through again
    m.receive_datagram(_refused(0x9999), LOCAL, _src(7), T0 + 1.1)
    assert _notifies(m) == [NotifyType.NO_PROPOSAL_CHOSEN]


def test_pressure_timeout_applies_in_init_rate_cookie_mode():
    m = _responder(cookie_threshold=1_000, init_rate=5)
    for i in range(5):
        m.receive_datagram(_refused(0x100 + i), LOCAL, _src(i), T0)
    m.datagrams_to_send()
    m.receive_datagram(_request(0x42), LOCAL, (A_ADDR, 500), T0)
    (cookie,) = _replies(m)
    m.receive_datagram(_request(0x42, cookie=cookie.notify(NotifyType.COOKIE).data), LOCAL, (A_ADDR, 500), T0)
    (sa,) = m._sas.values()
    assert sa.setup_deadline == T0 + m.half_open_pressure_timeout_s


def test_init_rate_zero_turns_the_rate_limit_off():
    m = _responder(cookie_threshold=1_000, init_rate=0)
    for i in range(300):
        m.receive_datagram(_refused(0x100 + i), LOCAL, _src(i), T0)
    assert set(_notifies(m)) == {NotifyType.NO_PROPOSAL_CHOSEN}


# ------------------------------------------------------------ D7: decode caps, answered

@pytest.mark.parametrize("shape,kind", [
    ((17, 1, 0), "proposals"),
    ((16, 9, 0), "transforms"),
    ((1, 1, 5), "attributes"),
    ((16, 8, 2), "attributes"),  # 256 attributes in all: over MAX_ATTRIBUTES_TOTAL (128)
])
def test_sa_over_the_caps_is_refused_with_no_proposal_chosen_and_counted(shape, kind):
    m = _responder(cookie_threshold=1_000)
    m.receive_datagram(_request(0x55, sa=_sa(*shape)), LOCAL, _src(1), T0)
    assert _notifies(m) == [NotifyType.NO_PROPOSAL_CHOSEN]
    assert m.counters == {f"init_refused_too_many_{kind}": 1} and m._sas == {}


def test_worst_accepted_shape_decodes():
    m = _responder(cookie_threshold=1_000)
    m.receive_datagram(_request(0x56, sa=_sa(16, 8, 1)), LOCAL, _src(1), T0)
    assert _notifies(m) == [NotifyType.NO_PROPOSAL_CHOSEN]  # decoded, nothing acceptable
    assert m.counters == {"init_refused_no_proposal_chosen": 1}


def test_too_many_payloads_in_ike_sa_init_are_refused_with_invalid_syntax():
    m = _responder(cookie_threshold=1_000)
    m.receive_datagram(_request(0x57, filler=70), LOCAL, _src(1), T0)
    assert _notifies(m) == [NotifyType.INVALID_SYNTAX]
    assert m.counters == {"init_refused_too_many_payloads": 1} and m._sas == {}


# ------------------------------------------------------------ D8: refusals counted, summarised

def test_refusals_are_counted_by_reason_and_summarised_at_most_every_10_s():
    m = _responder(cookie_threshold=1_000, init_rate=0)
    for i in range(30):
        m.receive_datagram(_refused(0x100 + i), LOCAL, _src(i), T0 + i * 0.1)
        m.receive_datagram(_request(0x900 + i, proposal="aes128gcm16-prfsha256-ecp256-x25519", group=19),
                           LOCAL, _src(i), T0 + i * 0.1)
    m.datagrams_to_send()
    events = []
    while (ev := m.next_event()) is not None:
        events.append(ev)
    # no IkeSaDeleted (logged one line each) for IKE_SAs that never were; one summary at once
    assert not [e for e in events if isinstance(e, IkeSaDeleted)]
    assert [e.counts for e in events if isinstance(e, InitsRefused)] == [{"no_proposal_chosen": 1}]
    assert m.counters["init_refused_no_proposal_chosen"] == 30 and m.counters["init_refused_invalid_ke_payload"] == 30
    # the rest comes as one summary once 10 s have passed (a timer: no further datagram needed)
    assert m.get_timer() == T0 + 10
    m.handle_timer(T0 + 10)
    (ev,) = [e for e in iter(m.next_event, None)]
    assert isinstance(ev, InitsRefused)
    assert ev.counts == {"no_proposal_chosen": 29, "invalid_ke_payload": 30} and ev.since == T0
    assert ev.until == T0 + 10 and ev.last == _src(29)
    assert m.get_timer() is None


# ------------------------------------------------------------ D9: size cap, byte budget

def test_oversized_ike_sa_init_is_refused_before_decoding(monkeypatch):
    decoded = []
    orig = manager_mod.decode_message
    monkeypatch.setattr(manager_mod, "decode_message", lambda d: decoded.append(1) or orig(d))
    for cookie_mode in (False, True):
        m = _responder(cookie_threshold=0 if cookie_mode else 1_000)
        data = _request(0x58, filler=2_100)  # 8,5 KB of Vendor IDs
        assert len(data) > admission.MAX_INIT_LEN
        m.receive_datagram(data, LOCAL, _src(1), T0)
        assert _notifies(m) == [NotifyType.INVALID_SYNTAX]
        assert m.counters == {"init_refused_too_large": 1} and m._sas == {}
    assert decoded == []
    m = _responder(cookie_threshold=1_000)
    m.receive_datagram(_request(0x59, filler=1_900), LOCAL, _src(1), T0)  # under 8 KiB: goes on
    assert "init_refused_too_large" not in m.counters


def test_half_open_bytes_are_budgeted_and_cookie_mode_starts_at_half():
    per = admission.HALF_OPEN_BASE_BYTES
    m = _responder(cookie_threshold=1_000, half_open_bytes_max=40 * per, init_rate=0)
    for i in range(40):
        before = m.half_open_bytes()
        m.receive_datagram(_request(0x100 + i), LOCAL, _src(i), T0)
        (n,) = _notifies(m)
        if n == NotifyType.COOKIE:
            break
        assert n is None  # accepted: SA, KE, Nr
    assert 2 * before >= 40 * per and 15 <= m.half_open() <= 20  # requests and responses count too
    assert m.counters["cookie_mode_half_open_bytes"] == 1


def test_half_open_byte_budget_evicts_the_oldest():
    per = admission.HALF_OPEN_BASE_BYTES
    big = 7_000  # Vendor ID octets per request: the request is kept for IKE_AUTH
    m = _responder(cookie_threshold=1_000, half_open_bytes_max=20 * per, init_rate=0)
    for i in range(30):  # an attacker that answers its COOKIEs (COOKIE mode starts at half the budget)
        m.receive_datagram(_big_request(0x100 + i, big), LOCAL, _src(i), T0 + i * 0.001)
        (reply,) = _replies(m)
        if reply.notify(NotifyType.COOKIE) is not None:
            m.receive_datagram(_big_request(0x100 + i, big, reply.notify(NotifyType.COOKIE).data), LOCAL, _src(i),
                               T0 + i * 0.001)
            (reply,) = _replies(m)
        assert reply.spi_r != 0  # accepted
        assert m.half_open_bytes() <= 20 * per
    assert m.counters["half_open_evicted"] > 0 and m.counters["cookie_mode_half_open_bytes"] > 0
    assert m.half_open() < 20 and m.half_open_bytes() <= 20 * per
    # the newest stayed
    assert _src(29)[0] in m._half_open_by_ip
    # nothing is left charged once they expire (no accounting leak)
    m.handle_timer(T0 + 100)
    assert m.half_open() == 0 and m.half_open_bytes() == 0 and m._ho_cost == {}


def _big_request(spi: int, octets: int, cookie: bytes | None = None) -> bytes:
    msg = decode_message(_request(spi, cookie=cookie))
    return encode_message(Message(msg.spi_i, 0, msg.exchange, 0, True, False,
                                  msg.payloads + (VendorPayload(b"v" * octets),)))


# ------------------------------------------------------------ cookie: lengths before hashing

def test_cookie_jar_checks_lengths_before_hashing(monkeypatch):
    jar = CookieJar(DetRng("jar"))
    hashed = []
    orig = CookieJar._hash
    monkeypatch.setattr(CookieJar, "_hash", staticmethod(lambda *a: hashed.append(1) or orig(*a)))
    assert jar.check(b"\x00" + bytes(32), b"N" * 60_000, "203.0.113.1", 1, T0) == "bad_nonce"
    assert jar.check(b"\x00" + bytes(32), b"N" * 8, "203.0.113.1", 1, T0) == "bad_nonce"
    with pytest.raises(ValueError):
        jar.make(b"N" * 60_000, "203.0.113.1", 1, T0)
    assert hashed == []
    assert jar.check(jar.make(b"N" * 32, "203.0.113.1", 1, T0), b"N" * 32, "203.0.113.1", 1, T0) is None


def test_cookie_mode_refuses_a_bad_nonce_without_hashing_it(monkeypatch):
    m = _responder(cookie_threshold=0)
    hashed = []
    orig = CookieJar._hash
    monkeypatch.setattr(CookieJar, "_hash", staticmethod(lambda *a: hashed.append(1) or orig(*a)))
    msg = decode_message(_request(0x61, cookie=b"\x00" + bytes(32)))
    data = encode_message(Message(msg.spi_i, 0, msg.exchange, 0, True, False,
                                  msg.payloads[:3] + (NoncePayload(b"N" * 7_000),)))
    m.receive_datagram(data, LOCAL, _src(1), T0)
    assert _notifies(m) == [NotifyType.INVALID_SYNTAX] and hashed == []
    assert m.counters == {"init_refused_invalid_syntax": 1}


# ------------------------------------------------------------ unknown IKE SPI: no scan per source

def test_invalid_ike_spi_answers_do_not_scan_the_peers_per_source():
    peers = tuple(Peer(name=f"p{i}", identity=f"p{i}", endpoints=(f"198.51.100.{i % 200 + 10}",), subnets=(),
                       policy=CLASSICAL, psk=PSK) for i in range(2000))
    v = _CountingView(NodeView(name="node-b", identity="node-b", subnets=(), peers=peers, local_address=B_ADDR))
    m = IkeManager(v, Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR)
    m.hint_unknown_spi("203.0.113.1", T0)  # builds the index
    before = v.reads

    def sk_request(spi):
        return encode_message(Message(spi, 0x55, int(ExchangeType.INFORMATIONAL), 3, True, False,
                                      (EncryptedPayload(0, b"\x00" * 40),)))
    for i in range(300):  # encrypted requests for IKE_SAs we do not know, from 300 addresses
        m.receive_datagram(sk_request(0x1000 + i), LOCAL, _src(i + 1), T0 + i)
    assert m.counters["invalid_ike_spi_sent"] == 300 and v.reads == before


def test_fragment_buffers_of_a_half_open_ike_sa_count_against_the_budget():
    """An initiator that completed IKE_SA_INIT has keys: its SKF fragments authenticate and are
    kept (up to 32 KiB per IKE_SA) while its IKE_AUTH is incomplete. They count."""
    from agent.ike.message import EncryptedFragmentPayload
    from tests.ike.conftest import make_ca, make_net
    ca = make_ca("budget test CA", 3004)
    net = make_net(view("node-a", "node-b"), _big_cert_creds(ca, "node-a", 41),
                   view("node-b", "node-a"), _big_cert_creds(ca, "node-b", 42))

    def drop(src, d):  # the last fragment of IKE_AUTH is lost: the responder holds the others
        first = decode_message(d.data).payloads[0]
        return src == "a" and isinstance(first, EncryptedFragmentPayload) and first.number == first.total
    net.drop = drop
    net.a.initiate("node-b", net.now)
    net.pump()
    (sa,) = net.b._sas.values()
    held = sum(r.held() for r in sa._frag_rx.values())
    assert net.b.half_open() == 1 and held > 500
    assert net.b.half_open_bytes() == (admission.HALF_OPEN_BASE_BYTES + len(sa._init_request)
                                       + len(sa._init_response) + held)


def test_an_established_ike_sa_is_no_longer_charged():
    from agent.ike.events import ChildSaEstablished
    from tests.ike.conftest import make_net
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK), view("node-b", "node-a"), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("b", ChildSaEstablished)
    assert n.b.half_open() == 0 and n.b.half_open_bytes() == 0 and n.b._ho_cost == {}
