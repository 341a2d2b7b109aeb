"""Network-namespace topologies for end-to-end tests and the demo.

Everything lives in namespaces this module creates: an underlay switch
(a bridge in its own namespace), one namespace per node, one per workload.
Underlay addresses come from 198.51.100.0/24 (TEST-NET-2); workload subnets
are private ranges that exist only inside the namespaces. Nothing has a
default route towards the host, so no packet can leave.

IPv6 is disabled in every namespace unless ``Topology(ipv6=True)``: then
underlay addresses may also come from 2001:db8::/32 (the documentation
prefix, /64 on the bridge) and subnets from ULA fd00::/8; duplicate address
detection is off so addresses are usable at once.

Use as a context manager; namespaces and processes started through it are
removed on exit, also on SIGTERM/SIGINT.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
UNDERLAY6 = ipaddress.ip_network("2001:db8::/32")  # RFC 3849 documentation prefix
UNDERLAY6_PREFIXLEN = 64
ULA = ipaddress.ip_network("fd00::/8")


class TopologyError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, ns: str | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a command (optionally inside namespace ``ns``); raise TopologyError naming it on failure."""
    cmd = list(args)
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    res = subprocess.run(cmd, capture_output=capture, text=True)
    if check and res.returncode != 0:
        raise TopologyError(f"command failed ({res.returncode}): {shlex.join(cmd)}\n{res.stderr or ''}{res.stdout or ''}")
    return res


@dataclass
class Node:
    name: str
    ns: str
    underlay_ip: str
    subnet: ipaddress.IPv4Network | None = None
    gateway_ip: str | None = None  # the node's own address inside its subnet
    workloads: list["Workload"] = field(default_factory=list)
    underlay_ips: list[str] = field(default_factory=list)  # every underlay address (first: underlay_ip)
    subnet6: ipaddress.IPv6Network | None = None  # ipv6 topologies: a second (IPv6) subnet
    gateway_ip6: str | None = None


@dataclass
class Workload:
    name: str
    ns: str
    ip: str
    node: Node
    ip6: str | None = None


