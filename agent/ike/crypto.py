"""IKEv2 cryptographic primitives: PRF, prf+, key derivation, key exchange,
the SK payload cipher (RFC 7296 §2.13, §2.14, §2.17, §2.18, §3.14).

Pure module: primitives come from ``cryptography``; randomness only from the
injected ``rng(n) -> bytes``; no clock, no I/O. Keys never appear in a repr.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from agent.iana import EncrId, IntegId, KeId, PrfId, name_of
from agent.ike import proposals as _p
from agent.ike.errors import CryptoError, IntegrityError, KeyExchangeError  # re-exported
from agent.ike.kem import MlKemExchange

Rng = Callable[[int], bytes]



def ike_key_lengths(prop) -> tuple[int, int]:
    """(SK_e, SK_a) lengths in octets for an IKE proposal (§2.14); SK_a 0 for an AEAD."""
    return _p.encr_key_len(prop.encr, prop.encr_key_bits), (_p.integ_key_len(prop.integ) if prop.integ else 0)


def nonce_ok(nonce: bytes, prf_id: int) -> bool:
    """RFC 7296 §2.10 / §3.9: a nonce is 16-256 octets and at least half the key size of the
    negotiated PRF (e.g. 32 octets with PRF_HMAC_SHA2_512)."""
    return 16 <= len(nonce) <= 256 and 2 * len(nonce) >= Prf(prf_id).key_len

__all__ = [
    "CryptoError", "IntegrityError", "KeyExchangeError",
    "Prf", "IkeKeys", "derive_ike_keys", "derive_ike_keys_from_skeyseed",
    "derive_rekey_skeyseed", "derive_child_keymat", "nonce_ok", "ike_key_lengths",
    "KeyExchange", "ke_public_len", "SkCipher", "Integ",
]


def _rand(rng: Rng, n: int) -> bytes:
    b = rng(n)
    if not isinstance(b, (bytes, bytearray)) or len(b) != n:
        raise CryptoError(f"rng returned {len(b) if hasattr(b, '__len__') else '?'} bytes, wanted {n}")
    return bytes(b)


def _spi_bytes(spi: int | bytes) -> bytes:
    if isinstance(spi, int):
        if not 0 <= spi < 1 << 64:
            raise CryptoError("IKE SPI out of range")
        return spi.to_bytes(8, "big")
    if len(spi) != 8:
        raise CryptoError(f"IKE SPI must be 8 bytes, got {len(spi)}")
    return bytes(spi)


# ---------------------------------------------------------------- PRF

_PRF_HASH = {
    PrfId.PRF_HMAC_SHA1: hashes.SHA1,
    PrfId.PRF_HMAC_SHA2_256: hashes.SHA256,
    PrfId.PRF_HMAC_SHA2_384: hashes.SHA384,
    PrfId.PRF_HMAC_SHA2_512: hashes.SHA512,
}


class Prf:
    """An IKEv2 pseudorandom function (RFC 7296 §2.13; RFC 4868 §2.3 for HMAC-SHA2).

    ``output_len`` and ``key_len`` (the preferred key size, used for SK_d,
    SK_pi, SK_pr) are in bytes. HMAC accepts any key length.
    """

    __slots__ = ("prf_id", "_hash", "output_len", "key_len")

    def __init__(self, prf_id: int) -> None:
        try:
            self._hash = _PRF_HASH[prf_id]
        except KeyError:
            raise CryptoError(f"unsupported prf {name_of(PrfId, prf_id)}") from None
        self.prf_id = int(prf_id)
        self.output_len = self._hash.digest_size
        self.key_len = self.output_len

    def __repr__(self) -> str:
        return f"Prf({name_of(PrfId, self.prf_id)})"

    def prf(self, key: bytes, data: bytes) -> bytes:
        """prf(key, data) -> ``output_len`` bytes."""
        h = hmac.HMAC(key, self._hash())
        h.update(data)
        return h.finalize()

    def prf_plus(self, key: bytes, seed: bytes, n: int) -> bytes:
        """prf+(key, seed) truncated to ``n`` bytes (§2.13):
        T1 = prf(K, S | 0x01), Tk = prf(K, T(k-1) | S | k). At most 255 blocks."""
        if n < 0 or n > 255 * self.output_len:
            raise CryptoError(f"prf+ cannot produce {n} bytes (max {255 * self.output_len})")
        out = bytearray()
        t = b""
        i = 1
        while len(out) < n:
            t = self.prf(key, t + seed + bytes([i]))
            out += t
            i += 1
        return bytes(out[:n])


# ---------------------------------------------------------------- key derivation

@dataclass(frozen=True)
class IkeKeys:
    """IKE SA keys (RFC 7296 §2.14). Bytes; repr shows only lengths."""

    skeyseed: bytes = field(repr=False)
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (f"IkeKeys(sk_d={len(self.sk_d)}B, sk_a={len(self.sk_ai)}B, "
                f"sk_e={len(self.sk_ei)}B, sk_p={len(self.sk_pi)}B, <hidden>)")


def derive_ike_keys_from_skeyseed(prf_id: int, skeyseed: bytes, ni: bytes, nr: bytes,
                                  spi_i: int | bytes, spi_r: int | bytes,
                                  encr_key_len: int, integ_key_len: int) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) (§2.14; also the second half of §2.18).

    ``encr_key_len`` (bytes incl. salt) and ``integ_key_len`` (bytes, 0 for
    AEAD) come from agent.ike.proposals; SK_d/SK_pi/SK_pr are the PRF key size.
    """
    prf = Prf(prf_id)
    kd = prf.key_len
    sizes = (kd, integ_key_len, integ_key_len, encr_key_len, encr_key_len, kd, kd)
    seed = ni + nr + _spi_bytes(spi_i) + _spi_bytes(spi_r)
    km = prf.prf_plus(skeyseed, seed, sum(sizes))
    parts = []
    off = 0
    for s in sizes:
        parts.append(km[off:off + s])
        off += s
    return IkeKeys(skeyseed, *parts)


