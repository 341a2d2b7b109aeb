"""agent.ike.proposals: strongSwan proposal keywords -> IANA IDs, sizes,
Wireshark UAT names.

Keyword semantics follow strongSwan's proposal keywords documentation
(docs.strongswan.org "IKEv2 Cipher Suites"); IDs are RFC 7296 §3.3.2 /
IANA; Wireshark names are the strings in libwireshark 4.0 (ikev2 and esp
UAT tables), the sample tables in /work/shared/captures/wireshark.
"""
from __future__ import annotations

import csv
import pathlib
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.iana import EncrId, EsnId, IntegId, KeId, PrfId
from agent.ike.proposals import (
    EspProposal,
    IkeProposal,
    ProposalError,
    encr_icv_len,
    encr_key_len,
    integ_icv_len,
    integ_key_len,
    is_aead,
    parse_esp_proposal,
    parse_ike_proposal,
    prf_output_len,
    wireshark_esp_encr_name,
    wireshark_esp_integ_name,
    wireshark_ike_encr_name,
    wireshark_ike_integ_name,
)
from agent.model import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS

WS = pathlib.Path("/work/shared/captures/wireshark")


@pytest.mark.parametrize("s,expected", [
    ("aes128gcm16-prfsha256-x25519",
     IkeProposal(EncrId.ENCR_AES_GCM_16, 128, 0, PrfId.PRF_HMAC_SHA2_256, (KeId.CURVE25519,))),
    ("aes256gcm16-prfsha384-ecp384",
     IkeProposal(EncrId.ENCR_AES_GCM_16, 256, 0, PrfId.PRF_HMAC_SHA2_384, (KeId.ECP_384,))),
    ("aes256-sha256-prfsha256-modp2048",
     IkeProposal(EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_256_128, PrfId.PRF_HMAC_SHA2_256,
                 (KeId.MODP_2048,))),
    ("chacha20poly1305-prfsha512-curve25519",
     IkeProposal(EncrId.ENCR_CHACHA20_POLY1305, None, 0, PrfId.PRF_HMAC_SHA2_512, (KeId.CURVE25519,))),
    # PRF derived from the integrity algorithm, as strongSwan does
    ("aes128-sha384-ecp256",
     IkeProposal(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_384_192, PrfId.PRF_HMAC_SHA2_384,
                 (KeId.ECP_256,))),
    ("aes128-sha512-x25519-ecp256",
     IkeProposal(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_512_256, PrfId.PRF_HMAC_SHA2_512,
                 (KeId.CURVE25519, KeId.ECP_256))),
    # explicit PRF wins over the derived one; case-insensitive
    ("AES128-SHA256-prfsha512-ECP256",
     IkeProposal(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128, PrfId.PRF_HMAC_SHA2_512,
                 (KeId.ECP_256,))),
    ("aes128ccm12-prfsha256-ecp256",
     IkeProposal(EncrId.ENCR_AES_CCM_12, 128, 0, PrfId.PRF_HMAC_SHA2_256, (KeId.ECP_256,))),
])
def test_parse_ike(s, expected):
    assert parse_ike_proposal(s) == expected


@pytest.mark.parametrize("s,expected", [
    ("aes128gcm16", EspProposal(EncrId.ENCR_AES_GCM_16, 128, 0, (EsnId.NO_ESN,))),
    ("aes256gcm16-esn", EspProposal(EncrId.ENCR_AES_GCM_16, 256, 0, (EsnId.ESN,))),
    ("aes256gcm16-noesn", EspProposal(EncrId.ENCR_AES_GCM_16, 256, 0, (EsnId.NO_ESN,))),
    ("aes128gcm16-esn-noesn", EspProposal(EncrId.ENCR_AES_GCM_16, 128, 0, (EsnId.ESN, EsnId.NO_ESN))),
    ("chacha20poly1305", EspProposal(EncrId.ENCR_CHACHA20_POLY1305, None, 0, (EsnId.NO_ESN,))),
    ("aes128-sha256", EspProposal(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128, (EsnId.NO_ESN,))),
    ("aes256-sha512-esn", EspProposal(EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_512_256, (EsnId.ESN,))),
    ("aes256-sha384", EspProposal(EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_384_192, (EsnId.NO_ESN,))),
    # a KE method in an ESP proposal asks for PFS in CREATE_CHILD_SA
    ("aes128gcm16-x25519", EspProposal(EncrId.ENCR_AES_GCM_16, 128, 0, (EsnId.NO_ESN,), (KeId.CURVE25519,))),
])
def test_parse_esp(s, expected):
    assert parse_esp_proposal(s) == expected


