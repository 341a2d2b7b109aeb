"""Control-plane bypass (``meshsec-agent --bypass CIDR``): ip rules ahead of the table-4301 rule
that send those destinations through the main table, SPD BYPASS entries ahead of every PROTECT
entry (RFC 4301 §4.4.1), the controller's own addresses bypassed automatically.

The last test checks the rules in the kernel, in a network namespace it creates:

    netns msbyp-<pid>: lo up, TUN msbyp0, veth pair msbypd/msbype (both ends inside; nothing leaves)
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys

import pytest

from agent import main as agent_main
from agent.datapath.routes import bypass_rules
from agent.datapath.runtime import Runtime
from agent.datapath.policy import Policy
from agent.esp import Action, Sad, bypass_entries
from agent.model import Credentials
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock, FakeIke
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, make_view, pump

NET = ipaddress.ip_network


def test_bypass_rules_lookup_main_at_our_priority_both_families():
    rules = bypass_rules(["10.96.0.0/12", "10.2.0.5/32", "fd00:10::/64"], priority=4300)
    u = "FR_ACT_UNREACHABLE"  # a failed main lookup must not fall through to table 4301
    assert rules == [
        {"family": 2, "priority": 4300, "table": 254, "dst": "10.96.0.0", "dst_len": 12},
        {"family": 2, "priority": 4300, "action": u, "dst": "10.96.0.0", "dst_len": 12},
        {"family": 2, "priority": 4300, "table": 254, "dst": "10.2.0.5", "dst_len": 32},
        {"family": 2, "priority": 4300, "action": u, "dst": "10.2.0.5", "dst_len": 32},
        {"family": 10, "priority": 4300, "table": 254, "dst": "fd00:10::", "dst_len": 64},
        {"family": 10, "priority": 4300, "action": u, "dst": "fd00:10::", "dst_len": 64},
    ]
    assert bypass_rules([]) == []
    with pytest.raises(ValueError, match=r"bypass prefix 'nope': .*write e.g. 10.96.0.0/12"):
        bypass_rules(["nope"])


def test_bypass_entries_precede_protect_even_inside_a_peers_subnet():
    view = make_view("a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    byp = bypass_entries(["10.2.0.5/32", "fd00::/8"])
    assert [(e.action, str(e.remote), e.name) for e in byp] == [
        (Action.BYPASS, "10.2.0.5/32", "bypass:10.2.0.5/32"), (Action.BYPASS, "fd00::/8", "bypass:fd00::/8")]
    policy = Policy(Sad(), local_address=A_IP, bypass=["10.2.0.5/32", "fd00::/8"])
    policy.apply_view(view)
    assert list(policy.spd.entries[:2]) == byp
    spd = policy.spd
    assert spd.lookup_outbound(ipv4("10.1.0.7", "10.2.0.5")).action is Action.BYPASS
    hit = spd.lookup_outbound(ipv4("10.1.0.7", "10.2.0.6"))
    assert hit.action is Action.PROTECT and hit.peer == "b"
    with pytest.raises(ValueError, match="bypass prefix '10.2.0.300/32'"):
        bypass_entries(["10.2.0.300/32"])


def test_runtime_never_protects_bypassed_destinations():
    net, clock = FakeNetwork(), FakeClock()
    nodes = []
    for name, ip, sub, peers, byp in (("a", A_IP, NET_A, [("b", B_IP, NET_B, True)], ["10.2.0.5/32"]),
                                      ("b", B_IP, NET_B, [("a", A_IP, NET_A, False)], [])):
        view = make_view(name, ip, sub, peers)
        n = type("N", (), {})()
        n.ike = FakeIke(view, Credentials(psk=b"x"), os.urandom, local_address=ip)
        n.tun = FakeTun()
        n.rt = Runtime(view, n.ike, tun=n.tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                       local_address=ip, clock=clock, bypass=byp)
        nodes.append(n)
    a, b = nodes
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current
    st = a.rt.status()
    first = st["spd"][0]
    assert (first["action"], first["remote"], first["name"]) == ("bypass", "10.2.0.5/32", "bypass:10.2.0.5/32")
    # a packet that reached the TUN anyway (the ip rule should have kept it out) is not protected
    a.tun.inject([ipv4("10.1.0.7", "10.2.0.5", b"api server"), ipv4("10.1.0.7", "10.2.0.6", b"pod")])
    pump(a, b)
    assert b.tun.take_written() == [ipv4("10.1.0.7", "10.2.0.6", b"pod")]
    assert a.rt.counters["discard"] == 1 and st["spd"][0]["hits"] == 0


def test_controller_addresses_are_bypassed_automatically():
    def resolve(host, port, family, kind):
        if host == "ctl.example":
            return [(socket.AF_INET, kind, 6, "", ("198.51.100.9", 0)),
                    (socket.AF_INET6, kind, 6, "", ("2001:db8::9", 0, 0, 0))]
        raise socket.gaierror(-2, "Name or service not known")

    got = agent_main.controller_bypass("198.51.100.7:7443, ctl.example:7443,[2001:db8::7]:7443,gone.example:1",
                                       resolve=resolve)
    assert got == ["198.51.100.7/32", "198.51.100.9/32", "2001:db8::9/128", "2001:db8::7/128"]


@pytest.mark.parametrize("value", ["10.0.0.1/8", "banana"])
def test_bad_bypass_flag_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as ei:
        agent_main.main(["--config", "unused.yaml", "--bypass", value])
    assert ei.value.code == 2
    assert f"--bypass {value!r}:" in capsys.readouterr().err


_NS_SCRIPT = r"""
import sys
from agent.datapath.tun import TunDevice
from agent.datapath.routes import RouteManager
tun = TunDevice("msbyp0", 1400)
rm = RouteManager(tun.name, table=4301, mark=0x4301, rule_priority=4300, bypass=sys.argv[1:])
print("UP", flush=True)
sys.stdin.readline()
rm.remove_all()
rm.close()
tun.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
                    reason="needs root, iproute2 and /dev/net/tun")
