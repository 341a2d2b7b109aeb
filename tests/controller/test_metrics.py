"""Controller metrics, gRPC health and reflection (in-process controller on
127.0.0.1, SQLite state)."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from controller.main import main as controller_main
from controller.metrics import ControllerMetrics, split_hostport
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.test_grpc import OPTS, Watcher, client, raw_enroll


def sample(server, name: str, **labels) -> float | None:
    return server.metrics.registry.get_sample_value(name, labels)


def test_enrolments_counted_by_result(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    assert client(controller, server, "alpha", "alpha-token", tmp_path).enroll().uses_certificates
    raw_enroll(server, "alpha", "wrong", b"")
    raw_enroll(server, "nobody", "x", b"")
    raw_enroll(server, "alpha", "alpha-token", b"not a csr")
    raw_enroll(server, "", "x", b"")
    got = {r: sample(server, "meshsec_controller_enrolments_total", result=r)
           for r in ("ok", "bad_token", "unknown_node", "bad_csr", "invalid", "not_leader")}
    assert got == {"ok": 1, "bad_token": 1, "unknown_node": 1, "bad_csr": 1, "invalid": 1, "not_leader": 0}
    assert sample(server, "meshsec_controller_leader") == 1  # SQLite: the only replica leads


def test_watch_streams_and_fanout_latency(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    w = Watcher(client(controller, server, "alpha", "alpha-token", tmp_path))
    try:
        wait_for(lambda: w.views, what="snapshot")
        assert sample(server, "meshsec_controller_watch_streams") == 1
        assert sample(server, "meshsec_controller_view_version") == 1
        assert sample(server, "meshsec_controller_fanout_latency_seconds_count") == 0  # snapshots are not fan-out
        write_inventory(controller.inventory, inventory_text().replace("127.0.0.3", "127.0.0.33"))
        wait_for(lambda: len(w.views) >= 2, what="update")
        assert sample(server, "meshsec_controller_fanout_latency_seconds_count") == 1
        assert 0 <= sample(server, "meshsec_controller_fanout_latency_seconds_sum") < 5
        assert sample(server, "meshsec_controller_view_version") == 2
    finally:
        w.close()
    wait_for(lambda: sample(server, "meshsec_controller_watch_streams") == 0, what="stream count back to 0")


def test_metrics_http_endpoint(controller: ServerFactory) -> None:
    server = controller.start(metrics_listen="127.0.0.1:0")
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"meshsec_controller_watch_streams", "meshsec_controller_enrolments", "meshsec_controller_leader",
            "meshsec_controller_fanout_latency_seconds", "meshsec_controller_view_version",
            "meshsec_controller_build_info"} <= names
    from meshsec.version import version
    assert f'meshsec_controller_build_info{{python="' in body and f'version="{version()}"' in body


def test_leader_gauge_and_transitions() -> None:
    m = ControllerMetrics()
    m.set_leader(True)
    m.set_leader(True)
    m.set_leader(False)
    assert m.registry.get_sample_value("meshsec_controller_leader") == 0
    assert m.registry.get_sample_value("meshsec_controller_leader_transitions_total") == 2
    m.enrolment("made-up")  # unknown results are folded into "invalid", never a new label
    assert m.registry.get_sample_value("meshsec_controller_enrolments_total", {"result": "invalid"}) == 1


def _services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5)
    return {s.name for r in responses for s in r.list_services_response.service}


def test_health_and_reflection_on_the_tls_port(controller: ServerFactory) -> None:
    server = controller.start()
    with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(server.ca_path.read_bytes()),
                             options=OPTS) as ch:
        hc = health_pb2_grpc.HealthStub(ch)
        for service in ("", "meshsec.v1.Controller"):
            assert hc.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            hc.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert {"meshsec.v1.Controller", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= _services(ch)


def test_plaintext_health_port_serves_only_health_and_reflection(controller: ServerFactory) -> None:
    server = controller.start(health_listen="127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert "meshsec.v1.Controller" not in _services(ch)  # never Enroll/Watch without TLS


def test_bad_flags_are_clear_errors(tmp_path: Path, capsys) -> None:
    inv = tmp_path / "inv.yaml"
    write_inventory(inv, inventory_text())
    for flags, msg in ((["--metrics-listen", "9100"], "--metrics-listen '9100' is not HOST:PORT"),
                       (["--health-listen", "x:y"], "--health-listen 'x:y' is not HOST:PORT"),
                       (["--etcd-endpoints", "ftp://h:2379"], "is not https://HOST:PORT"),
                       (["--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-lease-ttl", "1"], "at least 2 seconds"),
                       (["--max-workers", "1"], "--max-workers 1: use at least 4")):
        assert controller_main(["--inventory", str(inv), "--state-dir", str(tmp_path / "s"), *flags]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="--metrics-listen 'nope' is not HOST:PORT"):
        split_hostport("nope")


def test_unreachable_etcd_exits_1_naming_it(tmp_path: Path, capsys) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inv = tmp_path / "inv.yaml"
    write_inventory(inv, inventory_text())
    rc = controller_main(["--inventory", str(inv), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0",
                          "--etcd-endpoints", f"http://127.0.0.1:{port}"])
    assert rc == 1
    assert f"no etcd endpoint answered /v3/kv/range: http://127.0.0.1:{port}" in capsys.readouterr().err
