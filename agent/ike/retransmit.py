"""Request retransmission schedule (RFC 7296 §2.1, §2.4), pure.

RFC 7296 leaves the timers to the implementation. A request is retransmitted
after ``timeout_s``, then after waits multiplied by ``base`` each time; after
``tries`` retransmissions and one more wait the IKE_SA fails ("peer did not
respond"). The defaults (1 s, x2, 5 tries: 1+2+4+8+16+32 = 63 s) are the
schedule meshsec always had.

IKE_SA_INIT of an initiator first retransmits quickly: after
``init_timeout_s``, doubling while the wait stays below ``timeout_s``, then
it follows the schedule above (0.1, 0.2, 0.4, 0.8, then 1, 2, 4, 8, 16, 32 s
by default). A peer that was not listening yet when the first IKE_SA_INIT
left (both agents starting at once) is reached a fraction of a second later
instead of a whole ``timeout_s``. This is race-free: a retransmission is the
same message under the same SPIi, which the responder answers from its
half-open IKE_SA (or its cached response); it never creates a second IKE_SA
(the IkeManager also ignores a late IKE_SA_INIT retransmission for an IKE_SA
already established). Only IKE_SA_INIT gets the quick phase: it costs the
responder no new state, unlike requests under an established IKE_SA.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.iana import ExchangeType
from agent.ike.errors import exchange_name

RETRANSMIT_TIMEOUT_S = 1.0
RETRANSMIT_BASE = 2.0
RETRANSMIT_TRIES = 5
INIT_RETRANSMIT_TIMEOUT_S = 0.1


@dataclass(frozen=True)
class RetransmitSchedule:
    """Seconds to wait after each transmission of a request.

    ``timeout_s`` (> 0): wait after the first transmission; ``base`` (>= 1): factor between
    consecutive waits; ``tries`` (>= 0): retransmissions before giving up; ``init_timeout_s``:
    first wait of an initiator's IKE_SA_INIT (0, or not below ``timeout_s``: no quick phase).
    ValueError naming the field for values outside these ranges.
    """

    timeout_s: float = RETRANSMIT_TIMEOUT_S
    base: float = RETRANSMIT_BASE
    tries: int = RETRANSMIT_TRIES
    init_timeout_s: float = INIT_RETRANSMIT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or self.timeout_s != self.timeout_s or self.timeout_s > 3600:
            raise ValueError(f"retransmit timeout {self.timeout_s!r}: give 0 < seconds <= 3600")
        if not 1.0 <= self.base <= 10.0:
            raise ValueError(f"retransmit base {self.base!r}: give a factor from 1 to 10")
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or not 0 <= self.tries <= 20:
            raise ValueError(f"retransmit tries {self.tries!r}: give a whole number from 0 to 20")
        if not 0 <= self.init_timeout_s <= 3600:
            raise ValueError(f"IKE_SA_INIT retransmit timeout {self.init_timeout_s!r}: give 0 (off) or seconds")

    def _quick(self, init: bool) -> int:
        """Number of quick IKE_SA_INIT waits (init_timeout_s * 2**k < timeout_s)."""
        if not init or not 0 < self.init_timeout_s < self.timeout_s:
            return 0
        n, w = 0, self.init_timeout_s
        while w < self.timeout_s and n < 16:
            n, w = n + 1, w * 2
        return n

    def wait(self, sent: int, *, init: bool = False) -> float:
        """Seconds to wait after the transmission numbered ``sent`` (0: the first one) before
        retransmitting or, after the last one, giving up. ``init``: an initiator's IKE_SA_INIT."""
        q = self._quick(init)
        if sent < q:
            return self.init_timeout_s * 2 ** sent
        return self.timeout_s * self.base ** (sent - q)

    def max_tries(self, *, init: bool = False) -> int:
        """Retransmissions before the request fails."""
        return self.tries + self._quick(init)

    def total(self, *, init: bool = False) -> float:
        """Seconds from the first transmission until the request fails."""
        return sum(self.wait(i, init=init) for i in range(self.max_tries(init=init) + 1))


DEFAULT_SCHEDULE = RetransmitSchedule()

def fragmentation_hint(exchange: int, data, local, fragment_size: int) -> str:
    """Why a peer may not have answered a big request: an IP packet above ``fragment_size``
    sent whole (RFC 7383 not negotiated, or IKE_SA_INIT, which it cannot split) travels as IP
    fragments, which many paths drop. "" when the request was small or sent as SKF fragments.
    ``data``: the request as sent (bytes, or a FragmentedMessage); ``local``: our (ip, port)."""
    if getattr(data, "fragments", None):
        return ""
    ipv6 = ":" in local[0]
    packet = len(data) + (40 if ipv6 else 20) + 8 + (4 if local[1] == 4500 else 0)  # non-ESP marker on 4500
    if packet <= fragment_size:
        return ""
    why = ("the peer did not announce IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383)"
           if exchange != ExchangeType.IKE_SA_INIT else "IKE_SA_INIT cannot be fragmented by RFC 7383")
    return (f" (likely cause: lost IP fragments; our {exchange_name(exchange)} request was a {packet}-octet IP "
            f"packet, above fragment_size {fragment_size}, sent unfragmented because {why}; "
            "enable fragmentation on the peer, or check that the path passes IP fragments)")


__all__ = ["fragmentation_hint", "RetransmitSchedule", "DEFAULT_SCHEDULE", "RETRANSMIT_TIMEOUT_S", "RETRANSMIT_BASE",
           "RETRANSMIT_TRIES", "INIT_RETRANSMIT_TIMEOUT_S"]


def schedule_of(policy) -> RetransmitSchedule:
    """The schedule of a PeerPolicy (fields ``retransmit_timeout_s``, ``retransmit_base``,
    ``retransmit_tries``, ``init_retransmit_timeout_s``; missing ones take the defaults).
    Values outside the ranges (refused earlier by the configuration) give the default schedule."""
    try:
        s = RetransmitSchedule(getattr(policy, "retransmit_timeout_s", RETRANSMIT_TIMEOUT_S),
                               getattr(policy, "retransmit_base", RETRANSMIT_BASE),
                               getattr(policy, "retransmit_tries", RETRANSMIT_TRIES),
                               getattr(policy, "init_retransmit_timeout_s", INIT_RETRANSMIT_TIMEOUT_S))
    except (ValueError, TypeError):
        return DEFAULT_SCHEDULE
    return DEFAULT_SCHEDULE if s == DEFAULT_SCHEDULE else s
