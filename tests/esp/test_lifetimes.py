"""SA lifetimes in bytes and packets (RFC 4301 §4.4.2.1) in the ESP and AH core.

Soft limit (``needs_rekey``) at ``soft_fraction`` of the hard limit; past the hard limit no
packet is sent or accepted (dropped, counted ``lifetime_expired``, ``expired`` set), both
directions. The batch path (checked once per batch) and the single-packet path must agree.
Outside implementation: scapy's SecurityAssociation decrypts every packet we let out.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP
from scapy.layers.ipsec import ESP, SecurityAssociation

from agent.esp import AhSa, EspError, EspSa
from agent.iana import EncrId, IntegId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng, ipv4_packet, ipv6_packet

SPI = 0x01020304
GCM_KEY = bytes(range(1, 21))  # AES-128 key + 4-byte salt (RFC 4106 §8.1)


def esp_keys(spi: int = SPI) -> EspKeys:
    return EspKeys(spi=spi, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=GCM_KEY)


def ah_keys(spi: int = SPI) -> EspKeys:
    return EspKeys(spi=spi, encr_id=0, encr_key=b"", integ_id=IntegId.AUTH_HMAC_SHA2_256_128,
                   integ_key=bytes(range(32)))


def esp(**kw) -> EspSa:
    return EspSa(esp_keys(), rng=DetRng(), **kw)


def pkt(total: int, fill: int = 0) -> bytes:
    """An IPv4 packet of ``total`` octets (what the SA counts as bytes)."""
    p = ipv4_packet(total - 20, fill=fill)
    assert len(p) == total
    return p


def pkts(n: int, size: int = 100, start: int = 0) -> list[bytes]:
    return [pkt(size, start + i) for i in range(n)]


# ---- construction ---------------------------------------------------------------

@pytest.mark.parametrize("kw, word", [
    (dict(lifetime_bytes=-1), "lifetime_bytes"),
    (dict(lifetime_packets=1.5), "lifetime_packets"),
    (dict(lifetime_packets=True), "lifetime_packets"),
    (dict(lifetime_bytes=10, soft_fraction=0), "soft_fraction"),
    (dict(lifetime_bytes=10, soft_fraction=1.2), "soft_fraction"),
])
@pytest.mark.parametrize("cls", ["esp", "ah"])
def test_bad_limits_are_refused_with_a_clear_error(cls, kw, word):
    with pytest.raises(ValueError, match=word):
        if cls == "esp":
            esp(**kw)
        else:
            AhSa(ah_keys(), **kw)


def test_soft_limit_is_the_fraction_of_the_hard_one():
    sa = esp(lifetime_bytes=1000, lifetime_packets=10)
    assert (sa.soft_bytes, sa.soft_packets) == (900, 9)  # default 90 %
    sa = esp(lifetime_packets=10, soft_fraction=0.5)
    assert (sa.soft_bytes, sa.soft_packets) == (0, 5)
    assert esp(lifetime_packets=1).soft_packets == 1  # never 0 with a limit set


def test_no_limit_means_no_limit():
    sa = esp()
    out = sa.encapsulate_batch(pkts(50))
    assert len(out) == 50 and not sa.needs_rekey and not sa.expired
    assert sa.lifetime_status()["packets"] == {"limit": 0, "soft": 0, "used": 50}


# ---- outbound -------------------------------------------------------------------

def test_packet_limit_outbound_soft_then_hard():
    sa = esp(lifetime_packets=10)
    assert len(sa.encapsulate_batch(pkts(8))) == 8
    assert not sa.needs_rekey
    assert len(sa.encapsulate_batch(pkts(1))) == 1  # 9 = 90 %: soft limit
    assert sa.needs_rekey and not sa.expired
    out = sa.encapsulate_batch(pkts(5))  # one more fits, four do not
    assert len(out) == 1
    assert sa.expired
    assert sa.counters["lifetime_expired"] == 4
    assert sa.counters["packets_out"] == 10 and sa.seq_out == 10  # no sequence number burnt
    with pytest.raises(EspError) as ei:
        sa.encapsulate(pkts(1)[0])
    assert ei.value.reason == "lifetime_expired" and "10 of 10 packets" in str(ei.value)
    assert sa.counters["lifetime_expired"] == 5


def test_byte_limit_outbound_never_exceeded():
    sa = esp(lifetime_bytes=1000)
    out = sa.encapsulate_batch(pkts(12, size=100))  # 100-byte packets: 10 fit exactly
    assert len(out) == 10
    assert sa.counters["bytes_out"] == 1000 and sa.expired
    assert sa.counters["lifetime_expired"] == 2
    # a smaller packet would not fit either: the limit is reached exactly
    assert sa.encapsulate_batch([pkt(28)]) == []


def test_byte_limit_refuses_a_packet_that_would_cross_it_but_takes_a_smaller_one():
    sa = esp(lifetime_bytes=250)
    assert len(sa.encapsulate_batch(pkts(2, size=100))) == 2
    assert not sa.needs_rekey and not sa.expired  # 200 < soft 225
    assert sa.encapsulate_batch([pkt(100)]) == []  # 300 > 250: refused
    assert sa.expired and sa.counters["lifetime_expired"] == 1
    assert len(sa.encapsulate_batch([pkt(50)])) == 1  # 250: fits exactly
    assert sa.counters["bytes_out"] == 250


def test_packets_let_out_up_to_the_limit_decrypt_in_scapy():
    sa = esp(lifetime_packets=6)
    inner = pkts(9, size=60)
    out = sa.encapsulate_batch(inner[:4]) + sa.encapsulate_batch(inner[4:])
    assert len(out) == 6
    theirs = SecurityAssociation(ESP, spi=SPI, crypt_algo="AES-GCM", crypt_key=GCM_KEY,
                                 auth_algo="NULL", tunnel_header=IP(src="198.51.100.1", dst="198.51.100.2"))
    for i, e in enumerate(out):
        pkt = IP(src="198.51.100.1", dst="198.51.100.2", proto=50) / ESP(bytes(e))
        pkt = IP(bytes(pkt))
        assert pkt[ESP].seq == i + 1
        assert bytes(theirs.decrypt(pkt)) == inner[i]


# ---- inbound --------------------------------------------------------------------

def test_packet_limit_inbound_refuses_before_the_icv_and_counts():
    tx, rx = esp(), esp(lifetime_packets=5)
    wire = tx.encapsulate_batch(pkts(8))
    got = rx.decapsulate_batch(wire[:3])
    assert len(got) == 3 and not rx.needs_rekey
    got = rx.decapsulate_batch(wire[3:4])
    assert len(got) == 1 and rx.needs_rekey and not rx.expired  # soft: int(5 * 0.9) = 4
    got = rx.decapsulate_batch(wire[4:])
    assert got == pkts(8)[4:5]
    assert rx.expired and rx.counters["lifetime_expired"] == 3 and rx.counters["packets_in"] == 5
    # refused before decryption: the replay window never saw 6..8
    assert rx.replay.top == 5


def test_byte_limit_inbound_never_exceeded():
    tx, rx = esp(), esp(lifetime_bytes=350)
    wire = tx.encapsulate_batch(pkts(5, size=100))
    got = rx.decapsulate_batch(wire)
    assert len(got) == 3 and rx.counters["bytes_in"] == 300
    assert rx.counters["lifetime_expired"] == 2 and rx.expired and rx.needs_rekey
    with pytest.raises(EspError) as ei:
        rx.decapsulate(tx.encapsulate(pkt(51)))
    assert ei.value.reason == "lifetime_expired" and "300 of 350 bytes used, packet of 51" in ei.value.detail
    assert rx.counters["bytes_in"] == 300


def test_inbound_soft_limit_sets_needs_rekey():
    tx, rx = esp(), esp(lifetime_bytes=1000)
    rx.decapsulate_batch(tx.encapsulate_batch(pkts(8, size=100)))
    assert not rx.needs_rekey
    rx.decapsulate_batch(tx.encapsulate_batch(pkts(1, size=100)))
    assert rx.needs_rekey and not rx.expired


def test_transport_mode_both_directions():
    tx = EspSa(esp_keys(), rng=DetRng(), mode="transport", lifetime_packets=3)
    rx = EspSa(esp_keys(), rng=DetRng(), mode="transport", lifetime_packets=2)
    wire = tx.encapsulate_batch(pkts(5))
    assert len(wire) == 3 and tx.counters["lifetime_expired"] == 2 and tx.expired
    got = rx.decapsulate_batch_nh(wire)
    assert len(got) == 2 and rx.counters["lifetime_expired"] == 1 and rx.expired


# ---- batch path == single-packet path -------------------------------------------

def _run(limits: dict, sizes: list[int], batch: int | None):
    """Send ``sizes`` through a limited sender and a limited receiver (tunnel mode), by
    batches of ``batch`` or one packet at a time (None); what came through, counters, flags."""
    tx = EspSa(esp_keys(), rng=DetRng(), **limits)
    rx = EspSa(esp_keys(), rng=DetRng(), **limits)
    inner = [ipv4_packet(s, fill=i) if i % 3 else ipv6_packet(s) for i, s in enumerate(sizes)]
    got = []
    if batch is None:
        for p in inner:
            try:
                e = tx.encapsulate(p)
            except EspError:
                continue
            try:
                got.append(rx.decapsulate(e))
            except EspError:
                pass
    else:
        for i in range(0, len(inner), batch):
            got += rx.decapsulate_batch(tx.encapsulate_batch(inner[i:i + batch]))
    return got, tx.counters, rx.counters, (tx.needs_rekey, tx.expired, rx.needs_rekey, rx.expired)


@pytest.mark.parametrize("limits", [dict(lifetime_packets=17), dict(lifetime_bytes=2500),
                                    dict(lifetime_bytes=4000, lifetime_packets=30),
                                    dict(lifetime_bytes=100000)])
@pytest.mark.parametrize("batch", [1, 4, 7, 64])
def test_batch_and_single_packet_paths_agree_tunnel(limits, batch):
    sizes = [40 + (i * 37) % 300 for i in range(40)]
    single = _run(limits, sizes, None)
    batched = _run(limits, sizes, batch)
    assert batched[0] == single[0]
    assert batched[1] == single[1] and batched[2] == single[2]
    assert batched[3] == single[3]
    if limits != dict(lifetime_bytes=100000):
        assert single[3][1] and single[2]["lifetime_expired"] + single[1]["lifetime_expired"] > 0
    else:
        assert single[3] == (False, False, False, False) and len(single[0]) == len(sizes)


@pytest.mark.parametrize("limits", [dict(lifetime_packets=11), dict(lifetime_bytes=3000)])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_batch_and_single_packet_paths_agree_transport(limits, batch):
    sizes = [40 + (i * 53) % 250 for i in range(30)]
    tx1 = EspSa(esp_keys(), rng=DetRng(), mode="transport", **limits)
    tx2 = EspSa(esp_keys(), rng=DetRng(), mode="transport", **limits)
    rx1 = EspSa(esp_keys(), rng=DetRng(), mode="transport", **limits)
    rx2 = EspSa(esp_keys(), rng=DetRng(), mode="transport", **limits)
    inner = [ipv4_packet(s, fill=i) for i, s in enumerate(sizes)]
    one = []
    for p in inner:
        w = tx1.encapsulate_batch([p])
        one += rx1.decapsulate_batch_nh(w)
    many = []
    for i in range(0, len(inner), batch):
        many += rx2.decapsulate_batch_nh(tx2.encapsulate_batch(inner[i:i + batch]))
    assert one == many
    assert tx1.counters == tx2.counters and rx1.counters == rx2.counters
    assert (tx1.expired, rx1.expired, tx1.needs_rekey) == (tx2.expired, rx2.expired, tx2.needs_rekey)
    assert tx1.expired  # the limits are small enough to be hit


# ---- AH -------------------------------------------------------------------------

def test_ah_packet_limit_both_directions():
    tx = AhSa(ah_keys(), lifetime_packets=4)
    rx = AhSa(ah_keys(), lifetime_packets=3)
    wire = tx.encapsulate_batch(pkts(6))
    assert len(wire) == 4 and tx.counters["lifetime_expired"] == 2 and tx.expired and tx.needs_rekey
    got = rx.decapsulate_batch(wire)
    assert len(got) == 3 and rx.counters["lifetime_expired"] == 1 and rx.expired
    with pytest.raises(EspError) as ei:
        tx.encapsulate(pkts(1)[0])
    assert ei.value.reason == "lifetime_expired"


def test_ah_byte_limit_and_soft():
    tx = AhSa(ah_keys(), lifetime_bytes=1000)
    tx.encapsulate_batch(pkts(8, size=100))
    assert not tx.needs_rekey
    tx.encapsulate_batch(pkts(1, size=100))
    assert tx.needs_rekey and not tx.expired
    assert len(tx.encapsulate_batch(pkts(3, size=100))) == 1
    assert tx.counters["bytes_out"] == 1000 and tx.expired


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_ah_batch_and_single_paths_agree(batch):
    inner = [ipv4_packet(40 + i * 11, fill=i) for i in range(20)]
    a_tx, a_rx = AhSa(ah_keys(), lifetime_bytes=1500), AhSa(ah_keys(), lifetime_bytes=1400)
    b_tx, b_rx = AhSa(ah_keys(), lifetime_bytes=1500), AhSa(ah_keys(), lifetime_bytes=1400)
    one = []
    for p in inner:
        try:
            one.append(a_rx.decapsulate(a_tx.encapsulate(p)))
        except EspError:
            pass
    many = []
    for i in range(0, len(inner), batch):
        many += b_rx.decapsulate_batch(b_tx.encapsulate_batch(inner[i:i + batch]))
    assert one == many and a_tx.counters == b_tx.counters and a_rx.counters == b_rx.counters
    assert a_rx.expired and b_rx.expired
