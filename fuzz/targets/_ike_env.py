"""A deterministic two-node IKE setting for the IKE fuzz targets: a test CA,
ECDSA P-256 node certificates for node-a (the initiator, 198.51.100.1) and
node-b (the fuzzed responder, 198.51.100.2), and views that make them peers.
Everything is derived from fixed seeds, so with a fresh ``DetRng`` the same
inputs give the same run (libFuzzer needs that to reproduce a crash)."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ike.manager import IkeManager
from agent.model import Credentials, NodeView, Peer, PeerPolicy

T0 = 1_700_000_000.0  # fake clock (2023-11-14), inside the certificates' validity
A_ADDR = "198.51.100.1"
B_ADDR = "198.51.100.2"
A_NET = ipaddress.ip_network("10.1.0.0/16")
B_NET = ipaddress.ip_network("10.2.0.0/16")


class DetRng:
    """rng(n) -> bytes: SHA-256 in counter mode over a seed."""

    def __init__(self, seed: str) -> None:
        self.seed = seed.encode()
        self.n = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:n]


def _cert(subject: str, issuer: str, key, issuer_key, serial: int, ca: bool):
    nb = datetime.datetime.fromtimestamp(T0 - 3600, datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
         .serial_number(serial).not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=30)))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@lru_cache(maxsize=1)
def pki() -> dict:
    ca_key = ec.derive_private_key(1001, ec.SECP256R1())
    ca = _cert("meshsec fuzz CA", "meshsec fuzz CA", ca_key, ca_key, 1001, True)
    out = {"ca": ca.public_bytes(serialization.Encoding.DER)}
    for who, seed in (("a", 11), ("b", 12)):
        key = ec.derive_private_key(seed, ec.SECP256R1())
        cert = _cert(f"node-{who}", "meshsec fuzz CA", key, ca_key, seed, False)
        out[who] = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
                    cert.public_bytes(serialization.Encoding.DER))
    return out


def creds(who: str) -> Credentials:
    p = pki()
    pem, der = p[who]
    return Credentials(private_key_pem=pem, certificate_chain=(der,), ca_certificates=(p["ca"],))


CLASSICAL = PeerPolicy(ike_proposals=tuple(p for p in PeerPolicy().ike_proposals if "mlkem" not in p))


def view(me: str, policy: PeerPolicy = CLASSICAL) -> NodeView:
    a = me == "node-a"
    peer = Peer(name="node-b" if a else "node-a", identity="node-b" if a else "node-a",
                endpoints=(B_ADDR if a else A_ADDR,), subnets=(B_NET if a else A_NET,), policy=policy)
    return NodeView(name=me, identity=me, subnets=(A_NET if a else B_NET,), peers=(peer,),
                    local_address=A_ADDR if a else B_ADDR)


def manager(me: str, seed: str, policy: PeerPolicy = CLASSICAL, **kw) -> IkeManager:
    return IkeManager(view(me, policy), creds("a" if me == "node-a" else "b"), DetRng(seed),
                      local_address=A_ADDR if me == "node-a" else B_ADDR, wall_offset=0.0, **kw)


def handshake(policy: PeerPolicy = CLASSICAL) -> list[tuple[str, bytes, int]]:
    """The datagrams of one complete IKE_SA set-up between fresh managers
    (seeds "fuzz-a" / "fuzz-b"): (sender "a"/"b", UDP payload, local port)."""
    a, b = manager("node-a", "fuzz-a", policy), manager("node-b", "fuzz-b", policy)
    log = []
    a.initiate("node-b", T0)
    for _ in range(20):
        moved = False
        for src, dst, sender in (("a", b, a), ("b", a, b)):
            for d in sender.datagrams_to_send():
                moved = True
                for data in getattr(d.data, "fragments", None) or (d.data,):
                    log.append((src, bytes(data), d.local[1]))
                    dst.receive_datagram(data, d.remote, d.local, T0)
            while sender.next_event():
                pass
        if not moved:
            break
    return log
