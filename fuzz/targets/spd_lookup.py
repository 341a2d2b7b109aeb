"""SPD lookups on arbitrary IP packets (agent/esp/spd.py, RFC 4301 §4.4.1, §5.2).

Input: ``sel`` octet then up to 16 packets (length-prefixed chunks). ``sel``
bit 0 picks the SPD: one compiled from a view (address selectors only: the
cached fast path) or one with protocol, port and ICMP type/code selectors;
bit 1: BYPASS default (else DISCARD).

Checked against a plain reference matcher written here with ``ipaddress``
(first matching entry in order, else the default): lookup_outbound (twice,
so the cached answer is checked too), lookup_inbound, entry_allows,
allows_inbound and group_outbound (every packet in exactly one group).
parse_selectors must return a tuple or None, never raise.
"""
from __future__ import annotations

import ipaddress

from agent.esp.spd import Action, Spd, SpdEntry, bypass_entries, parse_selectors
from agent.model import NodeView, Peer, PeerPolicy

from fuzz.harness import Finding, Reader, Target

N = ipaddress.ip_network


def _view() -> NodeView:
    peers = (
        Peer("gw-b", "gw-b", ("198.51.100.2",), (N("10.2.0.0/16"), N("fd00:2::/48"))),
        Peer("h-c", "h-c", ("203.0.113.3",), (), policy=PeerPolicy(mode="transport")),
        Peer("legacy", "legacy", ("198.51.100.9",), (N("10.9.0.0/24"),), policy=PeerPolicy(action="bypass")),
        Peer("bad", "bad", ("198.51.100.10",), (N("10.10.0.0/24"),), policy=PeerPolicy(action="discard")),
    )
    return NodeView("gw-a", "gw-a", (N("10.1.0.0/16"), N("fd00:1::/48")), peers, local_address="198.51.100.1")


def _view_entries(view: NodeView) -> list[SpdEntry]:
    """The view's SPD entries as the datapath builds them (agent.datapath.policy): per peer subnet
    and local subnet of its family, the controller's action; BYPASS prefixes first."""
    out = []
    for p in view.peers:
        action = {"bypass": Action.BYPASS, "discard": Action.DISCARD}.get(p.policy.action, Action.PROTECT)
        for rnet in p.subnets:
            for lnet in [n for n in view.subnets if n.version == rnet.version]:
                out.append(SpdEntry(local=lnet, remote=rnet, action=action,
                                    peer=p.name if action is Action.PROTECT else None, mode=p.policy.mode,
                                    name=f"view:{p.name}"))
    out.sort(key=lambda e: (-e.remote.prefixlen, -e.local.prefixlen))
    return bypass_entries(["10.96.0.0/12", "fd00:96::/64"]) + out


ADDR_ONLY = _view_entries(_view())
SELECTORS = [
    SpdEntry(local=N("10.1.0.0/16"), remote=N("10.2.0.0/16"), protocol=6, remote_ports=(443, 443), peer="gw-b",
             name="https"),
    SpdEntry(local=N("10.1.0.0/16"), remote=N("10.2.0.0/16"), protocol=17, local_ports=(1000, 2000),
             remote_ports=(53, 53), action=Action.BYPASS, name="dns"),
    SpdEntry(remote=N("10.2.0.0/16"), protocol=1, icmp_type=8, action=Action.DISCARD, name="no-ping"),
    SpdEntry(local=(N("fd00:1::/48"), N("fd00:11::/48")), remote=N("fd00:2::/48"), protocol=58, icmp_type=128,
             icmp_code=0, peer="gw-b", name="ping6"),
    SpdEntry(local=N("10.1.0.0/16"), remote=(N("10.2.0.0/16"), N("10.3.0.0/16")), peer="gw-b", name="two-nets"),
    SpdEntry(protocol=132, local_ports=(0, 65535), action=Action.BYPASS, name="sctp"),
]


def _ref(entries, default, sel) -> SpdEntry:
    v, src, dst, proto, sp, dp = sel
    addr = ipaddress.IPv4Address if v == 4 else ipaddress.IPv6Address
    s, d = addr(src), addr(dst)
    for e in entries:
        nets = e.local_nets + e.remote_nets
        if nets and nets[0].version != v:
            continue
        if e.local_nets and not any(n.version == v and s in n for n in e.local_nets):
            continue
        if e.remote_nets and not any(n.version == v and d in n for n in e.remote_nets):
            continue
        if e.protocol is not None and e.protocol != proto:
            continue
        if e.local_ports is not None and not e.local_ports[0] <= sp <= e.local_ports[1]:
            continue
        if e.remote_ports is not None and not e.remote_ports[0] <= dp <= e.remote_ports[1]:
            continue
        return e
    return default


def one_input(data: bytes) -> None:
    r = Reader(data)
    sel = r.u8()
    entries = ADDR_ONLY if sel & 1 == 0 else SELECTORS
    spd = Spd(entries, default=Action.BYPASS if sel & 2 else Action.DISCARD)
    pkts = []
    while r.left() and len(pkts) < 16:
        pkts.append(r.chunk())
    for p in pkts:
        s = parse_selectors(p)
        e1 = spd.lookup_outbound(p)
        e2 = spd.lookup_outbound(p)
        if e1 is not e2:
            raise Finding(f"cached lookup {e2.name!r} != first lookup {e1.name!r}")
        if s is None:
            if e1 is not spd.malformed_entry:
                raise Finding(f"unparseable packet matched {e1.name!r}")
            if spd.lookup_inbound(p) is not spd.malformed_entry:
                raise Finding("unparseable inbound packet not malformed")
            continue
        if not (isinstance(s, tuple) and len(s) == 6):
            raise Finding(f"parse_selectors returned {s!r}")
        want = _ref(spd.entries, spd.default_entry, s)
        if e1 is not want:
            raise Finding(f"outbound lookup {e1.name!r}, reference {want.name!r} for {s}")
        v, src, dst, proto, sp, dp = s
        swapped = (v, dst, src, proto, sp, dp) if proto in (1, 58) else (v, dst, src, proto, dp, sp)
        if spd.lookup_inbound(p) is not _ref(spd.entries, spd.default_entry, swapped):
            raise Finding(f"inbound lookup differs from the reference for {s}")
        for e in spd.entries:
            if spd.entry_allows(e, p) != (_ref([e], None, swapped) is e):
                raise Finding(f"entry_allows({e.name!r}) differs from the reference for {s}")
        spd.allows_inbound([N("10.1.0.0/16"), N("fd00:1::/48")], [N("10.2.0.0/16")], p)
    groups = spd.group_outbound(pkts)
    if sum(len(g) for _, g in groups) != len(pkts):
        raise Finding("group_outbound lost or duplicated packets")


TARGET = Target("spd_lookup", one_input, allowed=())
