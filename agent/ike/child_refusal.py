"""CHILD_SA refusals (RFC 7296 §1.2, §2.21.2): the IKE_SA stays, the CHILD_SA backs off.

The ChildRefusals of an IkeSa (``sa.refusals``). When the peer refuses the CHILD_SA of our IKE_AUTH
request (TS_UNACCEPTABLE, NO_PROPOSAL_CHOSEN, ...) the IKE_SA is authenticated all the same
(§1.2: "the IKE SA is still created"): it stays ESTABLISHED without that CHILD_SA, and we try
the CHILD_SA again with CREATE_CHILD_SA (§1.3.1) after an exponential backoff (2, 4, 8 ... s,
capped at CHILD_RETRY_MAX_S). Each refusal, ours as responder too, is a ChildSaRefused event
naming the peer, the notify and what was offered, so the shell can log it.

Which refusals keep the IKE_SA is decided from the Notify Message Type
(CHILD_SA_REFUSALS), never from reason strings.

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import EncrId, EsnId, IntegId, KeId, NotifyType, ProtocolId, TransformType, name_of
from agent.ike.errors import IkeSaState
from agent.ike.events import ChildSaRefused

CHILD_RETRY_BASE_S = 2.0
CHILD_RETRY_MAX_S = 120.0
PAIR_BACKOFFS_MAX = 256  # refused selector pairs remembered per IKE_SA (oldest forgotten first)
CHILD_ERRORS_MAX = 16  # reasons kept in IkeSa.child_errors

# error notifies that concern the CHILD_SA alone (§2.21.2, §1.3.1): the IKE_SA stays up.
# CP failures (FAILED_CP_REQUIRED, INTERNAL_ADDRESS_FAILURE) are not here: the address comes
# only with IKE_AUTH, so a CREATE_CHILD_SA cannot repair them.
CHILD_SA_REFUSALS = frozenset({
    NotifyType.NO_PROPOSAL_CHOSEN, NotifyType.TS_UNACCEPTABLE, NotifyType.SINGLE_PAIR_REQUIRED,
    NotifyType.INVALID_SELECTORS, NotifyType.TEMPORARY_FAILURE,
})

_TYPE_ENUM = {TransformType.ENCR: EncrId, TransformType.INTEG: IntegId, TransformType.KE: KeId,
              TransformType.ESN: EsnId}


def describe_sa(sa) -> str:
    """Proposals of a received SA payload for a log line, e.g.
    ``ESP#1 ENCR_AES_GCM_16_256 ESN NO_EXTENDED_SEQUENCE_NUMBERS``; "-" when absent."""
    if sa is None or not getattr(sa, "proposals", ()):
        return "-"
    out = []
    for p in sa.proposals[:8]:  # bounded: the peer chooses how many it sends
        parts = []
        for t in p.transforms[:16]:
            enum = _TYPE_ENUM.get(t.type)
            name = name_of(enum, t.id) if enum is not None else f"{name_of(TransformType, t.type)}:{t.id}"
            parts.append(name + (f"_{t.key_length}" if t.key_length else ""))
        out.append(f"{name_of(ProtocolId, p.protocol)}#{p.number} {' '.join(parts)}")
    return "; ".join(out) + (f"; ... {len(sa.proposals) - 8} more" if len(sa.proposals) > 8 else "")


def describe_ts(tsi, tsr) -> str:
    """Traffic selectors of a request for a log line, e.g. ``TSi 10.1.0.0/16 TSr 10.2.0.0/16``."""
    def one(tsp) -> str:
        if tsp is None:
            return "-"
        parts = []
        for s in tsp.selectors[:8]:
            nets = ",".join(str(n) for n in s.networks()[:4]) or "?"
            if getattr(s, "ip_protocol", 0) or (getattr(s, "start_port", 0), getattr(s, "end_port", 65535)) != (0, 65535):
                nets += f"[proto {s.ip_protocol} ports {s.start_port}-{s.end_port}]"
            parts.append(nets)
        return " ".join(parts) or "-"
    return f"TSi {one(tsi)} TSr {one(tsr)}"


class BoundedErrors(list):
    """``IkeSa.child_errors``: the last CHILD_ERRORS_MAX reasons why CHILD_SAs we asked for failed
    (a list, so it compares with one); bounded, since refusals may repeat for the IKE_SA's life."""

    def append(self, reason: str) -> None:
        super().append(reason)
        if len(self) > CHILD_ERRORS_MAX:
            del self[:len(self) - CHILD_ERRORS_MAX]


