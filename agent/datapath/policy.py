"""Policy: NodeView -> SPD (RFC 4301 §4.4.1), SA bundles, MTU and routes.

The SPD is rebuilt, in this order, from the ``--bypass`` BYPASS entries
(first, whatever their prefix), the installed CHILD_SAs' selectors (narrowed
protocol/ports when negotiated, RFC 7296 §2.9) and the view's per-peer
entries, most specific first. From the SPD follow the SA bundles (RFC 4301
§4.5 iterated processing): a CHILD_SA whose own packets another peer's
PROTECT entry covers is sent through that peer's SA (``ChildEntry.via``);
then each SA's overhead, the largest inner packet each bundle fits in the
underlay MTU (``max_inner``) and, with ``auto_mtu``, the TUN MTU. Routes
into the TUN follow the view and the CHILD_SAs.

The SA model is ``agent.esp.Sad`` (ChildEntry rows linked by ``via``/``ah``);
this module only computes the links, it never installs or removes SAs.
"""
from __future__ import annotations

import ipaddress
import logging

from agent.datapath import packets as pk
from agent.esp import Action, Sad, Spd, SpdEntry, bypass_entries
from agent.model import NodeView

_ANY4 = ipaddress.ip_network("0.0.0.0/0")
_ANY6 = ipaddress.ip_network("::/0")
_ACTIONS = {"bypass": Action.BYPASS, "discard": Action.DISCARD}


def selector_entries(peer: str, mode: str, local_sel, remote_sel) -> tuple | None:
    """SPD entries (outbound view: local = our side) for a CHILD_SA's narrowed traffic
    selectors (agent.ike.message.TrafficSelector, RFC 7296 §3.13.1) that restrict the IP
    protocol or ports; None when every pair is protocol 0 with ports 0-65535 (whole
    networks: the address check is enough). ICMP type/code travel in the port fields
    (type in the high octet, RFC 4301 §4.4.1.1); OPAQUE ports (start > end) cannot be
    expressed by an SPD entry and are treated as any port."""
    def ports(ts):
        if ts.start_port == 0 and ts.end_port == 65535 or ts.start_port > ts.end_port:
            return None
        return (ts.start_port, ts.end_port)

    narrowed = False
    out = []
    for ls in local_sel:
        for rs in remote_sel:
            if len(ls.start_addr) != len(rs.start_addr):
                continue
            lp, rp = ls.ip_protocol, rs.ip_protocol
            if lp and rp and lp != rp:
                continue
            proto = lp or rp or None
            lports, rports = ports(ls), ports(rs)
            if proto is not None or lports is not None or rports is not None:
                narrowed = True
            kw = {}
            if proto in (1, 58):  # ICMP: type range from the high octets, code range from the low
                rng = lports or rports
                if rng is not None:
                    t0, t1 = rng[0] >> 8, rng[1] >> 8
                    kw = {"local_ports": (t0, t1),
                          "remote_ports": (rng[0] & 0xFF, rng[1] & 0xFF) if t0 == t1 else (0, 255)}
            elif proto in (6, 17, 132, 136):
                kw = {"local_ports": lports, "remote_ports": rports}
            for ln in ls.networks():
                for rn in rs.networks():
                    out.append(SpdEntry(local=ln, remote=rn, protocol=proto, action=Action.PROTECT, peer=peer,
                                        mode=mode, name=f"child:{peer}", **kw))
    return tuple(out) if narrowed else None


