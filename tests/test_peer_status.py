"""Per-peer state on the agent (agent.peerstate): rows from a real runtime pair
(in memory, real IKE core, fake clock), the last error of a peer that does not
answer, per-peer metrics with a ``peer`` label, `meshsec status` per peer."""
from __future__ import annotations

import pytest

from agent.metrics import AgentMetrics
from agent.peerstate import PeerTracker, install_status
from meshsec import cli
from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, _real_node, ipv4, pump

pytest.importorskip("agent.ike.manager")

C_IP = "198.51.100.30"


@pytest.fixture
def trio():
    """a initiates to b (answers) and to c (nobody there)."""
    import ipaddress
    net, clock = FakeNetwork(), FakeClock()
    net_c = ipaddress.ip_network("10.3.0.0/16")
    a = _real_node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True), ("c", C_IP, net_c, True)])
    b = _real_node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    wall = [1_700_000_000.0]
    ta = PeerTracker(a.rt, wall=lambda: wall[0])
    tb = PeerTracker(b.rt, wall=lambda: wall[0])
    a.rt.start()
    b.rt.start()
    for _ in range(20):
        pump(a, b, rounds=1)
        clock.advance(0.01)
        if "b" in a.rt.current and "a" in b.rt.current:
            break
    assert "b" in a.rt.current
    return a, b, ta, tb, clock, wall


def rows(t: PeerTracker) -> dict:
    return {r["name"]: r for r in t.peers()}


def test_rows_up_connecting_and_traffic(trio) -> None:
    a, b, ta, tb, clock, wall = trio
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x" * 100) for _ in range(3)])
    pump(a, b)
    r = rows(ta)
    assert r["b"]["state"] == "up" and r["b"]["ike_state"] == "ESTABLISHED" and r["b"]["child_sas"] == 1
    assert r["b"]["last_handshake"] == 1_700_000_000 and r["b"]["endpoint"] == f"{B_IP}:4500"  # UDP-encapsulated (RFC 3948)
    assert r["b"]["packets_out"] == 3 and r["b"]["bytes_out"] == 3 * 120
    assert r["b"]["sa"] == "esp/tunnel/udp" and r["b"]["rule"] == ""
    assert r["b"]["mtu"] == a.rt.tun_mtu > 0  # no underlay MTU known here: the TUN MTU
    assert r["c"]["state"] == "connecting" and r["c"]["ike_state"] == "CONNECTING" and r["c"]["last_handshake"] == 0
    assert rows(tb)["a"]["packets_in"] == 3


def test_peer_that_never_answers_is_down_with_the_reason(trio) -> None:
    a, b, ta, tb, clock, wall = trio
    before = ta.changes
    for _ in range(400):  # retransmissions until the IKE_SA setup gives up (RFC 7296 §2.1)
        clock.advance(1.0)
        pump(a, b, rounds=1)
        if "c" in ta.last_error:
            break
    r = rows(ta)["c"]
    assert r["state"] == "down" and r["ike_state"] == ""  # re-initiation waits for its backoff
    assert r["last_error"] == "IKE_SA failed: peer did not respond"
    assert r["last_error_at"] == 1_700_000_000 and ta.changes > before
    assert rows(ta)["b"]["state"] == "up"  # the other peer is unaffected


def test_totals_survive_a_rekey(trio) -> None:
    a, b, ta, tb, clock, wall = trio
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"y" * 50) for _ in range(2)])
    pump(a, b)
    assert a.rt.rekey_command({"peer": "b", "what": "child"}).get("ok")
    for _ in range(20):
        pump(a, b, rounds=1)
        clock.advance(0.01)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"y" * 50)])
    pump(a, b)
    r = rows(ta)["b"]
    assert r["packets_out"] == 3 and r["last_error"] == ""  # a rekey is no error


def test_metrics_with_peer_label(trio) -> None:
    a, b, ta, tb, clock, wall = trio
    m = AgentMetrics(a.rt, timeout=5.0, tracker=ta)
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x" * 100)])
    pump(a, b)
    snap = m.take_snapshot()
    m.snapshot = lambda: snap  # no loop thread here: serve this snapshot
    v = m.registry.get_sample_value
    assert v("meshsec_agent_peer_up", {"peer": "b"}) == 1 and v("meshsec_agent_peer_up", {"peer": "c"}) == 0
    assert v("meshsec_agent_peer_state", {"peer": "c", "state": "connecting"}) == 1
    assert v("meshsec_agent_peer_state", {"peer": "c", "state": "up"}) == 0
    assert v("meshsec_agent_peer_bytes_total", {"peer": "b", "direction": "out"}) == 120
    assert v("meshsec_agent_peer_packets_total", {"peer": "b", "direction": "out"}) == 1
    assert v("meshsec_agent_peer_last_handshake_age_seconds", {"peer": "b"}) > 0
    assert v("meshsec_agent_peer_last_handshake_age_seconds", {"peer": "c"}) is None  # never
    assert v("meshsec_agent_peer_mtu_bytes", {"peer": "b"}) == a.rt.tun_mtu
    assert v("process_resident_memory_bytes") > 0 and v("process_cpu_seconds_total") >= 0


