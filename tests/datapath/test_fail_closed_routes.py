"""Fail closed in the kernel: RouteManager's guard table (blackhole routes for every prefix routed
into the TUN, ``ip rule`` pref 4302) outlives the agent process, is adopted by the next one, and
goes only for BYPASS policy, a ``--bypass`` prefix, the node's own subnets, or ``--uninstall``.

    netns msfc-<pid>: lo up, veth pair msfcd/msfce (both ends inside; nothing leaves), a CNI-like
    route 10.2.0.0/24 via msfcd in the main table; each step runs in a fresh Python process
    (its TUN device msfc0 goes with it, as when an agent exits)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
                                reason="needs root, iproute2 and /dev/net/tun")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# argv: JSON {"routes": [...], "keep": [...], "cleartext": [...], "bypass": [...], "own": [...],
#             "guard": bool, "exit": "remove_all" | "kill"}
_STEP = r"""
import ipaddress, json, logging, os, signal, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from agent.datapath.tun import TunDevice
from agent.datapath.routes import RouteManager
a = json.loads(sys.argv[1])
N = ipaddress.ip_network
tun = TunDevice("msfc0", 1400)
rm = RouteManager(tun.name, tuple(N(o) for o in a.get("own", [])), table=4301, mark=0x4301, rule_priority=4300,
                  bypass=a.get("bypass", []), guard_table=4302 if a.get("guard", True) else None)
adopted = sorted(map(str, rm.guarded))
rm.sync({N(r) for r in a.get("routes", [])}, keep_out=a.get("keep", []),
        cleartext={N(c) for c in a.get("cleartext", [])})
print(json.dumps({"adopted": adopted, "guarded": sorted(map(str, rm.guarded)), "carve": rm.carve_outs}), flush=True)
if a.get("exit") == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
rm.remove_all()
rm.close()
tun.close()
"""


class Ns:
    def __init__(self):
        self.name = f"msfc-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "msfcd", "type", "veth", "peer", "name", "msfce")
        for dev in ("msfcd", "msfce"):
            self.ip("link", "set", dev, "up")
        self.ip("addr", "add", "192.168.77.1/24", "dev", "msfcd")
        self.ip("route", "add", "10.2.0.0/24", "via", "192.168.77.2", "dev", "msfcd")  # the CNI's route

    def ip(self, *args, check=True):
        return subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True, check=check)

    def step(self, **kw):
        res = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", _STEP, json.dumps(kw)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        if kw.get("exit") == "kill":
            assert res.returncode == -signal.SIGKILL, res.stderr
        else:
            assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.splitlines()[0]), res.stderr

    def get(self, dst):
        """(route, error) of the kernel's route lookup for dst."""
        res = self.ip("route", "get", dst, check=False)
        return res.stdout.strip(), res.stderr.strip()

    def guard(self):
        return self.ip("route", "show", "table", "4302", check=False).stdout

    def rules(self):
        return self.ip("-4", "rule", "show").stdout

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name])


@pytest.fixture
def ns():
    n = Ns()
    try:
        yield n
    finally:
        n.close()


def uninstall(ns):
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "agent.main", "--uninstall"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_guard_outlives_sigterm_and_kill_and_is_adopted(ns):
    assert "via 192.168.77.2" in ns.get("10.2.0.5")[0]  # before any agent: the CNI's route, in the clear
    out, log = ns.step(routes=["10.2.0.0/24"], keep=["192.168.77.9"], exit="remove_all")
    assert out["guarded"] == ["10.2.0.0/24"] and out["adopted"] == []
    # the agent stopped (SIGTERM path: remove_all): the TUN route is gone, the guard drops
    assert "blackhole 10.2.0.0/24" in ns.guard()
    route, err = ns.get("10.2.0.5")
    assert "via 192.168.77.2" not in route, route
    assert "4302:\tfrom all lookup 4302" in ns.rules() and "4301:\tfrom all lookup 4301" in ns.rules()
    assert "stay blackholed" in log
    # next agent adopts the guard; killed with SIGKILL: guard still there
    out, _ = ns.step(routes=["10.2.0.0/24"], exit="kill")
    assert out["adopted"] == ["10.2.0.0/24"]
    assert "blackhole 10.2.0.0/24" in ns.guard() and "via 192.168.77.2" not in ns.get("10.2.0.5")[0]
    # a node removed from the view: no route into the TUN, still dropped
    out, _ = ns.step(routes=[])
    assert out["guarded"] == ["10.2.0.0/24"] and "via 192.168.77.2" not in ns.get("10.2.0.5")[0]
    # --uninstall: everything goes, the CNI route applies again
    res = uninstall(ns)
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and ns.guard().strip() == ""
    assert not [ln for ln in ns.rules().splitlines() if ln.startswith(("4300:", "4301:", "4302:"))]
    assert "via 192.168.77.2" in ns.get("10.2.0.5")[0]


