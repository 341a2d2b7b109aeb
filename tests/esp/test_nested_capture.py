"""ESP inside ESP from tcpdump's test suite (08-sunrise-sunset-esp2.pcap,
the-tcpdump-group/tcpdump tests/, see /work/shared/captures/README.md):
outer SPI 0x12345678, inner SPI 0xabcdabcd, both 3DES-CBC with a 96-bit
ICV whose key was never published. So this is a decryption-only vector:
we cannot check the ICVs, only that both layers decrypt with the published
keys into a valid trailer (RFC 4303 §2.4 padding) and an ICMP echo inside,
using our parse_trailer / parse_ip on the results. 3DES comes from
cryptography's decrepit module here only; meshsec does not offer it.
"""
from __future__ import annotations

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.modes import CBC
from scapy.layers.inet import IP
from scapy.utils import rdpcap

from agent.esp.packet import PROTO_ESP, PROTO_ICMP, PROTO_IPV4, parse_ip
from agent.esp.sa import parse_trailer
from tests.esp.esp_helpers import CAPTURES

PCAP = CAPTURES / "tcpdump" / "08-sunrise-sunset-esp2.pcap"
KEYS = {  # from tcpdump/esp_sa.08-sunrise-esp2
    0x12345678: bytes.fromhex("43434545464649494a4a4c4c4f4f51515252545457575840"),
    0xABCDABCD: bytes.fromhex("434545464649494a4a4c4c4f4f5151525254545757584043"),
}
ICV = 12


def decrypt_3des(esp: bytes) -> tuple[int, int, bytes, int]:
    spi = int.from_bytes(esp[:4], "big")
    iv, body = esp[8:16], esp[16:len(esp) - ICV]
    d = Cipher(TripleDES(KEYS[spi]), CBC(iv)).decryptor()
    pt = d.update(body) + d.finalize()
    nh, payload = parse_trailer(pt)
    return spi, nh, payload, pt[-2]


@pytest.mark.skipif(not PCAP.exists(), reason="capture not present")
def test_both_layers_decrypt() -> None:
    frames = rdpcap(str(PCAP))
    assert len(frames) == 8
    pads = set()
    for f in frames:
        outer = bytes(f[IP])
        h = parse_ip(outer)
        assert h.protocol == PROTO_ESP
        spi, nh, inner, pad1 = decrypt_3des(outer[h.header_len:h.total_len])
        assert spi == 0x12345678
        if nh == PROTO_IPV4:  # tunnel: an IP packet carrying the inner ESP
            hi = parse_ip(inner)
            assert hi.protocol == PROTO_ESP
            inner_esp = inner[hi.header_len:hi.total_len]
        else:  # transport: the inner ESP directly
            assert nh == PROTO_ESP
            inner_esp = inner
        spi2, nh2, payload, pad2 = decrypt_3des(inner_esp)
        assert spi2 == 0xABCDABCD
        pads.add((pad1, pad2))
        if nh2 == PROTO_IPV4:
            hp = parse_ip(payload)
            assert hp.protocol == PROTO_ICMP
            icmp = payload[hp.header_len:]
        else:
            assert nh2 == PROTO_ICMP
            icmp = payload
        assert icmp[0] == 8  # echo request
    assert pads == {(6, 2)}  # README: outer pad 6, inner pad 2
