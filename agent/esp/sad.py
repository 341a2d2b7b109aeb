"""Security Association Database (RFC 4301 §4.4.2), ESP and AH SAs.

Inbound SAs are found by SPI (the SPI is unique per receiver here, we chose
it), optionally checked against the destination address and protocol they
were installed with (RFC 4301 §4.4.2: SPI, destination, protocol); outbound
by peer name: the peer's current SA. During a rekey the new
inbound SA is added beside the old one, so both decrypt until the old one is
removed; the outbound SA is switched in one step (RFC 7296 §2.8).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import ipaddress

from agent.esp.sa import EspSa


class SadEntry(NamedTuple):
    """One SAD row: ``direction`` "in" or "out", the peer name, the SA."""

    direction: str
    peer: str
    sa: EspSa


class Sad:
    """Inbound by SPI, outbound by peer. ``counters["no_sa"]``: inbound packets
    with an unknown SPI (``demux_inbound``)."""

    def __init__(self) -> None:
        self._in: dict[int, EspSa] = {}
        self._in_peer: dict[int, str] = {}
        self._in_dst: dict[int, bytes] = {}
        self._out: dict[str, EspSa] = {}
        self.counters: dict[str, int] = {"no_sa": 0, "malformed": 0}

    def add_inbound(self, peer: str, sa: EspSa, *, dst: str | bytes | None = None) -> None:
        """Install an inbound SA (EspSa or AhSa); ``dst``: our address it is
        bound to (then ``lookup_inbound`` with another destination misses).
        ValueError if its SPI is already installed or ``dst`` is no address."""
        if sa.spi in self._in:
            raise ValueError(f"inbound SPI 0x{sa.spi:08x} already installed (peer {self._in_peer[sa.spi]})")
        if dst is not None:
            self._in_dst[sa.spi] = dst if isinstance(dst, bytes) else ipaddress.ip_address(dst).packed
        self._in[sa.spi] = sa
        self._in_peer[sa.spi] = peer

    def set_outbound(self, peer: str, sa: EspSa) -> EspSa | None:
        """Make ``sa`` the peer's outbound SA; returns the one it replaces."""
        old = self._out.get(peer)
        self._out[peer] = sa
        return old

    def install(self, peer: str, inbound: EspSa, outbound: EspSa) -> EspSa | None:
        """Both halves of a CHILD_SA; returns the replaced outbound SA (rekey)."""
        self.add_inbound(peer, inbound)
        return self.set_outbound(peer, outbound)

    def remove_inbound(self, spi: int) -> EspSa | None:
        self._in_peer.pop(spi, None)
        self._in_dst.pop(spi, None)
        return self._in.pop(spi, None)

    def remove_outbound(self, peer: str, spi: int | None = None) -> EspSa | None:
        """Remove the peer's outbound SA (only if its SPI is ``spi``, when given)."""
        sa = self._out.get(peer)
        if sa is None or (spi is not None and sa.spi != spi):
            return None
        return self._out.pop(peer)

    def remove_peer(self, peer: str) -> list[EspSa]:
        """Remove every SA of ``peer``; returns them."""
        gone = [self._in.pop(s) for s, p in list(self._in_peer.items()) if p == peer]
        for sa in gone:
            del self._in_peer[sa.spi]
            self._in_dst.pop(sa.spi, None)
        out = self._out.pop(peer, None)
        if out is not None:
            gone.append(out)
        return gone

    def lookup_inbound(self, spi: int, dst: str | bytes | None = None,
                       protocol: str | None = None) -> EspSa | None:
        """The inbound SA for ``spi``; with ``dst`` (our address the packet was
        sent to) and/or ``protocol`` ("esp"/"ah") the SA must match them too
        (RFC 4301 §4.4.2). None when nothing matches."""
        sa = self._in.get(spi)
        if sa is None:
            return None
        if protocol is not None and getattr(sa, "protocol", "esp") != protocol:
            return None
        if dst is not None:
            bound = self._in_dst.get(spi)
            if bound is not None and bound != (dst if isinstance(dst, bytes) else ipaddress.ip_address(dst).packed):
                return None
        return sa

    def inbound_peer(self, spi: int) -> str | None:
        return self._in_peer.get(spi)

    def lookup_outbound(self, peer: str) -> EspSa | None:
        return self._out.get(peer)

    def demux_inbound(self, esp_packets: list[bytes]) -> list[tuple[EspSa, list[bytes]]]:
        """Group ESP packets by inbound SA, keeping order per SA.

        Packets shorter than 8 bytes count as ``malformed``, unknown SPIs as
        ``no_sa`` (RFC 4303 §3.4.2: discard, auditable event). Never raises.
        """
        groups: dict[bytes, list[bytes]] = {}
        c = self.counters
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
        for key, pkts in groups.items():
            sa = self._in.get(int.from_bytes(key, "big"))
            if sa is None:
                c["no_sa"] += len(pkts)
                continue
            out.append((sa, pkts))
        return out

    def __iter__(self) -> Iterator[SadEntry]:
        for spi, sa in self._in.items():
            yield SadEntry("in", self._in_peer[spi], sa)
        for peer, sa in self._out.items():
            yield SadEntry("out", peer, sa)

    def __len__(self) -> int:
        return len(self._in) + len(self._out)

    def status(self) -> list[dict]:
        """JSON-ready rows (no keys): direction, peer, spi, algorithm, counters."""
        return [{"direction": e.direction, "peer": e.peer, "spi": f"0x{e.sa.spi:08x}",
                 "algorithm": e.sa.transform.name, "esn": e.sa.esn, "mode": e.sa.mode,
                 "seq_out": e.sa.seq_out, "replay_top": e.sa.replay.top,
                 "needs_rekey": e.sa.needs_rekey, "counters": dict(e.sa.counters)} for e in self]
