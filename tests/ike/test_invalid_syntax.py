"""RFC 7296 §2.21.3: a request that passed the ICV and window checks but is malformed is
answered with INVALID_SYNTAX, and the IKE_SA is gone in both peers; a forgery gets nothing."""
from __future__ import annotations

import struct

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike.events import ChildSaDeleted, IkeSaDeleted
from agent.ike.message import HEADER_LEN, NoncePayload, decode_message, encode_header, encode_payloads

from tests.ike.helpers import inner, net


def _seal_raw(sa, exchange: int, first: int, plain: bytes, *, break_icv: bool = False) -> bytes:
    """An SK-protected request of the initiator ``sa`` with arbitrary (malformed) plaintext."""
    mid = sa._next_mid
    body_len = sa._cipher.encrypted_len(len(plain))
    hdr = encode_header(sa.spi_i, sa.spi_r, int(PayloadType.SK), exchange, 0x08, mid, HEADER_LEN + 4 + body_len)
    skh = struct.pack("!BBH", first, 0, 4 + body_len)
    k = sa._keys
    data = bytearray(hdr + skh + sa._cipher.encrypt(k.sk_ei, k.sk_ai, sa.rng, hdr + skh, plain))
    if break_icv:
        data[-1] ^= 1
    return bytes(data)


def _send(n, data):
    sa_a = n.a._live()[0]
    n.b.receive_datagram(data, sa_a.remote, sa_a.local, n.now)
    return n.b.datagrams_to_send()


def _answer(n, out):
    (d,) = out
    msg, pl = inner(n, d.data)
    assert msg.is_response and msg.exchange == decode_message(d.data).exchange
    return [(int(p.payload_type), getattr(p, "notify_type", None)) for p in pl]


def test_authenticated_request_that_does_not_parse_gets_invalid_syntax():
    n = net()
    sa_a = n.a._live()[0]
    # a Notify payload whose length field runs past the end of the plaintext
    bad = bytes([0, 0, 0, 40]) + bytes(8)
    out = _send(n, _seal_raw(sa_a, ExchangeType.INFORMATIONAL, int(PayloadType.NOTIFY), bad))
    assert _answer(n, out) == [(int(PayloadType.NOTIFY), NotifyType.INVALID_SYNTAX)]
    n.pump()
    (d,) = [e for e in n.of("b", IkeSaDeleted)]
    assert "malformed INFORMATIONAL request" in d.reason and "INVALID_SYNTAX" in d.reason
    assert n.of("b", ChildSaDeleted) and not n.b._live()


def test_authenticated_request_breaking_the_payload_rules_gets_invalid_syntax():
    """CREATE_CHILD_SA request with only a Nonce (no SA, no TS): §2.21.3 INVALID_SYNTAX."""
    n = net()
    sa_a = n.a._live()[0]
    first, plain = encode_payloads([NoncePayload(b"n" * 32)])
    out = _send(n, _seal_raw(sa_a, ExchangeType.CREATE_CHILD_SA, first, plain))
    assert _answer(n, out) == [(int(PayloadType.NOTIFY), NotifyType.INVALID_SYNTAX)]
    assert not n.b._live()


def test_forged_malformed_request_gets_no_answer_and_the_ike_sa_stays():
    n = net()
    sa_a = n.a._live()[0]
    bad = bytes([0, 0, 0, 40]) + bytes(8)
    assert _send(n, _seal_raw(sa_a, ExchangeType.INFORMATIONAL, int(PayloadType.NOTIFY), bad, break_icv=True)) == []
    assert n.b.counters.get("bad_icv") == 1 and [s.state for s in n.b._live()] == ["ESTABLISHED"]


def test_initiator_drops_the_ike_sa_on_an_invalid_syntax_answer():
    """The other half of §2.21.3: an INVALID_SYNTAX response ends the IKE_SA of the requester too."""
    n = net()
    sa_a = n.a._live()[0]
    bad = bytes([0, 0, 0, 40]) + bytes(8)
    data = _seal_raw(sa_a, ExchangeType.INFORMATIONAL, int(PayloadType.NOTIFY), bad)
    # A's own request slot carries it (as if A had sent it), so A takes B's answer
    sa_a._request(ExchangeType.INFORMATIONAL, [], lambda *a: None, n.now)
    sa_a.outbox.clear()
    sa_a._pending.data = data
    n.b.receive_datagram(data, sa_a.remote, sa_a.local, n.now)
    for d in n.b.datagrams_to_send():
        n.a.receive_datagram(d.data, d.remote, d.local, n.now)
    n._drain_events()
    (d,) = n.of("a", IkeSaDeleted)
    assert d.reason == "INFORMATIONAL refused: INVALID_SYNTAX (fatal for the IKE_SA, RFC 7296 §2.21.3)"
