"""Transport mode behind a NAT: RFC 7296 §2.23.1 traffic selector substitution (issue 9).

a sits behind a NAPT with its private address 10.77.0.2 and proposes it as TSi; b knows a
only as the NAT's public address (its transport-mode selector, `<first endpoint>/32`, the
documented configuration). Without the substitution b answered TS_UNACCEPTABLE.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace

from agent.iana import NotifyType, TsType
from agent.ike import natt_ts
from agent.ike.events import ChildSaEstablished, ChildSaRefused, IkeSaEstablished
from agent.ike.message import TrafficSelector
from agent.model import Credentials

from .conftest import A_ADDR, B_ADDR, CLASSICAL, make_net, view

PSK = Credentials(psk=b"transport behind nat psk 0123456789")
A_PRIV = "10.77.0.2"  # a's own address, inside the NAT
NAT_IP = "203.0.113.7"  # the NAT's public address: a as b sees it
TRANSPORT = replace(CLASSICAL, mode="transport", dpd_interval_s=0)


def _net(policy=TRANSPORT, b_sees_a_as=NAT_IP, seed="natts"):
    """a (A_PRIV) behind a NAPT (a's port p leaves as NAT_IP:40000+p), b on B_ADDR; transport
    mode, each side's selectors its own address / the peer's address as configured."""
    a_view = view("node-a", "node-b", my_addr=A_PRIV, my_net=ipaddress.ip_network(f"{A_PRIV}/32"),
                  peer_addr=B_ADDR, peer_net=ipaddress.ip_network(f"{B_ADDR}/32"), policy=policy)
    b_view = view("node-b", "node-a", my_addr=B_ADDR, my_net=ipaddress.ip_network(f"{B_ADDR}/32"),
                  peer_addr=b_sees_a_as, peer_net=ipaddress.ip_network(f"{b_sees_a_as}/32"), policy=policy)
    n = make_net(a_view, PSK, b_view, PSK, seed=seed)
    b_rx, a_rx = n.b.receive_datagram, n.a.receive_datagram
    n.b.receive_datagram = lambda data, local, remote, now: b_rx(
        data, local, (NAT_IP, 40000 + remote[1]) if remote[0] == A_PRIV else remote, now)
    n.a.receive_datagram = lambda data, local, remote, now: a_rx(
        data, (A_PRIV, local[1] - 40000) if local[0] == NAT_IP else local, remote, now)
    return n


def _net_of(*addrs):
    return tuple(ipaddress.ip_network(f"{x}/32") for x in addrs)


def test_initiator_behind_a_nat_gets_a_transport_child_sa_in_each_address_space():
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", IkeSaEstablished) and n.of("b", IkeSaEstablished)
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)  # was TS_UNACCEPTABLE at b
    assert ca.mode == cb.mode == "transport"
    assert (ca.local_ts, ca.remote_ts) == (_net_of(A_PRIV), _net_of(B_ADDR))
    # b's inbound check sees the rebuilt packets come from the NAT's address: that is its selector
    assert (cb.local_ts, cb.remote_ts) == (_net_of(B_ADDR), _net_of(NAT_IP))
    assert cb.remote[0] == NAT_IP and ca.local[0] == A_PRIV


def test_rekeys_either_way_keep_each_sides_selectors():
    """CREATE_CHILD_SA (§1.3.3) with each side as exchange initiator: b proposes the NAT's
    address as TSr (a substitutes its own, then b its view of a's answer), and back."""
    n = _net()
    n.a.initiate("node-b", n.now)
    n.pump()
    for side, m in (("b", n.b), ("a", n.a)):
        old = [e for e in n.of(side, ChildSaEstablished)][-1]
        before = (len(n.of("a", ChildSaEstablished)), len(n.of("b", ChildSaEstablished)))
        assert m.rekey_child(old.inbound.spi, n.now)
        n.pump()
        assert (len(n.of("a", ChildSaEstablished)), len(n.of("b", ChildSaEstablished))) == (before[0] + 1,
                                                                                             before[1] + 1), side
        na, nb = n.of("a", ChildSaEstablished)[-1], n.of("b", ChildSaEstablished)[-1]
        assert na.rekey_of is not None and nb.rekey_of is not None
        assert (na.local_ts, na.remote_ts, na.mode) == (_net_of(A_PRIV), _net_of(B_ADDR), "transport")
        assert (nb.local_ts, nb.remote_ts, nb.mode) == (_net_of(B_ADDR), _net_of(NAT_IP), "transport")


def test_responder_behind_a_port_forward_answers_in_its_own_addresses():
    """The other way round: b (B_PRIV) behind a NAT that forwards UDP 500/4500 to it; a knows
    b only as the NAT's address (its transport selector) and initiates there. b pins TSr to
    its own address, a maps the answer back to the NAT's address (§2.23.1)."""
    B_PRIV = "10.88.0.2"
    a_view = view("node-a", "node-b", my_addr=A_ADDR, my_net=ipaddress.ip_network(f"{A_ADDR}/32"),
                  peer_addr=NAT_IP, peer_net=ipaddress.ip_network(f"{NAT_IP}/32"), policy=TRANSPORT)
    b_view = view("node-b", "node-a", my_addr=B_PRIV, my_net=ipaddress.ip_network(f"{B_PRIV}/32"),
                  peer_addr=A_ADDR, peer_net=ipaddress.ip_network(f"{A_ADDR}/32"), policy=TRANSPORT)
    n = make_net(a_view, PSK, b_view, PSK, seed="nattr")
    b_rx, a_rx = n.b.receive_datagram, n.a.receive_datagram
    n.b.receive_datagram = lambda data, local, remote, now: b_rx(  # DNAT NAT_IP -> B_PRIV
        data, (B_PRIV, local[1]) if local[0] == NAT_IP else local, remote, now)
    n.a.receive_datagram = lambda data, local, remote, now: a_rx(  # and back
        data, local, (NAT_IP, remote[1]) if remote[0] == B_PRIV else remote, now)
    n.a.initiate("node-b", n.now)
    n.pump()
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert (ca.mode, ca.local_ts, ca.remote_ts) == ("transport", _net_of(A_ADDR), _net_of(NAT_IP))
    assert (cb.mode, cb.local_ts, cb.remote_ts) == ("transport", _net_of(B_PRIV), _net_of(A_ADDR))


def test_substitution_never_widens_what_the_peer_is_allowed():
    """b expects a at another address: the substituted selector (the NAT's address, observed by
    b, not chosen by a) is still narrowed against that, so TS_UNACCEPTABLE remains."""
    n = _net(b_sees_a_as="203.0.113.50")
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", IkeSaEstablished) and not n.of("b", ChildSaEstablished)
    (refused,) = n.of("b", ChildSaRefused)
    assert refused.notify == NotifyType.TS_UNACCEPTABLE and "TSi 203.0.113.7/32" in refused.offered, refused


def test_tunnel_mode_is_never_substituted():
    """Tunnel mode across the same NAT: the selectors are subnets, left as proposed (b sees
    a's private /32, which b's configuration names here)."""
    pol = replace(CLASSICAL, dpd_interval_s=0)
    n = _net(policy=pol, b_sees_a_as=A_PRIV)
    n.a.initiate("node-b", n.now)
    n.pump()
    (cb,) = n.of("b", ChildSaEstablished)
    assert cb.mode == "tunnel" and cb.remote_ts == _net_of(A_PRIV)


V4, V6 = int(TsType.TS_IPV4_ADDR_RANGE), int(TsType.TS_IPV6_ADDR_RANGE)


def _ts(lo: str, hi: str, proto: int = 0, ports=(0, 65535)) -> TrafficSelector:
    a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
    return TrafficSelector(V4 if a.version == 4 else V6, proto, ports[0], ports[1], a.packed, b.packed)


def test_selectors_that_fit_are_kept_although_nat_detection_says_nat():
    """A peer forcing UDP encapsulation fakes its NAT_DETECTION_SOURCE_IP: "behind a NAT" may
    be false. A transport-mode side whose selectors we allow as they are is left alone (here
    configured subnets that are not the IKE addresses, test_exchanges' transport case)."""
    ours, theirs = (_ts("10.1.0.0", "10.1.255.255"),), (_ts("10.2.0.0", "10.2.255.255"),)
    got = natt_ts.substitute(theirs, ours, exchange_initiator=False, we_behind_nat=True, peer_behind_nat=True,
                             local_ip="198.51.100.1", remote_ip="198.51.100.2", ours_allowed=ours,
                             theirs_allowed=theirs)
    assert got == (theirs, ours)
    # the same selectors with nothing allowed for the peer's side: substituted
    got = natt_ts.substitute(theirs, ours, exchange_initiator=False, we_behind_nat=True, peer_behind_nat=True,
                             local_ip="198.51.100.1", remote_ip="198.51.100.2", ours_allowed=ours,
                             theirs_allowed=(_ts("203.0.113.7", "203.0.113.7"),))
    assert got == ((_ts("198.51.100.2", "198.51.100.2"),), ours)


def test_pin_keeps_protocol_and_ports_and_leaves_the_other_family():
    sels = (_ts("10.0.0.0", "10.0.0.255", 6, (443, 443)), _ts("10.77.0.2", "10.77.0.2", 17, (53, 53)),
            _ts("fd00::1", "fd00::1"))
    out = natt_ts.pin(sels, "203.0.113.7")
    assert out == (_ts("203.0.113.7", "203.0.113.7", 6, (443, 443)), _ts("203.0.113.7", "203.0.113.7", 17, (53, 53)),
                   _ts("fd00::1", "fd00::1"))
    # duplicates the pinning makes are dropped
    assert natt_ts.pin((_ts("10.0.0.1", "10.0.0.1"), _ts("10.0.0.2", "10.0.0.2")), "10.9.9.9") == (
        _ts("10.9.9.9", "10.9.9.9"),)


def test_substitute_by_role_and_side():
    mine, theirs = (_ts("10.77.0.2", "10.77.0.2"),), (_ts("198.51.100.2", "198.51.100.2"),)
    kw = dict(local_ip="10.77.0.2", remote_ip="198.51.100.2")
    # exchange initiator, we behind the NAT, the responder answered in its space (our public address)
    got = natt_ts.substitute((_ts("203.0.113.7", "203.0.113.7"),), theirs, exchange_initiator=True,
                             we_behind_nat=True, peer_behind_nat=False, **kw)
    assert got == (mine, theirs)
    # exchange responder, the peer behind the NAT: TSi (its side) becomes the address we see it at
    got = natt_ts.substitute(mine, theirs, exchange_initiator=False, we_behind_nat=False, peer_behind_nat=True,
                             local_ip="198.51.100.2", remote_ip="203.0.113.7")
    assert got == ((_ts("203.0.113.7", "203.0.113.7"),), theirs)
    # no NAT: unchanged
    assert natt_ts.substitute(mine, theirs, exchange_initiator=True, we_behind_nat=False, peer_behind_nat=False,
                              **kw) == (mine, theirs)
