"""The controller's etcd client over TLS against a real etcd (Debian's etcd-server 3.4,
one member on 127.0.0.1) started with --cert-file/--key-file/--trusted-ca-file and
--client-cert-auth: two controller replicas elect a leader and fail over over TLS,
agents given both replicas enrol at the leader, a client without a certificate is
refused, a wrong CA or host name gives an error naming the flag to fix, and plain
HTTP to a non-loopback etcd needs the logged opt-out. Certificates are made here with
`cryptography` (a CA for etcd's server and client certificates, and a second, unrelated CA).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from controller.leader import HaConfig
from controller.main import main as controller_main
from controller.store_etcd import EtcdClient, EtcdError, EtcdStore, EtcdTls, check_plain_http, parse_endpoints
from tests.controller.ctl_helpers import ServerFactory, inventory_text, wait_for, write_inventory
from tests.controller.etcd_pki import issue, make_ca
from tests.controller.test_store_etcd import EtcdMember

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd not installed (scripts/setup.sh installs etcd-server)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "etcd-ca")
    make_ca(d, "other-ca")
    issue(d, ca, "etcd-server", server=True)
    issue(d, ca, "controller", server=False)
    other = make_ca(d, "stranger-ca")
    issue(d, other, "stranger", server=False)
    return SimpleNamespace(dir=d, ca=str(d / "etcd-ca.pem"), other_ca=str(d / "other-ca.pem"),
                           cert=str(d / "controller.pem"), key=str(d / "controller.key"),
                           stranger_cert=str(d / "stranger.pem"), stranger_key=str(d / "stranger.key"))


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory, pki):
    tls = {"cert": pki.dir / "etcd-server.pem", "key": pki.dir / "etcd-server.key", "ca": pki.ca}
    member = EtcdMember(tmp_path_factory.mktemp("etcd-tls"), tls=tls,
                        probe_tls=EtcdTls(pki.ca, pki.cert, pki.key)).start()
    yield member
    member.stop()


def good_tls(pki) -> EtcdTls:
    return EtcdTls(pki.ca, pki.cert, pki.key)


def test_store_works_over_tls_with_a_client_certificate(etcd_tls, pki) -> None:
    assert etcd_tls.url.startswith("https://127.0.0.1:")
    store = EtcdStore(EtcdClient(parse_endpoints(etcd_tls.url), tls=good_tls(pki)), f"/tls{os.getpid()}/")
    assert store.record_inventory('{"v": 1}') == (1, True)
    assert store.create_meta_once({"ca_key_pem": b"secret"}) == {"ca_key_pem": b"secret"}
    assert store.get_meta("ca_key_pem") == b"secret"


def test_plain_http_to_the_tls_port_fails(etcd_tls) -> None:
    plain = etcd_tls.url.replace("https://", "http://")
    with pytest.raises(EtcdError, match="no etcd endpoint answered"):
        EtcdStore(EtcdClient(parse_endpoints(plain), timeout=2)).current_version()


def test_client_without_certificate_is_refused_naming_the_flags(etcd_tls, pki) -> None:
    client = EtcdClient(parse_endpoints(etcd_tls.url), timeout=2, tls=EtcdTls(pki.ca))
    with pytest.raises(EtcdError) as e:
        client.get(b"/x")
    assert "without a client certificate" in str(e.value) and "give --etcd-cert and --etcd-key" in str(e.value)


def test_client_certificate_from_another_ca_is_refused(etcd_tls, pki) -> None:
    client = EtcdClient(parse_endpoints(etcd_tls.url), timeout=2,
                        tls=EtcdTls(pki.ca, pki.stranger_cert, pki.stranger_key))
    with pytest.raises(EtcdError) as e:
        client.get(b"/x")
    assert f"etcd refused our client certificate --etcd-cert {pki.stranger_cert}" in str(e.value)
    assert "--trusted-ca-file" in str(e.value)


def test_wrong_ca_names_the_flag_to_fix(etcd_tls, pki) -> None:
    client = EtcdClient(parse_endpoints(etcd_tls.url), timeout=2, tls=EtcdTls(pki.other_ca, pki.cert, pki.key))
    with pytest.raises(EtcdError) as e:
        client.get(b"/x")
    msg = str(e.value)
    assert f"etcd's certificate is not trusted by --etcd-cacert {pki.other_ca}" in msg, msg
    assert "give the CA that signed etcd's --cert-file with --etcd-cacert" in msg


def test_host_not_in_the_certificate_is_named(etcd_tls, pki) -> None:
    # the certificate names 127.0.0.1 and etcd.test, not localhost
    url = etcd_tls.url.replace("127.0.0.1", "localhost")
    client = EtcdClient(parse_endpoints(url), timeout=2, tls=good_tls(pki))
    with pytest.raises(EtcdError, match="etcd's certificate does not name 'localhost'.*--etcd-endpoints"):
        client.get(b"/x")


def test_unusable_tls_files_are_clear_errors(pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--etcd-cacert .*nope.pem: cannot load"):
        EtcdTls(str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="--etcd-cert and --etcd-key together"):
        EtcdTls(pki.ca, pki.cert)
    with pytest.raises(ValueError, match="cannot load the client certificate and its key"):
        EtcdTls(pki.ca, pki.cert, pki.stranger_key)  # a key that does not match
    with pytest.raises(ValueError, match="need https://"):
        EtcdClient(parse_endpoints("http://127.0.0.1:2379"), tls=good_tls(pki))


def test_plain_http_needs_loopback_or_the_logged_opt_out(caplog) -> None:
    check_plain_http(parse_endpoints("http://127.0.0.1:2379,http://[::1]:2379,http://localhost:1"), False)
    for eps in ("http://10.0.0.5:2379", "http://etcd:2379", "127.0.0.1:2379,http://198.51.100.9:2379"):
        with pytest.raises(ValueError, match="plain HTTP to a non-loopback etcd.*--etcd-allow-plain-http"):
            check_plain_http(parse_endpoints(eps), False)
    with caplog.at_level(logging.WARNING):
        check_plain_http(parse_endpoints("http://etcd:2379"), True)
    assert "--etcd-allow-plain-http: talking to etcd http://etcd:2379 over plain HTTP" in caplog.text
    check_plain_http(parse_endpoints("https://etcd:2379"), False)  # TLS: nothing to refuse


def test_controller_flags(tmp_path: Path, capsys, pki) -> None:
    inv = tmp_path / "inv.yaml"
    write_inventory(inv, inventory_text())
    base = ["--inventory", str(inv), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"]
    for flags, msg in (
            (["--etcd-endpoints", "http://198.51.100.9:2379"], "plain HTTP to a non-loopback etcd"),
            (["--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-cacert", pki.ca],
             "--etcd-cacert needs https:// --etcd-endpoints"),
            (["--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cert", pki.cert],
             "give --etcd-cert and --etcd-key together"),
            (["--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cacert", str(tmp_path / "missing.pem")],
             "--etcd-cacert"),
            (["--etcd-cacert", pki.ca], "--etcd-cacert needs --etcd-endpoints")):
        assert controller_main(base + flags) == 2, flags
        assert msg in capsys.readouterr().err, flags


def test_controller_exits_1_naming_the_ca_flag(etcd_tls, pki, tmp_path: Path, capsys) -> None:
    inv = tmp_path / "inv.yaml"
    write_inventory(inv, inventory_text())
    rc = controller_main(["--inventory", str(inv), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0",
                          "--etcd-endpoints", etcd_tls.url, "--etcd-cacert", pki.other_ca,
                          "--etcd-cert", pki.cert, "--etcd-key", pki.key])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not trusted by --etcd-cacert" in err and "give the CA that signed etcd's --cert-file" in err, err


def test_two_replicas_elect_and_fail_over_over_tls(etcd_tls, pki, tmp_path: Path) -> None:
    """Two replicas on the TLS etcd: one leader, the follower refuses Enroll so an agent with both
    addresses enrols at the leader; the leader stops, the follower takes over and enrols."""
    from agent.control import ControllerClient

    prefix = f"/hatls{os.getpid()}/"
    factory = ServerFactory(tmp_path)
    args = lambda rid: SimpleNamespace(etcd_endpoints=etcd_tls.url, etcd_cacert=pki.ca, etcd_cert=pki.cert,
                                       etcd_key=pki.key, etcd_allow_plain_http=False, etcd_prefix=prefix,
                                       etcd_lease_ttl=2, replica_id=rid)
    try:
        one = factory.start(ha=HaConfig.from_args(args("one")))
        assert one._replica.client.tls is not None and one._replica.client.endpoints[0].startswith("https://")
        wait_for(lambda: one.is_leader and one.state.snapshot()[1] == 1, what="first replica elected over TLS")
        factory.state_dir = tmp_path / "state-two"
        two = factory.start(ha=HaConfig.from_args(args("two")))
        assert one.ca_path.read_bytes() == two.ca_path.read_bytes()  # one CA, read from etcd over TLS
        assert not two.is_leader
        agent = ControllerClient(f"127.0.0.1:{two.port},127.0.0.1:{one.port}", "alpha", "alpha-token",
                                 tmp_path / "agent-alpha", one.ca_path.read_bytes(),
                                 watch_address=f"127.0.0.1:{two.watch_port},127.0.0.1:{one.watch_port}",
                                 backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5)
        assert agent.enroll().uses_certificates and agent.address == f"127.0.0.1:{one.port}"
        one.stop(grace=0)  # resigns: revokes its lease
        wait_for(lambda: two.is_leader, timeout=10, what="follower elected over TLS")
        write_inventory(factory.inventory, inventory_text().replace("127.0.0.3", "127.0.0.35"))
        wait_for(lambda: two.state.snapshot()[1] == 2, what="new leader records a view version")
        bravo = ControllerClient(f"127.0.0.1:{two.port}", "bravo", "bravo-token", tmp_path / "agent-bravo",
                                 two.ca_path.read_bytes(), watch_address=f"127.0.0.1:{two.watch_port}",
                                 backoff_initial=0.05, backoff_max=0.2, rpc_timeout=5)
        assert bravo.enroll().uses_certificates
        assert len(two.store.certificates_for("bravo")) == 1
    finally:
        factory.stop_all()
