"""CHILD_SA volume lifetimes (RFC 4301 §4.4.2.1) in the inventory: `child_lifetime_bytes` /
`child_lifetime_packets` in `defaults:` and policy rules, units (k/M/G/T decimal, Ki/Mi/Gi/Ti
binary), clear errors, and the values reaching the agent's PeerPolicy through the protobuf API
and the controller's JSON snapshot."""
from __future__ import annotations

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
"""

INV = """\
defaults:
  child_lifetime_bytes: 10G
  child_lifetime_packets: 1Mi
""" + NODES + """\
policies:
  - name: gateways
    between: [gw-a, gw-b]
    child_lifetime_bytes: 512KiB
    child_lifetime_packets: 0
"""


def test_defaults_and_rules_reach_the_policy():
    inv = parse_inventory(INV, "inv.yaml")
    assert (inv.defaults.child_lifetime_bytes, inv.defaults.child_lifetime_packets) == (10 ** 10, 1 << 20)
    g = compute_view(inv, "gw-a").peer("gw-b").policy
    assert (g.child_lifetime_bytes, g.child_lifetime_packets, g.rule) == (512 * 1024, 0, "gateways")
    h = compute_view(inv, "host-a").peer("gw-a").policy
    assert (h.child_lifetime_bytes, h.child_lifetime_packets, h.rule) == (10 ** 10, 1 << 20, "defaults")


def test_values_reach_the_agent_through_the_api():
    inv = parse_inventory(INV, "inv.yaml")
    nv = view_from_proto(view_update(compute_view(inv, "host-a"), 3, None))
    pol = nv.peer("gw-a").policy
    assert (pol.child_lifetime_bytes, pol.child_lifetime_packets) == (10 ** 10, 1 << 20)
    nv = view_from_proto(view_update(compute_view(inv, "gw-b"), 3, None))
    assert nv.peer("gw-a").policy.child_lifetime_bytes == 512 * 1024


def test_unset_is_no_limit_and_old_snapshots_stay_identical():
    inv = parse_inventory(NODES, "inv.yaml")
    p = compute_view(inv, "gw-a").peer("gw-b").policy
    assert (p.child_lifetime_bytes, p.child_lifetime_packets) == (0, 0)
    assert "child_lifetime" not in inv.view_json().replace("child_lifetime_s", "")
    nv = view_from_proto(view_update(compute_view(inv, "gw-a"), 1, None))
    assert nv.peer("gw-b").policy.child_lifetime_bytes == 0


def test_snapshot_round_trip_keeps_the_limits():
    inv = parse_inventory(INV, "inv.yaml")
    back = Inventory.from_view_json(inv.view_json())
    assert back.defaults == inv.defaults and back.rules == inv.rules
    assert compute_view(back, "gw-a") == compute_view(inv, "gw-a")


@pytest.mark.parametrize("yaml_value, words", [
    ("lots", ["inv.yaml:2:", "defaults.child_lifetime_bytes", "'lots' is not a count", "64k"]),
    ("-3", ["defaults.child_lifetime_bytes", "negative"]),
    ("1000", ["defaults.child_lifetime_bytes", "too small", "at least 65536"]),
    ("[1, 2]", ["defaults.child_lifetime_bytes"]),
])
def test_bad_bytes_value_names_the_line_and_the_fix(yaml_value, words):
    with pytest.raises(InventoryError) as ei:
        parse_inventory(f"defaults:\n  child_lifetime_bytes: {yaml_value}\n" + NODES, "inv.yaml")
    for w in words:
        assert w in str(ei.value)


def test_bad_packets_value_in_a_rule():
    text = NODES + """\
policies:
  - name: r
    between: [gw-a, gw-b]
    child_lifetime_packets: 10
"""
    with pytest.raises(InventoryError) as ei:
        parse_inventory(text, "inv.yaml")
    assert "policies[0].child_lifetime_packets" in str(ei.value) and "at least 100" in str(ei.value)


def test_only_meaningful_with_protect():
    text = NODES + """\
policies:
  - name: r
    between: [gw-a, gw-b]
    action: bypass
    child_lifetime_bytes: 1G
"""
    with pytest.raises(InventoryError, match="only meaningful with action: protect"):
        parse_inventory(text, "inv.yaml")


# ---- the standalone agent config (agent/config.py) uses the same keys and units --------

from agent.config import ConfigError, parse_config  # noqa: E402

CFG = """\
name: gw-a
local_address: 198.51.100.1
subnets: [10.1.0.0/24]
auth: {psk: "s3cret-test-key-0123"}
peers:
  - name: gw-b
    endpoints: [198.51.100.2]
    subnets: [10.2.0.0/24]
"""


@pytest.mark.parametrize("text", ["10G", "500M", "64k", "1Gi", "512KiB", "1.5G", "2 TB", "0", "70000", "0.5Ki",
                                  "-1", "1.5", "ten", "Ki", ".5k", "100000000000T", "true", "'64k'"])
def test_agent_config_and_inventory_take_the_same_sizes(text):
    # the same value as a standalone agent's peer setting and as an inventory default
    try:
        view, _c, _d = parse_config(CFG + f"    child_lifetime_bytes: {text}\n", "x.yaml")
        agent = view.peers[0].policy.child_lifetime_bytes
    except ConfigError:
        agent = "refused"
    try:
        ctl = parse_inventory(f"defaults:\n  child_lifetime_bytes: {text}\n" + NODES, "inv.yaml").defaults \
            .child_lifetime_bytes
    except InventoryError:
        ctl = "refused"
    assert agent == ctl


def test_config_keys_reach_the_peer_policy():
    view, _c, _d = parse_config(CFG + "    child_lifetime_bytes: 4Gi\n    child_lifetime_packets: 2M\n", "x.yaml")
    pol = view.peers[0].policy
    assert (pol.child_lifetime_bytes, pol.child_lifetime_packets) == (4 << 30, 2_000_000)
    view, _c, _d = parse_config(CFG, "x.yaml")
    assert (view.peers[0].policy.child_lifetime_bytes, view.peers[0].policy.child_lifetime_packets) == (0, 0)


@pytest.mark.parametrize("line, words", [
    ("    child_lifetime_bytes: lots\n", ["cfg.yaml:9", "peers[0].child_lifetime_bytes", "'lots' is not a count"]),
    ("    child_lifetime_bytes: 100\n", ["peers[0].child_lifetime_bytes", "too small", "65536"]),
    ("    child_lifetime_packets: -4\n", ["peers[0].child_lifetime_packets", "negative"]),
    ("    child_lifetime_packets: 10\n", ["peers[0].child_lifetime_packets", "at least 100"]),
])
def test_config_errors_name_line_field_and_fix(line, words):
    with pytest.raises(ConfigError) as ei:
        parse_config(CFG + line, "cfg.yaml")
    for w in words:
        assert w in str(ei.value)
