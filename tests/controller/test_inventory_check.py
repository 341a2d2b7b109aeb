"""``meshsec-controller --check FILE``: every error of an inventory, each as FILE:LINE: FIELD: problem;
and an inventory edited the way the kubelet updates a ConfigMap volume is reloaded in place."""
from __future__ import annotations

import os
from pathlib import Path

from controller.inventory import parse_inventory
from controller.inventory_check import check_inventory
from controller.main import main as controller_main
from tests.controller.ctl_helpers import inventory_text, wait_for

BAD = """\
bogus: 1
defaults:
  mode: sideways
nodes:
  - name: gw-a
    role: gateway
    endpoints: [198.51.100.1]
    subnets: [10.1.0.0/33]
    join_token: aaaaaaaaaaaaaaaaaaaa
  - name: gw-b
    role: router
    endpoints: [198.51.100.2]
    join_token: bbbbbbbbbbbbbbbbbbbb
  - name: gw-c
    role: gateway
    endpoints: [198.51.100.3]
    subnets: [10.3.0.0/16]
    join_token: cccccccccccccccccccc
  - name: gw-d
    role: gateway
    endpoints: [198.51.100.4]
    subnets: [10.3.1.0/24]
    join_token: dddddddddddddddddddd
  - name: gw-c
    role: host
    join_token: eeeeeeeeeeeeeeeeeeee
groups:
  site: [gw-a, nobody]
policies:
  - name: p1
    between: [gw-b, group:site]
    action: maybe
"""


def test_check_lists_every_error_with_file_and_line():
    errors = check_inventory(BAD, "inv.yaml")
    text = "\n".join(errors)
    expected = [
        "inv.yaml:1: bogus: unknown key",
        "inv.yaml:3: defaults.mode:",
        "inv.yaml:8: nodes[0].subnets[0]: '10.1.0.0/33'",
        "inv.yaml:11: nodes[1].role:",
        "inv.yaml:22: nodes[3].subnets[0]: '10.3.1.0/24' overlaps '10.3.0.0/16'",
        "inv.yaml:24: nodes[4].name: duplicate node name 'gw-c'",
        "inv.yaml:28: groups.site[1]: 'nobody' is not a node",
        "inv.yaml:32: policies[0].action:",
    ]
    for e in expected:
        assert any(x.startswith(e) for x in errors), f"missing {e!r} in:\n{text}"
    assert len(errors) == len(expected), text
    # the controller itself stops at the first one
    try:
        parse_inventory(BAD, "inv.yaml")
    except ValueError as e:
        assert str(e) in errors
    else:
        raise AssertionError("parse_inventory accepted a bad inventory")


def test_check_a_good_inventory_and_the_cli(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(inventory_text())
    assert check_inventory(good.read_text(), "good.yaml") == []
    assert controller_main(["--check", str(good)]) == 0
    assert f"{good}: OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert controller_main(["--check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{bad}:") >= 8 and "8 errors" in err
    assert controller_main(["--check", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read inventory" in capsys.readouterr().err


def test_check_counts_the_controller_address_and_yaml_errors(tmp_path):
    inv = inventory_text().replace("10.1.0.0/16", "10.9.0.0/16")
    errs = check_inventory(inv, "i.yaml", ["10.9.0.7"])
    assert len(errs) == 1 and "contains the controller's address 10.9.0.7" in errs[0]
    errs = check_inventory("nodes: [\n", "i.yaml")
    assert len(errs) == 1 and errs[0].startswith("i.yaml:") and "YAML" in errs[0]
    assert check_inventory("defaults: {}\n", "i.yaml") == ["i.yaml:1: nodes: missing (give the list of nodes, "
                                                           "or nodes: [])"]


def test_inventory_without_check_or_inventory_is_a_usage_error(capsys):
    import pytest
    with pytest.raises(SystemExit) as ei:
        controller_main([])
    assert ei.value.code == 2 and "--inventory FILE" in capsys.readouterr().err


def _configmap_dir(root: Path, text: str, stamp: str) -> None:
    """Write ``text`` the way the kubelet updates a ConfigMap volume: a new timestamped directory,
    then an atomic swap of the ``..data`` symlink (inventory.yaml -> ..data/inventory.yaml)."""
    d = root / f"..{stamp}"
    d.mkdir()
    (d / "inventory.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "..data")
    link = root / "inventory.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/inventory.yaml")


def test_configmap_volume_update_is_reloaded_in_place_and_a_bad_edit_kept_out(tmp_path):
    """The chart no longer restarts the controller on an inventory edit: the ConfigMap volume's
    symlink swap is seen by the file poll; a bad edit is logged and the previous inventory kept."""
    import datetime as dt
    import logging

    from controller.service import ControllerServer

    cm = tmp_path / "cm"
    cm.mkdir()
    _configmap_dir(cm, inventory_text(), "2026_01_01_00_00_00.1")
    server = ControllerServer(cm / "inventory.yaml", tmp_path / "state", listen="127.0.0.1:0",
                              server_names=["127.0.0.1"], poll_interval=0.05, cert_lifetime=dt.timedelta(hours=1),
                              logger=logging.getLogger("test.controller"))
    server.start()
    try:
        v1 = server.state.snapshot()[1]
        _configmap_dir(cm, inventory_text().replace("127.0.0.3", "127.0.0.33"), "2026_01_01_00_00_00.2")
        wait_for(lambda: server.state.snapshot()[1] > v1, what="reload after the ..data swap")
        assert "127.0.0.33" in {e for n in server.state.snapshot()[0].nodes for e in n.endpoints}
        v2 = server.state.snapshot()[1]
        _configmap_dir(cm, "nodes: [\n", "2026_01_01_00_00_00.3")
        wait_for(lambda: server._stat == server._file_stat(), what="the bad edit to be read")
        assert server.state.snapshot()[1] == v2 and len(server.state.snapshot()[0].nodes) == 3
    finally:
        server.stop(grace=0)
