"""The agent's controller connections never ride the mesh: kube-proxy rewrites the Service address
to a pod address after routing, so the agent forwards its gRPC connections through sockets that
carry its fwmark (agent.controller_path), which the ``fwmark lookup main`` rule sends via the main
table, past the TUN routes and the fail-closed guard.

The kernel test builds, in namespaces it creates and deletes:

    ns msct-<pid>-n (node)  veth nd0 192.168.78.1/24 -- ns msct-<pid>-p (controller pod) 10.244.2.7/32
        nft: DNAT 10.96.0.10:7443 -> 10.244.2.7:7443 (kube-proxy's rule for the Service)
        main: 10.244.2.0/24 via 192.168.78.2 (the CNI); ip rules pref 4300 fwmark 0x4301 lookup main,
        pref 4300 to 10.96.0.10 lookup main (the agent's bypass of the Service address),
        pref 4302 lookup 4302 with blackhole 10.244.2.0/24 (the fail-closed guard, agent down)
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from agent.controller_path import SO_MARK, MarkedForwarder, forward_controller

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def run():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                while data := c.recv(65536):
                    c.sendall(data.upper())
    threading.Thread(target=run, daemon=True).start()
    return srv


def test_forwarder_copies_both_ways_and_closes():
    srv = echo_server()
    fwd = MarkedForwarder(f"127.0.0.1:{srv.getsockname()[1]}", 0,
                          connect=lambda: socket.create_connection(srv.getsockname())).start()
    try:
        host, port = fwd.local.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(b"x" * 200000)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := c.recv(65536):
                got += data
        assert got == b"X" * 200000 and fwd.connections == 1
    finally:
        fwd.close()
        srv.close()


def test_unreachable_controller_is_logged_and_the_client_closed(caplog):
    fwd = MarkedForwarder("127.0.0.1:1", 0x4301, connect=lambda: (_ for _ in ()).throw(ConnectionRefusedError(
        111, "Connection refused"))).start()
    try:
        host, port = fwd.local.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as c:
            assert c.recv(10) == b""
        assert fwd.errors == 1 and "controller 127.0.0.1:1: cannot connect (marked 0x4301)" in caplog.text
    finally:
        fwd.close()


def test_forward_controller_maps_every_replica_and_its_watch_port():
    addr, watch, fwds = forward_controller("198.51.100.7:7443, ctl.example:7443", ["198.51.100.7:7444",
                                                                                   "ctl.example:7444"], 0x4301)
    try:
        assert len(addr.split(",")) == 2 and len(watch.split(",")) == 2
        assert all(a.startswith("127.0.0.1:") for a in addr.split(",") + watch.split(","))
        assert [f.target for f in fwds] == ["198.51.100.7:7443", "ctl.example:7443", "198.51.100.7:7444",
                                            "ctl.example:7444"]
    finally:
        for f in fwds:
            f.close()


_CLIENT = r"""
import socket, sys
from agent.controller_path import MarkedForwarder
def plain():
    try:
        s = socket.create_connection(("10.96.0.10", 7443), timeout=3)
        s.sendall(b"ping"); return s.recv(10).decode() or "eof"
    except OSError as e:
        return f"error {e.errno}"
fwd = MarkedForwarder("10.96.0.10:7443", 0x4301).start()
def marked():
    h, p = fwd.local.split(":")
    s = socket.create_connection((h, int(p)), timeout=3)
    s.sendall(b"ping"); return s.recv(10).decode() or "eof"
print(plain(), "|", marked(), flush=True)
"""

_SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.244.2.7", 7443)); s.listen(4); print("UP", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.recv(10).upper()); c.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
                    reason="needs root, iproute2 and nft")
def test_service_dnat_to_a_pod_behind_the_guard_reaches_the_controller_only_marked():
    node, pod = f"msct-{os.getpid()}-n", f"msct-{os.getpid()}-p"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True)  # noqa: E731
    srv = None
    try:
        for ns in (node, pod):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", node, "link", "add", "nd0", "type", "veth", "peer", "name", "pd0", "netns", pod)
        run("ip", "-n", node, "addr", "add", "192.168.78.1/24", "dev", "nd0")
        run("ip", "-n", node, "link", "set", "nd0", "up")
        run("ip", "-n", pod, "addr", "add", "192.168.78.2/24", "dev", "pd0")
        run("ip", "-n", pod, "addr", "add", "10.244.2.7/32", "dev", "lo")
        run("ip", "-n", pod, "link", "set", "pd0", "up")
        run("ip", "-n", pod, "route", "add", "default", "via", "192.168.78.1")
        run("ip", "-n", node, "route", "add", "10.244.2.0/24", "via", "192.168.78.2")
        run("ip", "-n", node, "route", "add", "10.96.0.0/12", "dev", "nd0")  # the service CIDR, as on a node
        run("ip", "-n", node, "rule", "add", "pref", "4300", "fwmark", "0x4301", "lookup", "main")
        run("ip", "-n", node, "rule", "add", "pref", "4300", "to", "10.96.0.10/32", "lookup", "main")
        run("ip", "-n", node, "rule", "add", "pref", "4302", "lookup", "4302")
        run("ip", "-n", node, "route", "add", "blackhole", "10.244.2.0/24", "table", "4302")
        nft = ("ip", "netns", "exec", node, "nft")
        run(*nft, "add", "table", "ip", "kp")
        run(*nft, "add", "chain", "ip", "kp", "out", "{ type nat hook output priority -100; }")
        run(*nft, "add", "rule", "ip", "kp", "out", "ip", "daddr", "10.96.0.10", "tcp", "dport", "7443",
            "dnat", "to", "10.244.2.7:7443")
        srv = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c", _SERVER], stdout=subprocess.PIPE,
                               text=True)
        assert srv.stdout.readline().strip() == "UP"
        res = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", _CLIENT], capture_output=True,
                             text=True, cwd=ROOT, timeout=30)
        assert res.returncode == 0, res.stderr
        plain, marked = (x.strip() for x in res.stdout.split("|"))
        # unmarked: the bypass rule matched the ClusterIP, but after DNAT the pod address hits the guard
        assert plain.startswith("error"), plain
        assert marked == "PING"
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        for ns in (node, pod):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_marked_socket_carries_the_mark():
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs CAP_NET_ADMIN")
    srv = echo_server()
    fwd = MarkedForwarder(f"127.0.0.1:{srv.getsockname()[1]}", 0x4301)
    try:
        s = fwd._marked_connection()
        assert s.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x4301
        s.close()
    finally:
        fwd.close()
        srv.close()
