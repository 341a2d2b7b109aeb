"""gRPC keepalive between agent and controller: an idle Watch stream
survives many client keepalive pings (no GOAWAY too_many_pings).

Short intervals (pings every second, grpc's floor for clients, against a
server that accepts them every 100 ms) stand in for the production 20 s / 5 s.
grpc sends GOAWAY after the third ping it did not want (ping strikes > 2)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.control import channel_options
from controller.service import SERVER_OPTIONS, server_options
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.test_grpc import client

PING_MS = 1000
HOLD_S = 5.5  # > 5 ping intervals


def _hold_idle_stream(controller: ServerFactory, tmp_path: Path, options) -> tuple[list, list]:
    server = controller.start(grpc_options=options)
    creds = client(controller, server, "alpha", "alpha-token", tmp_path).enroll()
    chain = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    mtls = grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, chain)
    updates: list = []
    errors: list = []
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls,
                             options=channel_options(keepalive_time_ms=PING_MS)) as ch:
        call = pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="alpha"))

        def read() -> None:
            try:
                for u in call:
                    updates.append(u)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:  # our own cancel at the end
                    errors.append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        wait_for(lambda: updates or errors, what="snapshot")
        time.sleep(HOLD_S)  # idle stream: only keepalive pings flow (real time, this is the point)
        write_inventory(controller.inventory, inventory_text().replace("127.0.0.3", "127.0.0.39"))
        wait_for(lambda: len(updates) >= 2 or errors, what="update or stream error")
        call.cancel()
        t.join(5)
        assert not t.is_alive()
    return updates, errors


def test_idle_watch_stream_survives_keepalive_pings(controller: ServerFactory, tmp_path: Path) -> None:
    updates, errors = _hold_idle_stream(controller, tmp_path,
                                        server_options(keepalive_time_ms=60_000, min_ping_interval_ms=100))
    assert not errors, f"stream broke: {errors[0].code()}: {errors[0].details()}"
    assert updates[0].full and not updates[1].full
    assert [p.name for p in updates[1].upserted_peers] == ["charlie"]


def test_the_old_option_name_lets_the_server_goaway(controller: ServerFactory, tmp_path: Path) -> None:
    """Proves the test above can fail: grpc ignores
    min_recv_ping_interval_without_data_ms, keeps its 5-minute default and
    answers the agent's pings with GOAWAY too_many_pings."""
    bad = [(k.replace("min_ping_interval", "min_recv_ping_interval"), v)
           for k, v in server_options(keepalive_time_ms=60_000, min_ping_interval_ms=100)]
    updates, errors = _hold_idle_stream(controller, tmp_path, bad)
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert len(updates) == 1


def test_production_options_agree() -> None:
    server = dict(SERVER_OPTIONS)
    agent = dict(channel_options())
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" not in server
    # the agent pings no more often than the server accepts on an idle stream
    assert agent["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert server["grpc.http2.max_pings_without_data"] == 0 and agent["grpc.http2.max_pings_without_data"] == 0
