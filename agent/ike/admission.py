"""Admission of new IKE_SA_INIT requests before authentication (RFC 7296 §2.6): the pieces
IkeManager uses to stay bounded under an unauthenticated flood (docs/ike-hardening.md).

- ``TokenBucket``: the rate of IKE_SA_INIT requests let through without a COOKIE. Refused
  requests (no acceptable proposal, ...) leave no half-open IKE_SA, so the half-open count
  alone never engaged COOKIE mode against them; the rate does.
- ``RefusalTally``: refused IKE_SA_INITs counted by reason and summarised at most once per
  interval (one log line per interval, not one per datagram).
- ``refusal_of``: the error notify of our stateless answer to an IKE_SA_INIT.
- ``new_init_header``: the header of a datagram if it is a new IKE_SA_INIT request.

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType, PayloadType
from agent.ike.message import HEADER_LEN, Header, MessageError, decode_header, scan_payloads

INIT_RATE = 100.0  # IKE_SA_INITs per second let through without a COOKIE (then COOKIE mode)
MAX_INIT_LEN = 8192  # octets; IKE_SA_INIT cannot be fragmented (RFC 7383 §2.5), real ones are < 2 KiB
HALF_OPEN_BYTES_MAX = 4 << 20  # half-open state in all; COOKIE mode from half of it
HALF_OPEN_BASE_BYTES = 7 << 10  # heap of one half-open IKE_SA besides its messages (tracemalloc)
REFUSAL_SUMMARY_S = 10.0  # at most one InitsRefused event per interval


class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; ``take(now)`` spends one if there is one.
    ``rate`` <= 0: unlimited (never empty)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self._tokens = self.burst
        self._at: float | None = None

    def _fill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self._fill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def empty(self, now: float) -> bool:
        if self.rate <= 0:
            return False
        self._fill(now)
        return self._tokens < 1.0


class RefusalTally:
    """Refused IKE_SA_INITs by reason. ``add(reason, remote, now)`` returns a summary to report
    now, or None: the first refusal after a quiet interval is reported at once, later ones are
    gathered and reported by ``flush(now)`` once ``interval_s`` has passed since the last report
    (``due()`` says when). A summary is (counts, since, until, last source address, last detail)."""

    def __init__(self, interval_s: float = REFUSAL_SUMMARY_S) -> None:
        self.interval_s = interval_s
        self._counts: dict[str, int] = {}
        self._since = 0.0
        self._last_addr: tuple = ("", 0)
        self._detail = ""
        self._reported: float | None = None

    def add(self, reason: str, remote: tuple, now: float, detail: str = ""):
        if not self._counts:
            self._since = now
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self._last_addr = tuple(remote)
        self._detail = detail
        if self._reported is None or now - self._reported >= self.interval_s:
            return self.flush(now)
        return None

    def due(self) -> float | None:
        if not self._counts:
            return None
        return self._since if self._reported is None else self._reported + self.interval_s

    def flush(self, now: float):
        if not self._counts or (self._reported is not None and now - self._reported < self.interval_s):
            return None
        out = (dict(sorted(self._counts.items())), self._since, now, self._last_addr, self._detail)
        self._counts = {}
        self._reported = now
        return out


def new_init_header(data: bytes) -> Header | None:
    """The §3.1 header if ``data`` is a new IKE_SA_INIT request from the original initiator
    (SPIr 0, Message ID 0, I set, R clear), else None (also for a bad header)."""
    if len(data) < HEADER_LEN or data[18] != ExchangeType.IKE_SA_INIT:
        return None
    try:
        h = decode_header(data)
    except MessageError:
        return None
    if h.spi_r or h.message_id or h.flags & 0x28 != 0x08:
        return None
    return h


def refusal_of(data: bytes) -> int | None:
    """The error notify type of a stateless IKE_SA_INIT answer of ours, ``HDR(SPIi, 0),
    N(error)``, else None (e.g. a real IKE_SA_INIT response, or N(COOKIE))."""
    try:
        h = decode_header(data)
        chain = scan_payloads(h.first, data, HEADER_LEN)
    except MessageError:
        return None
    if h.spi_r or not chain or chain[0][0] != PayloadType.NOTIFY or chain[0][2] - chain[0][1] < 4:
        return None
    a = chain[0][1]
    ntype = int.from_bytes(data[a + 2:a + 4], "big")
    return ntype if 0 < ntype < 16384 else None


__all__ = ["TokenBucket", "RefusalTally", "refusal_of", "new_init_header", "INIT_RATE", "MAX_INIT_LEN",
           "HALF_OPEN_BYTES_MAX", "HALF_OPEN_BASE_BYTES", "REFUSAL_SUMMARY_S"]
