"""Security Association Database (RFC 4301 §4.4.2): the one table of installed
CHILD_SAs, ESP and AH alike.

Each row (``ChildEntry``) is one CHILD_SA: both directions' SA objects
(EspSa/AhSa), its traffic selectors, peer, mode, encapsulation and the SA
bundle links the policy computes (``via``: the peer whose SA carries our
output; ``ah``: the AH SA outside an "ah+esp" ESP SA). Rows are found
inbound by SPI (unique per receiver: we chose it) and outbound by traffic
selectors: a peer may have several CHILD_SAs, each carrying only its own
selectors (RFC 4301 §4.4.1.1, §5.1); ``sending`` lists the ones that send
(``relink``), ``current`` the newest of them (bundles, MSS, status). During a
rekey the new row sits beside the old one, so both receive until the old one is
deleted, while sending of the old one's selectors switches to its successor in
one step (RFC 7296 §2.8).

Pure: no I/O, no clock (ages are computed from a ``now`` the caller gives).
"""
from __future__ import annotations

from dataclasses import dataclass, field

_FLOW = ("packets_in", "packets_out", "bytes_in", "bytes_out")


@dataclass
class ChildEntry:
    """One installed CHILD_SA: both directions, its selectors and accounting.

    ``in_sa``/``out_sa``: EspSa or AhSa (``protocol`` "esp"/"ah"); ``local_ts``/
    ``remote_ts``: networks; ``remote``: (ip, port) the SA's packets go to;
    ``established``: monotonic seconds, ``established_wall``: Unix seconds."""

    peer: str
    ike_spi_i: int
    ike_spi_r: int
    inbound_spi: int
    outbound_spi: int
    in_sa: object
    out_sa: object
    local_ts: tuple
    remote_ts: tuple
    remote: tuple[str, int]
    mode: str
    udp_encap: bool
    algorithms: str
    established: float  # monotonic seconds
    established_wall: float
    drops: dict = field(default_factory=lambda: {"policy": 0})
    protocol: str = "esp"
    via: str | None = None  # peer whose SA carries our output (SA bundle, iterated processing)
    # "ah+esp" (RFC 4301 §4.5): the ESP entry needs the peer's AH SA outside it, both ways
    needs_ah: bool = False
    ah: "ChildEntry | None" = None
    # SPD entries with the negotiated protocol/ports (RFC 7296 §2.9) when they narrow the
    # addresses (None: addresses alone decide, the fast path)
    narrow: tuple | None = None
    overhead: int = 0  # bytes this SA adds (worst case)
    # CHILD_SA rekey we responded to (RFC 7296 §2.8): the old SA's inbound SPI; this SA sends only
    # once that one is gone, because the initiator may not have installed its new inbound SA yet
    send_after: int | None = None
    max_inner: int = 65535  # largest inner packet that fits the underlay MTU through the whole bundle
    rekey_of: int | None = None  # inbound SPI of the CHILD_SA this one rekeyed (it takes over its selectors)

    @property
    def selector_key(self) -> tuple:
        """What the SA carries: its address selectors and narrowed protocol/ports."""
        return (self.protocol, self.local_ts, self.remote_ts, self.narrow)

    def covers(self, local, remote) -> bool:
        """Whether every address pair of the networks ``local`` x ``remote`` (outbound view;
        None = any) lies inside one pair of this SA's address selectors."""
        if local is None or remote is None:
            return False
        lv, rv = local.version, remote.version
        return (any(n.version == lv and local.subnet_of(n) for n in self.local_ts)
                and any(n.version == rv and remote.subnet_of(n) for n in self.remote_ts))

    def overlaps(self, local, remote) -> bool:
        """Whether some address pair of ``local`` x ``remote`` lies inside this SA's selectors."""
        if local is None or remote is None:
            return True
        return (any(n.version == local.version and n.overlaps(local) for n in self.local_ts)
                and any(n.version == remote.version and n.overlaps(remote) for n in self.remote_ts))

    @property
    def describe(self) -> str:
        encap = "udp" if self.udp_encap else "none"
        d = f"{self.protocol}/{self.mode}/{encap} {self.outbound_spi:08x}_o"
        if self.ah is not None:
            d += f" + {self.ah.describe}"
        return d

    def status(self, now: float) -> dict:
        """JSON-ready row (no keys); ``now`` on the clock of ``established``."""
        c_in = dict(getattr(self.in_sa, "counters", {}) or {})
        c_out = dict(getattr(self.out_sa, "counters", {}) or {})
        drops = self.drop_counts()
        return {
            "peer": self.peer,
            "ike_spi_i": f"{self.ike_spi_i:016x}", "ike_spi_r": f"{self.ike_spi_r:016x}",
            "spi_in": f"{self.inbound_spi:08x}", "spi_out": f"{self.outbound_spi:08x}",
            "mode": self.mode, "protocol": self.protocol, "udp_encap": self.udp_encap,
            "ah": f"{self.ah.outbound_spi:08x}" if self.ah is not None else None,
            "encapsulation": "udp" if self.udp_encap else "none", "via": self.via, "overhead": self.overhead,
            "remote": f"{self.remote[0]}:{self.remote[1]}",
            "local_ts": [str(n) for n in self.local_ts], "remote_ts": [str(n) for n in self.remote_ts],
            "algorithms": self.algorithms,
            "established": self.established_wall, "age_s": round(now - self.established, 3),
            "packets_in": c_in.get("packets_in", 0), "bytes_in": c_in.get("bytes_in", 0),
            "packets_out": c_out.get("packets_out", 0), "bytes_out": c_out.get("bytes_out", 0),
            "drops": drops,
            "lifetime": self.lifetime(),
        }

    def drop_counts(self) -> dict[str, int]:
        """Non-zero drop counters of this CHILD_SA: its own and both directions' (replay, icv, ...)."""
        drops = {k: v for k, v in self.drops.items() if v}
        for sa in (self.in_sa, self.out_sa):
            for k, v in (getattr(sa, "counters", {}) or {}).items():
                if k not in _FLOW and isinstance(v, int) and v:
                    drops[k] = drops.get(k, 0) + v
        return drops

    def lifetime(self) -> dict | None:
        """Byte/packet lifetimes (RFC 4301 §4.4.2.1) of both directions: limits (0 = none),
        soft limits and use; None if the SAs do not track them."""
        li = getattr(self.in_sa, "lifetime_status", None)
        lo = getattr(self.out_sa, "lifetime_status", None)
        if li is None or lo is None:
            return None
        i, o = li(), lo()
        out = {k: {"limit": o[k]["limit"], "soft_in": i[k]["soft"], "soft_out": o[k]["soft"],
                   "used_in": i[k]["used"], "used_out": o[k]["used"]} for k in ("bytes", "packets")}
        out["expired"] = bool(i["expired"] or o["expired"])
        return out