def test_model_defaults_parse():
    for s in DEFAULT_IKE_PROPOSALS:
        parse_ike_proposal(s)
    for s in DEFAULT_ESP_PROPOSALS:
        parse_esp_proposal(s)


def test_describe_names_algorithms():
    assert parse_ike_proposal("aes128gcm16-prfsha256-x25519").describe() == \
        "ENCR_AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE25519"
    assert parse_esp_proposal("aes128-sha256-esn").describe() == \
        "ENCR_AES_CBC_128/AUTH_HMAC_SHA2_256_128/ESN"


def test_unknown_token_is_named_and_known_listed():
    with pytest.raises(ProposalError) as ei:
        parse_ike_proposal("aes128gcm16-prfsha256-x25591")
    assert ei.value.token == "x25591"
    msg = str(ei.value)
    assert "'x25591'" in msg and "x25519" in msg and "prfsha256" in msg and "aes256gcm16" in msg
    with pytest.raises(ProposalError) as ei:
        parse_esp_proposal("aes128-md5")
    assert ei.value.token == "md5" and "sha256" in str(ei.value) and "esn" in str(ei.value)


@pytest.mark.parametrize("s,fragment", [
    ("", "empty"),
    ("   ", "empty"),
    ("aes128gcm16--x25519", "empty keyword"),
    ("prfsha256-x25519", "exactly one encryption"),
    ("aes128-aes256-sha256-x25519", "exactly one encryption"),
    ("aes128gcm16-sha256-prfsha256-x25519", "takes no integrity"),
    ("aes128gcm16-x25519", "explicit prf"),
    ("aes128-prfsha256-x25519", "needs an integrity"),
    ("aes128gcm16-prfsha256", "key exchange"),
    ("aes128gcm16-prfsha256-x25519-x25519", "repeats"),
    ("aes128-sha256-sha384-x25519", "at most one"),
    ("aes128gcm16-prfsha256-esn-x25519", "unknown algorithm 'esn'"),
    ("null-sha256-x25519", "not supported for IKE"),
])
def test_ike_errors(s, fragment):
    with pytest.raises(ProposalError, match=fragment):
        parse_ike_proposal(s)


@pytest.mark.parametrize("s,fragment", [
    ("", "empty"),
    ("sha256", "exactly one encryption"),
    ("aes128gcm16-sha256", "takes no integrity"),
    ("aes128", "needs an integrity"),
    ("aes128-sha256-sha512", "at most one"),
    ("aes128gcm16-esn-esn", "repeats"),
    ("aes128gcm16-prfsha256", "unknown algorithm 'prfsha256'"),
    ("aes128ccm16", "not supported for ESP"),
])
def test_esp_errors(s, fragment):
    with pytest.raises(ProposalError, match=fragment):
        parse_esp_proposal(s)


