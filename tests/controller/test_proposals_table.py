"""One proposal keyword table (meshsec.proposals) for both sides: the agent's parser
(agent.ike.proposals) and the controller's inventory check (controller.proposals)
read it, neither writes a keyword of its own; and the two grammars give the same
verdicts, so a proposal the controller lets through never crashes an agent, and none
the agent takes is refused. Tests may import both sides; the packages may not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.esp.replay import ReplayWindow, check_replay_window
from agent.iana import EncrId, EsnId, IntegId, KeId, PrfId
from agent.ike import proposals as agent_props
from controller import proposals as ctl
from controller.inventory import MAX_REPLAY_WINDOW
from meshsec import proposals as table

ROOT = Path(__file__).resolve().parents[2]
KEYWORDS = set(table.ENCR) | set(table.INTEG) | set(table.PRF) | set(table.KE) | set(table.ESN)
KINDS = {"esn"}  # also the name of a keyword kind in both grammars ({"esn": esn}[kind])


@pytest.mark.parametrize("path", ["agent/ike/proposals.py", "controller/proposals.py"])
def test_no_side_writes_keywords_of_its_own(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    uses_table = any(isinstance(n, ast.ImportFrom) and n.module == "meshsec" and
                     any(a.name == "proposals" for a in n.names) for n in ast.walk(tree))
    assert uses_table, f"{path} does not import meshsec.proposals"
    # a table entry is a dict key, a set member or a subscript (``_ENCR["aes"] = ...``)
    entries = [k for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None]
    entries += [e for n in ast.walk(tree) if isinstance(n, ast.Set) for e in n.elts]
    entries += [n.slice for n in ast.walk(tree) if isinstance(n, ast.Subscript)]
    own = sorted({f"{e.lineno}: {e.value!r}" for e in entries
                  if isinstance(e, ast.Constant) and e.value in KEYWORDS - KINDS})
    assert not own, f"{path} spells proposal keywords itself (add them to meshsec/proposals.py):\n" + \
        "\n".join(own)


def test_the_agent_resolves_the_shared_table() -> None:
    a = agent_props
    assert {k: (EncrId(e).name, b) for k, (e, b) in a._ENCR.items()} == table.ENCR
    assert {k: IntegId(v).name for k, v in a._INTEG.items()} == table.INTEG
    assert {k: PrfId(v).name for k, v in a._PRF.items()} == table.PRF
    assert {k: KeId(v).name for k, v in a._KE.items()} == table.KE
    assert {k: EsnId(v).name for k, v in a._ESN.items()} == table.ESN
    assert {EncrId(e).name for e in a._IKE_ENCR_SUPPORTED} == table.IKE_ENCR_SUPPORTED
    assert {EncrId(e).name for e in a._ESP_ENCR_SUPPORTED} == table.ESP_ENCR_SUPPORTED
    assert {EncrId(e).name for e in a._AEAD} == table.AEAD_ENCR
    assert a.MAX_ADD_KE == table.MAX_ADD_KE


def test_the_controller_reads_the_shared_table() -> None:
    assert ctl.ALL_ENCR == set(table.ENCR)
    assert set(ctl.IKE_ENCR) == {k for k, (n, _) in table.ENCR.items() if n in table.IKE_ENCR_SUPPORTED}
    assert set(ctl.ESP_ENCR) == {k for k, (n, _) in table.ENCR.items() if n in table.ESP_ENCR_SUPPORTED}
    for t in (ctl.IKE_ENCR, ctl.ESP_ENCR):
        assert {k for k, aead in t.items() if aead} == {k for k in t if table.ENCR[k][0] in table.AEAD_ENCR}
    assert (ctl.INTEG, ctl.PRF, ctl.KE, ctl.ESN) == (set(table.INTEG), set(table.PRF), set(table.KE),
                                                       set(table.ESN))
    assert ctl.MAX_ADD_KE == table.MAX_ADD_KE


def test_keywords_naming_one_method_count_as_a_repeat() -> None:
    # x25519 and curve25519 are one method in the table: both sides refuse the pair
    assert table.KE["x25519"] == table.KE["curve25519"]
    with pytest.raises(ctl.ProposalInvalid, match="repeats"):
        ctl.check_ike_proposal("aes128gcm16-prfsha256-x25519-curve25519")
    with pytest.raises(agent_props.ProposalError, match="repeats"):
        agent_props.parse_ike_proposal("aes128gcm16-prfsha256-x25519-curve25519")


WORDS = sorted(ctl.ALL_ENCR | ctl.INTEG | ctl.PRF | ctl.KE | ctl.ESN) + [
    "ke1_mlkem768", "ke2_none", "ke1_x25519", "ke1_curve25519", "ke8_x25519", "ke1_bogus", "aes512", "md5", "AES128GCM16"]
proposal = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map("-".join)


def _verdict(fn, s: str) -> bool:
    try:
        fn(s)
        return True
    except ValueError:
        return False


@settings(max_examples=3000, deadline=None)
@given(proposal)
def test_ike_verdicts_match_the_agent(s: str) -> None:
    assert _verdict(ctl.check_ike_proposal, s) == _verdict(agent_props.parse_ike_proposal, s), s


@settings(max_examples=3000, deadline=None)
@given(proposal)
def test_child_verdicts_match_the_agent(s: str) -> None:
    assert _verdict(ctl.check_child_proposal, s) == _verdict(agent_props.parse_child_proposal, s), s


@pytest.mark.parametrize("s", ["aes256gcm16-prfsha384-x25519-ke1_mlkem768", "aes128-sha256-modp2048",
                               "chacha20poly1305-prfsha256-curve25519", "aes256-sha512-prfsha384-ecp384"])
def test_known_good_ike(s: str) -> None:
    ctl.check_ike_proposal(s)
    agent_props.parse_ike_proposal(s)


@pytest.mark.parametrize("s,why", [
    ("aes128gcm16-prfsha256-x25519-foo", "unknown algorithm 'foo'"),
    ("aes128gcm16-x25519", "needs an explicit prf"),
    ("aes128gcm16-sha256-prfsha256-x25519", "takes no integrity"),
    ("aes128ctr-sha256-x25519", "not supported for IKE"),
    ("aes128gcm16-prfsha256", "needs a key exchange"),
    ("aes128gcm16-prfsha256-x25519-curve25519", "repeats a key exchange"),
    ("aes128gcm16-prfsha256-x25519-ke9_mlkem768", "ke1_ .. ke7_"),
])
def test_bad_ike_named(s: str, why: str) -> None:
    with pytest.raises(ctl.ProposalInvalid, match=why):
        ctl.check_ike_proposal(s)


def test_replay_window_bounds_are_ones_the_agent_accepts() -> None:
    for w in (32, 1024, MAX_REPLAY_WINDOW):
        assert check_replay_window(w) == w and ReplayWindow(w).size == w
    assert MAX_REPLAY_WINDOW % 32 == 0
    assert check_replay_window(0, allow_no_replay=True) == 0