class Sad:
    """Installed CHILD_SAs: ``children`` (inbound SPI -> ChildEntry, ESP and AH),
    ``sending`` (peer -> the ChildEntries that send to it, one per set of selectors, newest
    first) and ``current`` (peer -> the newest of them). Only this class writes them.
    ``counters``: ``no_sa`` (ESP with an unknown SPI, ``demux_esp``), ``malformed``
    (ESP shorter than its 8-octet header)."""

    def __init__(self) -> None:
        self.children: dict[int, ChildEntry] = {}
        self.current: dict[str, ChildEntry] = {}
        self.sending: dict[str, tuple[ChildEntry, ...]] = {}
        self.counters: dict[str, int] = {"no_sa": 0, "malformed": 0}
        # peer -> summed drop counters of its removed CHILD_SAs (rekeys every few seconds must
        # not make drops such as replay vanish from the status)
        self.retired_drops: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.children)

    def add(self, ch: ChildEntry) -> ChildEntry | None:
        """Install ``ch`` and make the peer's newest SA the sending one. If its inbound SPI
        is already installed nothing changes and the installed row is returned (the caller
        reports the clash), else None."""
        old = self.children.get(ch.inbound_spi)
        if old is not None:
            return old
        self.children[ch.inbound_spi] = ch
        self.relink(ch.peer)
        return None

    def remove(self, ch: ChildEntry) -> bool:
        """Remove ``ch`` (if it is the row installed under its SPI); the peer's next newest
        SA, if any, sends from now on. Returns whether it was installed."""
        if self.children.get(ch.inbound_spi) is not ch:
            return False
        del self.children[ch.inbound_spi]
        acc = self.retired_drops.setdefault(ch.peer, {})
        for k, v in ch.drop_counts().items():
            acc[k] = acc.get(k, 0) + v
        self.relink(ch.peer)
        return True

    def lookup(self, spi: int, protocol: str | None = None) -> ChildEntry | None:
        """The row for inbound ``spi`` (and ``protocol`` "esp"/"ah" when given), else None."""
        ch = self.children.get(spi)
        if ch is None or (protocol is not None and ch.protocol != protocol):
            return None
        return ch

    def of_peer(self, peer: str) -> list[ChildEntry]:
        return [c for c in self.children.values() if c.peer == peer]

    def of_ike_sa(self, spi_i: int, spi_r: int) -> list[ChildEntry]:
        """The CHILD_SAs negotiated by the IKE_SA ``spi_i``/``spi_r``."""
        return [c for c in self.children.values() if c.ike_spi_i == spi_i and c.ike_spi_r == spi_r]

    def relink(self, peer: str) -> None:
        """The SAs that send to ``peer``: per set of selectors the newest ESP one (with the newest
        AH one outside it for "ah+esp"), or the newest AH ones for an AH-only policy. A CHILD_SA
        that was rekeyed (another row names it in ``rekey_of``) no longer sends: its successor
        carries its selectors (RFC 7296 §2.8)."""
        rows = self.of_peer(peer)
        # a successor rekeyed by the peer waits for the old SA's Delete (send_after): the old one
        # keeps sending until then, because the initiator may not have our new inbound SA yet
        waiting = {c.inbound_spi for c in rows if c.send_after is not None and c.send_after in self.children}
        mine = sorted((c for c in rows if c.inbound_spi not in waiting), key=lambda c: c.established, reverse=True)
        rekeyed = {c.rekey_of for c in mine if c.rekey_of is not None}
        ah = next((c for c in mine if c.protocol == "ah"), None)
        for c in mine:
            c.ah = None
        kind = "esp" if any(c.protocol == "esp" for c in mine) else "ah"
        seen: set = set()
        send = []
        for c in mine:
            if c.protocol != kind or c.inbound_spi in rekeyed:
                continue
            key = c.selector_key
            if key in seen:
                continue  # an older SA for the same selectors (e.g. a duplicate): the newest sends
            seen.add(key)
            if c.needs_ah:
                c.ah = ah
            send.append(c)
        if not send:
            self.current.pop(peer, None)
            self.sending.pop(peer, None)
        else:
            self.current[peer] = send[0]
            self.sending[peer] = tuple(send)

    def demux_esp(self, esp_packets: list[bytes]) -> list[tuple[ChildEntry, list[bytes]]]:
        """Group ESP packets (from the SPI on) by inbound ESP CHILD_SA, keeping order per SA.

        Packets shorter than 8 bytes count as ``malformed``, unknown SPIs (or an AH SA's
        SPI) as ``no_sa`` (RFC 4303 §3.4.2: discard, auditable event). Never raises."""
        c = self.counters
        if len(esp_packets) == 1 and len(esp_packets[0]) >= 8:  # one packet: no grouping needed
            ch = self.children.get(int.from_bytes(esp_packets[0][:4], "big"))
            if ch is None or ch.protocol != "esp":
                c["no_sa"] += 1
                return []
            return [(ch, esp_packets)]
        groups: dict[bytes, list[bytes]] = {}
        for p in esp_packets:
            if len(p) < 8:
                c["malformed"] += 1
                continue
            key = p[:4]
            g = groups.get(key)
            if g is None:
                g = groups[key] = []
            g.append(p)
        out = []
        children = self.children
        for key, pkts in groups.items():
            ch = children.get(int.from_bytes(key, "big"))
            if ch is None or ch.protocol != "esp":
                c["no_sa"] += len(pkts)
                continue
            out.append((ch, pkts))
        return out
