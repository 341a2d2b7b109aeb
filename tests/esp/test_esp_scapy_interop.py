"""Cross-check against an ESP implementation we did not write:
scapy.layers.ipsec.SecurityAssociation (secdev/scapy 2.8.0) decrypts what we
encrypt and we decrypt what it encrypts, tunnel mode, with and without ESN.
Everything stays in memory (no packets are sent)."""
from __future__ import annotations

import pytest

scapy_ipsec = pytest.importorskip("scapy.layers.ipsec")
from scapy.layers.inet import IP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402

from agent.esp import EspSa  # noqa: E402
from agent.iana import EncrId, IntegId  # noqa: E402
from agent.model import EspKeys  # noqa: E402
from tests.esp.esp_helpers import DetRng, ipv4_packet, ipv6_packet  # noqa: E402

SPI = 0x0BADCAFE
OUTER = dict(src="198.51.100.1", dst="198.51.100.2")

CASES = {
    # name: (our keys kwargs, scapy crypt_algo, crypt_key, auth_algo, auth_key)
    "aes128gcm16": (dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(1, 21))),
                    "AES-GCM", bytes(range(1, 21)), "NULL", None),
    "aes256gcm16": (dict(encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(1, 37))),
                    "AES-GCM", bytes(range(1, 37)), "NULL", None),
    "chacha20poly1305": (dict(encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=bytes(range(2, 38))),
                         "CHACHA20-POLY1305", bytes(range(2, 38)), "NULL", None),
    "aes128-sha256": (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(3, 19)),
                           integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=bytes(range(4, 36))),
                      "AES-CBC", bytes(range(3, 19)), "SHA2-256-128", bytes(range(4, 36))),
    "aes256-sha512": (dict(encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(3, 35)),
                           integ_id=IntegId.AUTH_HMAC_SHA2_512_256, integ_key=bytes(range(4, 68))),
                      "AES-CBC", bytes(range(3, 35)), "SHA2-512-256", bytes(range(4, 68))),
    "null-sha384": (dict(encr_id=EncrId.ENCR_NULL, encr_key=b"",
                         integ_id=IntegId.AUTH_HMAC_SHA2_384_192, integ_key=bytes(range(5, 53))),
                    "NULL", None, "SHA2-384-192", bytes(range(5, 53))),
}


def scapy_sa(name: str, esn: bool, seq: int = 0, esn_high: int = 0):
    _, calgo, ckey, aalgo, akey = CASES[name]
    return scapy_ipsec.SecurityAssociation(
        scapy_ipsec.ESP, spi=SPI, seq_num=seq, crypt_algo=calgo, crypt_key=ckey,
        auth_algo=aalgo, auth_key=akey, tunnel_header=IP(**OUTER), esn_en=esn, esn=esn_high)


def our_sa(name: str, esn: bool) -> EspSa:
    return EspSa(EspKeys(spi=SPI, esn=esn, **CASES[name][0]), rng=DetRng())


INNER = [ipv4_packet(n, fill=n) for n in (0, 1, 2, 3, 17, 100, 1400)] + [ipv6_packet(33)]


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scapy_decrypts_ours(name: str, esn: bool) -> None:
    ours = our_sa(name, esn)
    if esn:
        ours.seq_out = (3 << 32) - 2  # cross the low-word wrap
    esp = ours.encapsulate_batch(INNER)
    for i, (inner, e) in enumerate(zip(INNER, esp)):
        seq = ours.seq_out - len(INNER) + 1 + i
        sc = scapy_sa(name, esn, esn_high=seq >> 32)
        pkt = IP(bytes(IP(proto=50, **OUTER) / e))
        dec = sc.decrypt(pkt)  # scapy raises on a bad ICV
        assert bytes(dec) == inner


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_we_decrypt_scapys(name: str, esn: bool) -> None:
    ours = our_sa(name, esn)
    high = 7 if esn else 0
    if esn:
        ours.replay.update(high << 32)
    sc = scapy_sa(name, esn, seq=1, esn_high=high)
    esp = []
    for inner in INNER:
        layer = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
        enc = sc.encrypt(layer)
        esp.append(bytes(enc)[20:])
    assert ours.decapsulate_batch(esp) == INNER
    assert ours.counters["packets_in"] == len(INNER)
    # and a scapy packet with one bit flipped in its ICV is dropped by us
    bad = esp[0][:-1] + bytes([esp[0][-1] ^ 0x80])
    ours2 = our_sa(name, esn)
    if esn:
        ours2.replay.update(high << 32)
    assert ours2.decapsulate_batch([bad]) == [] and ours2.counters["icv"] == 1
