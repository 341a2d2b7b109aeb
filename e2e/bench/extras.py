"""Datapath figures the anchors script does not take: 4 parallel TCP streams, transport
mode, nested SAs (RFC 4301 case 3), and the agents' memory under load.

    underlay 198.51.100.0/24 (bridge in its own namespace)
      h1 .11  <== ESP transport ==>  h2 .12                          transport (case 1)
      gw-a .1 -- lan0 10.1.0.1/24 -- aw0 10.1.0.2                      site A
      gw-b .2 -- lan0 10.2.0.1/24 -- bw0 10.2.0.2                      site B
      aw0 -> bw0 through gw-a <== ESP tunnel ==> gw-b                  tunnel (case 2), 1 and 4 streams
      aw0 <== ESP transport ==> bw0 inside the gateways' tunnel        nested (case 3)

Standalone agents with a PSK, ESP AES-128-GCM-16 in UDP 4500, default settings (offloads
on; ``--no-offload`` also measures each case with them off). iperf3 -t SECONDS per case;
RSS is the largest VmRSS of any agent sampled every 0.2 s during the iperf3 run.
Prints a Markdown table. A benchmark, not a test: run it on a quiet machine (root).

    .venv/bin/python e2e/bench/extras.py [--seconds 10] [--no-offload]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from e2e.topology import Topology, sh, wait_until  # noqa: E402

AGENT = str(ROOT / ".venv" / "bin" / "meshsec-agent")
PSK = "extras-benchmark-psk-not-secret"


def peer(name, endpoint, subnets=None, **kw):
    p = {"name": name, "endpoints": [endpoint], "esp_proposals": ["aes128gcm16"], **kw}
    if subnets is not None:
        p["subnets"] = subnets
    return p


class Bench:
    def __init__(self, work: Path, extra_args: list[str]):
        self.work = work
        self.extra = extra_args
        self.topo = Topology(workdir=work)
        t = self.topo
        self.h1 = t.add_host("h1", "198.51.100.11")
        self.h2 = t.add_host("h2", "198.51.100.12")
        self.gwa = t.add_gateway("gwa", "198.51.100.1", "10.1.0.0/24")
        self.gwb = t.add_gateway("gwb", "198.51.100.2", "10.2.0.0/24")
        self.aw0, self.bw0 = self.gwa.workloads[0], self.gwb.workloads[0]
        self.n = 0
        self.agents: list[subprocess.Popen] = []

    def agent(self, ns, name, local, peers, subnets=()):
        self.n += 1
        d = self.work / f"{name}-{self.n}"
        d.mkdir()
        cfg = {"name": name, "local_address": local, "subnets": list(subnets), "tun": {"name": "ms0"},
               "auth": {"psk": PSK}, "peers": peers}
        (d / "agent.yaml").write_text(json.dumps(cfg))
        p = self.topo.spawn(ns, [AGENT, "--config", str(d / "agent.yaml"), "--state-dir", str(d),
                                 "--control-socket", str(d / "agent.sock"), *self.extra], d / "agent.log")
        self.agents.append(p)
        return p

    def stop_all(self):
        for p in self.agents:
            self.topo.stop(p)
        self.agents = []


def _agent_pids(procs) -> list[int]:
    """The agents' own PIDs (children of `ip netns exec`, which execs: same PID)."""
    return [p.pid for p in procs if p.poll() is None]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def iperf(b: Bench, cli_ns, srv_ns, dst, seconds, streams=1) -> tuple[float, int, int]:
    """(Mbit/s received, retransmits, largest agent RSS in kB during the run)."""
    srv = b.topo.spawn(srv_ns, ["iperf3", "-s", "-1", "-p", "5201"], b.work / f"iperf3-s-{b.n}.log")
    wait_until(lambda: "5201" in sh("ss", "-ltn", ns=srv_ns).stdout, 10, interval=0.1, what="iperf3 server")
    peak, stop = [0], threading.Event()
    pids = _agent_pids(b.agents)

    def sample():
        while not stop.is_set():
            peak[0] = max([peak[0]] + [_rss_kb(p) for p in pids])
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = sh("iperf3", "-c", dst, "-p", "5201", "-t", str(seconds), "-O", "1", "-P", str(streams), "-J",
                 ns=cli_ns).stdout
    finally:
        stop.set()
        th.join()
        b.topo.stop(srv)
    j = json.loads(out)
    return (j["end"]["sum_received"]["bits_per_second"] / 1e6, j["end"]["sum_sent"].get("retransmits", 0), peak[0])


