"""ENCR_AES_CBC with HMAC-SHA2 integrity for ESP (RFC 3602, RFC 4868).

IV: 16 bytes from the injected rng (RFC 3602 §2.3: unpredictable), drawn
in chunks to amortise the call. ICV = HMAC truncated (RFC 4868 §2.3) over
SPI | seq-low | IV | ciphertext, with the ESN high 32 bits appended for the
ICV computation only (RFC 4303 §2.2.1, §3.3.2.1). Encrypt-then-MAC: the ICV
is verified before anything is decrypted (RFC 4303 §3.4.4).
"""
from __future__ import annotations

from typing import Callable

from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import CBC
from cryptography.hazmat.primitives.constant_time import bytes_eq

from agent.esp.errors import EspError
from agent.esp.transforms.base import HDR, U32, Transform, make_hmac
from agent.model import EspKeys

_IV_CHUNK = 64  # IVs drawn per rng call


class AesCbcHmac(Transform):
    """ENCR_AES_CBC 128/192/256 with AUTH_HMAC_SHA2_* (or SHA1_96); see module docstring."""

    iv_len = 16
    align = 16

    def __init__(self, keys: EspKeys, rng: Callable[[int], bytes]) -> None:
        if len(keys.encr_key) not in (16, 24, 32):
            raise ValueError(f"ENCR_AES_CBC: key must be 16, 24 or 32 bytes, got {len(keys.encr_key)}")
        if not keys.integ_id:
            # RFC 4303 §3.2: confidentiality without integrity is not offered here.
            raise ValueError("ENCR_AES_CBC needs an integrity transform (integ_id 0 given)")
        self._hmac, self.icv_len, integ_name = make_hmac(keys)
        self.name = f"ENCR_AES_CBC_{len(keys.encr_key) * 8}-{integ_name}"
        self.spi = keys.spi
        self.esn = keys.esn
        self._aes = AES(keys.encr_key)
        self._rng = rng
        self._ivs = b""
        self._iv_pos = 0
        # SPI, seq, IV, one block, ICV
        self.min_len = 8 + 16 + 16 + self.icv_len

    def _next_iv(self) -> bytes:
        pos = self._iv_pos
        if pos >= len(self._ivs):
            self._ivs = self._rng(16 * _IV_CHUNK)
            if len(self._ivs) != 16 * _IV_CHUNK:
                raise ValueError("rng returned the wrong number of bytes")
            pos = 0
        self._iv_pos = pos + 16
        return self._ivs[pos:pos + 16]

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        iv = self._next_iv()
        enc = Cipher(self._aes, CBC(iv)).encryptor()
        body = HDR.pack(self.spi, seq & 0xFFFFFFFF) + iv + enc.update(plaintext) + enc.finalize()
        h = self._hmac.copy()
        h.update(body)
        if self.esn:
            h.update(U32.pack(seq >> 32))
        return body + h.finalize()[:self.icv_len]

    def open(self, packet: bytes, seq: int) -> bytes:
        n = len(packet)
        icv_len = self.icv_len
        if n < self.min_len:
            raise EspError("malformed", "shorter than SPI+seq+IV+block+ICV")
        if (n - 24 - icv_len) % 16:
            raise EspError("malformed", "ciphertext not a multiple of the AES block size")
        mv = memoryview(packet)
        end = n - icv_len
        h = self._hmac.copy()
        h.update(mv[:end])
        if self.esn:
            h.update(U32.pack(seq >> 32))
        if not bytes_eq(h.finalize()[:icv_len], packet[end:]):
            raise EspError("icv")
        dec = Cipher(self._aes, CBC(packet[8:24])).decryptor()
        return dec.update(mv[24:end]) + dec.finalize()

    def decrypt_unauthenticated(self, packet: bytes) -> bytes:
        """Decrypt without checking the ICV: only for captures whose integrity
        key is unknown (tests, diagnostics). Never used by EspSa."""
        n = len(packet)
        if n < self.min_len or (n - 24 - self.icv_len) % 16:
            raise EspError("malformed", "bad CBC packet length")
        dec = Cipher(self._aes, CBC(packet[8:24])).decryptor()
        return dec.update(packet[24:n - self.icv_len]) + dec.finalize()
