"""TCP through two agents on the offloaded datapath, checked from the wire.

    netns fp-a-<pid>                                  netns fp-b-<pid>
    ul0 198.51.100.1/24  <-------- veth -------->     ul0 198.51.100.2/24   (tcpdump here)
    meshsec0 10.200.9.1/32  ==== ESP-in-UDP 4500 ====  meshsec0 10.200.9.2/32

The agents run with their defaults: TUN with TSO/USO (userspace split and coalescing),
UDP GSO/GRO. 16 MB go A -> B over TCP and arrive with the same sha256; the underlay
capture shows UDP GSO frames (several ESP packets in one frame, as veth passes them on),
and tshark, given the agents' key log, decrypts every ESP packet once the frames are cut
back into wire packets (e2e/gso_pcap.py), with every AES-GCM ICV correct.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.gso_pcap import resegment
from e2e.wire import tshark, wireshark_home

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / ".venv" / "bin" / "meshsec-agent"


def sh(*args, check=True, timeout=60):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def netns_pair():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    if not shutil.which("tshark") or not shutil.which("tcpdump") or not AGENT.exists():
        pytest.skip("needs tshark, tcpdump and the agent installed (scripts/setup.sh)")
    tag = os.getpid()
    a, b = f"fp-a-{tag}", f"fp-b-{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"fpva{tag % 10000}", "netns", a, "type", "veth", "peer", "name",
           f"fpvb{tag % 10000}", "netns", b)
        for ns, dev, ip in ((a, f"fpva{tag % 10000}", "198.51.100.1/24"), (b, f"fpvb{tag % 10000}", "198.51.100.2/24")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "name", "ul0")
            sh("ip", "-n", ns, "addr", "add", ip, "dev", "ul0")
            sh("ip", "-n", ns, "link", "set", "ul0", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        yield a, b
    finally:
        for ns in (a, b):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)  # only processes this test started live there
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)


def _config(path, me, my_ip, my_tun, peer, peer_ip, peer_tun):
    path.write_text(f"""name: {me}
local_address: {my_ip}
subnets: [{my_tun}/32]
tun: {{name: meshsec0, mtu: 1400, address: {my_tun}/32}}
auth: {{psk: "fastpath-test-psk"}}
peers:
  - name: {peer}
    endpoints: [{peer_ip}]
    subnets: [{peer_tun}/32]
""")


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_tcp_over_offloaded_datapath_intact_and_decryptable(netns_pair, tmp_path):
    a, b = netns_pair
    keys = tmp_path / "keys"
    pcap = tmp_path / "ul.pcap"
    procs = []
    dump = subprocess.Popen(["ip", "netns", "exec", b, "tcpdump", "-i", "ul0", "-U", "-n", "-s", "0", "-w", str(pcap),
                             "udp port 4500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: pcap.exists() and pcap.stat().st_size > 0, 10, "tcpdump")
        for ns, me, ip, tun, peer, pip, ptun in (
                (a, "node-a", "198.51.100.1", "10.200.9.1", "node-b", "198.51.100.2", "10.200.9.2"),
                (b, "node-b", "198.51.100.2", "10.200.9.2", "node-a", "198.51.100.1", "10.200.9.1")):
            cfg = tmp_path / f"{me}.yaml"
            _config(cfg, me, ip, tun, peer, pip, ptun)
            log = open(tmp_path / f"{me}.log", "w")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, str(AGENT), "--config", str(cfg), "--control-socket",
                 str(tmp_path / f"{me}.sock"), "--state-dir", str(tmp_path / f"{me}-state"),
                 "--keylog-dir", str(keys), "-v"], stdout=log, stderr=subprocess.STDOUT))
        _wait(lambda: sh("ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.200.9.2", check=False).returncode == 0,
              30, "ping through the tunnel")
        data = os.urandom(16 * 1024 * 1024)
        blob = tmp_path / "blob"
        blob.write_bytes(data)
        server = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-m", "e2e.transfer", "serve", "5001"],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert server.stdout.readline().strip() == "listening"
            sh("ip", "netns", "exec", a, sys.executable, "-m", "e2e.transfer", "send", "10.200.9.2", "5001",
               str(blob), timeout=120)
            out, _ = server.communicate(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
        n, digest = out.split()
        assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
        logs = "".join((tmp_path / f"{m}.log").read_text() for m in ("node-a", "node-b"))
        assert "refused" not in logs, logs  # no offload fell back on this kernel
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        time.sleep(0.5)  # let tcpdump write out what it holds
        dump.send_signal(signal.SIGTERM)
        dump.wait(timeout=10)
    wire = resegment(pcap)
    assert wire != pcap, "no UDP GSO frame in the capture: the sender did not batch"
    home = wireshark_home(keys, tmp_path / "tshark-home")
    inner = tshark(wire, "esp and tcp.port == 5001", home=home)
    assert len(inner) > 16 * 1024 * 1024 // 1400, len(inner)
    assert tshark(wire, "esp.icv_bad == 1", home=home) == []
    assert len(tshark(wire, "esp.icv_good == 1", home=home)) >= len(inner)
