"""Kubernetes node source (controller.k8s) and its merge with the inventory.

The API server here is e2e/kube_apiserver.py, a stand-in for kube-apiserver
(none can run on these machines): it serves the real JSON wire format of
Node list (NodeList + metadata.resourceVersion) and watch (chunked stream of
ADDED/MODIFIED/DELETED/BOOKMARK/ERROR lines, ERROR Status 410 for compacted
versions), TokenReview, and bearer-token authentication, on 127.0.0.1.
The official `kubernetes` client talks to it through a kubeconfig.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import grpc
import pytest

from agent.control import ControllerClient, EnrollmentError
from controller import main as controller_main
from controller.inventory import parse_inventory
from controller.k8s import Backoff, KubeNodeSource, TokenReviewer, api_client, node_spec_from_k8s, same_token
from controller.nodesource import merge_nodes
from controller.policy import NodeSpec
from e2e.kube_apiserver import FakeKubeApiServer
from tests.controller.ctl_helpers import ServerFactory, wait_for

TOKEN = "cluster-join-token-0123456789"
DIGEST = hashlib.sha256(TOKEN.encode()).digest()

# Shaped like `kubectl get node -o json` of a dual-stack kubeadm node.
NODE_JSON = {
    "kind": "Node", "apiVersion": "v1",
    "metadata": {"name": "worker-1", "uid": "5d0c6a3e-0000-4000-8000-000000000001", "resourceVersion": "4711",
                 "labels": {"kubernetes.io/hostname": "worker-1"}},
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
             "providerID": "kind://docker/kind/worker-1"},
    "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.11"},
                             {"type": "InternalIP", "address": "2001:db8::11"},
                             {"type": "ExternalIP", "address": "203.0.113.11"},
                             {"type": "Hostname", "address": "worker-1"}]},
}


# -- Node -> NodeSpec ----------------------------------------------------
def test_node_maps_internal_ips_and_pod_cidrs():
    spec, why = node_spec_from_k8s(NODE_JSON, DIGEST)
    assert why == ""
    assert spec == NodeSpec("worker-1", "gateway", ("198.51.100.11", "2001:db8::11"),
                            ("10.244.1.0/24", "fd00:10:244:1::/64"))
    assert spec.join_token_sha256 == DIGEST
    assert "203.0.113.11" not in spec.endpoints  # ExternalIP is not an endpoint


def test_legacy_single_pod_cidr():
    obj = {"metadata": {"name": "old"}, "spec": {"podCIDR": "10.244.7.0/24"},
           "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.7"}]}}
    spec, _ = node_spec_from_k8s(obj)
    assert spec.subnets == ("10.244.7.0/24",)


@pytest.mark.parametrize("mutate, expect", [
    (lambda o: o["status"].update(addresses=[{"type": "Hostname", "address": "x"}]), "no InternalIP"),
    (lambda o: o["spec"].clear(), "no spec.podCIDRs yet"),
    (lambda o: o["status"]["addresses"][0].update(address="198.51.100.999"), "is not an IP address"),
    (lambda o: o["spec"].update(podCIDRs=["10.244.1.0/33"]), "is not a network"),
    (lambda o: o["metadata"].update(name="Bad_Name"), "not a lower-case DNS name"),
])
def test_nodes_that_cannot_be_peers_say_why(mutate, expect):
    import copy
    obj = copy.deepcopy(NODE_JSON)
    mutate(obj)
    spec, why = node_spec_from_k8s(obj)
    assert spec is None and expect in why


# -- merge -----------------------------------------------------------------
INV = """\
nodes:
  - name: site-a
    role: gateway
    endpoints: [203.0.113.5]
    subnets: [10.50.0.0/24]
    join_token: site-a-token
"""


def test_merge_adds_cluster_nodes_and_reports_clashes_naming_both_sources():
    inv = parse_inventory(INV)
    extra = [NodeSpec("worker-1", "gateway", ("198.51.100.1",), ("10.244.1.0/24",)),
             NodeSpec("site-a", "gateway", ("198.51.100.2",), ("10.244.2.0/24",)),
             NodeSpec("worker-3", "gateway", ("198.51.100.3",), ("10.50.0.128/25",)),
             NodeSpec("meshsec-controller", "gateway", ("198.51.100.4",), ("10.244.4.0/24",)),
             NodeSpec("worker-5", "gateway", ("198.51.100.5",), ("10.244.1.0/25",))]
    merged, problems = merge_nodes(inv, extra, "kubernetes")
    assert [n.name for n in merged.nodes] == ["site-a", "worker-1"]
    assert merged.defaults == inv.defaults and merged.rules == inv.rules
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "node 'site-a' from kubernetes clashes with node 'site-a' in the inventory file" in text
    assert "'10.50.0.128/25' overlaps '10.50.0.0/24' of node 'site-a' in the inventory file" in text
    assert "'10.244.1.0/25' overlaps '10.244.1.0/24' of node 'worker-1' in the kubernetes" in text
    assert "reserved for the controller" in text
    # the inventory's site-a is untouched
    assert merged.node("site-a").endpoints == ("203.0.113.5",)


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_same_token_is_sha256_compare():
    assert same_token(DIGEST, TOKEN) and not same_token(DIGEST, TOKEN + "x")


# -- the source against the list/watch server --------------------------------
class Gate:
    """Injected backoff wait: records delays; blocks while closed."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.open = threading.Event()
        self.open.set()

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        self.open.wait(10)
        return False


