"""EspSa: round trips for every transform, negative tests per algorithm,
sequence-number exhaustion, ESN, next header, counters, repr."""
from __future__ import annotations

import pytest

from agent.esp import EspError, EspSa
from agent.esp.sa import SEQ_MAX_32, SOFT_LIMIT_32
from agent.iana import EncrId, IntegId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng, ipv4_packet, ipv6_packet

SPI = 0xC0FFEE01

SUITES = {
    "aes128gcm16": dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(20))),
    "aes256gcm16": dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(36))),
    "chacha20poly1305": dict(encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=bytes(range(36))),
    "aes128-sha256": dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(16)),
                          integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=bytes(range(32))),
    "aes256-sha384": dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(32)),
                          integ_id=IntegId.AUTH_HMAC_SHA2_384_192, integ_key=bytes(range(48))),
    "aes256-sha512": dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(32)),
                          integ_id=IntegId.AUTH_HMAC_SHA2_512_256, integ_key=bytes(range(64))),
    "null-sha256": dict(encr_id=EncrId.ENCR_NULL, encr_key=b"",
                        integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=bytes(range(32))),
}
ICV_LEN = {"aes128gcm16": 16, "aes256gcm16": 16, "chacha20poly1305": 16, "aes128-sha256": 16,
           "aes256-sha384": 24, "aes256-sha512": 32, "null-sha256": 16}


def pair(suite: str, esn: bool = False, **kw) -> tuple[EspSa, EspSa]:
    keys = EspKeys(spi=SPI, esn=esn, **SUITES[suite])
    return EspSa(keys, rng=DetRng(b"tx"), **kw), EspSa(keys, rng=DetRng(b"rx"), **kw)


@pytest.fixture(params=sorted(SUITES))
def suite(request) -> str:
    return request.param


@pytest.mark.parametrize("esn", [False, True])
def test_round_trip_ipv4_ipv6_all_lengths(suite: str, esn: bool) -> None:
    tx, rx = pair(suite, esn)
    inner = [ipv4_packet(n) for n in range(4, 80)] + [ipv6_packet(n) for n in (0, 1, 7, 100, 1400)]
    esp = tx.encapsulate_batch(inner)
    assert len(esp) == len(inner)
    t = tx.transform
    for p, e in zip(inner, esp):
        assert e[:4] == SPI.to_bytes(4, "big")
        body = len(e) - 8 - t.iv_len - t.icv_len
        assert body % t.align == 0 and body >= len(p) + 2  # RFC 4303 §2.4 alignment
        assert t.icv_len == ICV_LEN[suite]
        if suite.startswith("null"):
            assert p in e  # NULL encryption: payload in clear
        else:
            assert p not in e
    assert rx.decapsulate_batch(esp) == inner
    assert rx.counters["packets_in"] == len(inner)
    assert rx.counters["bytes_in"] == sum(map(len, inner))
    assert tx.counters["packets_out"] == len(inner)
    assert tx.counters["bytes_out"] == sum(map(len, inner))
    # sequence numbers 1, 2, 3, ... on the wire
    assert [int.from_bytes(e[4:8], "big") for e in esp[:3]] == [1, 2, 3]


def test_next_header_from_version_nibble(suite: str) -> None:
    tx, rx = pair(suite)
    for pkt, nh in ((ipv4_packet(30), 4), (ipv6_packet(30), 41)):
        assert rx.decapsulate_nh(tx.encapsulate(pkt)) == (nh, pkt)


def test_bad_inner_counted_not_sent(suite: str) -> None:
    tx, _ = pair(suite)
    assert tx.encapsulate_batch([b"", b"\x50abc", ipv4_packet(10)]).__len__() == 1
    assert tx.counters["bad_inner"] == 2 and tx.seq_out == 1
    with pytest.raises(EspError) as e:
        tx.encapsulate(b"\x10")
    assert e.value.reason == "bad_inner"


def flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


