"""Typed reasons of the IKE core: states, modes, drop and delete kinds, protocol errors.

h11's model: a failure is an exception whose class says whose fault it is, carrying
the IANA Notify Message Type (RFC 7296 §3.10.1) that goes with it:

- :class:`RemoteProtocolError`: the peer's message breaks RFC 7296 or our policy;
  ``notify`` is the error we answer with (INVALID_SYNTAX, NO_PROPOSAL_CHOSEN, ...).
- :class:`LocalProtocolError`: the peer refused what we sent; ``notify`` is the error
  notify it answered with (our proposal, KE method or selectors did not fit).

Every end of an IKE_SA carries a :class:`DeleteReason` (events.IkeSaDeleted.kind) next to
its human text; the manager decides re-initiation and backoff from the kind, never from
words in the text. Every dropped message is counted under a :class:`Drop` name. Enums are
StrEnums: they compare, hash, format and serialise as their string values, so logs, status
JSON and counter names are unchanged.

Pure module: no I/O.
"""
from __future__ import annotations

from enum import StrEnum

from agent.iana import ExchangeType, NotifyType


class IkeSaState(StrEnum):
    """State of an IKE_SA (RFC 7296 §1.2, §1.4)."""
    CONNECTING = "CONNECTING"  # IKE_SA_INIT (and IKE_INTERMEDIATE) in progress
    AUTHENTICATING = "AUTHENTICATING"  # keys derived, IKE_AUTH in progress
    ESTABLISHED = "ESTABLISHED"
    DELETING = "DELETING"  # our Delete sent, its response awaited
    DELETED = "DELETED"


class Mode(StrEnum):
    """IPsec mode of a CHILD_SA (RFC 4301 §4.1; USE_TRANSPORT_MODE, RFC 7296 §1.3.1)."""
    TUNNEL = "tunnel"
    TRANSPORT = "transport"


class Protocol(StrEnum):
    """Security protocol of a CHILD_SA (RFC 4303 ESP, RFC 4302 AH)."""
    ESP = "esp"
    AH = "ah"


class Drop(StrEnum):
    """Why a received IKE message was dropped: counter names (``ike_drop_<name>``)."""
    UNKNOWN_SPI = "unknown_spi"
    MALFORMED = "malformed"
    INVALID_MESSAGE_ID = "invalid_message_id"
    BAD_ICV = "bad_icv"
    UNEXPECTED_PAYLOAD = "unexpected_payload"
    PAYLOAD_LIMIT = "payload_limit"
    RETRANSMISSION_MISMATCH = "retransmission_mismatch"
    MISSING_INTERMEDIATE = "missing_intermediate"  # IKE_AUTH before the RFC 9370 exchanges
    INVALID_KE_PAYLOAD = "invalid_ke_payload"
    INVALID_KE_DATA = "invalid_ke_data"


class DeleteReason(StrEnum):
    """Kind of an IKE_SA's end (events.IkeSaDeleted.kind); the text says the details."""
    LOCAL = "local"  # deleted on purpose here: API call, shutdown, peer removed from the view
    RECONFIGURED = "reconfigured"  # its peer's policy changed: deleted here, set up again
    REKEYED = "rekeyed"  # replaced by its rekey (§1.3.2); the CHILD_SAs moved
    SUPERSEDED = "superseded"  # another IKE_SA replaces it: redundant rekey (§2.8.1), INITIAL_CONTACT
    DUPLICATE = "duplicate"  # one of two IKE_SAs with the same peer: duplicate, moot, restarted
    PEER_DELETED = "peer_deleted"  # the peer sent D(IKE)
    EXPIRED = "expired"  # hard lifetime (§2.8)
    TIMEOUT = "timeout"  # the peer did not respond to a request (§2.1)
    SETUP_TIMEOUT = "setup_timeout"  # not ESTABLISHED in time (half-open, setup backstop)
    AUTH_FAILED = "auth_failed"  # AUTHENTICATION_FAILED, sent or received (§2.21.2)
    REFUSED = "refused"  # policy says no: revoked certificate, unusable policy, no own credential
    PROTOCOL_ERROR = "protocol_error"  # LocalProtocolError / RemoteProtocolError
    DROPPED = "dropped"  # a half-open IKE_SA given up under load or for a newer attempt


# kinds after which the manager does not set the IKE_SA up again on its own
NO_RETRY = frozenset({DeleteReason.LOCAL, DeleteReason.REKEYED, DeleteReason.SUPERSEDED, DeleteReason.DUPLICATE})
# kinds that are no failure worth showing (rekeys, our own deletes, a peer restart)
BENIGN = frozenset({DeleteReason.LOCAL, DeleteReason.REKEYED, DeleteReason.SUPERSEDED})
# kinds re-initiated after the longer authentication backoff
AUTH_BACKOFF = frozenset({DeleteReason.AUTH_FAILED, DeleteReason.REFUSED})


class IkeError(Exception):
    """A typed IKE failure that ends the IKE_SA: ``text`` (for people), ``notify`` (NotifyType
    or None), ``data`` (its Notification Data, e.g. the group of INVALID_KE_PAYLOAD) and
    ``kind`` (DeleteReason: AUTH_FAILED for AUTHENTICATION_FAILED, else PROTOCOL_ERROR unless
    given). A task raises it; the IkeSa ends with it (and answers a request with ``notify``)."""

    def __init__(self, text: str, notify: int | None = None, data: bytes = b"", *,
                 kind: DeleteReason | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.notify = notify
        self.data = data
        self.kind = kind if kind is not None else (
            DeleteReason.AUTH_FAILED if notify == NotifyType.AUTHENTICATION_FAILED else DeleteReason.PROTOCOL_ERROR)


class RemoteProtocolError(IkeError):
    """The peer's message breaks RFC 7296 or our policy; ``notify``: our answer."""


class LocalProtocolError(IkeError):
    """The peer refused our request; ``notify``: the error notify it answered with."""


class CryptoError(Exception):
    """Base class of every error raised by agent.ike.crypto."""


class IntegrityError(CryptoError):
    """An ICV (SK payload checksum or AEAD tag) did not verify."""


class KeyExchangeError(CryptoError):
    """A KE method we cannot run or a peer KE value we must reject (RFC 6989)."""


class AuthError(Exception):
    """Authentication failed or cannot be performed; the message says why
    (never containing key material). Maps to AUTHENTICATION_FAILED (RFC 7296 §2.21.2)."""

    kind = DeleteReason.AUTH_FAILED


def notify_name(t: int) -> str:
    """IANA name of a Notify Message Type, or NOTIFY(<number>)."""
    try:
        return NotifyType(t).name
    except ValueError:
        return f"NOTIFY({t})"


def exchange_name(t: int) -> str:
    """IANA name of an Exchange Type, or EXCHANGE(<number>)."""
    try:
        return ExchangeType(t).name
    except ValueError:
        return f"EXCHANGE({t})"


__all__ = ["notify_name", "exchange_name", "IkeSaState", "Mode", "Protocol", "Drop", "DeleteReason", "NO_RETRY", "BENIGN", "AUTH_BACKOFF",
           "IkeError", "RemoteProtocolError", "LocalProtocolError", "CryptoError", "IntegrityError",
           "KeyExchangeError", "AuthError"]
