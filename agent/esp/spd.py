"""Security Policy Database (RFC 4301 §4.4.1), an ordered, decorrelation-free form.

Entries are matched in order on the packet's local (source) and remote
(destination) address prefixes (one prefix or a list), IP protocol and port
ranges, ICMP type/code (RFC 4301 §4.4.1.1: carried in the local/remote port
selectors); the first match wins, else a default entry (BYPASS or DISCARD).
PROTECT entries name the peer whose CHILD_SA carries the traffic; the SA
bundle (RFC 4301 §4.5) is the datapath's (agent.datapath.policy). Lookups are cached by (source, destination) when
every entry selects on addresses only, else by the full selector tuple.
``allows_inbound`` is the RFC 4301 §5.2 check of a decrypted packet against
the CHILD_SA's traffic selectors; ``entry_allows`` the same against one
entry's selectors incl. protocol and ports. ``bypass_entries`` makes the
control-plane BYPASS entries.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from enum import Enum
from typing import Iterable, Sequence

from agent.model import IPNetwork

_PORT_PROTOCOLS = frozenset((6, 17, 132, 136))  # TCP, UDP, SCTP, UDP-Lite
_ICMP_PROTOCOLS = frozenset((1, 58))  # ICMP, IPv6-ICMP: type/code in the port selectors
_V6_EXT = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_CACHE_MAX = 65536


class Action(str, Enum):
    """RFC 4301 §4.4.1 processing choices."""

    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


@dataclass(frozen=True)
class SpdEntry:
    """One SPD rule. ``None`` selectors match anything.

    ``local``/``remote``: a prefix or a tuple of prefixes (outbound:
    source/destination; one IP version per entry); ``protocol``: IP protocol
    number; ``local_ports``/``remote_ports``: inclusive (low, high) ranges,
    with TCP/UDP/SCTP/UDP-Lite, or with ICMP/IPv6-ICMP the type and code
    ranges (RFC 4301 §4.4.1.1); ``icmp_type``/``icmp_code`` are shorthands
    that set those ranges to one value.
    PROTECT needs ``peer`` (the peer name whose outbound SA carries it) and a
    ``mode`` ("tunnel"/"transport").
    Raises ValueError naming the bad field.
    """

    local: IPNetwork | None = None
    remote: IPNetwork | None = None
    protocol: int | None = None
    local_ports: tuple[int, int] | None = None
    remote_ports: tuple[int, int] | None = None
    action: Action = Action.PROTECT
    peer: str | None = None
    mode: str = "tunnel"
    name: str = ""
    icmp_type: int | None = None
    icmp_code: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise ValueError(f"SPD entry {self.name!r}: action {self.action!r} is not an Action")
        if self.action is Action.PROTECT and not self.peer:
            raise ValueError(f"SPD entry {self.name!r}: PROTECT needs a peer")
        if self.mode not in ("tunnel", "transport"):
            raise ValueError(f"SPD entry {self.name!r}: mode {self.mode!r}")
        versions = set()
        for f in ("local", "remote"):
            v = getattr(self, f)
            if v is None:
                continue
            nets = v if isinstance(v, tuple) else (v,)
            if not nets:
                raise ValueError(f"SPD entry {self.name!r}: {f} is an empty list (use None for any)")
            for n in nets:
                if not isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                    raise ValueError(f"SPD entry {self.name!r}: {f} {n!r} is not an IP network")
                versions.add(n.version)
        if len(versions) > 1:
            raise ValueError(f"SPD entry {self.name!r}: local {self.local} and remote {self.remote} differ in IP version")
        if self.protocol is not None and not 0 <= self.protocol <= 255:
            raise ValueError(f"SPD entry {self.name!r}: protocol {self.protocol}")
        for f, pf in (("icmp_type", "local_ports"), ("icmp_code", "remote_ports")):
            t = getattr(self, f)
            if t is None:
                continue
            if self.protocol not in _ICMP_PROTOCOLS:
                raise ValueError(f"SPD entry {self.name!r}: {f} needs protocol 1 (ICMP) or 58 (IPv6-ICMP)")
            if not 0 <= t <= 255:
                raise ValueError(f"SPD entry {self.name!r}: {f} {t} is not 0..255")
            if getattr(self, pf) not in (None, (t, t)):
                raise ValueError(f"SPD entry {self.name!r}: give {f} or {pf}, not both")
            object.__setattr__(self, pf, (t, t))
        for f in ("local_ports", "remote_ports"):
            r = getattr(self, f)
            if r is None:
                continue
            if self.protocol in _ICMP_PROTOCOLS:
                hi = 255
            elif self.protocol in _PORT_PROTOCOLS:
                hi = 65535
            else:
                raise ValueError(f"SPD entry {self.name!r}: {f} needs protocol TCP, UDP, SCTP, UDP-Lite "
                                 f"(ports) or ICMP/IPv6-ICMP (type/code)")
            if not isinstance(r, tuple) or len(r) != 2 or not 0 <= r[0] <= r[1] <= hi:
                what = "type/code" if hi == 255 else "port"
                raise ValueError(f"SPD entry {self.name!r}: {f} {r!r} is not a (low, high) {what} range in 0..{hi}")
        # Hashed once: the packet path counts hits per entry (a dict keyed by the entry), and
        # hashing the networks again per batch cost several ipaddress.__hash__ calls (issue 8).
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))
        object.__setattr__(self, "_local_c", _nets(self.local))  # compiled selectors (entry_allows)
        object.__setattr__(self, "_remote_c", _nets(self.remote))

    def __hash__(self) -> int:  # equal to the generated one's value semantics: all fields
        return self._hash

    @property
    def local_nets(self) -> tuple[IPNetwork, ...]:
        return () if self.local is None else self.local if isinstance(self.local, tuple) else (self.local,)

    @property
    def remote_nets(self) -> tuple[IPNetwork, ...]:
        return () if self.remote is None else self.remote if isinstance(self.remote, tuple) else (self.remote,)

    @property
    def specificity(self) -> tuple:
        """Sort key, most specific first: longest remote prefix, longest local
        prefix, then protocol and port/type selectors present."""
        return (-max((n.prefixlen for n in self.remote_nets), default=-1),
                -max((n.prefixlen for n in self.local_nets), default=-1),
                self.protocol is None, self.local_ports is None and self.remote_ports is None)

    @property
    def addresses_only(self) -> bool:
        return self.protocol is None and self.local_ports is None and self.remote_ports is None


def _net(n: IPNetwork | None) -> tuple[int, int, int]:
    if n is None:
        return 0, 0, 0
    return n.version, int(n.network_address), int(n.netmask)


def _nets(sel) -> tuple[tuple[int, int, int], ...] | None:
    if sel is None:
        return None
    return tuple(_net(n) for n in (sel if isinstance(sel, tuple) else (sel,)))


def _in(nets, v: int, a: int) -> bool:
    for tv, n, m in nets:
        if tv == v and a & m == n:
            return True
    return False


def parse_selectors(packet: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(version, src, dst, protocol, src port, dst port) of an IP packet.

    Addresses as ints; ports -1 when absent (other protocols, non-first
    fragments, truncated); for ICMP / IPv6-ICMP the "ports" are the type and
    code (RFC 4301 §4.4.1.1). None if the packet is not a parseable IPv4/IPv6.
    """
    n = len(packet)
    if n < 20:
        return None
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or n < ihl:
            return None
        proto = packet[9]
        src = int.from_bytes(packet[12:16], "big")
        dst = int.from_bytes(packet[16:20], "big")
        off = ihl
        first = not (packet[6] & 0x1F or packet[7])
    elif v == 6:
        if n < 40:
            return None
        proto = packet[6]
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
        off = 40
        first = True
        for _ in range(8):  # bounded walk over extension headers
            if proto in _V6_EXT:
                if n < off + 2:
                    break
                proto, off = packet[off], off + (packet[off + 1] + 1) * 8
            elif proto == 44:  # fragment header
                if n < off + 8:
                    break
                first = not ((packet[off + 2] << 8 | packet[off + 3]) & 0xFFF8)
                proto, off = packet[off], off + 8
            else:
                break
    else:
        return None
    if first and proto in _PORT_PROTOCOLS and n >= off + 4:
        return v, src, dst, proto, packet[off] << 8 | packet[off + 1], packet[off + 2] << 8 | packet[off + 3]
    if first and proto in _ICMP_PROTOCOLS and n >= off + 2 and proto == (1 if v == 4 else 58):
        return v, src, dst, proto, packet[off], packet[off + 1]
    return v, src, dst, proto, -1, -1


