"""Transport mode with the initiator behind a NAT (RFC 7296 §2.23.1, RFC 3948 §3.1.2), meshsec
to meshsec, standalone agents (PSK) in namespaces::

    ns <p>-tin  meshsec "ta" 10.77.0.2/24 ── ns <p>-nat in0 10.77.0.1 | ul0 198.51.100.3
                (masquerade: nftables, no port forwarding)  ── br0 (<p>-sw) ──
    ns <p>-tb   meshsec "tb" ul0 198.51.100.12

Both agents run the documented configuration: ``mode: transport`` and no ``subnets`` (each
side's selector is its own address; "tb" knows "ta" by the NAT's address, as it sees it).
"ta" initiates (nothing reaches it from outside). Before the §2.23.1 substitution "tb"
answered TS_UNACCEPTABLE (it was offered ta's private address). Traffic: ping both ways and
1 MiB over TCP both ways (SHA-256 checked: the NAT rewrote the pseudo-header addresses, so the
receiver recomputes TCP checksums, RFC 3948 §3.1.2); tshark on the switch sees only ESP in
UDP 4500 from the NAT's address, no ICMP or TCP in the clear.

strongSwan cannot take part: its kernel-libipsec (the only ESP it has on this kernel) has
no transport mode (docs/interop.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.mesh import venv_bin
from e2e.topology import Topology, ping, sh, wait_until
from e2e.wire import tshark

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PSK = "transport-behind-nat-psk-not-secret"
B_UL, NAT_PUB, NAT_IN, A_IN = "198.51.100.12", "198.51.100.3", "10.77.0.1", "10.77.0.2"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not shutil.which("nft"):
        pytest.skip("nft (nftables) missing")
    work = tmp_path_factory.mktemp("transport-nat")
    with Topology(prefix=f"tn{os.getpid() % 100000}", workdir=work) as topo:
        b = topo.add_host("tb", B_UL)
        nat = topo.add_host("nat", NAT_PUB)
        inside = topo._ns("tin")
        topo._veth(nat.ns, "in0", inside, "ul0")
        sh("ip", "addr", "add", f"{NAT_IN}/24", "dev", "in0", ns=nat.ns)
        sh("ip", "addr", "add", f"{A_IN}/24", "dev", "ul0", ns=inside)
        sh("ip", "route", "add", "default", "via", NAT_IN, ns=inside)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=nat.ns)
        for rule in ("add table ip nat", "add chain ip nat post { type nat hook postrouting priority 100 ; }",
                     "add rule ip nat post oifname ul0 masquerade"):
            sh("nft", rule, ns=nat.ns)
        yield topo, inside, b.ns, work


def _agent(topo, ns: str, work: Path, name: str, local: str, peer: dict):
    d = work / name
    d.mkdir(exist_ok=True)
    cfg = {"name": name, "local_address": local, "tun": {"name": "ms0"}, "auth": {"psk": PSK},
           "peers": [{"esp_proposals": ["aes128gcm16"], "mode": "transport", **peer}]}
    (d / "agent.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    sock = d / "agent.sock"
    proc = topo.spawn(ns, [venv_bin("meshsec-agent"), "--config", str(d / "agent.yaml"), "--state-dir", str(d),
                           "--control-socket", str(sock), "-vv"], d / "agent.log")
    wait_until(lambda: sock.exists() or proc.poll() is not None, 60, 0.05, f"{name}'s control socket")
    assert proc.poll() is None, (d / "agent.log").read_text()[-3000:]
    return proc, sock, d / "agent.log"


def _status(ns: str, sock: Path) -> dict:
    res = sh(venv_bin("meshsec"), "status", "--socket", str(sock), "--json", ns=ns, check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def _transfer(src_ns: str, dst_ns: str, dst_ip: str, data: bytes, path: Path, port: int) -> None:
    path.write_bytes(data)
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-m", "e2e.transfer", "serve",
                               str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout.readline().strip() == "listening"
        sh(sys.executable, "-m", "e2e.transfer", "send", dst_ip, str(port), str(path), ns=src_ns)
        out, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    n, digest = out.split()
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest(), "TCP transfer corrupted"


def test_transport_mode_with_the_initiator_behind_a_masquerade(lab, tmp_path):
    topo, a_ns, b_ns, work = lab
    pcap = tmp_path / "outside.pcap"
    dump = topo.spawn(topo.switch_ns, ["tcpdump", "-i", "br0", "-U", "--immediate-mode", "-n", "-s", "0",
                                       "-w", str(pcap)], tmp_path / "tcpdump.log") if shutil.which("tcpdump") else None
    if dump is not None:
        wait_until(lambda: pcap.exists() and pcap.stat().st_size > 0, 30, 0.1, "tcpdump to start")
    b, b_sock, b_log = _agent(topo, b_ns, work, "tb", B_UL, {"name": "ta", "endpoints": [NAT_PUB],
                                                              "initiate": False})
    a, a_sock, a_log = _agent(topo, a_ns, work, "ta", A_IN, {"name": "tb", "endpoints": [B_UL], "initiate": True})
    try:
        def both_up():
            sa, sb = _status(a_ns, a_sock), _status(b_ns, b_sock)
            ca, cb = sa.get("child_sas", []), sb.get("child_sas", [])
            return (ca, cb) if ca and cb else None
        try:
            ca, cb = wait_until(both_up, 60, 0.2, "a transport-mode CHILD_SA on both sides")
        except TimeoutError:
            raise AssertionError(f"ta:\n{a_log.read_text()[-3000:]}\ntb:\n{b_log.read_text()[-3000:]}") from None
        # each side's selectors in its own address space (§2.23.1)
        assert (ca[0]["mode"], ca[0]["local_ts"], ca[0]["remote_ts"]) == ("transport", [f"{A_IN}/32"],
                                                                           [f"{B_UL}/32"]), ca
        assert (cb[0]["mode"], cb[0]["local_ts"], cb[0]["remote_ts"]) == ("transport", [f"{B_UL}/32"],
                                                                           [f"{NAT_PUB}/32"]), cb
        assert cb[0]["remote"].startswith(f"{NAT_PUB}:") and cb[0]["udp_encap"], cb
        assert "TS_UNACCEPTABLE" not in b_log.read_text()
        wait_until(lambda: ping(a_ns, B_UL, count=3, timeout=2.0), 30, 0.2, "ta -> tb pings")
        wait_until(lambda: ping(b_ns, NAT_PUB, count=3, timeout=2.0), 30, 0.2, "tb -> ta pings (through the NAT)")
        data = os.urandom(1 << 20)
        _transfer(a_ns, b_ns, B_UL, data, tmp_path / "a2b", 5201)
        _transfer(b_ns, a_ns, NAT_PUB, data, tmp_path / "b2a", 5202)
        sa, sb = _status(a_ns, a_sock), _status(b_ns, b_sock)
        assert sa["child_sas"][0]["packets_in"] > 100 and sb["child_sas"][0]["packets_in"] > 100
        assert not sb["child_sas"][0]["drops"].get("policy") and not sa["child_sas"][0]["drops"].get("policy")
    finally:
        for p in (a, b):
            topo.stop(p)
        if dump is not None:
            topo.stop(dump)
    if dump is None or not shutil.which("tshark"):
        return
    assert tshark(pcap, "icmp or tcp") == [], "traffic in the clear on the underlay"
    esp = tshark(pcap, "esp", fields=["ip.src", "udp.srcport", "ip.dst", "udp.dstport"])
    from_nat = [ln for ln in esp if ln.startswith(f"{NAT_PUB}\t")]
    to_nat = [ln for ln in esp if ln.split("\t")[2:3] == [NAT_PUB]]
    assert len(from_nat) > 100 and len(to_nat) > 100, esp[:5]
    assert all(ln.split("\t")[3] == "4500" for ln in from_nat), from_nat[:3]
