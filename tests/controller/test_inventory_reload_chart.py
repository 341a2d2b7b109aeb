"""An inventory edit under the chart's settings: meshsec-controller runs with the arguments the
chart renders (paths moved into a temporary directory, ``--kubernetes`` pointed at the local
list/watch stand-in e2e/kube_apiserver.py), reads the inventory from a directory laid out as the
kubelet lays out a ConfigMap volume, and the test edits it as the kubelet does (a new
timestamped directory, then an atomic swap of the ``..data`` symlink). A good edit (helm
upgrade with one more site) is served without a restart; a bad one (a hand edit of the
ConfigMap) is refused with FILE:LINE while the previous inventory stays in force."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from e2e.kube_apiserver import FakeKubeApiServer
from meshsec.cli_common import CliError, request
from tests.controller.ctl_helpers import wait_for
from tests.test_chart import VARIANTS, fetch_helm, find, render

SITE_B = ["--set", "inventory.nodes[2].name=site-b", "--set", "inventory.nodes[2].role=gateway",
          "--set", "inventory.nodes[2].endpoints[0]=203.0.113.6",
          "--set", "inventory.nodes[2].subnets[0]=10.51.0.0/24",
          "--set", "inventory.nodes[2].join_token_sha256=" + "ef" * 32]


def chart(*extra: str) -> tuple[list[str], str]:
    """(the controller container's args, the inventory ConfigMap's inventory.yaml) as rendered."""
    docs = render(fetch_helm(), *VARIANTS["product"], *extra)
    args = find(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]["args"]
    return args, find(docs, "ConfigMap", "-inventory")["data"]["inventory.yaml"]


def configmap_update(root: Path, text: str, stamp: str) -> None:
    """The kubelet's atomic ConfigMap volume update: ``..<stamp>/inventory.yaml``, ``..data`` ->
    ``..<stamp>`` swapped by rename, ``inventory.yaml`` -> ``..data/inventory.yaml``."""
    d = root / f"..{stamp}"
    d.mkdir()
    (d / "inventory.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "..data")
    link = root / "inventory.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/inventory.yaml")


def local_args(args: list[str], tmp: Path, kubeconfig: Path) -> list[str]:
    """The chart's args with the pod's paths and ports moved here: the same flags otherwise."""
    paths = {"/etc/meshsec/inventory/inventory.yaml": str(tmp / "cm" / "inventory.yaml"),
             "/var/lib/meshsec-controller": str(tmp / "st"), "/etc/meshsec/token/token": str(tmp / "token")}
    out = []
    for a in args:
        flag, _, value = a.partition("=")
        if a == "--kubernetes":  # in-cluster config; here the stand-in's kubeconfig
            out += ["--kubeconfig", str(kubeconfig)]
        elif flag in ("--listen", "--watch-listen", "--health-listen", "--metrics-listen", "--web-listen"):
            out.append(f"{flag}=127.0.0.1:0")
        else:
            out.append(f"{flag}={paths.get(value, value)}" if value else a)
    return out


def mesh_nodes(sock: Path) -> set[str] | None:
    try:
        doc = request(str(sock), {"cmd": "mesh"}, who="meshsec-controller")
    except CliError:
        return None
    return {n["name"] for n in doc["nodes"]}


@pytest.fixture
def api(tmp_path):
    with FakeKubeApiServer() as server:
        server.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server


def test_configmap_edit_reloads_in_place_and_a_bad_edit_is_refused_with_file_line(tmp_path, api):
    args, inventory = chart()
    args_b, inventory_b = chart(*SITE_B)
    assert args_b == args and "site-b" in inventory_b and "site-b" not in inventory
    assert "--kubernetes" in args and "--inventory=/etc/meshsec/inventory/inventory.yaml" in args
    api.add_configmap("meshsec", "ms-meshsec-controller-ca")
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    (tmp_path / "cm").mkdir()
    configmap_update(tmp_path / "cm", inventory, "2026_12_06_02_00_00.1")
    (tmp_path / "token").write_text(secrets.token_hex(16) + "\n")
    exe = Path(sys.executable).parent / "meshsec-controller"
    proc = subprocess.Popen([str(exe), *local_args(args, tmp_path, api.kubeconfig)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    sock = tmp_path / "st" / "controller.sock"
    try:
        first = {"node-1", "site-a", "legacy-1"}
        wait_for(lambda: mesh_nodes(sock) == first, 60, what="the chart's inventory and the Node served")

        configmap_update(tmp_path / "cm", inventory_b, "2026_12_06_02_05_00.2")  # helm upgrade
        wait_for(lambda: mesh_nodes(sock) == first | {"site-b"}, 30, what="site-b after the ..data swap")
        assert proc.poll() is None  # the same process: reloaded in place

        bad = inventory_b.replace("role: host", "role: hots")  # a hand edit of the ConfigMap
        line = bad.splitlines().index("    role: hots") + 1
        configmap_update(tmp_path / "cm", bad, "2026_12_06_02_10_00.3")
        where = f"{tmp_path / 'cm' / 'inventory.yaml'}:{line}: nodes[1].role:"
        wait_for(lambda: any("inventory change rejected" in ln and where in ln for ln in lines), 30,
                 what=f"the refusal naming {where}")
        assert mesh_nodes(sock) == first | {"site-b"} and proc.poll() is None  # the previous inventory serves

        configmap_update(tmp_path / "cm", inventory, "2026_12_06_02_15_00.4")  # fixed: back to the first
        wait_for(lambda: mesh_nodes(sock) == first, 30, what="the fixed inventory")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        reader.join(timeout=5)
    assert proc.returncode == 0, "".join(lines)
    assert sum("inventory reloaded" in ln for ln in lines) == 2, "".join(lines)
