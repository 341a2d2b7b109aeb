"""Checks on the inner packet in the ESP/AH core: transport mode refuses IP fragments (RFC 4303
§3.3.4), the SPD cache never answers a malformed packet, AH's mutable-field zeroing refuses
truncated headers. Packets are built with scapy (an implementation we did not write)."""
from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from agent.esp.ah import AhSa
from agent.esp.errors import EspError
from agent.esp.sa import EspSa
from agent.iana import EncrId
from agent.model import EspKeys

from tests.esp.esp_helpers import DetRng


def _esp(mode):
    k = EspKeys(0x2000, int(EncrId.ENCR_AES_GCM_16), bytes(range(20)))
    return EspSa(k, rng=DetRng(), mode=mode)


def _v4_frags():
    big = IP(src="10.0.0.1", dst="10.0.0.2", flags=0) / UDP(sport=5353, dport=53) / Raw(b"A" * 3000)
    return [bytes(f) for f in fragment(big, fragsize=1400)]


def _v6_frag(hbh=False):
    base = IPv6(src="fd00::1", dst="fd00::2")
    if hbh:
        base = base / IPv6ExtHdrHopByHop()
    return bytes(base / IPv6ExtHdrFragment(m=1, offset=0, id=7) / UDP(sport=1, dport=2) / Raw(b"B" * 64))


# ------------------------------------------------------------ 3. transport mode and IP fragments
def test_transport_esp_refuses_ipv4_fragments_batch_and_single():
    """RFC 4303 §3.3.4: transport mode applies to whole datagrams; each fragment counts bad_inner."""
    frags = _v4_frags()
    assert len(frags) == 3
    tx = _esp("transport")
    assert tx.encapsulate_batch(frags) == []
    assert tx.counters["bad_inner"] == 3 and tx.counters["packets_out"] == 0
    whole = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"ok"))
    assert len(tx.encapsulate_batch([whole])) == 1  # whole datagrams still go
    # tunnel mode carries fragments (the inner packet is opaque)
    assert len(_esp("tunnel").encapsulate_batch(frags)) == 3


@pytest.mark.parametrize("hbh", [False, True])
def test_transport_esp_refuses_ipv6_fragments(hbh):
    tx = _esp("transport")
    assert tx.encapsulate_batch([_v6_frag(hbh)]) == []
    assert tx.counters["bad_inner"] == 1


def test_transport_esp_with_byte_limits_refuses_fragments_too():
    k = EspKeys(0x2000, int(EncrId.ENCR_AES_GCM_16), bytes(range(20)))
    tx = EspSa(k, rng=DetRng(), mode="transport", lifetime_bytes=10 ** 6)
    assert tx.encapsulate_batch(_v4_frags()) == []
    assert tx.counters["bad_inner"] == 3


def test_transport_ah_refuses_fragments():
    ah = AhSa(EspKeys(0x2001, 0, b"", 12, bytes(32)))
    ah.encapsulate_batch(_v4_frags())
    assert ah.counters["bad_inner"] == 3 and ah.counters["packets_out"] == 0


# ------------------------------------------------------------ 7. SPD cache answers only valid packets
def test_spd_outbound_cache_never_answers_a_malformed_packet():
    from agent.esp.spd import Action, Spd, SpdEntry
    spd = Spd([SpdEntry(local=ipaddress.ip_network("10.1.0.0/16"), remote=ipaddress.ip_network("10.2.0.0/16"),
                        action=Action.BYPASS, name="byp")])
    good = bytes(IP(src="10.1.0.1", dst="10.2.0.2") / UDP(sport=1, dport=2) / Raw(b"x" * 4))
    bad = bytearray(good)
    bad[0] = 0x43  # IHL 3: not an IPv4 header
    long_ihl = bytearray(good)
    long_ihl[0] = 0x4F  # IHL 60 > packet length
    assert spd.lookup_outbound(bytes(bad)).name == "malformed"
    assert spd.lookup_outbound(good).name == "byp"  # now cached for this address pair
    assert spd.lookup_outbound(bytes(bad)).name == "malformed"
    assert spd.lookup_outbound(bytes(long_ihl)).name == "malformed"
    assert spd.lookup_outbound(good).name == "byp"


# ------------------------------------------------------------ 9. AH zero_mutable on truncated headers
@pytest.mark.parametrize("hdr", [b"", b"\x45\x00\x00", bytes([0x46]) + bytes(19), b"\x60" + bytes(20)])
def test_ah_zero_mutable_raises_esp_error_on_truncated_headers(hdr):
    from agent.esp.ah import zero_mutable
    with pytest.raises(EspError) as e:
        zero_mutable(hdr)
    assert e.value.reason == "malformed"