@pytest.mark.parametrize("esn", [False, True])
def test_altered_packets_dropped_window_unmoved(suite: str, esn: bool) -> None:
    """Altered ICV, ciphertext, IV, seq (AAD / ICV input): counted 'icv' drops,
    and the replay window does not move (RFC 4303 §3.4.3)."""
    tx, rx = pair(suite, esn)
    good = tx.encapsulate(ipv4_packet(50))
    t = tx.transform
    positions = {"icv": len(good) - 1, "ciphertext": 8 + t.iv_len + 1, "seq": 6}
    if t.iv_len:
        positions["iv"] = 8
    for what, i in positions.items():
        bad = flip(good, i)
        assert rx.decapsulate_batch([bad]) == [], what
        assert rx.replay.top == 0, what
    assert rx.counters["icv"] == len(positions)
    # altered SPI: not ours
    assert rx.decapsulate_batch([flip(good, 0)]) == [] and rx.counters["spi"] == 1
    # the genuine packet still passes afterwards
    assert rx.decapsulate_batch([good]) == [ipv4_packet(50)]


def test_truncated_packets_every_length(suite: str) -> None:
    tx, rx = pair(suite)
    good = tx.encapsulate(ipv4_packet(40))
    drops = rx.decapsulate_batch([good[:n] for n in range(len(good))])
    assert drops == []
    c = rx.counters
    assert c["malformed"] + c["icv"] + c["spi"] == len(good)
    assert c["packets_in"] == 0 and rx.replay.top == 0
    for n in range(len(good)):
        with pytest.raises(EspError):
            rx.decapsulate(good[:n])


def seal_raw(sa: EspSa, plaintext: bytes) -> bytes:
    """Seal an arbitrary (possibly malformed) trailer with the SA's own transform."""
    sa.seq_out += 1
    return sa.transform.seal(sa.seq_out, plaintext)


def test_bad_padding_counted(suite: str) -> None:
    tx, rx = pair(suite)
    align = tx.transform.align
    inner = ipv4_packet(20)
    padlen = (-(len(inner) + 2)) % align or align
    bad_pad = inner + bytes([9] * padlen) + bytes([padlen, 4])  # pad bytes must be 1, 2, 3...
    too_long = inner[: align - 2] + bytes([200, 4])  # pad length past the start
    assert rx.decapsulate_batch([seal_raw(tx, bad_pad), seal_raw(tx, too_long)]) == []
    assert rx.counters["padding"] == 2 and rx.counters["packets_in"] == 0


def test_next_header_checks(suite: str) -> None:
    tx, rx = pair(suite)
    align = tx.transform.align
    def trailer(payload: bytes, nh: int) -> bytes:
        p = (-(len(payload) + 2)) % align
        return payload + bytes(range(1, p + 1)) + bytes([p, nh])
    pkts = [seal_raw(tx, trailer(ipv4_packet(20), 59)),  # dummy (RFC 4303 §2.6)
            seal_raw(tx, trailer(ipv4_packet(20), 17)),  # transport payload in a tunnel SA
            seal_raw(tx, trailer(ipv6_packet(20), 4)),  # version/next header mismatch
            seal_raw(tx, trailer(b"", 41))]
    assert rx.decapsulate_batch(pkts) == []
    c = rx.counters
    assert (c["dummy"], c["next_header"], c["malformed"]) == (1, 1, 2)


def test_replay_counted(suite: str) -> None:
    tx, rx = pair(suite)
    esp = tx.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(5)])
    assert len(rx.decapsulate_batch(esp + esp[::-1])) == 5
    assert rx.counters["replay"] == 5
    with pytest.raises(EspError) as e:
        rx.decapsulate(esp[0])
    assert e.value.reason == "replay"


def test_seq_exhaustion_without_esn() -> None:
    tx, rx = pair("aes128gcm16")
    tx.seq_out = SEQ_MAX_32 - 2
    out = tx.encapsulate_batch([ipv4_packet(10)] * 4)
    assert len(out) == 2  # SEQ_MAX-1 and SEQ_MAX are the last ones sent
    assert [int.from_bytes(e[4:8], "big") for e in out] == [SEQ_MAX_32 - 1, SEQ_MAX_32]
    assert tx.counters["seq_exhausted"] == 2 and tx.needs_rekey
    with pytest.raises(EspError) as e:
        tx.encapsulate(ipv4_packet(10))
    assert e.value.reason == "seq_exhausted"
    assert tx.seq_out == SEQ_MAX_32  # never wraps to 0


