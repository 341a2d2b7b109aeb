"""UDP encapsulation of IKE and ESP on port 4500 (RFC 3948).

On port 4500 a datagram is: a NAT-keepalive (one 0xFF byte, §2.3), IKE
behind a 4-byte zero non-ESP marker (§2.2), or ESP (the first 4 bytes are
the non-zero SPI, §2.1).
"""
from __future__ import annotations

NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"

# Shortest ESP we could ever accept: SPI, seq and at least 4 bytes of trailer/ICV.
_MIN_ESP = 12
# IKE header is 28 bytes (RFC 7296 §3.1).
_MIN_IKE = 4 + 28


def classify_udp4500(payload: bytes) -> str:
    """"ike" | "esp" | "keepalive" | "invalid" for a UDP 4500 payload (RFC 3948 §2)."""
    n = len(payload)
    if n == 1:
        return "keepalive" if payload[0] == 0xFF else "invalid"
    if n < 4:
        return "invalid"
    if payload[:4] == NON_ESP_MARKER:
        return "ike" if n >= _MIN_IKE else "invalid"
    # SPI values 1..255 are reserved by IANA (RFC 4303 §2.1).
    if n < _MIN_ESP or payload[:3] == b"\x00\x00\x00":
        return "invalid"
    return "esp"


def add_non_esp_marker(ike_message: bytes) -> bytes:
    """The IKE message prefixed by the 4-byte non-ESP marker (RFC 3948 §2.2)."""
    return NON_ESP_MARKER + ike_message


def strip_non_esp_marker(payload: bytes) -> bytes:
    """The IKE message behind the non-ESP marker; ValueError if the marker is absent."""
    if len(payload) < 4 or payload[:4] != NON_ESP_MARKER:
        raise ValueError("no non-ESP marker: not an IKE message on port 4500")
    return payload[4:]