def test_kernel_rules_added_before_the_table_rule_and_removed_on_exit():
    ns = f"msbyp-{os.getpid()}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _NS_SCRIPT,
                                 "10.96.0.0/12", "10.2.0.5/32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=root)
        try:
            assert proc.stdout.readline().strip() == "UP"
            rules = subprocess.run(["ip", "-n", ns, "-4", "rule", "show"], capture_output=True, text=True,
                                   check=True).stdout
            lines = [ln.strip() for ln in rules.splitlines()]
            for p in ("10.96.0.0/12", "10.2.0.5"):
                main = lines.index(f"4300:\tfrom all to {p} lookup main")
                assert lines[main + 1] == f"4300:\tfrom all to {p} unreachable", rules
            table = next(i for i, ln in enumerate(lines) if ln.endswith("lookup 4301"))
            assert all(i < table for i, ln in enumerate(lines) if ln.startswith("4300:"))
            # the kernel: a bypassed address inside a TUN-routed prefix never goes to the TUN;
            # unreachable while main has no route for it, via main once it has one
            subprocess.run(["ip", "-n", ns, "route", "add", "10.2.0.0/24", "dev", "msbyp0", "table", "4301"],
                           check=True)
            get = lambda d: subprocess.run(["ip", "-n", ns, "route", "get", d], capture_output=True,  # noqa: E731
                                           text=True)
            assert "dev msbyp0" in get("10.2.0.6").stdout
            res = get("10.2.0.5")
            assert res.returncode != 0 and "unreachable" in res.stderr.lower(), (res.stdout, res.stderr)
            subprocess.run(["ip", "-n", ns, "link", "add", "msbypd", "type", "veth", "peer", "name", "msbype"],
                           check=True)  # both ends stay in this namespace
            for dev in ("msbypd", "msbype"):
                subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "route", "add", "10.2.0.0/16", "dev", "msbypd"], check=True)
            assert "dev msbypd" in get("10.2.0.5").stdout and "dev msbyp0" in get("10.2.0.6").stdout
        finally:
            proc.communicate("\n", timeout=10)
        assert proc.returncode == 0
        after = subprocess.run(["ip", "-n", ns, "-4", "rule", "show"], capture_output=True, text=True).stdout
        assert "10.96.0.0/12" not in after and "10.2.0.5" not in after and "4301" not in after
    finally:
        subprocess.run(["ip", "netns", "del", ns])