def test_peer_drops_by_reason_in_metrics(trio) -> None:
    # ESP from b replayed and tampered on the way to a: a counts the drops on its CHILD_SA with b,
    # exported as meshsec_agent_peer_drops_total{peer="b",reason=...}; c (no SA) has none
    a, b, ta, tb, clock, wall = trio
    net = a.u4500.network
    b.tun.inject([ipv4("10.2.0.7", "10.1.0.5", b"z" * 60) for _ in range(2)])
    mark = len(net.log)
    pump(a, b)
    esp = [(src, data) for src, dst, data in net.log[mark:]
           if src == (B_IP, 4500) and dst == (A_IP, 4500) and data[:4] != b"\0\0\0\0" and len(data) > 8]
    assert len(esp) == 2 and len(a.tun.take_written()) == 2
    for src, data in esp:
        net.deliver(src, (A_IP, 4500), data)  # replayed: same sequence numbers (RFC 4303 §3.4.3)
    src, data = esp[0]
    # a fresh sequence number passes the replay check, but it is covered by the ICV (§3.4.4)
    net.deliver(src, (A_IP, 4500), data[:4] + (100).to_bytes(4, "big") + data[8:])
    pump(a, b)
    assert a.tun.take_written() == []
    assert rows(ta)["b"]["drops"] == {"replay": 2, "icv": 1}

    m = AgentMetrics(a.rt, timeout=5.0, tracker=ta)
    snap = m.take_snapshot()
    m.snapshot = lambda: snap
    v = m.registry.get_sample_value
    assert v("meshsec_agent_peer_drops_total", {"peer": "b", "reason": "replay"}) == 2
    assert v("meshsec_agent_peer_drops_total", {"peer": "b", "reason": "icv"}) == 1
    samples = [s for fam in m.registry.collect() if fam.name == "meshsec_agent_peer_drops" for s in fam.samples]
    assert {(s.labels["peer"], s.labels["reason"]) for s in samples if s.name.endswith("_total")} == \
        {("b", "replay"), ("b", "icv")}


def test_meshsec_status_shows_peers_and_controller(trio) -> None:
    a, b, ta, tb, clock, wall = trio

    class Control:
        handlers = {"status": lambda _req: a.rt.status()}

    class Reporter:
        def controller_state(self):
            return {"address": "127.0.0.1:7444", "reachable": False, "last_ok": 0,
                    "error": "UNAVAILABLE: failed to connect to all addresses"}

    ta.last_error["c"] = ("IKE_SA failed: IKE_SA setup timed out", 1_700_000_000.0)
    install_status(Control, a.rt, ta, Reporter())
    st = Control.handlers["status"]({})
    assert {p["name"] for p in st["peers"]} == {"b", "c"}
    text = cli.format_status(st)
    assert "controller 127.0.0.1:7444: UNREACHABLE: UNAVAILABLE: failed to connect to all addresses" in text
    assert "PEERS (2)" in text
    line_c = next(ln for ln in text.splitlines() if ln.startswith("c "))
    assert "IKE_SA failed: IKE_SA setup timed out" in line_c and "never" in line_c and C_IP in line_c
    line_b = next(ln for ln in text.splitlines() if ln.startswith("b "))
    assert " up " in line_b and "ESTABLISHED" in line_b and f"{B_IP}:4500" in line_b


def test_standalone_status_has_no_controller_line(trio) -> None:
    a, b, ta, tb, clock, wall = trio

    class Control:
        handlers = {"status": lambda _req: a.rt.status()}

    install_status(Control, a.rt, ta, None)
    st = Control.handlers["status"]({})
    assert st["controller"] is None and "controller " not in cli.format_status(st).split("PEERS")[0]


class _BareRuntime:
    """Just what PeerTracker.observe reads."""

    def __init__(self) -> None:
        self.event_observers: list = []
        self.children: dict = {}


@pytest.mark.parametrize("kind,reason,is_error", [
    ("duplicate", "moot: an IKE_SA with the peer is up", False),  # shown as "IKE_SA failed: moot ..." before
    ("duplicate", "duplicate IKE_SA: the other one holds the higher nonce", False),
    ("superseded", "peer sent INITIAL_CONTACT", False),
    ("rekeyed", "rekeyed", False),
    ("local", "shutdown", False),
    ("reconfigured", "policy changed", False),
    ("auth_failed", "rekeyed", True),  # the kind decides, not a reason text that looks benign
    ("timeout", "peer did not respond", True),
    ("peer_deleted", "deleted by peer", True),
])
def test_benign_ike_sa_endings_are_judged_by_kind_not_text(kind, reason, is_error) -> None:
    from agent.ike.errors import DeleteReason
    from agent.ike.events import IkeSaDeleted
    t = PeerTracker(_BareRuntime(), wall=lambda: 1_700_000_000.0)
    t.observe(IkeSaDeleted("b", 1, 2, reason, kind=DeleteReason(kind)), 0.0)
    assert ("b" in t.last_error) is is_error, t.last_error
