"""A controller plus N gateway nodes in network namespaces (used by the
e2e tests and by the demo).

    ns <p>-ctl  controller 198.51.100.254
    ns <p>-sw   bridge br0 (the underlay; captures are taken here)
    ns <p>-<node>  agent, underlay 198.51.100.<i>, lan0 = first address of its subnet
    ns <p>-<node>w0  workload (as a pod): second address of the subnet, default via the node
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from e2e.topology import Topology, sh, wait_until

REPO = Path(__file__).resolve().parent.parent
CONTROLLER_IP = "198.51.100.254"
CONTROLLER_PORT = 7443


def venv_bin(name: str) -> str:
    """Path of a console script next to the running interpreter."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; run scripts/setup.sh")
    return found


class Mesh:
    """Builds the topology, writes the inventory, starts controller and agents."""

    def __init__(self, nodes: dict[str, str], workdir: Path | None = None, keylog: bool = True):
        # nodes: name -> subnet, e.g. {"node-a": "10.1.0.0/24"}
        self.spec = nodes
        # a work dir we make ourselves holds keys, tokens and the CA: removed on exit unless keep_workdir
        self._own_workdir = workdir is None
        self.keep_workdir = False
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="meshsec-e2e-"))
        self.keylog_dir = self.workdir / "keylog" if keylog else None
        self.topo = Topology(workdir=self.workdir)
        self.agents: dict[str, subprocess.Popen] = {}
        self.controller: subprocess.Popen | None = None
        self.tokens = {name: secrets.token_urlsafe(16) for name in nodes}
        self.controller_args: list[str] = []  # extra meshsec-controller flags (e.g. a node source)
        self.controller_address = f"{CONTROLLER_IP}:{CONTROLLER_PORT}"  # agents' --controller (HA: several)
        self.agent_args: list[str] = []  # extra meshsec-agent flags

    # -- lifecycle ------------------------------------------------------
    def __enter__(self) -> "Mesh":
        self.topo.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.topo.__exit__(*exc)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def build(self) -> None:
        self.ctl = self.topo.add_host("ctl", CONTROLLER_IP)
        for i, (name, subnet) in enumerate(self.spec.items(), start=1):
            self.topo.add_gateway(name, f"198.51.100.{i}", subnet)
        if self.keylog_dir:
            self.keylog_dir.mkdir(parents=True, exist_ok=True)

    def node(self, name: str):
        return self.topo.nodes[name]

    def write_inventory(self) -> Path:
        lines = ["nodes:"]
        for name, subnet in self.spec.items():
            n = self.node(name)
            lines += [f"  - name: {name}", "    role: gateway",
                      f"    endpoints: [{n.underlay_ip}]", f"    subnets: [{subnet}]",
                      f"    join_token: {self.tokens[name]}"]
        path = self.workdir / "inventory.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_controller(self) -> None:
        inv = self.write_inventory()
        state = self.workdir / "controller"
        self.controller = self.topo.spawn(self.ctl.ns, [
            venv_bin("meshsec-controller"), "--inventory", str(inv), "--state-dir", str(state),
            "--listen", f"{CONTROLLER_IP}:{CONTROLLER_PORT}", "--server-name", CONTROLLER_IP, *self.controller_args],
            self.workdir / "controller.log")
        self.ca_pem = state / "ca.pem"
        wait_until(lambda: self.ca_pem.exists() and self._controller_alive(), 30, what="controller CA file")

    def _controller_alive(self) -> bool:
        if self.controller.poll() is not None:
            raise RuntimeError("controller exited:\n" + self.log("controller"))
        return True

    def start_agent(self, name: str) -> subprocess.Popen:
        n = self.node(name)
        tok = self.workdir / f"{name}.token"
        tok.write_text(self.tokens[name] + "\n")
        os.chmod(tok, 0o600)
        argv = [venv_bin("meshsec-agent"), "--controller", self.controller_address, *self.agent_args,
                "--controller-ca", str(self.ca_pem), "--name", name, "--join-token-file", str(tok),
                "--state-dir", str(self.workdir / f"state-{name}"),
                "--control-socket", str(self.socket(name)), "--local-address", n.underlay_ip, "-v"]
        if self.keylog_dir:
            argv += ["--keylog-dir", str(self.keylog_dir)]
        proc = self.topo.spawn(n.ns, argv, self.workdir / f"agent-{name}.log")
        self.agents[name] = proc
        return proc

    def start_all(self) -> None:
        self.start_controller()
        for name in self.spec:
            self.start_agent(name)

    def socket(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def log(self, what: str) -> str:
        path = self.workdir / (f"{what}.log" if what == "controller" else f"agent-{what}.log")
        try:
            return path.read_text()[-4000:]
        except FileNotFoundError:
            return "(no log)"

    # -- observation ----------------------------------------------------
    def status(self, name: str) -> dict | None:
        res = subprocess.run([venv_bin("meshsec"), "status", "--socket", str(self.socket(name)), "--json"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def child_sa_count(self, name: str) -> int:
        st = self.status(name)
        return len(st.get("child_sas", [])) if st else 0

    def wait_established(self, timeout: float = 60.0) -> None:
        """Every node has a CHILD_SA with every other node."""
        def ready():
            for name, proc in self.agents.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"agent {name} exited with {proc.returncode}:\n" + self.log(name))
            for name in self.spec:
                st = self.status(name)
                if not st:
                    return False
                peers = {c.get("peer") for c in st.get("child_sas", [])}
                if peers < (set(self.spec) - {name}):
                    return False
            return True
        try:
            wait_until(ready, timeout, interval=0.3, what="CHILD_SAs between all nodes")
        except TimeoutError:
            logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in self.spec)
            raise TimeoutError(f"mesh not established in {timeout}s\n{logs}\n--- controller\n{self.log('controller')}")

    def capture(self, path: Path, iface: str = "br0") -> subprocess.Popen:
        """tcpdump on the underlay bridge (in the switch namespace)."""
        proc = self.topo.spawn(self.topo.switch_ns, ["tcpdump", "-i", iface, "-U", "-n", "-s", "0", "-w", str(path)],
                               self.workdir / "tcpdump.log")
        wait_until(lambda: path.exists() and path.stat().st_size > 0, 10, interval=0.1, what="tcpdump to start")
        return proc

    def stop_capture(self, proc, path: Path, settle: float = 0.5, timeout: float = 20.0) -> None:
        """Stop tcpdump once ``path`` has stopped growing (on 2 busy cores
        tcpdump lags behind the kernel's buffer; stopping early loses packets)."""
        sizes: list[int] = []

        def settled() -> bool:
            sizes.append(path.stat().st_size)
            return len(sizes) >= 2 and sizes[-1] == sizes[-2]

        wait_until(settled, timeout, interval=settle, what="tcpdump to catch up")
        self.topo.stop(proc)
