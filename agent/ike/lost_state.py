"""A peer that lost its state, or we ours (RFC 7296 §2.21.4, §1.5; sans-I/O): INVALID_IKE_SPI for
encrypted requests to IKE_SAs we do not know, unprotected INVALID_IKE_SPI / INVALID_SPI taken as
hints, and the datapath's unknown-SPI hint. Unauthenticated input: rate-limited per address and
indexed (no scan of the peers per source address). docs/ike-hardening.md "A peer that lost its
state".

Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike.events import Addr
from agent.ike.message import FLAG_INITIATOR, FLAG_RESPONSE, Header, Message, NotifyPayload, encode_message
from agent.ike.sa import IKE_PORT, Datagram, IkeSa, State

INVALID_IKE_SPI_INTERVAL_S = 1.0  # at most one unprotected INVALID_IKE_SPI per source per interval
HINT_INTERVAL_S = 5.0  # unknown-SPI hints acted on at most once per address per interval
INVALID_SPI_INTERVAL_S = 2.0  # at most one unprotected N(INVALID_SPI) per source address per interval


class LostState:
    """What IkeManager does when one side lost the IKE_SA (§2.21.4). ``m``: the IkeManager whose
    tables it works on (they stay there, one home for state)."""

    def __init__(self, m) -> None:
        self.m = m

    def answer_unknown_spi(self, h: Header, local: Addr, remote: Addr, now: float) -> None:
        """<-- HDR(same SPIs and Message ID), N(INVALID_IKE_SPI), unprotected: only for an encrypted
        request (never a response), rate-limited per source, no state kept. ``h``: the request's
        header alone (its payloads are never decoded, issue 13)."""
        if h.flags & FLAG_RESPONSE or h.first not in (PayloadType.SK, PayloadType.SKF):
            return
        if not self.m._rate_ok(self.m._invalid_spi_sent, remote[0], now, INVALID_IKE_SPI_INTERVAL_S):
            self.m._count("invalid_ike_spi_rate_limited")
            return
        reply = Message(h.spi_i, h.spi_r, int(ExchangeType.INFORMATIONAL), h.message_id,
                        not h.flags & FLAG_INITIATOR, True, (NotifyPayload(int(NotifyType.INVALID_IKE_SPI)),))
        self.m._out.append(Datagram(encode_message(reply), local, remote))
        self.m._count("invalid_ike_spi_sent")
        self.initiate_after_lost_state(remote, now)

    def initiate_after_lost_state(self, remote: Addr, now: float) -> None:
        """We just told a configured peer that we do not know its IKE_SA (we restarted, it still
        checks our liveness): start an IKE_SA ourselves, whatever the tie-break says, since the
        peer may ignore INVALID_IKE_SPI (strongSwan does) and keep the dead IKE_SA for a minute.
        Ours carries INITIAL_CONTACT (§2.4), so the peer drops the old one at once. Only with
        no IKE_SA to that peer at all (none being set up either: no duplicate), rate-limited
        per address as the unknown-SPI hints are."""
        peers = self.m._peers_at(remote[0])  # an index: this runs for any source address
        peer = peers[0] if peers else None
        if peer is None or self.m._shutdown or self.m._sas_of(peer.name) or not self.m._joining.may_start(peer):
            return
        if not self.m._rate_ok(self.m._hinted, remote[0], now, HINT_INTERVAL_S):
            return
        try:
            self.m.initiate(peer.name, now)
        except ValueError:
            return
        if self.m._sas_of(peer.name):
            self.m._count("initiated_after_invalid_ike_spi")

    def unprotected_notify(self, msg: Message, remote: Addr, now: float) -> None:
        """HDR, N(INVALID_IKE_SPI | INVALID_SPI) without SK: the peer may have lost its state.
        Unauthenticated, so only a hint: a liveness check of our IKE_SA with that address."""
        kinds = {p.notify_type for p in msg.payloads}
        if not kinds & {NotifyType.INVALID_IKE_SPI, NotifyType.INVALID_SPI}:
            self.m._count("unexpected_payload")
            return
        sa = self.m._sas.get(msg.spi_i) or self.m._sas.get(msg.spi_r)
        if (sa is not None and sa.state == State.DELETING and sa.remote[0] == remote[0]
                and NotifyType.INVALID_IKE_SPI in kinds):
            # our Delete answered "no such IKE_SA" (the peer dropped it already, e.g. on an
            # INITIAL_CONTACT): nothing left to wait for; at worst a forgery ends it early
            sa._finish_delete()
            self.m._collect(sa, now)
            self.m._count("delete_answered_invalid_ike_spi")
            return
        if sa is None or sa.is_dead or sa.remote[0] != remote[0] or sa.state != State.ESTABLISHED:
            sa = next((s for p in self.m._peers_at(remote[0]) for s in self.m._sas_of(p.name)
                       if s.remote[0] == remote[0] and s.state == State.ESTABLISHED), None)
        if sa is None:
            self.m._count("unsolicited_notify")
            return
        self.m._count("invalid_spi_hint")
        self.probe(sa, remote[0], now)

    def probe(self, sa: IkeSa, ip: str, now: float) -> bool:
        if not self.m._rate_ok(self.m._hinted, ip, now, HINT_INTERVAL_S):
            self.m._count("hint_rate_limited")
            return False
        started = sa.check_liveness(now, hinted=True)
        self.m._collect(sa, now)
        return started

    def tell_invalid_spi(self, remote_addr, spi: bytes, now: float, *, configured: bool) -> None:
        """§1.5: ESP/AH with an SPI we do not know and no IKE_SA to say so over: an unprotected
        HDR(random SPIi, 0, I), N(INVALID_SPI, data = the SPI) to the packet's source address, to
        its UDP port if it came in UDP 4500 (else to 500). The peer takes it as a hint only and
        starts a liveness check (``unprotected_notify``), so a restarted node is noticed at once.

        Sent only with a view that has peers (never before the first view), at most once per
        source address per INVALID_SPI_INTERVAL_S, and only to a configured peer's endpoint
        (``configured``) or, for ESP in UDP from another address, when the view has a PROTECT peer
        without endpoints (one behind a NAT: the only peer that can come from an address we cannot
        know) and no ESTABLISHED IKE_SA uses that address. The datagram is smaller than any ESP
        packet that causes it (no amplification)."""
        m = self.m
        if m._shutdown or len(spi) != 4 or not m.view.peers:
            return
        ip = remote_addr[0] if isinstance(remote_addr, tuple) else str(remote_addr)
        port = remote_addr[1] if isinstance(remote_addr, tuple) and len(remote_addr) > 1 else 0
        if not configured and not (port and any(not p.endpoints and p.policy.action == "protect"
                                                for p in m.view.peers)):
            m._count("invalid_spi_not_sent")
            return
        if not m._rate_ok(m._esp_invalid_spi_sent, ip, now, INVALID_SPI_INTERVAL_S):
            m._count("invalid_spi_rate_limited")
            return
        if not configured and any(sa.remote[0] == ip and sa.state == State.ESTABLISHED for sa in m._live()):
            return  # an IKE_SA with that address is up (a late packet of a rekeyed SA): nothing lost
        spi_i = int.from_bytes(m.rng(8), "big") or 1  # zero or random: §1.5 (our decoder refuses zero)
        msg = Message(spi_i, 0, int(ExchangeType.INFORMATIONAL), 0, True, False,
                      (NotifyPayload(int(NotifyType.INVALID_SPI), data=bytes(spi)),))
        local = (m.local_address, 4500 if port else IKE_PORT)
        m._out.append(Datagram(encode_message(msg), local, (ip, port or IKE_PORT)))
        m._count("invalid_spi_sent")

    def hint_unknown_spi(self, remote_addr, now: float, spi: bytes = b"") -> str:
        """The datapath received ESP (or AH) with an SPI it does not know from ``remote_addr``
        (an IP string or (ip, port)): the peer still uses SAs we lost (§1.5), or we lost its.
        ``spi``: that SPI (4 octets); with it, and no ESTABLISHED IKE_SA with the source to
        tell the peer over, an unprotected N(INVALID_SPI) is sent (``tell_invalid_spi``).

        Rate-limited per address (HINT_INTERVAL_S). Returns what was done: "initiated" (no
        IKE_SA with that peer: IKE_SA_INIT started, backoff and policy permitting),
        "liveness_check" (an ESTABLISHED IKE_SA is probed now, §2.4), "in_progress" (an IKE_SA
        is being set up or a request is outstanding), "held" (re-initiation backoff or bad
        policy), "rate_limited", or "unknown_address" (no configured peer has that endpoint).
        Never raises."""
        ip = remote_addr[0] if isinstance(remote_addr, tuple) else str(remote_addr)
        peers = self.m._peers_at(ip)  # an index: hints come from any source address
        peer = peers[0] if peers else None
        if peer is None or self.m._shutdown:
            self.m._count("hint_unknown_address")
            self.tell_invalid_spi(remote_addr, spi, now, configured=False)
            return "unknown_address"
        sas = self.m._sas_of(peer.name)
        est = [sa for sa in sas if sa.state == State.ESTABLISHED]
        if est:
            if not self.m._rate_ok(self.m._hinted, ip, now, HINT_INTERVAL_S):
                self.m._count("hint_rate_limited")
                return "rate_limited"
            started = False
            for sa in est:
                started = sa.check_liveness(now, hinted=True) or started
                self.m._collect(sa, now)
            return "liveness_check" if started else "in_progress"
        self.tell_invalid_spi(remote_addr, spi, now, configured=True)
        if sas:
            return "in_progress"
        if not self.m._rate_ok(self.m._hinted, ip, now, HINT_INTERVAL_S):
            self.m._count("hint_rate_limited")
            return "rate_limited"
        try:
            self.m.initiate(peer.name, now)
        except ValueError:
            return "held"
        return "initiated" if self.m._sas_of(peer.name) else "held"


__all__ = ["LostState", "INVALID_IKE_SPI_INTERVAL_S", "HINT_INTERVAL_S", "INVALID_SPI_INTERVAL_S"]