def ping_up(ns, dst, timeout=40):
    wait_until(lambda: subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", dst],
                                      capture_output=True).returncode == 0, timeout, interval=0.2,
               what=f"ping {dst} from {ns}")


def run(seconds: int, extra: list[str], label: str, work: Path) -> list[tuple]:
    rows = []
    with _ctx(work, extra) as b:
        # tunnel (case 2): gateways only
        b.agent(b.gwa.ns, "gw-a", "198.51.100.1", [peer("gw-b", "198.51.100.2", ["10.2.0.0/24"])], ["10.1.0.0/24"])
        b.agent(b.gwb.ns, "gw-b", "198.51.100.2", [peer("gw-a", "198.51.100.1", ["10.1.0.0/24"])], ["10.2.0.0/24"])
        ping_up(b.aw0.ns, b.bw0.ip)
        rows.append((label, "tunnel (case 2), 1 stream", *iperf(b, b.aw0.ns, b.bw0.ns, b.bw0.ip, seconds)))
        rows.append((label, "tunnel (case 2), 4 streams", *iperf(b, b.aw0.ns, b.bw0.ns, b.bw0.ip, seconds, 4)))
        # nested (case 3): hosts' transport SA inside the gateways' tunnel
        b.agent(b.aw0.ns, "aw0", b.aw0.ip, [peer("bw0", b.bw0.ip, mode="transport")])
        b.agent(b.bw0.ns, "bw0", b.bw0.ip, [peer("aw0", b.aw0.ip, mode="transport")])
        time.sleep(1.0)
        ping_up(b.aw0.ns, b.bw0.ip)
        rows.append((label, "nested (case 3), 1 stream", *iperf(b, b.aw0.ns, b.bw0.ns, b.bw0.ip, seconds)))
        b.stop_all()
        # transport (case 1): two hosts
        b.agent(b.h1.ns, "h1", "198.51.100.11", [peer("h2", "198.51.100.12", mode="transport")])
        b.agent(b.h2.ns, "h2", "198.51.100.12", [peer("h1", "198.51.100.11", mode="transport")])
        ping_up(b.h1.ns, "198.51.100.12")
        time.sleep(0.5)
        rows.append((label, "transport (case 1), 1 stream", *iperf(b, b.h1.ns, b.h2.ns, "198.51.100.12", seconds)))
        b.stop_all()
    return rows


class _ctx:
    def __init__(self, work, extra):
        self.b = Bench(work, extra)

    def __enter__(self):
        self.b.topo.__enter__()
        return self.b

    def __exit__(self, *exc):
        self.b.stop_all()
        self.b.topo.__exit__(*exc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--no-offload", action="store_true", help="also measure every case with --no-offload")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("extras.py: run as root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    import tempfile
    rows = []
    variants = [("offloads on", [])] + ([("--no-offload", ["--no-offload"])] if args.no_offload else [])
    for label, extra in variants:
        with tempfile.TemporaryDirectory(prefix="ms-extras-") as d:
            rows += run(args.seconds, extra, label, Path(d))
    print(f"\n## meshsec datapath extras — {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, "
          f"{os.uname().release}, {os.cpu_count()} CPUs, iperf3 {args.seconds}s\n")
    print("| agents | case | TCP Mbit/s | retransmits | agent RSS MB (max) |")
    print("|---|---|---:|---:|---:|")
    for label, case, mbps, retr, rss in rows:
        print(f"| {label} | {case} | {mbps:.0f} | {retr} | {rss / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
