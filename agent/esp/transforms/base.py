"""Common parts of the ESP transforms (RFC 4303 §2, §3.2)."""
from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes, hmac

from agent.esp.errors import EspError
from agent.iana import IntegId
from agent.model import EspKeys

# SPI | seq (low 32 bits): the ESP header (RFC 4303 §2.1, §2.2).
HDR = struct.Struct(">II")
# SPI | seq-low | 64-bit IV (AEAD: the IV is the full sequence number).
HDR_IV64 = struct.Struct(">IIQ")
# AAD with ESN: SPI | seq-high | seq-low (RFC 4106 §5).
AAD_ESN = struct.Struct(">III")
U32 = struct.Struct(">I")

# integ id -> (hash, key length, ICV length) (RFC 4868 §2, RFC 2404).
INTEG_PARAMS = {
    IntegId.AUTH_HMAC_SHA2_256_128: (hashes.SHA256, 32, 16),
    IntegId.AUTH_HMAC_SHA2_384_192: (hashes.SHA384, 48, 24),
    IntegId.AUTH_HMAC_SHA2_512_256: (hashes.SHA512, 64, 32),
    IntegId.AUTH_HMAC_SHA1_96: (hashes.SHA1, 20, 12),
}


class Transform:
    """Interface of one ESP transform for one SA direction.

    ``iv_len``/``icv_len`` in bytes; ``align``: payload+trailer length must be a
    multiple of it (4, or the cipher block size; RFC 4303 §2.4);
    ``min_len``: shortest packet ``open`` can accept.
    """

    name = "?"
    iv_len = 0
    icv_len = 0
    align = 4
    min_len = 8

    def seal(self, seq: int, plaintext: bytes) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def open(self, packet: bytes, seq: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def make_hmac(keys: EspKeys) -> tuple[hmac.HMAC, int, str]:
    """HMAC template (copied per packet), ICV length and name; ValueError on bad keys."""
    try:
        algo, key_len, icv_len = INTEG_PARAMS[IntegId(keys.integ_id)]
        name = IntegId(keys.integ_id).name
    except (KeyError, ValueError):
        raise ValueError(f"ESP integrity transform {keys.integ_id} is not supported with "
                         f"encryption {keys.encr_id} (supported: "
                         f"{', '.join(i.name for i in INTEG_PARAMS)})") from None
    if len(keys.integ_key) != key_len:
        raise ValueError(f"{name}: integrity key must be {key_len} bytes, got {len(keys.integ_key)}")
    return hmac.HMAC(keys.integ_key, algo()), icv_len, name


def short(what: str) -> EspError:
    return EspError("malformed", what)
