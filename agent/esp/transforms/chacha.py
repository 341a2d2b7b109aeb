"""ENCR_CHACHA20_POLY1305 for ESP (RFC 7634).

Key material = 32-byte key | 4-byte salt (RFC 7634 §2); nonce = salt |
8-byte IV (the 64-bit sequence number, unique per key, RFC 7634 §2);
AAD as RFC 4106 §5 (RFC 7634 §2.1); ICV 16 bytes; 4-byte alignment.
"""
from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.esp.transforms.gcm import _Aead8


class ChaCha20Poly1305Esp(_Aead8):
    """ENCR_CHACHA20_POLY1305 (RFC 7634); see module docstring."""

    label = "ENCR_CHACHA20_POLY1305"
    _key_lens = (32,)

    @staticmethod
    def _make(key: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(key)
