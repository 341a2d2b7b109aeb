"""Stored view (controller down at restart), clear start-up errors, and the routes'
underlay carve-outs in the kernel.

The last test uses a network namespace it creates:

    netns mscarve-<pid>: lo up, TUN mscarve0 (nothing leaves the namespace)
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import main as agent_main
from agent.datapath.control_socket import ControlServer, ControlSocketError
from agent.datapath.tun import existing_device_kind
from agent.datapath.view_store import (StoredStateError, load_view, save_view, stored_credentials, view_from_json,
                                       view_to_json)
from agent.model import NodeView, Peer, PeerPolicy

NET = ipaddress.ip_network


def _view(version=5):
    pol = PeerPolicy(mode="transport", ike_proposals=("aes128gcm16-prfsha256-x25519",), replay_window=2048,
                     bind_endpoints=True, request_virtual_ip=(4,), rule="r1")
    return NodeView(name="gw-a", identity="gw-a", subnets=(NET("10.1.0.0/24"),), local_address="198.51.100.1",
                    version=version, revoked_serials=frozenset({4660, 2 ** 150}),
                    peers=(Peer(name="gw-b", identity="gw-b", endpoints=("198.51.100.2",),
                                subnets=(NET("10.2.0.0/24"), NET("fd00:2::/64")), policy=pol, ike_port=4500,
                                psk=b"never written", initiate=False),))


def test_view_round_trips_without_keys_atomically_mode_0600(tmp_path):
    v = _view()
    path = save_view(tmp_path / "state", v, now=1234.5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"never written" not in path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["view.json"]  # no temporary file left
    got, saved = load_view(tmp_path / "state", "gw-a")
    assert saved == 1234.5
    assert got == replace(v, peers=(replace(v.peers[0], psk=None),))
    assert view_from_json(view_to_json(got)) == got


def test_unusable_stored_views_are_refused_with_the_reason(tmp_path):
    with pytest.raises(StoredStateError, match="no stored view"):
        load_view(tmp_path, "gw-a")
    save_view(tmp_path, _view())
    with pytest.raises(StoredStateError, match="view of node 'gw-a', not 'gw-b'"):
        load_view(tmp_path, "gw-b")
    (tmp_path / "view.json").write_text('{"format": 1, "view": {"name": "gw-a", "version": "x"}}')
    with pytest.raises(StoredStateError, match="unusable .*version"):
        load_view(tmp_path, "gw-a")
    (tmp_path / "view.json").write_bytes(b"\xff\x00garbage")
    with pytest.raises(StoredStateError, match="unusable"):
        load_view(tmp_path, "gw-a")


def _store_cert(d, name, not_before, not_after, key_for_cert=None):
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(not_before).not_valid_after(not_after)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key((key_for_cert or key).public_key()).serial_number(2)
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    d.mkdir(parents=True, exist_ok=True)
    (d / "node.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    (d / "node.crt").write_bytes(leaf.public_bytes(pem))
    (d / "mesh-ca.pem").write_bytes(ca.public_bytes(pem))


def test_stored_credentials_only_while_the_certificate_is_valid(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    _store_cert(tmp_path / "ok", "gw-a", now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1))
    creds, not_after = stored_credentials(tmp_path / "ok", "gw-a", time.time())
    assert creds.uses_certificates and not_after > time.time()
    with pytest.raises(StoredStateError, match="not for node 'gw-b'"):
        stored_credentials(tmp_path / "ok", "gw-b", time.time())
    _store_cert(tmp_path / "old", "gw-a", now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
    with pytest.raises(StoredStateError, match="not valid now"):
        stored_credentials(tmp_path / "old", "gw-a", time.time())
    _store_cert(tmp_path / "mix", "gw-a", now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1),
                key_for_cert=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(StoredStateError, match="not for the stored key"):
        stored_credentials(tmp_path / "mix", "gw-a", time.time())
    with pytest.raises(StoredStateError, match="no stored certificate"):
        stored_credentials(tmp_path / "none", "gw-a", time.time())


def test_stored_fallback_needs_view_and_valid_certificate(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    assert agent_main._stored_fallback(str(tmp_path), "gw-a") is None  # nothing stored: wait for the controller
    save_view(tmp_path, _view(version=9))
    assert agent_main._stored_fallback(str(tmp_path), "gw-a") is None  # no certificate yet
    _store_cert(tmp_path, "gw-a", now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1))
    view, creds, _saved = agent_main._stored_fallback(str(tmp_path), "gw-a")
    assert view.version == 9 and view.revoked_serials == frozenset({4660, 2 ** 150})
    _store_cert(tmp_path, "gw-a", now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
    assert agent_main._stored_fallback(str(tmp_path), "gw-a") is None  # expired: wait for the controller


class _HangingClient:
    """A controller client whose enrolment never finishes (controller unreachable)."""

    def __init__(self):
        self.release = threading.Event()

    def enroll(self, stop):
        while not stop.is_set() and not self.release.wait(0.01):
            pass
        return "creds"


def test_enrolment_wait_gives_up_after_the_limit_and_keeps_enrolling():
    client, stop = _HangingClient(), threading.Event()
    e = agent_main._Enrolment(client, stop)
    e.start()
    t0 = time.monotonic()
    assert e.wait(0.2) is None and 0.15 <= time.monotonic() - t0 < 2
    assert e.is_alive()  # still trying in the background; the watch thread picks up its result
    client.release.set()
    e.join(2)
    assert e.creds == "creds" and e.wait(0) == "creds"


def test_enrolment_refusal_is_a_startup_error():
    from agent.control import EnrollmentError

    class Refusing:
        def enroll(self, stop):
            raise EnrollmentError("controller refused enrolment of 'gw-a': UNAUTHENTICATED: bad token")

    e = agent_main._Enrolment(Refusing(), threading.Event())
    e.start()
    with pytest.raises(agent_main.StartupError, match="enrolment failed: .*bad token"):
        e.wait(None)


# ------------------------------------------------------------------ minor: clear errors

def test_control_socket_directory_that_cannot_be_created(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ControlSocketError, match=r"cannot create .*file/sub.*pass --control-socket"):
        ControlServer(str(f / "sub" / "agent.sock"), {})
    with pytest.raises(ControlSocketError, match="longer than 107 bytes"):
        ControlServer(str(tmp_path / ("x" * 120)), {})


def test_existing_device_kind_tells_tun_from_others(tmp_path):
    for name, files in {"meshsec0": {"tun_flags": "0x1001", "type": "65534"}, "tap0": {"tun_flags": "0x1002"},
                        "eth0": {"type": "1"}, "lo": {"type": "772"}}.items():
        (tmp_path / name).mkdir()
        for k, v in files.items():
            (tmp_path / name / k).write_text(v + "\n")
    kinds = {n: existing_device_kind(n, str(tmp_path)) for n in ("meshsec0", "tap0", "eth0", "lo", "absent")}
    assert kinds == {"meshsec0": "tun", "tap0": "tap", "eth0": "ether", "lo": "loopback", "absent": None}


def test_help_points_to_the_config_format(capsys):
    with pytest.raises(SystemExit):
        agent_main.main(["--help"])
    out = capsys.readouterr().out
    assert "docs/config.md" in out and "peers:" in out and "--stored-view-after" in out
    assert os.path.exists(os.path.join(os.path.dirname(agent_main.__file__), "..", "docs", "config.md"))


# ------------------------------------------------------------------ kernel: TUN and carve-outs

_NS_SCRIPT = r"""
import ipaddress, subprocess, sys
from agent.datapath.routes import RouteManager
from agent.datapath.tun import TunDevice, TunError
try:
    TunDevice("lo", 1400)