@pytest.fixture
def api(tmp_path):
    with FakeKubeApiServer() as server:
        server.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server


@pytest.fixture
def source_factory(api):
    made = []

    def make(**kw):
        gate = kw.pop("gate", Gate())
        src = KubeNodeSource(api_client(str(api.kubeconfig)), DIGEST, wait=gate,
                             logger=logging.getLogger("test.k8s"), **kw)
        src.gate = gate
        src.changes = []
        src.start(lambda: src.changes.append(src.nodes()))
        made.append(src)
        return src

    yield make
    for s in made:
        s.stop()


def names(src) -> list[str]:
    return [n.name for n in src.nodes()]


def test_list_then_watch_add_modify_delete(api, source_factory):
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    api.add_node("node-2", ["198.51.100.2"], ["10.244.2.0/24"])
    src = source_factory()
    assert src.wait_synced(5)
    assert names(src) == ["node-1", "node-2"]
    assert src.resource_version == str(api.resource_version)
    wait_for(lambda: api.watch_requests(), what="watch request")
    q = api.watch_requests()[0]
    assert q["resourceVersion"] == src.resource_version and q["allowWatchBookmarks"] == "true"
    api.add_node("node-3", ["198.51.100.3"], ["10.244.3.0/24"])
    wait_for(lambda: names(src) == ["node-1", "node-2", "node-3"], what="ADDED node-3")
    api.modify_node("node-2", internal_ips=["198.51.100.22"])
    wait_for(lambda: src.nodes()[1].endpoints == ("198.51.100.22",), what="MODIFIED node-2")
    api.modify_node("node-2", labels={"x": "y"})  # no change that matters: no callback
    api.delete_node("node-1")
    wait_for(lambda: names(src) == ["node-2", "node-3"], what="DELETED node-1")
    assert len(src.changes) == 4  # list, add, modify (IP), delete; the label change is not one
    assert src.counters["lists"] == 1 and src.counters["errors"] == 0
    assert src.counters["MODIFIED"] == 2


def test_node_without_pod_cidr_joins_when_ipam_assigns_one(api, source_factory):
    api.add_node("node-1", ["198.51.100.1"], [])
    src = source_factory()
    assert src.wait_synced(5) and names(src) == []
    api.modify_node("node-1", pod_cidrs=["10.244.1.0/24"])
    wait_for(lambda: names(src) == ["node-1"], what="node-1 with its podCIDR")


def test_dropped_connection_backs_off_and_resumes_from_bookmark(api, source_factory):
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    src = source_factory()
    assert src.wait_synced(5)
    wait_for(lambda: api.open_watches() >= 1, what="first watch stream open")
    # A change to another resource kind moves the version; the BOOKMARK carries it.
    with api._cond:
        api._rv += 5
    api.bookmark()
    wait_for(lambda: src.counters["BOOKMARK"] == 1, what="BOOKMARK")
    assert src.resource_version == str(api.resource_version)
    api.drop_watches()
    wait_for(lambda: len(api.watch_requests()) == 2, what="re-watch")
    assert api.watch_requests()[1]["resourceVersion"] == str(api.resource_version)
    assert src.counters["errors"] == 1 and src.gate.delays == [0.5]
    assert src.counters["lists"] == 1  # resumed, not re-listed
    api.add_node("node-2", ["198.51.100.2"], ["10.244.2.0/24"])
    wait_for(lambda: names(src) == ["node-1", "node-2"], what="node-2 after reconnect")


