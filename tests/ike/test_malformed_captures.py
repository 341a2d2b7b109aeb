"""Robustness: every UDP payload of the public regression captures goes through
IkeManager.receive_datagram and is either handled or dropped with a counter, never an
exception (captures: /work/shared/captures, tcpdump tests @ 39b50f76 and scapy test/pcaps
@ ac38b273; see their README). Plus hypothesis fuzzing of whole datagrams."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agent.ike.manager import IkeManager
from agent.model import Credentials

from tests.ike.conftest import DetRng, T0, view

CAPS = Path("/work/shared/captures")
MALFORMED = ["tcpdump/isakmp-pointer-loop.pcap", "tcpdump/isakmp-various-oobr.pcap",
             "tcpdump/isakmp-rfc3948-oobr.pcap", "tcpdump/isakmp-3948-oobr-2.pcap",
             "tcpdump/isakmp-no-none-np.pcapng", "tcpdump/ikev2-id-normal.pcap", "tcpdump/ikev2-id-short.pcap",
             "tcpdump/ikev2pI2-segfault.pcapng", "tcpdump/esp_truncated.pcap"]
OTHERS = ["tcpdump/ikev2four.pcap", "tcpdump/ikev2pI2.pcap", "tcpdump/isakmp4500.pcap",
          "scapy/ikev2_nat_t.pcapng", "scapy/ikev2_notify_redirect.pcap",
          "scapy/ikev2-decrypt-aes128ccm12-subset.pcap"]


def datagrams(path: Path) -> list[tuple[bytes, int]]:
    """(UDP payload, dst port) per frame; the non-ESP marker stripped on 4500 (RFC 3948 §2.2).
    Frames scapy cannot dissect to UDP (odd link types, fragments) are fed raw and from
    offset 42 (Ethernet + IPv4 + UDP headers), as garbage input."""
    from scapy.all import UDP, rdpcap
    out = []
    for p in rdpcap(str(path)):
        if UDP in p:
            d = bytes(p[UDP].payload)
            port = p[UDP].dport
            if 4500 in (p[UDP].sport, p[UDP].dport) and d[:4] == b"\0\0\0\0":
                d = d[4:]
            out.append((d, port))
        else:
            raw = bytes(p)
            out.append((raw, 500))
            if len(raw) > 42:
                out.append((raw[42:], 500))
    return out


def _manager() -> IkeManager:
    psk = b"robustness test psk"
    return IkeManager(view("node-b", "node-a"), Credentials(psk=psk), DetRng("fuzz"), local_address="198.51.100.2")


def _feed(m: IkeManager, items) -> list[str]:
    """Feed datagrams; returns per datagram 'drop:<reason>' or 'handled'."""
    results = []
    for i, (d, port) in enumerate(items):
        before = dict(m.counters)
        m.receive_datagram(d, ("198.51.100.2", port), ("198.51.100.1", 500), T0 + i)
        m.handle_timer(T0 + i)
        changed = [k for k in m.counters if m.counters[k] != before.get(k, 0)]
        out = m.datagrams_to_send()
        results.append(f"drop:{changed[0]}" if changed else ("handled" if out or m.status() else "silent"))
        while m.next_event():
            pass
    return results


@pytest.mark.parametrize("name", MALFORMED)
def test_regression_captures_are_dropped_and_counted(name):
    m = _manager()
    items = datagrams(CAPS / name)
    assert items
    res = _feed(m, items)
    assert all(r.startswith("drop:") for r in res), res
    assert "internal_error" not in m.counters
    assert sum(m.counters.values()) == len(items)
    assert m.status() == []


@pytest.mark.parametrize("name", OTHERS)
def test_foreign_captures_never_raise(name):
    """Other test beds' IKE traffic: IKE_SA_INIT requests may be answered (NO_PROPOSAL_CHOSEN,
    INVALID_KE_PAYLOAD, a responder IKE_SA); everything else is dropped with a counter."""
    m = _manager()
    items = datagrams(CAPS / name)
    res = _feed(m, items)
    assert "internal_error" not in m.counters
    assert "silent" not in res, res
    assert m.counters  # at least the encrypted messages with unknown SPIs


def test_ikev1_is_counted_malformed():
    m = _manager()
    _feed(m, datagrams(CAPS / "tcpdump/isakmp-pointer-loop.pcap"))
    assert m.counters == {"malformed": 1}


def test_capture_ike_auth_with_unknown_spi_counted():
    m = _manager()
    items = datagrams(CAPS / "tcpdump/ikev2pI2.pcap")
    res = _feed(m, items[1:])
    assert res == ["drop:unknown_spi"]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_receive_datagram_never_raises(data):
    m = _manager()
    m.receive_datagram(data, ("198.51.100.2", 500), ("198.51.100.1", 500), T0)
    assert "internal_error" not in m.counters
