"""Unauthenticated CPU on the non-init path (issue 13, sans-I/O): a datagram that is not a new
IKE_SA_INIT request is routed by its header (SPIs, I/R flags, exchange, Message ID) to an
IKE_SA before any payload is decoded; one for no IKE_SA, the wrong direction, an exchange we
cannot be in or a Message ID outside the window is a counted drop, never decoded. A cap over
the whole message bounds what an IKE_SA that exists decodes before authentication."""
from __future__ import annotations

import pytest

from agent.iana import ExchangeType
from agent.ike import payload_codec
from agent.ike.message import (MAX_TRANSFORMS, EncryptedPayload, Message, MessageLimitError, NoncePayload, Proposal,
                               SaPayload, Transform, decode_message, encode_message)
from agent.model import Credentials

from tests.ike.conftest import A_ADDR, B_ADDR, CLASSICAL, make_net, view

PSK = b"predecode tests pre-shared key 012"
B = (B_ADDR, 500)
SRC = ("203.0.113.77", 500)


def _big_sa() -> SaPayload:
    """16 proposals x 8 transforms (128, within the per-SA-payload limits)."""
    return SaPayload(tuple(Proposal(i + 1, 1, b"", tuple(Transform(1 + j % 4, 1000 + j) for j in range(8)))
                           for i in range(16)))


def _crafted(spi_i: int, spi_r: int, exchange: int, mid: int, *, initiator=True, response=False,
             n_sa: int = 40) -> bytes:
    """The issue's attack datagram: ``n_sa`` SA payloads of 16 x 8 (5,120 transforms with 40)."""
    return encode_message(Message(spi_i, spi_r, exchange, mid, initiator, response,
                                  tuple([_big_sa()] * n_sa) + (NoncePayload(b"N" * 32),)))


@pytest.fixture
def decoded(monkeypatch):
    """Counts SA payloads decoded (the codec's expensive part)."""
    calls = []
    real = payload_codec._decode_sa

    def counting(data, *a):
        calls.append(len(data))
        return real(data, *a)
    monkeypatch.setattr(payload_codec, "_decode_sa", counting)
    return calls


def _net():
    n = make_net(view("node-a", "node-b", policy=CLASSICAL), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=CLASSICAL), Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(n.b._sas) == 1
    return n


@pytest.mark.parametrize("case", ["msgid1", "spir", "rflag", "create_child", "exchange99", "informational"])
def test_unknown_spi_is_dropped_before_any_payload_is_decoded(case, decoded):
    n = _net()
    decoded.clear()  # the handshake's own SA payloads
    spi_i = 0x1234_5678_9ABC_DEF0
    data = {"msgid1": _crafted(spi_i, 0, ExchangeType.IKE_SA_INIT, 1),
            "spir": _crafted(spi_i, 0x77, ExchangeType.IKE_SA_INIT, 0),
            "rflag": _crafted(spi_i, 0, ExchangeType.IKE_SA_INIT, 0, initiator=False, response=True),
            "create_child": _crafted(spi_i, 0x77, ExchangeType.CREATE_CHILD_SA, 2),
            "exchange99": _crafted(spi_i, 0x77, 99, 2),
            "informational": _crafted(spi_i, 0x77, ExchangeType.INFORMATIONAL, 2)}[case]
    assert len(data) > 40_000
    before = dict(n.b.counters)
    n.b.receive_datagram(data, B, SRC, n.now)
    assert decoded == []
    dropped = {k: v - before.get(k, 0) for k, v in n.b.counters.items() if v != before.get(k, 0)}
    assert sum(dropped.values()) == 1 and set(dropped) <= {"unknown_spi", "unknown_exchange"}
    assert n.b.datagrams_to_send() == []


