"""IKEv2 codec (RFC 7296 §3): known answers from public captures, round trip, fuzz.

Captures: /work/shared/captures (tcpdump test suite @ 39b50f76, scapy @ ac38b273;
see its README for the origin of every file).
"""
from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from agent.iana import ExchangeType, NotifyType, PayloadType, ProtocolId, TsType
from agent.ike.message import (
    AuthPayload, CertPayload, CertReqPayload, DeletePayload, EncryptedFragmentPayload, EncryptedPayload, IdPayload,
    KePayload, Message, MessageError, NoncePayload, NotifyPayload, Proposal, RawPayload,
    SaPayload, TrafficSelector, Transform, TransformAttribute, TsPayload, UnknownPayload,
    VendorPayload, check_outer, check_payload_rules, decode_message, decode_payloads,
    encode_message, encode_payloads,
)

CAPS = Path("/work/shared/captures")


def _udp_payloads(path: Path) -> list[bytes]:
    """IKE messages of a capture: UDP payloads, non-ESP marker stripped, ESP-in-UDP skipped."""
    from scapy.all import UDP, rdpcap
    out = []
    for p in rdpcap(str(path)):
        if UDP not in p:
            continue
        d = bytes(p[UDP].payload)
        if 4500 in (p[UDP].sport, p[UDP].dport):
            if d[:4] != b"\0\0\0\0":
                continue  # ESP in UDP (RFC 3948 §2.1)
            d = d[4:]
        out.append(d)
    return out


# ---------------------------------------------------------------- known answers

def test_ikev2pI2_ike_sa_init_request_known_answer():
    """tcpdump tests/ikev2pI2.pcap frame 1: HDR, SA, KEi, Ni, V -->
    6 proposals, first AES-CBC-128 / HMAC-SHA1-96 / PRF-HMAC-SHA1 / MODP-1536 (README §2)."""
    data = _udp_payloads(CAPS / "tcpdump/ikev2pI2.pcap")[0]
    m = decode_message(data)
    assert m.spi_i == 0x0001020304050607 and m.spi_r == 0
    assert m.exchange == ExchangeType.IKE_SA_INIT and m.message_id == 0
    assert m.is_initiator and not m.is_response
    assert [type(p) for p in m.payloads] == [SaPayload, KePayload, NoncePayload, VendorPayload]
    sa = m.payloads[0]
    assert len(sa.proposals) == 6
    assert [(t.type, t.id) for t in sa.proposals[0].transforms] == [(1, 12), (3, 2), (2, 2), (4, 5)]
    assert m.payloads[1].group == 5
    check_outer(m)


def test_ikev2pI2_ike_auth_is_single_sk_payload():
    """tcpdump tests/ikev2pI2.pcap frame 2: HDR, SK {IDi, AUTH} --> (SK first inner = IDi)."""
    m = decode_message(_udp_payloads(CAPS / "tcpdump/ikev2pI2.pcap")[1])
    assert m.exchange == ExchangeType.IKE_AUTH and m.spi_r == 0xC02E7A3031A03188
    assert len(m.payloads) == 1 and isinstance(m.payloads[0], EncryptedPayload)
    assert m.payloads[0].first == PayloadType.IDi
    check_outer(m)


def test_ccm12_subset_headers_known_answer():
    """scapy-rebuilt ikev2-decrypt-aes128ccm12 subset: SPIs from the Wireshark key table."""
    msgs = [decode_message(d) for d in _udp_payloads(CAPS / "scapy/ikev2-decrypt-aes128ccm12-subset.pcap")]
    assert [(m.exchange, m.message_id, m.is_response) for m in msgs] == [
        (34, 0, False), (34, 0, True), (37, 2, False), (37, 2, True)]
    assert msgs[1].spi_i == 0xEA684D21597AFD36 and msgs[1].spi_r == 0xD9FE2AB22DAC23AC
    for m in msgs:
        check_outer(m)


def test_ikev2four_cookie_first_in_retry():
    """tcpdump tests/ikev2four.pcap: <-- HDR, N(COOKIE); HDR, N(COOKIE), SA, KEi, Ni -->."""
    frames = [decode_message(d) for d in _udp_payloads(CAPS / "tcpdump/ikev2four.pcap")]
    assert frames[1].is_response and frames[1].payloads[0].notify_type == NotifyType.COOKIE
    assert frames[2].payloads[0].notify_type == NotifyType.COOKIE
    assert frames[2].payloads[0].data == frames[1].payloads[0].data


