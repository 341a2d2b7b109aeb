"""Real TUN + UDP smoke test: two standalone PSK agents in their own network namespaces.

    netns msdp-a-<pid>                         netns msdp-b-<pid>
    ul0 198.51.100.1/24  <------ veth ------>  ul0 198.51.100.2/24
    meshsec0 10.200.9.1/32  ===== ESP-in-UDP 4500 =====  meshsec0 10.200.9.2/32

Needs root, `ip netns` and /dev/net/tun; namespaces are deleted at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT = os.path.join(ROOT, ".venv", "bin", "meshsec-agent")


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    if not os.path.exists(AGENT):
        return f"{AGENT} missing (pip install -e .)"
    return None


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30, **kw)


@pytest.fixture
def netns_pair():
    why = _usable()
    if why:
        pytest.skip(why)
    tag = os.getpid()
    a, b = f"msdp-a-{tag}", f"msdp-b-{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", "msdpva", "netns", a, "type", "veth", "peer", "name", "msdpvb", "netns", b)
        for ns, dev, ip in ((a, "msdpva", "198.51.100.1/24"), (b, "msdpvb", "198.51.100.2/24")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "name", "ul0")
            sh("ip", "-n", ns, "addr", "add", ip, "dev", "ul0")
            sh("ip", "-n", ns, "link", "set", "ul0", "up")
        yield a, b
    finally:
        for ns in (a, b):
            sh("ip", "netns", "del", ns, check=False)


def _config(path, me, my_ip, my_tun, peer, peer_ip, peer_tun):
    path.write_text(f"""name: {me}
local_address: {my_ip}
subnets: [{my_tun}/32]
tun: {{name: meshsec0, mtu: 1400, address: {my_tun}/32}}
auth: {{psk: "smoke-test-psk-not-secret"}}
peers:
  - name: {peer}
    endpoints: [{peer_ip}]
    subnets: [{peer_tun}/32]
""")


def test_two_agents_ping_through_tunnel(netns_pair, tmp_path):
    a, b = netns_pair
    procs = []
    try:
        for ns, me, ip, tun, peer, pip, ptun in ((a, "node-a", "198.51.100.1", "10.200.9.1", "node-b", "198.51.100.2", "10.200.9.2"),
                                                 (b, "node-b", "198.51.100.2", "10.200.9.2", "node-a", "198.51.100.1", "10.200.9.1")):
            cfg = tmp_path / f"{me}.yaml"
            _config(cfg, me, ip, tun, peer, pip, ptun)
            log = open(tmp_path / f"{me}.log", "w")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, AGENT, "--config", str(cfg), "--control-socket",
                 str(tmp_path / f"{me}.sock"), "--keylog-dir", str(tmp_path / "keys"), "-v"],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        ok = False
        while time.monotonic() < deadline:
            for p in procs:
                assert p.poll() is None, (tmp_path / "node-a.log").read_text() + (tmp_path / "node-b.log").read_text()
            r = sh("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "1", "10.200.9.2", check=False)
            if r.returncode == 0:
                ok = True
                break
            time.sleep(0.2)
        logs = (tmp_path / "node-a.log").read_text() + (tmp_path / "node-b.log").read_text()
        assert ok, "no ping through the tunnel\n" + logs
        st = json.loads(sh(sys.executable, "-m", "meshsec.cli", "status", "--socket", str(tmp_path / "node-a.sock"),
                           "--json", cwd=ROOT).stdout)
        assert st["child_sas"] and st["child_sas"][0]["packets_out"] >= 1
        assert (tmp_path / "keys" / "esp_sa").read_text().count("\n") >= 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(timeout=10) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise
