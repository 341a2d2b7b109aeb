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
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, Node, ipv4, pump
from agent.datapath.udp import FakeNetwork
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
    p.write_text("name: a\nlocal_address: 10.0.0.300\nauth: {psk: x}\n")
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
