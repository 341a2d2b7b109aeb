"""The control-socket command ``{"cmd": "rekey", "peer": ..., "what": "child"|"ike"}`` and
``meshsec rekey PEER [--ike]``, on two runtimes with the real IKE core in memory (FakeNetwork,
fake clock): the CHILD_SA / IKE_SA is rekeyed by CREATE_CHILD_SA (RFC 7296 §1.3.3 / §1.3.2),
traffic keeps flowing, and every bad request gets a clear error instead of an exception."""
from __future__ import annotations

import json
import os
import threading

import pytest

from agent.datapath.control_socket import ControlServer
from agent.datapath.runtime import Runtime
from agent.iana import ExchangeType
from agent.ike.manager import IkeManager
from agent.model import Credentials
from meshsec import cli
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, ipv4, make_view

PSK = b"control rekey test psk 0123456789"


class Node:
    def __init__(self, net, clock, name, ip, subnet, peers, control=None):
        self.view = make_view(name, ip, subnet, peers)
        self.ike = IkeManager(self.view, Credentials(psk=PSK), os.urandom, local_address=ip)
        self.tun = FakeTun()
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=net.socket(ip, 500),
                          udp4500=net.socket(ip, 4500), local_address=ip, clock=clock, control=control)
        self.events: list = []
        self.rt.event_observers.append(lambda ev, now: self.events.append(ev))


def pump(clock, *nodes, rounds=10):
    for _ in range(rounds):
        for n in nodes:
            n.rt.pump()
        clock.advance(0.01)


@pytest.fixture
def pair(tmp_path):
    net, clock = FakeNetwork(), FakeClock()
    ctl = ControlServer(str(tmp_path / "a.sock"), {})
    a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)], control=ctl)
    b = Node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    pump(clock, a, b)
    assert "b" in a.rt.current and "a" in b.rt.current
    yield net, clock, a, b, ctl
    ctl.close()


def ask(ctl: ControlServer, req: dict) -> dict:
    return json.loads(ctl.handle_line(json.dumps(req).encode()))


def exchanges(net, since: int) -> list[int]:
    """IKE exchange types on the wire after log index ``since`` (UDP 500, or 4500 after the marker)."""
    out = []
    for src, dst, data in net.log[since:]:
        if src[1] == 4500 and data[:4] == b"\0\0\0\0":
            data = data[4:]
        elif src[1] != 500:
            continue
        out.append(data[18])
    return out


def test_runtime_registers_the_rekey_command(pair):
    _net, _clock, a, _b, ctl = pair
    assert ctl.handlers["rekey"] == a.rt.rekey_command


def test_child_rekey_command_replaces_the_child_sa_and_traffic_flows(pair):
    net, clock, a, b, ctl = pair
    old_in = a.rt.current["b"].inbound_spi
    mark = len(net.log)
    ans = ask(ctl, {"cmd": "rekey", "peer": "b", "what": "child"})
    assert ans == {"ok": True, "peer": "b", "what": "child", "spis": [f"{old_in:08x}"]}
    assert exchanges(net, mark)[:1] == [ExchangeType.CREATE_CHILD_SA]  # sent before the answer
    pump(clock, a, b)
    new = a.rt.current["b"]
    assert new.inbound_spi != old_in and old_in not in a.rt.children  # old one deleted after the rekey
    est = [e for e in a.events if type(e).__name__ == "ChildSaEstablished" and e.rekey_of == old_in]
    assert len(est) == 1
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"after-rekey")])
    pump(clock, a, b, rounds=2)
    assert b.tun.take_written() == [ipv4("10.1.0.5", "10.2.0.7", b"after-rekey")]


def test_ike_rekey_command_moves_the_child_sas_to_a_new_ike_sa(pair):
    net, clock, a, b, ctl = pair
    (old,) = a.ike.status()
    child = a.rt.current["b"].inbound_spi
    ans = ask(ctl, {"cmd": "rekey", "peer": "b", "what": "ike"})
    assert ans["ok"] and ans["what"] == "ike" and ans["spis"] == [f"{old['spi_i']}_i"]
    pump(clock, a, b)
    (new,) = a.ike.status()
    assert (new["spi_i"], new["spi_r"]) != (old["spi_i"], old["spi_r"]) and new["state"] == "ESTABLISHED"
    moved = [e for e in a.events if type(e).__name__ == "IkeSaDeleted" and e.rekeyed_to is not None]
    assert len(moved) == 1
    assert a.rt.current["b"].inbound_spi == child  # CHILD_SAs stay installed (§1.3.2)
    assert f"{a.rt.current['b'].ike_spi_i:016x}" == new["spi_i"]


@pytest.mark.parametrize("req,expect", [
    ({"cmd": "rekey", "peer": "zz"}, "rekey: unknown peer 'zz'; known peers: b"),
    ({"cmd": "rekey"}, "rekey: unknown peer None"),
    ({"cmd": "rekey", "peer": 7}, "rekey: unknown peer 7"),
    ({"cmd": "rekey", "peer": "b", "what": "esp"}, "rekey: what='esp'; use \"child\" or \"ike\""),
])
def test_bad_rekey_requests_get_clear_errors(pair, req, expect):
    _net, _clock, _a, _b, ctl = pair
    ans = ask(ctl, req)
    assert set(ans) == {"error"} and ans["error"].startswith(expect)


def test_rekey_without_sas_or_twice_is_an_error_not_an_exception(tmp_path):
    net, clock = FakeNetwork(), FakeClock()
    ctl = ControlServer(str(tmp_path / "c.sock"), {})
    try:
        a = Node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, False)], control=ctl)
        assert "no CHILD_SA with b yet" in ask(ctl, {"cmd": "rekey", "peer": "b"})["error"]
        assert "no established IKE_SA with b" in ask(ctl, {"cmd": "rekey", "peer": "b", "what": "ike"})["error"]
        assert a.ike.status() == [] and net.log == []
    finally:
        ctl.close()


def test_second_child_rekey_while_the_first_runs_is_refused(pair):
    net, clock, a, b, ctl = pair
    assert ask(ctl, {"cmd": "rekey", "peer": "b"})["ok"]
    ans = ask(ctl, {"cmd": "rekey", "peer": "b"})  # b has not answered yet
    assert "already being rekeyed" in ans["error"]
    pump(clock, a, b)
    assert ask(ctl, {"cmd": "rekey", "peer": "b"})["ok"]  # the new CHILD_SA can be rekeyed again


def test_meshsec_rekey_cli_over_the_socket(pair, capsys):
    """``meshsec rekey b`` / ``--ike`` against a's real selector loop (in a thread)."""
    net, clock, a, b, ctl = pair
    t = threading.Thread(target=a.rt.run, daemon=True)
    t.start()
    try:
        mark = len(net.log)
        assert cli.main(["rekey", "b", "--socket", ctl.path]) == 0
        out = capsys.readouterr().out
        assert out.startswith("CHILD_SA rekey with b started (") and "meshsec status" in out
        assert cli.main(["rekey", "b", "--ike", "--socket", ctl.path]) == 0  # queued behind the CHILD_SA one
        assert capsys.readouterr().out.startswith("IKE_SA rekey with b started (")
        assert cli.main(["rekey", "nobody", "--socket", ctl.path]) == 1
        assert "unknown peer 'nobody'" in capsys.readouterr().err
        assert ExchangeType.CREATE_CHILD_SA in exchanges(net, mark)
    finally:
        a.rt.stop()
        t.join(timeout=5)
    assert not t.is_alive()
