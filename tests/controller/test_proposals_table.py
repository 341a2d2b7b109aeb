"""The controller's proposal table and grammar (controller.proposals) agree
with what the agent's parser (agent.ike.proposals) accepts, so a proposal
the controller lets through never crashes an agent, and none the agent
takes is refused. Tests may import both sides; the packages may not."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.esp.replay import ReplayWindow, check_replay_window
from agent.ike import proposals as agent_props
from controller import proposals as ctl
from controller.inventory import MAX_REPLAY_WINDOW


def test_keyword_tables_match_the_agent() -> None:
    a = agent_props
    assert set(ctl.IKE_ENCR) == {k for k, (e, _) in a._ENCR.items() if e in a._IKE_ENCR_SUPPORTED}
    assert set(ctl.ESP_ENCR) == {k for k, (e, _) in a._ENCR.items() if e in a._ESP_ENCR_SUPPORTED}
    assert ctl.ALL_ENCR == set(a._ENCR)
    for table in (ctl.IKE_ENCR, ctl.ESP_ENCR):
        assert {k for k, aead in table.items() if aead} == {k for k in table if a.is_aead(a._ENCR[k][0])}
    assert ctl.INTEG == set(a._INTEG)
    assert ctl.PRF == set(a._PRF)
    assert ctl.KE == set(a._KE)
    assert ctl.ESN == set(a._ESN)
    assert ctl.MAX_ADD_KE == a.MAX_ADD_KE
    # keywords naming the same method: the controller maps each alias onto one of them
    for alias, canonical in ctl._KE_ALIAS.items():
        assert a._KE[alias] == a._KE[canonical]
    assert len({a._KE[k] for k in ctl.KE}) == len(ctl.KE) - len(ctl._KE_ALIAS)


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
