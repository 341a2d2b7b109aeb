"""Issue 13 (D5, D6): only InventoryError leaves the inventory loader, with the line of the
problem, for start, reload and --check alike; lifetimes and the DPD interval have the
minimums the agent accepts (meshsec.defaults)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from controller.inventory import MAX_YAML_DEPTH, InventoryError, parse_inventory
from controller.inventory_check import check_inventory
from meshsec.defaults import MIN_DPD_INTERVAL_S, MIN_LIFETIME_S
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory

ROOT = Path(__file__).resolve().parents[2]
NODES = """\
nodes:
  - name: gw-a
    role: gateway
    endpoints: [198.51.100.1]
    join_token: a
"""


def err(text: str) -> str:
    with pytest.raises(InventoryError) as e:
        parse_inventory(text, "inv.yaml")
    return str(e.value)


BAD_VALUES = [
    ("defaults:\n  ike_lifetime: !!bool maybe\n" + NODES, "inv.yaml:2: defaults.ike_lifetime: cannot read 'maybe'"),
    ("defaults:\n  ike_lifetime: !!timestamp foo\n" + NODES, "inv.yaml:2: defaults.ike_lifetime: cannot read 'foo'"),
    (NODES.replace("join_token: a", "join_token: !!bool maybe"), "inv.yaml:5: nodes[0].join_token: cannot read"),
    (NODES.replace("join_token: a", "join_token: !!float x"), "inv.yaml:5: nodes[0].join_token: cannot read"),
]


@pytest.mark.parametrize("text,start", BAD_VALUES)
def test_unconstructible_values_name_their_line(text: str, start: str) -> None:
    """Before: KeyError/AttributeError from PyYAML's constructors escaped (--check: a traceback;
    start: line 1 and the Python exception text)."""
    assert err(text).startswith(start)
    assert check_inventory(text, "inv.yaml")[0].startswith(start)


@pytest.mark.parametrize("depth", [MAX_YAML_DEPTH + 1, 10_000, 100_000])
def test_deep_nesting_is_refused_before_composing(depth: int) -> None:
    text = NODES + "groups:\n  g: " + "[" * depth + "]" * depth + "\n"
    want = f"inv.yaml:7: YAML nested more than {MAX_YAML_DEPTH} levels deep: an inventory needs a few"
    assert err(text) == want
    assert check_inventory(text, "inv.yaml") == [want]


def test_nesting_within_the_limit_is_an_ordinary_error() -> None:
    text = NODES + "groups:\n  g: " + "[" * 20 + "]" * 20 + "\n"
    assert "nested" not in err(text)


def _check_cli(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    f = tmp_path / "inv.yaml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-c", "import sys; from controller.main import main; sys.exit(main())",
                           "--check", str(f)], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_prints_file_line_and_exits_2(tmp_path: Path) -> None:
    for text, start in BAD_VALUES[:2] + [("nodes: " + "[" * 10_000 + "]" * 10_000 + "\n", "inv.yaml:1: YAML nested")]:
        r = _check_cli(tmp_path, text)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert r.stderr.startswith(f"{tmp_path}/{start}"), r.stderr


def test_check_prints_every_error(tmp_path: Path) -> None:
    text = ("defaults:\n  ike_lifetime: !!bool maybe\n  child_lifetime: 0.001\n" + NODES
            + "  - name: gw-b\n    role: gateway\n    endpoints: [203.0.113.2]\n    join_token: !!timestamp foo\n")
    r = _check_cli(tmp_path, text)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert [ln.split(": ")[0].rsplit("/", 1)[1] for ln in lines[:-1]] == ["inv.yaml:2", "inv.yaml:3", "inv.yaml:12"]
    assert lines[-1].endswith("3 errors")


def test_reload_keeps_the_old_inventory_and_logs_file_line(controller: ServerFactory, caplog) -> None:
    server = controller.start()
    caplog.set_level(logging.ERROR)
    write_inventory(controller.inventory, inventory_text().replace("dpd_interval: 10s", "dpd_interval: !!timestamp foo"))
    wait_for(lambda: any("inventory change rejected" in r.getMessage() for r in caplog.records), what="reject")
    msg = next(r.getMessage() for r in caplog.records if "inventory change rejected" in r.getMessage())
    assert f"{controller.inventory}:2: defaults.dpd_interval: cannot read 'foo'" in msg
    assert server.state.snapshot()[0].node("alpha")


# ------------------------------------------------------------ D6: minimums

@pytest.mark.parametrize("key,value,minimum", [
    ("ike_lifetime", "1", MIN_LIFETIME_S), ("child_lifetime", "0.001", MIN_LIFETIME_S),
    ("child_lifetime", "9s", MIN_LIFETIME_S), ("dpd_interval", "0.5s", MIN_DPD_INTERVAL_S),
])
def test_lifetimes_below_the_agent_minimum_are_refused(key: str, value: str, minimum: float) -> None:
    """A 1 ms lifetime was accepted; then every SA expired before its rekey: the mesh went down."""
    e = err(f"defaults:\n  {key}: {value}\n" + NODES)
    assert e.startswith(f"inv.yaml:2: defaults.{key}: ")
    assert f"at least {minimum:g}s" in e and "0 to turn it off" in e


def test_policy_lifetime_minimum_too() -> None:
    text = NODES + ("  - name: gw-b\n    role: gateway\n    endpoints: [203.0.113.2]\n    join_token: b\n"
                    "policies:\n  - name: p\n    between: [gw-a, gw-b]\n    action: protect\n    child_lifetime: 2s\n")
    assert err(text).startswith("inv.yaml:14: policies[0].child_lifetime: ")


@pytest.mark.parametrize("key,value", [("ike_lifetime", "0"), ("ike_lifetime", "10s"), ("child_lifetime", "10"),
                                       ("dpd_interval", "0"), ("dpd_interval", "1s")])
def test_minimums_and_zero_are_accepted(key: str, value: str) -> None:
    parse_inventory(f"defaults:\n  {key}: {value}\n" + NODES, "inv.yaml")


def test_agent_and_controller_share_the_minimum() -> None:
    from agent import config
    assert config.MIN_LIFETIME_S is MIN_LIFETIME_S or config.MIN_LIFETIME_S == MIN_LIFETIME_S
    src = (ROOT / "agent" / "config.py").read_text()
    assert "MIN_LIFETIME_S = " not in src  # defined once, in meshsec.defaults


def test_check_reads_replay_window_zero_with_its_allow_key() -> None:
    """--check lists defaults key by key; replay_window: 0 still sees allow_no_replay."""
    text = "defaults:\n  replay_window: 0\n  dpd_interval: 5s\n  allow_no_replay: true\n" + NODES
    assert check_inventory(text, "inv.yaml") == []
    text = "defaults:\n  replay_window: 0\n  dpd_interval: 0.1\n" + NODES
    errors = check_inventory(text, "inv.yaml")
    assert [e.split(": ")[0] for e in errors] == ["inv.yaml:2", "inv.yaml:3"], errors


def test_start_exits_2_with_file_line_for_an_unconstructible_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(NODES.replace("join_token: a", "join_token: !!bool maybe"))
    r = subprocess.run([sys.executable, "-c", "import sys; from controller.main import main; sys.exit(main())",
                        "--inventory", str(bad), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{bad}:5: nodes[0].join_token: cannot read 'maybe'") and "Traceback" not in r.stderr