class Spd:
    """Ordered SPD with a default action (BYPASS or DISCARD).

    ``lookup_outbound(packet)`` -> first matching SpdEntry, ``default_entry``
    when none match, ``malformed_entry`` (DISCARD) for unparseable packets.
    """

    def __init__(self, entries: Iterable[SpdEntry] = (), *, default: Action = Action.DISCARD) -> None:
        if default not in (Action.BYPASS, Action.DISCARD):
            raise ValueError(f"SPD default action must be BYPASS or DISCARD, got {default!r}")
        self.default_entry = SpdEntry(action=default, name="default")
        self.malformed_entry = SpdEntry(action=Action.DISCARD, name="malformed")
        self._entries: list[SpdEntry] = []
        self._compiled: list[tuple] = []
        self._cache: dict[bytes, SpdEntry] = {}
        self._sel_cache: dict[tuple, SpdEntry] = {}
        self._ts_cache: dict = {}  # id(tuple) or tuple(list) -> (selectors, compiled)
        # packets matched per entry (by id(entry)), counted by group_outbound / count_hit
        self.hits: dict[int, int] = {}
        self._rebuild()  # an SPD with no entries is total too (lookups give default_entry)
        for e in entries:
            self.add(e)

    @property
    def entries(self) -> tuple[SpdEntry, ...]:
        return tuple(self._entries)

    def add(self, entry: SpdEntry, index: int | None = None) -> None:
        """Insert ``entry`` at ``index`` (default: last)."""
        if index is None:
            self._entries.append(entry)
        else:
            self._entries.insert(index, entry)
        self._rebuild()

    def remove(self, entry: SpdEntry) -> bool:
        """Remove ``entry`` (by equality); False if absent."""
        try:
            self._entries.remove(entry)
        except ValueError:
            return False
        self._rebuild()
        return True

    def remove_peer(self, peer: str) -> int:
        """Remove all PROTECT entries for ``peer``; returns how many."""
        before = len(self._entries)
        self._entries = [e for e in self._entries if e.peer != peer]
        self._rebuild()
        return before - len(self._entries)

    def replace(self, entries: Iterable[SpdEntry]) -> None:
        self._entries = list(entries)
        self._rebuild()

    def _rebuild(self) -> None:
        comp = []
        for e in self._entries:
            ln, rn = _nets(e.local), _nets(e.remote)
            ev = (ln or rn or ((0, 0, 0),))[0][0]
            lp = e.local_ports or (-1, -1)
            rp = e.remote_ports or (-1, -1)
            comp.append((ev, ln, rn, -1 if e.protocol is None else e.protocol,
                         lp[0], lp[1], rp[0], rp[1], e))
        self._compiled = comp
        self._addr_only = all(e.addresses_only for e in self._entries)
        self._cache.clear()
        self._sel_cache.clear()
        self.hits = {}

    def _match(self, sel: tuple[int, int, int, int, int, int]) -> SpdEntry:
        v, src, dst, proto, sport, dport = sel
        for ev, ln, rn, pr, lplo, lphi, rplo, rphi, e in self._compiled:
            if ev and ev != v:
                continue
            if ln is not None and not _in(ln, v, src):
                continue
            if rn is not None and not _in(rn, v, dst):
                continue
            if pr >= 0 and pr != proto:
                continue
            if lplo >= 0 and not lplo <= sport <= lphi:
                continue
            if rplo >= 0 and not rplo <= dport <= rphi:
                continue
            return e
        return self.default_entry

    def lookup_outbound(self, packet: bytes) -> SpdEntry:
        """First entry matching an outbound IP packet (source = local)."""
        if self._addr_only:
            n = len(packet)
            if n >= 20:
                v = packet[0] >> 4
                if v == 4 and not 20 <= (packet[0] & 0x0F) * 4 <= n:
                    return self.malformed_entry  # as parse_selectors: checked before the cache answers
                key = packet[12:20] if v == 4 else packet[8:40] if v == 6 and n >= 40 else None
                if key is not None:
                    e = self._cache.get(key)
                    if e is not None:
                        return e
                    sel = parse_selectors(packet)
                    if sel is None:
                        return self.malformed_entry
                    e = self._match(sel)
                    if len(self._cache) >= _CACHE_MAX:
                        self._cache.clear()
                    self._cache[key] = e
                    return e
        sel = parse_selectors(packet)
        if sel is None:
            return self.malformed_entry
        e = self._sel_cache.get(sel)
        if e is None:
            e = self._match(sel)
            if len(self._sel_cache) >= _CACHE_MAX:
                self._sel_cache.clear()
            self._sel_cache[sel] = e
        return e

    def lookup_inbound(self, packet: bytes) -> SpdEntry:
        """First entry matching an inbound IP packet (source = remote): for a
        packet that arrived in the clear, anything but BYPASS means drop
        (RFC 4301 §5.2, step 3)."""
        sel = parse_selectors(packet)
        if sel is None:
            return self.malformed_entry
        v, src, dst, proto, sp, dp = sel
        if proto in _ICMP_PROTOCOLS:  # type/code are not direction-dependent
            return self._match((v, dst, src, proto, sp, dp))
        return self._match((v, dst, src, proto, dp, sp))

    def entry_allows(self, entry: SpdEntry, inner_packet: bytes, *, inbound: bool = True) -> bool:
        """True if a (decrypted) packet lies within ``entry``'s selectors:
        addresses, protocol and ports/ICMP type-code (RFC 4301 §5.2 step 4);
        inbound swaps local/remote. False for unparseable packets."""
        sel = parse_selectors(inner_packet)
        if sel is None:
            return False
        v, src, dst, proto, sp, dp = sel
        if inbound:
            src, dst = dst, src
            if proto not in _ICMP_PROTOCOLS:
                sp, dp = dp, sp
        ln, rn = entry._local_c, entry._remote_c
        if ln is not None and not _in(ln, v, src):
            return False
        if rn is not None and not _in(rn, v, dst):
            return False
        if entry.protocol is not None and entry.protocol != proto:
            return False
        if entry.local_ports is not None and not entry.local_ports[0] <= sp <= entry.local_ports[1]:
            return False
        if entry.remote_ports is not None and not entry.remote_ports[0] <= dp <= entry.remote_ports[1]:
            return False
        return True

    def count_hit(self, entry: SpdEntry, n: int = 1) -> None:
        """Add ``n`` to ``entry``'s hit counter (see ``status``)."""
        k = id(entry)
        self.hits[k] = self.hits.get(k, 0) + n

    def status(self) -> list[dict]:
        """JSON-ready rows in match order: name, action, selectors, peer, mode, hits."""
        rows = []
        for e in self._entries:
            rows.append({"name": e.name, "action": e.action.value,
                         "local": [str(n) for n in e.local_nets], "remote": [str(n) for n in e.remote_nets],
                         "protocol": e.protocol, "local_ports": e.local_ports, "remote_ports": e.remote_ports,
                         "peer": e.peer, "mode": e.mode, "hits": self.hits.get(id(e), 0)})
        return rows

    def group_outbound(self, packets: list[bytes]) -> list[tuple[SpdEntry, list[bytes]]]:
        """Packets grouped by their matching entry, order kept within a group."""
        groups: dict[int, tuple[SpdEntry, list[bytes]]] = {}
        lookup = self.lookup_outbound
        for p in packets:
            e = lookup(p)
            g = groups.get(id(e))
            if g is None:
                groups[id(e)] = (e, [p])
            else:
                g[1].append(p)
        hits = self.hits
        for k, (_, lst) in groups.items():
            hits[k] = hits.get(k, 0) + len(lst)
        return list(groups.values())

    def _compile_ts(self, ts: Sequence[IPNetwork]) -> tuple:
        # A tuple (immutable, as ChildEntry keeps its selectors) is cached by identity: hashing
        # the networks per call was a visible share of the per-packet cost (issue 8). The entry
        # holds the tuple itself, so its id cannot be reused while cached; lists go by value.
        cache = self._ts_cache
        if type(ts) is tuple:
            hit = cache.get(id(ts))
            if hit is not None and hit[0] is ts:
                return hit[1]
            key = id(ts)
        else:
            key = tuple(ts)
            hit = cache.get(key)
            if hit is not None:
                return hit[1]
        c = tuple(_net(n) for n in ts)
        if len(cache) >= 1024:
            cache.clear()
        cache[key] = (ts, c)
        return c

    def allows_inbound(self, ts_local: Sequence[IPNetwork], ts_remote: Sequence[IPNetwork],
                       inner_packet: bytes) -> bool:
        """True if a decrypted inbound packet lies within the CHILD_SA's traffic
        selectors: source in ``ts_remote`` and destination in ``ts_local``
        (RFC 4301 §5.2). False for unparseable packets."""
        sel = parse_selectors(inner_packet)
        if sel is None:
            return False
        v, src, dst = sel[0], sel[1], sel[2]
        for tv, n, m in self._compile_ts(ts_remote):
            if tv == v and src & m == n:
                break
        else:
            return False
        for tv, n, m in self._compile_ts(ts_local):
            if tv == v and dst & m == n:
                return True
        return False


_ANY = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}


def bypass_entries(prefixes: Iterable) -> list[SpdEntry]:
    """BYPASS entries (RFC 4301 §4.4.1) for control-plane destinations, in the order given:
    any local address -> each prefix (``str`` or network; host bits allowed), named
    ``bypass:<prefix>``. They go ahead of every PROTECT entry (agent.datapath.policy), so
    these destinations stay in the clear even inside a peer's subnets.
    ValueError names a prefix that is not a network."""
    out = []
    for pfx in prefixes:
        try:
            net = ipaddress.ip_network(pfx, strict=False)
        except ValueError as exc:
            raise ValueError(f"bypass prefix {pfx!r}: {exc}; write e.g. 10.96.0.0/12") from None
        out.append(SpdEntry(local=_ANY[net.version], remote=net, action=Action.BYPASS, name=f"bypass:{net}"))
    return out
