"""Proposal strings the agents accept, checked in the controller (pure).

The controller must not import ``agent``; this module keeps its own table of
the keywords ``agent.ike.proposals`` accepts and the same grammar, so a bad
inventory is refused with a clear message instead of crashing every agent
that receives it. ``tests/controller/test_proposals_table.py`` compares the
table and the verdicts with the agent's parser, so the two cannot drift.

Grammar (strongSwan's "proposals" keywords, ``-`` separated, case-insensitive):
- IKE: exactly one encryption keyword the IKE code runs; an AEAD cipher
  (GCM, CCM, ChaCha20-Poly1305) takes no integrity keyword and needs a PRF,
  any other needs one integrity keyword (the PRF then defaults to it); at
  least one key exchange method, none repeated; ``keN_<method>`` /
  ``keN_none`` (N 1..7, RFC 9370 additional key exchanges).
- CHILD_SA (``esp_proposals``): ESP when a keyword is an encryption
  algorithm (one of those ESP runs; AEAD without integrity, others with one),
  else AH (exactly one integrity keyword, no ``keN_``); optional key exchange
  methods (PFS) and ``esn`` / ``noesn``.
"""
from __future__ import annotations

# encryption keyword -> AEAD?
_AES_BITS = (128, 192, 256)
IKE_ENCR: dict[str, bool] = {"aes": False, "chacha20poly1305": True}
ESP_ENCR: dict[str, bool] = {"aes": False, "chacha20poly1305": True}
for _b in _AES_BITS:
    IKE_ENCR[f"aes{_b}"] = False
    ESP_ENCR[f"aes{_b}"] = False
    ESP_ENCR[f"aes{_b}gcm16"] = ESP_ENCR[f"aes{_b}gcm"] = True
    IKE_ENCR[f"aes{_b}gcm"] = IKE_ENCR[f"aes{_b}ccm"] = True
    for _icv in (8, 12, 16):
        IKE_ENCR[f"aes{_b}gcm{_icv}"] = IKE_ENCR[f"aes{_b}ccm{_icv}"] = True
# keywords the agent knows but cannot run (it names them in its own error)
UNSUPPORTED_ENCR = frozenset({"null", *(f"aes{b}ctr" for b in _AES_BITS),
                              *(f"aes{b}{m}{i}" for b in _AES_BITS for m in ("gcm", "ccm") for i in (8, 12)),
                              *(f"aes{b}ccm" for b in _AES_BITS)})
ALL_ENCR = frozenset(IKE_ENCR) | frozenset(ESP_ENCR) | UNSUPPORTED_ENCR
INTEG = frozenset({"sha1", "sha", "sha256", "sha2_256", "sha384", "sha2_384", "sha512", "sha2_512"})
PRF = frozenset({"prfsha1", "prfsha256", "prfsha384", "prfsha512"})
KE = frozenset({"modp2048", "ecp256", "ecp384", "ecp521", "x25519", "curve25519", "x448", "curve448",
                "mlkem768", "mlkem1024"})
# keywords naming the same method (a repeat of either is a repeat)
_KE_ALIAS = {"curve25519": "x25519", "curve448": "x448"}
ESN = frozenset({"esn", "noesn"})
MAX_ADD_KE = 7


class ProposalInvalid(ValueError):
    """The proposal string is not one the agents accept; the message names
    the keyword and lists the known ones."""


def _tokens(s: str) -> list[str]:
    if not isinstance(s, str) or not s.strip():
        raise ProposalInvalid("empty proposal string")
    toks = [t.strip().lower() for t in s.strip().split("-")]
    if any(not t for t in toks):
        raise ProposalInvalid(f"empty keyword in proposal {s!r} (two '-' in a row?)")
    return toks


def _add_ke(tok: str, s: str) -> bool:
    """True if ``tok`` is a ``keN_<method>``/``keN_none`` keyword (validated)."""
    if not (len(tok) > 4 and tok[:2] == "ke" and tok[2].isdigit() and tok[3] == "_"):
        return False
    if not 1 <= int(tok[2]) <= MAX_ADD_KE:
        raise ProposalInvalid(f"{tok!r} in proposal {s!r}: additional key exchanges are ke1_ .. ke7_")
    if tok[4:] != "none" and tok[4:] not in KE:
        raise ProposalInvalid(f"unknown key exchange {tok[4:]!r} in {tok!r} of proposal {s!r} "
                              f"(known: none, {', '.join(sorted(KE))})")
    return True


def _unknown(tok: str, s: str, kinds: list[tuple[str, frozenset | dict]]) -> ProposalInvalid:
    known = "; ".join(f"{k}: {', '.join(sorted(t))}" for k, t in kinds)
    return ProposalInvalid(f"unknown algorithm {tok!r} in proposal {s!r} (known {known})")


def _check_ke(ke: list[str], add: list[str], s: str) -> None:
    if len({_KE_ALIAS.get(k, k) for k in ke}) != len(ke) or len(set(add)) != len(add):
        raise ProposalInvalid(f"proposal {s!r} repeats a key exchange method")


