"""Standalone config: dpd_interval and the IKE retransmission schedule per peer (issue 9)."""
from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from agent.ike.retransmit import RetransmitSchedule, schedule_of
from agent.model import PeerPolicy

BASE = """\
name: gw-a
local_address: 198.51.100.1
subnets: [10.1.0.0/24]
auth: {psk: "s3cret-test-key-0123"}
peers:
  - name: gw-b
    endpoints: [198.51.100.2]
    subnets: [10.2.0.0/24]
"""


def test_defaults_when_absent():
    view, _, _ = parse_config(BASE, "c.yaml")
    pol = view.peers[0].policy
    assert pol.dpd_interval_s == PeerPolicy().dpd_interval_s == 30.0
    assert schedule_of(pol) == RetransmitSchedule()


def test_keys_reach_the_peer_policy():
    text = BASE + ("    dpd_interval: 5s\n    retransmit_timeout: 2\n    retransmit_base: 1.5\n"
                   "    retransmit_tries: 3\n    init_retransmit_timeout: 0\n")
    view, _, _ = parse_config(text, "c.yaml")
    pol = view.peers[0].policy
    assert pol.dpd_interval_s == 5.0
    assert schedule_of(pol) == RetransmitSchedule(2.0, 1.5, 3, 0.0)


def test_dpd_interval_zero_turns_liveness_checks_off():
    view, _, _ = parse_config(BASE + "    dpd_interval: 0\n", "c.yaml")
    assert view.peers[0].policy.dpd_interval_s == 0


@pytest.mark.parametrize("line, expect", [
    ("    dpd_interval: soon\n", "c.yaml:9: peers[0].dpd_interval: 'soon' is not a duration"),
    ("    retransmit_timeout: 0\n", "c.yaml:9: peers[0].retransmit_timeout: retransmit timeout 0.0"),
    ("    retransmit_base: 0.5\n", "c.yaml:9: peers[0].retransmit_base: retransmit base 0.5"),
    ("    retransmit_base: fast\n", "c.yaml:9: peers[0].retransmit_base: 'fast' is not a number"),
    ("    retransmit_tries: 99\n", "c.yaml:9: peers[0].retransmit_tries: retransmit tries 99"),
    ("    retransmit_tries: 2.5\n", "c.yaml:9: peers[0].retransmit_tries: expected a whole number"),
    ("    init_retransmit_timeout: -1\n", "c.yaml:9: peers[0].init_retransmit_timeout:"),
])
def test_bad_values_name_file_line_and_field(line, expect):
    with pytest.raises(ConfigError) as ei:
        parse_config(BASE + line, "c.yaml")
    assert str(ei.value).startswith(expect)
