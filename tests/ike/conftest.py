"""Fixtures for the sans-I/O IKE tests: a test CA with ECDSA P-256 node certificates,
deterministic rng, fake clock, and a two-node in-memory harness."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass, field, replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ike.manager import IkeManager
from agent.model import Credentials, NodeView, Peer, PeerPolicy

T0 = 1_700_000_000.0  # fake clock start (2023-11-14), inside the certificates' validity
A_ADDR = "198.51.100.1"
B_ADDR = "198.51.100.2"
A_NET = ipaddress.ip_network("10.1.0.0/16")
B_NET = ipaddress.ip_network("10.2.0.0/16")


class DetRng:
    """Deterministic rng(n) -> bytes (SHA-256 counter mode over a seed)."""

    def __init__(self, seed: str):
        self.seed = seed.encode()
        self.n = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:n]


def _key(seed: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(seed, ec.SECP256R1())


def make_ca(name: str, seed: int):
    key = _key(seed)
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    nb = datetime.datetime.fromtimestamp(T0 - 86400, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj).public_key(key.public_key())
            .serial_number(seed).not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_node_cert(ca, name: str, seed: int, san: str | None = None):
    ca_key, ca_cert = ca
    key = _key(seed)
    nb = datetime.datetime.fromtimestamp(T0 - 3600, datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(seed)
            .not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san or name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def pki():
    ca = make_ca("meshsec test CA", 1001)
    other = make_ca("some other CA", 2002)
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    return {
        "ca": der(ca[1]), "other_ca": der(other[1]),
        "a": make_node_cert(ca, "node-a", 11), "b": make_node_cert(ca, "node-b", 12),
        "b_other_ca": make_node_cert(other, "node-b", 13),
        "b_wrong_san": make_node_cert(ca, "node-b", 14, san="node-x"),
    }


def cert_creds(pki, who: str, ca: str = "ca") -> Credentials:
    pem, der = pki[who]
    return Credentials(private_key_pem=pem, certificate_chain=(der,), ca_certificates=(pki[ca],))


def view(me: str, peer_name: str, *, my_net=None, peer_net=None, my_addr=None, peer_addr=None,
         policy: PeerPolicy | None = None, psk=None, initiate=True, peer_identity=None) -> NodeView:
    policy = CLASSICAL if policy is None else policy
    me_a = me == "node-a"
    peer = Peer(name=peer_name, identity=peer_identity or peer_name,
                endpoints=(peer_addr or (B_ADDR if me_a else A_ADDR),),
                subnets=(peer_net or (B_NET if me_a else A_NET),), policy=policy, psk=psk, initiate=initiate)
    return NodeView(name=me, identity=me, subnets=(my_net or (A_NET if me_a else B_NET),), peers=(peer,),
                    local_address=my_addr or (A_ADDR if me_a else B_ADDR))


# Message-flow tests assume the classical exchange (IKE_SA_INIT then IKE_AUTH);
# the hybrid post-quantum default (IKE_INTERMEDIATE in between) has its own
# tests in test_pq_hybrid.py, and the e2e mesh runs the real defaults.
CLASSICAL = PeerPolicy(ike_proposals=tuple(p for p in PeerPolicy().ike_proposals if "mlkem" not in p))


@dataclass
class Net:
    """Two IkeManagers joined by an in-memory 'wire' with a fake clock.

    ``drop`` decides per datagram whether the wire loses it; ``log`` records
    (sender, Datagram) for every datagram handed to the wire.
    """
    a: IkeManager
    b: IkeManager
    now: float = T0
    log: list = field(default_factory=list)
    drop: object = None
    events: dict = field(default_factory=lambda: {"a": [], "b": []})

    def _drain_events(self):
        for name, m in (("a", self.a), ("b", self.b)):
            while (e := m.next_event()) is not None:
                self.events[name].append(e)

    def pump(self, max_rounds: int = 50) -> None:
        """Deliver datagrams until both sides are quiet."""
        for _ in range(max_rounds):
            moved = False
            for src, dst in (("a", self.b), ("b", self.a)):
                sender = self.a if src == "a" else self.b
                for d in sender.datagrams_to_send():
                    moved = True
                    self.log.append((src, d))
                    if self.drop and self.drop(src, d):
                        continue
                    dst.receive_datagram(d.data, d.remote, d.local, self.now)
            self._drain_events()
            if not moved:
                return

    def advance(self, to: float) -> None:
        """Move the fake clock to ``to``, firing every timer on the way."""
        while True:
            ts = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None and t <= to]
            if not ts:
                break
            self.now = max(self.now, min(ts))
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.pump()
        self.now = to
        self._drain_events()

    def of(self, side: str, cls):
        return [e for e in self.events[side] if isinstance(e, cls)]


def make_net(a_view, a_creds, b_view, b_creds, seed="s") -> Net:
    a = IkeManager(a_view, a_creds, DetRng(seed + "a"), local_address=a_view.local_address)
    b = IkeManager(b_view, b_creds, DetRng(seed + "b"), local_address=b_view.local_address)
    return Net(a, b)


@pytest.fixture
def cert_net(pki):
    return make_net(view("node-a", "node-b"), cert_creds(pki, "a"), view("node-b", "node-a"), cert_creds(pki, "b"))


@pytest.fixture
def psk_net():
    psk = b"correct horse battery staple 0123"
    return make_net(view("node-a", "node-b"), Credentials(psk=psk), view("node-b", "node-a"), Credentials(psk=psk))


__all__ = ["DetRng", "Net", "make_net", "view", "cert_creds", "T0", "A_ADDR", "B_ADDR", "A_NET", "B_NET",
           "replace"]