def derive_ike_keys(prf_id: int, ni: bytes, nr: bytes, g_ir: bytes,
                    spi_i: int | bytes, spi_r: int | bytes,
                    encr_key_len: int, integ_key_len: int) -> IkeKeys:
    """IKE_SA_INIT keys (RFC 7296 §2.14): SKEYSEED = prf(Ni | Nr, g^ir), then
    prf+ as in ``derive_ike_keys_from_skeyseed``. SPIs as int or 8 bytes.

    For PRFs with a fixed key size the nonces are split in half (§2.14);
    all PRFs supported here are HMAC, which takes the whole Ni | Nr.
    """
    skeyseed = Prf(prf_id).prf(ni + nr, g_ir)
    return derive_ike_keys_from_skeyseed(prf_id, skeyseed, ni, nr, spi_i, spi_r,
                                         encr_key_len, integ_key_len)


def derive_rekey_skeyseed(prf_id: int, sk_d_old: bytes, g_ir_new: bytes, ni: bytes, nr: bytes,
                          additional: bytes = b"") -> bytes:
    """SKEYSEED of a rekeyed IKE SA = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18).

    ``prf_id`` is the old IKE SA's PRF (as strongSwan does); feed the result
    to ``derive_ike_keys_from_skeyseed`` with the new SA's PRF, SPIs and nonces.
    ``additional``: SK(1) | ... | SK(n) of IKE_FOLLOWUP_KE exchanges (RFC 9370 §2.2.4),
    appended after Nr. Also SKEYSEED(n) after IKE_INTERMEDIATE n (RFC 9370 §2.2.2) with
    ``sk_d_old`` = SK_d(n-1) and ``g_ir_new`` = SK(n).
    """
    return Prf(prf_id).prf(sk_d_old, g_ir_new + ni + nr + additional)


