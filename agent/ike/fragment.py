"""IKE message fragmentation (RFC 7383), sans-I/O.

Sender: :func:`fragment` splits the inner payloads of one encrypted message
into Encrypted Fragment (SKF) payloads, each in its own IKE message, each
encrypted and authenticated on its own (§2.5). Fragment size is counted as
strongSwan's ``fragment_size``: the whole IP packet (default 1280 octets,
§2.5.1), so the UDP payload is that minus the IP and UDP headers and the
non-ESP marker on port 4500.

Receiver: :class:`Reassembler` authenticates every fragment before storing
it (§2.6), keeps at most ``max_fragments`` fragments and ``max_bytes``
octets of plaintext per message, and hands back the whole inner payload
chain once all fragments of one message arrived. Anything odd is a drop
reason (a counter name), never an exception.

Pure module: no I/O; randomness (IVs) comes from the injected ``rng``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from agent.iana import PayloadType
from agent.ike.crypto import CryptoError, IntegrityError, SkCipher
from agent.ike.message import HEADER_LEN, EncryptedFragmentPayload, encode_header

__all__ = ["DEFAULT_FRAGMENT_SIZE", "MAX_FRAGMENTS", "MAX_REASSEMBLED", "FRAGMENT_QUEUED", "FragmentError",
           "udp_budget", "max_chunk", "fragment", "Reassembler", "FragmentedMessage"]

DEFAULT_FRAGMENT_SIZE = 1280  # IP packet octets, as strongSwan's charon.fragment_size
MAX_FRAGMENTS = 64  # per message, both ways: peers with small MTUs send 40+ (RFC 7383 sets no limit)
MAX_REASSEMBLED = 32 * 1024  # plaintext octets per message
SKF_HEADER_LEN = 8  # generic payload header + Fragment Number + Total Fragments (§2.5)
FRAGMENT_QUEUED = "ike_fragment_queued"  # not a drop: a fragment stored, message incomplete


class FragmentError(ValueError):
    """The message cannot be fragmented with these limits (message names them)."""


class FragmentedMessage(bytes):
    """An encrypted IKE message (as one SK message, for caches and retransmission)
    that goes on the wire as ``fragments`` (list of complete IKE messages, each
    with one SKF payload). The sender expands it where datagrams are emitted."""

    fragments: tuple[bytes, ...]

    def __new__(cls, whole: bytes, fragments):
        obj = super().__new__(cls, whole)
        obj.fragments = tuple(fragments)
        return obj


def udp_budget(fragment_size: int, *, ipv6: bool, nat_t: bool) -> int:
    """UDP payload octets available when IP packets must stay within ``fragment_size``
    (IPv4 header 20, IPv6 40, UDP 8, non-ESP marker 4 on port 4500, RFC 3948 §2.2)."""
    return fragment_size - (40 if ipv6 else 20) - 8 - (4 if nat_t else 0)


def max_chunk(cipher: SkCipher, budget: int) -> int:
    """Largest plaintext chunk whose SKF message fits in ``budget`` UDP octets."""
    room = budget - HEADER_LEN - SKF_HEADER_LEN
    n = room - cipher.iv_len - cipher.icv_len
    while n > 0 and cipher.encrypted_len(n) > room:
        n -= 1
    if n < 1:
        raise FragmentError(f"fragment budget {budget} octets leaves no room for data; raise the fragment size")
    return n


def fragment(*, spi_i: int, spi_r: int, exchange: int, flags: int, message_id: int, first: int,
             plaintext: bytes, cipher: SkCipher, sk_e: bytes, sk_a: bytes, rng: Callable[[int], bytes],
             budget: int) -> list[bytes]:
    """Split ``plaintext`` (an encoded inner payload chain starting with type
    ``first``) into SKF messages of at most ``budget`` UDP octets each (§2.5).

    Fragment 1 carries ``first`` as Next Payload, the others 0. Each fragment's
    associated data is its IKE header plus the SKF header (numbers included).
    Raises FragmentError if more than MAX_FRAGMENTS would be needed.
    """
    chunk = max_chunk(cipher, budget)
    pieces = [plaintext[i:i + chunk] for i in range(0, len(plaintext), chunk)] or [b""]
    total = len(pieces)
    if total > MAX_FRAGMENTS:
        raise FragmentError(f"message of {len(plaintext)} octets needs {total} fragments (limit {MAX_FRAGMENTS})")
    out = []
    for number, piece in enumerate(pieces, 1):
        body_len = cipher.encrypted_len(len(piece))
        hdr = encode_header(spi_i, spi_r, int(PayloadType.SKF), exchange, flags, message_id,
                            HEADER_LEN + SKF_HEADER_LEN + body_len)
        skf = struct.pack("!BBHHH", first if number == 1 else 0, 0, SKF_HEADER_LEN + body_len, number, total)
        out.append(hdr + skf + cipher.encrypt(sk_e, sk_a, rng, hdr + skf, piece))
    return out


@dataclass
class _Partial:
    message_id: object  # Message ID or (Message ID, exchange type)
    total: int
    first: int = 0
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects the SKF fragments of one message at a time (window size 1).

    :meth:`add` returns ``(first, plaintext)`` once complete, :data:`FRAGMENT_QUEUED`
    when a fragment was stored, or a drop reason:
    ``fragment_malformed`` (numbers out of range, fragment 1 without Next Payload),
    ``fragment_bad_icv`` (failed authentication: not stored), ``fragment_stale``
    (fewer Total Fragments than the message being collected, §2.6),
    ``fragment_duplicate``, ``fragment_too_large`` (over ``max_bytes``: the message is
    dropped), ``fragment_too_many`` (Total Fragments over ``max_fragments``).
    """

    def __init__(self, max_fragments: int = MAX_FRAGMENTS, max_bytes: int = MAX_REASSEMBLED):
        self.max_fragments = max_fragments
        self.max_bytes = max_bytes
        self._p: _Partial | None = None

    def add(self, message_id: object, frag: EncryptedFragmentPayload, raw: bytes,
            open_: Callable[[bytes, bytes], bytes]) -> tuple[int, bytes] | str:
        """``raw`` is the whole received IKE message; ``open_(aad, body)`` decrypts
        and verifies one fragment (raising IntegrityError / CryptoError). ``message_id``
        names the message being collected: the Message ID, or any key such as
        (Message ID, exchange type); a fragment with another key starts over."""
        n, total = frag.number, frag.total
        if total < 1 or not 1 <= n <= total:
            return "fragment_malformed"
        if total > self.max_fragments:
            return "fragment_too_many"
        if n == 1 and frag.first == 0:
            return "fragment_malformed"
        try:
            plain = open_(bytes(raw[:HEADER_LEN + SKF_HEADER_LEN]), frag.body)
        except IntegrityError:
            return "fragment_bad_icv"
        except CryptoError:
            return "fragment_malformed"
        p = self._p
        if p is None or p.message_id != message_id:
            p = self._p = _Partial(message_id, total)
        elif total > p.total:
            p = self._p = _Partial(message_id, total)  # resent with smaller fragments: start over (§2.6)
        elif total < p.total:
            return "fragment_stale"
        if n in p.parts:
            return "fragment_duplicate"
        if p.size + len(plain) > self.max_bytes:
            self._p = None
            return "fragment_too_large"
        p.parts[n] = plain
        p.size += len(plain)
        if n == 1:
            p.first = frag.first
        if len(p.parts) < p.total:
            return FRAGMENT_QUEUED
        self._p = None
        return p.first, b"".join(p.parts[i] for i in range(1, p.total + 1))

    def reset(self) -> None:
        self._p = None

    def held(self) -> int:
        """Plaintext octets stored for the message being collected (0 when none)."""
        return self._p.size if self._p is not None else 0
