"""NAT-keepalives (RFC 3948 §2.3): while an IKE_SA says we are behind a NAT (NAT-D,
RFC 7296 §2.23), a one-octet 0xFF goes to the peer's UDP 4500 whenever nothing
else was sent to it for ``interval`` seconds. Pure bookkeeping: the loop sends.
"""
from __future__ import annotations

NAT_KEEPALIVE = b"\xff"  # RFC 3948 §2.3
DEFAULT_NAT_KEEPALIVE_S = 20.0


class NatKeepalive:
    """``interval``: seconds (0: off). ``remotes``: the peers' (ip, 4500) we keep a NAT
    mapping open to; ``deadline``: when the next keepalive may be due (None: none)."""

    def __init__(self, interval: float = DEFAULT_NAT_KEEPALIVE_S) -> None:
        self.interval = interval
        self.remotes: set[tuple[str, int]] = set()
        self._tx: dict[tuple[str, int], float] = {}  # remote -> when we last sent it anything on 4500
        self.deadline: float | None = None
        self.dirty = False  # IKE_SAs came or went: refresh before the next keepalive

    def refresh(self, ike_status: list[dict], now: float) -> None:
        """Recompute ``remotes`` from IKE status rows: the UDP 4500 remotes of the established
        IKE_SAs whose NAT-D said our side is behind a NAT."""
        self.dirty = False
        remotes = set()
        for st in ike_status:
            if st.get("state") != "ESTABLISHED" or not (st.get("nat") or {}).get("local"):
                continue
            ip, _, port = str(st.get("remote", "")).rpartition(":")
            if ip and port == "4500":
                remotes.add((ip, 4500))
        for r in remotes - self.remotes:
            self._tx.setdefault(r, now)
        for r in self.remotes - remotes:
            self._tx.pop(r, None)
        self.remotes = remotes
        self._schedule()

    def _schedule(self) -> None:
        if not self.interval or not self.remotes:
            self.deadline = None
            return
        self.deadline = min(self._tx.get(r, 0.0) for r in self.remotes) + self.interval

    def sent(self, remotes, now: float, *, only_nat: bool = True) -> None:
        """Something went to these UDP 4500 remotes at ``now``; tracked only while a keepalive
        may be needed (``only_nat``: only for the NAT'd remotes themselves)."""
        if not self.remotes:
            return
        for r in remotes:
            if not only_nat or r in self.remotes:
                self._tx[r] = now

    def due(self, now: float) -> list[tuple[str, int]]:
        """The remotes that get a keepalive now (marked as sent); reschedules."""
        tx = self._tx
        due = [r for r in self.remotes if now - tx.get(r, now) >= self.interval]
        for r in due:
            tx[r] = now
        self._schedule()
        return due
