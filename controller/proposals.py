"""Proposal strings the agents accept, checked in the controller (pure).

The controller must not import ``agent``; the keywords come from the table both
sides use (meshsec.proposals), the grammar below is the one ``agent.ike.proposals``
parses, so a bad inventory is refused with a clear message instead of crashing
every agent that receives it. ``tests/controller/test_proposals_table.py`` checks
that both sides read the one table and that the verdicts agree with the agent's parser.

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

from meshsec import proposals as _table

# encryption keyword -> AEAD?, for the ciphers the agents run for IKE and for ESP
IKE_ENCR: dict[str, bool] = {k: n in _table.AEAD_ENCR for k, (n, _bits) in _table.ENCR.items()
                             if n in _table.IKE_ENCR_SUPPORTED}
ESP_ENCR: dict[str, bool] = {k: n in _table.AEAD_ENCR for k, (n, _bits) in _table.ENCR.items()
                             if n in _table.ESP_ENCR_SUPPORTED}
# every encryption keyword, also those the agents know but cannot run (refused by name)
ALL_ENCR = frozenset(_table.ENCR)
INTEG = frozenset(_table.INTEG)
PRF = frozenset(_table.PRF)
KE = frozenset(_table.KE)
ESN = frozenset(_table.ESN)
MAX_ADD_KE = _table.MAX_ADD_KE


def _method(ke: str) -> str:
    """The key exchange method a keyword names (x25519 and curve25519 are one method)."""
    return _table.KE.get(ke, ke)


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
    if len({_method(k) for k in ke}) != len(ke) or len(set(add)) != len(add):
        raise ProposalInvalid(f"proposal {s!r} repeats a key exchange method")


def check_ike_proposal(s: str) -> None:
    """Raise :class:`ProposalInvalid` unless ``s`` is an IKE proposal the
    agents accept (see the module docstring)."""
    toks = _tokens(s)
    encr, integ, prf, ke, add = [], [], [], [], []
    kinds = [("encryption", IKE_ENCR), ("integrity", INTEG), ("prf", PRF), ("key exchange", KE)]
    for tok in toks:
        if _add_ke(tok, s):
            add.append(tok[:4] + _method(tok[4:]))
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
            add.append(tok[:4] + _method(tok[4:]))
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
    if len(set(esn)) != len(esn) or len({_method(k) for k in ke}) != len(ke):
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
    if len(set(esn)) != len(esn) or len({_method(k) for k in ke}) != len(ke):
        raise ProposalInvalid(f"AH proposal {s!r} repeats a keyword")