def test_guard_leaves_for_bypass_policy_bypass_flag_and_own_subnets(ns):
    ns.step(routes=["10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24", "fd00:2::/64"])
    assert all(f"blackhole {p}" in ns.guard() for p in ("10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24"))
    out, log = ns.step(routes=[], cleartext=["10.2.0.0/24"], bypass=["10.3.0.0/16"], own=["10.4.0.0/24"])
    assert out["adopted"][:3] == ["10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24"]
    assert out["guarded"] == ["fd00:2::/64"] or out["guarded"] == []  # IPv6 may be off in the namespace
    assert "policy says BYPASS" in log and "--bypass prefix covers it" in log and "own subnets" in log
    assert "via 192.168.77.2" in ns.get("10.2.0.5")[0]


def test_stale_rules_of_a_previous_run_are_removed_after_the_first_sync(ns):
    ns.step(routes=["10.2.0.0/24"], bypass=["10.96.0.0/12"], keep=["10.2.0.9"])
    rules = ns.rules()
    assert "to 10.96.0.0/12 lookup main" in rules and "to 10.2.0.9 lookup main" in rules
    ns.step(routes=["10.2.0.0/24"], bypass=["10.96.0.0/12", "fd00:96::/64"], keep=["10.2.0.9"])  # same again: kept
    rules = ns.rules()
    assert "to 10.96.0.0/12 lookup main" in rules and "to 10.96.0.0/12 unreachable" in rules
    assert "to 10.2.0.9 lookup main" in rules and "fwmark 0x4301 lookup main" in rules
    ns.step(routes=["10.2.0.0/24"])  # bypass taken away, endpoint gone: their rules go
    rules = ns.rules()
    assert "10.96.0.0/12" not in rules and "10.2.0.9" not in rules and "lookup 4302" in rules


def test_fail_open_removes_rules_and_routes_on_exit(ns):
    out, _ = ns.step(routes=["10.2.0.0/24"], guard=False)
    assert out["guarded"] == [] and ns.guard().strip() == ""
    assert not [ln for ln in ns.rules().splitlines() if ln.startswith(("4300:", "4301:", "4302:"))]
    assert "via 192.168.77.2" in ns.get("10.2.0.5")[0]  # in the clear again: the documented opt-out


def test_uninstall_needs_cap_net_admin(monkeypatch, capsys):
    from agent import main as agent_main

    def no_cap():
        raise agent_main.StartupError("missing capability CAP_NET_ADMIN")
    monkeypatch.setattr(agent_main, "check_cap_net_admin", no_cap)
    assert agent_main.main(["--uninstall"]) == 1
    assert "CAP_NET_ADMIN" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["protect", "bypass", "discard"])
def test_runtime_hands_bypass_peers_subnets_to_the_guard_as_cleartext(action):
    """Only a BYPASS policy takes a peer's subnets out of the guard (RouteManager.sync cleartext=);
    PROTECT and DISCARD peers are routed into the TUN and so guarded; status shows peers_expected."""
    from dataclasses import replace

    from agent.datapath.runtime import Runtime
    from tests.datapath.fake_devices import FakeNetwork
    from agent.model import PeerPolicy
    from tests.datapath.fakes import FakeClock
    from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, Node

    a = Node(FakeNetwork(), FakeClock(), "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    view = replace(a.view, peers=tuple(replace(p, policy=PeerPolicy(action=action)) for p in a.view.peers))
    calls = []

    class Routes:
        guarded = frozenset()

        def sync(self, nets, keep_out=(), cleartext=()):
            calls.append((set(nets), set(cleartext)))

    rt = Runtime(view, a.ike, tun=a.tun, udp500=a.u500, udp4500=a.u4500, local_address=A_IP, clock=a.rt.clock,
                 routes=Routes())
    rt.start()
    nets, cleartext = calls[-1]
    assert (NET_B in cleartext) == (action == "bypass") and (NET_B in nets) == (action != "bypass")
    assert rt.status()["peers_expected"] == (["b"] if action == "protect" else [])
