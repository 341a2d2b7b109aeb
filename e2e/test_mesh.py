"""A three-node mesh carrying real traffic, checked from the wire.

    ns ctl  meshsec-controller 198.51.100.254:7443
                 |
    ======= br0 (ns sw, underlay 198.51.100.0/24, tcpdump here) =======
        |                     |                      |
    node-a .1             node-b .2              node-c .3     meshsec-agent each, TUN meshsec0
    lan0 10.1.0.1/24      lan0 10.2.0.1/24       lan0 10.3.0.1/24
        |                     |                      |
    node-aw0 10.1.0.2     node-bw0 10.2.0.2      node-cw0 10.3.0.2   workloads (as pods)

Every workload pings every other; 20 MB over TCP arrives intact; the underlay
capture holds no plaintext workload traffic, and tshark, given the agents'
key log, decrypts our IKE and ESP and finds the workload traffic inside.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.mesh import Mesh
from e2e.topology import ping, sh, wait_until
from e2e.wire import tshark, wireshark_home

pytestmark = pytest.mark.e2e

NODES = {"node-a": "10.1.0.0/24", "node-b": "10.2.0.0/24", "node-c": "10.3.0.0/24"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark and tcpdump are needed (scripts/setup.sh installs them)")
    work = tmp_path_factory.mktemp("mesh")
    with Mesh(NODES, workdir=work) as m:
        m.build()
        m.pcap = work / "underlay.pcap"
        m.tcpdump = m.capture(m.pcap)
        m.start_all()
        m.wait_established(timeout=90)
        yield m


def test_every_workload_pings_every_other(mesh):
    workloads = [w for n in NODES for w in mesh.node(n).workloads]
    for src, dst in itertools.permutations(workloads, 2):
        ok = wait_until(lambda: ping(src.ns, dst.ip, count=1), 10, what=f"ping {src.name} -> {dst.ip}")
        assert ok
        assert ping(src.ns, dst.ip, count=3), f"{src.name} -> {dst.name} lost pings"


def test_20mb_tcp_transfer_intact(mesh, tmp_path):
    src = mesh.node("node-a").workloads[0]
    dst = mesh.node("node-c").workloads[0]
    blob = tmp_path / "blob"
    data = os.urandom(20 * 1024 * 1024)
    blob.write_bytes(data)
    server = subprocess.Popen(["ip", "netns", "exec", dst.ns, sys.executable, "-m", "e2e.transfer", "serve", "5001"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert server.stdout.readline().strip() == "listening"
        sh(sys.executable, "-m", "e2e.transfer", "send", dst.ip, "5001", str(blob), ns=src.ns)
        out, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    n, digest = out.split()
    assert int(n) == len(data)
    assert digest == hashlib.sha256(data).hexdigest()


def test_status_shows_sas_and_counters(mesh):
    st = mesh.status("node-b")
    assert st is not None
    peers = {c["peer"] for c in st["child_sas"]}
    assert peers == {"node-a", "node-c"}
    assert any(c["packets_in"] > 0 and c["packets_out"] > 0 for c in st["child_sas"])
    human = subprocess.run([sys.executable, "-m", "meshsec.cli", "status", "--socket", str(mesh.socket("node-b"))],
                           capture_output=True, text=True)
    assert human.returncode == 0, human.stderr
    assert "node-a" in human.stdout and "node-c" in human.stdout


def test_underlay_capture_has_no_plaintext_and_decrypts_with_keylog(mesh):
    mesh.stop_capture(mesh.tcpdump, mesh.pcap)
    pcap = mesh.pcap
    # Without keys: nothing but IKE, ESP-in-UDP and the controller's TLS (7443 enrol, 7444 watch).
    assert tshark(pcap, "isakmp"), "no IKE on the underlay"
    assert tshark(pcap, "esp"), "no ESP on the underlay"
    assert tshark(pcap, "ip.addr == 10.0.0.0/8") == [], "a workload address appeared in a clear header"
    assert tshark(pcap, "icmp or (tcp and not (tcp.port == 7443 or tcp.port == 7444))") == [], "plaintext ICMP/TCP on the underlay"
    assert tshark(pcap, "udp and not (udp.port == 500 or udp.port == 4500)") == []

    # With the agents' key log, an implementation we did not write reads our IKE and ESP.
    home = wireshark_home(mesh.keylog_dir, mesh.workdir / "tshark-home")
    inner_icmp = tshark(pcap, "esp and icmp and ip.src == 10.0.0.0/8", home=home)
    assert len(inner_icmp) >= 6 * 3, "tshark could not decrypt the workload pings"
    inner_tcp = tshark(pcap, "esp and tcp.port == 5001", home=home)
    assert len(inner_tcp) > 1000
    # IKE_AUTH decrypted: the identities inside the SK payload become visible.
    ids = tshark(pcap, "isakmp.exchangetype == 35 and isakmp.id.data.fqdn", home=home,
                 fields=["isakmp.id.data.fqdn"])
    seen = {name for line in ids for name in line.split(",")}
    assert set(NODES) <= seen, f"tshark could not decrypt IKE_AUTH with the key log (identities seen: {seen})"
    # tshark verifies every AES-GCM ICV (RFC 4106) itself: none may be wrong
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []
    assert len(tshark(pcap, "esp.icv_good == 1", home=home)) >= len(inner_icmp) + len(inner_tcp)
