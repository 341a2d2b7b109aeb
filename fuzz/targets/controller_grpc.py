"""The controller's gRPC request handlers (controller/servicer.py), called
directly: ControllerServicer.Enroll / Renew / Watch with requests parsed from
fuzz bytes, a fake ServicerContext and a real Store, CA and inventory.

Input: ``sel`` octet then the serialized request (protobuf). ``sel`` bits 0-1:
the RPC (Enroll, Renew, Watch, Enroll); bits 2-3: node_name replaced by a
node of the inventory (alpha, bravo, charlie) or kept as fuzzed; bit 4: the
right join token for that node; bit 5: a valid CSR for that node (so the
issuing and certificate-store paths run) else the fuzzed csr_der; bits 6-7:
the mutual-TLS client certificate gRPC would hand over (none, alpha's,
bravo's, charlie's; all really issued by this CA, as TLS checked them).

Allowed: the request not parsing (protobuf's DecodeError: gRPC itself
refuses those before any handler) and ``context.abort`` (a gRPC status to
the client). Anything else is a finding. The Store is reset after every input
(certificates, used tokens, revocations), so each input starts alike.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError

from controller.ca import CertificateAuthority
from controller.inventory import parse_inventory
from controller.metrics import ControllerMetrics
from controller.service import ControllerServicer, ControllerState
from controller.store import Store
from meshsec.v1 import controller_pb2 as pb

from fuzz.harness import Target

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
NAMES = ("alpha", "bravo", "charlie")
TOKENS = {"alpha": "alpha-token", "bravo": "bravo-token", "charlie": "charlie-token"}
INVENTORY = f"""\
nodes:
  - name: alpha
    role: gateway
    endpoints: [198.51.100.1]
    subnets: [10.1.0.0/16]
    join_token: alpha-token
  - name: bravo
    role: gateway
    endpoints: [198.51.100.2]
    subnets: [10.2.0.0/16]
    join_token_sha256: {hashlib.sha256(b"bravo-token").hexdigest()}
  - name: charlie
    role: host
    endpoints: [198.51.100.3]
    join_token: charlie-token
"""


class Aborted(Exception):
    """context.abort(): in gRPC this ends the call with a status."""


class FakeContext:
    def __init__(self, pem: bytes | None) -> None:
        self._auth = {"x509_pem_cert": [pem]} if pem else {}

    def abort(self, code, details):
        raise Aborted(code, details)

    def peer(self) -> str:
        return "ipv4:198.51.100.1:40000"

    def auth_context(self):
        return self._auth

    def send_initial_metadata(self, md) -> None:
        pass

    def add_callback(self, cb) -> bool:
        return True

    def is_active(self) -> bool:
        return False

    def cancel(self) -> None:  # the Watch registry ends a superseded stream with it
        pass


class _World:
    def __init__(self) -> None:
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.dir = tempfile.mkdtemp(prefix="meshsec-fuzz-", dir=base)
        self.store = Store(Path(self.dir))
        self.ca = CertificateAuthority.create(NOW - dt.timedelta(days=1))
        self.inventory = parse_inventory(INVENTORY)
        self.metrics = ControllerMetrics()
        self.log = logging.getLogger("fuzz.controller")
        self.log.disabled = True
        self.csr = {}
        self.pem = {}
        for i, n in enumerate(NAMES):
            key = ec.derive_private_key(100 + i, ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)])).sign(key, hashes.SHA256()))
            self.csr[n] = csr.public_bytes(serialization.Encoding.DER)
            cert = self.ca.issue_for_csr(self.csr[n], n, dt.timedelta(days=7), NOW - dt.timedelta(hours=1))
            self.pem[n] = cert.public_bytes(serialization.Encoding.PEM)

    def reset(self) -> None:
        db = self.store._db
        with self.store._lock:
            for table in ("certificates", "used_tokens", "revoked"):
                db.execute(f"DELETE FROM {table}")

    def servicer(self) -> ControllerServicer:
        state = ControllerState(self.store, self.inventory)
        return ControllerServicer(state, self.store, self.ca, dt.timedelta(days=1), self.log,
                                  clock=lambda: NOW, metrics=self.metrics)


_world: _World | None = None


def world() -> _World:
    global _world
    if _world is None:
        _world = _World()
    return _world


def one_input(data: bytes) -> None:
    if not data:
        return
    w = world()
    sel, body = data[0], data[1:]
    rpc = ("Enroll", "Renew", "Watch", "Enroll")[sel & 3]
    req = {"Enroll": pb.EnrollRequest, "Renew": pb.RenewRequest, "Watch": pb.WatchRequest}[rpc].FromString(body)
    name = (None,) + NAMES
    pick = name[(sel >> 2) & 3]
    if pick:
        req.node_name = pick
    n = req.node_name
    if sel & 16 and rpc == "Enroll":
        req.join_token = TOKENS.get(n, "x")
    if sel & 32 and rpc != "Watch" and n in w.csr:
        req.csr_der = w.csr[n]
    pem = (None,) + tuple(w.pem[x] for x in NAMES)
    ctx = FakeContext(pem[sel >> 6])
    with TARGET.fixture():
        s = w.servicer()
    try:
        if rpc == "Watch":
            for update in s.Watch(req, ctx):
                pb.ViewUpdate.FromString(update if isinstance(update, bytes) else update.SerializeToString())
        else:
            resp = getattr(s, rpc)(req, ctx)
            resp.SerializeToString()
    finally:
        with TARGET.fixture():
            w.reset()


TARGET = Target("controller_grpc", one_input, allowed=(Aborted, DecodeError), packages=("controller",))
