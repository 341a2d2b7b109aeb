"""Inventory checks that keep a bad inventory from reaching (and crashing)
agents: proposals token by token, replay windows the agents take, subnets
that would loop IKE/ESP or the control connection into the tunnel."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controller.inventory import InventoryError, parse_inventory
from controller.service import ControllerServer
from tests.controller.ctl_helpers import inventory_text, write_inventory

NODES = """\
nodes:
  - name: gw-a
    role: gateway
    endpoints: [198.51.100.1]
    subnets: [10.1.0.0/16]
    join_token: a
  - name: gw-b
    role: gateway
    endpoints: [203.0.113.2]
    subnets: [10.2.0.0/16]
    join_token: b
"""


def err(text: str, **kw) -> str:
    with pytest.raises(InventoryError) as e:
        parse_inventory(text, "inv.yaml", **kw)
    return str(e.value)


@pytest.mark.parametrize("key,value,why", [
    ("ike_proposals", "[aes128gcm16-prfsha256-x25519-bogus]", "unknown algorithm 'bogus'"),
    ("ike_proposals", "[aes128gcm16-x25519]", "needs an explicit prf"),
    ("ike_proposals", "[aes128-prfsha256-x25519]", "needs an integrity algorithm"),
    ("esp_proposals", "[aes128gcm16-sha256]", "takes no integrity algorithm"),
    ("esp_proposals", "[aes128ccm16]", "not supported for ESP"),
    ("esp_proposals", "[sha256-sha384]", "AH proposal 'sha256-sha384' needs exactly one integrity"),
])
def test_bad_proposals_refused_with_the_keyword(key: str, value: str, why: str) -> None:
    msg = err(f"defaults:\n  {key}: {value}\n" + NODES)
    assert msg.startswith(f"inv.yaml:2: defaults.{key}[0]: ") and why in msg


def test_bad_proposal_in_a_policy_rule() -> None:
    text = NODES + "policies:\n  - name: r\n    between: [gw-a, gw-b]\n    esp_proposals: [aes128gcm16-x99]\n"
    assert "policies[0].esp_proposals[0]: unknown algorithm 'x99'" in err(text)


def test_good_proposals_pass() -> None:
    inv = parse_inventory("defaults:\n  ike_proposals: [aes256gcm16-prfsha384-x25519-ke1_mlkem768, "
                          "aes128-sha256-modp2048]\n  esp_proposals: [aes256gcm16-esn, aes128-sha256, sha256]\n"
                          + NODES)
    assert inv.defaults.esp_proposals == ("aes256gcm16-esn", "aes128-sha256", "sha256")


@pytest.mark.parametrize("value,why", [
    ("100", "100 is not a multiple of 32 (the agents' window is whole 32-bit words): use 96 or 128"),
    ("16", "words): use 32"),
    ("2097152", "up to 1048576"),
    ("-32", "is not a window size"),
])
def test_replay_window_multiple_of_32(value: str, why: str) -> None:
    assert why in err(f"defaults:\n  replay_window: {value}\n" + NODES)


def test_replay_window_zero_needs_allow() -> None:
    assert "allow_no_replay" in err("defaults:\n  replay_window: 0\n" + NODES)
    inv = parse_inventory("defaults:\n  replay_window: 0\n  allow_no_replay: true\n" + NODES)
    assert inv.defaults.replay_window == 0


def test_dpd_zero_means_off() -> None:
    assert parse_inventory("defaults:\n  dpd_interval: 0\n" + NODES).defaults.dpd_interval_s == 0.0


def test_subnet_containing_a_node_endpoint_names_both() -> None:
    text = NODES.replace("subnets: [10.2.0.0/16]", "subnets: [10.2.0.0/16, 198.51.100.0/24]")
    msg = err(text)
    assert msg.startswith("inv.yaml:10: nodes[1].subnets[1]: '198.51.100.0/24' of node 'gw-b' contains the "
                          "endpoint 198.51.100.1 of node 'gw-a'")
    assert "loop" in msg


def test_subnet_containing_its_own_endpoint() -> None:
    text = NODES.replace("subnets: [10.1.0.0/16]", "subnets: [198.51.100.0/28]")
    assert "of node 'gw-a' contains the endpoint 198.51.100.1 of node 'gw-a'" in err(text)


def test_subnet_containing_the_controller() -> None:
    msg = err(NODES, controller_addresses=["0.0.0.0", "ctl.example", "10.2.3.4"])
    assert "nodes[1].subnets[0]: '10.2.0.0/16' of node 'gw-b' contains the controller's address 10.2.3.4" in msg
    parse_inventory(NODES, controller_addresses=["0.0.0.0", "::", "10.9.0.1"])


def test_host_behind_a_gateway_is_case_3_not_a_loop() -> None:
    host = "  - name: host-b\n    role: host\n    endpoints: [10.2.0.5]\n    join_token: h\n"
    assert parse_inventory(NODES + host).node("host-b").endpoints == ("10.2.0.5",)
    gw = host.replace("role: host", "role: gateway")
    assert "of node 'gw-b' contains the endpoint 10.2.0.5 of node 'host-b'" in err(NODES + gw)
    # a host's subnets never contain another node (only gateways have nodes behind them)
    text = NODES.replace("role: gateway\n    endpoints: [203", "role: host\n    endpoints: [203") + host
    assert "'10.2.0.0/16' of node 'gw-b' contains the endpoint 10.2.0.5 of node 'host-b'" in err(text)


def test_node_with_subnets_and_no_endpoints_is_fine() -> None:
    inv = parse_inventory(NODES + "  - name: roamer\n    role: host\n    subnets: [10.9.0.1/32]\n"
                                  "    join_token: r\n")
    assert inv.node("roamer").endpoints == ()


def test_controller_refuses_an_inventory_with_its_own_address_in_a_subnet(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.yaml"
    write_inventory(inv, inventory_text())
    server = ControllerServer(inv, tmp_path / "state", listen="127.0.0.1:0", server_names=["10.2.0.9"],
                              logger=logging.getLogger("test.controller"))
    with pytest.raises(InventoryError, match="contains the controller's address 10.2.0.9"):
        server.start()
    server.stop(grace=0)


# -- values PyYAML builds but no setting takes, and input it cannot build (issue 13) ----------

@pytest.mark.parametrize("setting,why", [
    ("ike_lifetime: .nan", "'.nan' is not a finite number"),
    ("child_lifetime: .inf", "'.inf' is not a finite number"),
    ("dpd_interval: -.Inf", "'-.Inf' is not a finite number"),
    ("ike_lifetime: !!float nan", "'nan' is not a finite number"),
    ("ike_lifetime: 1e999", "is not a duration"),
    ("ike_lifetime: !!float 1e999", "not a finite number"),
    ("ike_lifetime: !!python/object:os.system x", "could not determine a constructor"),
    ("dpd_interval: !custom 30s", "could not determine a constructor for the tag '!custom'"),
    ("ike_lifetime: !!timestamp 2020-13-45", "month must be in 1..12"),
    ("replay_window: " + "9" * 5000, "Exceeds the limit"),
    ("ike_lifetime: !!int 0x", "invalid literal"),
])
def test_non_finite_and_unconstructible_values_are_refused_with_file_line(setting: str, why: str) -> None:
    """.nan as ike_lifetime made every agent refuse every peer; tags, timestamps and long
    integers escaped as ValueError/ConstructorError (exit 1 with a traceback)."""
    key = setting.split(":")[0]
    e = err("defaults:\n  " + setting + "\n" + NODES)
    assert e.startswith(f"inv.yaml:2: defaults.{key}: ") and why in e
    assert e.count("inv.yaml:") == 1


def test_policy_setting_nan_is_refused_too() -> None:
    text = NODES + "policies:\n  - name: p\n    between: [gw-a, gw-b]\n    action: protect\n    ike_lifetime: .NaN\n"
    assert err(text) == "inv.yaml:16: policies[0].ike_lifetime: '.NaN' is not a finite number"


def test_deep_nesting_is_an_inventory_error() -> None:
    assert err("nodes: " + "[" * 100_000 + "]" * 100_000) == \
        "inv.yaml:1: YAML nested more than 32 levels deep: an inventory needs a few"


def test_controller_exits_2_for_a_nan_lifetime(tmp_path: Path) -> None:
    import subprocess
    import sys
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  ike_lifetime: .nan\n" + NODES)
    r = subprocess.run([sys.executable, "-c", "import sys; from controller.main import main; sys.exit(main())",
                        "--inventory", str(bad), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and r.stderr == f"{bad}:2: defaults.ike_lifetime: '.nan' is not a finite number\n"
