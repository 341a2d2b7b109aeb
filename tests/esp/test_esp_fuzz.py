"""Property tests: decapsulation of arbitrary bytes only ever counts drops;
SPD/selectors/RFC 3948 parsing never raise; replay window against a model."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from agent.esp import EspError, EspSa, ReplayWindow, Spd, SpdEntry, classify_udp4500, parse_selectors
from agent.esp.sa import DROP_REASONS
from agent.iana import EncrId, IntegId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng

SPI = 0x01020304
KEYS = [
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20)),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=bytes(36), esn=True),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(16),
            integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=bytes(32)),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_NULL, encr_key=b"",
            integ_id=IntegId.AUTH_HMAC_SHA2_512_256, integ_key=bytes(64), esn=True),
]
SPI_B = SPI.to_bytes(4, "big")
packets = st.lists(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: SPI_B + b)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(idx=st.integers(0, len(KEYS) - 1), pkts=packets, mode=st.sampled_from(["tunnel", "transport"]))
def test_decapsulate_random_bytes_only_counts_drops(idx: int, pkts: list[bytes], mode: str) -> None:
    sa = EspSa(KEYS[idx], rng=DetRng(), mode=mode)
    assert sa.decapsulate_batch(pkts) == []
    assert sum(sa.counters[r] for r in DROP_REASONS) == len(pkts)
    assert sa.replay.top == 0
    for p in pkts[:3]:
        try:
            sa.decapsulate(p)
            raise AssertionError("random bytes accepted")
        except EspError as e:
            assert e.reason in DROP_REASONS


@settings(max_examples=200, deadline=None)
@given(idx=st.integers(0, len(KEYS) - 1), data=st.binary(max_size=300), pos=st.data())
def test_any_single_bit_flip_is_dropped(idx: int, data: bytes, pos) -> None:
    tx, rx = EspSa(KEYS[idx], rng=DetRng()), EspSa(KEYS[idx], rng=DetRng())
    pkt = tx.encapsulate(b"\x45" + data)
    i = pos.draw(st.integers(0, len(pkt) - 1))
    bit = pos.draw(st.integers(0, 7))
    bad = pkt[:i] + bytes([pkt[i] ^ (1 << bit)]) + pkt[i + 1:]
    assert rx.decapsulate_batch([bad]) == []
    assert rx.decapsulate_batch([pkt]) == [b"\x45" + data]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_parsers_never_raise(data: bytes) -> None:
    spd = Spd([SpdEntry(protocol=17, remote_ports=(53, 53), peer="x")])
    spd.lookup_outbound(data)
    spd.allows_inbound((), (), data)
    parse_selectors(data)
    assert classify_udp4500(data) in ("ike", "esp", "keepalive", "invalid")


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([32, 64, 96, 1024]),
       seqs=st.lists(st.integers(0, 3000), max_size=200))
def test_replay_window_matches_model(size: int, seqs: list[int]) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    top = 0
    for s in seqs:
        expected = s > 0 and s not in seen and (s > top or top - s < size)
        assert w.check(s) == expected
        if expected:
            w.update(s)
            seen.add(s)
            top = max(top, s)


@settings(max_examples=150, deadline=None)
@given(idx=st.integers(0, len(KEYS) - 1), data=st.data())
def test_batch_and_single_packet_paths_agree(idx: int, data) -> None:
    """The inlined tunnel-mode batch loop counts exactly what decapsulate() raises."""
    tx = EspSa(KEYS[idx], rng=DetRng())
    good = tx.encapsulate_batch([b"\x45" + bytes(n) for n in range(0, 40, 7)] + [b"\x60" + bytes(45)])
    pkts = data.draw(st.lists(st.one_of(
        st.sampled_from(good),
        st.tuples(st.sampled_from(good), st.integers(0, 80), st.integers(1, 255)).map(
            lambda x: x[0][:x[1]] + bytes([x[0][x[1]] ^ x[2]]) + x[0][x[1] + 1:] if x[1] < len(x[0]) else x[0][:x[1] % len(x[0])]),
    ), max_size=15))
    batch_sa, single_sa = EspSa(KEYS[idx], rng=DetRng()), EspSa(KEYS[idx], rng=DetRng())
    batch_out = batch_sa.decapsulate_batch(pkts)
    single_out = []
    for p in pkts:
        try:
            single_out.append(single_sa.decapsulate(p))
        except EspError:
            pass
    assert batch_out == single_out
    assert batch_sa.counters == single_sa.counters
