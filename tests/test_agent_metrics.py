"""Agent metrics (agent.metrics) on a runtime pair with the real IKE core,
in memory (FakeNetwork, fake clock): values, monotonic totals across SA
removal, the loop-thread snapshot hand-off, the HTTP endpoint."""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentMetrics
from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_runtime import A_IP, NET_A, ipv4, make_view, pump, real_pair

pytest.importorskip("agent.ike.manager")


@pytest.fixture
def pair():
    net, clock = FakeNetwork(), FakeClock()
    made = {}

    def attach(a, b):  # metrics attached before start, as the agent does
        made["ma"], made["mb"] = AgentMetrics(a.rt, timeout=5.0), AgentMetrics(b.rt, timeout=5.0)

    a, b = real_pair(net, clock, attach)
    return a, b, made["ma"], made["mb"], clock


def value(m: AgentMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def scrape_while_pumping(m: AgentMetrics, *nodes, fetch=None) -> object:
    """Run a scrape in another thread (as the HTTP endpoint does) while this
    thread drives the loops, like the runtime's selector would."""
    box: list = []
    t = threading.Thread(target=lambda: box.append((fetch or m.snapshot)()), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        pump(*nodes, rounds=1)
        t.join(0.005)
    assert box, "scrape did not finish"
    return box[0]


def test_counts_after_handshake_and_traffic(pair):
    a, b, ma, mb, clock = pair
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"x" * 100) for _ in range(3)])
    pump(a, b)
    snap = ma.take_snapshot()
    assert snap["ike_sas"] == {"ESTABLISHED": 1} and snap["child_sas"] == {"active": 1, "rekeyed": 0}
    assert snap["traffic"]["packets_out"] == 3 and snap["traffic"]["bytes_out"] == 3 * 120
    assert mb.take_snapshot()["traffic"]["packets_in"] == 3
    # RFC 7296 §1.2: one IKE_SA_INIT + IKE_AUTH per side, initiator on a, responder on b
    assert value(ma, "meshsec_agent_handshake_seconds_count", role="initiator") == 1
    assert value(mb, "meshsec_agent_handshake_seconds_count", role="responder") == 1
    assert value(ma, "meshsec_agent_handshake_seconds_sum", role="initiator") >= 0.0
    assert value(ma, "meshsec_agent_rekeys_total", kind="child") == 0


def test_drops_by_layer_and_reason(pair):
    a, b, ma, mb, clock = pair
    a.tun.inject([ipv4("10.1.0.5", "192.168.9.9")])  # no SPD entry
    pump(a, b)
    snap = scrape_while_pumping(ma, a, b)
    assert snap["drops"]["runtime"]["no_policy"] == 1
    assert snap["drops"]["runtime"]["no_sa"] == 0


def test_totals_do_not_go_down_when_sas_go_away(pair):
    a, b, ma, mb, clock = pair
    a.tun.inject([ipv4("10.1.0.5", "10.2.0.7", b"y" * 30) for _ in range(4)])
    pump(a, b)
    assert ma.take_snapshot()["traffic"]["packets_out"] == 4
    # the peer leaves the view: the runtime drops its CHILD_SA without an event
    a.rt.submit_view(make_view("a", A_IP, NET_A, []))
    pump(a)
    assert a.rt.children == {}
    snap = ma.take_snapshot()
    assert snap["traffic"]["packets_out"] == 4 and snap["child_sas"] == {"active": 0, "rekeyed": 0}


def test_scrape_goes_through_the_loop_and_times_out_cleanly(pair):
    a, b, ma, mb, clock = pair
    first = scrape_while_pumping(ma, a, b)
    assert first["ike_sas"] == {"ESTABLISHED": 1}
    # a loop that does not answer: the last snapshot is served and the timeout counted
    ma.timeout = 0.01
    again = ma.snapshot()
    assert again == first and value(ma, "meshsec_agent_snapshot_timeouts_total") == 1
    pump(a)  # the late request runs harmlessly on the next wakeup


def test_http_endpoint_serves_prometheus_text(pair):
    a, b, ma, mb, clock = pair
    port = ma.serve("127.0.0.1:0")
    try:
        body = scrape_while_pumping(ma, a, b, fetch=lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    finally:
        ma.close()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    ike = {s.labels["state"]: s.value for s in families["meshsec_agent_ike_sas"].samples}
    assert ike == {"ESTABLISHED": 1.0}
    assert "meshsec_agent_esp_packets" in families and "meshsec_agent_drops" in families
    assert "meshsec_agent_handshake_seconds" in families and "meshsec_agent_view_version" in families
    from meshsec.version import version
    (info,) = families["meshsec_agent_build_info"].samples
    assert info.value == 1 and info.labels["version"] == version() != "unknown" and info.labels["python"]


def test_bad_listen_address_is_a_clear_error(pair):
    a, b, ma, mb, clock = pair
    with pytest.raises(ValueError, match="--metrics-listen 'nohostport' is not HOST:PORT"):
        ma.serve("nohostport")


def test_handshake_time_comes_from_the_public_ike_status(pair):
    """The histogram observes IkeManager.status()'s ``established - created`` (fake clock)."""
    a, b, ma, mb, clock = pair
    (row,) = a.rt.ike.status()
    assert row["established"] > row["created"]  # the fixture advances the clock between rounds
    got = value(ma, "meshsec_agent_handshake_seconds_sum", role="initiator")
    assert got == pytest.approx(row["established"] - row["created"])


@pytest.mark.parametrize("kind", ["child", "ike"])
def test_rekeys_counted_on_both_sides_from_explicit_fields(pair, kind):
    """CHILD_SA rekeys from ChildSaEstablished.rekey_of, IKE_SA rekeys from IkeSaDeleted.rekeyed_to
    (the responder's old IKE_SA goes with reason "deleted by peer": no string matching)."""
    a, b, ma, mb, clock = pair
    now = clock()
    if kind == "child":
        (spi,) = list(a.rt.children)
        assert a.rt.ike.rekey_child(spi, now)
    else:
        assert a.rt.ike.rekey_ike("b", now)
    a.rt._flush_ike(now)
    for _ in range(10):
        pump(a, b, rounds=1)
        clock.advance(0.01)
    assert value(ma, "meshsec_agent_rekeys_total", kind=kind) == 1
    assert value(mb, "meshsec_agent_rekeys_total", kind=kind) == 1
    other = "ike" if kind == "child" else "child"
    assert value(ma, "meshsec_agent_rekeys_total", kind=other) == 0
