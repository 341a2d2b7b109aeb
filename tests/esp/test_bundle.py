"""SA bundles (RFC 4301 §4.5, §5.2): ESP then AH, nested tunnels, the
inbound "exactly these SAs" check, overhead; cross-checked with scapy's
SecurityAssociation (AH verify, then ESP AES-GCM decrypt)."""
from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import AH, ESP, SecurityAssociation, zero_mutable_fields
from scapy.packet import Raw

from agent.esp import AhSa, BundleLayer, EspSa, SaBundle, overhead
from agent.iana import EncrId, IntegId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng

GCM_KEY = bytes(range(16)) + b"salt"
ESP_KEYS = EspKeys(spi=0x1001, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=GCM_KEY)
AH_KEYS = EspKeys(spi=0x2002, encr_id=0, encr_key=b"", integ_id=IntegId.AUTH_HMAC_SHA2_256_128,
                  integ_key=bytes(range(32)))


def ah_esp(mode="transport"):
    return SaBundle([EspSa(ESP_KEYS, rng=DetRng(), mode="transport"), AhSa(AH_KEYS, mode=mode)])


def pkt4(n=100):
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=80) / Raw(os.urandom(n)))


def test_ah_esp_transport_round_trip_and_scapy() -> None:
    tx, rx = ah_esp(), ah_esp()
    p = pkt4()
    o = tx.encapsulate_batch([p])
    assert len(o) == 1
    outer = IP(o[0])
    assert outer.proto == 51 and outer[AH].nh == 50 and outer[AH].spi == 0x2002
    # scapy: verify AH, then decrypt the ESP transport layer -> the original packet
    s_ah = SecurityAssociation(AH, spi=0x2002, auth_algo="SHA2-256-128", auth_key=AH_KEYS.integ_key)
    s_esp = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=GCM_KEY)
    mid = s_ah.decrypt(outer)
    assert mid.proto == 50
    assert bytes(s_esp.decrypt(IP(bytes(mid)))) == p
    assert rx.decapsulate_batch(o) == [p]
    assert rx.counters["packets_in"] == 1 and tx.counters["packets_out"] == 1


def test_scapy_built_ah_esp_accepted() -> None:
    """scapy applies ESP then AH (ICV via scapy's zeroing); our bundle peels AH then ESP."""
    p = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / Raw(b"q" * 77)
    s_esp = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=GCM_KEY)
    s_ah = SecurityAssociation(AH, spi=0x2002, auth_algo="SHA2-256-128", auth_key=AH_KEYS.integ_key)
    mid = IP(bytes(s_esp.encrypt(p)))
    # scapy's AH signer MACs the first ESP layer it finds instead (AH ICV left zero, the
    # MAC appended to the ESP data): build the AH with scapy, cut the packet back to its IP
    # total length, and compute the ICV over scapy's own mutable-field zeroing
    built = IP(bytes(s_ah.encrypt(mid)))
    shell = IP(bytes(built)[:built.len])
    zeroed = bytes(zero_mutable_fields(shell.copy(), sending=True))
    icv = hmac.new(AH_KEYS.integ_key, zeroed, hashlib.sha256).digest()[:16]
    wire = bytes(shell)[:20 + 12] + icv + bytes(shell)[20 + 12 + 16:]
    assert s_ah.decrypt(IP(wire))  # scapy's verifier agrees
    rx = ah_esp()
    assert rx.decapsulate_batch([wire]) == [bytes(p)]


def test_inbound_policy_demands_exactly_the_bundle() -> None:
    p = pkt4()
    rx = ah_esp()
    esp_only = SaBundle([EspSa(ESP_KEYS, rng=DetRng(), mode="transport")]).encapsulate_batch([p])
    ah_only = SaBundle([AhSa(AH_KEYS)]).encapsulate_batch([p])
    wrong_order = SaBundle([AhSa(AH_KEYS), EspSa(ESP_KEYS, rng=DetRng(), mode="transport")]).encapsulate_batch([p])
    other_spi = SaBundle([EspSa(EspKeys(spi=0x7777, encr_id=20, encr_key=GCM_KEY), rng=DetRng(), mode="transport"),
                          AhSa(AH_KEYS)]).encapsulate_batch([p])
    assert rx.decapsulate_batch(esp_only + ah_only + wrong_order + [p]) == []
    assert rx.counters["policy"] == 4
    # the AH layer is right, the ESP inside is not ours: policy too (after AH authenticated)
    rx2 = ah_esp()
    assert rx2.decapsulate_batch(other_spi) == [] and rx2.counters["policy"] == 1
    assert rx2.layers[1].sa.counters["packets_in"] == 1  # AH itself was fine


