"""ML-KEM (FIPS 203) as an IKEv2 key exchange method (draft-ietf-ipsecme-ikev2-mlkem).

IANA Transform Type 4 values ML_KEM_768 (36) and ML_KEM_1024 (37). A KEM is
asymmetric: the initiator's KE data is the encapsulation key (1184 / 1568
octets), the responder's KE data the ciphertext (1088 / 1568 octets); the
shared secret is 32 octets.

:class:`MlKemExchange` has the interface of ``agent.ike.crypto.KeyExchange``
(``public_bytes()``, ``shared_secret(peer)``, ``ke_id``) and picks its role by
the first call, which is the order the IKE tasks already use:

- ``public_bytes()`` first: initiator. The key pair comes from a 64-octet
  seed (d | z, FIPS 203 §6.1) drawn from the injected ``rng``;
  ``shared_secret(ciphertext)`` decapsulates.
- ``shared_secret(encapsulation_key)`` first: responder. Encapsulates to the
  peer's key; ``public_bytes()`` then returns the ciphertext. ``cryptography``
  draws the encapsulation randomness itself (it has no deterministic
  encapsulation), so the responder's output is not reproducible from ``rng``.

Wrong lengths and encapsulation keys failing the FIPS 203 §7.2 modulus check
raise ``KeyExchangeError`` naming what was wrong. Pure module: no I/O.
"""
from __future__ import annotations

from typing import Callable

from cryptography.hazmat.primitives.asymmetric import mlkem

from agent.iana import KeId, name_of
from agent.ike.errors import KeyExchangeError

__all__ = ["MlKemExchange", "MLKEM_SIZES", "is_kem"]

# ke_id -> (encapsulation key octets, ciphertext octets) (FIPS 203 §8, Table 3)
MLKEM_SIZES: dict[int, tuple[int, int]] = {
    int(KeId.ML_KEM_768): (1184, 1088),
    int(KeId.ML_KEM_1024): (1568, 1568),
}
_CLASSES = {
    int(KeId.ML_KEM_768): (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    int(KeId.ML_KEM_1024): (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
SEED_LEN = 64
SHARED_SECRET_LEN = 32


def is_kem(ke_id: int) -> bool:
    """True for the ML-KEM key exchange methods this module runs."""
    return int(ke_id) in MLKEM_SIZES


class MlKemExchange:
    """One side of an ML-KEM key exchange (see the module docstring).

    ``MlKemExchange(ke_id, rng)``; ``ek_len`` / ``ct_len`` in octets.
    ``public_len`` is the length of *our* KE data once the role is fixed.
    """

    def __init__(self, ke_id: int, rng: Callable[[int], bytes]) -> None:
        if not is_kem(ke_id):
            raise KeyExchangeError(f"{name_of(KeId, ke_id)} is not an ML-KEM method this node supports "
                                   f"(use ML_KEM_768 or ML_KEM_1024)")
        self.ke_id = int(ke_id)
        self.ek_len, self.ct_len = MLKEM_SIZES[self.ke_id]
        self._rng = rng
        self._role: str | None = None
        self._priv = None
        self._pub = b""
        self._ss = b""

    def __repr__(self) -> str:
        return f"MlKemExchange({name_of(KeId, self.ke_id)}, {self._role or 'unused'})"

    @property
    def public_len(self) -> int:
        return self.ct_len if self._role == "responder" else self.ek_len

    def public_bytes(self) -> bytes:
        """Initiator: the encapsulation key; responder: the ciphertext."""
        if self._role is None:
            seed = self._rng(SEED_LEN)
            if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
                raise KeyExchangeError(f"rng returned a bad {SEED_LEN}-octet ML-KEM seed")
            priv_cls, _pub_cls = _CLASSES[self.ke_id]
            self._priv = priv_cls.from_seed_bytes(bytes(seed))
            self._pub = self._priv.public_key().public_bytes_raw()
            self._role = "initiator"
        return self._pub

    def shared_secret(self, peer: bytes) -> bytes:
        """Initiator: decapsulate the peer's ciphertext; responder (first call):
        encapsulate to the peer's encapsulation key. 32 octets; KeyExchangeError
        for a peer value of the wrong length or an invalid encapsulation key."""
        name = name_of(KeId, self.ke_id)
        peer = bytes(peer)
        if self._role == "initiator":
            if len(peer) != self.ct_len:
                raise KeyExchangeError(f"{name}: peer ciphertext is {len(peer)} octets, expected {self.ct_len}")
            try:
                return self._priv.decapsulate(peer)
            except ValueError as e:  # cannot happen for a right-length ciphertext (implicit rejection)
                raise KeyExchangeError(f"{name}: ciphertext rejected: {e}") from None
        if self._role == "responder":
            return self._ss
        if len(peer) != self.ek_len:
            raise KeyExchangeError(f"{name}: peer encapsulation key is {len(peer)} octets, expected {self.ek_len}")
        _priv_cls, pub_cls = _CLASSES[self.ke_id]
        try:
            pub = pub_cls.from_public_bytes(peer)
            self._ss, self._pub = pub.encapsulate()
        except ValueError as e:  # FIPS 203 §7.2 modulus check
            raise KeyExchangeError(f"{name}: peer encapsulation key is invalid ({e})") from None
        self._role = "responder"
        return self._ss