class Policy:
    """The SPD and everything derived from it.

    ``sad``: the SA table whose rows get ``via``/``overhead``/``max_inner``; ``local_address``:
    our underlay address; ``bypass``: control-plane prefixes (BYPASS ahead of everything);
    ``underlay_mtu``: bytes or None (no MTU logic); ``tun_mtu``: the TUN MTU now;
    ``auto_mtu``: set the TUN MTU (``routes.set_mtu``) to the underlay MTU minus the largest
    bundle overhead; ``routes``: a RouteManager or None.
    State read by the packet path: ``spd``, ``hits`` (SpdEntry -> packets), ``tun_mtu``,
    ``local_ips`` (our addresses, incl. virtual IPs), ``nest_in`` (a tunnel may carry
    SAs/IKE for us: inbound peeling needed)."""

    def __init__(self, sad: Sad, *, local_address: str, bypass=(), underlay_mtu: int | None = None,
                 tun_mtu: int = 1400, auto_mtu: bool = False, routes=None,
                 log: logging.Logger | None = None) -> None:
        self.sad = sad
        self.local_address = local_address
        self.underlay_mtu = underlay_mtu
        self.tun_mtu = tun_mtu
        self.auto_mtu = auto_mtu
        self.routes = routes
        self.log = log or logging.getLogger("meshsec.runtime")
        self.spd = Spd()  # default DISCARD
        self.hits: dict[SpdEntry, int] = {}
        self.local_ips: set[str] = {local_address}
        self.nest_in = False
        self._view_spd: list[SpdEntry] = []
        # SPD entry (by id) -> the CHILD_SA that carries it, None: no SA covers it (``sa_for``)
        self._sa_of: dict[int, object] = {}
        self._bypass_spd: list[SpdEntry] = bypass_entries(bypass)

    # -- SPD ----------------------------------------------------------------
    def apply_view(self, view: NodeView) -> None:
        """The view's entries: per peer, per remote subnet and local subnet of its version (or
        any address): the controller's action for the pair (RFC 4301 §4.4.1): PROTECT through
        the peer's SAs, BYPASS in the clear (no route into the TUN either), or DISCARD."""
        pol = []
        for p in view.peers:
            for rnet in p.subnets:
                locals_ = [n for n in view.subnets if n.version == rnet.version] or \
                          [_ANY4 if rnet.version == 4 else _ANY6]
                action = _ACTIONS.get(p.policy.action, Action.PROTECT)
                for lnet in locals_:
                    pol.append(SpdEntry(local=lnet, remote=rnet, action=action,
                                        peer=p.name if action is Action.PROTECT else None,
                                        mode=p.policy.mode, name=f"view:{p.name}"))
        self._view_spd = pol
        self.rebuild(view)

    def rebuild(self, view: NodeView) -> None:
        """Rebuild the SPD from bypass, CHILD_SA and view entries; then the bundles and MTU."""
        child = []
        sa_of: dict[int, object] = {}
        for sending in self.sad.sending.values():
            for ch in sending:  # every sending CHILD_SA of the peer, each with its own selectors
                if ch.narrow is not None:  # protocol / ports negotiated (RFC 7296 §2.9)
                    mine = list(ch.narrow)
                else:
                    mine = [SpdEntry(local=loc, remote=r, action=Action.PROTECT, peer=ch.peer, mode=ch.mode,
                                     name=f"child:{ch.peer}")
                            for r in ch.remote_ts for loc in ch.local_ts if loc.version == r.version]
                for e in mine:
                    sa_of[id(e)] = ch
                child += mine
        self._sa_of = sa_of
        spd = child + self._view_spd
        # Most specific first (remote prefix, then local prefix); stable for equal lengths.
        spd.sort(key=lambda e: (-e.remote.prefixlen, -e.local.prefixlen, e.protocol is None,
                                e.local_ports is None and e.remote_ports is None))
        self.spd.replace(self._bypass_spd + spd)  # BYPASS first, whatever its prefix length
        self._compute_bundles(view)

    def sa_for(self, e: SpdEntry):
        """The CHILD_SA that carries PROTECT entry ``e`` (RFC 4301 §5.1): for a CHILD_SA's own
        entry that SA; for a view entry the peer's newest sending SA whose address selectors
        cover the whole entry; None when none does (the caller asks for one). Cached per
        entry until the next ``rebuild``: the packet path asks once per batch group."""
        sa_of = self._sa_of
        k = id(e)
        if k in sa_of:
            return sa_of[k]
        ch = next((c for c in self.sad.sending.get(e.peer, ()) if c.covers(e.local, e.remote)), None)
        sa_of[k] = ch
        return ch

    # -- SA bundles and MTU ------------------------------------------------
    def carrier(self, dst: str, exclude: str | None) -> str | None:
        """The peer whose PROTECT entry covers our own output to ``dst`` (ESP or IKE towards
        ``exclude``, a peer reachable only through another peer's tunnel), else None.
        First match in SPD order, skipping ``exclude``'s own entries (they describe the
        traffic inside its SA, not the SA's packets)."""
        try:
            d = ipaddress.ip_address(dst)
            src = ipaddress.ip_address(self.local_address)
        except ValueError:
            return None
        for e in self.spd.entries:
            if e.peer == exclude or e.remote is None or d.version != e.remote.version or d not in e.remote:
                continue
            if e.local is not None and src not in e.local and not any(
                    ipaddress.ip_address(v) in e.local for v in self.local_ips if ":" not in v or d.version == 6):
                continue
            return e.peer if e.action is Action.PROTECT else None
        return None

    def _compute_bundles(self, view: NodeView) -> None:
        """Link every CHILD_SA whose output another peer's PROTECT entry covers (SA bundle,
        RFC 4301 §4.5 iterated processing) and recompute overheads and the TUN MTU."""
        children = self.sad.children.values()
        current = self.sad.current
        for ch in children:
            ch.via = self.carrier(ch.remote[0], ch.peer)
            if ch.protocol == "ah":
                ch.overhead = pk.ah_overhead(ch.algorithms, mode=ch.mode, outer_v6=":" in ch.remote[0])
            else:
                ch.overhead = pk.esp_overhead(ch.algorithms, mode=ch.mode, udp_encap=ch.udp_encap,
                                              outer_v6=":" in ch.remote[0])
        # inner packets of a tunnel may carry SAs / IKE of another peer for us: peel them there
        self.nest_in = any(ch.via is not None for ch in children) or (
            any(p.policy.mode == "transport" for p in view.peers)
            and any(ch.mode == "tunnel" for ch in children))
        worst = 0
        for ch in children:
            total, cur, seen = 0, ch, set()
            while cur is not None and cur.peer not in seen:
                seen.add(cur.peer)
                total += cur.overhead + (cur.ah.overhead if cur.ah is not None else 0)
                cur = current.get(cur.via) if cur.via else None
            worst = max(worst, total)
            if self.underlay_mtu:
                ch.max_inner = self.underlay_mtu - total
        if self.underlay_mtu and self.auto_mtu:
            floor = 1280 if any(n.version == 6 for c in children for n in c.remote_ts) else 576
            want = max(floor, self.underlay_mtu - (worst or 73))
            if want != self.tun_mtu and self.routes is not None:
                try:
                    self.routes.set_mtu(want)
                    self.log.info("TUN MTU %d -> %d (underlay %d, largest bundle overhead %d)", self.tun_mtu,
                                  want, self.underlay_mtu, worst)
                    self.tun_mtu = want
                except Exception as exc:
                    self.log.error("%s", exc)

    def clamp(self, p: bytes, counters: dict) -> bytes:
        """``p`` with its TCP MSS (SYN / SYN-ACK) clamped to the smallest path through the
        current SAs (counter ``mss_clamped``); other packets unchanged."""
        # fast reject: only TCP can carry an MSS option (IPv4 protocol byte 9, IPv6 next header 6)
        v = p[0] >> 4 if p else 0
        if (v == 4 and p[9] == 6) or (v == 6 and len(p) > 6 and p[6] == 6):
            current = self.sad.current
            mtu = min(self.tun_mtu, *(c.max_inner for c in current.values())) if current else self.tun_mtu
            q = pk.clamp_mss(p, mtu - (40 if v == 4 else 60))
            if q is not p:
                counters["mss_clamped"] += 1
            return q
        return p

    # -- routes -------------------------------------------------------------
    def sync_routes(self, view: NodeView) -> None:
        """Routes into the TUN: the PROTECT/DISCARD peers' subnets and the CHILD_SAs' remote
        selectors, with our own address and tunnel-mode peers' endpoints carved out."""
        if self.routes is None:
            return
        nets = set()
        for p in view.peers:
            if p.policy.action != "bypass":  # BYPASS traffic keeps the normal routes, in the clear
                nets.update(p.subnets)
        for sending in self.sad.sending.values():
            for ch in sending:
                nets.update(ch.remote_ts)  # e.g. a remote host's virtual IP, routed back through its SA
        # what we exchange IKE/ESP with in the clear must never be routed into another peer's
        # tunnel: our own address and tunnel-mode peers' endpoints. Not carved out: a
        # transport-mode peer's address (captured on purpose; a host behind a gateway is
        # reached through that gateway's SA) and an endpoint inside the peer's own subnets
        # (a remote host whose tunnel protects its own address, RFC 4301 case 4)
        keep = {self.local_address}
        for p in view.peers:
            if p.policy.mode != "tunnel":
                continue
            for e in p.endpoints:
                try:
                    ip = ipaddress.ip_address(e)
                except ValueError:
                    continue
                if not any(ip.version == n.version and ip in n for n in p.subnets):
                    keep.add(e)
        # fail closed: BYPASS peers' subnets leave the RouteManager's guard table (cleartext on purpose)
        cleartext = {n for p in view.peers if p.policy.action == "bypass" for n in p.subnets}
        self.routes.sync(nets, keep_out=keep, cleartext=cleartext)
