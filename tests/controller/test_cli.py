"""meshsec-controller CLI: exit 2 with one file:line message for bad input;
a good start prints where it listens and where ca.pem is."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import inventory_text

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from controller.main import main; sys.exit(main())"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_bad_inventory_exits_2_with_file_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: a\n    role: host\n    subnets: [10.0.0.0/33]\n    join_token: t\n")
    r = run(["--inventory", str(bad), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"])
    assert r.returncode == 2
    assert r.stderr == f"{bad}:4: nodes[0].subnets[0]: '10.0.0.0/33' is not an IPv4/IPv6 network\n"
    assert not (tmp_path / "s").exists()


def test_bad_flags_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "inv.yaml"
    good.write_text(inventory_text())
    r = run(["--inventory", str(good), "--listen", "nonsense"])
    assert r.returncode == 2 and "is not HOST:PORT" in r.stderr
    r = run(["--inventory", str(good), "--cert-lifetime", "soon"])
    assert r.returncode == 2 and "not a duration" in r.stderr
    assert run([]).returncode == 2


def test_starts_prints_listen_and_ca_then_stops_on_sigterm(tmp_path: Path) -> None:
    good = tmp_path / "inv.yaml"
    good.write_text(inventory_text())
    proc = subprocess.Popen(CLI + ["--inventory", str(good), "--state-dir", str(tmp_path / "s"),
                                   "--listen", "127.0.0.1:0", "--watch-listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("meshsec-controller listening on 127.0.0.1:")
        m = re.match(r"meshsec-controller listening on 127\.0\.0\.1:(\d+) \(Enroll, TLS\) and "
                     r"127\.0\.0\.1:(\d+) \(Watch, mutual TLS\)", line)
        assert m, line
        enrol_port, watch_port = int(m.group(1)), int(m.group(2))
        assert enrol_port != watch_port
        # The Enroll port answers without a client certificate (the watch port would refuse the handshake).
        ca = (tmp_path / "s" / "ca.pem").read_bytes()
        with grpc.secure_channel(f"127.0.0.1:{enrol_port}", grpc.ssl_channel_credentials(ca),
                                 options=[("grpc.ssl_target_name_override", "meshsec-controller")]) as ch:
            try:
                pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(node_name="alpha", join_token="wrong"), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        assert str(tmp_path / "s" / "ca.pem") in line
        assert (tmp_path / "s" / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0
