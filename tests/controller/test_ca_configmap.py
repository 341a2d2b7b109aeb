"""The controller publishes its CA certificate to a ConfigMap (``--kube-ca-configmap NS/NAME``) so
agents mount it without manual steps; against e2e/kube_apiserver.py through the official client.
Also the agent side: ``meshsec-agent --wait-for-ca`` waits for the mounted file instead of failing."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import main as agent_main
from controller import main as controller_main
from controller.k8s import Backoff, CaPublisher, api_client, parse_configmap_ref
from e2e.kube_apiserver import FakeKubeApiServer
from tests.controller.ctl_helpers import wait_for

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def api(tmp_path):
    with FakeKubeApiServer() as server:
        server.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server


def publisher(api, name="ms-meshsec-controller-ca"):
    return CaPublisher(api_client(str(api.kubeconfig)), "meshsec", name, PEM, logger=logging.getLogger("t"))


def test_publish_fills_repairs_and_only_gets_and_patches_that_object(api):
    api.add_configmap("meshsec", "ms-meshsec-controller-ca")
    pub = publisher(api)
    assert pub.publish_once() == (True, "")
    assert api.configmaps[("meshsec", "ms-meshsec-controller-ca")]["data"] == {"ca.pem": PEM}
    assert pub.publish_once() == (False, "")          # unchanged: no write
    api.configmaps[("meshsec", "ms-meshsec-controller-ca")]["data"] = {}  # e.g. re-applied by a GitOps tool
    assert pub.publish_once() == (True, "")
    paths = {(m, p) for m, p, _ in api.requests}
    assert paths == {("GET", "/api/v1/namespaces/meshsec/configmaps/ms-meshsec-controller-ca"),
                     ("PATCH", "/api/v1/namespaces/meshsec/configmaps/ms-meshsec-controller-ca")}
    assert sum(1 for m, _, _ in api.requests if m == "PATCH") == 2


def test_missing_configmap_and_api_errors_are_clear_and_retried(api):
    pub = publisher(api, "absent")
    changed, problem = pub.publish_once()
    assert not changed and "ConfigMap meshsec/absent does not exist: the chart creates it" in problem
    api.token = "other"  # 401 from now on
    api.add_configmap("meshsec", "absent")
    changed, problem = pub.publish_once()
    assert not changed and "cannot read ConfigMap meshsec/absent" in problem
    api.token = "test-bearer-token"
    pub.backoff = Backoff(0.01, 0.05)
    pub.interval = 0.05
    pub.start()
    try:
        assert pub.published.wait(10)
    finally:
        pub.stop()
    assert api.configmaps[("meshsec", "absent")]["data"] == {"ca.pem": PEM}


@pytest.mark.parametrize("ref", ["meshsec", "/x", "meshsec/", "Meshsec/x", "a/b/c"])
def test_bad_configmap_ref(ref):
    with pytest.raises(ValueError, match="expected NAMESPACE/NAME"):
        parse_configmap_ref(ref)


def test_controller_publishes_its_ca_under_the_charts_flags(tmp_path, api):
    """meshsec-controller as the chart runs it (Node source, join token file, --kube-ca-configmap)."""
    api.add_configmap("meshsec", "ms-meshsec-controller-ca")
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes: []\n")
    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123456789\n")
    state = tmp_path / "state"
    exe = Path(sys.executable).parent / "meshsec-controller"
    proc = subprocess.Popen([str(exe), "--inventory", str(inv), "--state-dir", str(state), "--listen", "127.0.0.1:0",
                             "--kubeconfig", str(api.kubeconfig), "--kube-join-token-file", str(tok),
                             "--kube-ca-configmap", "meshsec/ms-meshsec-controller-ca"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        got = wait_for(lambda: api.configmaps[("meshsec", "ms-meshsec-controller-ca")]["data"].get("ca.pem"), 30,
                       what="ca.pem in the ConfigMap")
        assert got == (state / "ca.pem").read_text() and "BEGIN CERTIFICATE" in got
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out


def test_ca_configmap_needs_a_kube_source(tmp_path, capsys, api):
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes: []\n")
    base = ["--inventory", str(inv), "--state-dir", str(tmp_path / "st"), "--listen", "127.0.0.1:0"]
    assert controller_main.main(base + ["--kube-ca-configmap", "meshsec/ca"]) == 2
    assert "need --kubernetes or --kubeconfig" in capsys.readouterr().err
    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123456789\n")
    assert controller_main.main(base + ["--kubeconfig", str(api.kubeconfig), "--kube-join-token-file", str(tok),
                                        "--kube-ca-configmap", "nope"]) == 2
    assert "expected NAMESPACE/NAME" in capsys.readouterr().err


def test_agent_waits_for_the_mounted_ca(tmp_path, caplog):
    path = tmp_path / "ca" / "ca.pem"
    stop = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(agent_main.wait_for_file(str(path), stop, interval=0.01)))
    with caplog.at_level(logging.INFO, logger="meshsec.agent"):
        t.start()
        wait_for(lambda: "waiting for the controller CA" in caplog.text, what="the wait to be logged")
        path.parent.mkdir()
        path.write_text("")            # an empty file is not the CA yet
        path.write_text(PEM)
        t.join(10)
    assert result == [True] and "is there now" in caplog.text
    stop.set()
    assert agent_main.wait_for_file(str(tmp_path / "never"), stop) is False
