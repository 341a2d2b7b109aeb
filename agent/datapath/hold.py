"""Packets held while their SA is negotiated (the "larval SA" queue).

RFC 4301 §5.1 leaves it to the implementation what happens to the packet that
triggers an acquire. Dropping it costs the first packet of every new flow: a
TCP SYN then waits for its 1 s retransmission, a first ping is lost. Like the
kernel's xfrm hold queue, we keep a few packets per acquire key and send them
through the outbound flow once a CHILD_SA with that peer is up.

Bounds: ``max_packets`` per key and ``max_bytes`` over all keys (a packet over them
is not held: the caller counts it as ``no_sa``, as without a queue), ``max_age_s``
per packet (older ones are dropped, counted ``held_expired``).
Pure bookkeeping: no I/O, time comes in as ``now`` (seconds, monotonic).
"""
from __future__ import annotations

from collections import deque

HOLD_MAX_PACKETS = 64        # per acquire key (a peer, or a (peer, local, remote) selector pair)
HOLD_MAX_BYTES = 1 << 20     # over all keys
HOLD_MAX_AGE_S = 3.0         # an IKE_SA + CHILD_SA set-up that takes longer is not "the first packet"

# counters this module adds to the runtime's counters
HOLD_COUNTERS = ("held", "held_sent", "held_expired")


def _peer(key) -> str:
    return key[0] if isinstance(key, tuple) else key


class HoldQueue:
    """Held packets per acquire key. ``counters``: the runtime's counters (shared;
    ``held``, ``held_sent``, ``held_expired`` are added to it).
    ``ready``: peers for which a CHILD_SA came up since the loop last released."""

    def __init__(self, counters: dict, *, max_packets: int = HOLD_MAX_PACKETS,
                 max_bytes: int = HOLD_MAX_BYTES, max_age_s: float = HOLD_MAX_AGE_S) -> None:
        self.counters = counters
        for k in HOLD_COUNTERS:
            counters.setdefault(k, 0)
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._q: dict = {}  # key -> deque[(time held, packet)]
        self.bytes = 0
        self.ready: set[str] = set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._q.values())

    def put(self, key, pkts: list[bytes], now: float) -> int:
        """Hold ``pkts`` (whole IP packets) for ``key``, in order, as far as the caps allow;
        returns how many were held (the first ones)."""
        if not pkts:
            return 0
        if self._q:
            self._expire(now)
        q = self._q.get(key)
        if q is None:
            q = self._q[key] = deque()
        held = 0
        for p in pkts:
            if len(q) >= self.max_packets or self.bytes + len(p) > self.max_bytes:
                break
            q.append((now, p))
            self.bytes += len(p)
            held += 1
        if not q:
            del self._q[key]
        self.counters["held"] += held
        return held

    def take(self, peer: str, now: float) -> list[bytes]:
        """Every packet held for ``peer`` (under any of its keys), oldest first within a
        key, and forget them; expired ones are counted in ``held_expired`` instead."""
        self._expire(now)
        out: list[bytes] = []
        for key in [k for k in self._q if _peer(k) == peer]:
            q = self._q.pop(key)
            for _t, p in q:
                self.bytes -= len(p)
                out.append(p)
        return out

    def release(self, now: float) -> list[bytes]:
        """What is held for the ``ready`` peers (counted in ``held_sent``); clears ``ready``."""
        out = [p for peer in self.ready for p in self.take(peer, now)]
        self.ready.clear()
        self.counters["held_sent"] += len(out)
        return out

    def forget(self, peer: str) -> None:
        """Drop what is held for ``peer`` (it left the view), counted in ``held_expired``."""
        for key in [k for k in self._q if _peer(k) == peer]:
            q = self._q.pop(key)
            self.counters["held_expired"] += len(q)
            self.bytes -= sum(len(p) for _t, p in q)
        self.ready.discard(peer)

    def _expire(self, now: float) -> None:
        limit = now - self.max_age_s
        for key in list(self._q):
            q = self._q[key]
            while q and q[0][0] < limit:
                _t, p = q.popleft()
                self.bytes -= len(p)
                self.counters["held_expired"] += 1
            if not q:
                del self._q[key]
