"""The Encrypted payload (SK, RFC 7296 §3.14) and its fragments (SKF, RFC 7383) of one IKE_SA:
sealing our messages and opening the peer's, with the IKE_SA's SK_e / SK_a (§2.14).

Pure module: no I/O; randomness (IVs) from the ``rng`` passed in.
"""
from __future__ import annotations

import struct

from agent.iana import PayloadType
from agent.ike import fragment as frag
from agent.ike.errors import CryptoError, Drop, IntegrityError
from agent.ike.message import HEADER_LEN, EncryptedFragmentPayload, EncryptedPayload, encode_header, encode_payloads

__all__ = ["flags", "seal", "open_sk"]


def flags(initiator: bool, response: bool) -> int:
    """IKE header flags (§3.1): I for the original initiator, R for a response."""
    return (0x08 if initiator else 0) | (0x20 if response else 0)


def seal(*, spi_i: int, spi_r: int, exchange: int, message_id: int, initiator: bool, response: bool, payloads: list,
         keys, cipher, rng, budget: int | None) -> tuple[bytes, tuple[int, bytes]]:
    """HDR, SK {payloads}: (the message, (first inner type, inner payloads as encoded)). With
    ``budget`` (UDP payload octets; the peer announced RFC 7383) a longer message goes out as
    SKF fragments (frag.FragmentedMessage, kept whole for caches)."""
    first, plain = encode_payloads(payloads)
    body_len = cipher.encrypted_len(len(plain))
    f = flags(initiator, response)
    hdr = encode_header(spi_i, spi_r, int(PayloadType.SK), exchange, f, message_id, HEADER_LEN + 4 + body_len)
    skh = struct.pack("!BBH", first, 0, 4 + body_len)
    sk_e, sk_a = (keys.sk_ei, keys.sk_ai) if initiator else (keys.sk_er, keys.sk_ar)
    whole = hdr + skh + cipher.encrypt(sk_e, sk_a, rng, hdr + skh, plain)
    if budget is not None and len(whole) > budget:
        # RFC 7383 §2.5: on the wire as SKF fragments
        return frag.FragmentedMessage(whole, frag.fragment(
            spi_i=spi_i, spi_r=spi_r, exchange=exchange, flags=f, message_id=message_id, first=first,
            plaintext=plain, cipher=cipher, sk_e=sk_e, sk_a=sk_a, rng=rng, budget=budget)), (first, plain)
    return whole, (first, plain)


def open_sk(msg, raw: bytes, *, keys, cipher, initiator: bool,
            reassembler: frag.Reassembler) -> tuple[tuple[int, bytes] | None, str | None]:
    """The peer's SK (or SKF, RFC 7383 §2.6) payload decrypted: ((first inner type, inner
    payloads), None), or (None, drop reason); frag.FRAGMENT_QUEUED while fragments are missing.
    ``initiator``: our role (we open with the peer's keys)."""
    sk = msg.payloads[0] if len(msg.payloads) == 1 else None
    sk_e, sk_a = (keys.sk_er, keys.sk_ar) if initiator else (keys.sk_ei, keys.sk_ai)
    if isinstance(sk, EncryptedFragmentPayload):
        res = reassembler.add((msg.message_id, msg.exchange), sk, raw,
                              lambda aad, body: cipher.decrypt(sk_e, sk_a, aad, body))
        return (None, res) if isinstance(res, str) else (res, None)
    if isinstance(sk, EncryptedPayload):
        try:
            return (sk.first, cipher.decrypt(sk_e, sk_a, raw[:HEADER_LEN + 4], sk.body)), None
        except IntegrityError:
            return None, Drop.BAD_ICV
        except CryptoError:
            return None, Drop.MALFORMED
    return None, Drop.UNEXPECTED_PAYLOAD