@pytest.mark.parametrize("name", ["scapy/ikev2_nat_t.pcapng", "tcpdump/ikev2four.pcap",
                                  "scapy/ikev2_notify_redirect.pcap",
                                  "scapy/ikev2-decrypt-aes128ccm12-subset.pcap"])
def test_capture_messages_round_trip_exactly(name):
    """Every IKE message of these captures re-encodes to the same bytes."""
    n = 0
    for d in _udp_payloads(CAPS / name):
        m = decode_message(d)
        assert encode_message(m) == d
        n += 1
    assert n >= 4


# ---------------------------------------------------------------- building blocks

def _sa() -> SaPayload:
    return SaPayload((
        Proposal(1, ProtocolId.IKE, b"", (
            Transform(1, 20, (TransformAttribute(14, 128),)), Transform(2, 5), Transform(4, 31))),
        Proposal(2, ProtocolId.ESP, b"\x01\x02\x03\x04", (
            Transform(1, 12, (TransformAttribute(14, 256),)), Transform(3, 12), Transform(5, 0))),
    ))


def test_sa_payload_wire_format_rfc7296_3_3():
    """§3.3.1/§3.3.2: last-substruc 2 / 3 / 0, key length as TV attribute 0x800e."""
    first, raw = encode_payloads([_sa()])
    assert first == PayloadType.SA
    # generic header: next 0, not critical, length
    assert raw[:2] == b"\x00\x00" and struct.unpack("!H", raw[2:4])[0] == len(raw)
    prop1 = raw[4:]
    assert prop1[0] == 2 and prop1[4:8] == bytes([1, 1, 0, 3])
    assert prop1[8] == 3  # more transforms follow
    assert prop1[8 + 8:8 + 12] == b"\x80\x0e\x00\x80"
    assert decode_payloads(first, raw) == (_sa(),)


def test_traffic_selector_from_network_and_back():
    net = ipaddress.ip_network("10.1.0.0/16")
    ts = TrafficSelector.from_network(net)
    assert ts.ts_type == TsType.TS_IPV4_ADDR_RANGE and ts.start_port == 0 and ts.end_port == 65535
    assert ts.networks() == [net]
    v6 = TrafficSelector.from_network(ipaddress.ip_network("fd00::/64"))
    first, raw = encode_payloads([TsPayload(PayloadType.TSi, (ts, v6))])
    assert decode_payloads(first, raw)[0].selectors == (ts, v6)


def test_unknown_payloads_critical_flagged_noncritical_kept():
    """§2.5: unknown critical -> UNSUPPORTED_CRITICAL_PAYLOAD; non-critical skipped."""
    pl = [NoncePayload(b"n" * 16), UnknownPayload(200, False, b"x"), UnknownPayload(201, True, b"y")]
    first, raw = encode_payloads(pl)
    m = decode_message(encode_message(Message(1, 0, 34, 0, True, False, decode_payloads(first, raw))))
    assert [p.ptype for p in m.unsupported_critical] == [201]
    assert m.payloads[1] == UnknownPayload(200, False, b"x")


# ---------------------------------------------------------------- malformed input

def _msg_bytes(payload_bytes: bytes, first: int, exch=34, length=None) -> bytes:
    hdr = struct.pack("!QQBBBBII", 1, 0, first, 0x20, exch, 0x08, 0,
                      length if length is not None else 28 + len(payload_bytes))
    return hdr + payload_bytes


