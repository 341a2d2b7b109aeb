"""`meshsec status` against a live control socket, and meshsec-agent's argument/preflight errors."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from agent import main as agent_main
from agent.datapath.control_socket import ControlServer, ControlSocketError
from meshsec import cli
from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, Node, ipv4, pump
from tests.datapath.fakes import FakeClock


@pytest.fixture
def running(tmp_path):
    """Node a (established with b, some traffic and drops) running its real selector loop in a thread."""
    net, clock = FakeNetwork(), FakeClock()
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    pump(a, b)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x" * 100)] * 3)
    pump(a, b)
    a.u4500.inject([(b"\x12\x34\x56\x78" + bytes(40), ("198.51.100.9", 4500))])  # unknown SPI
    pump(a)
    path = str(tmp_path / "agent.sock")
    a.rt.control = ControlServer(path, {})
    a.rt.control.handlers["status"] = lambda _r: a.rt.status()
    t = threading.Thread(target=a.rt.run, daemon=True)
    t.start()
    yield path, a
    a.rt.stop()
    t.join(timeout=5)
    assert not t.is_alive()
    assert not os.path.exists(path)  # removed on shutdown


def test_status_table(running, capsys):
    path, a = running
    assert cli.main(["status", "--socket", path]) == 0
    out = capsys.readouterr().out
    assert "node a" in out and "CHILD_SAs (1)" in out and "IKE_SAs (1)" in out
    ch = a.rt.status()["child_sas"][0]
    assert f"{ch['spi_in']}_in {ch['spi_out']}_out" in out
    assert "360B/3p" in out  # bytes/packets out
    assert "unknown_spi=1" in out


def test_status_json(running, capsys):
    path, a = running
    assert cli.main(["status", "--socket", path, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["drops"] == {"unknown_spi": 1}
    (ch,) = st["child_sas"]
    assert ch["peer"] == "b" and ch["packets_out"] == 3 and ch["bytes_out"] == 360
    assert "encr_key" not in json.dumps(st)


def test_socket_mode_and_bad_requests(running):
    path, a = running
    assert os.stat(path).st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'not json\n["list"]\n{"cmd": "reboot"}\n{"cmd": "status"}\n')
        buf = b""
        deadline = time.monotonic() + 5
        while buf.count(b"\n") < 4 and time.monotonic() < deadline:
            buf += s.recv(65536)
    lines = [json.loads(x) for x in buf.splitlines()]
    assert "malformed JSON" in lines[0]["error"]
    assert "expected an object" in lines[1]["error"]
    assert "unknown cmd 'reboot'" in lines[2]["error"]
    assert lines[3]["node"] == "a"


def test_second_server_on_live_socket_refused(running):
    path, a = running
    with pytest.raises(ControlSocketError, match="in use by another running agent"):
        ControlServer(path, {})


def test_status_without_agent(tmp_path, capsys):
    assert cli.main(["status", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert "is meshsec-agent running? pass --socket" in err


def test_format_status_empty():
    text = cli.format_status({"node": "n", "ike_sas": [], "child_sas": [], "drops": {}})
    assert "IKE_SAs (0)" in text and "CHILD_SAs (0)" in text and "drops: -" in text


# -- meshsec-agent ----------------------------------------------------------------

def test_agent_needs_exactly_one_mode(capsys):
    with pytest.raises(SystemExit) as ei:
        agent_main.main([])
    assert ei.value.code == 2
    with pytest.raises(SystemExit):
        agent_main.main(["--controller", "127.0.0.1:1"])
    assert "--controller-ca" in capsys.readouterr().err


def test_agent_config_error_exit_2(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nlocal_address: 10.0.0.300\nauth: {psk: s3cret-test-key-0123}\n")
    assert agent_main.main(["--config", str(p)]) == 2
    assert f"{p}:2: local_address" in capsys.readouterr().err


def test_preflight_capability(tmp_path):
    f = tmp_path / "status"
    f.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    with pytest.raises(agent_main.StartupError, match="CAP_NET_ADMIN"):
        agent_main.check_cap_net_admin(str(f))
    f.write_text("CapEff:\t0000000000001000\n")
    agent_main.check_cap_net_admin(str(f))  # bit 12 set


def test_preflight_dev_tun(tmp_path):
    with pytest.raises(agent_main.StartupError, match="modprobe tun"):
        agent_main.check_dev_tun(str(tmp_path / "tun"))


def test_preflight_port_in_use():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 4500))
    except OSError:
        pytest.skip("127.0.0.1:4500 already bound by something else")
    try:
        with pytest.raises(agent_main.StartupError, match="UDP port 4500 on 127.0.0.1 is not available"):
            agent_main.check_ports_free("127.0.0.1")
    finally:
        s.close()


def test_keylog_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        agent_main.main(["--help"])
    out = capsys.readouterr().out
    assert "--keylog-dir" in out and "SSLKEYLOGFILE" in out


def test_status_text_shows_the_spd_and_sa_kinds():
    st = {
        "node": "h1", "local_address": "198.51.100.11", "tun": "ms0", "view_version": 3, "uptime_s": 5,
        "ike_sas": [], "drops": {}, "tun_mtu": 1418, "underlay_mtu": 1500,
        "child_sas": [
            {"peer": "h2", "spi_in": "0000aaaa", "spi_out": "0000bbbb", "protocol": "esp", "mode": "transport",
             "encapsulation": "udp", "via": None, "ah": "0000cccc", "algorithms": "ENCR_AES_GCM_16_128",
             "age_s": 1, "drops": {}},
            {"peer": "h2", "spi_in": "0000dddd", "spi_out": "0000cccc", "protocol": "ah", "mode": "transport",
             "encapsulation": "none", "via": None, "algorithms": "AH/AUTH_HMAC_SHA2_256_128", "age_s": 1,
             "drops": {"icv": 1}},
            {"peer": "bw0", "spi_in": "0000eeee", "spi_out": "0000ffff", "protocol": "esp", "mode": "transport",
             "encapsulation": "udp", "via": "gw-b", "algorithms": "x", "age_s": 1, "drops": {}}],
        "spd": [
            {"local": "198.51.100.11/32", "remote": "198.51.100.12/32", "action": "protect", "peer": "h2",
             "rule": "hosts-ah", "name": "child:h2", "hits": 7,
             "bundle": "h2:esp/transport/none 0000bbbb_o + ah/transport/none 0000cccc_o"},
            {"local": "any", "remote": "10.2.0.0/24", "action": "protect", "peer": "gw-b", "rule": "",
             "name": "view:gw-b", "hits": 0, "bundle": "no SA yet"},
            {"local": "any", "remote": "any", "protocol": 17, "remote_ports": "500", "action": "bypass",
             "peer": None, "name": "ike", "hits": 2, "bundle": "-"}],
    }
    out = cli.format_status(st)
    lines = out.splitlines()
    assert "SPD (3 entries, first match wins)" in out and "TUN MTU 1418  underlay MTU 1500" in out
    row1 = next(ln for ln in lines if ln.startswith("1 "))
    for cell in ("198.51.100.12/32", "PROTECT", "hosts-ah", "child:h2", "+ ah/transport/none 0000cccc_o", " 7"):
        assert cell in row1, (cell, row1)
    row2 = next(ln for ln in lines if ln.startswith("2 "))
    assert "view:gw-b" in row2 and "no SA yet" in row2 and " - " in row2  # no controller rule
    row3 = next(ln for ln in lines if ln.startswith("3 "))
    assert "BYPASS" in row3 and "17 remote_ports=500" in row3
    assert any("esp/transport in ah 0000cccc_o" in ln for ln in lines)  # IP/AH/ESP on the wire
    assert not any("esp/transport/udp" in ln and "h2" in ln for ln in lines)  # NAT-T does not apply inside AH
    assert any("ah/transport/none" in ln and "icv=1" in ln for ln in lines)
    assert any("esp/transport/udp" in ln and "gw-b" in ln for ln in lines)  # via
    assert out.index("CHILD_SAs") < out.index("SPD (")


def test_status_text_rule_from_the_controller_policy(running):
    _path, a = running
    from dataclasses import replace
    v = a.rt.view
    a.rt.view = replace(v, peers=tuple(replace(p, policy=replace(p.policy, rule="site-to-site")) for p in v.peers))
    st = a.rt.status()
    assert {e["rule"] for e in st["spd"] if e["peer"] == "b"} == {"site-to-site"}
    assert "site-to-site" in cli.format_status(st)


def test_status_on_a_path_that_is_not_a_socket(capsys):
    assert cli.main(["status", "--socket", "/etc/passwd"]) == 1
    err = capsys.readouterr().err
    assert "/etc/passwd is not a socket (a regular file)" in err and "is meshsec-agent running" not in err


def test_format_status_shows_refused_peers_early_drops_and_internal_errors():
    text = cli.format_status({"node": "n", "ike_sas": [], "child_sas": [], "drops": {"no_endpoint": 2},
                              "policy_errors": {"gw-c": "peer gw-c: ike_proposals: unknown keyword 'typo'"},
                              "before_first_view": {"ike_dropped": 2}, "internal_errors": 1,
                              "view_source": "stored", "route_carve_outs": ["198.51.100.2"]})
    assert "REFUSED PEERS (1)" in text and "gw-c: peer gw-c: ike_proposals: unknown keyword 'typo'" in text
    assert "drops: no_endpoint=2" in text and "no_view_yet" not in text
    assert "before first view: 2 IKE packets ignored" in text
    assert "internal errors: 1" in text and "STORED: controller unreachable" in text
    assert "kept out of the TUN (covered by a peer's subnet): 198.51.100.2" in text


def test_status_shows_the_last_error_per_peer_and_the_runtime_logs_refusals(caplog):
    """B allows A only 10.9.0.0/16 (A offers 10.1.0.0/16): B refuses A's CHILD_SA with TS_UNACCEPTABLE,
    logs the refusal with what was offered; both `meshsec status` show the last error per peer."""
    import ipaddress
    import logging
    from tests.datapath.test_runtime import _real_node
    net, clock = FakeNetwork(), FakeClock()
    a = _real_node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = _real_node(net, clock, "b", B_IP, NET_B, [("a", A_IP, ipaddress.ip_network("10.9.0.0/16"), False)])
    with caplog.at_level(logging.WARNING):
        a.rt.start()
        b.rt.start()
        pump(a, b)
    st_a, st_b = a.rt.status(), b.rt.status()
    assert [s["state"] for s in st_a["ike_sas"]] == ["ESTABLISHED"] and not st_a["child_sas"]
    assert "TS_UNACCEPTABLE" in st_a["peer_errors"]["b"] and "retry in 2 s" in st_a["peer_errors"]["b"]
    assert "TSi 10.1.0.0/24" in st_b["peer_errors"]["a"]
    text = cli.format_status(st_b)
    assert "LAST ERRORS (1)" in text and "a: we refused its CHILD_SA: traffic selectors do not overlap" in text
    logs = [r.getMessage() for r in caplog.records]
    assert any("CHILD_SA with a refused by us: traffic selectors do not overlap" in m and "TSi 10.1.0.0/24" in m
               for m in logs)
    assert any("CHILD_SA with b refused by the peer" in m and "retry in 2 s" in m for m in logs)


def test_format_status_last_error_of_an_ike_sa_row():
    text = cli.format_status({"node": "n", "child_sas": [], "drops": {}, "ike_sas": [
        {"peer": "gw", "spi_i": "1", "spi_r": "2", "state": "ESTABLISHED", "last_error": "CHILD_SA refused by "
         "the peer: CHILD_SA refused: NO_PROPOSAL_CHOSEN (retry in 4 s)"}]})
    assert "LAST ERRORS (1)\n  gw: CHILD_SA refused by the peer: CHILD_SA refused: NO_PROPOSAL_CHOSEN" in text


@pytest.mark.parametrize("err,says,not_says", [
    (13, "needs CAP_NET_BIND_SERVICE", "another IKE daemon"),  # EACCES: no privilege for port 500
    (98, "another IKE daemon", "CAP_NET_BIND_SERVICE"),  # EADDRINUSE
    (99, "is not an address of this host", "another IKE daemon")])  # EADDRNOTAVAIL
def test_preflight_port_error_names_the_real_cause(monkeypatch, err, says, not_says):
    import errno as errno_mod

    class Refusing:
        def __init__(self, *a, **kw):
            pass

        def bind(self, addr):
            raise OSError(err, os.strerror(err))

        def close(self):
            pass
    monkeypatch.setattr(agent_main.socket, "socket", Refusing)
    with pytest.raises(agent_main.StartupError) as ei:
        agent_main.check_ports_free("198.51.100.1")
    assert says in str(ei.value) and not_says not in str(ei.value)
    assert errno_mod.errorcode[err] in ("EACCES", "EADDRINUSE", "EADDRNOTAVAIL")


def test_failed_start_closes_what_it_opened_and_abandons_the_routes():
    """agent.main._undo_start: newest first; a RouteManager is abandoned (its own ip rules removed)."""
    calls = []

    class Thing:
        def __init__(self, name):
            self.name = name

        def close(self):
            calls.append(self.name)

    class Routes:
        def abandon(self):
            calls.append("routes abandoned")

    agent_main._undo_start([Thing("udp500"), Thing("tun"), agent_main._Abandon(Routes()), Thing("control")])
    assert calls == ["control", "routes abandoned", "tun", "udp500"]


def test_route_manager_abandon_removes_only_its_own_rules():
    """Rules that existed before the agent (EEXIST, e.g. another agent's) stay; ours go."""
    from agent.datapath.routes import RouteManager
    rm = RouteManager.__new__(RouteManager)
    deleted = []

    class Ipr:
        def rule(self, op, **r):
            deleted.append((op, r["priority"]))

        def route(self, *a, **kw):
            pass

        def close(self):
            deleted.append(("close", None))
    import logging
    rm._ipr, rm.log, rm._installed, rm._carved = Ipr(), logging.getLogger("t"), set(), {}
    rm._guarded, rm.guard_table = set(), None
    ours, theirs = {"family": 2, "priority": 4301, "table": 4301}, {"family": 2, "priority": 4300, "table": 254}
    rm._rules, rm._found = [theirs, ours], [theirs]
    rm.abandon()
    assert deleted == [("del", 4301), ("close", None)]
    # a guard a previous fail-closed run left stays with every rule: a failed start removes no protection
    deleted.clear()
    rm._rules, rm._found, rm.guard_table = [theirs, ours], [theirs], 4302
    rm._guarded = {__import__("ipaddress").ip_network("10.2.0.0/24")}
    rm.abandon()
    assert deleted == [("close", None)]
    text = cli.format_status({"node": "n", "ike_sas": [], "child_sas": [], "guarded": ["10.2.0.0/24", "10.3.0.0/24"]})
    assert "fail closed (dropped whenever no agent runs): 10.2.0.0/24, 10.3.0.0/24" in text


def test_ready_with_a_child_sa_with_every_expected_peer(running, capsys):
    path, a = running
    st = a.rt.status()
    assert st["peers_expected"] == ["b"]
    assert cli.main(["ready", "--socket", path, "--grace", "1000000"]) == 0
    assert "ready: CHILD_SAs with all 1 expected peers" in capsys.readouterr().out


def test_readiness_waits_for_missing_peers_and_view_until_the_grace():
    st = {"view_source": "controller", "uptime_s": 5, "peers_expected": ["b", "c"], "child_sas": [{"peer": "b"}]}
    ok, why = cli.readiness(st, 120)
    assert not ok and "no CHILD_SA yet with 1 peers: c" in why and "up 5s of 120s grace" in why
    ok, why = cli.readiness({**st, "uptime_s": 121}, 120)
    assert ok and "grace of 120s passed" in why and "c" in why
    ok, why = cli.readiness({**st, "uptime_s": 10 ** 6}, 0)  # grace 0: no grace (helm test)
    assert not ok and "not ready (no grace): no CHILD_SA yet with 1 peers: c" in why
    ok, why = cli.readiness({"view_source": "none", "uptime_s": 3, "child_sas": []}, 60)
    assert not ok and "no view from the controller yet" in why
    # BYPASS/DISCARD peers and peers without endpoints are not expected (the agent leaves them out)
    assert cli.readiness({"view_source": "stored", "uptime_s": 0, "peers_expected": [], "child_sas": []}, 60)[0]


def test_ready_without_agent_is_not_ready(tmp_path, capsys):
    assert cli.main(["ready", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "not ready: cannot connect" in capsys.readouterr().err


def test_ready_bad_grace_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["ready", "--grace", "-1"])
    assert ei.value.code == 2 and "--grace -1" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["meshsec-agent", "meshsec-controller", "meshsec"])
def test_every_cli_has_version(tool):
    import subprocess
    import sys
    from pathlib import Path

    from meshsec.version import version
    res = subprocess.run([str(Path(sys.executable).parent / tool), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith(f"{tool} {version()} (Python ")
    assert version() != "unknown"


def test_unexpanded_service_variable_in_controller_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        agent_main.main(["--controller", "$(MS_MESHSEC_CONTROLLER_SERVICE_HOST):7443", "--controller-ca", "c",
                         "--name", "n", "--join-token-file", "t"])
    assert ei.value.code == 2 and "unexpanded $(VAR)" in capsys.readouterr().err