def derive_child_keymat(prf_id: int, sk_d: bytes, ni: bytes, nr: bytes, n: int,
                        g_ir: bytes | None = None, additional: bytes = b"") -> bytes:
    """CHILD_SA KEYMAT (§2.17): prf+(SK_d, Ni | Nr), or with PFS
    prf+(SK_d, g^ir (new) | Ni | Nr). Returns ``n`` bytes; the caller splits
    it (encryption key then integrity key, initiator-to-responder first).
    ``additional``: SK(1) | ... | SK(n) of IKE_FOLLOWUP_KE exchanges, after Nr (RFC 9370 §2.2.4)."""
    seed = (g_ir or b"") + ni + nr + additional
    return Prf(prf_id).prf_plus(sk_d, seed, n)


# ---------------------------------------------------------------- key exchange

# RFC 3526 §3, 2048-bit MODP group, generator 2.
_MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1"
    "29024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245"
    "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D"
    "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D"
    "670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9"
    "DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)

_MODP = {KeId.MODP_2048: (_MODP_2048_P, 2, 256)}  # p, g, exponent bits
_ECP = {
    KeId.ECP_256: (ec.SECP256R1(), 32),
    KeId.ECP_384: (ec.SECP384R1(), 48),
    KeId.ECP_521: (ec.SECP521R1(), 66),
}
_ECP_ORDER = {
    KeId.ECP_256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    KeId.ECP_384: int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                      "581A0DB248B0A77AECEC196ACCC52973", 16),
    KeId.ECP_521: int("01FF" + "FFFFFFFF" * 7 + "FFFFFFFA51868783BF2F966B7FCC0148"
                      "F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16),
}
_ECP_FIELD_P = {
    KeId.ECP_256: 2**256 - 2**224 + 2**192 + 2**96 - 1,
    KeId.ECP_384: 2**384 - 2**128 - 2**96 + 2**32 - 1,
    KeId.ECP_521: 2**521 - 1,
}


def ke_public_len(ke_id: int) -> int:
    """Length in bytes of the KE payload data for ``ke_id`` (RFC 7296 §3.4,
    RFC 5903 §7, RFC 8031 §3). Raises KeyExchangeError if unsupported."""
    if ke_id in _MODP:
        return _MODP[ke_id][0].bit_length() // 8
    if ke_id in _ECP:
        return 2 * _ECP[ke_id][1]
    if ke_id == KeId.CURVE25519:
        return 32
    if ke_id == KeId.CURVE448:
        return 56
    raise KeyExchangeError(f"unsupported key exchange method {name_of(KeId, ke_id)}")