class ChildRefusals:
    """CHILD_SA refusal events and the CHILD_SA retry backoff of one IkeSa."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.retry_at: float | None = None
        self.backoff = 0.0
        self.wanted: tuple | None = None  # (local nets, remote nets, kind) to retry
        self.retry_task = None  # the CREATE_CHILD_SA task of the running retry
        self.count = 0  # refusals of our CHILD_SA in a row
        # other refused CHILD_SAs we asked for (an acquire per selector pair, §1.3.1):
        # (local nets, remote nets, kind) -> (backoff s, not asked again before)
        self.pairs: dict[tuple, tuple[float, float]] = {}

    @staticmethod
    def offer_text(sa_p, tsi, tsr) -> str:
        """What the peer's refused CHILD_SA request offered: proposals and selectors."""
        return f"offered {describe_sa(sa_p)}; {describe_ts(tsi, tsr)}"

    def ts_allowed_text(self) -> str:
        """The selectors we accept from the peer (PAD, §2.9): TSi its networks, TSr ours."""
        sa = self.sa
        return (f"we allow TSi {','.join(str(n) for n in sa._remote_allowed()) or '-'} "
                f"TSr {','.join(str(n) for n in sa._local_nets()) or '-'}")

    def by_us(self, reason: str, notify: int, offered: str) -> None:
        """As responder: we answer the peer's CHILD_SA with ``notify``; report it (no retry)."""
        sa = self.sa
        sa.events.append(ChildSaRefused(sa.peer_name, sa.spi_i, sa.spi_r, "us", reason, int(notify), offered))

    def by_peer(self, reason: str, notify: int | None, now: float, wanted: tuple | None = None) -> None:
        """Our CHILD_SA (IKE_AUTH or its CREATE_CHILD_SA retry) was refused: back off, then try
        again with CREATE_CHILD_SA; ``wanted``: (local nets, remote nets, kind) to ask for."""
        sa = self.sa
        if wanted is not None:
            self.wanted = wanted
        self.retry_task = None
        self.count += 1
        self.backoff = min(CHILD_RETRY_MAX_S, self.backoff * 2 if self.backoff else CHILD_RETRY_BASE_S)
        retry = self.backoff if self.wanted is not None else None
        self.retry_at = now + retry if retry is not None else None
        sa.events.append(ChildSaRefused(sa.peer_name, sa.spi_i, sa.spi_r, "peer", reason,
                                        int(notify) if notify is not None else None, "", retry))

    def by_peer_pair(self, key: tuple, reason: str, notify: int | None, now: float) -> None:
        """Another CHILD_SA we asked for (``key`` = (local nets, remote nets, kind)) was refused:
        back off asking for that pair again (2, 4 ... s, capped at CHILD_RETRY_MAX_S; the next
        acquire after that asks), and report it like the others."""
        sa = self.sa
        backoff = min(CHILD_RETRY_MAX_S, self.pairs[key][0] * 2 if key in self.pairs else CHILD_RETRY_BASE_S)
        self.pairs.pop(key, None)
        if len(self.pairs) >= PAIR_BACKOFFS_MAX:
            del self.pairs[next(iter(self.pairs))]
        self.pairs[key] = (backoff, now + backoff)
        local, remote, kind = key
        offered = (f"asked for {str(kind).upper()} TSi {','.join(str(n) for n in local) or '-'} "
                   f"TSr {','.join(str(n) for n in remote) or '-'}")
        sa.events.append(ChildSaRefused(sa.peer_name, sa.spi_i, sa.spi_r, "peer", reason,
                                        int(notify) if notify is not None else None, offered, backoff))

    def pair_holds(self, key: tuple, now: float) -> bool:
        """True while the refused CHILD_SA for ``key`` waits out its backoff."""
        held = self.pairs.get(key)
        return held is not None and now < held[1]

    def pair_done(self, key: tuple) -> None:
        """The CHILD_SA for ``key`` is up: its backoff starts over."""
        self.pairs.pop(key, None)

    def retry_done(self) -> None:
        """The retried CHILD_SA is up: the backoff starts over."""
        self.retry_at = None
        self.backoff = 0.0
        self.wanted = None
        self.retry_task = None
        self.count = 0

    def backoff_holds(self, now: float) -> bool:
        """True while the refused CHILD_SA waits for its retry (or the retry is in flight): an
        acquire must not ask the peer again before (the shell asks every few seconds)."""
        return self.wanted is not None and (
            self.retry_task is not None or (self.retry_at is not None and now < self.retry_at))

    def timers(self) -> list[float]:
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED or self.retry_at is None or sa._successor is not None:
            return []
        return [self.retry_at]

    def handle(self, now: float) -> bool:
        """Start the CREATE_CHILD_SA retry when its time has come; True if it was due."""
        sa = self.sa
        if (sa.state != IkeSaState.ESTABLISHED or self.retry_at is None or now < self.retry_at
                or sa._successor is not None):
            return False
        self.retry_at = None
        local, remote, kind = self.wanted
        if any(c.protocol == kind for c in sa.children):
            self.retry_done()  # the peer created one meanwhile
            return True
        self.retry_task = sa.child_create.start_new(tuple(local), tuple(remote), kind, now)
        return True

    def inherit(self, old: "ChildRefusals") -> None:
        """IKE_SA rekey (§1.3.2): a pending CHILD_SA retry moves to the new IKE_SA."""
        if old.wanted is not None and old.retry_task is None:
            self.wanted, self.backoff = old.wanted, old.backoff
            self.retry_at, self.count = old.retry_at, old.count
        self.pairs.update(old.pairs)


__all__ = ["BoundedErrors", "ChildRefusals", "CHILD_ERRORS_MAX", "PAIR_BACKOFFS_MAX", "CHILD_SA_REFUSALS", "CHILD_RETRY_BASE_S", "CHILD_RETRY_MAX_S", "describe_sa",
           "describe_ts"]
