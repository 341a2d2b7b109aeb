"""strongSwan-style proposal strings -> IANA transform IDs (RFC 7296 §3.3).

A proposal string is a ``-`` separated list of keywords, for example
``aes128gcm16-prfsha256-x25519`` (IKE) or ``aes128-sha256-esn`` (ESP).
Keywords are the ones strongSwan uses (ipsec.conf(5) / swanctl.conf(5)
"proposals"); their table is meshsec.proposals, shared with the controller's
inventory check. Pure module: no I/O.

Also here: key and ICV sizes per transform, and the algorithm names
Wireshark 4.0 expects in its ``ikev2_decryption_table`` and ``esp_sa`` UAT
files (the key log).
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.iana import EncrId, EsnId, IntegId, KeId, PrfId, name_of
from meshsec import proposals as _table

__all__ = [
    "ProposalError",
    "IkeProposal",
    "EspProposal",
    "parse_ike_proposal",
    "parse_esp_proposal",
    "parse_ah_proposal",
    "parse_child_proposal",
    "is_aead",
    "encr_key_len",
    "encr_salt_len",
    "encr_icv_len",
    "integ_key_len",
    "integ_icv_len",
    "prf_output_len",
    "wireshark_ike_encr_name",
    "wireshark_ike_integ_name",
    "wireshark_esp_encr_name",
    "wireshark_esp_integ_name",
]


class ProposalError(ValueError):
    """A proposal string (or an algorithm ID) we cannot use.

    ``token`` is the offending keyword (or ``None`` for structural errors).
    """

    def __init__(self, message: str, token: str | None = None) -> None:
        super().__init__(message)
        self.token = token


# The keyword table is shared with the controller (meshsec.proposals, IANA names);
# here each keyword resolves to its agent.iana enum member.
# keyword -> (EncrId, key bits or None)
_ENCR: dict[str, tuple[int, int | None]] = {k: (EncrId[n], bits) for k, (n, bits) in _table.ENCR.items()}
_INTEG: dict[str, int] = {k: IntegId[n] for k, n in _table.INTEG.items()}
_PRF: dict[str, int] = {k: PrfId[n] for k, n in _table.PRF.items()}

# strongSwan derives the PRF from the integrity algorithm when none is given
_PRF_FROM_INTEG: dict[int, int] = {
    IntegId.AUTH_HMAC_SHA1_96: PrfId.PRF_HMAC_SHA1,
    IntegId.AUTH_HMAC_SHA2_256_128: PrfId.PRF_HMAC_SHA2_256,
    IntegId.AUTH_HMAC_SHA2_384_192: PrfId.PRF_HMAC_SHA2_384,
    IntegId.AUTH_HMAC_SHA2_512_256: PrfId.PRF_HMAC_SHA2_512,
}

_KE: dict[str, int] = {k: KeId[n] for k, n in _table.KE.items()}
MAX_ADD_KE = _table.MAX_ADD_KE


def _split_add_ke(toks: list[str], s: str) -> tuple[list[str], tuple[tuple[int, ...], ...]]:
    """Pull strongSwan 6's ``keN_<method>`` / ``keN_none`` keywords (RFC 9370 additional key
    exchanges, N = 1..7) out of ``toks``. Returns (other tokens, add_ke) where add_ke[N-1]
    lists the acceptable methods for ADDITIONAL_KEY_EXCHANGE_N (0 = NONE: optional)."""
    rest: list[str] = []
    slots: dict[int, list[int]] = {}
    for tok in toks:
        if len(tok) > 4 and tok[0:2] == "ke" and tok[2].isdigit() and tok[3] == "_":
            n, meth = int(tok[2]), tok[4:]
            if not 1 <= n <= MAX_ADD_KE:
                raise ProposalError(f"{tok!r} in proposal {s!r}: additional key exchanges are ke1_ .. ke7_", tok)
            if meth == "none":
                val = int(KeId.NONE)
            elif meth in _KE:
                val = int(_KE[meth])
            else:
                raise ProposalError(f"unknown key exchange {meth!r} in {tok!r} of proposal {s!r} "
                                    f"(known: none, {', '.join(sorted(_KE))})", tok)
            if val in slots.setdefault(n, []):
                raise ProposalError(f"proposal {s!r} repeats {tok!r}", tok)
            slots[n].append(val)
        else:
            rest.append(tok)
    top = max(slots, default=0)
    return rest, tuple(tuple(slots.get(n, ())) for n in range(1, top + 1))


def _add_ke_labels(add_ke: tuple[tuple[int, ...], ...]) -> list[str]:
    """``+ML_KEM_768`` per chosen additional key exchange (NONE skipped); alternatives as ``(A|B)``."""
    out = []
    for alts in add_ke:
        names = [name_of(KeId, k) for k in alts]
        if not alts or (len(alts) == 1 and alts[0] == KeId.NONE):
            continue
        out.append("+" + (names[0] if len(names) == 1 else "(" + "|".join(names) + ")"))
    return out


def additional_kes(add_ke: tuple[tuple[int, ...], ...]) -> list[int]:
    """The methods of a *chosen* proposal's additional key exchanges, in order, NONE left out."""
    return [alts[0] for alts in add_ke if alts and alts[0] != KeId.NONE]

