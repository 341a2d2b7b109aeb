"""The proposal keyword table both sides use (strongSwan's "proposals" keywords).

The agent (agent.ike.proposals) resolves each keyword to its IANA transform ID and
parses proposal strings with it; the controller (controller.proposals) checks
inventory proposals against the same keywords, so an inventory the controller lets
through never fails in an agent. Values are IANA names (RFC 7296 §3.3.2, RFC 9370,
draft-ietf-ipsecme-ikev2-mlkem), the enum member names of ``agent.iana``; this module
imports neither side.

Pure module: constants only.
"""
from __future__ import annotations

# encryption keyword -> (Transform Type 1 name, key bits or None for fixed-key ciphers)
ENCR: dict[str, tuple[str, int | None]] = {}
for _bits in (128, 192, 256):
    ENCR[f"aes{_bits}"] = ("ENCR_AES_CBC", _bits)
    ENCR[f"aes{_bits}ctr"] = ("ENCR_AES_CTR", _bits)
    for _icv in (8, 12, 16):
        ENCR[f"aes{_bits}gcm{_icv}"] = (f"ENCR_AES_GCM_{_icv}", _bits)
        ENCR[f"aes{_bits}ccm{_icv}"] = (f"ENCR_AES_CCM_{_icv}", _bits)
    # strongSwan: aesXXXgcm / aesXXXccm without ICV size means 16 octets
    ENCR[f"aes{_bits}gcm"] = ("ENCR_AES_GCM_16", _bits)
    ENCR[f"aes{_bits}ccm"] = ("ENCR_AES_CCM_16", _bits)
ENCR["aes"] = ("ENCR_AES_CBC", 128)
ENCR["chacha20poly1305"] = ("ENCR_CHACHA20_POLY1305", None)
ENCR["null"] = ("ENCR_NULL", None)
del _bits, _icv

# combined-mode ciphers: no integrity transform (RFC 5282, RFC 7634)
AEAD_ENCR = frozenset({"ENCR_AES_GCM_8", "ENCR_AES_GCM_12", "ENCR_AES_GCM_16",
                       "ENCR_AES_CCM_8", "ENCR_AES_CCM_12", "ENCR_AES_CCM_16",
                       "ENCR_CHACHA20_POLY1305"})
# what the agent runs for IKE (its SK cipher) and for ESP; other ENCR keywords are known
# (named in errors) but refused
IKE_ENCR_SUPPORTED = frozenset({"ENCR_AES_CBC", *AEAD_ENCR})
ESP_ENCR_SUPPORTED = frozenset({"ENCR_AES_CBC", "ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305"})

# integrity keyword -> Transform Type 3 name
INTEG: dict[str, str] = {
    "sha1": "AUTH_HMAC_SHA1_96",
    "sha": "AUTH_HMAC_SHA1_96",
    "sha256": "AUTH_HMAC_SHA2_256_128",
    "sha2_256": "AUTH_HMAC_SHA2_256_128",
    "sha384": "AUTH_HMAC_SHA2_384_192",
    "sha2_384": "AUTH_HMAC_SHA2_384_192",
    "sha512": "AUTH_HMAC_SHA2_512_256",
    "sha2_512": "AUTH_HMAC_SHA2_512_256",
}

# prf keyword -> Transform Type 2 name
PRF: dict[str, str] = {
    "prfsha1": "PRF_HMAC_SHA1",
    "prfsha256": "PRF_HMAC_SHA2_256",
    "prfsha384": "PRF_HMAC_SHA2_384",
    "prfsha512": "PRF_HMAC_SHA2_512",
}

# key exchange keyword -> Transform Type 4 name; two keywords may name one method
KE: dict[str, str] = {
    "modp2048": "MODP_2048",
    "ecp256": "ECP_256",
    "ecp384": "ECP_384",
    "ecp521": "ECP_521",
    "x25519": "CURVE25519",
    "curve25519": "CURVE25519",
    "x448": "CURVE448",
    "curve448": "CURVE448",
    "mlkem768": "ML_KEM_768",  # usually as ke1_mlkem768 (RFC 9370 additional key exchange)
    "mlkem1024": "ML_KEM_1024",
}

# esn keyword -> Transform Type 5 name
ESN: dict[str, str] = {"esn": "ESN", "noesn": "NO_ESN"}

MAX_ADD_KE = 7  # ADDITIONAL_KEY_EXCHANGE_1..7 (RFC 9370 §2.2.1): keywords ke1_ .. ke7_
