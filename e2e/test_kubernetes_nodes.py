"""Kubernetes Nodes become mesh peers: pod-to-pod traffic between nodes is ESP.

    ns ctl   meshsec-controller 198.51.100.254:7443 --kubeconfig (--kube-join-token-file)
             + the list/watch server on 127.0.0.1 inside ns ctl (e2e/kube_apiserver.py,
               a stand-in for kube-apiserver, which cannot run here; served by this
               test process, the socket made inside ns ctl)
                 |
    ======= br0 (ns sw, underlay 198.51.100.0/24, tcpdump here) =======
        |                        |                         |
    node-1 .1                node-2 .2                 node-3 .3       meshsec-agent (hostNetwork), TUN meshsec0
    lan0 10.244.1.1/24       lan0 10.244.2.1/24        lan0 10.244.3.1/24   (the bridge CNI's cni0)
      |        |               |        |                |        |
    pod .2   pod .3          pod .2   pod .3           pod .2   pod .3

The controller learns the three nodes only from the served NodeList/watch
(InternalIP -> endpoint, spec.podCIDRs -> subnets); its inventory file is
empty. As in the chart, it publishes its CA to a ConfigMap on that server; the
agents start first and wait for the file (--wait-for-ca), which the test writes
from the ConfigMap as the kubelet would. Every pod reaches every pod on the other nodes; the underlay capture
has no plaintext pod traffic. Deleting Node node-3 tears its tunnels and
routes down on the others; adding it back brings it in with nothing restarted.
"""
from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
import sys

import pytest

from e2e.kube_apiserver import FakeKubeApiServer
from e2e.mesh import Mesh
from e2e.topology import ping, sh, wait_until
from e2e.wire import tshark

pytestmark = pytest.mark.e2e

PODCIDRS = {"node-1": "10.244.1.0/24", "node-2": "10.244.2.0/24", "node-3": "10.244.3.0/24"}


class KubeMesh(Mesh):
    """Mesh whose nodes come from the list/watch server, two pods per node."""

    def build(self) -> None:
        self.ctl = self.topo.add_host("ctl", "198.51.100.254")
        for i, (name, cidr) in enumerate(self.spec.items(), start=1):
            self.topo.add_gateway(name, f"198.51.100.{i}", cidr, workloads=2)
        if self.keylog_dir:
            self.keylog_dir.mkdir(parents=True, exist_ok=True)

    def write_inventory(self):
        path = self.workdir / "inventory.yaml"
        path.write_text("nodes: []  # every node comes from Kubernetes\n")
        return path