def test_non_string_rejected():
    with pytest.raises(ProposalError):
        parse_ike_proposal(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("encr,bits,n", [
    (EncrId.ENCR_AES_CBC, 128, 16), (EncrId.ENCR_AES_CBC, 256, 32),
    (EncrId.ENCR_AES_GCM_16, 128, 20), (EncrId.ENCR_AES_GCM_16, 256, 36),  # RFC 5282 §7.1: +4 salt
    (EncrId.ENCR_AES_CCM_12, 128, 19),  # RFC 5282 §7.1: +3 salt
    (EncrId.ENCR_CHACHA20_POLY1305, None, 36),  # RFC 7634 §2: 32 + 4 salt
    (EncrId.ENCR_CHACHA20_POLY1305, 256, 36),
])
def test_encr_key_len(encr, bits, n):
    assert encr_key_len(encr, bits) == n


@pytest.mark.parametrize("encr,bits", [
    (EncrId.ENCR_AES_CBC, None), (EncrId.ENCR_AES_GCM_16, 100),
    (EncrId.ENCR_CHACHA20_POLY1305, 128), (EncrId.ENCR_3DES, None), (999, 128),
])
def test_encr_key_len_errors(encr, bits):
    with pytest.raises(ProposalError):
        encr_key_len(encr, bits)


def test_integ_sizes_rfc4868():
    # RFC 4868 §2.1: key = hash output, ICV = half of it; RFC 2404: SHA1-96
    assert [(integ_key_len(i), integ_icv_len(i)) for i in (
        IntegId.NONE, IntegId.AUTH_HMAC_SHA1_96, IntegId.AUTH_HMAC_SHA2_256_128,
        IntegId.AUTH_HMAC_SHA2_384_192, IntegId.AUTH_HMAC_SHA2_512_256)] == \
        [(0, 0), (20, 12), (32, 16), (48, 24), (64, 32)]
    with pytest.raises(ProposalError):
        integ_key_len(IntegId.AUTH_AES_XCBC_96)
    with pytest.raises(ProposalError):
        integ_icv_len(77)
    assert prf_output_len(PrfId.PRF_HMAC_SHA2_384) == 48
    with pytest.raises(ProposalError):
        prf_output_len(PrfId.PRF_AES128_XCBC)
    assert is_aead(EncrId.ENCR_AES_GCM_16) and not is_aead(EncrId.ENCR_AES_CBC)
    assert encr_icv_len(EncrId.ENCR_AES_GCM_8) == 8 and encr_icv_len(EncrId.ENCR_AES_CBC) == 0


def _uat_rows(name):
    lines = [ln for ln in (WS / name).read_text().splitlines() if ln and not ln.startswith("#")]
    return list(csv.reader(lines))


def test_wireshark_ike_names_match_sample_table():
    # Wireshark's own test table (captures/wireshark/ikev2_decryption_table).
    encr_names = {r[4] for r in _uat_rows("ikev2_decryption_table")}
    integ_names = {r[7] for r in _uat_rows("ikev2_decryption_table")}
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_CCM_12, 128) in encr_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_CBC, 256) in encr_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_GCM_16, 256) in encr_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_GCM_8, 256) in encr_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_CCM_16, 256) in encr_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_CTR, 192) in encr_names
    assert wireshark_ike_integ_name(IntegId.NONE) in integ_names
    assert wireshark_ike_integ_name(IntegId.AUTH_HMAC_SHA2_256_128) in integ_names
    assert wireshark_ike_integ_name(IntegId.AUTH_HMAC_SHA2_512_256) in integ_names
    assert wireshark_ike_encr_name(EncrId.ENCR_AES_GCM_16, 128) == "AES-GCM-128 with 16 octet ICV [RFC5282]"
    # Wireshark 4.0 cannot decrypt ChaCha20-Poly1305 in IKE or ESP
    assert wireshark_ike_encr_name(EncrId.ENCR_CHACHA20_POLY1305, None) is None
    assert wireshark_esp_encr_name(EncrId.ENCR_CHACHA20_POLY1305) is None


def test_wireshark_esp_names_match_sample_table():
    rows = _uat_rows("esp_sa")
    assert wireshark_esp_encr_name(EncrId.ENCR_AES_CBC, 128) == rows[0][4]
    assert wireshark_esp_integ_name(IntegId.AUTH_HMAC_SHA1_96) == rows[0][6]
    assert wireshark_esp_encr_name(EncrId.ENCR_AES_GCM_16, 128) == "AES-GCM with 16 octet ICV [RFC4106]"
    assert wireshark_esp_integ_name(IntegId.NONE) == "NULL"
    assert wireshark_esp_integ_name(IntegId.AUTH_HMAC_SHA2_256_128) == "HMAC-SHA-256-128 [RFC4868]"