def test_existing_ike_sa_wrong_direction_window_or_exchange_is_dropped_before_decoding(decoded):
    n = _net()
    decoded.clear()
    sa = next(iter(n.b._sas.values()))  # the responder's IKE_SA (node-a initiated)
    i, r = sa.spi_i, sa.spi_r
    cases = {
        # I flag clear: the sender claims the responder's role, so SPIi would be ours: none is
        "unknown_spi": _crafted(i, r, ExchangeType.INFORMATIONAL, 2, initiator=False),
        "invalid_message_id": _crafted(i, r, ExchangeType.INFORMATIONAL, 7),  # far outside the window
        "unknown_exchange": _crafted(i, r, 99, sa._peer_mid),
    }
    for counter, data in cases.items():
        before = n.b.counters.get(counter, 0)
        n.b.receive_datagram(data, B, (A_ADDR, 500), n.now)
        assert n.b.counters.get(counter, 0) == before + 1, counter
    # a response nobody asked for (we have no request outstanding)
    before = n.b.counters.get("invalid_message_id", 0)
    n.b.receive_datagram(_crafted(i, r, ExchangeType.INFORMATIONAL, 0, response=True), B, (A_ADDR, 500), n.now)
    assert n.b.counters.get("invalid_message_id", 0) == before + 1
    assert decoded == []


def test_sk_request_in_window_is_authenticated_before_inner_payloads_are_decoded(monkeypatch):
    n = _net()
    sa = next(iter(n.b._sas.values()))
    calls = []
    real = payload_codec.decode_payloads
    monkeypatch.setattr("agent.ike.sa.decode_payloads", lambda *a, **k: calls.append(1) or real(*a, **k))
    forged = encode_message(Message(sa.spi_i, sa.spi_r, int(ExchangeType.INFORMATIONAL), sa._peer_mid, True, False,
                                    (EncryptedPayload(0, b"\x00" * 64),)))
    n.b.receive_datagram(forged, B, (A_ADDR, 500), n.now)
    assert n.b.counters.get("bad_icv", 0) == 1 and calls == []


def test_cap_over_the_whole_message_not_only_per_sa_payload():
    """40 SA payloads of 128 transforms each passed: every one was within the per-payload limit."""
    with pytest.raises(MessageLimitError) as e:
        decode_message(_crafted(0x1234, 0, ExchangeType.IKE_SA_INIT, 0, n_sa=2))
    assert e.value.kind in ("proposals", "transforms")
    assert MAX_TRANSFORMS == 128
    decode_message(_crafted(0x1234, 0, ExchangeType.IKE_SA_INIT, 0, n_sa=1))  # one is fine


def test_unprotected_notifies_from_strangers_or_in_bulk_are_not_decoded(monkeypatch):
    """An unprotected HDR(INFORMATIONAL), N, N, ... (the §1.5 / §2.21.4 hints) is decoded only
    when its SPIs name one of our IKE_SAs or it comes from a configured peer's address, and
    only with a few Notify payloads: 4,000/s of 63-notify datagrams from strangers took a whole
    core (fresh-user attack)."""
    from agent.ike import manager as manager_mod
    from agent.ike.message import NotifyPayload
    from agent.iana import NotifyType
    n = _net()
    calls = []
    real = manager_mod.decode_message

    def counting(data):
        calls.append(len(data))
        return real(data)
    monkeypatch.setattr(manager_mod, "decode_message", counting)

    def notifies(k, spi_i=0xDEAD, spi_r=0):
        return encode_message(Message(spi_i, spi_r, ExchangeType.INFORMATIONAL, 0, True, False,
                                       tuple(NotifyPayload(NotifyType.INVALID_SPI, b"\0\0\0\1") for _ in range(k))))
    before = dict(n.b.counters)
    n.b.receive_datagram(notifies(63), B, SRC, n.now)  # many: never the unprotected path
    n.b.receive_datagram(notifies(1), B, SRC, n.now)   # one, from a stranger, SPIs of nothing of ours
    assert calls == []
    moved = {k: v - before.get(k, 0) for k, v in n.b.counters.items() if v != before.get(k, 0)}
    assert moved == {"unknown_spi": 1, "unsolicited_notify": 1}
    # from the configured peer's address it is still taken as a hint (decoded, then handled)
    n.b.receive_datagram(notifies(1), B, (A_ADDR, 500), n.now)
    assert len(calls) == 1