@pytest.mark.parametrize("data,reason", [
    (b"", "truncated"),
    (b"\x00" * 27, "truncated"),
    (_msg_bytes(b"", 0, length=29), "length"),
    (struct.pack("!QQBBBBII", 1, 0, 0, 0x10, 34, 8, 0, 28), "major version"),
    (struct.pack("!QQBBBBII", 0, 0, 0, 0x20, 34, 8, 0, 28), "SPIi is zero"),
    (_msg_bytes(b"\x00\x00\x00", PayloadType.NONCE), "truncated generic header"),
    (_msg_bytes(b"\x00\x00\x00\x03", PayloadType.NONCE), "bad length"),
    (_msg_bytes(b"\x00\x00\x00\x09abcd", PayloadType.NONCE), "bad length"),
    (_msg_bytes(b"\x28\x00\x00\x05a", PayloadType.NONCE), "truncated generic header"),
    (_msg_bytes(b"\x00\x00\x00\x05a\x00", PayloadType.NONCE), "after the last payload"),
    (_msg_bytes(b"\x28\x00\x00\x06ab\x00\x00\x00\x04", PayloadType.SK), "not the last"),
    (_msg_bytes(b"\x00\x00\x00\x06\x00\x01", PayloadType.KE), "KE: truncated"),
    (_msg_bytes(b"\x00\x00\x00\x08\x01\x00\x00\x05", PayloadType.DELETE), "D: SPIs of size 0"),
    (_msg_bytes(b"\x00\x00\x00\x09\x03\x04\x00\x01a", PayloadType.DELETE), "D: length"),
    (_msg_bytes(b"\x00\x00\x00\x10\x01\x00\x00\x00" + bytes([9, 0, 0, 40, 0, 0, 0, 0]), PayloadType.TSi),
     "TS: bad selector length"),  # an unknown type is kept opaque, but its length must fit
    (_msg_bytes(b"\x00\x00\x00\x08\x02\x00\x00\x00", PayloadType.TSi), "traffic selector: truncated"),
    (_msg_bytes(b"\x00\x00\x00\x09\x00\x00\x00\x00\x00", PayloadType.TSi), "count"),
    (_msg_bytes(b"\x00\x00\x00\x0c" + bytes([0, 0, 0, 8, 1, 1, 0, 1]), PayloadType.SA), "transforms"),
    (_msg_bytes(b"\x00\x00\x00\x0c" + bytes([0, 0, 0, 9, 1, 1, 0, 0]), PayloadType.SA), "proposal length"),
    (_msg_bytes(b"\x00\x00\x00\x0c" + bytes([5, 0, 0, 8, 1, 1, 0, 0]), PayloadType.SA), "last substruc"),
])
def test_malformed_raises_message_error_with_reason(data, reason):
    with pytest.raises(MessageError) as ei:
        decode_message(data)
    assert reason in ei.value.reason


def test_tcpdump_segfault_regression_capture_is_rejected():
    """tcpdump tests/ikev2pI2-segfault.pcapng: corrupted transform chain -> MessageError."""
    (d,) = _udp_payloads(CAPS / "tcpdump/ikev2pI2-segfault.pcapng")
    with pytest.raises(MessageError, match="transform"):
        decode_message(d)


def test_ikev1_capture_rejected_as_wrong_major_version():
    """tcpdump tests/isakmp-pointer-loop.pcap is IKEv1 (major 1): an IKEv2 agent rejects it."""
    for d in _udp_payloads(CAPS / "tcpdump/isakmp-pointer-loop.pcap"):
        with pytest.raises(MessageError, match="major version"):
            decode_message(d)


# ---------------------------------------------------------------- exchange rules

def _m(exch, resp, payloads):
    return Message(1, 2, exch, 1, True, resp, tuple(payloads))


def test_rules_ike_sa_init_request_needs_sa_ke_nonce():
    ok = [_sa(), KePayload(31, b"k" * 32), NoncePayload(b"n" * 32), NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, b"x" * 20)]
    check_outer(_m(34, False, ok))
    with pytest.raises(MessageError, match="unexpected_payload"):
        check_outer(_m(34, False, ok[1:]))
    with pytest.raises(MessageError, match="unexpected_payload: AUTH"):
        check_outer(_m(34, False, ok + [AuthPayload(2, b"a")]))


def test_rules_encrypted_exchanges_carry_only_sk():
    with pytest.raises(MessageError, match="only an SK"):
        check_outer(_m(35, False, [NotifyPayload(NotifyType.INITIAL_CONTACT)]))
    check_outer(_m(37, False, [EncryptedPayload(0, b"x" * 32)]))
    with pytest.raises(MessageError, match="unsupported exchange"):
        check_outer(_m(99, False, [EncryptedPayload(0, b"x" * 32)]))


def test_rules_ike_auth_inner():
    """HDR, SK {IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SA, TSi, TSr} --> (§1.2)."""
    inner = [IdPayload(PayloadType.IDi, 2, b"a"), CertPayload(4, b"c"), AuthPayload(14, b"s"), _sa(),
             TsPayload(PayloadType.TSi, ()), TsPayload(PayloadType.TSr, ())]
    check_payload_rules(35, False, tuple(inner))
    with pytest.raises(MessageError, match="2 x IDi"):
        check_payload_rules(35, False, tuple(inner + [IdPayload(PayloadType.IDi, 2, b"b")]))
    with pytest.raises(MessageError, match="KE not allowed"):
        check_payload_rules(35, False, tuple(inner + [KePayload(19, b"")]))
    with pytest.raises(MessageError, match="DELETE not allowed"):
        check_payload_rules(35, True, (DeletePayload(1),))
    check_payload_rules(37, False, (DeletePayload(ProtocolId.ESP, 4, (b"abcd",)),))


# ---------------------------------------------------------------- property tests

