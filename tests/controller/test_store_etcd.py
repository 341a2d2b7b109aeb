"""The controller's etcd store, leader election and two HA replicas in one
process, against a real etcd (Debian's etcd-server 3.4, one member on
127.0.0.1, ephemeral ports; skipped when the binary is missing).

Not covered here: a three-member etcd cluster and killing a controller
process (e2e/test_controller_ha.py).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from controller import store_etcd
from controller.ca import CertificateAuthority
from controller.leader import HaConfig, LeaderElector
from controller.store_etcd import (EtcdClient, EtcdError, EtcdStore, NotLeader, ViewFollower, parse_endpoints,
                                   prefix_end)
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd not installed (scripts/setup.sh installs etcd-server)")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdMember:
    """One single-member etcd cluster; ``url`` is its client URL. ``tls``: etcd's
    ``--cert-file``, ``--key-file`` and ``--trusted-ca-file`` (then ``https://`` and
    ``--client-cert-auth``) and ``probe_tls`` the :class:`EtcdTls` the start-up probe uses."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", tls: dict | None = None, probe_tls=None) -> None:
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.client_port}"
        self.workdir = workdir
        self.tls = tls
        self.probe_tls = probe_tls
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "EtcdMember":
        peer = f"http://{self.host}:{self.peer_port}"
        log = open(self.workdir / "etcd.log", "ab")
        extra = []
        if self.tls:
            extra = ["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"]),
                     "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]
        self.proc = subprocess.Popen(
            [shutil.which("etcd") or "etcd", "--name", "t0", "--data-dir", str(self.workdir / "etcd-data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t0={peer}", "--log-level", "error", *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = EtcdClient([self.url], timeout=1.0, tls=self.probe_tls)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("etcd exited:\n" + (self.workdir / "etcd.log").read_text()[-2000:])
            try:
                client.call("kv/range", {"key": "AA=="})
                return self
            except EtcdError:
                time.sleep(0.1)
        raise RuntimeError(f"etcd on {self.url} did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    member = EtcdMember(tmp_path_factory.mktemp("etcd")).start()
    yield member
    member.stop()


_prefixes = iter(range(1_000_000))


@pytest.fixture
def store(etcd) -> EtcdStore:
    """A store under a fresh key prefix (tests share the etcd member)."""
    return EtcdStore(EtcdClient(parse_endpoints(etcd.url)), f"/t{os.getpid()}-{next(_prefixes)}/")


# ---------------------------------------------------------------- pure helpers

def test_parse_endpoints_and_errors() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, 127.0.0.2:2379") == ["http://127.0.0.1:2379",
                                                                         "http://127.0.0.2:2379"]
    assert parse_endpoints("https://etcd-0:2379,https://[::1]:2379") == ["https://etcd-0:2379", "https://[::1]:2379"]
    for bad, what in (("ftp://h:2379", "ftp://h:2379"), ("http://h", "http://h"), ("", "empty"),
                      ("http://h:2379/x", "http://h:2379/x"), ("https://a:1,http://b:2", "mixes http:// and https://")):
        with pytest.raises(ValueError, match=what):
            parse_endpoints(bad)


def test_prefix_end() -> None:
    # etcd's rule: increment the last byte below 0xff, dropping trailing 0xff bytes
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"


def test_unreachable_etcd_is_a_clear_error() -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    client = EtcdClient([f"127.0.0.1:{port}"], timeout=0.5)
    with pytest.raises(EtcdError, match=f"no etcd endpoint answered /v3/kv/range: 127.0.0.1:{port}"):
        EtcdStore(client).current_version()


def test_bad_prefix_refused() -> None:
    with pytest.raises(ValueError, match="must start and end with '/'"):
        EtcdStore(EtcdClient(["127.0.0.1:1"]), "meshsec")


# ---------------------------------------------------------------- store contract

def test_versions_history_and_certificates(store: EtcdStore, monkeypatch) -> None:
    assert store.current_version() == 0 and store.inventory_at(0) is None and store.inventory_at(1) is None
    assert store.record_inventory('{"v": 1}') == (1, True)
    assert store.record_inventory('{"v": 1}') == (1, False)  # unchanged: no bump
    assert store.record_inventory('{"v": 2}') == (2, True)
    assert store.current_version() == 2 and store.inventory_at(1) == '{"v": 1}'
    monkeypatch.setattr(store_etcd, "HISTORY_KEEP", 2)
    assert store.record_inventory('{"v": 3}') == (3, True)
    assert store.inventory_at(1) is None and store.inventory_at(2) == '{"v": 2}'  # pruned, like SQLite
    store.add_certificate(0xBEEF, "alpha", 200, 300, b"der2")
    store.add_certificate(0xABC, "alpha", 100, 200, b"der1")
    store.add_certificate(0x1, "alphabet", 1, 2, b"x")  # a name with alpha as prefix stays apart
    assert store.certificates_for("alpha") == [("abc", 100, 200), ("beef", 200, 300)]
    assert store.certificates_for("nobody") == []


def test_concurrent_writers_never_lose_a_version(store: EtcdStore) -> None:
    other = EtcdStore(EtcdClient(store.client.endpoints), store.prefix.decode())
    results = []

    def writer(s: EtcdStore, tag: str) -> None:
        for i in range(10):
            results.append(s.record_inventory(f'{{"{tag}": {i}}}'))

    threads = [threading.Thread(target=writer, args=(s, t)) for s, t in ((store, "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(v for v, bumped in results if bumped)
    assert versions == list(range(1, 21))  # every write got its own version (CAS on view/head)


def test_ca_created_exactly_once_under_a_race(store: EtcdStore) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    stores = [EtcdStore(EtcdClient(store.client.endpoints), store.prefix.decode()) for _ in range(4)]
    cas: list[CertificateAuthority] = []
    barrier = threading.Barrier(len(stores))

    def create(s: EtcdStore) -> None:
        barrier.wait()
        cas.append(CertificateAuthority.load_or_create(s, now))

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pems = {ca.certificate_pem for ca in cas}
    assert len(pems) == 1  # every replica ended with the same CA
    keys = {ca.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()) for ca in cas}
    assert len(keys) == 1
    assert store.get_meta("ca_cert_pem") == pems.pop()


def test_incomplete_ca_material_is_refused(store: EtcdStore) -> None:
    store.set_meta("ca_cert_pem", b"only the certificate")
    with pytest.raises(EtcdError, match="incomplete"):
        store.create_meta_once({"ca_key_pem": b"k", "ca_cert_pem": b"c"})


def test_fenced_write_refused_after_losing_leadership(store: EtcdStore) -> None:
    store.set_fence(b"replica-1")
    store.client.put(store.leader_key, b"replica-1")
    assert store.record_inventory('{"v": 1}') == (1, True)
    store.client.put(store.leader_key, b"replica-2")  # someone else leads now
    with pytest.raises(NotLeader, match="no longer the leader"):
        store.record_inventory('{"v": 2}')
    assert store.current_version() == 1


def test_view_follower_sees_every_new_version(store: EtcdStore) -> None:
    store.record_inventory('{"v": 1}')
    seen: list[tuple[int, str]] = []
    f = ViewFollower(store, lambda v, j: seen.append((v, j)), resync=5.0)
    f.start()
    try:
        wait_for(lambda: seen, what="initial version")
        store.record_inventory('{"v": 2}')
        store.record_inventory('{"v": 3}')
        wait_for(lambda: seen[-1][0] == 3, what="watched versions")
        assert seen[0] == (1, '{"v": 1}') and seen[-1] == (3, '{"v": 3}')
        assert [v for v, _ in seen] == sorted({v for v, _ in seen})  # in order, never twice
    finally:
        t0 = time.monotonic()
        f.stop()
        assert time.monotonic() - t0 < 3, "follower did not stop promptly"


# ---------------------------------------------------------------- leader election

def test_election_one_leader_then_handover(store: EtcdStore) -> None:
    log = []
    a = LeaderElector(store.client, store.leader_key, "a", ttl=2, on_elected=lambda: log.append("a+"),
                      on_lost=lambda: log.append("a-"))
    b = LeaderElector(store.client, store.leader_key, "b", ttl=2, on_elected=lambda: log.append("b+"),
                      on_lost=lambda: log.append("b-"))
    assert a.campaign() is True and b.campaign() is False
    assert a.leader_id() == "a" and a.keepalive() is True
    a.stop()  # resigns: revokes its lease, the key disappears at once
    assert b.leader_id() is None and b.campaign() is True and b.leader_id() == "b"
    assert log == ["a+", "a-", "b+"]
    b.stop()


def test_leader_steps_down_when_its_lease_is_gone(store: EtcdStore) -> None:
    lost = threading.Event()
    a = LeaderElector(store.client, store.leader_key, "a", ttl=2, on_lost=lost.set)
    assert a.campaign()
    store.client.lease_revoke(a.lease)  # as if etcd had expired it
    assert a.keepalive() is False and lost.is_set() and not a.is_leader
    b = LeaderElector(store.client, store.leader_key, "b", ttl=2)
    assert b.campaign()
    b.stop()


class _DeadEtcd:
    """An etcd client whose every call fails (etcd unreachable)."""

    def lease_keepalive(self, lease):
        raise EtcdError("no etcd endpoint answered /v3/lease/keepalive")

    def get(self, key):
        raise EtcdError("no etcd endpoint answered /v3/kv/range")


def test_leader_keeps_role_within_ttl_then_steps_down_without_etcd() -> None:
    now = [100.0]
    a = LeaderElector(_DeadEtcd(), b"/x/leader", "a", ttl=6, clock=lambda: now[0])
    a.is_leader, a.lease, a._last_ok = True, 42, 100.0
    now[0] = 103.0
    assert a.keepalive() is True  # a blip shorter than the TTL: still leader
    now[0] = 106.0
    assert a.keepalive() is False and not a.is_leader  # etcd may have expired us: stop writing


def test_lease_ttl_below_two_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 seconds"):
        LeaderElector(_DeadEtcd(), b"k", "a", ttl=1)
    with pytest.raises(ValueError, match="at least 2 seconds"):
        HaConfig(["127.0.0.1:2379"], ttl=1)


# ---------------------------------------------------------------- two replicas in one process

def _enroll(server, name: str, token: str, tmp: Path):
    from agent.control import ControllerClient
    return ControllerClient(f"127.0.0.1:{server.port}", name, token, tmp / f"agent-{name}-{server.port}",
                            server.ca_path.read_bytes(), watch_address=f"127.0.0.1:{server.watch_port}",
                            backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5)


def test_two_replicas_leader_enrols_follower_serves_watch(etcd, tmp_path: Path) -> None:
    from agent.control import ControllerClient
    from meshsec.v1 import controller_pb2 as pb
    from meshsec.v1 import controller_pb2_grpc as pb_grpc

    prefix = f"/ha{os.getpid()}-{next(_prefixes)}/"
    factory = ServerFactory(tmp_path)
    try:
        cfg = lambda rid: HaConfig(parse_endpoints(etcd.url), prefix=prefix, ttl=2, replica_id=rid)
        one = factory.start(ha=cfg("one"))
        wait_for(lambda: one.is_leader and one.state.snapshot()[1] == 1, what="first replica elected, view recorded")
        factory.state_dir = tmp_path / "state-two"  # only ca.pem goes there with etcd
        two = factory.start(ha=cfg("two"))
        assert one.ca_path.read_bytes() == two.ca_path.read_bytes()  # one CA for both
        assert not two.is_leader and two.state.snapshot()[1] == one.state.snapshot()[1] == 1
        # the follower refuses enrolments (they write): UNAVAILABLE, so agents try the next address
        with grpc.secure_channel(f"127.0.0.1:{two.port}", grpc.ssl_channel_credentials(two.ca_path.read_bytes()),
                                 options=[("grpc.ssl_target_name_override", "meshsec-controller")]) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(node_name="alpha", join_token="alpha-token",
                                                                   csr_der=b"x"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "follower" in e.value.details()
        # an agent given both addresses, follower first, enrols at the leader
        both = ControllerClient(f"127.0.0.1:{two.port},127.0.0.1:{one.port}", "alpha", "alpha-token",
                                tmp_path / "agent-both", one.ca_path.read_bytes(),
                                watch_address=f"127.0.0.1:{two.watch_port},127.0.0.1:{one.watch_port}",
                                backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5)
        assert both.enroll().uses_certificates and both.address == f"127.0.0.1:{one.port}"
        assert len(two.store.certificates_for("alpha")) == 1  # the follower reads it from etcd
        # the follower's Watch streams get inventory changes the leader records
        views, stop = [], threading.Event()
        w = ControllerClient(f"127.0.0.1:{two.port}", "alpha", "alpha-token", tmp_path / "agent-both",
                             two.ca_path.read_bytes(), watch_address=f"127.0.0.1:{two.watch_port}",
                             backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5)  # reuses the certificate
        t = threading.Thread(target=w.watch, args=(views.append, stop), daemon=True)
        t.start()
        wait_for(lambda: views, what="snapshot from the follower")
        write_inventory(factory.inventory, inventory_text().replace("127.0.0.3", "127.0.0.33"))
        wait_for(lambda: views[-1].version == 2, what="update fanned out by the follower")
        assert views[-1].peer("charlie").endpoints == ("127.0.0.33",)
        assert two.metrics.registry.get_sample_value("meshsec_controller_watch_streams") == 1
        assert two.metrics.registry.get_sample_value("meshsec_controller_leader") == 0
        assert one.metrics.registry.get_sample_value("meshsec_controller_leader") == 1
        # the leader goes: the follower takes over and handles writes
        one.stop(grace=0)
        wait_for(lambda: two.is_leader, timeout=10, what="follower elected")
        assert two.metrics.registry.get_sample_value("meshsec_controller_leader") == 1
        write_inventory(factory.inventory, inventory_text().replace("127.0.0.3", "127.0.0.34"))
        wait_for(lambda: views[-1].version == 3, what="update recorded by the new leader")
        assert views[-1].peer("charlie").endpoints == ("127.0.0.34",)
        assert _enroll(two, "bravo", "bravo-token", tmp_path).enroll().uses_certificates
        stop.set()
        t.join(timeout=10)
    finally:
        factory.stop_all()


def _token_and_revocation_contract(s) -> None:
    """Used join tokens and revocations, the same on SQLite and etcd."""
    digest = bytes(range(32))
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(s.consume_token("alpha", digest, 1000)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]  # of concurrent enrolments exactly one uses the token
    assert s.consume_token("alpha", bytes(32), 1000) is True  # a new token (inventory changed) is fresh
    assert s.consume_token("alphabet", digest, 1000) is True  # tokens are per node
    big = (1 << 158) + 7
    s.revoke([(big, "alpha", 2000), (0xABC, "bravo", 3000)])
    s.revoke([(big, "alpha", 2000)])  # idempotent
    assert s.revoked(1500) == [(0xABC, "bravo", 3000), (big, "alpha", 2000)]
    assert s.revoked(2500) == [(0xABC, "bravo", 3000)]  # expired: forgotten
    assert s.revoked(1500) == [(0xABC, "bravo", 3000)]
    s.add_certificate(big, "alpha", 100, 2000, b"der")
    assert s.certificate_ders("alpha") == [(big, 2000, b"der")]


def test_tokens_and_revocations_etcd(store: EtcdStore) -> None:
    _token_and_revocation_contract(store)
