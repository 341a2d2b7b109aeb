"""Stateless IKE_SA_INIT cookies (RFC 7296 §2.6).

Under load (too many half-open IKE_SAs) the responder answers IKE_SA_INIT with
N(COOKIE) and creates no state; the initiator repeats its request with the
cookie as first payload. Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi |
<secret>) with SHA-256 (33 octets), as §2.6 suggests. The secret comes from the
injected rng and is replaced every ``rotate_s`` seconds of ``now``; cookies made
with the previous secret are still accepted (one generation), older ones are
stale.

Pure module: no I/O.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Callable

from cryptography.hazmat.primitives import hashes

SECRET_LEN = 32
COOKIE_LEN = 1 + 32
NONCE_MIN, NONCE_MAX = 16, 256  # §2.10 / §3.9: Ni is 16-256 octets; checked before it is hashed


class CookieJar:
    """``make(ni, ip, spi_i, now) -> bytes`` and ``check(cookie, ni, ip, spi_i, now) -> str | None``
    (None: valid, else "bad_nonce" / "stale_cookie" / "bad_cookie"). ``rotate_s``: secret lifetime
    in seconds. Lengths are checked before anything is hashed: ``make`` raises ValueError for a
    nonce outside 16-256 octets, ``check`` answers "bad_nonce"."""

    def __init__(self, rng: Callable[[int], bytes], rotate_s: float = 120.0):
        self.rng = rng
        self.rotate_s = rotate_s
        self._version = 0
        self._secrets: dict[int, bytes] = {0: rng(SECRET_LEN)}
        self._rotated_at: float | None = None

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None:
            self._rotated_at = now
            return
        steps = int((now - self._rotated_at) // self.rotate_s)
        for _ in range(min(steps, 2)):  # after two rotations every older cookie is stale anyway
            prev = self._secrets[self._version]
            self._version = (self._version + 1) % 256
            self._secrets = {self._version: self.rng(SECRET_LEN), (self._version - 1) % 256: prev}
        self._rotated_at += steps * self.rotate_s

    @staticmethod
    def _hash(secret: bytes, ni: bytes, ip: str, spi_i: int) -> bytes:
        h = hashes.Hash(hashes.SHA256())
        h.update(ni + ipaddress.ip_address(ip).packed + spi_i.to_bytes(8, "big") + secret)
        return h.finalize()

    def make(self, ni: bytes, ip: str, spi_i: int, now: float) -> bytes:
        if not NONCE_MIN <= len(ni) <= NONCE_MAX:
            raise ValueError(f"nonce of {len(ni)} octets (RFC 7296 §2.10: 16-256)")
        self._rotate(now)
        return bytes([self._version]) + self._hash(self._secrets[self._version], ni, ip, spi_i)

    def check(self, cookie: bytes, ni: bytes, ip: str, spi_i: int, now: float) -> str | None:
        if not NONCE_MIN <= len(ni) <= NONCE_MAX:
            return "bad_nonce"
        if len(cookie) != COOKIE_LEN:
            return "bad_cookie"
        self._rotate(now)
        secret = self._secrets.get(cookie[0])
        if secret is None:
            return "stale_cookie"
        if not hmac.compare_digest(cookie[1:], self._hash(secret, ni, ip, spi_i)):
            return "bad_cookie"
        return None


__all__ = ["CookieJar", "COOKIE_LEN", "NONCE_MIN", "NONCE_MAX"]