def test_layer_drop_and_malformed_are_counted() -> None:
    tx, rx = ah_esp(), ah_esp()
    o = tx.encapsulate_batch([pkt4()])[0]
    bad = bytearray(o)
    bad[-1] ^= 1  # inside the ESP ICV: AH fails first
    assert rx.decapsulate_batch([bytes(bad), b"", b"\x45\x00"]) == []
    assert rx.counters["layer_drop"] == 1 and rx.counters["malformed"] == 2
    assert rx.layers[1].sa.counters["icv"] == 1
    assert tx.encapsulate_batch([b"", b"\x60" * 10]) == []
    assert tx.counters["packets_out"] == 1


@pytest.mark.parametrize("outer,inner", [("v4", "v6"), ("v6", "v4"), ("v6", "v6"), ("v4", "v4")])
@pytest.mark.parametrize("udp", [True, False])
def test_esp_tunnel_mixed_families(outer, inner, udp) -> None:
    """IPv4-in-IPv6 and IPv6-in-IPv4 tunnel mode, raw ESP and ESP in UDP."""
    loc, rem = ("198.51.100.1", "198.51.100.2") if outer == "v4" else ("2001:db8::1", "2001:db8::2")
    mk = lambda: SaBundle([BundleLayer(EspSa(ESP_KEYS, rng=DetRng()), local=loc, remote=rem, udp=udp)])
    tx, rx = mk(), mk()
    p = pkt4() if inner == "v4" else bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP() / Raw(b"6" * 60))
    o = tx.encapsulate_batch([p])
    w = (IP if outer == "v4" else IPv6)(o[0])
    if udp:
        assert w[UDP].dport == 4500 and w[UDP].sport == 4500
        if outer == "v6":  # mandatory UDP checksum over IPv6, verified by scapy's rebuild
            c = w[UDP].chksum
            del w[UDP].chksum
            assert (IPv6 if outer == "v6" else IP)(bytes(w))[UDP].chksum == c
    else:
        assert (w.proto if outer == "v4" else w.nh) == 50
    s = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=GCM_KEY,
                            tunnel_header=(IP if outer == "v4" else IPv6)(src=loc, dst=rem))
    esp_pkt = (IP if outer == "v4" else IPv6)(src=loc, dst=rem) / ESP(bytes(w[UDP].payload)) if udp else w
    assert bytes(s.decrypt(esp_pkt)) == p
    assert rx.decapsulate_batch(o) == [p]
    assert len(o[0]) - len(p) <= overhead(tx, 4 if inner == "v4" else 6)


def test_overhead_figures() -> None:
    gcm = EspSa(ESP_KEYS, rng=DetRng())
    # AES-GCM tunnel in UDP over IPv4: 20 + 8 + 8 (SPI, seq) + 8 (IV) + 3 (max pad) + 2 + 16 (ICV)
    assert overhead(gcm) == 65
    assert overhead(gcm, udp=False, outer_version=6) == 40 + 8 + 8 + 3 + 2 + 16
    cbc = EspSa(EspKeys(spi=5, encr_id=12, encr_key=bytes(16), integ_id=12, integ_key=bytes(32)), rng=DetRng())
    assert overhead(cbc) == 20 + 8 + 8 + 16 + 15 + 2 + 16
    ah = AhSa(AH_KEYS)
    assert overhead(ah, 4) == 28 and overhead(ah, 6) == 32
    b = ah_esp()
    assert overhead(b) == (8 + 8 + 3 + 2 + 16) + 28
    # bound holds for every size
    for n in range(0, 64):
        p = pkt4(n)
        assert len(b.encapsulate_batch([p])[0]) - len(p) <= overhead(b)
    with pytest.raises(TypeError):
        overhead("esp")


def test_nested_transport_inside_tunnel() -> None:
    """Case 3: an end-to-end transport SA carried inside the gateways' tunnel SA."""
    e2e_keys = EspKeys(spi=0x3003, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20))
    mk = lambda: SaBundle([EspSa(e2e_keys, rng=DetRng(), mode="transport"),
                           BundleLayer(EspSa(ESP_KEYS, rng=DetRng()), local="198.51.100.1",
                                       remote="198.51.100.2", udp=True)])
    tx, rx = mk(), mk()
    p = pkt4()
    o = tx.encapsulate_batch([p])
    assert rx.decapsulate_batch(o) == [p]


def test_bundle_construction_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SaBundle([])
    with pytest.raises(ValueError, match="AH cannot"):
        SaBundle([BundleLayer(AhSa(AH_KEYS), udp=True)])
    with pytest.raises(ValueError, match="tunnel mode needs"):
        SaBundle([EspSa(ESP_KEYS, rng=DetRng())])
    with pytest.raises(ValueError, match="IP version"):
        SaBundle([BundleLayer(EspSa(ESP_KEYS, rng=DetRng()), local="198.51.100.1", remote="2001:db8::1")])
    with pytest.raises(ValueError, match="not an EspSa"):
        SaBundle(["x"])
