"""In-process controller on 127.0.0.1 (ephemeral ports) + ControllerClient."""
from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.control import ControllerClient, EnrollmentError
from agent.keystore import CERT_FILE, KEY_FILE
from agent.model import NodeView
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

OPTS = [("grpc.ssl_target_name_override", "meshsec-controller")]


def client(factory: ServerFactory, server, name: str, token: str, tmp: Path, **kw) -> ControllerClient:
    return ControllerClient(f"127.0.0.1:{server.port}", name, token, tmp / f"agent-{name}",
                            server.ca_path.read_bytes(), watch_address=f"127.0.0.1:{server.watch_port}",
                            backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5,
                            logger=logging.getLogger(f"test.agent.{name}"), **kw)


class Watcher:
    """Runs ControllerClient.watch in a thread and records views."""

    def __init__(self, c: ControllerClient) -> None:
        self.client, self.views, self.stop = c, [], threading.Event()
        self.thread = threading.Thread(target=c.watch, args=(self.views.append, self.stop), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "watch did not return after stop"


def raw_enroll(server, name: str, token: str, csr: bytes) -> grpc.RpcError:
    with grpc.secure_channel(f"127.0.0.1:{server.port}",
                             grpc.ssl_channel_credentials(server.ca_path.read_bytes()), options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(node_name=name, join_token=token, csr_der=csr),
                                              timeout=5)
    return e.value


def test_enroll_happy_path_and_reuse(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    c = client(controller, server, "alpha", "alpha-token", tmp_path)
    creds = c.enroll()
    leaf = x509.load_der_x509_certificate(creds.certificate_chain[0])
    ca = x509.load_der_x509_certificate(creds.ca_certificates[0])
    leaf.verify_directly_issued_by(ca)
    assert ca.public_bytes(serialization.Encoding.PEM) == server.ca_path.read_bytes()
    assert leaf.subject.rfc4514_string() == "CN=alpha"
    key = serialization.load_pem_private_key(creds.private_key_pem, None)
    assert leaf.public_key() == key.public_key()
    assert stat.S_IMODE((tmp_path / "agent-alpha" / KEY_FILE).stat().st_mode) == 0o600
    assert "alpha-token" not in repr(c) and "PRIVATE" not in repr(creds)
    assert len(server.store.certificates_for("alpha")) == 1
    # A second client on the same state dir reuses the stored certificate.
    again = client(controller, server, "alpha", "alpha-token", tmp_path).enroll()
    assert again.certificate_chain == creds.certificate_chain
    assert len(server.store.certificates_for("alpha")) == 1


def test_token_hash_inventory_node_enrolls(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    assert client(controller, server, "bravo", "bravo-token", tmp_path).enroll().uses_certificates


def test_wrong_token_unauthenticated(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    with pytest.raises(EnrollmentError, match="join token for node 'alpha' is wrong") as e:
        client(controller, server, "alpha", "nope", tmp_path).enroll()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert not (tmp_path / "agent-alpha" / CERT_FILE).exists()


def test_unknown_node_not_found(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    with pytest.raises(EnrollmentError, match="'zulu' is not in the inventory") as e:
        client(controller, server, "zulu", "x", tmp_path).enroll()
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_malformed_csr_invalid_argument(controller: ServerFactory) -> None:
    server = controller.start()
    err = raw_enroll(server, "alpha", "alpha-token", b"not a csr")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "PKCS#10" in err.details()
    key = ec.generate_private_key(ec.SECP256R1())
    other = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bravo")])).sign(key, hashes.SHA256())
    err = raw_enroll(server, "alpha", "alpha-token", other.public_bytes(serialization.Encoding.DER))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "CN=alpha" in err.details()
    err = raw_enroll(server, "", "", b"")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "node_name is empty" in err.details()


def _watch_call(server, port: int, name: str, creds: grpc.ChannelCredentials) -> grpc.RpcError:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name=name), timeout=5)))
    return e.value


def test_watch_without_client_cert_denied(controller: ServerFactory) -> None:
    server = controller.start()
    err = _watch_call(server, server.port, "alpha", grpc.ssl_channel_credentials(server.ca_path.read_bytes()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "mutual TLS" in err.details()
    # The watch port refuses the TLS handshake altogether without a certificate.
    err = _watch_call(server, server.watch_port, "alpha",
                      grpc.ssl_channel_credentials(server.ca_path.read_bytes()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_watch_with_other_nodes_cert_denied(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    creds = client(controller, server, "bravo", "bravo-token", tmp_path).enroll()
    chain = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    mtls = grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, chain)
    err = _watch_call(server, server.watch_port, "alpha", mtls)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "client certificate is for 'bravo', not for node 'alpha'"


def test_watch_snapshot_then_incremental(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    w = Watcher(client(controller, server, "alpha", "alpha-token", tmp_path))
    try:
        wait_for(lambda: w.views, what="snapshot")
        first: NodeView = w.views[0]
        assert [p.name for p in first.peers] == ["bravo", "charlie"]
        assert first.local_address == "127.0.0.1" and str(first.subnets[0]) == "10.1.0.0/16"
        assert first.peer("bravo").initiate and first.peer("bravo").policy.dpd_interval_s == 10.0
        # charlie moves, bravo leaves, delta joins.
        text = inventory_text().replace("127.0.0.3", "127.0.0.33")
        text = text.replace("  - name: bravo\n    role: gateway\n    endpoints: [127.0.0.2]\n"
                            "    subnets: [10.2.0.0/16]\n", "  - name: bravo-gone\n    role: host\n")
        text += "  - name: delta\n    role: host\n    endpoints: [127.0.0.4]\n    join_token: d\n"
        write_inventory(controller.inventory, text)
        wait_for(lambda: len(w.views) >= 2, what="incremental update")
        second = w.views[-1]
        assert second.version == first.version + 1
        assert [p.name for p in second.peers] == ["bravo-gone", "charlie", "delta"]
        assert second.peer("charlie").endpoints == ("127.0.0.33",)
        # A bad inventory is rejected: no update, the old one stays in force.
        write_inventory(controller.inventory, "nodes: [\n")
        write_inventory(controller.inventory, text.replace("127.0.0.4", "999.0.0.4"))
        wait_for(lambda: server._stat == server._file_stat(), what="poll of the bad file")
        assert server.state.snapshot()[1] == second.version and len(w.views) == 2
    finally:
        w.close()


def test_reconnect_resumes_from_version_and_ca_survives_restart(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    ca_before = server.ca_path.read_bytes()
    w = Watcher(client(controller, server, "alpha", "alpha-token", tmp_path))
    try:
        wait_for(lambda: w.views, what="snapshot")
        v1 = w.views[-1].version
        server.stop(grace=0)
        write_inventory(controller.inventory, inventory_text().replace("127.0.0.3", "127.0.0.30"))
        server2 = controller.start(port=server.port, watch_listen=f"127.0.0.1:{server.watch_port}")
        assert server2.ca_path.read_bytes() == ca_before
        assert server2.state.snapshot()[1] == v1 + 1
        wait_for(lambda: len(w.views) >= 2, timeout=15, what="update after reconnect")
        assert w.views[-1].version == v1 + 1
        assert [p.name for p in w.views[-1].peers] == ["bravo", "charlie"]
        assert w.views[-1].peer("charlie").endpoints == ("127.0.0.30",)
    finally:
        w.close()


def test_resume_sends_only_changes(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    c = client(controller, server, "alpha", "alpha-token", tmp_path)
    creds = c.enroll()
    v1 = server.state.snapshot()[1]
    write_inventory(controller.inventory, inventory_text().replace("127.0.0.3", "127.0.0.31"))
    wait_for(lambda: server.state.snapshot()[1] == v1 + 1, what="reload")
    chain = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    mtls = grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, chain)
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls, options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        call = stub.Watch(pb.WatchRequest(node_name="alpha", since_version=v1))
        update = next(iter(call))
        call.cancel()
        assert not update.full and update.version == v1 + 1
        assert [p.name for p in update.upserted_peers] == ["charlie"] and not update.removed_peers
        call = stub.Watch(pb.WatchRequest(node_name="alpha", since_version=0))
        update = next(iter(call))
        call.cancel()
        assert update.full and [p.name for p in update.upserted_peers] == ["bravo", "charlie"]


def test_enroll_retries_until_controller_is_up(controller: ServerFactory, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = controller.start()
    port, watch_port, ca = server.port, server.watch_port, server.ca_path.read_bytes()
    server.stop(grace=0)
    c = ControllerClient(f"127.0.0.1:{port}", "alpha", "alpha-token", tmp_path / "agent", ca,
                         backoff_initial=0.05, backoff_max=0.1, rpc_timeout=2)
    result: list = []
    t = threading.Thread(target=lambda: result.append(c.enroll(stop=threading.Event())), daemon=True)
    with caplog.at_level(logging.WARNING, logger="meshsec.agent.control"):
        t.start()
        wait_for(lambda: "enrolment attempt 2" in caplog.text, what="retries")
        controller.start(port=port, watch_listen=f"127.0.0.1:{watch_port}")
        t.join(timeout=15)
    assert result and result[0].uses_certificates


def test_watch_reenrols_before_expiry(controller: ServerFactory, tmp_path: Path) -> None:
    import datetime as dt

    server = controller.start(cert_lifetime=dt.timedelta(seconds=3))
    renewed: list = []
    c = client(controller, server, "alpha", "alpha-token", tmp_path, on_credentials=renewed.append)
    first = c.enroll()
    assert c.renew_at is not None and 0.5 < c.renew_at - __import__("time").time() <= 2.1
    w = Watcher(c)
    try:
        wait_for(lambda: renewed, timeout=10, what="re-enrolment")
        assert renewed[0].certificate_chain != first.certificate_chain
        assert len(server.store.certificates_for("alpha")) >= 2
        wait_for(lambda: w.views, what="view after renewal")
    finally:
        w.close()
