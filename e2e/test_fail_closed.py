"""Fail closed: while an agent is down (kill -9, SIGTERM), traffic that policy says to PROTECT is
dropped on its node, never sent in the clear over the CNI's route; it resumes when the agent is back.

    ns ctl   meshsec-controller 198.51.100.254
                 |
    ======= br0 (ns sw, underlay 198.51.100.0/24, tcpdump here) =======
        |                                   |
    node-a .1   agent, TUN meshsec0     node-b .2   agent, TUN meshsec0
    main: 10.2.0.0/24 via .2 (the CNI)  main: 10.1.0.0/24 via .1 (the CNI, as flannel host-gw)
    lan0 10.1.0.1/24                    lan0 10.2.0.1/24
      |                                   |
    pod a 10.1.0.2  ping -> 10.2.0.2    pod b 10.2.0.2

A ping runs from pod a to pod b throughout. The agent on node-a is killed with SIGKILL, then
(after it is back) stopped with SIGTERM: each time the pings go unanswered while it is down, and
the underlay capture shows no ICMP and no pod address in a clear header. The agent comes back and
the pings are answered again. node-b removed from the inventory stays dropped on node-a (the
guard keeps its pod CIDR; the capture shows no cleartext ping). Last, the opt-out: with --fail-open a SIGTERM'd agent lets the ping
out in the clear, and a second capture shows it (so the first capture could have seen it).
Readiness (`meshsec ready`, the DaemonSet's probe): node-b is not ready while node-a is away after
a SIGTERM (which deleted their SAs), node-a is ready again once its CHILD_SA with node-b is up.
"""
from __future__ import annotations

import re
import secrets
import shutil
import subprocess

import pytest

from e2e.mesh import Mesh, venv_bin
from e2e.topology import sh, wait_until
from e2e.wire import tshark

pytestmark = pytest.mark.e2e

NODES = {"node-a": "10.1.0.0/24", "node-b": "10.2.0.0/24"}


class PingLog:
    """``ping -O`` running in a namespace: answered and unanswered sequence numbers from its log."""

    def __init__(self, mesh, src, dst, name):
        self.path = mesh.workdir / f"{name}.log"
        self.proc = mesh.topo.spawn(src.ns, ["ping", "-n", "-O", "-i", "0.2", "-W", "1", dst], self.path)

    def _lines(self):
        return self.path.read_text() if self.path.exists() else ""

    def answered(self):
        return [int(m) for m in re.findall(r"bytes from .* icmp_seq=(\d+)", self._lines())]

    def unanswered(self):
        return [int(m) for m in re.findall(r"no answer yet for icmp_seq=(\d+)", self._lines())]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark and tcpdump are needed (scripts/setup.sh installs them)")
    with Mesh(NODES, workdir=tmp_path_factory.mktemp("failclosed"), keylog=False) as m:
        m.build()
        # the CNI's routes between the nodes, in the main table: what traffic would fall back to
        sh("ip", "route", "add", "10.2.0.0/24", "via", m.node("node-b").underlay_ip, ns=m.node("node-a").ns)
        sh("ip", "route", "add", "10.1.0.0/24", "via", m.node("node-a").underlay_ip, ns=m.node("node-b").ns)
        m.start_all()
        m.wait_established(timeout=90)
        yield m


