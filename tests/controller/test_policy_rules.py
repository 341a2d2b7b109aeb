"""Policy rules (inventory `groups:` / `policies:`): first match wins per pair
of nodes, PROTECT (with settings) / BYPASS / DISCARD, errors that name the
bad entry, and the rule reaching the agent through the API."""
from __future__ import annotations

import json

import pytest

from agent.view_proto import view_from_proto
from controller.inventory import InventoryError, parse_inventory
from controller.policy import Inventory, compute_view
from controller.service import view_update

NODES = """\
nodes:
  - {name: gw-a, role: gateway, endpoints: [198.51.100.1], subnets: [10.1.0.0/16], join_token: t}
  - {name: gw-b, role: gateway, endpoints: [198.51.100.2], subnets: [10.2.0.0/16], join_token: t}
  - {name: host-a, role: host, endpoints: [198.51.100.11], join_token: t}
  - {name: host-b, role: host, endpoints: [198.51.100.12], join_token: t}
  - {name: legacy, role: host, endpoints: [198.51.100.13], join_token: t}
"""

RULES = NODES + """\
groups:
  hosts: [host-a, host-b]
policies:
  - name: quarantine
    between: [legacy, any]
    action: discard
  - name: hosts-end-to-end
    between: [group:hosts, group:hosts]
    mode: transport
    protocol: ah+esp
  - name: monitoring-clear
    between: [host-a, [gw-a, gw-b]]
    action: bypass
  - name: gateways
    between: [role:gateway, role:gateway]
    esp_proposals: [aes256gcm16]
"""


@pytest.fixture
def inv() -> Inventory:
    return parse_inventory(RULES, "inv.yaml")


def pol(inv, me, peer):
    return compute_view(inv, me).peer(peer).policy


def test_first_match_wins_and_is_symmetric(inv):
    # legacy matches "quarantine" before anything else, from both sides
    assert pol(inv, "legacy", "host-a").action == "discard"
    assert pol(inv, "host-a", "legacy").action == "discard"
    assert pol(inv, "gw-a", "legacy").rule == "quarantine"


def test_protect_rule_overrides_defaults(inv):
    p = pol(inv, "host-a", "host-b")
    assert (p.action, p.mode, p.protocol, p.rule) == ("protect", "transport", "ah+esp", "hosts-end-to-end")
    g = pol(inv, "gw-b", "gw-a")
    assert g.esp_proposals == ("aes256gcm16",) and g.mode == "tunnel" and g.rule == "gateways"


def test_list_side_and_bypass(inv):
    assert pol(inv, "gw-b", "host-a").action == "bypass"
    assert pol(inv, "host-a", "gw-a").rule == "monitoring-clear"


def test_no_match_is_protect_with_defaults(inv):
    p = pol(inv, "host-b", "gw-a")
    assert (p.action, p.rule, p.mode, p.protocol) == ("protect", "defaults", "tunnel", "esp")


def test_only_protected_pairs_are_initiated(inv):
    v = compute_view(inv, "gw-a")
    assert v.peer("legacy").initiate is False      # discard
    assert v.peer("host-a").initiate is False      # bypass
    assert v.peer("host-b").initiate is True       # protect, lower name


def test_rules_reach_the_agent_model(inv):
    v = compute_view(inv, "host-a")
    nv = view_from_proto(view_update(v, 7, None))
    by = {p.name: p.policy for p in nv.peers}
    assert by["legacy"].action == "discard" and by["legacy"].rule == "quarantine"
    assert by["host-b"].protocol == "ah+esp" and by["host-b"].mode == "transport"
    assert by["gw-a"].action == "bypass"


def test_view_json_round_trip_keeps_rules(inv):
    again = Inventory.from_view_json(inv.view_json())
    assert again.rules == inv.rules and again.groups == inv.groups
    for me in ("gw-a", "host-a", "legacy"):
        assert compute_view(again, me) == compute_view(inv, me)


def test_inventory_without_rules_keeps_its_old_snapshot_form():
    doc = json.loads(parse_inventory(NODES).view_json())
    assert set(doc) == {"nodes", "defaults"}


@pytest.mark.parametrize("extra,where,what", [
    ("policies:\n  - {name: x, between: [gw-x, any]}\n", "inv.yaml:8: policies[0].between[0]", "'gw-x' is not a node"),
    ("policies:\n  - {name: x, between: [group:nope, any]}\n", "policies[0].between[0]", "groups: none defined"),
    ("policies:\n  - {name: x, between: [role:router, any]}\n", "policies[0].between[0]", "role:host"),
    ("policies:\n  - {name: x, between: [gw-a]}\n", "policies[0].between", "expected two sides"),
    ("policies:\n  - {name: x, between: [gw-a, any], action: allow}\n", "policies[0].action", "not one of"),
    ("policies:\n  - {name: x, between: [gw-a, any], action: bypass, mode: tunnel}\n", "policies[0].mode",
     "only meaningful with action: protect"),
    ("policies:\n  - {name: x, between: [gw-a, any]}\n  - {name: x, between: [gw-b, any]}\n",
     "policies[1].name", "duplicate policy name 'x'"),
    ("policies:\n  - {name: x, between: [gw-a, any], colour: red}\n", "policies[0].colour", "unknown key"),
    ("policies:\n  - {between: [gw-a, any]}\n", "policies[0].name", "missing"),
    ("groups:\n  g1: [gw-a, nobody]\n", "groups.g1[1]", "'nobody' is not a node"),
    ("policies:\n  - {name: x, between: [gw-a, any], replay_window: 0}\n", "policies[0].replay_window",
     "allow_no_replay: true"),
    ("defaults:\n  replay_window: 0\n", "defaults.replay_window", "anti-replay"),
])
def test_bad_rules_name_the_entry(extra, where, what):
    with pytest.raises(InventoryError) as e:
        parse_inventory(NODES + extra, "inv.yaml")
    msg = str(e.value)
    assert where in msg and what in msg, msg
    assert msg.startswith("inv.yaml:")


def test_replay_window_zero_allowed_when_explicit():
    inv = parse_inventory(NODES + "defaults:\n  replay_window: 0\n  allow_no_replay: true\n")
    assert inv.defaults.replay_window == 0
