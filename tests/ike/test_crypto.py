"""agent.ike.crypto: PRF, prf+, key derivation, key exchange, SK payload.

Known-answer sources are named at each test.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.iana import EncrId, IntegId, KeId, PrfId
from agent.ike.crypto import (
    CryptoError,
    IkeKeys,
    IntegrityError,
    KeyExchange,
    KeyExchangeError,
    Prf,
    SkCipher,
    derive_child_keymat,
    derive_ike_keys,
    derive_ike_keys_from_skeyseed,
    derive_rekey_skeyseed,
    ke_public_len,
)
from agent.ike.crypto import _ECP_ORDER, _MODP_2048_P
from agent.ike.proposals import encr_key_len, integ_key_len

VEC = pathlib.Path("/work/shared/vectors")
H = bytes.fromhex


def fixed_rng(data: bytes):
    """An rng that hands out ``data`` in order, then fails loudly."""
    buf = bytearray(data)

    def rng(n: int) -> bytes:
        if n > len(buf):
            raise AssertionError("fixed rng exhausted")
        out = bytes(buf[:n])
        del buf[:n]
        return out
    return rng


def counter_rng(seed: int = 1):
    state = [seed]

    def rng(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            state[0] = (state[0] * 6364136223846793005 + 1442695040888963407) % 2**64
            out += state[0].to_bytes(8, "big")
        return bytes(out[:n])
    return rng


# ---------------------------------------------------------------- PRF

# RFC 4231 §4.2 (test case 1) and §4.3 (test case 2); RFC 2202 §3 for HMAC-SHA1.
RFC4231 = [
    (PrfId.PRF_HMAC_SHA2_256, b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (PrfId.PRF_HMAC_SHA2_384, b"\x0b" * 20, b"Hi There",
     "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
     "faea9ea9076ede7f4af152e8b2fa9cb6"),
    (PrfId.PRF_HMAC_SHA2_512, b"\x0b" * 20, b"Hi There",
     "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
     "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"),
    (PrfId.PRF_HMAC_SHA2_256, b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (PrfId.PRF_HMAC_SHA2_384, b"Jefe", b"what do ya want for nothing?",
     "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
     "8e2240ca5e69e2c78b3239ecfab21649"),
    (PrfId.PRF_HMAC_SHA2_512, b"Jefe", b"what do ya want for nothing?",
     "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
     "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"),
    (PrfId.PRF_HMAC_SHA1, b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6fb378c8ef146be00"),
    (PrfId.PRF_HMAC_SHA1, b"Jefe", b"what do ya want for nothing?",
     "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
]


@pytest.mark.parametrize("prf_id,key,data,expected", RFC4231)
def test_prf_hmac_vectors(prf_id, key, data, expected):
    p = Prf(prf_id)
    assert p.prf(key, data) == H(expected)
    assert p.output_len == p.key_len == len(H(expected))


def test_prf_unsupported():
    with pytest.raises(CryptoError, match="PRF_AES128_XCBC"):
        Prf(PrfId.PRF_AES128_XCBC)
    assert "PRF_HMAC_SHA2_256" in repr(Prf(PrfId.PRF_HMAC_SHA2_256))


def test_prf_plus_structure_and_limits():
    # §2.13: T1 = prf(K, S|0x01), T2 = prf(K, T1|S|0x02)
    p = Prf(PrfId.PRF_HMAC_SHA2_256)
    k, s = b"key", b"seed"
    t1 = p.prf(k, s + b"\x01")
    t2 = p.prf(k, t1 + s + b"\x02")
    assert p.prf_plus(k, s, 40) == (t1 + t2)[:40]
    assert p.prf_plus(k, s, 0) == b""
    assert len(p.prf_plus(k, s, 255 * 32)) == 255 * 32
    with pytest.raises(CryptoError, match="prf\\+"):
        p.prf_plus(k, s, 255 * 32 + 1)


# ---------------------------------------------------------------- KDF (NIST SP 800-135 via OpenSSL)

@pytest.fixture(scope="module")
def kdf():
    # vectors/ikev2_kdf_kat.json: openssl test/recipes/30-test_evp_data/evpkdf_ikev2.txt,
    # NIST ACVP kdf-components-ikev2-1.0, HMAC-SHA-256
    d = json.loads((VEC / "ikev2_kdf_kat.json").read_text())
    cases = {c["name"].split(" =")[0].split(",")[0]: H(c["expected"]) for c in d["cases"]}
    return d, cases


def test_kdf_skeyseed_and_dkm(kdf):
    d, cases = kdf
    # 224 bytes = SK_d 32 + 2 x SK_a 32 + 2 x SK_e 32 + 2 x SK_p 32 (AES-256-CBC + HMAC-SHA2-256)
    keys = derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, H(d["Ni"]), H(d["Nr"]), H(d["g_ir"]),
                           H(d["SPIi"]), H(d["SPIr"]), 32, 32)
    assert keys.skeyseed == cases["SKEYSEED"]
    dkm = cases["DKM"]
    assert (keys.sk_d + keys.sk_ai + keys.sk_ar + keys.sk_ei + keys.sk_er + keys.sk_pi + keys.sk_pr) == dkm
    # SPIs as integers give the same result
    keys2 = derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, H(d["Ni"]), H(d["Nr"]), H(d["g_ir"]),
                            int(d["SPIi"], 16), int(d["SPIr"], 16), 32, 32)
    assert keys2 == keys


def test_kdf_ike_key_split_for_aead(kdf):
    d, cases = kdf
    # AES-128-GCM-16: SK_a empty, SK_e 20 bytes; split order per §2.14
    keys = derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, H(d["Ni"]), H(d["Nr"]), H(d["g_ir"]),
                           H(d["SPIi"]), H(d["SPIr"]), 20, 0)
    dkm = cases["DKM"]
    assert keys.sk_d == dkm[:32] and keys.sk_ai == b"" and keys.sk_ar == b""
    assert keys.sk_ei == dkm[32:52] and keys.sk_er == dkm[52:72]
    assert keys.sk_pi == dkm[72:104] and keys.sk_pr == dkm[104:136]


def test_kdf_child_keymat(kdf):
    d, cases = kdf
    sk_d = cases["DKM"][:32]
    assert derive_child_keymat(PrfId.PRF_HMAC_SHA2_256, sk_d, H(d["Ni"]), H(d["Nr"]), 224) == \
        cases["Child KEYMAT without PFS"]
    assert derive_child_keymat(PrfId.PRF_HMAC_SHA2_256, sk_d, H(d["Ni"]), H(d["Nr"]), 224,
                               g_ir=H(d["g_ir_new"])) == cases["Child KEYMAT with PFS"]


def test_kdf_rekey_skeyseed(kdf):
    d, cases = kdf
    sk_d = cases["DKM"][:32]
    got = derive_rekey_skeyseed(PrfId.PRF_HMAC_SHA2_256, sk_d, H(d["g_ir_new"]), H(d["Ni"]), H(d["Nr"]))
    assert got == cases["IKE SA rekey SKEYSEED"]
    # the rekeyed SA's keys come from that SKEYSEED with the new SPIs (§2.18)
    k = derive_ike_keys_from_skeyseed(PrfId.PRF_HMAC_SHA2_256, got, H(d["Ni"]), H(d["Nr"]), 1, 2, 16, 32)
    assert k.skeyseed == got
    assert k.sk_d == Prf(PrfId.PRF_HMAC_SHA2_256).prf_plus(
        got, H(d["Ni"]) + H(d["Nr"]) + (1).to_bytes(8, "big") + (2).to_bytes(8, "big"), 32)


def test_ike_keys_repr_hides_keys(kdf):
    d, _ = kdf
    keys = derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, H(d["Ni"]), H(d["Nr"]), H(d["g_ir"]),
                           H(d["SPIi"]), H(d["SPIr"]), 32, 32)
    r = repr(keys) + str(keys)
    for v in (keys.skeyseed, keys.sk_d, keys.sk_ei, keys.sk_ai, keys.sk_pr):
        assert v.hex() not in r and v.hex().upper() not in r
    assert "hidden" in r


def test_bad_spi_rejected():
    with pytest.raises(CryptoError, match="8 bytes"):
        derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, b"n" * 16, b"n" * 16, b"g", b"\x01" * 7, 1, 16, 0)
    with pytest.raises(CryptoError, match="range"):
        derive_ike_keys(PrfId.PRF_HMAC_SHA2_256, b"n" * 16, b"n" * 16, b"g", -1, 1, 16, 0)


# ---------------------------------------------------------------- key exchange

def test_x25519_rfc7748_6_1():
    # RFC 7748 §6.1 Alice/Bob; RFC 8031: KE data is the 32-byte u-coordinate
    a_priv = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b_priv = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a = KeyExchange(KeId.CURVE25519, fixed_rng(a_priv))
    b = KeyExchange(KeId.CURVE25519, fixed_rng(b_priv))
    assert a.public_bytes() == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert b.public_bytes() == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    k = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert a.shared_secret(b.public_bytes()) == k == b.shared_secret(a.public_bytes())


def test_x25519_rejects_zero_secret_and_wrong_length():
    a = KeyExchange(KeId.CURVE25519, counter_rng())
    with pytest.raises(KeyExchangeError, match="all-zero"):
        a.shared_secret(bytes(32))  # small-order point u=0
    with pytest.raises(KeyExchangeError, match="all-zero"):
        a.shared_secret((1).to_bytes(32, "little"))  # u=1, order 1
    with pytest.raises(KeyExchangeError, match="31 bytes, expected 32"):
        a.shared_secret(bytes(31))


def test_ecp256_rfc5903_8_1():
    # RFC 5903 §8.1 (256-bit Random ECP Group): i, g^i, r, g^r, g^ir x-coordinate
    i = int("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433", 16)
    r = int("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53", 16)
    # KeyExchange maps rng bytes b to d = b mod (n-1) + 1, so feed d-1
    a = KeyExchange(KeId.ECP_256, fixed_rng((i - 1).to_bytes(40, "big")))
    b = KeyExchange(KeId.ECP_256, fixed_rng((r - 1).to_bytes(40, "big")))
    assert a.public_bytes() == H("DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
                                 "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3")
    assert b.public_bytes() == H("D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
                                 "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB")
    z = H("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")
    assert a.shared_secret(b.public_bytes()) == z == b.shared_secret(a.public_bytes())


@pytest.mark.parametrize("ke_id", [KeId.ECP_256, KeId.ECP_384, KeId.ECP_521])
def test_ecp_agree_and_reject(ke_id):
    a = KeyExchange(ke_id, counter_rng(1))
    b = KeyExchange(ke_id, counter_rng(2))
    n = ke_public_len(ke_id)
    assert len(a.public_bytes()) == n and a.public_bytes()[0:1] != b"\x04" or n % 2 == 0
    assert a.shared_secret(b.public_bytes()) == b.shared_secret(a.public_bytes())
    # deterministic under a fixed rng
    assert KeyExchange(ke_id, counter_rng(1)).public_bytes() == a.public_bytes()
    pub = b.public_bytes()
    with pytest.raises(KeyExchangeError, match="expected"):
        a.shared_secret(pub[:-1])
    with pytest.raises(KeyExchangeError, match="expected"):
        a.shared_secret(b"\x04" + pub)  # SEC1 prefix is not sent in IKE (RFC 5903 §7)
    off = pub[:-1] + bytes([pub[-1] ^ 1])  # y changed: off the curve
    with pytest.raises(KeyExchangeError, match="not on the curve"):
        a.shared_secret(off)
    with pytest.raises(KeyExchangeError):
        a.shared_secret(bytes(n))  # (0, 0): not on the curve / infinity encoding
    with pytest.raises(KeyExchangeError, match="field"):
        a.shared_secret(b"\xff" * n)


@pytest.mark.parametrize("ke_id", [KeId.ECP_256, KeId.ECP_384, KeId.ECP_521])
def test_ecp_group_orders(ke_id):
    # the hard-coded order n bounds the private scalar: n-1 is valid, n is not
    curve = {KeId.ECP_256: ec.SECP256R1(), KeId.ECP_384: ec.SECP384R1(), KeId.ECP_521: ec.SECP521R1()}[ke_id]
    ec.derive_private_key(_ECP_ORDER[ke_id] - 1, curve)
    with pytest.raises(ValueError):
        ec.derive_private_key(_ECP_ORDER[ke_id], curve)


def test_modp2048():
    # RFC 3526 §3 prime: 2048 bits, ends in 64 one bits
    assert _MODP_2048_P.bit_length() == 2048 and _MODP_2048_P & (2**64 - 1) == 2**64 - 1
    a = KeyExchange(KeId.MODP_2048, counter_rng(5))
    b = KeyExchange(KeId.MODP_2048, counter_rng(6))
    assert len(a.public_bytes()) == 256
    s = a.shared_secret(b.public_bytes())
    assert len(s) == 256 and s == b.shared_secret(a.public_bytes())
    # g^x for a known x: rng bytes 0..0 02 map to x = 2 + 2 = 4 -> 16
    k = KeyExchange(KeId.MODP_2048, fixed_rng((2).to_bytes(32, "big")))
    assert int.from_bytes(k.public_bytes(), "big") == 16
    # RFC 6989 §2.1: reject 0, 1, p-1, >= p; wrong length
    p = _MODP_2048_P
    for bad in (0, 1, p - 1, p, 2**2048 - 1):
        with pytest.raises(KeyExchangeError, match="out of range"):
            a.shared_secret(bad.to_bytes(256, "big"))
    with pytest.raises(KeyExchangeError, match="expected 256"):
        a.shared_secret(b.public_bytes()[1:])


def test_x448_agree():
    a = KeyExchange(KeId.CURVE448, counter_rng(3))
    b = KeyExchange(KeId.CURVE448, counter_rng(4))
    assert len(a.public_bytes()) == 56
    assert a.shared_secret(b.public_bytes()) == b.shared_secret(a.public_bytes())
    with pytest.raises(KeyExchangeError):
        a.shared_secret(bytes(56))


def test_ke_unsupported_and_bad_rng():
    with pytest.raises(KeyExchangeError, match="MODP_1024"):
        KeyExchange(KeId.MODP_1024, counter_rng())
    with pytest.raises(CryptoError, match="rng returned"):
        KeyExchange(KeId.CURVE25519, lambda n: b"short")
    assert "CURVE25519" in repr(KeyExchange(KeId.CURVE25519, counter_rng()))


# ---------------------------------------------------------------- SK payload

def test_sk_chacha20poly1305_rfc7634_appendix_b():
    # RFC 7634 Appendix B (IKEv2 example), vectors/rfc7634_chacha20poly1305.json
    d = json.loads((VEC / "rfc7634_chacha20poly1305.json").read_text())
    km = H(d["key_material"].split(" (")[0].replace(" ", ""))
    ex = d["ikev2_example"]
    aad = H(ex["aad"].split(" ")[0])
    full_plain = H(ex["plaintext"])  # payloads | Pad Length 0
    c = SkCipher(EncrId.ENCR_CHACHA20_POLY1305, 36, 0)
    assert (c.iv_len, c.icv_len, c.block_size) == (8, 16, 1)
    body = c.encrypt(km, b"", fixed_rng(H(ex["iv"])), aad, full_plain[:-1])
    assert body == H(ex["iv"]) + H(ex["ciphertext_and_tag"])
    assert len(body) == c.encrypted_len(len(full_plain) - 1)
    # total length field in the AAD matches the body: IKE header 28 + SK header 4 + body
    assert int.from_bytes(aad[24:28], "big") == 28 + 4 + len(body)
    assert c.decrypt(km, b"", aad, body) == full_plain[:-1]


# Frames 3 and 4 of wireshark test/captures/ikev2-decrypt-aes128ccm12.pcap
# (captures/scapy/ikev2-decrypt-aes128ccm12-subset.pcap; keys in
# vectors/ikev2_sk_aes_ccm12_kat.json): whole IKE messages.
CCM_FRAME3 = H("ea684d21597afd36d9fe2ab22dac23ac2e202508000000020000003d2a000021"
               "cca0b35de5abc51c9987cbf1f5ecff210eb767cdb85179383b964d78e2")
CCM_FRAME4 = H("ea684d21597afd36d9fe2ab22dac23ac2e202520000000020000003500000019"
               "a80c957bac15c3f8afdf315a81cc4b7c40e8660d44")


def test_sk_aes_ccm12_wireshark_capture():
    d = json.loads((VEC / "ikev2_sk_aes_ccm12_kat.json").read_text())
    c = SkCipher(EncrId.ENCR_AES_CCM_12, encr_key_len(EncrId.ENCR_AES_CCM_12, 128), 0)
    assert (c.iv_len, c.icv_len, c.salt_len) == (8, 12, 3)
    p3 = c.decrypt(H(d["SK_ei"]), b"", CCM_FRAME3[:32], CCM_FRAME3[32:])
    assert p3 == H("0000000801000000")  # Delete payload for the IKE SA
    assert CCM_FRAME3[32:40] == H(d["frame3_initiator_INFORMATIONAL_MID2"]["iv"])
    p4 = c.decrypt(H(d["SK_er"]), b"", CCM_FRAME4[:32], CCM_FRAME4[32:])
    assert p4 == b""
    # re-encrypting with the captured IV reproduces the captured body
    assert c.encrypt(H(d["SK_ei"]), b"", fixed_rng(CCM_FRAME3[32:40]), CCM_FRAME3[:32], p3) == CCM_FRAME3[32:]
    # the responder's key does not open the initiator's message
    with pytest.raises(IntegrityError):
        c.decrypt(H(d["SK_er"]), b"", CCM_FRAME3[:32], CCM_FRAME3[32:])


ALL_TRANSFORMS = [
    (EncrId.ENCR_AES_GCM_16, 128, 0), (EncrId.ENCR_AES_GCM_16, 256, 0),
    (EncrId.ENCR_AES_GCM_12, 128, 0), (EncrId.ENCR_AES_GCM_8, 256, 0),
    (EncrId.ENCR_AES_CCM_8, 128, 0), (EncrId.ENCR_AES_CCM_12, 256, 0), (EncrId.ENCR_AES_CCM_16, 192, 0),
    (EncrId.ENCR_CHACHA20_POLY1305, None, 0),
    (EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128),
    (EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_384_192),
    (EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_512_256),
    (EncrId.ENCR_AES_CBC, 192, IntegId.AUTH_HMAC_SHA1_96),
]


def _setup(encr, bits, integ):
    ekl = encr_key_len(encr, bits)
    ikl = integ_key_len(integ)
    c = SkCipher(encr, ekl, integ)
    rng = counter_rng(7)
    return c, rng(ekl), rng(ikl), rng


def _aad(c, plen):
    # IKE header (28) | SK payload header (4) with the real lengths
    body_len = c.encrypted_len(plen)
    hdr = bytes(8) + bytes(8) + bytes([46, 0x20, 37, 0x08]) + bytes(4) + (28 + 4 + body_len).to_bytes(4, "big")
    return hdr + bytes([0, 0]) + (4 + body_len).to_bytes(2, "big")


@pytest.mark.parametrize("encr,bits,integ", ALL_TRANSFORMS)
@pytest.mark.parametrize("plen", [0, 1, 15, 16, 17, 100])
def test_sk_roundtrip_lengths(encr, bits, integ, plen):
    c, sk_e, sk_a, rng = _setup(encr, bits, integ)
    pt = bytes(range(plen))
    aad = _aad(c, plen)
    body = c.encrypt(sk_e, sk_a, rng, aad, pt)
    assert len(body) == c.encrypted_len(plen)
    assert (len(body) - c.iv_len - c.icv_len) % c.block_size == 0
    assert c.decrypt(sk_e, sk_a, aad, body) == pt
    # fresh IV each time
    assert c.encrypt(sk_e, sk_a, rng, aad, pt)[: c.iv_len] != body[: c.iv_len]


@pytest.mark.parametrize("encr,bits,integ", ALL_TRANSFORMS)
def test_sk_tampering_detected(encr, bits, integ):
    c, sk_e, sk_a, rng = _setup(encr, bits, integ)
    pt = b"inner payloads" * 3
    aad = _aad(c, len(pt))
    body = c.encrypt(sk_e, sk_a, rng, aad, pt)
    for pos in (0, c.iv_len, len(body) - c.icv_len - 1, len(body) - 1):  # IV, ciphertext, ICV
        bad = bytearray(body)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError, match="ICV"):
            c.decrypt(sk_e, sk_a, aad, bytes(bad))
    bad_aad = bytearray(aad)
    bad_aad[19] ^= 0x08  # flags byte of the IKE header
    with pytest.raises(IntegrityError):
        c.decrypt(sk_e, sk_a, bytes(bad_aad), body)
    if not sk_a:  # AEAD: the tag also binds the key (CBC's HMAC covers only the ciphertext)
        with pytest.raises(IntegrityError):
            c.decrypt(bytes(b ^ 0xFF for b in sk_e), sk_a, aad, body)
    if sk_a:
        with pytest.raises(IntegrityError):
            c.decrypt(sk_e, bytes(b ^ 0xFF for b in sk_a), aad, body)


@pytest.mark.parametrize("encr,bits,integ", ALL_TRANSFORMS)
def test_sk_malformed_body(encr, bits, integ):
    c, sk_e, sk_a, rng = _setup(encr, bits, integ)
    aad = _aad(c, 0)
    for body in (b"", bytes(c.iv_len + c.icv_len), bytes(c.iv_len + c.icv_len + c.block_size + 1)
                 if c.block_size > 1 else bytes(c.iv_len + c.icv_len - 1)):
        with pytest.raises(CryptoError) as ei:
            c.decrypt(sk_e, sk_a, aad, body)
        assert not isinstance(ei.value, IntegrityError)


def test_sk_bad_pad_length_is_an_error():
    # an authenticated plaintext whose Pad Length exceeds it (GCM, built with the primitive)
    c, sk_e, _, _ = _setup(EncrId.ENCR_AES_GCM_16, 128, 0)
    iv = b"\x00" * 8
    aad = b"A" * 32
    ct = AESGCM(sk_e[:16]).encrypt(sk_e[16:] + iv, b"\x00\x00\x05", aad)
    with pytest.raises(CryptoError, match="Pad Length 5"):
        c.decrypt(sk_e, b"", aad, iv + ct)


def test_sk_constructor_and_key_errors():
    with pytest.raises(CryptoError, match="AEAD"):
        SkCipher(EncrId.ENCR_AES_GCM_16, 20, IntegId.AUTH_HMAC_SHA2_256_128)
    with pytest.raises(CryptoError, match="SK_e length"):
        SkCipher(EncrId.ENCR_AES_GCM_16, 16, 0)  # salt missing
    with pytest.raises(CryptoError, match="SK_e length"):
        SkCipher(EncrId.ENCR_CHACHA20_POLY1305, 32, 0)
    with pytest.raises(CryptoError, match="integrity"):
        SkCipher(EncrId.ENCR_AES_CBC, 16, 0)
    with pytest.raises(CryptoError, match="unsupported"):
        SkCipher(EncrId.ENCR_3DES, 24, IntegId.AUTH_HMAC_SHA1_96)
    c, sk_e, sk_a, rng = _setup(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128)
    with pytest.raises(CryptoError, match="SK_e is 15"):
        c.encrypt(sk_e[:15], sk_a, rng, b"", b"x")
    with pytest.raises(CryptoError, match="SK_a is 31"):
        c.decrypt(sk_e, sk_a[:31], b"", bytes(64))
    r = repr(c)
    assert sk_e.hex() not in r and "ENCR_AES_CBC" in r


def test_cbc_icv_covers_aad_iv_and_ciphertext():
    # §3.14: checksum over the message from the IKE header through the Pad Length (encrypted)
    from cryptography.hazmat.primitives import hashes, hmac
    c, sk_e, sk_a, rng = _setup(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128)
    aad = _aad(c, 5)
    body = c.encrypt(sk_e, sk_a, rng, aad, b"hello")
    h = hmac.HMAC(sk_a, hashes.SHA256())
    h.update(aad + body[:-16])
    assert body[-16:] == h.finalize()[:16]
    assert c.encrypted_len(5) == 16 + 16 + 16 and c.encrypted_len(15) == 48 and c.encrypted_len(16) == 64


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=200), idx=st.integers(0, len(ALL_TRANSFORMS) - 1))
def test_fuzz_sk_decrypt_raises_only_crypto_error(body, idx):
    c, sk_e, sk_a, _ = _setup(*ALL_TRANSFORMS[idx])
    with pytest.raises(CryptoError):  # random bodies never authenticate
        c.decrypt(sk_e, sk_a, b"\x00" * 32, body)


_FUZZ_KES = {k: KeyExchange(k, counter_rng(9)) for k in (KeId.MODP_2048, KeId.ECP_256, KeId.ECP_384, KeId.CURVE25519)}


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), k=st.sampled_from(sorted(_FUZZ_KES)))
def test_fuzz_ke_peer_value(data, k):
    ke = _FUZZ_KES[k]
    try:
        s = ke.shared_secret(data)
    except KeyExchangeError:
        return
    assert len(data) == ke.public_len and len(s) in (32, 48, 256)


WIRESHARK_TRANSFORMS = [t for t in ALL_TRANSFORMS if t[0] != EncrId.ENCR_CHACHA20_POLY1305]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_wireshark_decrypts_our_sk_payloads(tmp_path):
    """Independent check of the SK construction: tshark 4.0 decrypts and
    verifies an INFORMATIONAL Delete we protect with every transform it knows,
    given our keys and our Wireshark algorithm names (ikev2_decryption_table)."""
    from scapy.all import IP, UDP, Raw, wrpcap

    from agent.ike.proposals import wireshark_ike_encr_name, wireshark_ike_integ_name
    rows, pkts = [], []
    for n, (encr, bits, integ) in enumerate(WIRESHARK_TRANSFORMS):
        c, sk_e, sk_a, rng = _setup(encr, bits, integ)
        spi_i, spi_r = bytes([n + 1]) * 8, bytes([0xA0 + n]) * 8
        plain = H("0000000801000000")  # Delete payload, IKE SA
        blen = c.encrypted_len(len(plain))
        hdr = spi_i + spi_r + bytes([46, 0x20, 37, 0x08]) + (2).to_bytes(4, "big") + (32 + blen).to_bytes(4, "big")
        skh = bytes([42, 0]) + (4 + blen).to_bytes(2, "big")
        msg = hdr + skh + c.encrypt(sk_e, sk_a, rng, hdr + skh, plain)
        pkts.append(IP(src="198.51.100.1", dst="198.51.100.2") / UDP(sport=500, dport=500) / Raw(msg))
        en, an = wireshark_ike_encr_name(encr, bits), wireshark_ike_integ_name(integ)
        rows.append(f'{spi_i.hex()},{spi_r.hex()},{sk_e.hex()},{sk_e.hex()},"{en}",{sk_a.hex()},{sk_a.hex()},"{an}"')
    (tmp_path / "wireshark").mkdir()
    (tmp_path / "wireshark" / "ikev2_decryption_table").write_text("\n".join(rows) + "\n")
    wrpcap(str(tmp_path / "sk.pcap"), pkts)
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["tshark", "-r", str(tmp_path / "sk.pcap"), "-V"], env=env,
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "Error loading" not in text, text
    checks = [ln for ln in text.splitlines() if "Integrity Checksum Data" in ln]
    assert len(checks) == len(pkts) and all("[correct]" in ln for ln in checks), checks
    assert text.count("Payload: Delete (42)") == len(pkts)
