"""IkeManager's deadlines (sans-I/O): one heap of (when, seq, key) with lazy deletion, for every
IKE_SA (key: our SPI), pending re-initiations ("retry", peer), make-before-break waits
("replace", peer), the refused-IKE_SA_INIT summary ("refusals", ""), the dropped half-open
IKE_SA summary ("half_open_drops", ""); and the re-initiation
backoff after a failed IKE_SA. docs/ike-hardening.md "Half-open IKE_SAs", "Re-initiation backoff".

Pure module: no I/O.
"""
from __future__ import annotations

import heapq

from agent.ike.errors import AUTH_BACKOFF, NO_RETRY
from agent.ike.events import HalfOpenDropped, IkeSaDeleted, InitsRefused
from agent.ike.sa import IkeSa

REINITIATE_BASE_S = 2.0
REINITIATE_AUTH_BASE_S = 8.0  # first delay after an authentication failure (a config problem)
REINITIATE_MAX_S = 120.0


class Timers:
    """The deadline heap and the re-initiation backoff of an IkeManager. ``m``: the IkeManager whose
    tables it works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    def handle_timer(self, now: float) -> None:
        """Run every IKE_SA deadline that has passed, and due re-initiations.

        Cost: O(k log n) for k due deadlines (a heap), each IKE_SA at most once per call."""
        due: list[object] = []
        while self.m._heap and self.m._heap[0][0] <= now:
            t, _, key = heapq.heappop(self.m._heap)
            if self.valid(t, key):
                due.append(key)
                if isinstance(key, int):
                    del self.m._deadline[key]
        for key in due:
            if isinstance(key, int):
                sa = self.m._sas.get(key)
                if sa is None:
                    continue
                t = sa.next_timer()
                if t is not None and t <= now:
                    sa.handle_timer(now)
                self.m._collect(sa, now)  # reschedules
            elif key[0] == "refusals":  # the summary of refused IKE_SA_INITs gathered since the last one
                self.m._refusal_timer = None
                summary = self.m._refusals.flush(now)
                if summary is not None:
                    self.m._events.append(InitsRefused(*summary))
            elif key[0] == "half_open_drops":  # the summary of half-open IKE_SAs dropped since the last one
                self.m._ho_drop_timer = None
                summary = self.m._ho_drops.flush(now)
                if summary is not None:
                    self.m._events.append(HalfOpenDropped(*summary))
            elif key[0] == "replace":  # no replacement came in time: the old IKE_SAs go now
                if self.m._replace_by.get(key[1], now + 1) <= now:
                    self.m._joining.replaced(key[1], now, failed="none came in time")
            else:
                name = key[1]
                if self.m._retry.get(name) is None or self.m._retry[name] > now:
                    continue
                if self.m.view.peer(name) is None:
                    self.m._retry.pop(name, None)
                    continue
                try:
                    self.m.initiate(name, now)
                except ValueError:
                    self.m._retry.pop(name, None)

    def get_timer(self) -> float | None:
        """Earliest deadline over all IKE_SAs and pending re-initiations (amortised O(log n))."""
        while self.m._heap:
            t, _, key = self.m._heap[0]
            if self.valid(t, key):
                return t
            heapq.heappop(self.m._heap)
        return None

    def valid(self, t: float, key: object) -> bool:
        if isinstance(key, int):
            return self.m._deadline.get(key) == t and key in self.m._sas
        if key[0] == "replace":
            return self.m._replace_by.get(key[1]) == t
        if key[0] == "refusals":
            return self.m._refusal_timer == t
        if key[0] == "half_open_drops":
            return self.m._ho_drop_timer == t
        return self.m._retry.get(key[1]) == t

    def schedule(self, sa: IkeSa) -> None:
        """Keep the heap entry of ``sa`` equal to its next_timer() (called from _collect)."""
        key = sa.my_spi
        t = None if sa.is_dead or self.m._sas.get(key) is not sa else sa.next_timer()
        if t is None:
            self.m._deadline.pop(key, None)
            return
        if self.m._deadline.get(key) == t:
            return
        self.m._deadline[key] = t
        self.push(t, key)

    def push(self, t: float, key: object) -> None:
        heapq.heappush(self.m._heap, (t, next(self.m._seq), key))
        if len(self.m._heap) > 4 * (len(self.m._deadline) + len(self.m._retry) + len(self.m._replace_by)) + 64:
            # stale entries (deadlines that moved) outnumber live ones: rebuild
            self.m._heap = [e for e in self.m._heap if self.valid(e[0], e[2])]
            heapq.heapify(self.m._heap)

    def timer_entries(self) -> int:
        """Entries in the deadline heap (live and stale): bounded by a constant times the
        number of IKE_SAs plus pending re-initiations."""
        return len(self.m._heap)

    def schedule_retry(self, sa: IkeSa, ev: IkeSaDeleted, now: float) -> None:
        name = sa.peer_name or (sa.cfg.peer.name if sa.cfg.peer else "")
        peer = self.m.view.peer(name) if name else None
        # decided by the kind of the end (agent.ike.errors), never by words in the reason text
        if (peer is None or self.m._shutdown or ev.kind in NO_RETRY or ev.rekeyed_to is not None
                or any(s is not sa for s in self.m._sas_of(name))):
            return
        last = self.m._backoff.get(name, 0.0)
        auth = ev.kind in AUTH_BACKOFF
        base = REINITIATE_AUTH_BASE_S if auth else REINITIATE_BASE_S
        backoff = min(REINITIATE_MAX_S, max(last * 2, base) if last else base)
        self.m._backoff[name] = backoff
        # acquires (initiate) wait out the backoff too, whichever side initiates by default
        self.m._hold[name] = now + backoff
        if peer.initiate:
            self.m._retry[name] = now + backoff
            self.push(now + backoff, ("retry", name))


__all__ = ["Timers", "REINITIATE_BASE_S", "REINITIATE_AUTH_BASE_S", "REINITIATE_MAX_S"]