def _tshark_uat_errors(tmp_path, table: str, rows: list[str]) -> str:
    """Load a UAT table into tshark 4.0 and return what it says about it."""
    cfg = tmp_path / "wireshark"
    cfg.mkdir()
    (cfg / table).write_text("".join(r + "\n" for r in rows))
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    pcap = "/work/shared/captures/scapy/ikev2_notify_redirect.pcap"
    out = subprocess.run(["tshark", "-r", pcap, "-c", "1"], env=env, capture_output=True,
                         text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_accepts_our_ike_names(tmp_path):
    rows = []
    for bits in (128, 192, 256):
        for e in (EncrId.ENCR_AES_CBC, EncrId.ENCR_AES_GCM_16, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_8,
                  EncrId.ENCR_AES_CCM_8, EncrId.ENCR_AES_CCM_12, EncrId.ENCR_AES_CCM_16, EncrId.ENCR_AES_CTR):
            for i in (IntegId.NONE, IntegId.AUTH_HMAC_SHA1_96, IntegId.AUTH_HMAC_SHA2_256_128,
                      IntegId.AUTH_HMAC_SHA2_384_192, IntegId.AUTH_HMAC_SHA2_512_256):
                if is_aead(e) != (i == IntegId.NONE):
                    continue  # Wireshark, like RFC 5282, allows only these pairs
                en, iname = wireshark_ike_encr_name(e, bits), wireshark_ike_integ_name(i)
                assert en and iname
                # key lengths also checked by Wireshark against the algorithm
                ek = "ab" * encr_key_len(e, bits)
                ak = "cd" * integ_key_len(i)
                rows.append(f'0000000000000001,0000000000000002,{ek},{ek},"{en}",{ak},{ak},"{iname}"')
    out = _tshark_uat_errors(tmp_path, "ikev2_decryption_table", rows)
    assert "invalid value" not in out and "Error loading" not in out, out
    # the check itself can fail: a bogus name is reported
    (tmp_path / "wireshark").rename(tmp_path / "old")
    out = _tshark_uat_errors(tmp_path, "ikev2_decryption_table",
                             ['0000000000000001,0000000000000002,,,"AES-GCM-128",,,"NONE [RFC4306]"'])
    assert "invalid value" in out


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_accepts_our_esp_names(tmp_path):
    rows = []
    for e in (EncrId.ENCR_AES_CBC, EncrId.ENCR_AES_GCM_16, EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_CTR):
        for i in (IntegId.NONE, IntegId.AUTH_HMAC_SHA1_96, IntegId.AUTH_HMAC_SHA2_256_128,
                  IntegId.AUTH_HMAC_SHA2_384_192, IntegId.AUTH_HMAC_SHA2_512_256):
            if is_aead(e) != (i == IntegId.NONE):
                continue
            en, iname = wireshark_esp_encr_name(e, 128), wireshark_esp_integ_name(i)
            assert en and iname
            ek = "0x" + "ab" * encr_key_len(e, 128)
            ak = "0x" + "cd" * integ_key_len(i) if i else ""
            rows.append(f'"IPv4","*","*","0x00000001","{en}","{ek}","{iname}","{ak}"')
    out = _tshark_uat_errors(tmp_path, "esp_sa", rows)
    assert "invalid value" not in out and "Error loading" not in out, out


KEYWORDS = ["aes128gcm16", "aes256", "sha256", "prfsha384", "x25519", "modp2048", "esn", "noesn",
            "chacha20poly1305", "ecp256", "bogus", "", "AES128", "sha512"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40),
                 st.lists(st.sampled_from(KEYWORDS), max_size=6).map("-".join)))
def test_fuzz_parsers_raise_only_proposal_error(s):
    for parse in (parse_ike_proposal, parse_esp_proposal):
        try:
            p = parse(s)
        except ProposalError:
            continue
        # whatever parses has usable sizes
        encr_key_len(p.encr, p.encr_key_bits)
        integ_key_len(p.integ)
