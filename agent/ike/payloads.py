"""IKEv2 payloads (RFC 7296 §3.2-3.16): one frozen dataclass per payload, the codec's errors
and its count limits. Decoded and encoded by agent.ike.payload_codec; agent.ike.message
re-exports every name, so ``from agent.ike.message import NotifyPayload`` keeps working.

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Union

from agent.iana import PayloadType, TsType


class MessageError(Exception):
    """Malformed IKE message; ``reason`` says what was wrong (never raises anything else)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MessageLimitError(MessageError):
    """A count limit was exceeded (payloads per chain, proposals, transforms, attributes):
    refused before anything more is decoded, as the sender is not authenticated yet.
    ``kind``: "payloads", "proposals", "transforms" or "attributes". The manager refuses an
    IKE_SA_INIT over a limit (counted ``init_refused_<kind>``), other messages count
    ``payload_limit``."""

    def __init__(self, reason: str, kind: str = "payloads"):
        super().__init__(reason)
        self.kind = kind


# Count limits (§3.2, §3.3), checked while decoding, before any authentication. Far above
# what real peers send (strongSwan sends about 12 payloads in IKE_SA_INIT and caps notifies
# and vendor IDs at 20 each), low enough that a 64 KiB datagram of tiny payloads is refused
# after a few dozen of them instead of costing milliseconds.
MAX_PAYLOADS = 64  # per payload chain: the outer one, or the decrypted one inside SK
MAX_PROPOSALS = 16  # per SA payload (strongSwan's default IKE offer is 2, ours 1-4)
MAX_TRANSFORMS = 128  # per SA payload, all proposals together (strongSwan's default: about 60)
MAX_ATTRIBUTES = 4  # per transform (real ones carry at most Key Length)
MAX_ATTRIBUTES_TOTAL = MAX_TRANSFORMS  # per SA payload: only ENCR transforms carry one (Key Length)


# --------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformAttribute:
    """§3.3.5. ``tv`` True = 2-byte value in the header (AF=1), else ``value`` bytes."""
    type: int
    value: Union[int, bytes]
    tv: bool = True


@dataclass(frozen=True)
class Transform:
    """§3.3.2 Transform Substructure: type (TransformType), id, attributes."""
    type: int
    id: int
    attributes: tuple[TransformAttribute, ...] = ()

    @property
    def key_length(self) -> int | None:
        for a in self.attributes:
            if a.type == 14 and a.tv and isinstance(a.value, int):
                return a.value
        return None


@dataclass(frozen=True)
class Proposal:
    """§3.3.1 Proposal Substructure. ``spi`` raw bytes (0, 4 or 8 octets)."""
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]


@dataclass(frozen=True)
class SaPayload:
    """§3.3 Security Association payload."""
    proposals: tuple[Proposal, ...]
    payload_type = PayloadType.SA


@dataclass(frozen=True)
class KePayload:
    """§3.4 Key Exchange payload: KE method (KeId) and the public value."""
    group: int
    data: bytes
    payload_type = PayloadType.KE