def check_ike_proposal(s: str) -> None:
    """Raise :class:`ProposalInvalid` unless ``s`` is an IKE proposal the
    agents accept (see the module docstring)."""
    toks = _tokens(s)
    encr, integ, prf, ke, add = [], [], [], [], []
    kinds = [("encryption", IKE_ENCR), ("integrity", INTEG), ("prf", PRF), ("key exchange", KE)]
    for tok in toks:
        if _add_ke(tok, s):
            add.append(tok[:4] + _KE_ALIAS.get(tok[4:], tok[4:]))
        elif tok in ALL_ENCR:
            encr.append(tok)
        elif tok in INTEG:
            integ.append(tok)
        elif tok in PRF:
            prf.append(tok)
        elif tok in KE:
            ke.append(tok)
        else:
            raise _unknown(tok, s, kinds)
    if len(encr) != 1:
        raise ProposalInvalid(f"IKE proposal {s!r} needs exactly one encryption algorithm, has {len(encr)} "
                              f"(known: {', '.join(sorted(IKE_ENCR))})")
    if encr[0] not in IKE_ENCR:
        raise ProposalInvalid(f"encryption {encr[0]!r} is not supported for IKE in {s!r} "
                              f"(use one of {', '.join(sorted(IKE_ENCR))})")
    if len(integ) > 1 or len(prf) > 1:
        raise ProposalInvalid(f"IKE proposal {s!r}: give at most one integrity and one prf algorithm")
    if IKE_ENCR[encr[0]]:
        if integ:
            raise ProposalInvalid(f"IKE proposal {s!r}: AEAD cipher {encr[0]!r} takes no integrity algorithm "
                                  f"(remove {integ[0]!r})")
        if not prf:
            raise ProposalInvalid(f"IKE proposal {s!r}: AEAD cipher {encr[0]!r} needs an explicit prf "
                                  "(e.g. prfsha256)")
    elif not integ:
        raise ProposalInvalid(f"IKE proposal {s!r}: {encr[0]!r} needs an integrity algorithm (e.g. sha256)")
    if not ke:
        raise ProposalInvalid(f"IKE proposal {s!r} needs a key exchange method (e.g. x25519)")
    _check_ke(ke, add, s)


def check_child_proposal(s: str) -> None:
    """Raise :class:`ProposalInvalid` unless ``s`` is a CHILD_SA proposal
    (``esp_proposals`` entry: ESP, or AH when it names no cipher) the agents
    accept."""
    toks = _tokens(s)
    if not any(t in ALL_ENCR for t in toks):
        return _check_ah(toks, s)
    encr, integ, ke, esn, add = [], [], [], [], []
    kinds = [("encryption", ESP_ENCR), ("integrity", INTEG), ("key exchange", KE), ("esn", ESN)]
    for tok in toks:
        if _add_ke(tok, s):
            add.append(tok[:4] + _KE_ALIAS.get(tok[4:], tok[4:]))
        elif tok in ALL_ENCR:
            encr.append(tok)
        elif tok in INTEG:
            integ.append(tok)
        elif tok in KE:
            ke.append(tok)
        elif tok in ESN:
            esn.append(tok)
        else:
            raise _unknown(tok, s, kinds)
    if len(encr) != 1:
        raise ProposalInvalid(f"ESP proposal {s!r} needs exactly one encryption algorithm, has {len(encr)}")
    if encr[0] not in ESP_ENCR:
        raise ProposalInvalid(f"encryption {encr[0]!r} is not supported for ESP in {s!r} "
                              f"(use one of {', '.join(sorted(ESP_ENCR))})")
    if len(integ) > 1:
        raise ProposalInvalid(f"ESP proposal {s!r}: give at most one integrity algorithm")
    if ESP_ENCR[encr[0]] and integ:
        raise ProposalInvalid(f"ESP proposal {s!r}: AEAD cipher {encr[0]!r} takes no integrity algorithm "
                              f"(remove {integ[0]!r})")
    if not ESP_ENCR[encr[0]] and not integ:
        raise ProposalInvalid(f"ESP proposal {s!r}: {encr[0]!r} needs an integrity algorithm (e.g. sha256)")
    if len(set(esn)) != len(esn) or len({_KE_ALIAS.get(k, k) for k in ke}) != len(ke):
        raise ProposalInvalid(f"ESP proposal {s!r} repeats a keyword")
    if len(set(add)) != len(add):
        raise ProposalInvalid(f"proposal {s!r} repeats {add[0]!r}")


def _check_ah(toks: list[str], s: str) -> None:
    integ, ke, esn = [], [], []
    for tok in toks:
        if tok in INTEG:
            integ.append(tok)
        elif tok in KE:
            ke.append(tok)
        elif tok in ESN:
            esn.append(tok)
        else:
            raise _unknown(tok, s, [("AH integrity", INTEG), ("key exchange", KE), ("esn", ESN),
                                    ("ESP encryption", ESP_ENCR)])
    if len(integ) != 1:
        raise ProposalInvalid(f"AH proposal {s!r} needs exactly one integrity algorithm (e.g. sha256), "
                              f"has {len(integ)}")
    if len(set(esn)) != len(esn) or len({_KE_ALIAS.get(k, k) for k in ke}) != len(ke):
        raise ProposalInvalid(f"AH proposal {s!r} repeats a keyword")
