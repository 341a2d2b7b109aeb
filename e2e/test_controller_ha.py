"""Two controller replicas on a three-member etcd cluster; the leader dies
while the mesh carries traffic; then every controller is down for a while.

    ns ctl1 198.51.100.251   etcd m1 + meshsec-controller c1 (7443 enrol, 7444 watch, 9100 metrics)
    ns ctl2 198.51.100.252   etcd m2 + meshsec-controller c2
    ns ctl3 198.51.100.253   etcd m3
                 |
    ======= br0 (ns sw, underlay 198.51.100.0/24) =======
        |                              |
    node-a .1  agent                node-b .2  agent      --controller .251:7443,.252:7443
    lan0 10.1.0.1/24                lan0 10.2.0.1/24
        |                              |
    node-aw0 10.1.0.2  ---- ping ---> node-bw0 10.2.0.2

Checks: c1 leads; SIGKILL c1 while node-aw0 pings node-bw0 every 0.2 s;
c2 takes over within the lease TTL; the agents reconnect to c2 and resume
from their view version (incremental, no snapshot); an inventory change
then reaches both agents through the new leader; no ping is lost and no
CHILD_SA is replaced. Then c2 dies too: for MESHSEC_HA_OUTAGE_S seconds
(default 30) with no controller at all, no ping is lost and the CHILD_SAs
stay the same.

etcd runs as in production (docs/ha.md): TLS on the client and peer ports,
--client-cert-auth and --peer-client-cert-auth, certificates from one test CA;
the controllers present a client certificate (--etcd-cacert/--etcd-cert/--etcd-key).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.mesh import Mesh, venv_bin
from e2e.topology import sh, wait_until
from tests.controller.etcd_pki import issue, make_ca

pytestmark = pytest.mark.e2e

NODES = {"node-a": "10.1.0.0/24", "node-b": "10.2.0.0/24"}
CTL = {"c1": "198.51.100.251", "c2": "198.51.100.252", "c3": "198.51.100.253"}  # c3: etcd only
LEASE_TTL = 3
OUTAGE_S = float(os.environ.get("MESHSEC_HA_OUTAGE_S", "30"))
PING_INTERVAL = 0.2

_SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


def scrape(ns: str, url: str) -> dict[str, float]:
    """Prometheus text from inside ``ns`` -> {'name{labels}': value}."""
    res = sh(sys.executable, "-c", _SCRAPE, url, ns=ns, check=False)
    out = {}
    for line in res.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


class Ha:
    def __init__(self, m: Mesh) -> None:
        self.m = m
        self.ns = {}
        self.etcd = {}
        self.ctl: dict[str, subprocess.Popen] = {}
        self.endpoints = ",".join(f"https://{ip}:2379" for ip in CTL.values())
        self.pki = m.workdir / "pki"
        self.pki.mkdir()
        ca = make_ca(self.pki, "etcd-ca")
        for name, ip in CTL.items():
            issue(self.pki, ca, f"etcd-{name}", server=True, ips=(ip,), dns=())
        issue(self.pki, ca, "controller", server=False)
        self.client_tls = ["--cacert", str(self.pki / "etcd-ca.pem"), "--cert", str(self.pki / "controller.pem"),
                           "--key", str(self.pki / "controller.key")]

    def build(self) -> None:
        for name, ip in CTL.items():
            self.ns[name] = self.m.topo.add_host(name, ip).ns
        for i, name in enumerate(NODES, start=1):
            self.m.topo.add_gateway(name, f"198.51.100.{i}", NODES[name])

    def start_etcd(self) -> None:
        cluster = ",".join(f"m{n[1]}=https://{ip}:2380" for n, ip in CTL.items())
        ca = str(self.pki / "etcd-ca.pem")
        for name, ip in CTL.items():
            cert, key = str(self.pki / f"etcd-{name}.pem"), str(self.pki / f"etcd-{name}.key")
            self.etcd[name] = self.m.topo.spawn(self.ns[name], [
                shutil.which("etcd"), "--name", f"m{name[1]}", "--data-dir", str(self.m.workdir / f"etcd-{name}"),
                "--listen-client-urls", f"https://{ip}:2379", "--advertise-client-urls", f"https://{ip}:2379",
                "--listen-peer-urls", f"https://{ip}:2380", "--initial-advertise-peer-urls", f"https://{ip}:2380",
                "--initial-cluster", cluster, "--initial-cluster-state", "new", "--log-level", "error",
                "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
                "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
                "--peer-client-cert-auth"],
                self.m.workdir / f"etcd-{name}.log")

        def healthy() -> bool:
            res = sh("etcdctl", "--endpoints", self.endpoints, *self.client_tls, "--command-timeout=2s",
                     "put", "/probe", "ok", ns=self.ns["c1"], check=False)
            return res.returncode == 0
        wait_until(healthy, 30, interval=0.3, what="etcd cluster of three to accept writes")

    def start_controller(self, name: str) -> None:
        ip = CTL[name]
        self.ctl[name] = self.m.topo.spawn(self.ns[name], [
            venv_bin("meshsec-controller"), "--inventory", str(self.m.workdir / "inventory.yaml"),
            "--state-dir", str(self.m.workdir / f"state-{name}"), "--listen", f"{ip}:7443",
            "--server-name", ip, "--etcd-endpoints", self.endpoints, "--etcd-cacert", str(self.pki / "etcd-ca.pem"),
            "--etcd-cert", str(self.pki / "controller.pem"), "--etcd-key", str(self.pki / "controller.key"),
            "--etcd-lease-ttl", str(LEASE_TTL),
            "--replica-id", name, "--metrics-listen", f"{ip}:9100"], self.m.workdir / f"controller-{name}.log")
        wait_until(lambda: self.metrics(name).get("meshsec_controller_view_version", 0) >= 1
                   or self._check_alive(name), 30, what=f"controller {name} serving")

    def _check_alive(self, name: str) -> bool:
        if self.ctl[name].poll() is not None:
            raise RuntimeError(f"controller {name} exited:\n" + self.log(f"controller-{name}"))
        return False

    def metrics(self, name: str) -> dict[str, float]:
        return scrape(self.ns[name], f"http://{CTL[name]}:9100/metrics")

    def is_leader(self, name: str) -> bool:
        return self.metrics(name).get("meshsec_controller_leader") == 1.0

    def log(self, what: str) -> str:
        try:
            return (self.m.workdir / f"{what}.log").read_text()[-4000:]
        except FileNotFoundError:
            return "(no log)"


def start_ping(m: Mesh, seconds: float) -> subprocess.Popen:
    src, dst = m.node("node-a").workloads[0], m.node("node-b").workloads[0]
    count = int(seconds / PING_INTERVAL)
    return subprocess.Popen(["ip", "netns", "exec", src.ns, "ping", "-n", "-q", "-i", str(PING_INTERVAL),
                             "-W", "2", "-c", str(count), dst.ip], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def ping_result(proc: subprocess.Popen) -> tuple[int, int, str]:
    out, _ = proc.communicate(timeout=OUTAGE_S + 120)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    return int(match.group(1)), int(match.group(2)), out


def child_spis(m: Mesh, name: str) -> set[tuple[str, str]]:
    st = m.status(name) or {}
    return {(c["spi_in"], c["spi_out"]) for c in st.get("child_sas", [])}


@pytest.fixture
def ha_mesh(tmp_path):
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        pytest.skip("etcd and etcdctl are needed (scripts/setup.sh installs etcd-server and etcd-client)")
    with Mesh(NODES, workdir=tmp_path, keylog=False) as m:
        ha = Ha(m)
        ha.build()
        m.write_inventory()
        ha.start_etcd()
        ha.start_controller("c1")
        wait_until(lambda: ha.is_leader("c1"), 15, what="c1 to lead")
        ha.start_controller("c2")
        assert not ha.is_leader("c2")
        m.ca_pem = m.workdir / "state-c1" / "ca.pem"
        assert m.ca_pem.read_bytes() == (m.workdir / "state-c2" / "ca.pem").read_bytes()  # one CA in etcd
        m.controller_address = f"{CTL['c1']}:7443,{CTL['c2']}:7443"
        for name in NODES:
            m.agent_args = ["--metrics-listen", f"{m.node(name).underlay_ip}:9100"]
            m.start_agent(name)
        m.wait_established(timeout=60)
        yield m, ha


def test_leader_dies_then_all_controllers_down(ha_mesh):
    m, ha = ha_mesh
    version = int(ha.metrics("c1")["meshsec_controller_view_version"])
    wait_until(lambda: all((m.status(n) or {}).get("view_version") == version for n in NODES), 15,
               what="agents at the controllers' view version")
    spis = {n: child_spis(m, n) for n in NODES}
    assert all(len(s) == 1 for s in spis.values()), spis

    # -- the leader dies (SIGKILL: no resignation, the lease has to expire)
    pinger = start_ping(m, LEASE_TTL + 12)
    time.sleep(1.0)  # let the ping run before the kill
    ha.ctl["c1"].kill()
    ha.ctl["c1"].wait(5)
    t0 = time.monotonic()
    wait_until(lambda: ha.is_leader("c2"), LEASE_TTL + 10, interval=0.2, what="c2 to take over")
    takeover = time.monotonic() - t0
    # both agents resume their watch at c2 from the version they had: incremental, no snapshot
    for n in NODES:
        wait_until(lambda: f"node {n!r} watching from version {version} (current {version}, incremental)"
                   in ha.log("controller-c2"), 30, what=f"{n} to resume at c2")
    assert ha.metrics("c2")["meshsec_controller_watch_streams"] == len(NODES)
    # the new leader handles writes: an inventory change reaches both agents through c2
    inv = m.workdir / "inventory.yaml"
    inv.write_text(inv.read_text() + "  - name: node-c\n    role: gateway\n    endpoints: [198.51.100.3]\n"
                   "    subnets: [10.3.0.0/24]\n    join_token: not-used-here\n")
    wait_until(lambda: all((m.status(n) or {}).get("view_version") == version + 1 for n in NODES), 20,
               what="view change from the new leader at both agents")
    sent, received, out = ping_result(pinger)
    assert sent > 0 and received == sent, f"pings lost during the failover:\n{out}"
    assert {n: child_spis(m, n) for n in NODES} == spis, "a CHILD_SA was replaced during the failover"
    print(f"failover: c2 leader {takeover:.1f} s after SIGKILL of c1 (lease TTL {LEASE_TTL} s); "
          f"{sent} pings, none lost")

    # -- every controller down: the mesh keeps carrying traffic
    ha.ctl["c2"].kill()
    ha.ctl["c2"].wait(5)
    pinger = start_ping(m, OUTAGE_S)
    sent, received, out = ping_result(pinger)
    assert sent > 0 and received == sent, f"pings lost with no controller:\n{out}"
    assert {n: child_spis(m, n) for n in NODES} == spis, "a CHILD_SA was replaced with no controller"
    for n in NODES:
        assert m.agents[n].poll() is None, m.log(n)
        text = scrape(m.node(n).ns, f"http://{m.node(n).underlay_ip}:9100/metrics")
        assert text['meshsec_agent_child_sas{state="active"}'] == 1
        assert text['meshsec_agent_esp_packets_total{direction="in"}'] >= received
        assert text['meshsec_agent_view_version'] == version + 1
    print(f"outage: {OUTAGE_S:.0f} s with no controller, {sent} pings, none lost")