_ESN: dict[str, int] = {k: EsnId[n] for k, n in _table.ESN.items()}

_AEAD = frozenset(EncrId[n] for n in _table.AEAD_ENCR)

# Algorithms this code base can run for IKE (SkCipher) and ESP.
_IKE_ENCR_SUPPORTED = frozenset(EncrId[n] for n in _table.IKE_ENCR_SUPPORTED)
_ESP_ENCR_SUPPORTED = frozenset(EncrId[n] for n in _table.ESP_ENCR_SUPPORTED)


def _known(kind: str, table: dict) -> str:
    return f"known {kind}: " + ", ".join(sorted(table))


@dataclass(frozen=True)
class IkeProposal:
    """One IKE proposal (RFC 7296 §3.3). ``integ`` is 0 for AEAD ciphers;
    ``encr_key_bits`` is None for fixed-key ciphers (ChaCha20-Poly1305);
    ``ke`` lists acceptable KE methods, preferred first."""

    encr: int
    encr_key_bits: int | None
    integ: int
    prf: int
    ke: tuple[int, ...]
    # RFC 9370: add_ke[n-1] = acceptable methods of ADDITIONAL_KEY_EXCHANGE_n (0 = NONE)
    add_ke: tuple[tuple[int, ...], ...] = ()

    def describe(self) -> str:
        """Human-readable, e.g. ``ENCR_AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE25519``
        (hybrid: ``.../CURVE25519+ML_KEM_768``)."""
        parts = [_encr_label(self.encr, self.encr_key_bits)]
        if self.integ:
            parts.append(name_of(IntegId, self.integ))
        parts.append(name_of(PrfId, self.prf))
        parts.append(self.key_exchanges())
        return "/".join(parts)

    def key_exchanges(self) -> str:
        """The key exchange methods, e.g. ``CURVE25519+ML_KEM_768`` (RFC 9370 hybrid)."""
        return "/".join(name_of(KeId, k) for k in self.ke) + "".join(_add_ke_labels(self.add_ke))


@dataclass(frozen=True)
class EspProposal:
    """One ESP proposal (RFC 7296 §3.3). ``esn`` lists acceptable EsnId
    values (default ``(NO_ESN,)``); ``ke`` lists KE methods for PFS in
    CREATE_CHILD_SA (empty: no PFS). ``ke`` is an addition to the
    docs/design.md contract, last field with a default."""

    encr: int
    encr_key_bits: int | None
    integ: int
    esn: tuple[int, ...] = (EsnId.NO_ESN,)
    ke: tuple[int, ...] = ()
    add_ke: tuple[tuple[int, ...], ...] = ()  # RFC 9370, PFS in CREATE_CHILD_SA only

    @property
    def is_ah(self) -> bool:
        """An AH proposal (RFC 7296 §3.3: Protocol ID AH, no ENCR transform): ``encr`` is 0."""
        return not self.encr

    def describe(self) -> str:
        parts = ["AH"] if self.is_ah else [_encr_label(self.encr, self.encr_key_bits)]
        if self.integ:
            parts.append(name_of(IntegId, self.integ))
        parts.extend(name_of(KeId, k) for k in self.ke)
        parts.extend(_add_ke_labels(self.add_ke))
        parts.extend(name_of(EsnId, e) for e in self.esn)
        return "/".join(parts)


def _encr_label(encr: int, bits: int | None) -> str:
    name = name_of(EncrId, encr)
    return f"{name}_{bits}" if bits else name


def _tokens(s: str) -> list[str]:
    if not isinstance(s, str) or not s.strip():
        raise ProposalError("empty proposal string")
    toks = [t.strip().lower() for t in s.strip().split("-")]
    for t in toks:
        if not t:
            raise ProposalError(f"empty keyword in proposal {s!r}", "")
    return toks


def _classify(tok: str, s: str, tables: list[tuple[str, dict]]) -> tuple[str, object]:
    for kind, table in tables:
        if tok in table:
            return kind, table[tok]
    known = "; ".join(_known(kind, table) for kind, table in tables)
    raise ProposalError(f"unknown algorithm {tok!r} in proposal {s!r} ({known})", tok)


