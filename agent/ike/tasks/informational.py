"""INFORMATIONAL task (RFC 7296 §1.4, §2.4): deletes and liveness checks, both roles.

- IKE_SA delete: HDR, SK {D(IKE)} -->  <-- HDR, SK {}; the IKE_SA and its CHILD_SAs are
  gone at once (IkeSaDeleted, ChildSaDeleted).
- CHILD_SA delete (§1.4.1): HDR, SK {D(ESP|AH, SPI)} -->  <-- HDR, SK {D(ESP|AH, SPI)}; the
  inbound SA keeps accepting until the peer's response (packets still in flight, e.g. after
  a rekey), then ChildSaDeleted.
- Liveness check (§2.4): HDR, SK {} -->  <-- HDR, SK {}; after an unauthenticated hint
  that the peer lost its state (INVALID_IKE_SPI / INVALID_SPI, §2.21.4) with a short
  schedule (HINT_LIVENESS_TRIES retransmissions).
- Responder: D(IKE) and N(AUTHENTICATION_FAILED) end the IKE_SA; D(ESP|AH) is answered with
  the inbound SPIs of the CHILD_SAs it named, one Delete payload per protocol (§3.11).

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType, NotifyType, ProtocolId
from agent.ike.errors import DeleteReason, IkeSaState
from agent.ike.events import ChildSaDeleted
from agent.ike.message import DeletePayload, Message, NotifyPayload
from agent.ike.sa_config import Datagram

HINT_LIVENESS_TRIES = 3  # liveness check after an unknown-SPI hint: gone 15 s after it starts
DELETE_WAIT_TRIES = 2  # delete(): retransmissions of an outstanding request before giving up (1 + 2 s)

__all__ = ["Informational", "HINT_LIVENESS_TRIES", "DELETE_WAIT_TRIES"]


class Informational:
    """The INFORMATIONAL exchanges of one IkeSa (see the module docstring)."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.closing: list = []  # (ChildSa, reason) whose Delete awaits its response

    # ------------------------------------------------------------ initiator
    def delete_ike(self, now: float, reason: str, kind: DeleteReason) -> None:
        """HDR, SK {D(IKE)} --> on an ESTABLISHED IKE_SA; its events are emitted now."""
        sa = self.sa
        sa._queue.clear()
        if sa._pending is not None:
            # window size 1 (§2.3): the Delete follows the outstanding exchange, whose outcome no
            # longer matters; a silent peer ends it after DELETE_WAIT_TRIES more retransmissions
            sa._pending.on_response = lambda msg, inner, now: None
            sa._pending.max_tries = min(sa._pending.max_tries, sa._pending.tries + DELETE_WAIT_TRIES)
        sa._emit_deleted(reason, kind)
        sa.state = IkeSaState.DELETING
        sa._request(ExchangeType.INFORMATIONAL, [DeletePayload(int(ProtocolId.IKE))],
                    lambda msg, inner, now: sa._finish_delete(), now)

    def delete_child(self, inbound_spi: int, now: float, reason: str, at_once: bool) -> None:
        """HDR, SK {D(ESP|AH, SPI)} --> for one CHILD_SA (§1.4.1); see IkeSa.delete_child."""
        sa = self.sa
        c = next((c for c in sa.children if c.inbound_spi == inbound_spi), None)
        if c is None or sa.state != IkeSaState.ESTABLISHED:
            return
        # §1.4.1: the inbound SA keeps accepting until the peer's response; no new use meanwhile
        sa.children.remove(c)
        if at_once:
            sa.events.append(ChildSaDeleted(sa.peer_name, c.inbound_spi, c.outbound_spi, reason))
        else:
            self.closing.append((c, reason))
        sa._request(ExchangeType.INFORMATIONAL,
                    [DeletePayload(c.protocol_id, 4, (c.inbound_spi.to_bytes(4, "big"),))],
                    lambda msg, inner, now: self._closed(c), now)

    def notify_error(self, ntype: int, reason: str, kind: DeleteReason) -> None:
        """Initiator-side error after IKE_AUTH: HDR, SK {N(error)} --> then gone (§2.21.2); the
        request is sent once and not waited for."""
        sa = self.sa
        data = sa._seal(ExchangeType.INFORMATIONAL, sa._next_mid, False, [NotifyPayload(int(ntype))])
        sa._next_mid += 1
        sa.outbox.append(Datagram(data, sa.local, sa.remote))
        sa._die(reason, kind)

    def _closed(self, c) -> None:
        """The peer answered our D(ESP|AH, SPI): both directions of ``c`` are gone now."""
        sa = self.sa
        for item in list(self.closing):
            if item[0] is c:
                self.closing.remove(item)
                sa.events.append(ChildSaDeleted(sa.peer_name, c.inbound_spi, c.outbound_spi, item[1]))

    def probe(self, now: float, *, hinted: bool = False) -> None:
        """Liveness check: HDR, SK {} -->."""
        sa = self.sa
        sa._request(ExchangeType.INFORMATIONAL, [], lambda msg, inner, now: None, now)
        if hinted and sa._pending is not None:
            sa._pending.max_tries = HINT_LIVENESS_TRIES

    # ------------------------------------------------------------ liveness (§2.4)
    def dpd_interval(self) -> float:
        """Liveness check interval in seconds; 0 (or less): no periodic checks."""
        peer = self.sa.peer
        d = peer.policy.dpd_interval_s if peer else 0
        return d if d and d > 0 else 0.0

    def liveness_timers(self) -> list[float]:
        """When the next periodic liveness check is due (none while a request is outstanding)."""
        sa = self.sa
        dpd = self.dpd_interval()
        if sa.state == IkeSaState.ESTABLISHED and not sa._pending and dpd:
            return [sa.liveness_since + dpd]
        return []

    def handle_liveness(self, now: float) -> None:
        """Start the periodic liveness check when due: HDR, SK {} -->."""
        sa = self.sa
        dpd = self.dpd_interval()
        if sa.state == IkeSaState.ESTABLISHED and not sa._pending and dpd and now >= sa.liveness_since + dpd:
            self.probe(now)

    def check_liveness(self, now: float, *, hinted: bool = False) -> bool:
        """Start a liveness check now (§2.4): HDR, SK {} -->. ``hinted``: after an unauthenticated
        hint that the peer lost its state (INVALID_IKE_SPI / INVALID_SPI, §2.21.4), give up
        after HINT_LIVENESS_TRIES retransmissions instead of the full schedule.
        An outstanding request probes the peer too: after a hint it gets the short schedule.
        Returns False if not ESTABLISHED."""
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED:
            return False
        if sa._pending is not None:
            if hinted:
                sa._pending.max_tries = min(sa._pending.max_tries, HINT_LIVENESS_TRIES)
            return True
        self.probe(now, hinted=hinted)
        return True

    # ------------------------------------------------------------ responder
    def process_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {[N,] [D,] ...} --> ; <-- HDR, SK {[D,] ...} (§1.4)."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        response: list = []
        deletes = [p for p in inner if isinstance(p, DeletePayload)]
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            sa._respond(msg, [], sa.local, sa.remote)
            sa._die("deleted by peer", DeleteReason.PEER_DELETED)
            return None
        if m.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
            sa._respond(msg, [], sa.local, sa.remote)
            sa._die("peer reported AUTHENTICATION_FAILED", DeleteReason.AUTH_FAILED)
            return None
        ours = []
        for d in deletes:
            if d.protocol not in (ProtocolId.ESP, ProtocolId.AH) or d.spi_size != 4:
                continue
            for spi_b in d.spis:
                spi = int.from_bytes(spi_b, "big")
                for c in list(sa.children):
                    if c.outbound_spi == spi and c.protocol_id == d.protocol:
                        sa.children.remove(c)
                        ours.append((c.protocol_id, c.inbound_spi.to_bytes(4, "big")))
                        sa.events.append(ChildSaDeleted(sa.peer_name, c.inbound_spi, c.outbound_spi,
                                                        "deleted by peer"))
        for proto in (ProtocolId.ESP, ProtocolId.AH):  # one Delete payload per protocol (§3.11)
            spis = tuple(b for pid, b in ours if pid == proto)
            if spis:
                response.append(DeletePayload(int(proto), 4, spis))
        return response
