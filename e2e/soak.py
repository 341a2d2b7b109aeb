"""Soak under faults: a mesh of agents in network namespaces carrying pings and
iperf3 between every pair while CHILD_SAs and IKE_SAs are rekeyed, agents are
killed, the controller restarts, an underlay link flaps, a NAT rebinds and the
inventory changes. Not part of the test suite (it runs for minutes); see
docs/soak.md for the figures of a run.

    sudo .venv/bin/python -m e2e.soak                      # 30 minutes, 6 nodes
    sudo .venv/bin/python -m e2e.soak --duration 300 --report soak.json

Topology (N nodes, default 6; the last one sits behind a NAT)::

    ns ctl  meshsec-controller 198.51.100.254
    ==== br0 (ns sw, underlay 198.51.100.0/24) ==========================
      |            |                     |
    node-a .1    node-b .2  ...        natf .N (masquerade) -- node-f 172.16.0.2
    lan0 10.1.0.1  10.2.0.1                                   lan0 10.N.0.1
      |            |                                            |
    node-aw0     node-bw0                                     node-fw0     workloads

Traffic: every ordered pair of workloads pings at 5 per second for the whole
run; iperf3 (TCP, 4 s, capped rate) visits the pairs one after another.
Events: every pair of agents has its CHILD_SAs rekeyed every 10 s and its
IKE_SA every 60 s (``--child-rekey-every``, ``--ike-rekey-every``; the pairs
spread evenly over the interval, the initiating side alternating; through the
agent's control socket, as ``meshsec rekey``); pairs with a node under a fault
are skipped until it has recovered. Faults, one at a time: kill -9 of a random agent every ``--kill-every`` seconds (then it is
started again), a controller restart, an underlay link flap (3 s down), a NAT
rebind (new external port range, conntrack flushed), and an inventory edit
(a node added, later removed; not a fault: no loss expected).

Report (printed, and as JSON with ``--report``) per pair: pings lost outside
fault windows (goal 0: rekeys must not lose packets), inside them; per fault
its recovery time (fault over -> every affected pair answers pings again);
SAs leaked at the end (CHILD_SAs or IKE_SAs beyond one per pair after the
rekeys settle, and CHILD_SAs whose peer no longer has the other half); agent
RSS and CPU as a time series (per minute) and per process; the machine's load
average; (SPI, sequence) reuse per pair as the peers see it: replay drops
counted by the receiving CHILD_SAs (live ones and those already removed:
``retired_child_sa_drops``), and an inbound SPI seen again on a later SA.
Needs root; cleans up its namespaces on exit (also on SIGTERM).
"""
from __future__ import annotations

import argparse
import heapq
import ipaddress
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from e2e.mesh import Mesh, venv_bin
from e2e.topology import Node, Workload, sh, wait_until

PING_INTERVAL = 0.2
NAT_INSIDE, NAT_GW = "172.16.0.2", "172.16.0.1"
GHOST = ("ghost", "198.51.100.200", "10.200.0.0/24")
_REPLY = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)")


