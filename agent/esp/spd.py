"""Security Policy Database (RFC 4301 §4.4.1), a simple ordered form.

Entries are matched in order on the packet's local (source) and remote
(destination) address prefixes, IP protocol and port ranges; the first match
wins, else a default entry (BYPASS or DISCARD). The common mesh policy uses
addresses only; then lookups are cached by (source, destination).
``allows_inbound`` is the RFC 4301 §5.2 check of a decrypted packet against
the CHILD_SA's traffic selectors.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from agent.model import IPNetwork

_PORT_PROTOCOLS = frozenset((6, 17, 132, 136))  # TCP, UDP, SCTP, UDP-Lite
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

    ``local``/``remote``: prefixes (outbound: source/destination);
    ``protocol``: IP protocol number; ``local_ports``/``remote_ports``:
    inclusive (low, high) ranges, only with TCP/UDP/SCTP/UDP-Lite.
    PROTECT needs ``peer`` (the peer name whose outbound SA carries it) and a
    ``mode`` ("tunnel"/"transport"). Raises ValueError naming the bad field.
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

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise ValueError(f"SPD entry {self.name!r}: action {self.action!r} is not an Action")
        if self.action is Action.PROTECT and not self.peer:
            raise ValueError(f"SPD entry {self.name!r}: PROTECT needs a peer")
        if self.mode not in ("tunnel", "transport"):
            raise ValueError(f"SPD entry {self.name!r}: mode {self.mode!r}")
        for f in ("local", "remote"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise ValueError(f"SPD entry {self.name!r}: {f} {v!r} is not an IP network")
        if self.local is not None and self.remote is not None and self.local.version != self.remote.version:
            raise ValueError(f"SPD entry {self.name!r}: local {self.local} and remote {self.remote} differ in IP version")
        if self.protocol is not None and not 0 <= self.protocol <= 255:
            raise ValueError(f"SPD entry {self.name!r}: protocol {self.protocol}")
        for f in ("local_ports", "remote_ports"):
            r = getattr(self, f)
            if r is None:
                continue
            if self.protocol not in _PORT_PROTOCOLS:
                raise ValueError(f"SPD entry {self.name!r}: {f} needs protocol TCP, UDP, SCTP or UDP-Lite")
            if len(r) != 2 or not 0 <= r[0] <= r[1] <= 65535:
                raise ValueError(f"SPD entry {self.name!r}: {f} {r!r} is not a (low, high) port range")

    @property
    def addresses_only(self) -> bool:
        return self.protocol is None and self.local_ports is None and self.remote_ports is None


def _net(n: IPNetwork | None) -> tuple[int, int, int]:
    if n is None:
        return 0, 0, 0
    return n.version, int(n.network_address), int(n.netmask)


def parse_selectors(packet: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(version, src, dst, protocol, src port, dst port) of an IP packet.

    Addresses as ints; ports -1 when absent (other protocols, non-first
    fragments, truncated). None if the packet is not a parseable IPv4/IPv6.
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
        self._ts_cache: dict[tuple, tuple] = {}
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
            lv, ln, lm = _net(e.local)
            rv, rn, rm = _net(e.remote)
            lp = e.local_ports or (-1, -1)
            rp = e.remote_ports or (-1, -1)
            comp.append((lv or rv, ln, lm, rn, rm, -1 if e.protocol is None else e.protocol,
                         lp[0], lp[1], rp[0], rp[1], e))
        self._compiled = comp
        self._addr_only = all(e.addresses_only for e in self._entries)
        self._cache.clear()

    def _match(self, sel: tuple[int, int, int, int, int, int]) -> SpdEntry:
        v, src, dst, proto, sport, dport = sel
        for ev, ln, lm, rn, rm, pr, lplo, lphi, rplo, rphi, e in self._compiled:
            if (ev and ev != v) or (src & lm) != ln or (dst & rm) != rn:
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
        return self._match(sel)

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
        return list(groups.values())

    def _compile_ts(self, ts: Sequence[IPNetwork]) -> tuple:
        key = tuple(ts)
        c = self._ts_cache.get(key)
        if c is None:
            c = tuple(_net(n) for n in key)
            if len(self._ts_cache) >= 1024:
                self._ts_cache.clear()
            self._ts_cache[key] = c
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