@dataclass(frozen=True)
class IdPayload:
    """§3.5 Identification payload; ``ptype`` is IDi or IDr."""
    ptype: int
    id_type: int
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype

    @property
    def body(self) -> bytes:
        """RestOfInitIDPayload / RestOfRespIDPayload for AUTH (§2.15)."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(frozen=True)
class CertPayload:
    """§3.6 Certificate payload (encoding CertEncoding, DER data)."""
    encoding: int
    data: bytes = field(repr=False)
    payload_type = PayloadType.CERT


@dataclass(frozen=True)
class CertReqPayload:
    """§3.7 Certificate Request (concatenated SHA-1 hashes of CA SPKIs)."""
    encoding: int
    data: bytes
    payload_type = PayloadType.CERTREQ


@dataclass(frozen=True)
class AuthPayload:
    """§3.8 Authentication payload (method AuthMethod)."""
    method: int
    data: bytes = field(repr=False)
    payload_type = PayloadType.AUTH


@dataclass(frozen=True)
class NoncePayload:
    """§3.9 Nonce payload (Ni / Nr)."""
    data: bytes = field(repr=False)
    payload_type = PayloadType.NONCE


@dataclass(frozen=True)
class NotifyPayload:
    """§3.10 Notify payload: protocol (0 or ProtocolId), type (NotifyType), SPI, data."""
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""
    payload_type = PayloadType.NOTIFY

    @property
    def is_error(self) -> bool:
        return self.notify_type < 16384


@dataclass(frozen=True)
class DeletePayload:
    """§3.11 Delete payload. IKE: spi_size 0 and no SPIs; ESP/AH: 4-byte SPIs."""
    protocol: int
    spi_size: int = 0
    spis: tuple[bytes, ...] = ()
    payload_type = PayloadType.DELETE


@dataclass(frozen=True)
class VendorPayload:
    """§3.12 Vendor ID payload."""
    data: bytes
    payload_type = PayloadType.VENDOR_ID


@dataclass(frozen=True)
class OpaqueSelector:
    """§3.13.1 a selector of a type we do not implement (e.g. TS_SECLABEL, RFC 9478), kept as
    received (``raw``: the whole selector, header included) so the message still decodes;
    narrowing ignores it (agent.ike.child.ts_intersect never matches it)."""
    ts_type: int
    raw: bytes

    def networks(self) -> list:
        return []


@dataclass(frozen=True)
class TrafficSelector:
    """§3.13.1 one selector: type, IP protocol (0 any), ports, addresses (packed)."""
    ts_type: int
    ip_protocol: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes

    @classmethod
    def from_network(cls, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> "TrafficSelector":
        ts_type = TsType.TS_IPV4_ADDR_RANGE if net.version == 4 else TsType.TS_IPV6_ADDR_RANGE
        return cls(int(ts_type), 0, 0, 65535, net.network_address.packed, net.broadcast_address.packed)

    @property
    def start(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.start_addr)

    @property
    def end(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.end_addr)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The address range as CIDR blocks (empty if start > end)."""
        if int(self.start) > int(self.end):
            return []
        return list(ipaddress.summarize_address_range(self.start, self.end))


@dataclass(frozen=True)
class TsPayload:
    """§3.13 Traffic Selector payload; ``ptype`` is TSi or TSr."""
    ptype: int
    selectors: tuple[TrafficSelector, ...]

    @property
    def payload_type(self) -> int:
        return self.ptype


@dataclass(frozen=True)
class EncryptedPayload:
    """§3.14 Encrypted and Authenticated payload, kept as received.

    ``first`` is the Next Payload of the SK header (type of the first inner
    payload); ``body`` is IV | ciphertext | ICV.
    """
    first: int
    body: bytes = field(repr=False)
    payload_type = PayloadType.SK


@dataclass(frozen=True)
class EncryptedFragmentPayload:
    """RFC 7383 §2.5 Encrypted Fragment payload (SKF), kept as received.

    ``first``: Next Payload (inner type in fragment 1, else 0); ``number`` /
    ``total``: Fragment Number and Total Fragments; ``body``: IV | ciphertext | ICV.
    """
    first: int
    number: int
    total: int
    body: bytes = field(repr=False)
    payload_type = PayloadType.SKF


@dataclass(frozen=True)
class RawPayload:
    """A known payload we do not interpret (CP, EAP, GSPM, SKF): body kept raw."""
    ptype: int
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype


@dataclass(frozen=True)
class UnknownPayload:
    """Unregistered payload type. ``critical`` set -> UNSUPPORTED_CRITICAL_PAYLOAD (§2.5)."""
    ptype: int
    critical: bool
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.ptype


Payload = Union[SaPayload, KePayload, IdPayload, CertPayload, CertReqPayload, AuthPayload,
                NoncePayload, NotifyPayload, DeletePayload, VendorPayload, TsPayload,
                EncryptedPayload, EncryptedFragmentPayload, RawPayload, UnknownPayload]

_RAW_TYPES = {PayloadType.CP, PayloadType.EAP, PayloadType.GSPM}


__all__ = [
    "MessageError", "MessageLimitError", "MAX_PAYLOADS", "MAX_PROPOSALS", "MAX_TRANSFORMS", "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTES_TOTAL", "Payload", "SaPayload", "Proposal", "Transform", "TransformAttribute", "KePayload",
    "IdPayload", "CertPayload", "CertReqPayload", "AuthPayload", "NoncePayload", "NotifyPayload", "DeletePayload",
    "VendorPayload", "TsPayload", "TrafficSelector", "OpaqueSelector", "EncryptedPayload",
    "EncryptedFragmentPayload", "RawPayload", "UnknownPayload",
]
