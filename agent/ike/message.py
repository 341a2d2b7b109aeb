"""IKEv2 message codec: header, message, exchange rules; payloads re-exported.

RFC 7296 §3. The payload classes are in agent.ike.payloads, their bodies and the generic
payload chain in agent.ike.payload_codec; every name is importable from here.
``decode_message(data)`` turns a UDP payload (without the non-ESP marker) into a
:class:`Message`; ``encode_message(msg)`` is its exact inverse for every message it can
produce. Decoding raises only :class:`MessageError` for malformed input. The SK payload
(§3.14) is kept encrypted (:class:`EncryptedPayload`); once decrypted, its body is decoded
with :func:`decode_payloads` and the exchange rules are checked with
:func:`check_payload_rules` (§1.2-1.5).

Pure module: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.iana import ExchangeType, NotifyType, PayloadType
# the payloads and their codec live in agent.ike.payloads / agent.ike.payload_codec; re-exported here
from agent.ike.payload_codec import (GENERIC_HEADER_LEN, _encode_sa, decode_payloads, encode_payloads,  # noqa: F401
                                     scan_payloads)
from agent.ike.payloads import (MAX_ATTRIBUTES, MAX_ATTRIBUTES_TOTAL, MAX_PAYLOADS, MAX_PROPOSALS,  # noqa: F401
                                MAX_TRANSFORMS, AuthPayload, CertPayload, CertReqPayload, DeletePayload,
                                EncryptedFragmentPayload, EncryptedPayload, IdPayload, KePayload, MessageError,
                                MessageLimitError, NoncePayload, NotifyPayload, OpaqueSelector, Payload, Proposal,
                                RawPayload, SaPayload, TrafficSelector, Transform, TransformAttribute, TsPayload,
                                UnknownPayload, VendorPayload)

HEADER_LEN = 28
IKE_MAJOR_VERSION = 2
MAX_MESSAGE_LEN = 65535 - 8  # one UDP datagram

# Header flags (§3.1)
FLAG_INITIATOR = 0x08
FLAG_VERSION = 0x10
FLAG_RESPONSE = 0x20


@dataclass(frozen=True)
class Message:
    """One IKE message (§3.1). SPIs as ints; ``payloads`` in wire order."""
    spi_i: int
    spi_r: int
    exchange: int
    message_id: int
    is_initiator: bool  # I flag: the sender is the original initiator
    is_response: bool  # R flag
    payloads: tuple[Payload, ...] = ()
    minor_version: int = 0
    version_flag: bool = False

    def get(self, ptype: int) -> list[Payload]:
        return [p for p in self.payloads if p.payload_type == ptype]

    def first(self, ptype: int) -> Payload | None:
        for p in self.payloads:
            if p.payload_type == ptype:
                return p
        return None

    def notifies(self) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload)]

    def notify(self, ntype: int) -> NotifyPayload | None:
        for p in self.payloads:
            if isinstance(p, NotifyPayload) and p.notify_type == ntype:
                return p
        return None

    @property
    def unsupported_critical(self) -> list[UnknownPayload]:
        return [p for p in self.payloads if isinstance(p, UnknownPayload) and p.critical]

    @property
    def flags(self) -> int:
        return ((FLAG_INITIATOR if self.is_initiator else 0) | (FLAG_RESPONSE if self.is_response else 0)
                | (FLAG_VERSION if self.version_flag else 0))


# --------------------------------------------------------------------------
# Header and message
# --------------------------------------------------------------------------

def encode_header(spi_i: int, spi_r: int, first: int, exchange: int, flags: int,
                  message_id: int, length: int, minor_version: int = 0) -> bytes:
    """§3.1 IKE header (28 octets)."""
    return struct.pack("!QQBBBBII", spi_i, spi_r, first, (IKE_MAJOR_VERSION << 4) | minor_version,
                       exchange, flags, message_id, length)


@dataclass(frozen=True)
class Header:
    spi_i: int
    spi_r: int
    first: int
    major: int
    minor: int
    exchange: int
    flags: int
    message_id: int
    length: int


def decode_header(data: bytes) -> Header:
    """Parse and check the §3.1 header; ``length`` must equal len(data)."""
    if len(data) < HEADER_LEN:
        raise MessageError(f"header: truncated ({len(data)} octets)")
    spi_i, spi_r, first, ver, exch, flags, mid, length = struct.unpack_from("!QQBBBBII", data, 0)
    if ver >> 4 != IKE_MAJOR_VERSION:
        raise MessageError(f"header: unsupported major version {ver >> 4}")
    if length != len(data):
        raise MessageError(f"header: length {length} != datagram length {len(data)}")
    if spi_i == 0:
        raise MessageError("header: SPIi is zero")
    return Header(spi_i, spi_r, first, ver >> 4, ver & 0x0F, exch, flags, mid, length)


def decode_message(data: bytes) -> Message:
    """Decode one IKE message (§3.1, §3.2). Raises only MessageError."""
    try:
        h = decode_header(data)
        try:
            scan_payloads(h.first, data, HEADER_LEN)  # count limit on the headers alone, before any body
        except MessageLimitError:
            raise
        except MessageError:
            pass  # decode_payloads names the problem in more detail
        payloads = decode_payloads(h.first, memoryview(data)[HEADER_LEN:])
    except MessageError:
        raise
    except Exception as e:  # a codec bug must not escape as anything else
        raise MessageError(f"internal decode error: {type(e).__name__}") from e
    return Message(h.spi_i, h.spi_r, h.exchange, h.message_id,
                   bool(h.flags & FLAG_INITIATOR), bool(h.flags & FLAG_RESPONSE),
                   payloads, h.minor, bool(h.flags & FLAG_VERSION))


def encode_message(msg: Message) -> bytes:
    """Encode ``msg`` (the SK payload, if any, already encrypted)."""
    first, body = encode_payloads(msg.payloads)
    return encode_header(msg.spi_i, msg.spi_r, first, msg.exchange, msg.flags, msg.message_id,
                         HEADER_LEN + len(body), msg.minor_version) + body


# --------------------------------------------------------------------------
# Exchange rules (§1.2-1.5): allowed payloads per exchange and direction
# --------------------------------------------------------------------------

MANY = 1 << 30


@dataclass(frozen=True)
class PayloadRule:
    ptype: int
    min: int
    max: int


def _rules(*items: tuple[int, int, int]) -> dict[int, PayloadRule]:
    return {int(t): PayloadRule(int(t), lo, hi) for t, lo, hi in items}


_P = PayloadType
# (exchange, is_response) -> (encrypted, rules). Requests that fail are answered
# with only N payloads, so responses have minimums of 0 (checked by the tasks).
PAYLOAD_RULES: dict[tuple[int, bool], tuple[bool, dict[int, PayloadRule]]] = {
    (ExchangeType.IKE_SA_INIT, False): (False, _rules(
        (_P.SA, 1, 1), (_P.KE, 1, 1), (_P.NONCE, 1, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_SA_INIT, True): (False, _rules(
        (_P.SA, 0, 1), (_P.KE, 0, 1), (_P.NONCE, 0, 1), (_P.CERTREQ, 0, MANY),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_AUTH, False): (True, _rules(
        (_P.IDi, 1, 1), (_P.CERT, 0, 4), (_P.CERTREQ, 0, MANY), (_P.IDr, 0, 1), (_P.AUTH, 0, 1),
        (_P.SA, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1), (_P.CP, 0, 1), (_P.EAP, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_AUTH, True): (True, _rules(
        (_P.IDr, 0, 1), (_P.CERT, 0, 4), (_P.AUTH, 0, 1), (_P.SA, 0, 1), (_P.TSi, 0, 1),
        (_P.TSr, 0, 1), (_P.CP, 0, 1), (_P.EAP, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.CREATE_CHILD_SA, False): (True, _rules(
        (_P.SA, 1, 1), (_P.NONCE, 1, 1), (_P.KE, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.CREATE_CHILD_SA, True): (True, _rules(
        (_P.SA, 0, 1), (_P.NONCE, 0, 1), (_P.KE, 0, 1), (_P.TSi, 0, 1), (_P.TSr, 0, 1),
        (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.INFORMATIONAL, False): (True, _rules(
        (_P.NOTIFY, 0, MANY), (_P.DELETE, 0, MANY), (_P.CP, 0, 1), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.INFORMATIONAL, True): (True, _rules(
        (_P.NOTIFY, 0, MANY), (_P.DELETE, 0, MANY), (_P.CP, 0, 1), (_P.VENDOR_ID, 0, MANY))),
    # RFC 9242 §3.2 / RFC 9370 §2.2.2: SK {KEi(n)} / SK {KEr(n)}; errors as N
    (ExchangeType.IKE_INTERMEDIATE, False): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_INTERMEDIATE, True): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    # RFC 9370 §2.2.4: SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)} / SK {KEr(n), [N(ADDITIONAL_KEY_EXCHANGE)]}
    (ExchangeType.IKE_FOLLOWUP_KE, False): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
    (ExchangeType.IKE_FOLLOWUP_KE, True): (True, _rules(
        (_P.KE, 0, 1), (_P.NOTIFY, 0, MANY), (_P.VENDOR_ID, 0, MANY))),
}


def check_outer(msg: Message) -> None:
    """Check the unencrypted part of ``msg`` against the exchange table.

    Exchanges other than IKE_SA_INIT carry exactly one SK payload (§3.14)
    and nothing else outside it. Raises MessageError("unexpected_payload: ...").
    """
    key = (msg.exchange, msg.is_response)
    if key not in PAYLOAD_RULES:
        raise MessageError(f"unexpected_payload: unsupported exchange {msg.exchange}")
    encrypted, rules = PAYLOAD_RULES[key]
    if encrypted:
        if len(msg.payloads) != 1 or not isinstance(msg.payloads[0], (EncryptedPayload, EncryptedFragmentPayload)):
            raise MessageError("unexpected_payload: exchange must carry only an SK or SKF payload")
    else:
        check_payload_rules(msg.exchange, msg.is_response, msg.payloads)


def check_payload_rules(exchange: int, is_response: bool, payloads: tuple[Payload, ...]) -> None:
    """Check the (decrypted) payloads against the table; unknown non-critical ones pass.

    Raises MessageError whose reason starts with "unexpected_payload".
    """
    key = (exchange, is_response)
    if key not in PAYLOAD_RULES:
        raise MessageError(f"unexpected_payload: unsupported exchange {exchange}")
    _enc, rules = PAYLOAD_RULES[key]
    counts: dict[int, int] = {}
    for p in payloads:
        if isinstance(p, UnknownPayload):
            continue
        t = int(p.payload_type)
        if t not in rules:
            raise MessageError(f"unexpected_payload: {_name(t)} not allowed in "
                               f"{_xname(exchange)} {'response' if is_response else 'request'}")
        counts[t] = counts.get(t, 0) + 1
    for r in rules.values():
        n = counts.get(r.ptype, 0)
        if n < r.min or n > r.max:
            raise MessageError(f"unexpected_payload: {n} x {_name(r.ptype)} in "
                               f"{_xname(exchange)} {'response' if is_response else 'request'}")


def _name(t: int) -> str:
    try:
        return PayloadType(t).name
    except ValueError:
        return str(t)


def _xname(t: int) -> str:
    try:
        return ExchangeType(t).name
    except ValueError:
        return str(t)


__all__ = [
    "MessageError", "MessageLimitError", "MAX_PAYLOADS", "MAX_PROPOSALS", "MAX_TRANSFORMS", "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTES_TOTAL", "scan_payloads", "Message", "Header", "Payload", "SaPayload", "Proposal", "Transform",
    "TransformAttribute", "KePayload", "IdPayload", "CertPayload", "CertReqPayload", "AuthPayload",
    "NoncePayload", "NotifyPayload", "DeletePayload", "VendorPayload", "TsPayload", "TrafficSelector",
    "OpaqueSelector", "EncryptedPayload", "EncryptedFragmentPayload", "RawPayload", "UnknownPayload",
    "decode_message", "encode_message", "decode_header", "encode_header", "decode_payloads", "encode_payloads",
    "check_outer", "check_payload_rules", "PAYLOAD_RULES", "HEADER_LEN", "NotifyType", "GENERIC_HEADER_LEN",
    "_encode_sa",
]