class Topology:
    """Builder for namespaces joined by a bridged underlay.

    Names are prefixed with ``prefix`` (unique per run) so parallel or
    leftover runs never collide; ``cleanup()`` deletes every namespace it made.
    """

    _counter = itertools.count()

    def __init__(self, prefix: str | None = None, workdir: Path | None = None, ipv6: bool = False):
        self.ipv6 = ipv6
        self.prefix = prefix or f"ms{os.getpid() % 100000}{next(self._counter)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, Node] = {}
        self.workdir = workdir
        self.switch_ns = self._ns("sw")
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch_ns)
        sh("ip", "link", "set", "br0", "up", ns=self.switch_ns)
        self._veth_ids = itertools.count()

    # -- building -------------------------------------------------------
    def _ns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        knobs = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        if self.ipv6:  # no DAD (addresses usable at once), no router solicitations
            knobs = ("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
                     "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                     "net.ipv6.conf.default.router_solicitations=0")
        for knob in knobs:
            sh("sysctl", "-qw", knob, ns=name, check=False)
        return name

    def _underlay_cidr(self, ip: str) -> str:
        a = ipaddress.ip_address(ip)
        if a.version == 6:
            if not self.ipv6 or a not in UNDERLAY6:
                raise TopologyError(f"underlay address {ip} is not allowed: IPv6 underlays need "
                                    f"Topology(ipv6=True) and an address in {UNDERLAY6}")
            return f"{ip}/{UNDERLAY6_PREFIXLEN}"
        if a not in UNDERLAY:
            raise TopologyError(f"underlay address {ip} is outside {UNDERLAY}")
        return f"{ip}/{UNDERLAY.prefixlen}"

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        tmp = f"v{os.getpid() % 10000}x{next(self._veth_ids)}"
        sh("ip", "link", "add", tmp + "a", "type", "veth", "peer", "name", tmp + "b")
        sh("ip", "link", "set", tmp + "a", "netns", ns_a, "name", name_a)
        sh("ip", "link", "set", tmp + "b", "netns", ns_b, "name", name_b)
        sh("ip", "link", "set", name_a, "up", ns=ns_a)
        sh("ip", "link", "set", name_b, "up", ns=ns_b)

    def add_host(self, name: str, underlay_ip: str, *more_underlay: str) -> Node:
        """A namespace on the underlay bridge with interface ``ul0``; ``more_underlay``: further
        addresses on ``ul0`` (e.g. an IPv6 one next to the IPv4 one, with ``ipv6=True``)."""
        cidrs = [self._underlay_cidr(ip) for ip in (underlay_ip, *more_underlay)]
        ns = self._ns(name)
        port = f"p{len(self.nodes)}"
        self._veth(ns, "ul0", self.switch_ns, port)
        sh("ip", "link", "set", port, "master", "br0", ns=self.switch_ns)
        for cidr in cidrs:
            sh("ip", "addr", "add", cidr, "dev", "ul0", *(["nodad"] if ":" in cidr else []), ns=ns)
        node = Node(name=name, ns=ns, underlay_ip=underlay_ip, underlay_ips=[underlay_ip, *more_underlay])
        self.nodes[name] = node
        return node

    def add_gateway(self, name: str, underlay_ip: str, subnet: str, workloads: int = 1, *,
                    more_underlay: tuple[str, ...] = (), subnet6: str | None = None) -> Node:
        """A node with a subnet behind it: a bridge ``lan0`` holding the
        node's first address and ``workloads`` workload namespaces (as pods
        on a bridge CNI), each with a default route via the node.
        ``subnet6`` (``ipv6=True``, inside fd00::/8): a second, IPv6 subnet on the same
        ``lan0``, with an IPv6 default route in each workload. IPv6 forwarding is left
        off: the agent turns it on for a gateway with IPv6 subnets."""
        node = self.add_host(name, underlay_ip, *more_underlay)
        net = ipaddress.ip_network(subnet)
        hosts = net.hosts()
        node.subnet = net
        node.gateway_ip = str(next(hosts))
        sh("ip", "link", "add", "lan0", "type", "bridge", ns=node.ns)
        sh("ip", "addr", "add", f"{node.gateway_ip}/{net.prefixlen}", "dev", "lan0", ns=node.ns)
        sh("ip", "link", "set", "lan0", "up", ns=node.ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=node.ns)
        for i in range(workloads):
            wname = f"{name}w{i}"
            wns = self._ns(wname)
            self._veth(wns, "eth0", node.ns, f"w{i}")
            sh("ip", "link", "set", f"w{i}", "master", "lan0", ns=node.ns)
            ip = str(next(hosts))
            sh("ip", "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0", ns=wns)
            sh("ip", "route", "add", "default", "via", node.gateway_ip, ns=wns)
            node.workloads.append(Workload(name=wname, ns=wns, ip=ip, node=node))
        if subnet6 is not None:
            net6 = ipaddress.ip_network(subnet6)
            if not self.ipv6 or net6.version != 6 or not net6.subnet_of(ULA):
                raise TopologyError(f"subnet6 {subnet6}: needs Topology(ipv6=True) and a prefix inside {ULA}")
            hosts6 = net6.hosts()
            node.subnet6, node.gateway_ip6 = net6, str(next(hosts6))
            sh("ip", "addr", "add", f"{node.gateway_ip6}/{net6.prefixlen}", "dev", "lan0", "nodad", ns=node.ns)
            for w in node.workloads:
                w.ip6 = str(next(hosts6))
                sh("ip", "addr", "add", f"{w.ip6}/{net6.prefixlen}", "dev", "eth0", "nodad", ns=w.ns)
                sh("ip", "-6", "route", "add", "default", "via", node.gateway_ip6, ns=w.ns)
        return node

    # -- processes ------------------------------------------------------
    def spawn(self, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` with output to ``log``; stopped by cleanup()."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        fh = open(log, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                env=full_env, start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.stop(proc, timeout=5)
            except Exception:  # cleanup must go on
                pass
        self.procs.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    def __enter__(self) -> "Topology":
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.cleanup()
        sys.exit(128 + signum)

    def __exit__(self, *exc) -> None:
        self.cleanup()
        for s, h in self._old.items():
            signal.signal(s, h)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def ping(ns: str, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
    res = sh("ping", "-n", "-q", "-c", str(count), "-W", str(timeout), "-i", "0.2", dst, ns=ns, check=False)
    return res.returncode == 0
