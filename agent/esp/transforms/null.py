"""ENCR_NULL with integrity for ESP (RFC 2410, RFC 4868).

No IV, no confidentiality; the payload travels in clear and the ICV covers
SPI | seq-low | payload | trailer (| ESN high 32 bits, RFC 4303 §2.2.1).
"""
from __future__ import annotations

from cryptography.hazmat.primitives.constant_time import bytes_eq

from agent.esp.errors import EspError
from agent.esp.transforms.base import HDR, U32, Transform, make_hmac
from agent.model import EspKeys


class NullHmac(Transform):
    """ENCR_NULL with AUTH_HMAC_SHA2_* (or SHA1_96); see module docstring."""

    iv_len = 0
    align = 4

    def __init__(self, keys: EspKeys) -> None:
        if keys.encr_key:
            raise ValueError(f"ENCR_NULL takes no encryption key, got {len(keys.encr_key)} bytes")
        if not keys.integ_id:
            # RFC 4303 §3.2: NULL encryption with NULL integrity is forbidden.
            raise ValueError("ENCR_NULL needs an integrity transform (integ_id 0 given)")
        self._hmac, self.icv_len, integ_name = make_hmac(keys)
        self.name = f"ENCR_NULL-{integ_name}"
        self.spi = keys.spi
        self.esn = keys.esn
        self.min_len = 8 + 2 + self.icv_len

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        body = HDR.pack(self.spi, seq & 0xFFFFFFFF) + plaintext
        h = self._hmac.copy()
        h.update(body)
        if self.esn:
            h.update(U32.pack(seq >> 32))
        return body + h.finalize()[:self.icv_len]

    def open(self, packet: bytes, seq: int) -> bytes:
        n = len(packet)
        if n < self.min_len:
            raise EspError("malformed", "shorter than SPI+seq+trailer+ICV")
        end = n - self.icv_len
        mv = memoryview(packet)
        h = self._hmac.copy()
        h.update(mv[:end])
        if self.esn:
            h.update(U32.pack(seq >> 32))
        if not bytes_eq(h.finalize()[:self.icv_len], packet[end:]):
            raise EspError("icv")
        return packet[8:end]
