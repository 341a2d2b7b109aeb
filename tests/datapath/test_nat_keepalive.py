"""NAT keepalives (RFC 3948 §2.3) from the runtime, fake clock, real IKE core, in memory:

    node a 10.77.0.2 --- NAT (198.51.100.3, ports remapped) --- node b 198.51.100.2

a learns from NAT-D (RFC 7296 §2.23) that it is behind a NAT and sends the one-octet 0xFF
to b's UDP 4500 whenever it sent b nothing for ``nat_keepalive`` seconds; b (not behind a
NAT) and a pair without a NAT send none."""
from __future__ import annotations

import os

import pytest

from agent.datapath.runtime import Runtime
from agent.ike.manager import IkeManager
from agent.model import Credentials
from tests.datapath.fake_devices import FakeNetwork, FakeTun
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import B_IP, NET_A, NET_B, ipv4, make_view

INSIDE, PUBLIC = "10.77.0.2", "198.51.100.3"
PSK = b"nat keepalive test psk 0123456789"


class NatNetwork(FakeNetwork):
    """FakeNetwork with a NAPT in front of INSIDE: its source (INSIDE, p) leaves as (PUBLIC, p + 10000)."""

    def deliver(self, src, dst, data):
        if src[0] == INSIDE:
            src = (PUBLIC, src[1] + 10000)
        if dst[0] == PUBLIC:
            dst = (INSIDE, dst[1] - 10000)
        super().deliver(src, dst, data)


class Node:
    def __init__(self, net, clock, name, ip, subnet, peers, keepalive):
        self.view = make_view(name, ip, subnet, peers)
        self.ike = IkeManager(self.view, Credentials(psk=PSK), os.urandom, local_address=ip)
        self.tun = FakeTun()
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=net.socket(ip, 500),
                          udp4500=net.socket(ip, 4500), local_address=ip, clock=clock, nat_keepalive=keepalive)


def keepalives(net, since=0):
    """(src, dst) of every one-octet 0xFF datagram on the wire after log index ``since``."""
    return [(s, d) for s, d, p in net.log[since:] if p == b"\xff"]


def run(clock, a, b, seconds, step=0.5):
    """Advance the fake clock ``seconds`` in ``step``s, pumping both loops (timers fire on the way)."""
    for _ in range(round(seconds / step)):
        clock.advance(step)
        for _ in range(3):
            a.rt.pump()
            b.rt.pump()


def setup(nat: bool, keepalive: float = 20.0):
    net, clock = (NatNetwork() if nat else FakeNetwork()), FakeClock()
    a_ip = INSIDE if nat else "198.51.100.1"
    a = Node(net, clock, "a", a_ip, NET_A, [("b", B_IP, NET_B, True)], keepalive)
    b = Node(net, clock, "b", B_IP, NET_B, [("a", PUBLIC if nat else a_ip, NET_A, False)], keepalive)
    a.rt.start()
    b.rt.start()
    run(clock, a, b, 0.2, step=0.05)
    assert "b" in a.rt.current and "a" in b.rt.current
    return net, clock, a, b


def test_behind_a_nat_we_send_0xff_after_20_s_of_silence():
    net, clock, a, b = setup(nat=True)
    (sa,) = a.ike.status()
    assert sa["nat"]["local"] and sa["remote"] == f"{B_IP}:4500"
    assert not b.ike.status()[0]["nat"]["local"]
    mark = len(net.log)
    last_tx = clock()
    run(clock, a, b, 19.0)
    assert keepalives(net, mark) == []  # not before 20 s of silence
    run(clock, a, b, 1.5)
    assert keepalives(net, mark) == [((PUBLIC, 14500), (B_IP, 4500))]  # through the NAT, from 4500 to 4500
    assert a.rt.counters["keepalives_out"] == 1 and b.rt.counters["keepalives"] == 1
    assert b.rt.counters["malformed"] == 0 and b.rt.counters["unknown_spi"] == 0
    assert 20.0 <= clock() - last_tx <= 20.5 + 1e-9
    assert b.rt.status()["child_sas"][0]["packets_in"] == 0  # 0xFF is not ESP


def test_traffic_postpones_the_keepalive():
    # (the IKE liveness check at 30 s, RFC 7296 §2.4, would postpone it as well: stay before it)
    net, clock, a, b = setup(nat=True)
    run(clock, a, b, 5.0)
    mark = len(net.log)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"keeps the mapping open")])
    run(clock, a, b, 0.5)
    assert b.tun.take_written()
    run(clock, a, b, 19.0)  # 19.5 s since the ESP packet, 24.7 s since the handshake
    assert keepalives(net, mark) == []
    run(clock, a, b, 1.0)
    assert len(keepalives(net, mark)) == 1


def test_no_keepalives_without_a_nat_or_when_disabled():
    net, clock, a, b = setup(nat=False)
    assert not a.ike.status()[0]["nat"]["local"]
    run(clock, a, b, 45.0, step=1.0)
    assert keepalives(net) == [] and a.rt.counters["keepalives_out"] == 0
    net, clock, a, b = setup(nat=True, keepalive=0)
    run(clock, a, b, 45.0, step=1.0)
    assert keepalives(net) == [] and a.rt.counters["keepalives_out"] == 0


def test_keepalives_stop_when_the_ike_sa_goes():
    net, clock, a, b = setup(nat=True, keepalive=5.0)
    run(clock, a, b, 6.0)
    assert len(keepalives(net)) == 1
    a.ike.delete_all(clock())
    a.rt._flush_ike(clock())
    run(clock, a, b, 20.0)
    assert len(keepalives(net)) == 1 and a.rt.keepalive.deadline is None


@pytest.mark.parametrize("interval", [1.0, 7.5])
def test_interval_is_configurable(interval):
    net, clock, a, b = setup(nat=True, keepalive=interval)
    run(clock, a, b, interval * 3 + 0.25, step=0.25)
    assert len(keepalives(net)) == 3


@pytest.mark.parametrize("value", ["0.5", "-1", "99999"])
def test_agent_flag_out_of_range_is_a_usage_error(value, capsys):
    from agent import main as agent_main
    with pytest.raises(SystemExit) as ei:
        agent_main.main(["--config", "unused.yaml", "--nat-keepalive", value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"--nat-keepalive {float(value):g}: use 0 (off) or 1..3600 seconds" in err