def test_410_gone_relists_and_drops_nodes_deleted_meanwhile(api, source_factory):
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    api.add_node("node-2", ["198.51.100.2"], ["10.244.2.0/24"])
    gate = Gate()
    src = source_factory(gate=gate)
    assert src.wait_synced(5)
    wait_for(lambda: api.open_watches() >= 1, what="first watch stream open")
    gate.open.clear()           # hold the reconnect
    api.drop_watches()
    wait_for(lambda: gate.delays, what="backoff")
    old_rv = src.resource_version
    api.delete_node("node-1")   # missed while disconnected ...
    api.add_node("node-3", ["198.51.100.3"], ["10.244.3.0/24"])
    api.compact()               # ... and compacted away: the watch must 410
    gate.open.set()
    wait_for(lambda: src.counters["gone_410"] == 1, what="410 Gone")
    wait_for(lambda: names(src) == ["node-2", "node-3"], what="relist")
    assert src.counters["lists"] == 2
    assert api.watch_requests()[1]["resourceVersion"] == old_rv
    assert int(src.resource_version) == api.resource_version


def test_clean_end_of_stream_resumes_without_backoff(api, source_factory):
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    src = source_factory(watch_timeout=1)
    wait_for(lambda: len(api.watch_requests()) >= 2, timeout=10, what="second watch after timeoutSeconds")
    assert src.gate.delays == [] and src.counters["errors"] == 0 and src.counters["lists"] == 1
    assert api.watch_requests()[0]["timeoutSeconds"] == "1"


def test_unauthorised_counts_errors_and_never_raises(api, source_factory):
    api.token = "rotated"
    src = source_factory()
    assert not src.wait_synced(0.5)
    wait_for(lambda: len(src.gate.delays) >= 3, what="backoff growth")
    assert src.gate.delays[:3] == [0.5, 1.0, 2.0]
    assert src.nodes() == () and src._thread.is_alive()
    api.token = "test-bearer-token"
    src.gate.open.set()
    api.add_node("node-1", ["198.51.100.1"], ["10.244.1.0/24"])
    wait_for(lambda: names(src) == ["node-1"], what="list after the token was fixed")


# -- the controller with the source ---------------------------------------------
def kube_server(controller: ServerFactory, api: FakeKubeApiServer, **kw):
    client_api = api_client(str(api.kubeconfig))
    source = KubeNodeSource(client_api, DIGEST, logger=logging.getLogger("test.k8s"))
    return controller.start(node_source=source, **kw), source, client_api


def agent(server, name: str, token: str, tmp: Path) -> ControllerClient:
    return ControllerClient(f"127.0.0.1:{server.port}", name, token, tmp / f"agent-{name}",
                            server.ca_path.read_bytes(), watch_address=f"127.0.0.1:{server.watch_port}",
                            backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5,
                            logger=logging.getLogger(f"test.agent.{name}"))


def test_controller_serves_inventory_and_cluster_nodes(controller, api, tmp_path, caplog):
    api.add_node("k8s-1", ["127.0.0.11"], ["10.244.1.0/24"])
    api.add_node("k8s-2", ["127.0.0.12"], ["10.244.2.0/24"])
    api.add_node("alpha", ["127.0.0.13"], ["10.244.3.0/24"])   # clashes with the inventory's alpha
    server, source, _ = kube_server(controller, api)
    inv, version = server.state.snapshot()
    assert [n.name for n in inv.nodes] == ["alpha", "bravo", "charlie", "k8s-1", "k8s-2"]
    assert inv.node("alpha").endpoints == ("127.0.0.1",)
    assert any("node 'alpha' from kubernetes clashes with node 'alpha' in the inventory file" in r.message
               for r in caplog.records)
    # Cluster agents enrol with the shared token; an inventory node's token does not work for them.
    with pytest.raises(EnrollmentError):
        agent(server, "k8s-1", "alpha-token", tmp_path).enroll()
    c = agent(server, "k8s-1", TOKEN, tmp_path)
    c.enroll()
    views, stop = [], threading.Event()
    t = threading.Thread(target=c.watch, args=(views.append, stop), daemon=True)
    t.start()
    try:
        wait_for(lambda: views, what="k8s-1 view")
        assert [p.name for p in views[0].peers] == ["alpha", "bravo", "charlie", "k8s-2"]
        assert [str(s) for s in views[0].peer("k8s-2").subnets] == ["10.244.2.0/24"]
        api.delete_node("k8s-2")
        api.add_node("k8s-4", ["127.0.0.14"], ["10.244.4.0/24"])
        wait_for(lambda: views[-1].peer("k8s-4") is not None and views[-1].peer("k8s-2") is None,
                 what="incremental update")
        assert views[-1].version > version
        # the inventory file keeps working beside the cluster
        assert views[-1].peer("alpha").endpoints == ("127.0.0.1",)
    finally:
        stop.set()
        t.join(10)