def ready(mesh, name, grace=600):
    """`meshsec ready` (the DaemonSet's readiness probe) on ``name``: (exit code, message)."""
    res = subprocess.run([venv_bin("meshsec"), "ready", "--socket", str(mesh.socket(name)), "--grace", str(grace)],
                         capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def down_then_up(mesh, ping, stop, peer_notices=False):
    """Stop node-a's agent with ``stop``, see pings go unanswered, start it, see them answered.
    ``peer_notices``: node-b is told (SIGTERM deletes the IKE_SA), so its readiness probe fails."""
    a = mesh.agents["node-a"]
    stop(a)
    assert a.poll() is not None
    before = len(ping.unanswered())
    wait_until(lambda: len(ping.unanswered()) >= before + 10, 30, what="10 unanswered pings while the agent is down")
    if peer_notices:
        code, msg = wait_until(lambda: (r := ready(mesh, "node-b")) and r[0] == 1 and r, 30,
                               what="node-b not ready while node-a is away")
        assert "no CHILD_SA yet with 1 peers: node-a" in msg, msg
    lost = ping.unanswered()[-1]
    mesh.start_agent("node-a")
    # the readiness probe passes once the CHILD_SA is there (grace far away)
    code, msg = wait_until(lambda: (r := ready(mesh, "node-a")) and r[0] == 0 and r, 90, what="node-a ready")
    assert "CHILD_SAs with all 1 expected peers" in msg, msg
    assert "node-b" in {c["peer"] for c in mesh.status("node-a")["child_sas"]}
    mesh.wait_established(timeout=90)
    wait_until(lambda: any(s > lost for s in ping.answered()), 30, what="pings answered again with the agent back")


def clear_pod_traffic(pcap):
    # echo request/reply, or a pod address in any clear header (also one quoted in an ICMP error);
    # ICMP port unreachable between the nodes' underlay addresses (IKE to a restarting agent) is fine
    return tshark(pcap, "icmp.type == 8 or icmp.type == 0 or ip.addr == 10.1.0.0/16 or ip.addr == 10.2.0.0/16")


def test_no_cleartext_while_the_agent_is_down_and_traffic_resumes(mesh):
    pcap = mesh.workdir / "underlay.pcap"
    cap = mesh.capture(pcap)
    src, dst = mesh.node("node-a").workloads[0], mesh.node("node-b").workloads[0]
    ping = PingLog(mesh, src, dst.ip, "ping")
    wait_until(lambda: len(ping.answered()) >= 5, 30, what="pings answered through the mesh")
    rules = sh("ip", "rule", "show", ns=mesh.node("node-a").ns).stdout
    assert "lookup 4302" in rules, rules

    down_then_up(mesh, ping, lambda p: (p.kill(), p.wait(10)))      # kill -9: nothing cleaned up
    down_then_up(mesh, ping, lambda p: mesh.topo.stop(p), peer_notices=True)  # SIGTERM: a rolling update
    guard = sh("ip", "route", "show", "table", "4302", ns=mesh.node("node-a").ns).stdout
    assert "blackhole 10.2.0.0/24" in guard, guard

    mesh.topo.stop(ping.proc)
    mesh.stop_capture(cap, pcap)
    assert tshark(pcap, "esp"), "no ESP on the underlay"
    assert clear_pod_traffic(pcap) == [], "pod traffic in the clear while the agent was down"
    assert "fail closed" in mesh.log("node-a")


def test_a_node_removed_from_the_inventory_stays_dropped(mesh):
    """node-b leaves the inventory: node-a removes its tunnel and TUN route, but the guard keeps its
    pod CIDR dropped instead of handing it to the CNI's route in the clear."""
    pcap = mesh.workdir / "removed.pcap"
    cap = mesh.capture(pcap)
    spec = mesh.spec
    a_ns = mesh.node("node-a").ns
    try:
        mesh.spec = {"node-a": spec["node-a"]}
        mesh.write_inventory()
        wait_until(lambda: "10.2.0.0/24 dev meshsec0" not in sh("ip", "route", "show", "table", "4301", ns=a_ns,
                                                                 check=False).stdout, 30,
                   what="node-a to drop node-b's route")
        assert "blackhole 10.2.0.0/24" in sh("ip", "route", "show", "table", "4302", ns=a_ns).stdout
        src, dst = mesh.node("node-a").workloads[0], mesh.node("node-b").workloads[0]
        ping = PingLog(mesh, src, dst.ip, "ping-removed")
        wait_until(lambda: len(ping.unanswered()) >= 5, 30, what="5 unanswered pings to the removed node")
        assert ping.answered() == []
        mesh.topo.stop(ping.proc)
    finally:
        # back in the inventory: its certificates were revoked with the removal, so a new join token
        mesh.spec = spec
        mesh.tokens["node-b"] = secrets.token_urlsafe(16)
        mesh.write_inventory()
        mesh.topo.stop(mesh.agents["node-b"])
        mesh.start_agent("node-b")
    mesh.stop_capture(cap, pcap)
    assert clear_pod_traffic(pcap) == [], "pod traffic to a removed node in the clear"
    mesh.wait_established(timeout=90)


def test_fail_open_opt_out_sends_in_the_clear(mesh):
    """The documented opt-out does what it says (and shows the capture above would have caught it)."""
    pcap = mesh.workdir / "failopen.pcap"
    mesh.topo.stop(mesh.agents["node-a"])
    mesh.agent_args = ["--fail-open"]
    try:
        mesh.start_agent("node-a")
        mesh.wait_established(timeout=90)
        assert "fail open" in mesh.log("node-a") or "--fail-open" in mesh.log("node-a")
        assert "lookup 4302" not in sh("ip", "rule", "show", ns=mesh.node("node-a").ns).stdout
        cap = mesh.capture(pcap)
        src, dst = mesh.node("node-a").workloads[0], mesh.node("node-b").workloads[0]
        mesh.topo.stop(mesh.agents["node-a"])
        ping = PingLog(mesh, src, dst.ip, "ping-open")
        wait_until(lambda: len(ping.unanswered()) + len(ping.answered()) >= 5, 30, what="5 pings sent")
        mesh.topo.stop(ping.proc)
        mesh.stop_capture(cap, pcap)
        assert tshark(pcap, "icmp.type == 8 and ip.src == 10.1.0.2"), "fail open: expected the ping in the clear"
    finally:
        mesh.agent_args = []