# ---------------------------------------------------------------- topology
class SoakMesh(Mesh):
    """Mesh whose last node is behind a NAT namespace (endpoints: [] in the inventory:
    it initiates to everyone, nobody initiates to it), plus an inventory edit switch."""

    def __init__(self, nodes: dict[str, str], nat_node: str | None, **kw) -> None:
        super().__init__(nodes, keylog=False, **kw)
        self.nat_node = nat_node
        self.ghost = False
        self.nat_range = 0

    def build(self) -> None:
        self.ctl = self.topo.add_host("ctl", "198.51.100.254")
        for i, (name, subnet) in enumerate(self.spec.items(), start=1):
            if name == self.nat_node:
                self._natted_gateway(name, f"198.51.100.{i}", subnet)
            else:
                self.topo.add_gateway(name, f"198.51.100.{i}", subnet)

    def _natted_gateway(self, name: str, public_ip: str, subnet: str) -> None:
        topo = self.topo
        nat = topo.add_host(f"nat{name[-1]}", public_ip)
        self.nat_ns = nat.ns
        ns = topo._ns(name)
        topo._veth(nat.ns, "in0", ns, "ul0")
        sh("ip", "addr", "add", f"{NAT_GW}/30", "dev", "in0", ns=nat.ns)
        sh("ip", "addr", "add", f"{NAT_INSIDE}/30", "dev", "ul0", ns=ns)
        sh("ip", "route", "add", "default", "via", NAT_GW, ns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=nat.ns)
        sh("nft", "add table ip nat", ns=nat.ns)
        sh("nft", "add chain ip nat post { type nat hook postrouting priority 100 ; }", ns=nat.ns)
        self._nat_rule()
        net = ipaddress.ip_network(subnet)
        hosts = net.hosts()
        gw_ip = str(next(hosts))
        sh("ip", "link", "add", "lan0", "type", "bridge", ns=ns)
        sh("ip", "addr", "add", f"{gw_ip}/{net.prefixlen}", "dev", "lan0", ns=ns)
        sh("ip", "link", "set", "lan0", "up", ns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        node = Node(name=name, ns=ns, underlay_ip=NAT_INSIDE, subnet=net, gateway_ip=gw_ip,
                    underlay_ips=[NAT_INSIDE])
        wns = topo._ns(f"{name}w0")
        topo._veth(wns, "eth0", ns, "w0")
        sh("ip", "link", "set", "w0", "master", "lan0", ns=ns)
        ip = str(next(hosts))
        sh("ip", "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0", ns=wns)
        sh("ip", "route", "add", "default", "via", gw_ip, ns=wns)
        node.workloads.append(Workload(name=f"{name}w0", ns=wns, ip=ip, node=node))
        topo.nodes[name] = node

    def _nat_rule(self) -> None:
        lo = 20000 + 10000 * (self.nat_range % 2)
        sh("nft", "flush chain ip nat post", ns=self.nat_ns)
        sh("nft", f"add rule ip nat post oifname ul0 meta l4proto udp masquerade to :{lo}-{lo + 9999}", ns=self.nat_ns)
        sh("nft", "add rule ip nat post oifname ul0 masquerade", ns=self.nat_ns)

    def rebind_nat(self) -> None:
        """The NAT forgets its mappings and maps to another port range (a home router's
        reboot or a carrier-grade NAT timing out): the inside node's IKE and ESP appear
        from a new address:port."""
        self.nat_range += 1
        self._nat_rule()
        sh(sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()", ns=self.nat_ns)

    def write_inventory(self) -> Path:
        lines = ["nodes:"]
        for name, subnet in self.spec.items():
            n = self.node(name)
            ep = "[]" if name == self.nat_node else f"[{n.underlay_ip}]"
            lines += [f"  - name: {name}", "    role: gateway", f"    endpoints: {ep}", f"    subnets: [{subnet}]",
                      f"    join_token: {self.tokens[name]}"]
        if self.ghost:
            g, ep, sub = GHOST
            lines += [f"  - name: {g}", "    role: gateway", f"    endpoints: [{ep}]", f"    subnets: [{sub}]",
                      "    join_token: ghost-token-not-used"]
        path = self.workdir / "inventory.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------- observation
def control(sock: Path, req: dict, timeout: float = 5.0) -> dict | None:
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
        return json.loads(buf)
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def proc_stats(pid: int) -> tuple[float, float] | None:
    """(RSS MiB, CPU seconds) of a process from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    tck = os.sysconf("SC_CLK_TCK")
    return rss, (int(stat[11]) + int(stat[12])) / tck


@dataclass
class PingLog:
    src: str
    dst: str
    path: Path
    replies: dict[int, float] = field(default_factory=dict)  # icmp_seq -> wall time of the reply
    _pos: int = 0

    def read(self) -> None:
        try:
            with open(self.path) as fh:
                fh.seek(self._pos)
                data = fh.read()
                self._pos = fh.tell()
        except OSError:
            return
        for line in data.splitlines():
            m = _REPLY.match(line)
            if m:
                self.replies.setdefault(int(m.group(2)), float(m.group(1)))

    def answered_after(self, t: float) -> bool:
        self.read()
        return any(v > t for v in self.replies.values())

    def send_times(self) -> dict[int, float]:
        """Estimated send time of every sequence number up to the last answered one: the
        replies' times (minus nothing: RTTs are ~1 ms here), interpolated for the lost ones."""
        self.read()
        if not self.replies:
            return {}
        seqs = sorted(self.replies)
        out = {}
        for a, b in zip(seqs, seqs[1:]):
            ta, tb = self.replies[a], self.replies[b]
            for s in range(a, b):
                out[s] = ta + (tb - ta) * (s - a) / (b - a)
        out[seqs[-1]] = self.replies[seqs[-1]]
        first = seqs[0]
        for s in range(1, first):
            out[s] = self.replies[first] - (first - s) * PING_INTERVAL
        return out


# ---------------------------------------------------------------- the soak
class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        names = [f"node-{c}" for c in "abcdefghijklmnop"[:args.nodes]]
        spec = {n: f"10.{i}.0.0/24" for i, n in enumerate(names, start=1)}
        self.mesh = SoakMesh(spec, names[-1] if args.nat else None, workdir=args.workdir)
        self.names = names
        self.t0 = 0.0
        self.events: list[dict] = []
        self.faults: list[dict] = []
        self.samples: list[dict] = []
        self.iperf: list[dict] = []
        self.pings: dict[tuple[str, str], PingLog] = {}
        self.stop = threading.Event()
        self.busy = threading.Lock()  # one fault or event at a time
        self.fault_nodes: set[str] = set()  # nodes under a fault now: their pairs are not rekeyed
        self.spis_seen: dict[str, dict[str, str]] = {n: {} for n in names}  # node -> spi_in -> established
        self.spi_reuse: list[dict] = []
        self.replay_max: dict[tuple, int] = {}  # (node, pid, peer) -> replay drops (live + retired SAs)

    def now(self) -> float:
        return time.time() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.now():7.1f}s] {msg}", flush=True)

    # -- set-up -------------------------------------------------------------
    def start(self) -> None:
        m = self.mesh
        m.build()
        m.start_all()
        m.wait_established(timeout=180)
        self.t0 = time.time()
        self.log(f"mesh of {len(self.names)} agents established (NAT node: {m.nat_node or 'none'})")
        wl = {n: m.node(n).workloads[0] for n in self.names}
        for n, w in wl.items():
            m.topo.spawn(w.ns, ["iperf3", "-s", "-p", "5201"], m.workdir / f"iperf3-{n}.log")
        for a, b in itertools.permutations(self.names, 2):
            path = m.workdir / f"ping-{a}-{b}.log"
            m.topo.spawn(wl[a].ns, ["stdbuf", "-oL", "ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1", wl[b].ip],
                         path)
            self.pings[(a, b)] = PingLog(a, b, path)

    # -- background loops ---------------------------------------------------
    def sampler(self) -> None:
        while not self.stop.wait(self.args.sample_every):
            row = {"t": round(self.now(), 1), "agents": {}}
            try:
                row["load"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
            except (OSError, ValueError):
                pass
            for n in self.names:
                proc = self.mesh.agents.get(n)
                st = proc_stats(proc.pid) if proc and proc.poll() is None else None
                status = control(self.mesh.socket(n), {"cmd": "status"})
                a = {"pid": proc.pid if proc else None}
                if st:
                    a["rss_mb"], a["cpu_s"] = round(st[0], 1), round(st[1], 2)
                if status:
                    a["child_sas"] = len(status.get("child_sas", []))
                    a["ike_sas"] = len(status.get("ike_sas", []))
                    replay: dict[str, int] = {p: d.get("replay", 0)
                                              for p, d in (status.get("retired_child_sa_drops") or {}).items()}
                    for c in status.get("child_sas", []):
                        est = str(c.get("established"))
                        prev = self.spis_seen[n].get(c["spi_in"])
                        if prev is not None and prev != est:
                            self.spi_reuse.append({"node": n, "peer": c["peer"], "spi_in": c["spi_in"], "t": row["t"]})
                        self.spis_seen[n][c["spi_in"]] = est
                        replay[c["peer"]] = replay.get(c["peer"], 0) + c.get("drops", {}).get("replay", 0)
                    for p, v in replay.items():
                        key = (n, proc.pid if proc else None, p)
                        self.replay_max[key] = max(self.replay_max.get(key, 0), v)
                row["agents"][n] = a
            self.samples.append(row)

    def iperf_loop(self) -> None:
        wl = {n: self.mesh.node(n).workloads[0] for n in self.names}
        pairs = list(itertools.permutations(self.names, 2))
        for a, b in itertools.cycle(pairs):
            if self.stop.is_set():
                return
            t = self.now()
            row = {"src": a, "dst": b, "t": round(t, 1)}
            try:
                res = subprocess.run(["ip", "netns", "exec", wl[a].ns, "iperf3", "-c", wl[b].ip, "-p", "5201",
                                      "-t", str(self.args.iperf_seconds), "-b", self.args.iperf_rate, "-J",
                                      "--connect-timeout", "3000"],
                                     capture_output=True, text=True, timeout=self.args.iperf_seconds + 30)
            except subprocess.TimeoutExpired:  # a fault stalled it: note and go on
                row["error"] = "timed out"
                self.iperf.append(row)
                continue
            try:
                j = json.loads(res.stdout)
                row["mbit_s"] = round(j["end"]["sum_received"]["bits_per_second"] / 1e6, 1)
                row["retransmits"] = j["end"]["sum_sent"].get("retransmits")
            except (ValueError, KeyError):
                row["error"] = (res.stdout + res.stderr).strip()[-200:]
            self.iperf.append(row)

    def rekey_loop(self) -> None:
        """Every unordered pair: its CHILD_SAs rekeyed every ``--child-rekey-every`` s and its
        IKE_SA every ``--ike-rekey-every`` s, the pairs spread evenly over each interval (the IKE_SA
        rekeys half a slot after the CHILD_SA ones), the initiating side alternating. A pair with a
        node under a fault is skipped (counted) until the fault has recovered."""
        pairs = list(itertools.combinations(self.names, 2))
        every = {"child": self.args.child_rekey_every, "ike": self.args.ike_rekey_every}
        due: list = []
        for i in range(len(pairs)):
            for what, iv in every.items():
                off = (i + (0.5 if what == "ike" else 0.0)) * iv / len(pairs)
                heapq.heappush(due, (iv + off, what, i, 0))
        while not self.stop.is_set():
            at, what, i, k = due[0]
            wait = at - self.now()
            if wait > 0:
                self.stop.wait(min(wait, 0.5))
                continue
            heapq.heapreplace(due, (at + every[what], what, i, k + 1))
            a, b = pairs[i] if k % 2 == 0 else pairs[i][::-1]
            ev = {"t": round(self.now(), 1), "due": round(at, 1), "event": f"rekey_{what}", "node": a, "peer": b}
            if self.fault_nodes & {a, b}:
                ev.update(ok=False, skipped="fault")
            else:
                ans = control(self.mesh.socket(a), {"cmd": "rekey", "peer": b, "what": what}) or {}
                ev.update(ok=bool(ans.get("ok")), error=ans.get("error"))
            self.events.append(ev)

    # -- faults -------------------------------------------------------------
    def _affected(self, nodes) -> list[tuple[str, str]]:
        return [p for p in self.pings if p[0] in nodes or p[1] in nodes]

    def _recover(self, fault: dict, nodes, since: float) -> None:
        pairs = self._affected(nodes)
        try:
            wait_until(lambda: all(self.pings[p].answered_after(since) for p in pairs), self.args.recovery_timeout,
                       interval=0.2, what=f"recovery after {fault['fault']}")
            first = {p: min(v for v in self.pings[p].replies.values() if v > since) for p in pairs}
            fault["recovery_s"] = round(max(first.values()) - since, 2)
            # per pair: the slowest one is often a single pair (e.g. with the node behind the NAT)
            fault["recovery_by_pair"] = {f"{a}->{b}": round(t - since, 2) for (a, b), t in first.items()}
        except TimeoutError:
            fault["recovery_s"] = None
            fault["not_recovered"] = [f"{a}->{b}" for a, b in pairs if not self.pings[(a, b)].answered_after(since)]
        fault["end"] = round(self.now(), 1)
        self.fault_nodes = set()
        self.log(f"{fault['fault']} {fault.get('target', '')}: recovered in {fault['recovery_s']} s")

    def kill_agent(self) -> None:
        victim = self.rng.choice(self.names)
        proc = self.mesh.agents[victim]
        f = {"fault": "kill -9 agent", "target": victim, "start": round(self.now(), 1)}
        self.fault_nodes = {victim}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(2)
        self.mesh.start_agent(victim)
        f["restarted"] = round(self.now(), 1)
        self._recover(f, [victim], self.t0 + f["restarted"])
        self.faults.append(f)

    def restart_controller(self) -> None:
        f = {"fault": "controller restart", "start": round(self.now(), 1)}
        self.mesh.topo.stop(self.mesh.controller)
        time.sleep(2)
        self.mesh.start_controller()
        f["end"] = round(self.now(), 1)  # agents keep their tunnels: losses would show as lost pings
        f["recovery_s"] = 0.0
        self.log("controller restarted")
        self.faults.append(f)

    def flap_link(self) -> None:
        victim = self.rng.choice([n for n in self.names if n != self.mesh.nat_node])
        ns = self.mesh.node(victim).ns
        f = {"fault": "underlay link flap (3 s)", "target": victim, "start": round(self.now(), 1)}
        self.fault_nodes = {victim}
        sh("ip", "link", "set", "ul0", "down", ns=ns)
        time.sleep(3)
        sh("ip", "link", "set", "ul0", "up", ns=ns)
        self._recover(f, [victim], time.time())
        self.faults.append(f)

    def rebind_nat(self) -> None:
        victim = self.mesh.nat_node
        f = {"fault": "NAT rebind", "target": victim, "start": round(self.now(), 1)}
        self.fault_nodes = {victim}
        self.mesh.rebind_nat()
        self._recover(f, [victim], time.time())
        self.faults.append(f)

    def edit_inventory(self, add: bool) -> None:
        self.mesh.ghost = add
        self.mesh.write_inventory()
        self.events.append({"t": round(self.now(), 1), "event": "inventory " + ("node added" if add else "node removed")})
        self.log("inventory edit: " + ("ghost node added" if add else "ghost node removed"))

    def schedule(self) -> list[tuple[float, str, object]]:
        d = self.args.duration
        plan = [(d * 0.15, "inventory add", lambda: self.edit_inventory(True)),
                (d * 0.30, "controller restart", self.restart_controller),
                (d * 0.45, "link flap", self.flap_link),
                (d * 0.75, "inventory remove", lambda: self.edit_inventory(False))]
        if self.mesh.nat_node:
            plan.append((d * 0.60, "nat rebind", self.rebind_nat))
        t = self.args.kill_every
        while t < d - 40:
            plan.append((t, "kill", self.kill_agent))
            t += self.args.kill_every
        return sorted(plan, key=lambda p: p[0])

    # -- run ----------------------------------------------------------------
    def run(self) -> dict:
        self.start()
        threads = [threading.Thread(target=f, daemon=True) for f in (self.sampler, self.iperf_loop, self.rekey_loop)]
        for th in threads:
            th.start()
        for at, name, fn in self.schedule():
            while self.now() < at:
                time.sleep(0.2)
            self.log(f"fault/event: {name}")
            with self.busy:
                fn()
        while self.now() < self.args.duration:
            time.sleep(0.5)
        self.stop.set()
        for th in threads:
            th.join(timeout=self.args.iperf_seconds + 40)
        return self.report()

    def settle_sas(self) -> dict:
        """After the last rekeys have had time to finish: SAs per pair and orphans."""
        def counts():
            st = {n: control(self.mesh.socket(n), {"cmd": "status"}) or {} for n in self.names}
            extra_child, extra_ike, orphans = {}, {}, []
            for n, s in st.items():
                per_peer: dict[str, int] = {}
                for c in s.get("child_sas", []):
                    per_peer[c["peer"]] = per_peer.get(c["peer"], 0) + 1
                    other = st.get(c["peer"], {})
                    if other and not any(o["spi_in"] == c["spi_out"] for o in other.get("child_sas", [])):
                        orphans.append(f"{n}->{c['peer']} spi_out {c['spi_out']}")
                for p, k in per_peer.items():
                    if k > 1:
                        extra_child[f"{n}->{p}"] = k - 1
                ike_peer: dict[str, int] = {}
                for i in s.get("ike_sas", []):
                    if i.get("state") in (None, "ESTABLISHED"):
                        ike_peer[i.get("peer")] = ike_peer.get(i.get("peer"), 0) + 1
                for p, k in ike_peer.items():
                    if k > 1:
                        extra_ike[f"{n}->{p}"] = k - 1
            return {"extra_child_sas": extra_child, "extra_ike_sas": extra_ike, "orphan_child_sas": orphans}

        deadline = time.time() + 40
        res = counts()
        while time.time() < deadline and (res["extra_child_sas"] or res["extra_ike_sas"] or res["orphan_child_sas"]):
            time.sleep(2)
            res = counts()
        return res

    def series(self, step: float = 60.0) -> list[dict]:
        """Per ``step`` seconds: each agent's RSS (MB, at the end of the step) and CPU (% of one
        core over the step, same process only; a restart starts a new process) and the load
        average (1 min) of the machine."""
        out, t_next = [], step
        last: dict[str, tuple] = {}  # node -> (t, cpu_s, pid) at the previous row (or its first sample)
        for row in self.samples:
            for n, a in row["agents"].items():
                if "rss_mb" in a and (n not in last or last[n][2] != a["pid"]):
                    last[n] = (row["t"], a["cpu_s"], a["pid"])  # a new process: its CPU counts from here
            if row["t"] < t_next and row is not self.samples[-1]:
                continue
            r = {"t": round(row["t"]), "load1": (row.get("load") or [None])[0], "agents": {}}
            for n, a in row["agents"].items():
                if "rss_mb" not in a:
                    r["agents"][n] = None
                    continue
                prev = last.get(n)
                cpu = (round(100 * (a["cpu_s"] - prev[1]) / (row["t"] - prev[0]), 1)
                       if prev and prev[2] == a["pid"] and row["t"] > prev[0] else None)
                r["agents"][n] = {"rss_mb": a["rss_mb"], "cpu_pct": cpu, "pid": a["pid"]}
                last[n] = (row["t"], a["cpu_s"], a["pid"])
            out.append(r)
            while t_next <= row["t"]:
                t_next += step
        return out

    def report(self) -> dict:
        leaks = self.settle_sas()
        windows = [(self.t0 + f["start"] - 1, self.t0 + f.get("end", f["start"]) + 1) for f in self.faults]
        per_pair = {}
        for (a, b), pl in self.pings.items():
            sent = pl.send_times()
            lost_out, lost_in = [], 0
            for s, ts in sent.items():
                if s in pl.replies:
                    continue
                if any(lo <= ts <= hi for lo, hi in windows):
                    lost_in += 1
                else:
                    lost_out.append(round(ts - self.t0, 1))
            # (SPI, sequence) reuse as b sees a's packets: b's replay drops for a, b's inbound SPIs reused
            replay = sum(v for (n, _pid, p), v in self.replay_max.items() if n == b and p == a)
            reused = sum(1 for x in self.spi_reuse if x["node"] == b and x.get("peer") == a)
            rk = [e for e in self.events if e["event"].startswith("rekey") and {e["node"], e["peer"]} == {a, b}]
            per_pair[f"{a}->{b}"] = {"sent": len(sent), "lost_outside_faults": len(lost_out),
                                     "lost_in_faults": lost_in, "lost_outside_at_s": lost_out,
                                     "replay_drops_at_dst": replay, "spi_reused_at_dst": reused,
                                     "child_rekeys": sum(1 for e in rk if e["event"] == "rekey_child" and e["ok"]),
                                     "ike_rekeys": sum(1 for e in rk if e["event"] == "rekey_ike" and e["ok"])}
        growth = {}
        for n in self.names:
            rows = [(s["t"], s["agents"][n]) for s in self.samples if n in s["agents"] and "rss_mb" in s["agents"][n]]
            by_pid: dict[int, list] = {}
            for t, a in rows:
                by_pid.setdefault(a["pid"], []).append((t, a["rss_mb"], a["cpu_s"]))
            growth[n] = [{"pid": pid, "from_t": r[0][0], "to_t": r[-1][0], "rss_mb_first": r[0][1],
                          "rss_mb_max": max(x[1] for x in r), "rss_mb_last": r[-1][1],
                          "cpu_pct": round(100 * (r[-1][2] - r[0][2]) / max(1e-9, r[-1][0] - r[0][0]), 1)}
                         for pid, r in by_pid.items()]
        rekeys = [e for e in self.events if e["event"].startswith("rekey")]
        return {
            "t0_unix": round(self.t0, 3),  # times in this report are seconds after this
            "series": self.series(),
            "duration_s": self.args.duration, "nodes": self.names, "nat_node": self.mesh.nat_node,
            "pairs": per_pair,
            "lost_outside_faults_total": sum(p["lost_outside_faults"] for p in per_pair.values()),
            "pings_sent_total": sum(p["sent"] for p in per_pair.values()),
            "faults": self.faults,
            "rekeys": {"child_started": sum(1 for e in rekeys if e["event"] == "rekey_child" and e["ok"]),
                       "ike_started": sum(1 for e in rekeys if e["event"] == "rekey_ike" and e["ok"]),
                       "child_every_s": self.args.child_rekey_every, "ike_every_s": self.args.ike_rekey_every,
                       "pairs": len(self.names) * (len(self.names) - 1) // 2,
                       "skipped_fault": sum(1 for e in rekeys if e.get("skipped")),
                       "late_max_s": round(max((e["t"] - e["due"] for e in rekeys), default=0.0), 1),
                       "refused": [e for e in rekeys if not e["ok"] and not e.get("skipped")]},
            "events": self.events,
            "sas_leaked": leaks,
            "replay_drops_total": sum(self.replay_max.values()),
            "replay_drops": {f"{n} (pid {pid}) <- {p}": v for (n, pid, p), v in self.replay_max.items() if v},
            "spi_reuse": self.spi_reuse,
            "agents": growth,
            "iperf3": self.iperf,
            "samples": self.samples,
        }


def print_summary(r: dict) -> None:
    print(f"\n=== soak: {len(r['nodes'])} agents, {r['duration_s']} s, NAT node {r['nat_node']}")
    print(f"pings sent {r['pings_sent_total']}, lost outside fault windows {r['lost_outside_faults_total']}")
    rk = r["rekeys"]
    print(f"rekeys started ({rk['pairs']} pairs; CHILD_SAs every {rk['child_every_s']} s, IKE_SA every "
          f"{rk['ike_every_s']} s per pair): CHILD_SA {rk['child_started']}, IKE_SA {rk['ike_started']}, "
          f"refused {len(rk['refused'])}, skipped during faults {rk['skipped_fault']}, latest {rk['late_max_s']} s late")
    for e in rk["refused"][:10]:
        print(f"  refused at {e['t']} s: {e['node']} -> {e['peer']} {e['event']}: {e.get('error')}")
    for f in r["faults"]:
        by = f.get("recovery_by_pair") or {}
        nat = {k: v for k, v in by.items() if r["nat_node"] and r["nat_node"] in k and f.get("target") != r["nat_node"]}
        rest = sorted(v for k, v in by.items() if k not in nat)
        print(f"fault {f['fault']:26} {f.get('target', ''):8} at {f['start']:7.1f} s: recovery "
              f"{f.get('recovery_s')} s" + (f" NOT RECOVERED {f['not_recovered']}" if f.get("not_recovered") else "")
              + (f" (pairs with the NAT node: {max(nat.values())} s; the other {len(rest)} pairs: median "
                 f"{rest[len(rest) // 2]} s, max {rest[-1]} s)" if nat and rest else ""))
    print("per pair (pings lost outside / inside fault windows; CHILD_SA / IKE_SA rekeys of the pair; "
          "replay drops and reused inbound SPIs at the destination):")
    for k, v in sorted(r["pairs"].items()):
        print(f"  {k:16} sent {v['sent']:6} lost {v['lost_outside_faults']:4} / {v['lost_in_faults']:4}  rekeys "
              f"{v['child_rekeys']:4} / {v['ike_rekeys']:3}  replay {v['replay_drops_at_dst']} spi reuse "
              f"{v['spi_reused_at_dst']}"
              + (f"  (outside at {v['lost_outside_at_s']} s)" if v["lost_outside_at_s"] else ""))
    print(f"SAs leaked: {r['sas_leaked']}")
    print(f"replay drops seen by peers: {r['replay_drops_total']} {r['replay_drops'] or ''}; "
          f"inbound SPI reused: {len(r['spi_reuse'])}")
    for n, rows in r["agents"].items():
        for a in rows:
            print(f"  {n} pid {a['pid']}: {a['from_t']:.0f}-{a['to_t']:.0f} s RSS {a['rss_mb_first']} -> "
                  f"{a['rss_mb_last']} MB (max {a['rss_mb_max']}), CPU {a['cpu_pct']} %")
    names = r["nodes"]
    print("RSS MB / CPU % of one core per minute (load average 1 min):")
    print(f"  {'t s':>6} {'load':>5} " + " ".join(f"{n:>13}" for n in names))
    for row in r["series"]:
        cells = []
        for n in names:
            a = row["agents"].get(n)
            cells.append(f"{a['rss_mb']:6.1f}/{a['cpu_pct'] if a['cpu_pct'] is not None else '-':>5}" if a else "-")
        print(f"  {row['t']:>6} {row['load1'] if row['load1'] is not None else '-':>5} "
              + " ".join(f"{c:>13}" for c in cells))
    ok = [x for x in r["iperf3"] if "mbit_s" in x]
    if ok:
        print(f"iperf3: {len(ok)} runs ok, {len(r['iperf3']) - len(ok)} failed, median "
              f"{sorted(x['mbit_s'] for x in ok)[len(ok) // 2]} Mbit/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--duration", type=float, default=1800, help="seconds of soak after set-up (default 1800)")
    ap.add_argument("--nodes", type=int, default=6, help="agents (default 6, at least 3)")
    ap.add_argument("--no-nat", dest="nat", action="store_false", help="no node behind a NAT (no rebind)")
    ap.add_argument("--kill-every", type=float, default=180, help="seconds between kill -9 of an agent")
    ap.add_argument("--iperf-seconds", type=int, default=4)
    ap.add_argument("--iperf-rate", default="50M", help="iperf3 -b (default 50M: the pings must still get through)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS/CPU/SA samples")
    ap.add_argument("--child-rekey-every", type=float, default=10.0,
                    help="seconds between CHILD_SA rekeys of each pair (default 10)")
    ap.add_argument("--ike-rekey-every", type=float, default=60.0,
                    help="seconds between IKE_SA rekeys of each pair (default 60)")
    ap.add_argument("--recovery-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report", type=Path, help="write the full report as JSON here")
    ap.add_argument("--workdir", type=Path, help="keep keys, logs (agents, controller, pings) here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    if args.nodes < 3:
        ap.error("--nodes: at least 3")
    venv_bin("meshsec-agent")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args)
    with soak.mesh:
        try:
            r = soak.run()
        except BaseException:
            for n in soak.names:
                print(f"--- {n}\n{soak.mesh.log(n)[-1500:]}", file=sys.stderr)
            raise
    print_summary(r)
    if args.report:
        args.report.write_text(json.dumps(r, indent=1))
    bad = (r["lost_outside_faults_total"] or any(r["sas_leaked"].values()) or r["replay_drops_total"]
           or r["spi_reuse"] or any(f.get("recovery_s") is None for f in r["faults"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