def parse_ike_proposal(s: str) -> IkeProposal:
    """Parse an IKE proposal string, e.g. ``aes256-sha256-prfsha256-modp2048``.

    Exactly one encryption keyword; AEAD ciphers take no integrity keyword
    and need an explicit PRF; non-AEAD ciphers need an integrity keyword,
    the PRF defaults to the one matching it (strongSwan's rule). At least one
    KE method. Raises ProposalError naming the offending keyword.
    """
    toks, add_ke = _split_add_ke(_tokens(s), s)
    tables = [("encryption", _ENCR), ("integrity", _INTEG), ("prf", _PRF), ("key exchange", _KE)]
    encr: list[tuple[int, int | None]] = []
    integ: list[int] = []
    prf: list[int] = []
    ke: list[int] = []
    for tok in toks:
        kind, val = _classify(tok, s, tables)
        {"encryption": encr, "integrity": integ, "prf": prf, "key exchange": ke}[kind].append(val)
    if len(encr) != 1:
        raise ProposalError(f"IKE proposal {s!r} needs exactly one encryption algorithm, has {len(encr)}")
    e, bits = encr[0]
    if e not in _IKE_ENCR_SUPPORTED:
        raise ProposalError(f"encryption {_encr_label(e, bits)} not supported for IKE in {s!r}")
    if len(integ) > 1 or len(prf) > 1:
        raise ProposalError(f"IKE proposal {s!r}: give at most one integrity and one prf algorithm")
    if e in _AEAD:
        if integ:
            raise ProposalError(f"IKE proposal {s!r}: AEAD cipher {name_of(EncrId, e)} takes no integrity algorithm")
        if not prf:
            raise ProposalError(f"IKE proposal {s!r}: AEAD cipher needs an explicit prf (e.g. prfsha256)")
        i = IntegId.NONE
    else:
        if not integ:
            raise ProposalError(f"IKE proposal {s!r}: {name_of(EncrId, e)} needs an integrity algorithm (e.g. sha256)")
        i = integ[0]
        if not prf:
            prf = [_PRF_FROM_INTEG[i]]
    if not ke:
        raise ProposalError(f"IKE proposal {s!r} needs a key exchange method (e.g. x25519)")
    if len(set(ke)) != len(ke):
        raise ProposalError(f"IKE proposal {s!r} repeats a key exchange method")
    return IkeProposal(int(e), bits, int(i), int(prf[0]), tuple(int(k) for k in ke), add_ke)


def parse_esp_proposal(s: str) -> EspProposal:
    """Parse an ESP proposal string, e.g. ``aes128gcm16``, ``aes128-sha256-esn``.

    Optional ``esn`` / ``noesn`` (default no ESN) and KE methods for PFS.
    Raises ProposalError naming the offending keyword.
    """
    toks, add_ke = _split_add_ke(_tokens(s), s)
    tables = [("encryption", _ENCR), ("integrity", _INTEG), ("key exchange", _KE), ("esn", _ESN)]
    encr: list[tuple[int, int | None]] = []
    integ: list[int] = []
    ke: list[int] = []
    esn: list[int] = []
    for tok in toks:
        kind, val = _classify(tok, s, tables)
        {"encryption": encr, "integrity": integ, "key exchange": ke, "esn": esn}[kind].append(val)
    if len(encr) != 1:
        raise ProposalError(f"ESP proposal {s!r} needs exactly one encryption algorithm, has {len(encr)}")
    e, bits = encr[0]
    if e not in _ESP_ENCR_SUPPORTED:
        raise ProposalError(f"encryption {_encr_label(e, bits)} not supported for ESP in {s!r}")
    if len(integ) > 1:
        raise ProposalError(f"ESP proposal {s!r}: give at most one integrity algorithm")
    if e in _AEAD:
        if integ:
            raise ProposalError(f"ESP proposal {s!r}: AEAD cipher {name_of(EncrId, e)} takes no integrity algorithm")
        i = IntegId.NONE
    else:
        if not integ:
            raise ProposalError(f"ESP proposal {s!r}: {name_of(EncrId, e)} needs an integrity algorithm (e.g. sha256)")
        i = integ[0]
    if len(set(esn)) != len(esn) or len(set(ke)) != len(ke):
        raise ProposalError(f"ESP proposal {s!r} repeats a keyword")
    return EspProposal(int(e), bits, int(i), tuple(int(x) for x in esn) or (int(EsnId.NO_ESN),),
                       tuple(int(k) for k in ke), add_ke)


