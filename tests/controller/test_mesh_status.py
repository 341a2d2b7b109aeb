"""Mesh-wide visibility on the controller (controller.status): ReportStatus and
GetMesh over mutual TLS, their bounds and rate limit, the mesh document's pair
states, the status socket, `meshsec mesh`, the agent's StatusReporter, metrics."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.status_report import StatusReporter, report_from_rows
from controller.policy import Inventory, NodeSpec, Rule
from controller.status import MAX_REPORT_PEERS, MeshStatus, RateLimiter, build_mesh, report_interval, report_to_dict
from meshsec import cli
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, wait_for
from tests.controller.test_grpc import OPTS, client

NAMES = ("alpha", "bravo", "charlie")
TOKENS = {"alpha": "alpha-token", "bravo": "bravo-token", "charlie": "charlie-token"}


def row(name: str, state: str = "up", **kw) -> dict:
    r = {"name": name, "state": state, "ike_state": "ESTABLISHED" if state == "up" else "", "child_sas": int(state == "up"),
         "last_handshake": 1_700_000_000 if state == "up" else 0, "last_error": "", "last_error_at": 0,
         "endpoint": "127.0.0.9:500", "bytes_in": 0, "bytes_out": 0, "packets_in": 0, "packets_out": 0,
         "drops": {}, "sa": "esp/tunnel/udp" if state == "up" else "", "rule": "defaults"}
    r.update(kw)
    return r


def report(name: str, rows: list[dict], **status) -> pb.StatusReport:
    st = {"view_version": 1, "tun_mtu": 1400, "underlay_mtu": 1500, "uptime_s": 5.0, "view_source": "controller",
          "local_address": "127.0.0.1", "drops": {"no_sa": 2}}
    st.update(status)
    return report_from_rows(name, st, rows, 1_900_000_000)


def mtls(server, tmp_path: Path, name: str) -> grpc.ChannelCredentials:
    creds = client(None, server, name, TOKENS[name], tmp_path).enroll()
    chain = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, chain)


def call(server, creds, method: str, req):
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", creds, options=OPTS) as ch:
        return getattr(pb_grpc.ControllerStub(ch), method)(req, timeout=5)


def rpc_error(server, creds, method: str, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(server, creds, method, req)
    return e.value


# ---------------------------------------------------------------- the document (pure)

def _inv(rules=()) -> Inventory:
    nodes = tuple(NodeSpec(n, "gateway", (f"127.0.0.{i}",), (f"10.{i}.0.0/16",)) for i, n in enumerate(NAMES, 1))
    return Inventory(nodes=nodes, groups=(("dc1", ("alpha", "bravo")),), rules=tuple(rules))


def _pairs(doc: dict) -> dict:
    return {(p["a"], p["b"]): p for p in doc["pairs"]}


def test_pair_states_from_both_ends() -> None:
    st = MeshStatus(clock=lambda: 1000.0)
    known = set(NAMES)
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo"), row("charlie", "down",
              last_error="IKE_SA failed: peer did not respond", last_error_at=990)]), known - {"alpha"}))
    st.ingest("bravo", report_to_dict(report("bravo", [row("alpha"), row("charlie", "idle")]), known - {"bravo"}))
    doc = build_mesh(_inv(), 7, st.snapshot(), {"alpha": 2000, "bravo": 2000}, 1005.0)
    pairs = _pairs(doc)
    assert pairs[("alpha", "bravo")]["state"] == "up" and pairs[("alpha", "bravo")]["reason"] == ""
    assert pairs[("alpha", "charlie")]["state"] == "down"
    assert pairs[("alpha", "charlie")]["reason"] == "alpha: IKE_SA failed: peer did not respond"
    # bravo idle towards charlie, charlie silent: never tried
    assert pairs[("bravo", "charlie")]["state"] == "never"
    assert "no recent report from charlie" in pairs[("bravo", "charlie")]["reason"]
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["alpha"]["connected"] and nodes["alpha"]["enrolled"] and nodes["alpha"]["site"] == "dc1"
    assert not nodes["charlie"]["connected"] and not nodes["charlie"]["enrolled"]
    assert nodes["charlie"]["site"] == "gateway"  # no group: its role
    assert doc["summary"] == {"nodes": 3, "enrolled": 2, "connected": 2,
                              "pairs": {"up": 1, "connecting": 0, "down": 1, "never": 1, "unknown": 0,
                                        "bypass": 0, "discard": 0}, "pairs_total": 3, "pairs_unlisted": 0}
    # a mesh too large for every pair: only pairs a fresh report shows as tried
    big = build_mesh(_inv(), 7, st.snapshot(), {}, 1005.0, max_pairs=2)
    assert big["pairs_truncated"] and {(p["a"], p["b"]) for p in big["pairs"]} == {("alpha", "bravo"),
                                                                                   ("alpha", "charlie")}
    assert big["summary"]["pairs_unlisted"] == 1
    # reports go stale: nobody connected, every pair unknown
    late = build_mesh(_inv(), 7, st.snapshot(), {}, 1000.0 + 31)
    assert {p["state"] for p in late["pairs"]} == {"unknown"} and late["summary"]["connected"] == 0


def test_one_end_up_other_without_sa_is_down_and_policy_actions() -> None:
    st = MeshStatus(clock=lambda: 1000.0)
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo")]), {"bravo", "charlie"}))
    st.ingest("bravo", report_to_dict(report("bravo", [row("alpha", "down", last_error="CHILD_SA deleted: x")]),
                                      {"alpha", "charlie"}))
    inv = _inv([Rule(name="no-charlie", between=(("charlie",), ("any",)), action="discard")])
    pairs = _pairs(build_mesh(inv, 1, st.snapshot(), {}, 1000.0))
    assert pairs[("alpha", "bravo")]["state"] == "down"
    assert pairs[("alpha", "bravo")]["reason"] == "bravo: CHILD_SA deleted: x"
    assert pairs[("alpha", "charlie")]["state"] == "discard" and pairs[("alpha", "charlie")]["rule"] == "no-charlie"


def test_throughput_from_consecutive_reports_and_counter_reset() -> None:
    t = [1000.0]
    st = MeshStatus(clock=lambda: t[0])
    k = {"bravo", "charlie"}
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo", bytes_out=1000, bytes_in=0)]), k))
    t[0] = 1010.0
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo", bytes_out=11000, bytes_in=500)]), k))
    p = _pairs(build_mesh(_inv(), 1, st.snapshot(), {}, 1010.0))[("alpha", "bravo")]
    assert p["bps_a_to_b"] == 8000.0 and p["bps_b_to_a"] == 400.0  # 10 kB in 10 s = 8 kbit/s
    t[0] = 1020.0  # the agent restarted: totals went down; no negative rate
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo", bytes_out=10, bytes_in=0)]), k))
    p = _pairs(build_mesh(_inv(), 1, st.snapshot(), {}, 1020.0))[("alpha", "bravo")]
    assert p["bps_a_to_b"] == 0.0


def test_report_interval_grows_with_the_mesh_and_large_documents_stay_small(monkeypatch) -> None:
    assert report_interval(3) == 10.0 and report_interval(1000) == 100.0 and report_interval(10_000) == 300.0
    st = MeshStatus(clock=lambda: 1000.0)
    st.ingest("alpha", report_to_dict(report("alpha", [row("bravo"), row("charlie")]), {"bravo", "charlie"}))
    assert _pairs(build_mesh(_inv(), 1, st.snapshot(), {}, 1000.0))[("alpha", "bravo")]["ends"]
    import controller.status as status
    monkeypatch.setattr(status, "MAX_ENDS_PAIRS", 2)
    doc = build_mesh(_inv(), 1, st.snapshot(), {}, 1000.0)
    assert doc["ends_omitted"] and all(p["ends"] == {} for p in doc["pairs"])
    assert _pairs(doc)[("alpha", "bravo")]["state"] == "up"  # the pair itself is still there


def test_report_to_dict_drops_unknown_peers_and_cuts_strings() -> None:
    r = report("alpha", [row("bravo", last_error="x" * 500), row("mallory")])
    d = report_to_dict(r, {"bravo"})
    assert list(d["peers"]) == ["bravo"] and len(d["peers"]["bravo"]["last_error"]) == 200


def test_rate_limiter_bucket() -> None:
    t = [0.0]
    lim = RateLimiter(burst=3, rate=1.0, clock=lambda: t[0])
    assert [lim.allow("a") for _ in range(4)] == [True, True, True, False]
    assert lim.allow("b")  # per key
    t[0] = 1.0
    assert lim.allow("a") and not lim.allow("a")


# ---------------------------------------------------------------- over gRPC

def test_report_and_get_mesh_over_mutual_tls(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    alpha = mtls(server, tmp_path, "alpha")
    resp = call(server, alpha, "ReportStatus", report("alpha", [row("bravo"), row("charlie", "idle")]))
    assert resp.report_interval_s == 10.0
    doc = json.loads(call(server, alpha, "GetMesh", pb.GetMeshRequest()).json)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["alpha"]["connected"] and nodes["alpha"]["enrolled"] and nodes["alpha"]["tun_mtu"] == 1400
    assert not nodes["bravo"]["enrolled"] and not nodes["bravo"]["connected"]
    assert _pairs(doc)[("alpha", "bravo")]["state"] == "up"
    assert server.mesh.results["ok"] == 1


def test_report_needs_own_certificate(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    no_cert = grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", no_cert, options=OPTS) as ch:  # enrol port: no client cert
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ControllerStub(ch).ReportStatus(report("alpha", []), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(f"127.0.0.1:{server.port}", no_cert, options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ControllerStub(ch).GetMesh(pb.GetMeshRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "mutual TLS" in e.value.details()
    bravo = mtls(server, tmp_path, "bravo")
    err = rpc_error(server, bravo, "ReportStatus", report("alpha", [row("bravo")]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "client certificate is for 'bravo', not for node 'alpha'"
    err = rpc_error(server, bravo, "ReportStatus", report("", []))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "alpha" not in server.mesh.status.snapshot()


def test_report_bounds_and_rate_limit(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    alpha = mtls(server, tmp_path, "alpha")
    big = report("alpha", [row(f"p{i}") for i in range(MAX_REPORT_PEERS)])
    big.peers.add(name="one-too-many")
    err = rpc_error(server, alpha, "ReportStatus", big)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in err.details()
    codes = []
    for _ in range(6):
        try:
            call(server, alpha, "ReportStatus", report("alpha", [row("bravo")]))
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(e.code().name)
    assert codes[:3] == ["ok"] * 3 and "RESOURCE_EXHAUSTED" in codes  # burst of 3, then 1/s
    assert server.mesh.results["rate_limited"] >= 1 and server.mesh.results["too_large"] == 1


def test_status_socket_and_cli_mesh(controller: ServerFactory, tmp_path: Path, capsys) -> None:
    sock = str(tmp_path / "ctl.sock")
    server = controller.start(mesh_options={"status_socket": sock})
    assert (Path(sock).stat().st_mode & 0o777) == 0o600
    alpha = mtls(server, tmp_path, "alpha")
    call(server, alpha, "ReportStatus", report("alpha", [row("bravo"), row("charlie", "down",
         last_error="IKE_SA failed: peer did not respond", last_error_at=1)]))
    assert cli.main(["mesh", "--socket", sock]) == 0
    out = capsys.readouterr().out
    assert "mesh: 3 nodes, 1 enrolled, 1 connected" in out
    assert "alpha <-> charlie  DOWN" in out and "alpha: IKE_SA failed: peer did not respond" in out
    assert "alpha <-> bravo    up" in out
    assert cli.main(["mesh", "--socket", sock, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {n["name"] for n in doc["nodes"]} == set(NAMES)
    # from a node: GetMesh with its certificate
    state = tmp_path / "agent-alpha"
    assert cli.main(["mesh", "--controller", f"127.0.0.1:{server.port}", "--watch-address",
                     f"127.0.0.1:{server.watch_port}", "--state-dir", str(state), "--all"]) == 0
    out = capsys.readouterr().out
    assert "bravo <-> charlie" in out and "never" in out
    # no certificate there: a clear error, exit 1
    assert cli.main(["mesh", "--controller", f"127.0.0.1:{server.port}", "--state-dir", str(tmp_path / "x")]) == 1
    assert "node.key" in capsys.readouterr().err
    assert cli.main(["mesh", "--controller", "nonsense"]) == 1
    assert "--controller 'nonsense' is not HOST:PORT" in capsys.readouterr().err


def test_metrics_of_the_mesh(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    alpha = mtls(server, tmp_path, "alpha")
    call(server, alpha, "ReportStatus", report("alpha", [row("bravo")]))
    reg = server.metrics.registry
    assert reg.get_sample_value("meshsec_controller_status_reports_total", {"result": "ok"}) == 1
    assert reg.get_sample_value("meshsec_controller_mesh_nodes", {"state": "connected"}) == 1
    assert reg.get_sample_value("meshsec_controller_mesh_nodes", {"state": "not_enrolled"}) == 2
    assert reg.get_sample_value("meshsec_controller_node_connected", {"node": "alpha"}) == 1
    assert reg.get_sample_value("meshsec_controller_node_certificate_expiry_timestamp_seconds",
                                {"node": "alpha"}) == 1_900_000_000
    assert reg.get_sample_value("meshsec_controller_mesh_pairs", {"state": "up"}) == 1
    assert reg.get_sample_value("process_resident_memory_bytes") > 0
    assert reg.get_sample_value("process_cpu_seconds_total") >= 0


# ---------------------------------------------------------------- the agent's sender

class _Loop:
    """Stands in for Runtime: call_soon runs at once; status() is canned."""

    def __init__(self) -> None:
        self.status_calls = 0

    def call_soon(self, fn) -> None:
        fn()

    def status(self) -> dict:
        self.status_calls += 1
        return {"view_version": 3, "tun_mtu": 1400, "underlay_mtu": 1500, "uptime_s": 1.0,
                "view_source": "controller", "local_address": "127.0.0.1", "drops": {}}


class _Tracker:
    def __init__(self) -> None:
        self.changes = 0
        self.rows = [row("bravo")]

    def peers(self, _st) -> list[dict]:
        return self.rows

    def cert_not_after(self) -> int:
        return 1_900_000_000


def test_reporter_sends_periodically_and_on_change(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    c = client(controller, server, "alpha", "alpha-token", tmp_path)
    c.enroll()
    tracker = _Tracker()
    rep = StatusReporter(c, _Loop(), tracker, interval=60.0, min_interval=0.05,
                         logger=logging.getLogger("test.report"))
    assert rep.controller_state()["reachable"] is None
    stop = threading.Event()
    t = threading.Thread(target=rep.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: "alpha" in server.mesh.status.snapshot(), what="first report")
        assert rep.controller_state()["reachable"] is True and rep.controller_state()["error"] == ""
        # a change is reported long before the 60 s period
        tracker.rows = [row("bravo", "down", last_error="IKE_SA failed: peer did not respond", last_error_at=5)]
        tracker.changes += 1
        wait_for(lambda: server.mesh.status.snapshot()["alpha"][0]["peers"]["bravo"]["state"] == "down",
                 what="report on change")
        server.stop(grace=0)
        tracker.changes += 1
        wait_for(lambda: rep.controller_state()["reachable"] is False, what="controller unreachable")
        assert "UNAVAILABLE" in rep.controller_state()["error"]
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()


# ---------------------------------------------------------------- failure paths

class _Abort(Exception):
    pass


class _Ctx:
    """A ServicerContext stand-in: abort raises with the code and details."""

    def abort(self, code, details):
        raise _Abort(code, details)


def test_report_from_a_node_no_longer_in_the_inventory_is_not_found(controller: ServerFactory) -> None:
    server = controller.start()

    class Servicer:  # the certificate checks passed (e.g. a node source lost the node a moment ago)
        def _check_identity(self, name, context, rpc):
            return None

    from controller.status import MeshService
    mesh = MeshService(server, Servicer())
    with pytest.raises(_Abort) as e:
        mesh.ReportStatus(report("delta", []), _Ctx())
    assert e.value.args == (grpc.StatusCode.NOT_FOUND, "node 'delta' is not in the inventory")
    assert mesh.results["unknown_node"] == 1 and "delta" not in mesh.status.snapshot()


def test_get_mesh_is_rate_limited(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    alpha = mtls(server, tmp_path, "alpha")
    codes = []
    for _ in range(5):
        try:
            call(server, alpha, "GetMesh", pb.GetMeshRequest())
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(e.code().name)
    assert codes[:3] == ["ok"] * 3 and "RESOURCE_EXHAUSTED" in codes


def test_status_socket_path_taken_by_a_file_is_logged_not_fatal(controller: ServerFactory, tmp_path: Path,
                                                                caplog) -> None:
    taken = tmp_path / "not-a-socket"
    taken.write_text("x")
    with caplog.at_level(logging.WARNING):
        server = controller.start(mesh_options={"status_socket": str(taken)})
    assert server.mesh._sock is None and taken.read_text() == "x"
    assert f"no status socket at {taken}" in caplog.text and "exists and is not a socket" in caplog.text


def test_cli_mesh_controller_unreachable(controller: ServerFactory, tmp_path: Path, capsys) -> None:
    server = controller.start()
    mtls(server, tmp_path, "alpha")
    state = tmp_path / "agent-alpha"
    server.stop(grace=0)
    assert cli.main(["mesh", "--controller", f"127.0.0.1:{server.port}", "--watch-address",
                     f"127.0.0.1:{server.watch_port}", "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"meshsec: controller 127.0.0.1:{server.watch_port}: UNAVAILABLE")


class _StuckLoop(_Loop):
    def call_soon(self, fn) -> None:
        pass  # never runs: a busy or stuck loop


def test_reporter_skips_a_report_when_the_loop_does_not_answer(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    c = client(controller, server, "alpha", "alpha-token", tmp_path)
    rep = StatusReporter(c, _StuckLoop(), _Tracker(), timeout=0.05, logger=logging.getLogger("test.report"))
    assert rep.build() is None
    # not enrolled yet: no call, the reason is shown
    assert rep.send(report("alpha", [])) is False
    assert rep.controller_state()["reachable"] is False and rep.controller_state()["error"] == "not enrolled yet"


def test_reporter_against_a_controller_without_reports(tmp_path: Path, caplog) -> None:
    """An older controller (no ReportStatus): UNIMPLEMENTED, logged once, the controller counts as reachable."""
    from concurrent import futures

    from tests.controller.ctl_helpers import ServerFactory as _F
    factory = _F(tmp_path)
    server = factory.start()
    try:
        c = client(factory, server, "alpha", "alpha-token", tmp_path)
        c.enroll()
        old = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # plain port, no services at all
        port = old.add_insecure_port("127.0.0.1:0")
        old.start()
        try:
            c.watch_addresses = [f"127.0.0.1:{port}"]
            c._mtls = lambda *a: grpc.local_channel_credentials()  # noqa: E731 (plain local channel to it)
            rep = StatusReporter(c, _Loop(), _Tracker(), logger=logging.getLogger("test.report"))
            with caplog.at_level(logging.WARNING, logger="test.report"):
                assert rep.send(report("alpha", [])) is False
                assert rep.send(report("alpha", [])) is False
            assert caplog.text.count("does not take status reports") == 1
            assert rep.controller_state()["reachable"] is True
            assert rep.controller_state()["error"].startswith("UNIMPLEMENTED")
        finally:
            old.stop(0)
    finally:
        factory.stop_all()