class KeyExchange:
    """One side of an ephemeral key exchange for a KE payload.

    Groups: MODP_2048 (14, RFC 3526), ECP_256/384/521 (19/20/21, RFC 5903:
    KE data = x | y, no 0x04 prefix), CURVE25519/CURVE448 (31/32, RFC 8031).
    The private key is drawn from ``rng``, so a fixed rng gives fixed output.
    ``shared_secret(peer)`` returns g^ir as bytes (MODP: big-endian, padded
    to the modulus length; ECP: the x coordinate; X25519/X448: 32/56 bytes)
    and raises KeyExchangeError for a peer value RFC 6989 says to reject.
    """

    def __new__(cls, ke_id: int, rng: Rng):
        if cls is KeyExchange and int(ke_id) in (KeId.ML_KEM_768, KeId.ML_KEM_1024):
            # a KEM (draft-ietf-ipsecme-ikev2-mlkem): same interface, role set by first use
            return MlKemExchange(ke_id, rng)
        return super().__new__(cls)

    def __init__(self, ke_id: int, rng: Rng) -> None:
        self.ke_id = int(ke_id)
        self.public_len = ke_public_len(ke_id)
        if ke_id in _MODP:
            p, g, xbits = _MODP[ke_id]
            x = int.from_bytes(_rand(rng, xbits // 8), "big")
            self._x = x % (p - 3) + 2  # 2 <= x <= p-2
            self._pub = pow(g, self._x, p).to_bytes(self.public_len, "big")
        elif ke_id in _ECP:
            curve, clen = _ECP[ke_id]
            n = _ECP_ORDER[ke_id]
            # 8 extra bytes make the modular bias negligible
            d = int.from_bytes(_rand(rng, clen + 8), "big") % (n - 1) + 1
            self._priv = ec.derive_private_key(d, curve)
            nums = self._priv.public_key().public_numbers()
            self._pub = nums.x.to_bytes(clen, "big") + nums.y.to_bytes(clen, "big")
        elif ke_id == KeId.CURVE25519:
            self._priv = x25519.X25519PrivateKey.from_private_bytes(_rand(rng, 32))
            self._pub = self._priv.public_key().public_bytes_raw()
        else:  # CURVE448
            self._priv = x448.X448PrivateKey.from_private_bytes(_rand(rng, 56))
            self._pub = self._priv.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"KeyExchange({name_of(KeId, self.ke_id)})"

    def public_bytes(self) -> bytes:
        """Our KE payload data (``public_len`` bytes)."""
        return self._pub

    def shared_secret(self, peer: bytes) -> bytes:
        """g^ir from the peer's KE payload data; KeyExchangeError if invalid."""
        name = name_of(KeId, self.ke_id)
        if len(peer) != self.public_len:
            raise KeyExchangeError(f"{name}: peer KE data is {len(peer)} bytes, expected {self.public_len}")
        peer = bytes(peer)
        if self.ke_id in _MODP:
            p = _MODP[self.ke_id][0]
            y = int.from_bytes(peer, "big")
            # RFC 6989 §2.1: 1 < y < p-1 (rejects the small-order values)
            if not 1 < y < p - 1:
                raise KeyExchangeError(f"{name}: peer public value out of range")
            return pow(y, self._x, p).to_bytes(self.public_len, "big")
        if self.ke_id in _ECP:
            curve, clen = _ECP[self.ke_id]
            fp = _ECP_FIELD_P[self.ke_id]
            x, y = int.from_bytes(peer[:clen], "big"), int.from_bytes(peer[clen:], "big")
            if x >= fp or y >= fp:
                raise KeyExchangeError(f"{name}: peer point coordinate not in the field")
            try:
                # RFC 6989 §2.3: the point must be on the curve (cofactor 1)
                pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer)
                z = self._priv.exchange(ec.ECDH(), pub)
            except ValueError as e:
                raise KeyExchangeError(f"{name}: peer point is not on the curve") from e
            return z
        try:
            if self.ke_id == KeId.CURVE25519:
                z = self._priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            else:
                z = self._priv.exchange(x448.X448PublicKey.from_public_bytes(peer))
        except ValueError as e:
            raise KeyExchangeError(f"{name}: peer public value gives an all-zero shared secret") from e
        # RFC 8031 §2.3: reject the all-zero output (small-order peer points)
        if not any(z):
            raise KeyExchangeError(f"{name}: peer public value gives an all-zero shared secret")
        return z


# ---------------------------------------------------------------- integrity

_INTEG_HASH = {
    IntegId.AUTH_HMAC_SHA1_96: hashes.SHA1,
    IntegId.AUTH_HMAC_SHA2_256_128: hashes.SHA256,
    IntegId.AUTH_HMAC_SHA2_384_192: hashes.SHA384,
    IntegId.AUTH_HMAC_SHA2_512_256: hashes.SHA512,
}


class Integ:
    """A truncated-HMAC integrity transform (RFC 2404, RFC 4868 §2.1).
    ``key_len`` and ``icv_len`` in bytes."""

    __slots__ = ("integ_id", "_hash", "key_len", "icv_len")

    def __init__(self, integ_id: int) -> None:
        try:
            self._hash = _INTEG_HASH[integ_id]
        except KeyError:
            raise CryptoError(f"unsupported integrity algorithm {name_of(IntegId, integ_id)}") from None
        self.integ_id = int(integ_id)
        self.key_len = _p.integ_key_len(integ_id)
        self.icv_len = _p.integ_icv_len(integ_id)

    def __repr__(self) -> str:
        return f"Integ({name_of(IntegId, self.integ_id)})"

    def compute(self, key: bytes, *data: bytes) -> bytes:
        h = hmac.HMAC(key, self._hash())
        for d in data:
            h.update(d)
        return h.finalize()[: self.icv_len]

    def verify(self, key: bytes, icv: bytes, *data: bytes) -> bool:
        """Constant-time comparison of ``icv`` with the computed value."""
        h = hmac.HMAC(key, self._hash())
        for d in data:
            h.update(d)
        full = h.finalize()
        return len(icv) == self.icv_len and constant_time.bytes_eq(full[: self.icv_len], icv)


# ---------------------------------------------------------------- SK payload

_GCM = (EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_16)
_CCM = (EncrId.ENCR_AES_CCM_8, EncrId.ENCR_AES_CCM_12, EncrId.ENCR_AES_CCM_16)


class SkCipher:
    """Encryption and integrity of the SK payload (RFC 7296 §3.14).

    ``SkCipher(encr, encr_key_len, integ)``: ``encr`` an EncrId,
    ``encr_key_len`` the SK_e length in bytes including any salt (as returned
    by ``agent.ike.proposals.encr_key_len``), ``integ`` an IntegId (0 for AEAD).

    Transforms: AES-CBC + HMAC-SHA1-96/SHA2 (ICV over ``aad | IV | ciphertext``,
    i.e. IKE header through the Pad Length), AES-GCM-8/12/16 and AES-CCM-8/12/16
    (RFC 5282: 8-byte explicit IV, salt = last 4 (GCM) / 3 (CCM) bytes of SK_e),
    ChaCha20-Poly1305 (RFC 7634: salt = last 4 bytes). For AEAD the ``aad`` is
    the IKE header and the SK payload header (RFC 5282 §5.1).

    Layout helpers, all in bytes: ``iv_len``, ``icv_len``, ``block_size``
    (the padding unit: 16 for CBC, 1 for AEAD), ``encrypted_len(n)`` = length
    of IV | ciphertext | ICV for an n-byte plaintext (the SK payload body).
    The codec builds the AAD with the final length, then calls ``encrypt``.
    """

    def __init__(self, encr: int, encr_key_len: int, integ: int = 0) -> None:
        self.encr = int(encr)
        self.integ = int(integ)
        self.encr_key_len = int(encr_key_len)
        ename = name_of(EncrId, encr)
        self._integ: Integ | None = None
        self.salt_len = _p.encr_salt_len(encr)
        if encr in _GCM or encr in _CCM or encr == EncrId.ENCR_CHACHA20_POLY1305:
            if integ:
                raise CryptoError(f"{ename} is AEAD; integrity must be NONE, got {name_of(IntegId, integ)}")
            key_len = encr_key_len - self.salt_len
            ok = key_len == 32 if encr == EncrId.ENCR_CHACHA20_POLY1305 else key_len in (16, 24, 32)
            self.iv_len, self.block_size = 8, 1
            self.icv_len = _p.encr_icv_len(encr)
        elif encr == EncrId.ENCR_AES_CBC:
            ok = encr_key_len in (16, 24, 32)
            self._integ = Integ(integ)
            self.iv_len, self.block_size = 16, 16
            self.icv_len = self._integ.icv_len
        else:
            raise CryptoError(f"unsupported SK encryption algorithm {ename}")
        if not ok:
            raise CryptoError(f"{ename}: invalid SK_e length {encr_key_len}")
        self.integ_key_len = self._integ.key_len if self._integ else 0

    def __repr__(self) -> str:
        return f"SkCipher({name_of(EncrId, self.encr)}, {self.encr_key_len}B, {name_of(IntegId, self.integ)})"

    def padded_len(self, plaintext_len: int) -> int:
        """Plaintext + Padding + Pad Length byte, rounded to ``block_size``."""
        n = plaintext_len + 1
        return n + (-n) % self.block_size

    def encrypted_len(self, plaintext_len: int) -> int:
        """Length of the SK payload body (IV | encrypted | ICV) for a plaintext."""
        return self.iv_len + self.padded_len(plaintext_len) + self.icv_len

    def _check_keys(self, sk_e: bytes, sk_a: bytes) -> None:
        if len(sk_e) != self.encr_key_len:
            raise CryptoError(f"SK_e is {len(sk_e)} bytes, expected {self.encr_key_len}")
        if len(sk_a) != self.integ_key_len:
            raise CryptoError(f"SK_a is {len(sk_a)} bytes, expected {self.integ_key_len}")

    def _aead(self, sk_e: bytes):
        key = sk_e[: len(sk_e) - self.salt_len]
        if self.encr in _GCM:
            return AESGCM(key)
        if self.encr in _CCM:
            return AESCCM(key, tag_length=self.icv_len)
        return ChaCha20Poly1305(key)

    def _aead_open(self, sk_e: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if self.encr in _GCM and self.icv_len != 16:
            # AESGCM only takes 16-byte tags; shorter ones go through Cipher/GCM
            ct, tag = data[: -self.icv_len], data[-self.icv_len:]
            dec = Cipher(algorithms.AES(sk_e[:-4]), modes.GCM(nonce, tag, min_tag_length=self.icv_len)).decryptor()
            dec.authenticate_additional_data(aad)
            return dec.update(ct) + dec.finalize()
        return self._aead(sk_e).decrypt(nonce, data, aad)

    def _aead_seal(self, sk_e: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if self.encr in _GCM and self.icv_len != 16:
            enc = Cipher(algorithms.AES(sk_e[:-4]), modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(aad)
            ct = enc.update(data) + enc.finalize()
            return ct + enc.tag[: self.icv_len]
        return self._aead(sk_e).encrypt(nonce, data, aad)

    def encrypt(self, sk_e: bytes, sk_a: bytes, rng: Rng, aad: bytes, plaintext: bytes) -> bytes:
        """Pad ``plaintext`` (the inner payloads) per §3.14 and protect it.

        ``aad`` = IKE header | SK payload header, already carrying the final
        lengths (use ``encrypted_len``). Returns IV | ciphertext | ICV.
        Raises CryptoError for wrong key lengths.
        """
        self._check_keys(sk_e, sk_a)
        iv = _rand(rng, self.iv_len)
        pad = self.padded_len(len(plaintext)) - len(plaintext) - 1
        data = bytes(plaintext) + bytes(pad) + bytes([pad])
        if self._integ is None:
            nonce = sk_e[len(sk_e) - self.salt_len:] + iv
            return iv + self._aead_seal(sk_e, nonce, data, aad)
        enc = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        return iv + ct + self._integ.compute(sk_a, aad, iv, ct)

    def decrypt(self, sk_e: bytes, sk_a: bytes, aad: bytes, body: bytes) -> bytes:
        """Verify and decrypt an SK payload body (IV | ciphertext | ICV).

        Returns the inner payloads with Padding and Pad Length removed.
        IntegrityError if the ICV does not verify; CryptoError if the body
        is malformed (too short, not block aligned, bad Pad Length).
        """
        self._check_keys(sk_e, sk_a)
        body = bytes(body)
        ct_len = len(body) - self.iv_len - self.icv_len
        if ct_len < 1 or ct_len % self.block_size:
            raise CryptoError(f"SK payload body of {len(body)} bytes is malformed for {name_of(EncrId, self.encr)}")
        iv = body[: self.iv_len]
        ct = body[self.iv_len: self.iv_len + ct_len]
        icv = body[self.iv_len + ct_len:]
        if self._integ is None:
            nonce = sk_e[len(sk_e) - self.salt_len:] + iv
            try:
                data = self._aead_open(sk_e, nonce, ct + icv, aad)
            except InvalidTag:
                raise IntegrityError(f"SK payload ICV does not verify ({name_of(EncrId, self.encr)})") from None
        else:
            if not self._integ.verify(sk_a, icv, aad, iv, ct):
                raise IntegrityError(f"SK payload ICV does not verify ({name_of(IntegId, self.integ)})")
            dec = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).decryptor()
            data = dec.update(ct) + dec.finalize()
        pad = data[-1]
        if pad > len(data) - 1:
            raise CryptoError(f"SK payload Pad Length {pad} exceeds the {len(data)}-byte plaintext")
        return data[: len(data) - 1 - pad]
