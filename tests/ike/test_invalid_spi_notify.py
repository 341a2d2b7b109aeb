"""ESP with an SPI we do not know: the unprotected N(INVALID_SPI) of RFC 7296 §1.5.

A restarted agent that receives ESP for SAs it lost tells the sender, so the sender's
liveness check starts at once instead of at its next DPD interval (node-a back after ~17 s
instead of ~47 s below). The case that needs it
is a peer behind a NAT (no endpoints in the inventory): the restarted node cannot initiate
to it, and its ESP arrives from the NAT's address, which is no configured endpoint.
"""
from __future__ import annotations

from dataclasses import replace

from agent.iana import ExchangeType, NotifyType
from agent.ike.events import ChildSaEstablished, IkeSaDeleted
from agent.ike.lost_state import INVALID_SPI_INTERVAL_S
from agent.ike.manager import IkeManager
from agent.ike.message import NotifyPayload, decode_message
from agent.model import Credentials

from tests.ike.conftest import A_ADDR, B_ADDR, T0, DetRng, make_net, view

PSK = b"a shared secret of 32 octets....."
SPI = bytes.fromhex("c0ffee01")
NAT = ("198.51.100.66", 31000)  # where a NATed peer's packets come from


def _no_endpoints(v):
    return replace(v, peers=(replace(v.peers[0], endpoints=()),))


def _invalid_spi(datagrams):
    out = []
    for d in datagrams:
        m = decode_message(d.data)
        if m.exchange == ExchangeType.INFORMATIONAL and not m.is_response and m.message_id == 0 and any(
                isinstance(p, NotifyPayload) and p.notify_type == NotifyType.INVALID_SPI for p in m.payloads):
            out.append((m, d))
    return out


def _b(v=None):
    return IkeManager(v or _no_endpoints(view("node-b", "node-a")), Credentials(psk=PSK), DetRng("b"),
                      local_address=B_ADDR)


def test_esp_from_a_nat_address_gets_unprotected_invalid_spi_back_to_its_port():
    b = _b()
    assert b.hint_unknown_spi(NAT, T0, SPI) == "unknown_address"
    ((m, d),) = _invalid_spi(b.datagrams_to_send())
    assert m.is_initiator and m.spi_i != 0 and m.spi_r == 0  # §1.5: I set, R clear, random SPIi
    (n,) = m.payloads
    assert n.data == SPI
    assert d.remote == NAT and d.local == (B_ADDR, 4500)  # to the source port, from 4500 (RFC 3948)
    assert b.counters["invalid_spi_sent"] == 1


def test_rate_limited_per_source_address():
    b = _b()
    b.hint_unknown_spi(NAT, T0, SPI)
    b.datagrams_to_send()
    b.hint_unknown_spi((NAT[0], NAT[1] + 1), T0 + 0.5, SPI)
    assert not _invalid_spi(b.datagrams_to_send()) and b.counters["invalid_spi_rate_limited"] == 1
    b.hint_unknown_spi(("198.51.100.67", 9), T0 + 0.5, SPI)  # another source: its own budget
    assert len(_invalid_spi(b.datagrams_to_send())) == 1
    b.hint_unknown_spi(NAT, T0 + INVALID_SPI_INTERVAL_S, SPI)
    assert len(_invalid_spi(b.datagrams_to_send())) == 1


def test_not_sent_to_unknown_addresses_when_every_peer_has_an_endpoint():
    b = _b(view("node-b", "node-a"))  # node-a has an endpoint: ESP from elsewhere is nobody's
    assert b.hint_unknown_spi(NAT, T0, SPI) == "unknown_address"
    assert not _invalid_spi(b.datagrams_to_send()) and b.counters["invalid_spi_not_sent"] == 1


def test_not_sent_for_raw_esp_from_an_unknown_address():
    b = _b()
    b.hint_unknown_spi(NAT[0], T0, SPI)  # protocol 50, not in UDP: a NATed peer cannot send that
    b.hint_unknown_spi((NAT[0], 0), T0, SPI)  # as a raw socket reports the source
    assert not _invalid_spi(b.datagrams_to_send())


def test_never_before_the_first_view():
    v = view("node-b", "node-a")
    b = _b(replace(v, peers=()))
    assert b.hint_unknown_spi(NAT, T0, SPI) == "unknown_address"
    assert b.hint_unknown_spi((A_ADDR, 4500), T0, SPI) == "unknown_address"
    assert b.datagrams_to_send() == []


def test_sent_to_a_configured_endpoint_with_no_ike_sa_and_initiation_too():
    b = _b(view("node-b", "node-a"))
    assert b.hint_unknown_spi((A_ADDR, 4500), T0, SPI) == "initiated"
    out = b.datagrams_to_send()
    ((_m, d),) = _invalid_spi(out)
    assert d.remote == (A_ADDR, 4500)
    assert any(decode_message(x.data).exchange == ExchangeType.IKE_SA_INIT for x in out)


def test_not_sent_without_the_spi():
    b = _b()
    b.hint_unknown_spi(NAT, T0)
    assert b.datagrams_to_send() == []


def _natted_pair():
    """node-a behind a NAT (no endpoints in node-b's view) initiates to node-b; both up."""
    a_view = view("node-a", "node-b")
    b_view = _no_endpoints(view("node-b", "node-a"))
    n = make_net(a_view, Credentials(psk=PSK), b_view, Credentials(psk=PSK))
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    return n, b_view


def _restart_b_and_send_esp(n, b_view, *, tell: bool):
    n.b = IkeManager(b_view, Credentials(psk=PSK), DetRng("b-restarted"), local_address=B_ADDR)
    n.events = {"a": [], "b": []}
    # node-a's ESP reaches the restarted node-b with an SPI it no longer knows
    n.b.hint_unknown_spi((A_ADDR, 4500), n.now, SPI if tell else b"")


def test_a_restarted_node_gets_its_natted_peer_back_within_seconds():
    """Before: node-b said nothing (its peer is no configured endpoint), node-a kept its dead
    IKE_SA until its own liveness check, tens of seconds later. Now node-a probes at once, finds
    node-b gone (INVALID_IKE_SPI) and sets up a new IKE_SA."""
    n, b_view = _natted_pair()
    t0 = n.now
    _restart_b_and_send_esp(n, b_view, tell=True)
    n.pump()
    assert n.a.counters.get("invalid_spi_hint", 0) >= 1  # node-a took it as a hint: a liveness check
    n.advance(t0 + 20)  # the hinted liveness schedule gives up after ~15 s, re-initiation 2 s later
    assert n.of("a", IkeSaDeleted) and n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    assert len(n.a.status()) == 1 and len(n.b.status()) == 1


def test_without_the_notify_the_natted_peer_notices_nothing_for_long():
    """The same restart, the hint without the SPI (as the datapath called it before): node-a
    learns nothing in 20 s (its liveness check runs on its own, slower schedule)."""
    n, b_view = _natted_pair()
    t0 = n.now
    _restart_b_and_send_esp(n, b_view, tell=False)
    n.pump()
    n.advance(t0 + 20)
    assert not n.of("a", IkeSaDeleted)
