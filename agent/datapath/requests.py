"""Requests from the packet path to the IKE side, handed over by the loop after
each batch (never in the middle of one): acquire (RFC 4301 §5.1), CHILD_SA
rekey at a soft limit (RFC 7296 §1.3.3), delete at a hard byte/packet limit
(RFC 4301 §4.4.2.1), unknown-SPI hints. Each is asked once (per CHILD_SA, or
per peer and interval); IKE's answer comes later as events.
"""
from __future__ import annotations

import logging
from typing import Callable

from agent.datapath.hold import HoldQueue
from agent.datapath.ike_core import IkeCore
from agent.esp import Sad
from agent.esp.sad import ChildEntry


class IkeRequests:
    """``view()``: the current NodeView; ``remove_child(ch)``: take a CHILD_SA out of the
    SAD (when IKE no longer knows one that expired); ``internal_error(where, exc)``: count
    and log an unexpected exception; ``counters``: the runtime's counters (shared);
    ``hold``: where the packets of an acquire wait for their CHILD_SA (None: dropped)."""

    ACQUIRE_CHILD_INTERVAL_S = 5.0

    def __init__(self, ike: IkeCore, sad: Sad, counters: dict, *, view: Callable,
                 remove_child: Callable[[ChildEntry], None], internal_error: Callable,
                 log: logging.Logger, hold: HoldQueue | None = None) -> None:
        self.ike = ike
        self.sad = sad
        self.counters = counters
        self.view = view
        self.remove_child = remove_child
        self.internal_error = internal_error
        self.log = log
        self.hold = hold
        self._rekey_asked: set[int] = set()
        self._expired_done: set[int] = set()
        self._child_acquired_at: dict[str, float] = {}
        self._pair_acquired_at: dict[tuple, float] = {}
        self._follow_asked: dict[tuple, float] = {}

    def initiate(self, peer: str, now: float, why: str) -> bool:
        """``ike.initiate`` for one peer; a peer without endpoints or whose initiation fails is
        skipped (counted), never an exception out of the loop. Returns whether it was asked."""
        p = self.view().peer(peer)
        if p is not None and not p.endpoints:
            return False
        try:
            self.ike.initiate(peer, now)
            return True
        except Exception as exc:
            self.internal_error(f"initiate({peer}) on {why}", exc)
            return False

    def _held(self, key, pkts: list[bytes], now: float) -> int:
        return self.hold.put(key, pkts, now) if self.hold is not None and pkts else 0

    def acquire(self, peer: str, n: int, now: float, pkts: list[bytes] = ()) -> None:
        """``n`` packets to ``peer`` found no SA (RFC 4301 §5.1): initiate (idempotent while
        negotiating) and, with an IKE_SA up, ask for a CHILD_SA. ``pkts`` (those packets)
        are held until it is up, as far as the hold queue takes them; the rest count as
        ``no_sa``. ``peer`` may be a selector pair (peer, local network, remote network):
        see ``acquire_pair``."""
        if isinstance(peer, tuple):
            self.acquire_pair(peer, n, now, pkts)
            return
        vp = self.view().peer(peer)
        if vp is not None and not vp.endpoints:
            # nowhere to send IKE_SA_INIT: counted, not an error (the view may add one later)
            self.counters["no_endpoint"] += n
            return
        self.counters["no_sa"] += n - self._held(peer, pkts, now)
        self.initiate(peer, now, "acquire")
        self._acquire_child(peer, now)

    def _acquire_child(self, peer: str, now: float) -> None:
        """Acquire with an established IKE_SA but no CHILD_SA (its CHILD_SA expired by
        lifetime, was deleted, or its rekey failed): ask for a new CHILD_SA (CREATE_CHILD_SA,
        RFC 7296 §1.3.1), at most once per ACQUIRE_CHILD_INTERVAL_S per peer."""
        asked = self._child_acquired_at
        if now - asked.get(peer, float("-inf")) < self.ACQUIRE_CHILD_INTERVAL_S:
            return
        asked[peer] = now
        try:
            if self.ike.create_child(peer, now):
                self.counters["child_acquires"] = self.counters.get("child_acquires", 0) + 1
        except Exception as exc:
            self.internal_error(f"create_child({peer}) on acquire", exc)

    def acquire_pair(self, key: tuple, n: int, now: float, pkts: list[bytes] = ()) -> None:
        """``n`` packets of the SPD entry ``key`` = (peer, local network, remote network) found
        no CHILD_SA of that peer whose selectors cover the pair (RFC 4301 §5.1: they are never
        sent through another pair's SA). A pair apart from every CHILD_SA of the peer (e.g.
        one the peer's narrowing left out, RFC 7296 §2.9) gets its own CREATE_CHILD_SA
        proposing exactly that pair, at most once per ACQUIRE_CHILD_INTERVAL_S; a pair
        partly inside an SA's selectors is what the peer narrowed away: dropped (counter
        ``narrowed``), asking again would get the same answer."""
        peer, local, remote = key
        c = self.counters
        if any(ch.overlaps(local, remote) for ch in self.sad.of_peer(peer)):
            c["narrowed"] = c.get("narrowed", 0) + n
            return
        c["no_sa"] += n - self._held(key, pkts, now)
        asked = self._pair_acquired_at
        if now - asked.get(key, float("-inf")) < self.ACQUIRE_CHILD_INTERVAL_S:
            return
        if len(asked) > 4096:  # bounded: forget the oldest asks
            for k in sorted(asked, key=asked.get)[:1024]:
                del asked[k]
        asked[key] = now
        try:
            if self.ike.create_child(peer, now, local_ts=(local,), remote_ts=(remote,)):
                c["child_acquires"] = c.get("child_acquires", 0) + 1
                self.log.info("no CHILD_SA with %s carries %s -> %s: asking for one (CREATE_CHILD_SA)",
                              peer, local, remote)
            else:
                self.initiate(peer, now, "acquire")
        except Exception as exc:
            self.internal_error(f"create_child({peer}, {local}, {remote}) on acquire", exc)

    FOLLOW_INTERVAL_S = 1.0

    def follow(self, ch: ChildEntry, remote: tuple, now: float) -> None:
        """ESP that authenticated on ``ch`` came from ``remote``, not ``ch.remote`` (a rebound
        NAT mapping): ask IKE to follow (``follow_peer``, RFC 7296 §2.23: only a peer behind a
        NAT, never against PAD bindings); a PeerAddressChanged event then moves the CHILD_SAs.
        Once per CHILD_SA and address per FOLLOW_INTERVAL_S (a refusal is not asked again
        for every batch)."""
        key = (ch.inbound_spi, remote)
        asked = self._follow_asked
        if now - asked.get(key, float("-inf")) < self.FOLLOW_INTERVAL_S:
            return
        if len(asked) > 1024:
            asked.clear()
        asked[key] = now
        if self.ike.follow_peer(ch.inbound_spi, remote, now):
            self.counters["esp_followed"] = self.counters.get("esp_followed", 0) + 1
            self.log.info("authenticated ESP from %s on the CHILD_SA with %s (spi in %08x): its NAT mapping "
                          "moved from %s:%d; the IKE_SA and its CHILD_SAs follow", f"{remote[0]}:{remote[1]}",
                          ch.peer, ch.inbound_spi, ch.remote[0], ch.remote[1])

    def volume(self, ch: ChildEntry, sa, now: float) -> None:
        """``sa`` (one direction of ``ch``) set needs_rekey: a sequence number or byte/packet
        soft limit -> one rekey; its hard byte/packet limit (``expired``) -> delete the CHILD_SA."""
        if getattr(sa, "expired", False):
            self._expire(ch, now)
        else:
            self._rekey(ch, now)

    def _rekey(self, ch: ChildEntry, now: float) -> None:
        """The SA nears sequence-number exhaustion (RFC 4303 §3.3.3) or its soft byte/packet
        limit: ask IKE once for a CHILD_SA rekey (RFC 7296 §1.3.3); the new SA takes over on
        ChildSaEstablished."""
        if ch.inbound_spi in self._rekey_asked:
            return
        self._rekey_asked.add(ch.inbound_spi)
        if self.ike.rekey_child(ch.inbound_spi, now):
            self.counters["lifetime_rekeys"] += 1

    def _expire(self, ch: ChildEntry, now: float) -> None:
        """Hard byte/packet lifetime reached (RFC 4301 §4.4.2.1): delete the CHILD_SA through
        IKE (INFORMATIONAL D(SPI), RFC 7296 §1.4.1) so the peer removes its side too; if the IKE
        core no longer knows it, remove it here. Once per CHILD_SA."""
        if ch.inbound_spi in self._expired_done:
            return
        self._expired_done.add(ch.inbound_spi)
        self.counters["lifetime_deletes"] += 1
        ok = self.ike.delete_child(ch.inbound_spi, now, reason="CHILD_SA byte/packet lifetime expired")
        self.log.info("CHILD_SA with %s (spi in %08x out %08x) reached its byte/packet lifetime: %s", ch.peer,
                      ch.inbound_spi, ch.outbound_spi, "deleting it" if ok else "removed (IKE no longer had it)")
        if not ok and self.sad.lookup(ch.inbound_spi) is ch:
            self.remove_child(ch)

    def unknown_spi(self, spis_from: list, now: float) -> None:
        """ESP/AH with an SPI we do not know came from these (SPI bytes, address) pairs: tell
        the IKE core (``hint_unknown_spi``, docs/ike-hardening.md), once per source address per
        batch; the core rate-limits and decides (liveness check, new IKE_SA, an unprotected
        N(INVALID_SPI) to the source, or nothing)."""
        seen: set[str] = set()
        children = self.sad.children
        for spi, addr in spis_from:
            ip = addr[0] if isinstance(addr, tuple) else str(addr)
            if ip in seen or len(spi) < 4 or int.from_bytes(spi, "big") in children:
                continue
            seen.add(ip)
            what = self.ike.hint_unknown_spi(addr, now, bytes(spi[:4]))
            if what in ("initiated", "liveness_check"):
                self.counters["unknown_spi_hints"] += 1
                self.log.info("ESP/AH with unknown SPI %s from %s: %s", spi.hex(), ip,
                              "IKE_SA_INIT started" if what == "initiated" else "liveness check of the IKE_SA")