def parse_ah_proposal(s: str) -> EspProposal:
    """Parse an AH proposal string (RFC 4302), e.g. ``sha256``, ``sha256-esn``, ``sha384-x25519``.

    Exactly one integrity algorithm, optional ``esn``/``noesn`` and KE methods (PFS in
    CREATE_CHILD_SA); no encryption (AH has none: RFC 7296 §3.3). The result is an
    EspProposal with ``encr`` 0 (``is_ah``). Raises ProposalError naming the keyword.
    """
    toks = _tokens(s)
    for tok in toks:
        if tok in _ENCR:
            raise ProposalError(f"AH proposal {s!r}: AH has no encryption, remove {tok!r} "
                                f"(or use protocol esp / ah+esp for confidentiality)", tok)
    tables = [("integrity", _INTEG), ("key exchange", _KE), ("esn", _ESN)]
    integ: list[int] = []
    ke: list[int] = []
    esn: list[int] = []
    for tok in toks:
        kind, val = _classify(tok, s, tables)
        {"integrity": integ, "key exchange": ke, "esn": esn}[kind].append(val)
    if len(integ) != 1:
        raise ProposalError(f"AH proposal {s!r} needs exactly one integrity algorithm (e.g. sha256), has {len(integ)}")
    if len(set(esn)) != len(esn) or len(set(ke)) != len(ke):
        raise ProposalError(f"AH proposal {s!r} repeats a keyword")
    return EspProposal(0, None, int(integ[0]), tuple(int(x) for x in esn) or (int(EsnId.NO_ESN),),
                       tuple(int(k) for k in ke))


def parse_child_proposal(s: str) -> EspProposal:
    """A CHILD_SA proposal string: ESP when it names an encryption algorithm, else AH."""
    if any(t.strip().lower() in _ENCR for t in str(s).split("-")):
        return parse_esp_proposal(s)
    return parse_ah_proposal(s)


def is_aead(encr: int) -> bool:
    """True for combined-mode ciphers (integ transform NONE)."""
    return encr in _AEAD


def encr_salt_len(encr: int) -> int:
    """Salt bytes taken from the end of the key material: GCM 4 (RFC 4106
    §8.1, RFC 5282 §7.1), CCM 3 (RFC 4309 §7.1), ChaCha20-Poly1305 4
    (RFC 7634 §2), AES-CTR 4 (RFC 3686 §5.1); 0 otherwise."""
    if encr in (EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_16,
                EncrId.ENCR_CHACHA20_POLY1305, EncrId.ENCR_AES_CTR):
        return 4
    if encr in (EncrId.ENCR_AES_CCM_8, EncrId.ENCR_AES_CCM_12, EncrId.ENCR_AES_CCM_16):
        return 3
    return 0


def encr_key_len(encr: int, bits: int | None) -> int:
    """Key material length in bytes for ``encr``, including the salt.

    ``bits`` is the KEY_LENGTH attribute (128/192/256 for AES; None for
    ChaCha20-Poly1305, which is 256-bit only). Raises ProposalError.
    """
    if encr == EncrId.ENCR_CHACHA20_POLY1305:
        if bits not in (None, 256):
            raise ProposalError(f"ENCR_CHACHA20_POLY1305 has no key length {bits}")
        return 32 + 4
    if encr == EncrId.ENCR_NULL:
        return 0
    if encr in (EncrId.ENCR_AES_CBC, EncrId.ENCR_AES_CTR) or encr in _AEAD:
        if bits not in (128, 192, 256):
            raise ProposalError(f"{name_of(EncrId, encr)} needs KEY_LENGTH 128, 192 or 256, got {bits}")
        return bits // 8 + encr_salt_len(encr)
    raise ProposalError(f"unsupported encryption algorithm {name_of(EncrId, encr)}")


def encr_icv_len(encr: int) -> int:
    """ICV length in bytes of an AEAD cipher (0 for non-AEAD)."""
    return {
        EncrId.ENCR_AES_GCM_8: 8, EncrId.ENCR_AES_GCM_12: 12, EncrId.ENCR_AES_GCM_16: 16,
        EncrId.ENCR_AES_CCM_8: 8, EncrId.ENCR_AES_CCM_12: 12, EncrId.ENCR_AES_CCM_16: 16,
        EncrId.ENCR_CHACHA20_POLY1305: 16,
    }.get(encr, 0)