except TunError as exc:
    print("LO", exc, flush=True)
tun = TunDevice("mscarve0", 1400)
rm = RouteManager(tun.name, table=4301, mark=0x4301, rule_priority=4300)
wide = ipaddress.ip_network("198.51.100.0/24")
rm.sync({wide}, keep_out={"198.51.100.1", "198.51.100.2", "203.0.113.9"})
print("CARVED", ",".join(rm.carve_outs), flush=True)
sys.stdin.readline()
rm.sync(set(), keep_out={"198.51.100.1", "198.51.100.2"})
print("AFTER", ",".join(rm.carve_outs), flush=True)
rm.remove_all()
rm.close()
tun.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
                    reason="needs root, iproute2 and /dev/net/tun")
def test_kernel_carve_outs_keep_underlay_addresses_out_of_the_tun():
    ns = f"mscarve-{os.getpid()}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _NS_SCRIPT],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=root)
        try:
            lo = proc.stdout.readline()
            assert lo.startswith("LO ") and "already exists and is not a TUN device (it is loopback)" in lo, lo
            assert proc.stdout.readline().strip() == "CARVED 198.51.100.1,198.51.100.2"
            rules = subprocess.run(["ip", "-n", ns, "-4", "rule", "show"], capture_output=True, text=True).stdout
            assert "4300:\tfrom all to 198.51.100.2 lookup main" in rules, rules
            get = lambda d: subprocess.run(["ip", "-n", ns, "route", "get", d], capture_output=True,  # noqa: E731
                                           text=True)
            assert "dev mscarve0" in get("198.51.100.7").stdout  # the rest of the subnet is routed
            res = get("198.51.100.2")  # the peer endpoint is not: main table (no route here)
            assert "mscarve0" not in res.stdout and res.returncode != 0, (res.stdout, res.stderr)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "AFTER"
        finally:
            out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        rules = subprocess.run(["ip", "-n", ns, "-4", "rule", "show"], capture_output=True, text=True).stdout
        assert "198.51.100" not in rules and "4301" not in rules
    finally:
        subprocess.run(["ip", "netns", "del", ns])