def human_status(mesh, name):
    res = subprocess.run([sys.executable, "-m", "meshsec.cli", "status", "--socket", str(mesh.socket(name))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def peers_of(mesh, name):
    st = mesh.status(name) or {}
    return ({c.get("peer") for c in st.get("child_sas", [])} | {s.get("peer") for s in st.get("ike_sas", [])})


def routes_to(mesh, node, cidr):
    """Routes for ``cidr`` in any table of ``node`` (the agent keeps its own table, beside the CNI's)."""
    out = sh("ip", "route", "show", "table", "all", ns=mesh.node(node).ns).stdout
    return [line for line in out.splitlines() if line.split()[:1] == [cidr]]


def add_node(api, mesh, name):
    api.add_node(name, [mesh.node(name).underlay_ip], [PODCIDRS[name]])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark and tcpdump are needed (scripts/setup.sh installs them)")
    work = tmp_path_factory.mktemp("k8s")
    token = secrets.token_urlsafe(24)
    with KubeMesh(PODCIDRS, workdir=work, keylog=False) as mesh:
        mesh.build()
        mesh.tokens = {name: token for name in PODCIDRS}  # one Secret-provided token for all cluster nodes
        api = FakeKubeApiServer("127.0.0.1", 0, netns=mesh.ctl.ns, bookmark_interval=5.0).start()
        try:
            for name in PODCIDRS:
                add_node(api, mesh, name)
            (work / "cluster.token").write_text(token + "\n")
            os.chmod(work / "cluster.token", 0o600)
            # as the chart runs them: the controller publishes its CA to a ConfigMap, the agents
            # start before the CA is there and wait for the mounted file (--wait-for-ca)
            api.add_configmap("meshsec", "ms-meshsec-controller-ca")
            mesh.controller_args = ["--kubeconfig", str(api.write_kubeconfig(work / "kubeconfig")),
                                    "--kube-join-token-file", str(work / "cluster.token"),
                                    "--kube-ca-configmap", "meshsec/ms-meshsec-controller-ca"]
            mesh.agent_args = ["--wait-for-ca"]
            mesh.pcap = work / "underlay.pcap"
            mesh.tcpdump = mesh.capture(mesh.pcap)
            mesh.start_controller()
            mounted = work / "ca-volume" / "ca.pem"  # the agents' ConfigMap volume, empty at first
            mesh.ca_pem = mounted
            for name in PODCIDRS:
                mesh.start_agent(name)
            wait_until(lambda: all("waiting for the controller CA" in mesh.log(n) for n in PODCIDRS), 30,
                       what="agents waiting for the CA")
            published = wait_until(lambda: api.configmaps[("meshsec", "ms-meshsec-controller-ca")]["data"].get(
                "ca.pem"), 30, what="the controller to publish ca.pem")
            mounted.parent.mkdir()
            mounted.write_text(published)  # what the kubelet does with the updated ConfigMap
            mesh.wait_established(timeout=90)
            assert published == (work / "controller" / "ca.pem").read_text()
            mesh.api = api
            yield mesh
        finally:
            api.stop()


def test_every_pod_reaches_every_pod_on_other_nodes(cluster):
    for name in PODCIDRS:  # the agent routes the other nodes' pod CIDRs into its TUN device
        for other in set(PODCIDRS) - {name}:
            assert any("dev meshsec0" in r for r in routes_to(cluster, name, PODCIDRS[other]))
    pods = [w for n in PODCIDRS for w in cluster.node(n).workloads]
    assert len(pods) == 6
    for src, dst in itertools.permutations(pods, 2):
        if src.node is dst.node:
            continue
        assert wait_until(lambda: ping(src.ns, dst.ip), 10, what=f"ping {src.name} -> {dst.ip}")
    st = cluster.status("node-1")
    assert all(c["packets_in"] > 0 and c["packets_out"] > 0 for c in st["child_sas"]), st["child_sas"]


def test_underlay_has_no_plaintext_pod_traffic(cluster):
    # On 2 busy cores tcpdump lags behind the kernel's buffer: stop it only once the file stops growing.
    sizes = []
    wait_until(lambda: sizes.append(cluster.pcap.stat().st_size) or sizes[-3:] == [sizes[-1]] * 3,
               20, interval=0.5, what="tcpdump to catch up")
    cluster.topo.stop(cluster.tcpdump)
    pcap = cluster.pcap
    assert tshark(pcap, "esp"), "no ESP on the underlay"
    assert tshark(pcap, "ip.addr == 10.244.0.0/16") == [], "a pod address appeared in a clear header"
    assert tshark(pcap, "icmp or (tcp and not (tcp.port == 7443 or tcp.port == 7444))") == []
    assert tshark(pcap, "udp and not (udp.port == 500 or udp.port == 4500)") == []


def test_deleting_a_node_tears_its_tunnels_and_routes_down(cluster):
    cluster.api.delete_node("node-3")
    for name in ("node-1", "node-2"):
        wait_until(lambda: "node-3" not in peers_of(cluster, name) and "node-3" not in human_status(cluster, name),
                   30, what=f"{name} to drop node-3")
        assert routes_to(cluster, name, PODCIDRS["node-2" if name == "node-1" else "node-1"])
        assert routes_to(cluster, name, PODCIDRS["node-3"]) == [], f"{name} still routes node-3's pod CIDR"
        # fail closed: the deleted Node's pod CIDR stays dropped, never handed to other routes in the clear
        guard = sh("ip", "route", "show", "table", "4302", ns=cluster.node(name).ns).stdout
        assert f"blackhole {PODCIDRS['node-3']}" in guard, guard
        assert "node-1" in peers_of(cluster, name) or "node-2" in peers_of(cluster, name)
    src, dst = cluster.node("node-1").workloads[0], cluster.node("node-3").workloads[0]
    assert not ping(src.ns, dst.ip, count=2)
    # the remaining pair still talks
    assert ping(src.ns, cluster.node("node-2").workloads[1].ip, count=2)


def test_adding_a_node_brings_it_in_without_restarts(cluster):
    procs = {name: p.pid for name, p in cluster.agents.items()}
    controller = cluster.controller.pid
    add_node(cluster.api, cluster, "node-3")
    cluster.wait_established(timeout=90)
    src, dst = cluster.node("node-1").workloads[1], cluster.node("node-3").workloads[1]
    assert wait_until(lambda: ping(src.ns, dst.ip), 20, what="ping node-1 pod -> node-3 pod after re-adding")
    assert wait_until(lambda: ping(dst.ns, cluster.node("node-2").workloads[0].ip), 20,
                      what="ping node-3 pod -> node-2 pod after re-adding")
    assert {n: p.pid for n, p in cluster.agents.items()} == procs and cluster.controller.pid == controller
    assert all(p.poll() is None for p in cluster.agents.values()) and cluster.controller.poll() is None
    assert any("dev meshsec0" in r for r in routes_to(cluster, "node-1", PODCIDRS["node-3"]))