def test_seq_exhaustion_with_esn_and_wire_wrap() -> None:
    tx, rx = pair("chacha20poly1305", esn=True)
    tx.seq_out = (1 << 32) - 2
    rx.replay.update((1 << 32) - 3)
    out = tx.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(4)])
    assert [int.from_bytes(e[4:8], "big") for e in out] == [0xFFFFFFFF, 0, 1, 2]
    assert len(rx.decapsulate_batch(out)) == 4
    assert rx.replay.top == (1 << 32) + 2 and not tx.needs_rekey
    tx.seq_out = (1 << 64) - 1
    assert tx.encapsulate_batch([ipv4_packet(10)]) == []
    assert tx.needs_rekey and tx.counters["seq_exhausted"] == 1


def test_soft_limit_sets_needs_rekey() -> None:
    tx, _ = pair("aes128gcm16")
    assert tx.soft_limit == SOFT_LIMIT_32 == 2**32 - 2**20
    tx2, _ = pair("aes128gcm16", soft_limit=3)
    tx2.encapsulate_batch([ipv4_packet(10)] * 2)
    assert not tx2.needs_rekey
    tx2.encapsulate(ipv4_packet(10))
    assert tx2.needs_rekey


@pytest.mark.parametrize("kw,match", [
    (dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(16)), "key material must be"),
    (dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20), integ_id=12, integ_key=bytes(32)), "AEAD"),
    (dict(encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=bytes(32)), "key material must be 36"),
    (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(15), integ_id=12, integ_key=bytes(32)), "16, 24 or 32"),
    (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(16)), "needs an integrity"),
    (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(16), integ_id=12, integ_key=bytes(31)), "must be 32 bytes"),
    (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(16), integ_id=IntegId.AUTH_AES_XCBC_96, integ_key=bytes(16)), "not supported"),
    (dict(encr_id=EncrId.ENCR_NULL, encr_key=b""), "needs an integrity"),
    (dict(encr_id=EncrId.ENCR_3DES, encr_key=bytes(24)), "ENCR_3DES is not supported"),
    (dict(encr_id=999, encr_key=bytes(24)), "999 is not supported"),
])
def test_bad_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EspSa(EspKeys(spi=1, **kw), rng=DetRng())


def test_bad_mode_and_soft_limit() -> None:
    keys = EspKeys(spi=1, **SUITES["aes128gcm16"])
    with pytest.raises(ValueError, match="mode 'beet'"):
        EspSa(keys, rng=DetRng(), mode="beet")
    with pytest.raises(ValueError, match="soft_limit"):
        EspSa(keys, rng=DetRng(), soft_limit=2**32)
    with pytest.raises(ValueError, match="replay window size 100"):
        EspSa(keys, rng=DetRng(), replay_window=100)


def test_keys_never_in_repr(suite: str) -> None:
    tx, _ = pair(suite)
    text = repr(tx) + repr(tx.keys) + repr(tx.transform) + str(tx.__dict__.get("counters"))
    for k in (SUITES[suite]["encr_key"], SUITES[suite].get("integ_key", b"")):
        if k:
            assert k.hex() not in text and repr(k) not in text
    assert f"0x{SPI:08x}" in repr(tx)


def test_transport_mode_round_trip(suite: str) -> None:
    tx, rx = pair(suite, mode="transport")
    pkts = [ipv4_packet(30, proto=6), ipv6_packet(30, proto=17)]
    esp = tx.encapsulate_batch(pkts)
    assert rx.decapsulate_batch_nh(esp) == [(6, pkts[0][20:]), (17, pkts[1][40:])]
    tx2, rx2 = pair(suite, mode="transport")
    assert rx2.decapsulate_batch(tx2.encapsulate_batch(pkts)) == [pkts[0][20:], pkts[1][40:]]
    with pytest.raises(EspError):
        tx.encapsulate(b"payload")  # transport needs next_header
    assert rx.decapsulate(tx.encapsulate(b"payload", next_header=17)) == b"payload"


def test_cbc_iv_from_rng_and_unique() -> None:
    keys = EspKeys(spi=SPI, **SUITES["aes128-sha256"])
    rng = DetRng(b"iv")
    tx = EspSa(keys, rng=rng)
    esp = tx.encapsulate_batch([ipv4_packet(10)] * 200)
    ivs = {e[8:24] for e in esp}
    assert len(ivs) == 200 and rng.calls >= 1
    assert esp[0][8:24] == DetRng(b"iv")(16)


def test_aead_iv_is_sequence_number() -> None:
    tx, _ = pair("aes128gcm16")
    esp = tx.encapsulate_batch([ipv4_packet(10)] * 3)
    assert [e[8:16] for e in esp] == [n.to_bytes(8, "big") for n in (1, 2, 3)]
