"""ESP transforms (RFC 4303 §3.2), one module per family.

``make_transform(keys, rng)`` returns the transform object for one direction
of a CHILD_SA; it holds the ``cryptography`` cipher objects, created once.

Transform interface (duck-typed, see ``base.Transform``):
  ``seal(seq, plaintext) -> bytes``: full ESP packet SPI | seq | IV | ciphertext | ICV
  for the 64-bit sequence number ``seq`` (low 32 bits on the wire);
  ``plaintext`` is payload | padding | pad length | next header, already aligned.
  ``open(packet, seq) -> bytes``: the plaintext (still with its trailer);
  raises ``EspError("icv")`` on an authentication failure and
  ``EspError("malformed")`` on a bad length.
"""
from __future__ import annotations

from typing import Callable

from agent.esp.errors import EspError
from agent.esp.transforms.base import Transform
from agent.esp.transforms.cbc import AesCbcHmac
from agent.esp.transforms.chacha import ChaCha20Poly1305Esp
from agent.esp.transforms.gcm import AesGcm16
from agent.esp.transforms.null import NullHmac
from agent.iana import EncrId, IntegId
from agent.model import EspKeys

__all__ = ["Transform", "make_transform", "AesGcm16", "ChaCha20Poly1305Esp", "AesCbcHmac", "NullHmac", "EspError"]


def make_transform(keys: EspKeys, rng: Callable[[int], bytes]) -> Transform:
    """Build the transform for ``keys`` (RFC 4303 §3.2).

    Raises ``ValueError`` naming the algorithm for an unsupported
    encr/integ combination or a wrong key length.
    """
    encr = keys.encr_id
    if encr == EncrId.ENCR_AES_GCM_16:
        return AesGcm16(keys)
    if encr == EncrId.ENCR_CHACHA20_POLY1305:
        return ChaCha20Poly1305Esp(keys)
    if encr == EncrId.ENCR_AES_CBC:
        return AesCbcHmac(keys, rng)
    if encr == EncrId.ENCR_NULL:
        return NullHmac(keys)
    try:
        name = EncrId(encr).name
    except ValueError:
        name = str(encr)
    raise ValueError(f"ESP encryption transform {name} is not supported "
                     f"(supported: {', '.join(e.name for e in SUPPORTED_ENCR)})")


SUPPORTED_ENCR = (EncrId.ENCR_AES_GCM_16, EncrId.ENCR_CHACHA20_POLY1305, EncrId.ENCR_AES_CBC, EncrId.ENCR_NULL)
SUPPORTED_INTEG = (IntegId.AUTH_HMAC_SHA2_256_128, IntegId.AUTH_HMAC_SHA2_384_192,
                   IntegId.AUTH_HMAC_SHA2_512_256, IntegId.AUTH_HMAC_SHA1_96)