_INTEG_SIZES: dict[int, tuple[int, int]] = {  # key bytes, ICV bytes (RFC 2404, RFC 4868 §2.1)
    IntegId.NONE: (0, 0),
    IntegId.AUTH_HMAC_SHA1_96: (20, 12),
    IntegId.AUTH_HMAC_SHA2_256_128: (32, 16),
    IntegId.AUTH_HMAC_SHA2_384_192: (48, 24),
    IntegId.AUTH_HMAC_SHA2_512_256: (64, 32),
}


def integ_key_len(integ: int) -> int:
    """Integrity key length in bytes (RFC 4868 §2.1.1: the hash output size)."""
    try:
        return _INTEG_SIZES[integ][0]
    except KeyError:
        raise ProposalError(f"unsupported integrity algorithm {name_of(IntegId, integ)}") from None


def integ_icv_len(integ: int) -> int:
    """Truncated ICV length in bytes (RFC 4868 §2.1: half the hash output)."""
    try:
        return _INTEG_SIZES[integ][1]
    except KeyError:
        raise ProposalError(f"unsupported integrity algorithm {name_of(IntegId, integ)}") from None


def prf_output_len(prf: int) -> int:
    """PRF output (and preferred key) length in bytes."""
    try:
        return {PrfId.PRF_HMAC_SHA1: 20, PrfId.PRF_HMAC_SHA2_256: 32,
                PrfId.PRF_HMAC_SHA2_384: 48, PrfId.PRF_HMAC_SHA2_512: 64}[prf]
    except KeyError:
        raise ProposalError(f"unsupported prf {name_of(PrfId, prf)}") from None


# --- Wireshark 4.0 UAT names (checked against libwireshark.so.16 strings) ---
# None: Wireshark 4.0 cannot decrypt this algorithm (ChaCha20-Poly1305).

def wireshark_ike_encr_name(encr: int, bits: int | None) -> str | None:
    """Encryption algorithm column of ``ikev2_decryption_table``."""
    if encr == EncrId.ENCR_NULL:
        return "NULL [RFC2410]"
    if encr == EncrId.ENCR_3DES:
        return "3DES [RFC2451]"
    if bits not in (128, 192, 256):
        return None
    if encr == EncrId.ENCR_AES_CBC:
        return f"AES-CBC-{bits} [RFC3602]"
    if encr == EncrId.ENCR_AES_CTR:
        return f"AES-CTR-{bits} [RFC5930]"
    for mode, ids in (("GCM", (EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_16)),
                      ("CCM", (EncrId.ENCR_AES_CCM_8, EncrId.ENCR_AES_CCM_12, EncrId.ENCR_AES_CCM_16))):
        if encr in ids:
            return f"AES-{mode}-{bits} with {encr_icv_len(encr)} octet ICV [RFC5282]"
    return None


def wireshark_ike_integ_name(integ: int) -> str | None:
    """Integrity algorithm column of ``ikev2_decryption_table``."""
    return {
        IntegId.NONE: "NONE [RFC4306]",
        IntegId.AUTH_HMAC_SHA1_96: "HMAC_SHA1_96 [RFC2404]",
        IntegId.AUTH_HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
        IntegId.AUTH_HMAC_SHA2_384_192: "HMAC_SHA2_384_192 [RFC4868]",
        IntegId.AUTH_HMAC_SHA2_512_256: "HMAC_SHA2_512_256 [RFC4868]",
    }.get(integ)


def wireshark_esp_encr_name(encr: int, bits: int | None = None) -> str | None:
    """Encryption algorithm column of ``esp_sa`` (key column = key || salt)."""
    if encr == EncrId.ENCR_NULL:
        return "NULL"
    if encr == EncrId.ENCR_3DES:
        return "TripleDES-CBC [RFC2451]"
    if encr == EncrId.ENCR_AES_CBC:
        return "AES-CBC [RFC3602]"
    if encr == EncrId.ENCR_AES_CTR:
        return "AES-CTR [RFC3686]"
    if encr in (EncrId.ENCR_AES_GCM_8, EncrId.ENCR_AES_GCM_12, EncrId.ENCR_AES_GCM_16):
        return f"AES-GCM with {encr_icv_len(encr)} octet ICV [RFC4106]"
    return None


def wireshark_esp_integ_name(integ: int) -> str | None:
    """Authentication algorithm column of ``esp_sa`` (``NULL`` for AEAD)."""
    return {
        IntegId.NONE: "NULL",
        IntegId.AUTH_HMAC_SHA1_96: "HMAC-SHA-1-96 [RFC2404]",
        IntegId.AUTH_HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
        IntegId.AUTH_HMAC_SHA2_384_192: "HMAC-SHA-384-192 [RFC4868]",
        IntegId.AUTH_HMAC_SHA2_512_256: "HMAC-SHA-512-256 [RFC4868]",
    }.get(integ)
