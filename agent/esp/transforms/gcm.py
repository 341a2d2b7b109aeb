"""ENCR_AES_GCM_16 for ESP (RFC 4106).

Key material = AES key (16/24/32 bytes) | 4-byte salt (RFC 4106 §8.1).
Nonce = salt | 8-byte explicit IV; the IV is the 64-bit sequence number,
unique per key (RFC 4106 §3.1). AAD = SPI | seq-low, or SPI | seq-high |
seq-low with ESN (RFC 4106 §5). ICV 16 bytes.
"""
from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.esp.errors import EspError
from agent.esp.transforms.base import AAD_ESN, HDR_IV64, Transform
from agent.model import EspKeys


class _Aead8(Transform):
    """RFC 4106-style AEAD with 4-byte salt and 8-byte IV = sequence number."""

    iv_len = 8
    icv_len = 16
    align = 4
    # SPI, seq, IV, at least pad length + next header, ICV
    min_len = 8 + 8 + 2 + 16
    _key_lens: tuple[int, ...] = ()
    label = "?"

    def __init__(self, keys: EspKeys) -> None:
        km = keys.encr_key
        self.name = self.label
        if len(km) - 4 not in self._key_lens:
            raise ValueError(f"{self.label}: key material must be "
                             f"{' or '.join(str(n + 4) for n in self._key_lens)} bytes "
                             f"(key | 4-byte salt), got {len(km)}")
        if keys.integ_id:
            raise ValueError(f"{self.label} is an AEAD transform: integ_id must be 0, got {keys.integ_id}")
        self.spi = keys.spi
        self.esn = keys.esn
        self._salt = km[-4:]
        self._aead = self._make(km[:-4])
        self.key_bits = (len(km) - 4) * 8
        if len(self._key_lens) > 1:
            self.name = f"{self.label}_{self.key_bits}"

    @staticmethod
    def _make(key: bytes):  # pragma: no cover - overridden
        raise NotImplementedError

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        lo = seq & 0xFFFFFFFF
        hdr = HDR_IV64.pack(self.spi, lo, seq)
        aad = AAD_ESN.pack(self.spi, seq >> 32, lo) if self.esn else hdr[:8]
        return hdr + self._aead.encrypt(self._salt + hdr[8:], plaintext, aad)

    def open(self, packet: bytes, seq: int) -> bytes:
        if len(packet) < self.min_len:
            raise EspError("malformed", "shorter than SPI+seq+IV+trailer+ICV")
        # plain slices: cheaper than memoryviews at these sizes (measured)
        aad = AAD_ESN.pack(self.spi, seq >> 32, seq & 0xFFFFFFFF) if self.esn else packet[:8]
        try:
            return self._aead.decrypt(self._salt + packet[8:16], packet[16:], aad)
        except InvalidTag:
            raise EspError("icv") from None


class AesGcm16(_Aead8):
    """ENCR_AES_GCM_16 (RFC 4106); see module docstring."""

    _key_lens = (16, 24, 32)

    label = "ENCR_AES_GCM_16"
    @staticmethod
    def _make(key: bytes) -> AESGCM:
        return AESGCM(key)
