"""Inventory validation: every error names file, line and field."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from controller.inventory import InventoryError, load_inventory, parse_inventory

GOOD = """\
nodes:
  - name: a
    role: host
    endpoints: [127.0.0.1]
    join_token: tok-a
  - name: b
    role: gateway
    endpoints: [198.51.100.2]
    subnets: [10.0.0.0/24]
    join_token: tok-b
"""


def err(text: str) -> str:
    with pytest.raises(InventoryError) as e:
        parse_inventory(text, "inventory.yaml")
    return str(e.value)


def test_good_inventory_parses() -> None:
    inv = parse_inventory(GOOD, "inventory.yaml")
    assert [n.name for n in inv.nodes] == ["a", "b"]
    assert inv.node("b").subnets == ("10.0.0.0/24",)
    assert inv.node("a").join_token_sha256 == hashlib.sha256(b"tok-a").digest()
    assert "tok-a" not in repr(inv)


def test_bad_subnet_names_file_line_field() -> None:
    assert err(GOOD.replace("10.0.0.0/24", "10.0.0.0/33")) == \
        "inventory.yaml:9: nodes[1].subnets[0]: '10.0.0.0/33' is not an IPv4/IPv6 network"


def test_subnet_with_host_bits() -> None:
    assert err(GOOD.replace("10.0.0.0/24", "10.0.0.1/24")).startswith(
        "inventory.yaml:9: nodes[1].subnets[0]: '10.0.0.1/24' has host bits set")


def test_bad_endpoint() -> None:
    assert err(GOOD.replace("198.51.100.2", "198.51.100.300")) == \
        "inventory.yaml:8: nodes[1].endpoints[0]: '198.51.100.300' is not an IPv4/IPv6 address"


def test_unknown_key_in_node() -> None:
    m = err(GOOD.replace("    role: gateway\n", "    role: gateway\n    colour: blue\n"))
    assert m.startswith("inventory.yaml:8: nodes[1].colour: unknown key 'colour'")


def test_unknown_top_level_key() -> None:
    assert err("peers: []\n" + GOOD).startswith("inventory.yaml:1: peers: unknown key 'peers'")


def test_unknown_key_in_defaults() -> None:
    assert err("defaults:\n  cipher: aes\n" + GOOD).startswith("inventory.yaml:2: defaults.cipher: unknown key")


def test_duplicate_node_names() -> None:
    m = err(GOOD.replace("name: b", "name: a"))
    assert m == "inventory.yaml:6: nodes[1].name: duplicate node name 'a' (also nodes[0] on line 2)"


def test_duplicate_yaml_key() -> None:
    m = err(GOOD.replace("    role: gateway\n", "    role: gateway\n    role: host\n"))
    assert m.startswith("inventory.yaml:8: nodes[1].role: duplicate key 'role'")


def test_overlapping_subnets_between_nodes() -> None:
    text = GOOD.replace("    role: host\n", "    role: host\n    subnets: [10.0.0.128/25]\n")
    m = err(text)
    assert m == ("inventory.yaml:10: nodes[1].subnets[0]: '10.0.0.0/24' overlaps '10.0.0.128/25' "
                 "of node 'a' (nodes[0].subnets[0])")


def test_bad_role() -> None:
    assert err(GOOD.replace("role: gateway", "role: router")) == \
        "inventory.yaml:7: nodes[1].role: 'router' is not one of host, gateway"


def test_missing_token() -> None:
    assert err(GOOD.replace("    join_token: tok-b\n", "")) == \
        "inventory.yaml:6: nodes[1].join_token: node 'b' has no join_token or join_token_sha256"


def test_both_tokens() -> None:
    m = err(GOOD.replace("join_token: tok-b", "join_token: tok-b\n    join_token_sha256: " + "0" * 64))
    assert m.startswith("inventory.yaml:11: nodes[1].join_token_sha256: give join_token or")


def test_bad_token_hash() -> None:
    assert err(GOOD.replace("join_token: tok-b", "join_token_sha256: abc")) == \
        "inventory.yaml:10: nodes[1].join_token_sha256: expected 64 hex digits (a SHA-256)"


def test_token_hash_accepted() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    inv = parse_inventory(GOOD.replace("join_token: tok-b", f"join_token_sha256: {digest}"))
    assert inv.node("b").join_token_sha256 == bytes.fromhex(digest)


def test_missing_name_and_role() -> None:
    assert err("nodes:\n  - role: host\n    join_token: t\n") == "inventory.yaml:2: nodes[0].name: missing"


def test_bad_node_name() -> None:
    assert err(GOOD.replace("name: b", "name: B_node")).startswith(
        "inventory.yaml:6: nodes[1].name: 'B_node' is not a lower-case DNS name")


def test_reserved_controller_name() -> None:
    assert err(GOOD.replace("name: b", "name: meshsec-controller")) == \
        "inventory.yaml:6: nodes[1].name: 'meshsec-controller' is reserved for the controller"


def test_missing_nodes_and_empty_file() -> None:
    assert err("") == "inventory.yaml:1: nodes: missing (the inventory is empty)"
    assert err("defaults: {}\n") == "inventory.yaml:1: nodes: missing"


def test_yaml_syntax_error_has_line() -> None:
    assert err("nodes:\n  - name: [a\n").startswith("inventory.yaml:3: YAML syntax error")


def test_wrong_types() -> None:
    assert err("nodes: 3\n") == "inventory.yaml:1: nodes: expected a list"
    assert err(GOOD.replace("endpoints: [198.51.100.2]", "endpoints: {a: 1}")) == \
        "inventory.yaml:8: nodes[1].endpoints: expected a list"


def test_defaults_validation() -> None:
    assert err("defaults:\n  mode: bridge\n" + GOOD) == \
        "inventory.yaml:2: defaults.mode: 'bridge' is not one of tunnel, transport, auto"
    assert err("defaults:\n  ike_lifetime: forever\n" + GOOD).startswith(
        "inventory.yaml:2: defaults.ike_lifetime: 'forever' is not a duration")
    assert err("defaults:\n  esp_proposals: []\n" + GOOD) == \
        "inventory.yaml:2: defaults.esp_proposals: needs at least one proposal"
    assert err("defaults:\n  ike_proposals: ['aes 128']\n" + GOOD).startswith(
        "inventory.yaml:2: defaults.ike_proposals[0]: 'aes 128' is not a proposal")
    assert err("defaults:\n  replay_window: -1\n" + GOOD).startswith(
        "inventory.yaml:2: defaults.replay_window: -1 is not a window size")


def test_defaults_parsed() -> None:
    inv = parse_inventory("defaults:\n  mode: auto\n  ike_lifetime: 2h\n  dpd_interval: 0\n"
                          "  esp_proposals: [aes256gcm16]\n" + GOOD)
    d = inv.defaults
    assert (d.mode, d.ike_lifetime_s, d.dpd_interval_s, d.esp_proposals) == ("auto", 7200.0, 0.0, ("aes256gcm16",))


def test_load_inventory_uses_path_and_reports_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "inv.yaml"
    p.write_text(GOOD.replace("role: gateway", "role: x"))
    with pytest.raises(InventoryError, match=rf"^{p}:7: nodes\[1\]\.role: "):
        load_inventory(p)
    with pytest.raises(InventoryError, match=r"cannot read inventory"):
        load_inventory(tmp_path / "absent.yaml")


