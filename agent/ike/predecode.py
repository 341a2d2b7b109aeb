"""Routing of a received IKE message by its header alone, before any payload is decoded
(issue 13; docs/ike-hardening.md "Before decoding").

Decoding is the expensive part of an unauthenticated datagram (a 46 KB one with 40 SA payloads
took 6-10 ms, 5,120 transforms). A datagram that is not a new IKE_SA_INIT request (those go
through admission.py) is matched here against the IKE_SA its SPIs name (RFC 7296 §2.6), its
I/R flags (§3.1) and the Message ID window (§2.3); only one that an existing IKE_SA could take
is decoded. The one exception are unprotected INFORMATIONAL notifies (§1.5, §2.21.4 hints):
at most MAX_UNPROTECTED_NOTIFIES Notify payloads (generic headers read first), and the manager
decodes them only when their SPIs name an IKE_SA of ours or they come from a configured peer's
address (anything else could only be counted as unsolicited after decoding).

Reads IkeSa's window fields (``_pending``, ``_peer_mid``, ``_cached_response``, ``_keys``): the
same tests IkeSa.receive makes after decoding, made before. Pure module: no I/O.
"""
from __future__ import annotations

from agent.iana import ExchangeType, PayloadType
from agent.ike.errors import Drop
from agent.ike.message import FLAG_INITIATOR, FLAG_RESPONSE, HEADER_LEN, Header, MessageError, decode_header, \
    scan_payloads
from agent.ike.sa import IkeSa

MAX_UNPROTECTED_NOTIFIES = 4  # INVALID_IKE_SPI / INVALID_SPI hints come one at a time
UNKNOWN_EXCHANGE = "unknown_exchange"  # counter: an exchange type no IKE_SA of ours takes part in
KNOWN_EXCHANGES = frozenset({ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA,
                             ExchangeType.INFORMATIONAL, ExchangeType.IKE_INTERMEDIATE,
                             ExchangeType.IKE_FOLLOWUP_KE})


def unprotected_notify(h: Header, data: bytes) -> bool:
    """True if ``data`` is HDR(INFORMATIONAL), N, ... with only Notify payloads, at most
    MAX_UNPROTECTED_NOTIFIES of them (generic headers read, bodies not). Raises nothing."""
    if h.exchange != ExchangeType.INFORMATIONAL or h.first != PayloadType.NOTIFY:
        return False
    try:
        types = [t for t, _a, _b in scan_payloads(h.first, data, HEADER_LEN)]
    except MessageError:
        return False
    return len(types) <= MAX_UNPROTECTED_NOTIFIES and all(t == PayloadType.NOTIFY for t in types)


def route(sas: dict[int, IkeSa], data: bytes) -> tuple[Header | None, IkeSa | None, str | None]:
    """(header, IKE_SA, drop reason) for a datagram that is not a new IKE_SA_INIT request.

    drop reason (a counter name) set: drop it undecoded: "malformed" (bad header, or the I flag
    gives the sender our role), "unknown_exchange", "unknown_spi" (the caller may answer
    INVALID_IKE_SPI from the header), "invalid_message_id" (a response to no request of ours, a
    request outside the window, IKE_SA_INIT with a Message ID other than 0, or anything but
    IKE_SA_INIT before the IKE_SA has keys). No drop and IKE_SA None: an unprotected notify
    (``unprotected_notify``). Never raises."""
    try:
        h = decode_header(data)
    except MessageError:
        return None, None, Drop.MALFORMED
    if unprotected_notify(h, data):
        return h, None, None
    if h.exchange not in KNOWN_EXCHANGES:
        return h, None, UNKNOWN_EXCHANGE
    from_initiator = bool(h.flags & FLAG_INITIATOR)
    sa = sas.get(h.spi_r if from_initiator else h.spi_i)
    their = (sa.spi_i if from_initiator else sa.spi_r) if sa is not None else 0
    if sa is None or sa.is_dead or (their and their != (h.spi_i if from_initiator else h.spi_r)):
        return h, None, Drop.UNKNOWN_SPI
    if from_initiator == sa.initiator:
        return h, sa, Drop.MALFORMED
    mid = h.message_id
    if h.exchange == ExchangeType.IKE_SA_INIT and mid != 0:
        return h, sa, Drop.INVALID_MESSAGE_ID
    if h.flags & FLAG_RESPONSE:
        p = sa._pending
        if p is None or mid != p.message_id or h.exchange != p.exchange:
            return h, sa, Drop.INVALID_MESSAGE_ID
        return h, sa, None
    cached = sa._cached_response
    if cached and mid == cached[0] and mid < sa._peer_mid:
        return h, sa, None  # a retransmission: IkeSa compares its digest
    if mid != sa._peer_mid or (h.exchange != ExchangeType.IKE_SA_INIT and sa._keys is None):
        return h, sa, Drop.INVALID_MESSAGE_ID
    return h, sa, None