_b = st.binary(max_size=40)
_attr = st.one_of(st.builds(TransformAttribute, st.integers(0, 0x7FFF), st.integers(0, 0xFFFF), st.just(True)),
                  st.builds(TransformAttribute, st.integers(0, 0x7FFF), _b, st.just(False)))
_transform = st.builds(Transform, st.integers(0, 255), st.integers(0, 0xFFFF),
                       st.lists(_attr, max_size=2).map(tuple))
_proposal = st.builds(Proposal, st.integers(0, 255), st.integers(0, 255),
                      st.sampled_from([b"", b"abcd", b"12345678"]),
                      st.lists(_transform, max_size=4).map(tuple))
_v4 = st.binary(min_size=4, max_size=4)
_v6 = st.binary(min_size=16, max_size=16)
_ts = st.one_of(
    st.builds(TrafficSelector, st.just(7), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), _v4, _v4),
    st.builds(TrafficSelector, st.just(8), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), _v6, _v6))
_known_types = {int(t) for t in PayloadType}
_payload = st.one_of(
    st.builds(SaPayload, st.lists(_proposal, max_size=3).map(tuple)),
    st.builds(KePayload, st.integers(0, 0xFFFF), _b),
    st.builds(IdPayload, st.sampled_from([35, 36]), st.integers(0, 255), _b),
    st.builds(CertPayload, st.integers(0, 255), _b),
    st.builds(CertReqPayload, st.integers(0, 255), _b),
    st.builds(AuthPayload, st.integers(0, 255), _b),
    st.builds(NoncePayload, _b),
    st.builds(NotifyPayload, st.integers(0, 0xFFFF), _b, st.integers(0, 255), st.sampled_from([b"", b"abcd"])),
    st.builds(lambda p, spis: DeletePayload(p, 4 if spis else 0, tuple(spis)), st.sampled_from([2, 3]),
              st.lists(_v4, max_size=3)),
    st.builds(VendorPayload, _b),
    st.builds(TsPayload, st.sampled_from([44, 45]), st.lists(_ts, max_size=3).map(tuple)),
    st.builds(RawPayload, st.sampled_from([47, 48, 49]), _b),
    st.builds(UnknownPayload, st.integers(1, 255).filter(lambda t: t not in _known_types), st.booleans(), _b),
)
_message = st.builds(
    lambda spi_i, spi_r, exch, mid, i, r, pl, sk: Message(spi_i, spi_r, exch, mid, i, r, tuple(pl + sk)),
    st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 2**32 - 1),
    st.booleans(), st.booleans(), st.lists(_payload, max_size=6),
    st.lists(st.one_of(st.builds(EncryptedPayload, st.sampled_from([0, 35, 41]), _b),
                       st.builds(EncryptedFragmentPayload, st.sampled_from([0, 35]), st.integers(0, 0xFFFF),
                                 st.integers(0, 0xFFFF), _b)), max_size=1))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_message)
def test_round_trip_decode_encode(msg):
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert encode_message(decode_message(data)) == data


@settings(max_examples=1500)
@given(st.binary(max_size=300))
def test_fuzz_decode_raises_only_message_error(data):
    try:
        decode_message(data)
    except MessageError:
        pass


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(_message, st.data())
def test_fuzz_mutated_valid_messages(msg, data):
    raw = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            m = decode_message(candidate)
            check_outer(m)
        except MessageError:
            pass


# ---------------------------------------------------------------- RFC 7383 SKF

def test_skf_payload_layout():
    """RFC 7383 §2.5: generic header | Fragment Number (2) | Total Fragments (2) | IV..ICV."""
    msg = Message(1, 2, 35, 1, True, False, (EncryptedFragmentPayload(35, 2, 3, b"\xaa" * 24),))
    raw = encode_message(msg)
    assert raw[16] == 53  # first payload SKF
    assert raw[28:36] == bytes([35, 0, 0, 32, 0, 2, 0, 3])
    got = decode_message(raw)
    assert got.payloads[0] == EncryptedFragmentPayload(35, 2, 3, b"\xaa" * 24)
    check_outer(got)  # an SKF may stand where an SK would


def test_skf_errors():
    hdr = bytes(range(1, 17)) + bytes([53, 0x20, 35, 0x08]) + bytes(4)
    short = bytes([0, 0, 0, 6, 0, 1])  # SKF body shorter than its two numbers
    with pytest.raises(MessageError, match="SKF: truncated"):
        decode_message(hdr + (28 + len(short)).to_bytes(4, "big") + short)
    with pytest.raises(MessageError, match="SKF payload is not the last"):
        decode_payloads(53, bytes([40, 0, 0, 8, 0, 1, 0, 1]) + bytes([0, 0, 0, 4]))
