"""Traffic selectors of a transport-mode CHILD_SA across a NAT (RFC 7296 §2.23.1, RFC 3948 §3.1.2).

A host behind a NAT proposes its own (private) address in its traffic selectors, while
its peer sees its packets, IKE and ESP alike, come from the NAT's public address. In
transport mode the selectors are the hosts' own addresses, so as received they are
useless to the other side: the responder would answer TS_UNACCEPTABLE (the private
address is not the peer it knows) or, accepting it, drop every packet in the inbound
policy check (the rebuilt packet carries the public address).

§2.23.1 substitutes before the selectors are used for anything (narrowing, the
initiator's check that nothing was widened, the SAD entry):

- the selectors of the side behind a NAT get the address of the IKE_SA as the other
  side sees it: the peer's side its remote IKE address (``peer_behind_nat``), our own
  side our local IKE address (``we_behind_nat``);
- both the exchange responder (on the request) and the exchange initiator (on the
  response) do it, each in its own address space, so a responder may answer in its
  addresses ("replace IPN1 with IP1 and IP2 with IPN2" on the initiator's side);
- only for transport mode (USE_TRANSPORT_MODE asked for and wanted by our policy).

Protocol and ports of each selector are kept; only the address range becomes the one
address. The result is still narrowed against the peer's configured selectors, so a
peer can never name an address it is not allowed (the substituted address is one we
observed, not one it chose). The RFC 3948 §3.1.2 checksum fix is done by the datapath
(full TCP/UDP recomputation on decapsulation).

A peer forcing UDP encapsulation fakes NAT detection (strongSwan, meshsec's default), so
"the peer is behind a NAT" may be false. A side is therefore substituted only when its
selectors as received meet nothing we allow for that side (our subnets, the peer's subnets
or the virtual IP we gave it): selectors that fit are used as they are (a transport-mode
peer with configured subnets, a peer proposing its public address), and only those that
could never be used are replaced by the observed address, then narrowed as usual.

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress

from agent.iana import NotifyType, TsType
from agent.ike.child import child_mode, narrow_ts, ts_from_networks
from agent.ike.message import TrafficSelector, TsPayload


def pin(selectors, address: str) -> tuple[TrafficSelector, ...]:
    """Every selector of the address family of ``address`` with its address range set to
    ``address`` alone (IP protocol and ports kept); selectors of the other family unchanged.

    ``selectors``: TrafficSelector items; ``address``: an IPv4 or IPv6 address string.
    Duplicates that the pinning creates are dropped (order kept).
    """
    a = ipaddress.ip_address(address)
    ts_type = int(TsType.TS_IPV4_ADDR_RANGE if a.version == 4 else TsType.TS_IPV6_ADDR_RANGE)
    out: list[TrafficSelector] = []
    for s in selectors:
        if s.ts_type == ts_type:
            s = TrafficSelector(s.ts_type, s.ip_protocol, s.start_port, s.end_port, a.packed, a.packed)
        if s not in out:
            out.append(s)
    return tuple(out)


def substitute(tsi, tsr, *, exchange_initiator: bool, local_ip: str, remote_ip: str,
               we_behind_nat: bool, peer_behind_nat: bool, ours_allowed=None,
               theirs_allowed=None) -> tuple[tuple, tuple]:
    """(TSi, TSr) selectors in our own address space (§2.23.1), for a transport-mode CHILD_SA.

    ``exchange_initiator``: we sent the request these selectors answer (TSi is our side);
    else we are answering it (TSi is the peer's side). ``local_ip`` / ``remote_ip``: the
    IKE_SA's addresses as our socket sees them. Sides without a NAT are left as they are.
    ``ours_allowed`` / ``theirs_allowed``: TrafficSelectors we accept for each side; when
    given, a side whose selectors meet one of them is left as it is (see the module text).
    """
    ours, theirs = (tuple(tsi), tuple(tsr)) if exchange_initiator else (tuple(tsr), tuple(tsi))
    if we_behind_nat and not _fits(ours, ours_allowed):
        ours = pin(ours, local_ip)
    if peer_behind_nat and not _fits(theirs, theirs_allowed):
        theirs = pin(theirs, remote_ip)
    return (ours, theirs) if exchange_initiator else (theirs, ours)


def _fits(selectors, allowed) -> bool:
    return allowed is not None and bool(narrow_ts(selectors, allowed))


def wants_transport(policy, choice) -> bool:
    """Whether ``policy`` (PeerPolicy) runs the CHILD_SA of ``choice`` (EspChoice) in transport mode."""
    return child_mode(policy, "ah" if choice.proposal.is_ah else "esp") == "transport"


def child_ts(sa, msg, tsi: TsPayload | None, tsr: TsPayload | None, *, exchange_initiator: bool,
             transport_wanted: bool) -> tuple[TsPayload | None, TsPayload | None]:
    """The TSi/TSr payloads of a CHILD_SA exchange (IKE_AUTH or CREATE_CHILD_SA) after the
    §2.23.1 substitution; unchanged unless ``transport_wanted`` (our policy's mode for this
    CHILD_SA) and ``msg`` carries USE_TRANSPORT_MODE and a NAT was detected.

    ``sa``: the IkeSa (its ``local``/``remote`` addresses, NAT-D results, our and the peer's
    allowed networks are read);
    ``msg``: the request (exchange responder) or response (exchange initiator) as a Message.
    """
    if (tsi is None or tsr is None or not transport_wanted
            or msg.notify(NotifyType.USE_TRANSPORT_MODE) is None
            or not sa.nat.detected):
        return tsi, tsr
    theirs = sa.peer.subnets if exchange_initiator else sa._remote_allowed()
    i, r = substitute(tsi.selectors, tsr.selectors, exchange_initiator=exchange_initiator,
                      local_ip=sa.local[0], remote_ip=sa.remote[0],
                      we_behind_nat=sa.nat.local, peer_behind_nat=sa.nat.remote,
                      ours_allowed=ts_from_networks(sa._local_nets()), theirs_allowed=ts_from_networks(theirs))
    return TsPayload(tsi.payload_type, i), TsPayload(tsr.payload_type, r)
