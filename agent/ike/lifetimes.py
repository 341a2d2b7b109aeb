"""Lifetimes of an IKE_SA and its CHILD_SAs (RFC 7296 §2.8): when to rekey, when to delete.

From PeerPolicy: soft expiry (rekey) at 80-90 % of the lifetime (jitter from ``rng`` so both
ends rarely collide), hard expiry (delete) at 100 %; a failed rekey is retried before the
hard limit (every third of the time left, REKEY_RETRY_MIN_S .. REKEY_RETRY_MAX_S).
The rekeys themselves are tasks (agent.ike.tasks.child_create, agent.ike.tasks.ike_rekey).

Pure module: no I/O.
"""
from __future__ import annotations

from agent.ike import child as ch
from agent.ike.errors import DeleteReason, IkeSaState

SOFT_LIFETIME = 0.9  # fraction of the lifetime at which we rekey ...
LIFETIME_JITTER = 0.1  # ... minus up to this fraction, drawn from rng
REKEY_RETRY_MIN_S = 1.0
REKEY_RETRY_MAX_S = 30.0

__all__ = ["Lifetimes", "SOFT_LIFETIME", "LIFETIME_JITTER", "REKEY_RETRY_MIN_S", "REKEY_RETRY_MAX_S"]


class Lifetimes:
    """Soft/hard expiry timers of one IkeSa (``sa.rekey_at``/``sa.expire_at``, ChildSa.rekey_at/expire_at)."""

    def __init__(self, sa) -> None:
        self.sa = sa

    def _jitter(self) -> float:
        sa = self.sa
        return int.from_bytes(sa.rng(4), "big") / 2 ** 32

    def _lifetimes(self, lifetime: float, now: float) -> tuple[float | None, float | None]:
        if not lifetime or lifetime <= 0:
            return None, None
        soft = lifetime * (SOFT_LIFETIME - LIFETIME_JITTER * self._jitter())
        return now + soft, now + lifetime

    def set_child(self, child: ch.ChildSa, now: float) -> None:
        sa = self.sa
        if sa.peer is not None:
            child.rekey_at, child.expire_at = self._lifetimes(sa.peer.policy.child_lifetime_s, now)

    def set_ike(self, now: float) -> None:
        sa = self.sa
        if sa.peer is not None:
            sa.rekey_at, sa.expire_at = self._lifetimes(sa.peer.policy.ike_lifetime_s, now)

    def retry_at(self, expire_at: float | None, now: float) -> float | None:
        if expire_at is None:
            return now + REKEY_RETRY_MAX_S
        delay = max(REKEY_RETRY_MIN_S, min(REKEY_RETRY_MAX_S, (expire_at - now) / 3))
        return now + delay if now + delay < expire_at else None

    def timers(self) -> list[float]:
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED or sa._successor is not None:
            return []
        ts = []
        for c in sa.children:
            if c.expire_at is not None:
                ts.append(c.expire_at)
            if c.rekey_at is not None and not c.rekeyed and sa.child_create.task_for(c) is None:
                ts.append(c.rekey_at)
        if sa.expire_at is not None:
            ts.append(sa.expire_at)
        if sa.rekey_at is not None and sa.ike_rekey.task is None:
            ts.append(sa.rekey_at)
        return ts

    def handle(self, now: float) -> bool:
        """Soft/hard expiry of the IKE_SA and its CHILD_SAs; True if anything was due."""
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED or sa._successor is not None:
            return False
        if sa.expire_at is not None and now >= sa.expire_at:
            sa.delete(now, "IKE_SA lifetime expired", DeleteReason.EXPIRED)
            return True
        done = False
        for c in list(sa.children):
            if c.expire_at is not None and now >= c.expire_at:
                sa.delete_child(c.inbound_spi, now, reason="CHILD_SA lifetime expired")
                done = True
            elif (c.rekey_at is not None and now >= c.rekey_at and not c.rekeyed
                  and sa.child_create.task_for(c) is None):
                c.rekey_at = None
                sa.rekey_child(c.inbound_spi, now)
                done = True
        if sa.rekey_at is not None and now >= sa.rekey_at and sa.ike_rekey.task is None:
            sa.rekey_at = None
            sa.rekey_ike(now)
            done = True
        return done
