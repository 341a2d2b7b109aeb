"""Enrolment, renewal and revocation, against an in-process controller on 127.0.0.1:

- join tokens are single-use; renewal goes over mutual TLS (Renew);
- a new key or a removal revokes the node's earlier certificates, and the
  revoked serials reach every agent's view (incrementally, bounded by expiry);
- renewed credentials are reported through on_credentials;
- a node removed from the inventory gets NOT_FOUND, clears its peers and
  retries quietly at the maximum backoff;
- a wrong controller CA is a clear, permanent error."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import control
from agent.control import ControlError, ControllerClient, EnrollmentError
from agent.keystore import CERT_FILE
from controller.ca import CertificateAuthority
from controller.policy import NodeSpec
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.test_grpc import OPTS, Watcher, client


def csr_der(name: str, key=None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def enrol_raw(server, name: str, token: str, key=None):
    der, key = csr_der(name, key)
    with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(server.ca_path.read_bytes()),
                             options=OPTS) as ch:
        return pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(node_name=name, join_token=token, csr_der=der),
                                                 timeout=5), key


def renew_raw(server, port: int, name: str, key, chain_der: bytes | None):
    der, _ = csr_der(name, key)
    if chain_der is None:
        creds = grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    else:
        pem = x509.load_der_x509_certificate(chain_der).public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        creds = grpc.ssl_channel_credentials(server.ca_path.read_bytes(), key_pem, pem)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=OPTS) as ch:
        return pb_grpc.ControllerStub(ch).Renew(pb.RenewRequest(node_name=name, csr_der=der), timeout=5)


def serial(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def with_token(text: str, node: str, token: str) -> str:
    return text.replace(f"join_token: {node}-token", f"join_token: {token}")


# -- single-use tokens, renewal over mTLS ------------------------------------

def test_second_enrolment_with_a_used_token_is_refused(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    first, _ = enrol_raw(server, "alpha", "alpha-token")
    # the impostor: same name, same token, its own key, another connection
    with pytest.raises(grpc.RpcError) as e:
        enrol_raw(server, "alpha", "alpha-token")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "join token for node 'alpha' was already used" in e.value.details()
    assert "set a new join_token" in e.value.details()
    assert [int(s, 16) for s, _, _ in server.store.certificates_for("alpha")] == [serial(first.certificate_chain_der[0])]
    # the used token survives a controller restart (it is in the store)
    server.stop(grace=0)
    server = controller.start()
    with pytest.raises(grpc.RpcError) as e:
        enrol_raw(server, "alpha", "alpha-token")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_new_token_rearms_enrolment_and_revokes_the_old_key(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    first, _ = enrol_raw(server, "alpha", "alpha-token")
    v = server.state.snapshot()[1]
    write_inventory(controller.inventory, with_token(inventory_text(), "alpha", "alpha-token-2"))
    wait_for(lambda: server._stat == server._file_stat(), what="reload")
    assert server.state.snapshot()[1] == v  # a token change alone changes no view
    second, _ = enrol_raw(server, "alpha", "alpha-token-2")
    old = serial(first.certificate_chain_der[0])
    inv, v2 = server.state.snapshot()
    assert inv.revoked_serials == {old} and v2 == v + 1
    assert serial(second.certificate_chain_der[0]) not in inv.revoked_serials


def test_renew_over_mtls_needs_no_token_and_keeps_the_key(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    first, key = enrol_raw(server, "alpha", "alpha-token")
    renewed = renew_raw(server, server.watch_port, "alpha", key, first.certificate_chain_der[0])
    assert serial(renewed.certificate_chain_der[0]) != serial(first.certificate_chain_der[0])
    assert x509.load_der_x509_certificate(renewed.certificate_chain_der[0]).public_key() == key.public_key()
    assert not server.state.snapshot()[0].revoked  # same key: nothing replaced
    # without a client certificate (the enrol port) and for another node: refused
    with pytest.raises(grpc.RpcError) as e:
        renew_raw(server, server.port, "alpha", key, None)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "mutual TLS" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        renew_raw(server, server.watch_port, "bravo", key, first.certificate_chain_der[0])
    assert e.value.details() == "client certificate is for 'alpha', not for node 'bravo'"


def test_renew_with_a_revoked_certificate_is_refused(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    first, key = enrol_raw(server, "alpha", "alpha-token")
    # a renewal with a new key revokes the first certificate ...
    der, new_key = csr_der("alpha")
    pem = x509.load_der_x509_certificate(first.certificate_chain_der[0]).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}",
                             grpc.ssl_channel_credentials(server.ca_path.read_bytes(), key_pem, pem), options=OPTS) as ch:
        pb_grpc.ControllerStub(ch).Renew(pb.RenewRequest(node_name="alpha", csr_der=der), timeout=5)
    assert server.state.snapshot()[0].revoked_serials == {serial(first.certificate_chain_der[0])}
    # ... which can then neither renew nor watch
    with pytest.raises(grpc.RpcError) as e:
        renew_raw(server, server.watch_port, "alpha", key, first.certificate_chain_der[0])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "was revoked" in e.value.details()
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}",
                             grpc.ssl_channel_credentials(server.ca_path.read_bytes(), key_pem, pem), options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="alpha"), timeout=5)))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "was revoked" in e.value.details()


def test_client_renews_over_mtls_after_its_token_was_used(controller: ServerFactory, tmp_path: Path) -> None:
    # 60 s certificates are backdated 5 min: renewal (at 2/3 of the lifetime) is due at once
    server = controller.start(cert_lifetime=dt.timedelta(seconds=60))
    first = client(controller, server, "alpha", "alpha-token", tmp_path).enroll()
    os.utime(tmp_path / "agent-alpha" / CERT_FILE, (0, 0))  # the token is wrong now: Renew must not need it
    reported: list = []
    c = client(controller, server, "alpha", "no-longer-valid", tmp_path, on_credentials=reported.append)
    c._credentials = first  # as if this client had handed out `first` before
    again = c.enroll()
    assert again.certificate_chain != first.certificate_chain
    assert again.private_key_pem == first.private_key_pem
    assert reported == [again]


# -- revocation carried in the view -----------------------------------------

def test_revocations_reach_views_incrementally_and_expire(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    old_alpha, _ = enrol_raw(server, "alpha", "alpha-token")
    charlie, _ = enrol_raw(server, "charlie", "charlie-token")
    w = Watcher(client(controller, server, "bravo", "bravo-token", tmp_path))
    try:
        wait_for(lambda: w.views, what="snapshot")
        assert w.views[-1].revoked_serials == frozenset()
        # alpha re-enrols with a new key (operator set a new token): its old serial is revoked
        text = with_token(inventory_text(), "alpha", "alpha-token-2")
        write_inventory(controller.inventory, text)
        wait_for(lambda: server._stat == server._file_stat(), what="reload")
        enrol_raw(server, "alpha", "alpha-token-2")
        a = serial(old_alpha.certificate_chain_der[0])
        wait_for(lambda: w.views[-1].revoked_serials == {a}, what="alpha's old serial in bravo's view")
        # charlie leaves the inventory: its certificate is revoked too
        write_inventory(controller.inventory, text.replace("  - name: charlie\n    role: host\n    endpoints: "
                                                           "[127.0.0.3]\n    join_token: charlie-token\n", ""))
        c = serial(charlie.certificate_chain_der[0])
        wait_for(lambda: w.views[-1].revoked_serials == {a, c}, what="charlie's serial revoked")
        assert [p.name for p in w.views[-1].peers] == ["alpha"]
        # once the certificates expired the serials leave the views (the list stays bounded)
        assert server.refresh_revoked(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2))
        wait_for(lambda: w.views[-1].revoked_serials == frozenset(), what="expired serials dropped")
        assert server.store.revoked(int(dt.datetime.now(dt.timezone.utc).timestamp()) + 7200) == []
    finally:
        w.close()


def test_resume_carries_revocations_made_meanwhile(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    old_alpha, _ = enrol_raw(server, "alpha", "alpha-token")
    creds = client(controller, server, "bravo", "bravo-token", tmp_path).enroll()
    v1 = server.state.snapshot()[1]
    write_inventory(controller.inventory, with_token(inventory_text(), "alpha", "alpha-token-2"))
    wait_for(lambda: server._stat == server._file_stat(), what="reload")
    enrol_raw(server, "alpha", "alpha-token-2")
    pem = x509.load_der_x509_certificate(creds.certificate_chain[0]).public_bytes(serialization.Encoding.PEM)
    mtls = grpc.ssl_channel_credentials(server.ca_path.read_bytes(), creds.private_key_pem, pem)
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", mtls, options=OPTS) as ch:
        call = pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="bravo", since_version=v1))
        assert call.initial_metadata() == (("meshsec-watch", "established"),)
        update = next(iter(call))
        call.cancel()
    assert not update.full and not update.upserted_peers
    assert [int.from_bytes(b, "big") for b in update.revoked_serials] == [serial(old_alpha.certificate_chain_der[0])]


# -- the Kubernetes cluster-wide token ---------------------------------------------------

class StaticSource:
    name = "kubernetes"

    def __init__(self, nodes) -> None:
        self._nodes = tuple(nodes)

    def nodes(self):
        return self._nodes

    def start(self, on_change) -> None:
        pass

    def wait_synced(self, timeout: float) -> bool:
        return True

    def stop(self) -> None:
        pass


def test_cluster_token_only_enrols_a_node_without_a_current_certificate(controller: ServerFactory) -> None:
    digest = hashlib.sha256(b"cluster-token-0123456789").digest()
    source = StaticSource([NodeSpec("k8s-1", "gateway", ("127.0.0.9",), ("10.244.1.0/24",), digest, True)])
    server = controller.start(node_source=source)
    first, key = enrol_raw(server, "k8s-1", "cluster-token-0123456789")
    with pytest.raises(grpc.RpcError) as e:
        enrol_raw(server, "k8s-1", "cluster-token-0123456789")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already holds a valid certificate" in e.value.details() and "--kube-token-review" in e.value.details()
    # once that certificate is revoked (or expired) the cluster token enrols the node again
    server.store.revoke([(serial(first.certificate_chain_der[0]), "k8s-1", first.not_after)])
    enrol_raw(server, "k8s-1", "cluster-token-0123456789")


# -- removed node, re-added with a new token ----------------------------

def test_removed_node_clears_peers_retries_quietly_then_reenrols(controller: ServerFactory, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    server = controller.start()
    token = ["charlie-token"]
    reported: list = []
    c = client(controller, server, "charlie", lambda: token[0], tmp_path, on_credentials=reported.append)
    first = c.enroll()
    caplog.set_level(logging.INFO, logger="test.agent.charlie")  # before the watch thread logs
    w = Watcher(c)
    try:
        with caplog.at_level(logging.INFO, logger="test.agent.charlie"):
            wait_for(lambda: w.views and w.views[-1].peers, what="snapshot")
            wait_for(lambda: "watching view of 'charlie'" in caplog.text, what="watch log line")
            gone = inventory_text().replace("  - name: charlie\n    role: host\n    endpoints: [127.0.0.3]\n"
                                            "    join_token: charlie-token\n", "")
            write_inventory(controller.inventory, gone)
            wait_for(lambda: not w.views[-1].peers, what="empty view")
            assert w.views[-1].name == "charlie" and w.views[-1].revoked_serials == frozenset()
            n_views = len(w.views)
            # keeps retrying at the max backoff (0.2 s here) but logs once a minute
            wait_for(lambda: caplog.text.count("retrying every") >= 1, what="removal logged")
            threading.Event().wait(1.0)
            assert caplog.text.count("was removed from the inventory") + caplog.text.count(
                "is not in the inventory") == 1, caplog.text
            assert len(w.views) == n_views  # the empty view is delivered once
            # the operator adds it back with a new token: its revoked certificate is replaced
            token[0] = "charlie-token-2"
            write_inventory(controller.inventory, with_token(inventory_text(), "charlie", "charlie-token-2"))
            wait_for(lambda: w.views[-1].peers, timeout=15, what="peers back")
        assert reported and reported[-1].certificate_chain != first.certificate_chain
        assert reported[-1].private_key_pem == first.private_key_pem
        assert serial(first.certificate_chain[0]) in w.views[-1].revoked_serials
    finally:
        w.close()


# -- the controller CA -----------------------------------------------------

def test_garbage_controller_ca_fails_at_start(tmp_path: Path) -> None:
    for pem, why in [(b"garbage", "not a PEM CA certificate"), (b"", "not a PEM CA certificate")]:
        with pytest.raises(ControlError, match=why):
            ControllerClient("127.0.0.1:1", "alpha", "t", tmp_path, pem)


def test_wrong_controller_ca_is_logged_as_such_and_retried_at_max_backoff(
        controller: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    server = controller.start()
    other_ca = CertificateAuthority.create(dt.datetime.now(dt.timezone.utc)).certificate_pem
    c = ControllerClient(f"127.0.0.1:{server.port}", "alpha", "alpha-token", tmp_path / "a", other_ca,
                         backoff_initial=0.01, backoff_max=0.3, rpc_timeout=5,
                         logger=logging.getLogger("test.agent.wrongca"))
    delays: list = []
    real = c._retry_delay
    monkeypatch.setattr(c, "_retry_delay", lambda *a: delays.append(real(*a)) or delays[-1])
    stop = threading.Event()
    t = threading.Thread(target=lambda: pytest.raises(control.EnrollmentAborted, c.enroll, stop=stop), daemon=True)
    with caplog.at_level(logging.ERROR, logger="test.agent.wrongca"):
        t.start()
        wait_for(lambda: len(delays) >= 2, what="two attempts")
        stop.set()
        t.join(10)
    assert "does not verify against --controller-ca" in caplog.text
    assert delays[:2] == [0.3, 0.3]
    assert server.store.certificates_for("alpha") == []


def test_enrollment_error_is_permanent_for_a_used_token(controller: ServerFactory, tmp_path: Path) -> None:
    server = controller.start()
    client(controller, server, "alpha", "alpha-token", tmp_path / "one").enroll()
    with pytest.raises(EnrollmentError, match="already used") as e:
        client(controller, server, "alpha", "alpha-token", tmp_path / "two").enroll()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_tokens_and_revocations_sqlite(tmp_path: Path) -> None:
    from controller.store import Store
    from tests.controller.test_store_etcd import _token_and_revocation_contract

    s = Store(tmp_path / "state")
    try:
        _token_and_revocation_contract(s)
    finally:
        s.close()
