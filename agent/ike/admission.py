"""Admission of new IKE_SA_INIT requests before authentication (RFC 7296 §2.6): the pieces
IkeManager uses to stay bounded under an unauthenticated flood (docs/ike-hardening.md).

- ``TokenBucket``: the rate of IKE_SA_INIT requests let through without a COOKIE. Refused
  requests (no acceptable proposal, ...) leave no half-open IKE_SA, so the half-open count
  alone never engaged COOKIE mode against them; the rate does.
- ``RefusalTally``: refused IKE_SA_INITs counted by reason and summarised at most once per
  interval (one log line per interval, not one per datagram).
- ``refusal_of``: the error notify of our stateless answer to an IKE_SA_INIT.
- ``new_init_header``: the header of a datagram if it is a new IKE_SA_INIT request.
- ``Admission``: IkeManager's half of it: the COOKIE check, refusals, the half-open tables
  (per source, global count and byte budget, eviction of the oldest) and the IKE_SA_INIT path.

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike.cookie import NONCE_MAX, NONCE_MIN
from agent.ike.errors import DeleteReason
from agent.ike.events import Addr, HalfOpenDropped, IkeSaDeleted, InitsRefused
from agent.ike.message import (HEADER_LEN, Header, Message, MessageError, MessageLimitError, NotifyPayload,
                               decode_header, encode_message, scan_payloads)
from agent.ike.sa import Datagram, IkeSa, State

INIT_RATE = 100.0  # IKE_SA_INITs per second let through without a COOKIE (then COOKIE mode)
MAX_INIT_LEN = 8192  # octets; IKE_SA_INIT cannot be fragmented (RFC 7383 §2.5), real ones are < 2 KiB
HALF_OPEN_BYTES_MAX = 4 << 20  # half-open state in all; COOKIE mode from half of it
HALF_OPEN_BASE_BYTES = 8 << 10  # heap of one half-open IKE_SA besides its messages (tracemalloc: 8.1-8.3 KB)
REFUSAL_SUMMARY_S = 10.0  # at most one InitsRefused (HalfOpenDropped) event per interval
# endings of a responder IKE_SA that never got an IKE_AUTH that are summarised, not one event each
SUMMARISED_ENDINGS = frozenset({DeleteReason.DROPPED, DeleteReason.SETUP_TIMEOUT})


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


_INITS_DONE_MAX = 1024  # established responder IKE_SAs whose IKE_SA_INIT retransmissions are ignored


def _notify_name(ntype: int) -> str:
    try:
        return NotifyType(ntype).name.lower()
    except ValueError:
        return f"notify_{ntype}"


def _cookie_of(data: bytes, first: tuple[int, int, int]) -> bytes | None:
    """The data of N(COOKIE) if it is the first payload (``first`` from scan_payloads), else None."""
    ptype, a, b = first
    if ptype != PayloadType.NOTIFY or b - a < 4:
        return None
    spi_size = data[a + 1]
    if int.from_bytes(data[a + 2:a + 4], "big") != NotifyType.COOKIE or a + 4 + spi_size > b:
        return None
    return bytes(data[a + 4 + spi_size:b])


class Admission:
    """New IKE_SA_INITs before authentication (RFC 7296 §2.6) and the half-open IKE_SAs they make.
    ``m``: the IkeManager whose tables it works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    def init_request(self, msg: Message, data: bytes, local: Addr, remote: Addr, now: float) -> IkeSa | None:
        """A new IKE_SA_INIT request (decoded, past the COOKIE check): a half-open IKE_SA is made
        and answers it, or it is refused or dropped (counted). Returns the half-open IKE_SA a
        retransmission belongs to (its cached response answers), else None: dealt with here."""
        if not msg.is_initiator:
            self.m._count("malformed")
            return None
        key = (remote[0], msg.spi_i)
        sa = self.m._half_open.get(key)
        if sa is None or sa.is_dead or sa.state != State.AUTH and sa.state != State.INIT:
            if self.m._shutdown:
                self.m._count("shutdown")
                return None
            if key in self.m._inits_done:  # a late retransmission: that IKE_SA is up already
                self.m._count("init_retransmit_late")
                return None
            if self.m._half_open_by_ip.get(remote[0], 0) >= self.m.half_open_per_source:
                self.m._count("half_open_per_source")
                return None
            self.m._supersede_own_init(remote[0], now)
            sa = self.new_half_open(key, local, remote, now, len(data))
            spi = sa.my_spi
            reason = sa.receive(msg, data, local, remote, now)
            if reason:
                self.m._count(reason)
            if sa.is_dead or sa.state == State.INIT:
                # refused statelessly: counted by notify and summarised (InitsRefused), not
                # reported as the IkeSaDeleted of an IKE_SA that never was (a log line each)
                ntype = next((n for n in (refusal_of(d.data) for d in sa.outbox) if n is not None), None)
                sa.events = [e for e in sa.events if not isinstance(e, IkeSaDeleted)]
                if ntype is not None:
                    self.refused(_notify_name(ntype), remote, now, sa.delete_reason or "")
            self.m._collect(sa, now)
            if sa.is_dead or sa.state == State.INIT:
                # refused (INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN, ...: answered with SPIr 0) or
                # dropped: nothing of it may stay, or refusals would lock the address out
                self.forget_half_open(sa, spi)
            return None
        return sa

    def pressure(self) -> str | None:
        """Why new IKE_SAs are under pressure (COOKIE mode, shorter half-open lifetime), or None:
        "half_open" (``cookie_threshold`` half-open IKE_SAs), "half_open_bytes" (half the byte
        budget held)."""
        if len(self.m._half_open) >= self.m.cookie_threshold:
            return "half_open"
        if 2 * self.m._ho_bytes >= self.m.half_open_bytes_max:
            return "half_open_bytes"
        return None

    def needs_cookie(self, h: Header, data: bytes, local: Addr, remote: Addr, now: float) -> bool:
        """COOKIE mode (§2.6): under pressure (``_pressure``) or past ``init_rate`` new IKE_SA_INITs
        per second, a new IKE_SA_INIT must carry a valid N(COOKIE) first. Checked on the raw
        datagram ``data`` (header ``h``), before the rest is decoded: only the generic payload
        headers are read (at most MAX_PAYLOADS) and the nonce's length is checked before it is
        hashed, so a forged flood costs little. Returns True when the datagram was dealt with
        here (answered <-- HDR(SPIi, 0), N(COOKIE) or N(INVALID_SYNTAX), or dropped; counted),
        False to go on."""
        old = self.m._half_open.get((remote[0], h.spi_i))
        if old is not None and not old.is_dead:
            return False  # a retransmission to an IKE_SA we made: its cached response answers
        why = self.pressure()
        if why is None:
            if self.m._init_bucket.take(now):
                return False
            why = "init_rate"  # refused requests leave no half-open IKE_SA: the rate is what shows them
        try:
            chain = scan_payloads(h.first, data, HEADER_LEN)
        except MessageLimitError:
            self.refuse_init(h.spi_i, "too_many_payloads", NotifyType.INVALID_SYNTAX, local, remote, now)
            return True
        except MessageError:
            self.m._count("malformed")
            return True
        nonce = next(((a, b) for t, a, b in chain if t == PayloadType.NONCE), None)
        if nonce is None:
            self.m._count("malformed")
            return True
        if not NONCE_MIN <= nonce[1] - nonce[0] <= NONCE_MAX:  # §2.10; never hash a 60 KB "nonce"
            self.refuse_init(h.spi_i, "invalid_syntax", NotifyType.INVALID_SYNTAX, local, remote, now)
            return True
        ni = bytes(data[nonce[0]:nonce[1]])
        cookie = _cookie_of(data, chain[0]) if chain else None
        if cookie is not None:
            bad = self.m._cookies.check(cookie, ni, remote[0], h.spi_i, now)
            if bad is None:
                return False
            self.m._count(bad)  # forged or stale: a fresh cookie, still no state
        else:
            self.m._count("cookie_required")
        self.m._count(f"cookie_mode_{why}")
        reply = Message(h.spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, False, True,
                        (NotifyPayload(int(NotifyType.COOKIE), self.m._cookies.make(ni, remote[0], h.spi_i, now)),))
        self.m._out.append(Datagram(encode_message(reply), local, remote))
        return True

    def refuse_init(self, spi_i: int, reason: str, ntype: int, local: Addr, remote: Addr, now: float) -> None:
        """<-- HDR(SPIi, 0), N(error) (§1.2, §2.21.1): no state kept; counted and summarised."""
        reply = Message(spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, False, True, (NotifyPayload(int(ntype)),))
        self.m._out.append(Datagram(encode_message(reply), local, remote))
        self.refused(reason, remote, now,
                     f"IKE_SA_INIT {reason.replace('_', ' ')}: answered {_notify_name(ntype).upper()}")

    def refused(self, reason: str, remote: Addr, now: float, detail: str = "") -> None:
        """Count ``init_refused_<reason>``; an InitsRefused event at once after a quiet interval,
        else at most one per REFUSAL_SUMMARY_S (a timer brings the last one)."""
        self.m._count(f"init_refused_{reason}")
        summary = self.m._refusals.add(reason, remote, now, detail)
        if summary is not None:
            self.m._events.append(InitsRefused(*summary))
            return
        due = self.m._refusals.due()
        if due is not None and due != self.m._refusal_timer:
            self.m._refusal_timer = due
            self.m._timers.push(due, ("refusals", ""))

    def half_open_gone(self, sa: IkeSa, ev: IkeSaDeleted, now: float) -> bool:
        """True if ``ev`` ends a responder IKE_SA that never got past IKE_SA_INIT (no peer known,
        evicted or expired): then it is counted (``half_open_dropped_<kind>``) and summarised in a
        HalfOpenDropped event (at once after a quiet interval, else at most one per
        REFUSAL_SUMMARY_S), never one IkeSaDeleted (= one log line) per attacker datagram. Our
        own initiations and anything after IKE_AUTH keep their IkeSaDeleted."""
        if sa.initiator or ev.peer or sa.established_at or ev.kind not in SUMMARISED_ENDINGS:
            return False
        self.m._count(f"half_open_dropped_{ev.kind}")
        summary = self.m._ho_drops.add(str(ev.kind), sa.remote, now, ev.reason)
        if summary is not None:
            self.m._events.append(HalfOpenDropped(*summary))
            return True
        due = self.m._ho_drops.due()
        if due is not None and due != self.m._ho_drop_timer:
            self.m._ho_drop_timer = due
            self.m._timers.push(due, ("half_open_drops", ""))
        return True

    def charge(self, sa: IkeSa, now: float | None = None) -> None:
        """Re-count what the half-open ``sa`` holds; beyond ``half_open_bytes_max`` the oldest
        other half-open IKE_SAs are dropped."""
        spi = sa.my_spi
        frags = getattr(sa, "_frag_rx", None) or {}
        cost = (HALF_OPEN_BASE_BYTES + len(getattr(sa, "_init_request", b"") or b"")
                + len(getattr(sa, "_init_response", b"") or b"") + sum(r.held() for r in frags.values()))
        self.m._ho_bytes += cost - self.m._ho_cost.get(spi, 0)
        self.m._ho_cost[spi] = cost
        while self.m._ho_bytes > self.m.half_open_bytes_max and len(self.m._half_open) > 1:
            self.evict_oldest(keep=sa, now=now)

    def evict_oldest(self, keep: IkeSa | None = None, now: float | None = None) -> None:
        """Drop the oldest half-open IKE_SA (not ``keep``), counted ``half_open_evicted``."""
        it = iter(self.m._half_open.items())
        old_key, old = next(it)
        if old is keep:
            old_key, old = next(it)
        self.m._count("half_open_evicted")
        old._die("half-open IKE_SA dropped: too many half-open IKE_SAs", DeleteReason.DROPPED)
        self.m._collect(old, old.created_at if now is None else now)
        self.forget_half_open(old, old.my_spi)
        if self.m._half_open.get(old_key) is old:  # not expected: the caller's loop must end all the same
            del self.m._half_open[old_key]

    def new_half_open(self, key: tuple[str, int], local: Addr, remote: Addr, now: float, size: int) -> IkeSa:
        """A responder IKE_SA for a new IKE_SA_INIT of ``size`` octets. At ``half_open_max``, or
        when it would not fit ``half_open_bytes_max``, the oldest half-open IKE_SAs go first; under
        pressure (COOKIE mode, also by rate) the new one gets the shorter pressure timeout."""
        est = HALF_OPEN_BASE_BYTES + size
        while self.m._half_open and (len(self.m._half_open) >= self.m.half_open_max
                                   or self.m._ho_bytes + est > self.m.half_open_bytes_max):
            self.evict_oldest(now=now)
        cfg = self.m._responder_config()
        if self.pressure() or self.m._init_bucket.empty(now):
            cfg.half_open_timeout_s = self.m.half_open_pressure_timeout_s
        sa = IkeSa.new_responder(cfg, self.m.rng, local, remote, key[1], now)
        self.m._sas[sa.my_spi] = sa
        self.m._ho_cost[sa.my_spi] = est
        self.m._ho_bytes += est
        self.m._half_open[key] = sa
        self.m._half_open_key[sa.my_spi] = key
        self.m._half_open_by_ip[key[0]] = self.m._half_open_by_ip.get(key[0], 0) + 1
        return sa

    def remember_init(self, sa: IkeSa) -> None:
        """Keep (remote ip, SPIi) of an IKE_SA we established as responder, so that a late
        retransmission of its IKE_SA_INIT (quick IKE_SA_INIT retransmissions, agent.ike.retransmit)
        is ignored instead of opening a second, half-open IKE_SA. Bounded (oldest forgotten)."""
        key = self.m._half_open_key.get(sa.my_spi)
        if key is None:
            return
        self.m._inits_done[key] = None
        if len(self.m._inits_done) > _INITS_DONE_MAX:
            del self.m._inits_done[next(iter(self.m._inits_done))]

    def forget_half_open(self, sa: IkeSa, spi: int | None = None) -> None:
        """Drop ``sa`` from the half-open tables. ``spi``: our SPI as it was made (a stateless
        refusal resets SPIr to 0); given, ``sa`` also leaves the IKE_SAs and the timer heap."""
        if spi is None:
            spi = sa.my_spi
        elif self.m._sas.get(spi) is sa:
            del self.m._sas[spi]
            self.m._deadline.pop(spi, None)
        key = self.m._half_open_key.pop(spi, None)
        if key is None or self.m._half_open.get(key) is not sa:
            return
        self.m._ho_bytes -= self.m._ho_cost.pop(spi, 0)
        del self.m._half_open[key]
        n = self.m._half_open_by_ip.get(key[0], 0) - 1
        if n > 0:
            self.m._half_open_by_ip[key[0]] = n
        else:
            self.m._half_open_by_ip.pop(key[0], None)


__all__ = ["Admission", "TokenBucket", "RefusalTally", "refusal_of", "new_init_header", "INIT_RATE", "MAX_INIT_LEN",
           "HALF_OPEN_BYTES_MAX", "HALF_OPEN_BASE_BYTES", "REFUSAL_SUMMARY_S"]