def test_token_review_accepts_only_a_token_bound_to_the_node(controller, api, tmp_path):
    api.add_node("k8s-1", ["127.0.0.11"], ["10.244.1.0/24"])
    api.add_node("k8s-2", ["127.0.0.12"], ["10.244.2.0/24"])
    sa = "system:serviceaccount:meshsec:meshsec-agent"
    api.review_tokens = {"sa-token-k8s-1": (sa, "k8s-1"), "other-sa": ("system:serviceaccount:x:y", "k8s-2")}
    client_api = api_client(str(api.kubeconfig))
    source = KubeNodeSource(client_api, b"", logger=logging.getLogger("test.k8s"))
    reviewer = TokenReviewer(client_api, source, sa)
    server = controller.start(node_source=source, token_review=reviewer.check)
    agent(server, "k8s-1", "sa-token-k8s-1", tmp_path).enroll()
    for name, token, why in [("k8s-2", "sa-token-k8s-1", "bound to node ['k8s-1']"),
                             ("k8s-2", "other-sa", "belongs to 'system:serviceaccount:x:y'"),
                             ("k8s-2", "nonsense", "not authenticated"),
                             ("alpha", "sa-token-k8s-1", "not a Kubernetes Node")]:
        ok, reason = reviewer.check(name, token)
        assert not ok and why in reason
        with pytest.raises(EnrollmentError):
            agent(server, name, token, tmp_path / name).enroll()
    posts = [r for r in api.requests if r[0] == "POST"]
    assert posts and all(p[1] == "/apis/authentication.k8s.io/v1/tokenreviews" for p in posts)


# -- command line ------------------------------------------------------------------
def test_cli_errors(tmp_path, capsys, api):
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes: []\n")
    base = ["--inventory", str(inv), "--state-dir", str(tmp_path / "st"), "--listen", "127.0.0.1:0"]
    tok = tmp_path / "tok"
    tok.write_text("short\n")
    cases = [
        (["--kube-join-token-file", str(tok)], "need --kubernetes or --kubeconfig"),
        (["--kubeconfig", str(api.kubeconfig)], "give --kube-join-token-file"),
        (["--kubeconfig", str(api.kubeconfig), "--kube-join-token-file", str(tok)], "shorter than 16"),
        (["--kubeconfig", str(api.kubeconfig), "--kube-join-token-file", str(tmp_path / "none")], "cannot read"),
        (["--kubeconfig", str(tmp_path / "missing"), "--kube-token-review"], "cannot load Kubernetes configuration"),
    ]
    for extra, msg in cases:
        assert controller_main.main(base + extra) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        controller_main.main(base + ["--kubernetes", "--kubeconfig", str(api.kubeconfig)])
    assert "not allowed with argument" in capsys.readouterr().err


# -- pod CIDRs from a CNI with its own IPAM (annotation meshsec.io/pod-cidrs) ---------
def test_pod_cidrs_annotation_replaces_spec_pod_cidrs():
    import copy
    obj = copy.deepcopy(NODE_JSON)
    obj["metadata"]["annotations"] = {"meshsec.io/pod-cidrs": "10.0.7.0/26, 10.0.7.64/26"}
    spec, why = node_spec_from_k8s(obj)
    assert why == "" and spec.subnets == ("10.0.7.0/26", "10.0.7.64/26")
    obj["spec"] = {}  # Calico / Cilium cluster-pool: spec.podCIDRs not filled at all
    assert node_spec_from_k8s(obj)[0].subnets == ("10.0.7.0/26", "10.0.7.64/26")
    obj["metadata"]["annotations"]["meshsec.io/pod-cidrs"] = "10.0.7.1/26"
    spec, why = node_spec_from_k8s(obj)
    assert spec is None and "'10.0.7.1/26' (annotation meshsec.io/pod-cidrs) is not a network" in why
    obj["metadata"]["annotations"]["meshsec.io/pod-cidrs"] = " , "
    spec, why = node_spec_from_k8s(obj)
    assert spec is None and "annotation meshsec.io/pod-cidrs is empty" in why
    del obj["metadata"]["annotations"]
    spec, why = node_spec_from_k8s(obj)
    assert spec is None and "set the annotation meshsec.io/pod-cidrs" in why


def test_annotated_node_becomes_a_peer_through_the_watch(api, source_factory):
    src = source_factory()
    api.add_node("calico-1", ["198.51.100.21"], [])
    assert src.wait_synced(10)
    assert [n.name for n in src.nodes()] == []
    api.modify_node("calico-1", annotations={"meshsec.io/pod-cidrs": "10.0.9.0/26"})
    wait_for(lambda: [n.subnets for n in src.nodes()] == [("10.0.9.0/26",)], what="annotated node as a peer")
