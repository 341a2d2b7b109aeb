"""gRPC client of the meshsec controller: enrol, then watch the node's view.

Two controller ports: Enroll goes to ``address`` (server-side TLS only),
Watch to ``watch_address`` (mutual TLS; default: same host, port + 1), as
grpcio cannot request an optional client certificate on one port.

TLS target name: the controller's certificate always carries the DNS SAN
``meshsec-controller`` (plus its --server-name values), and this client
always verifies the controller as ``meshsec-controller`` against the CA it
was given (``grpc.ssl_target_name_override``). So agents may reach the
controller by any IP or DNS name; trust comes from the mesh CA alone, and
the inventory refuses a node called ``meshsec-controller``.

State directory (created 0700):
- ``node.key``   PKCS#8 PEM ECDSA P-256 private key, mode 0600, never sent.
- ``node.crt``   certificate chain PEM, leaf first.
- ``mesh-ca.pem`` the CA certificates the controller returned (peer trust).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.model import Credentials, NodeView, Peer, PeerPolicy
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

CONTROLLER_TLS_NAME = "meshsec-controller"
KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "mesh-ca.pem"
# Re-enrol once this fraction of the certificate's lifetime has passed.
RENEW_FRACTION = 2 / 3
# A node removed from the inventory logs its state at most this often (seconds).
REMOVED_LOG_S = 60.0

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}

# Keepalive pings every 20 s on the idle Watch stream; the controller accepts
# pings down to every 5 s (controller.service.server_options).
KEEPALIVE_TIME_MS = 20_000


def channel_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, object]]:
    """gRPC channel arguments for the controller channels (milliseconds).
    ``max_pings_without_data`` 0: keep pinging an idle stream (grpc's default
    stops after 2 pings without data, leaving a dead controller unnoticed)."""
    return [
        ("grpc.ssl_target_name_override", CONTROLLER_TLS_NAME),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


_CHANNEL_OPTIONS = channel_options()

_MODE = {pb.MODE_TUNNEL: "tunnel", pb.MODE_TRANSPORT: "transport"}
_PROTOCOL = {pb.PROTOCOL_ESP: "esp", pb.PROTOCOL_AH: "ah", pb.PROTOCOL_AH_ESP: "ah+esp"}
_ACTION = {pb.ACTION_PROTECT: "protect", pb.ACTION_BYPASS: "bypass", pb.ACTION_DISCARD: "discard"}
_ENCAP = {pb.ENCAPSULATION_UDP: "udp", pb.ENCAPSULATION_NONE: "none"}


class ControlError(Exception):
    """A permanent control-plane error (retrying will not help)."""


class EnrollmentError(ControlError):
    """The controller refused enrolment (wrong token, unknown node, bad CSR)
    or returned an unusable certificate. ``code`` is the gRPC status or None."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EnrollmentAborted(ControlError):
    """``enroll(stop=...)`` gave up because ``stop`` was set."""


# What grpc reports when the controller's certificate does not verify against our CA.
_VERIFY_FAILED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


def tls_verify_failed(details: str | None) -> bool:
    """True if a failed call's details say the controller's TLS certificate
    did not verify (a wrong --controller-ca; retrying will not fix it)."""
    return bool(details) and any(m in details for m in _VERIFY_FAILED)


def check_controller_ca(pem: bytes, source: str = "--controller-ca") -> list[x509.Certificate]:
    """The CA certificates in ``pem``; :class:`ControlError` naming ``source``
    if it holds none or does not parse."""
    try:
        cas = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ControlError(f"{source} is not a PEM CA certificate ({e}); give the controller's ca.pem "
                           "(written to its --state-dir)") from None
    if not cas:
        raise ControlError(f"{source} holds no certificate; give the controller's ca.pem")
    return cas


# ---------------------------------------------------------------- proto -> model

def _enum(table: dict[int, str], value: int, default: str, what: str) -> str:
    if value == 0:
        return default
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} {value}") from None


def policy_from_proto(p: pb.PeerPolicy) -> PeerPolicy:
    """Unset enums and empty proposal lists take the model defaults;
    unknown enum values raise ValueError."""
    d = PeerPolicy()
    return PeerPolicy(
        mode=_enum(_MODE, p.mode, d.mode, "mode"),  # type: ignore[arg-type]
        protocol=_enum(_PROTOCOL, p.protocol, d.protocol, "protocol"),  # type: ignore[arg-type]
        encapsulation=_enum(_ENCAP, p.encapsulation, d.encapsulation, "encapsulation"),  # type: ignore[arg-type]
        ike_proposals=tuple(p.ike_proposals) or d.ike_proposals,
        esp_proposals=tuple(p.esp_proposals) or d.esp_proposals,
        ike_lifetime_s=p.ike_lifetime_s,
        child_lifetime_s=p.child_lifetime_s,
        dpd_interval_s=p.dpd_interval_s,
        # 0 is also what an unset field reads as: it means the default, never "off"; only the
        # explicit allow_no_replay (the inventory's opt-in, logged by the client) turns it off
        replay_window=p.replay_window or (0 if p.allow_no_replay else d.replay_window),
        allow_no_replay=p.replay_window == 0 and p.allow_no_replay,
        action=_enum(_ACTION, p.action, d.action, "action"),  # type: ignore[arg-type]
        rule=p.rule,
        child_lifetime_bytes=p.child_lifetime_bytes,
        child_lifetime_packets=p.child_lifetime_packets,
    )


def peer_from_proto(p: pb.Peer) -> Peer:
    """ValueError on an empty name or a bad address / network."""
    if not p.name:
        raise ValueError("peer without a name")
    for e in p.endpoints:
        ipaddress.ip_address(e)
    return Peer(
        name=p.name,
        identity=p.identity or p.name,
        endpoints=tuple(p.endpoints),
        subnets=tuple(ipaddress.ip_network(s) for s in p.subnets),
        policy=policy_from_proto(p.policy),
        ike_port=p.ike_port or 500,
        initiate=p.initiate,
    )


def no_replay_peers(view: NodeView) -> list[str]:
    """Names of the peers whose policy turns anti-replay off (explicit allow_no_replay)."""
    return [p.name for p in view.peers if p.policy.replay_window == 0 and p.policy.allow_no_replay]


def view_from_proto(update: pb.ViewUpdate, previous: NodeView | None = None) -> NodeView:
    """Apply one ``ViewUpdate`` and return the resulting full NodeView.

    A ``full`` update replaces everything; an incremental one upserts and
    removes peers of ``previous`` (required: ValueError if None) and adds /
    drops revoked certificate serials (``NodeView.revoked_serials``). The node's
    own fields are always taken from the update; ``local_address`` is its
    first endpoint. Peers are kept sorted by name. Raises ValueError for a
    malformed update.
    """
    if not update.node_name:
        raise ValueError("view update without node_name")
    if update.full:
        peers: dict[str, Peer] = {}
    else:
        if previous is None:
            raise ValueError("incremental view update without a previous view")
        if previous.name != update.node_name:
            raise ValueError(f"view update for {update.node_name!r} applied to {previous.name!r}")
        peers = {p.name: p for p in previous.peers}
        for name in update.removed_peers:
            peers.pop(name, None)
    for p in update.upserted_peers:
        peer = peer_from_proto(p)
        peers[peer.name] = peer
    for e in update.endpoints:
        ipaddress.ip_address(e)
    revoked = set() if update.full else set(previous.revoked_serials)
    revoked -= {_serial(b) for b in update.unrevoked_serials}
    revoked |= {_serial(b) for b in update.revoked_serials}
    return NodeView(
        name=update.node_name,
        identity=update.identity or update.node_name,
        subnets=tuple(ipaddress.ip_network(s) for s in update.subnets),
        peers=tuple(peers[n] for n in sorted(peers)),
        local_address=update.endpoints[0] if update.endpoints else None,
        version=update.version,
        revoked_serials=frozenset(revoked),
    )


def _serial(data: bytes) -> int:
    # RFC 5280 §4.1.2.2: serial numbers are at most 20 octets
    if not 1 <= len(data) <= 20:
        raise ValueError(f"revoked serial of {len(data)} bytes (expected 1..20)")
    return int.from_bytes(data, "big")


# ---------------------------------------------------------------- files

def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _cert_identity(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    return cns, dns


def default_watch_address(address: str) -> str:
    """``HOST:PORT`` -> ``HOST:PORT+1`` (ValueError if not HOST:PORT)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"controller address {address!r} is not HOST:PORT")
    return f"{host}:{int(port) + 1}"


class ControllerClient:
    """Enrols this node with the controller and follows its view.

    ``address`` is ``HOST:PORT`` of the controller; ``controller_ca_pem`` the
    controller's ``ca.pem`` (verifies the controller). ``backoff_initial`` /
    ``backoff_max`` (seconds) bound the reconnect delay (exponential, with
    jitter); ``rpc_timeout`` (seconds) bounds each Enroll call.
    ``watch_address`` is the controller's mutual-TLS port (default: the
    host of ``address``, its port + 1).

    ``on_credentials(Credentials)`` is called (from the watch thread) every
    time credentials change after the first ones ``enroll()`` returned:
    renewal before expiry, re-enrolment after a revocation, on whichever
    controller replica; the caller hands them to
    ``IkeManager.update_credentials``. Raises :class:`ControlError` at once if
    ``controller_ca_pem`` is not a PEM certificate.

    Renewal goes over mutual TLS (``Renew`` on the watch port, no join
    token: tokens are single-use); a refused renewal (revoked or unknown
    certificate) falls back to ``Enroll`` with the join token.
    """

    def __init__(self, address: str, node_name: str, join_token: str | Callable[[], str], state_dir: Path,
                 controller_ca_pem: bytes, *, logger: logging.Logger | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 30.0, rpc_timeout: float = 10.0,
                 on_credentials: Callable[[Credentials], None] | None = None,
                 watch_address: str | None = None, shown_watch_address: str | None = None) -> None:
        # HA: several controller replicas, comma-separated; a failure moves to the next
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("controller address is empty; give HOST:PORT[,HOST:PORT...]")
        self.watch_addresses = ([a.strip() for a in watch_address.split(",") if a.strip()] if watch_address
                                else [default_watch_address(a) for a in self.addresses])
        if len(self.watch_addresses) != len(self.addresses):
            raise ValueError(f"{len(self.addresses)} controller addresses but {len(self.watch_addresses)} "
                             "watch addresses; give one watch address per controller or none")
        # what status shows: the controllers' own watch ports, also when we reach them through the
        # local fwmark forwarder (agent.controller_path), whose 127.0.0.1 ports mean nothing to operators
        shown = [a.strip() for a in shown_watch_address.split(",") if a.strip()] if shown_watch_address else []
        self.shown_watch_addresses = shown if len(shown) == len(self.watch_addresses) else self.watch_addresses
        self._index = 0
        self.node_name = node_name
        self._join_token = join_token
        self.state_dir = Path(state_dir)
        self._controller_ca_pem = controller_ca_pem
        self.log = logger or logging.getLogger("meshsec.agent.control")
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.rpc_timeout = rpc_timeout
        self.on_credentials = on_credentials
        check_controller_ca(controller_ca_pem)
        self._rng = random.Random()
        self._credentials: Credentials | None = None
        self._removed_logged = 0.0  # when "not in the inventory" was last logged
        self._renew_at: float | None = None
        self._view: NodeView | None = None
        self._version = 0
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None

    def __repr__(self) -> str:
        return f"ControllerClient(address={self.address!r}, node_name={self.node_name!r})"

    @property
    def address(self) -> str:
        """The controller (enrol port) in use now."""
        return self.addresses[self._index]

    @property
    def watch_address(self) -> str:
        return self.watch_addresses[self._index]

    @property
    def shown_watch_address(self) -> str:
        """The controller's watch port in use now, as configured (not the local forwarder's)."""
        return self.shown_watch_addresses[self._index]

    def _next_controller(self) -> None:
        if len(self.addresses) > 1:
            self._index = (self._index + 1) % len(self.addresses)

    @property
    def view(self) -> NodeView | None:
        """The last view applied by ``watch`` (None before the first)."""
        return self._view

    @property
    def renew_at(self) -> float | None:
        """Unix time after which ``enroll()`` fetches a new certificate."""
        return self._renew_at

    def needs_renewal(self, now: float | None = None) -> bool:
        return self._renew_at is None or (time.time() if now is None else now) >= self._renew_at

    def _backoff(self, attempt: int) -> float:
        cap = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    # ------------------------------------------------------------ enrolment

    def _load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise ControlError(f"{path}: not a readable PEM private key ({e}); remove it to re-key") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ControlError(f"{path}: not an ECDSA P-256 key; remove it to re-key")
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.log.info("generated node key %s", path)
        return key

    def _stored(self, key: ec.EllipticCurvePrivateKey) -> tuple[list, list, float] | None:
        """(chain, CAs, renewal time) stored for this key and identity, or None."""
        cert_path, ca_path = self.state_dir / CERT_FILE, self.state_dir / CA_FILE
        if not cert_path.exists() or not ca_path.exists():
            return None
        try:
            chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
            cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
        except ValueError:
            self.log.warning("ignoring unreadable %s / %s", cert_path, ca_path)
            return None
        leaf = chain[0]
        if leaf.public_key() != key.public_key() or _cert_identity(leaf) != ([self.node_name], [self.node_name]):
            return None
        return chain, cas, self._renewal_time(leaf, cert_path.stat().st_mtime)

    def _cached(self, key: ec.EllipticCurvePrivateKey, now: float) -> tuple[Credentials, float] | None:
        """Stored credentials if they match the key and identity and are not
        due for renewal; else None."""
        stored = self._stored(key)
        if stored is None or now >= stored[2] or self._renew_at == 0.0:
            return None
        chain, cas, renew_at = stored
        return self._credentials_from(key, chain, cas), renew_at

    @staticmethod
    def _renewal_time(leaf: x509.Certificate, received: float) -> float:
        # Measured from when we got it, not notBefore: the CA backdates.
        start = max(leaf.not_valid_before_utc.timestamp(), received)
        na = leaf.not_valid_after_utc.timestamp()
        return start + (na - start) * RENEW_FRACTION

    @staticmethod
    def _credentials_from(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate],
                          cas: list[x509.Certificate]) -> Credentials:
        der = serialization.Encoding.DER
        return Credentials(
            private_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
            certificate_chain=tuple(c.public_bytes(der) for c in chain),
            ca_certificates=tuple(c.public_bytes(der) for c in cas),
        )

    def _mtls(self, key_pem: bytes, chain_der) -> grpc.ChannelCredentials:
        pem = serialization.Encoding.PEM
        chain_pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(pem) for d in chain_der)
        return grpc.ssl_channel_credentials(root_certificates=self._controller_ca_pem, private_key=key_pem,
                                            certificate_chain=chain_pem)

    def _enroll_once(self, key: ec.EllipticCurvePrivateKey, current: list | None = None) -> tuple[Credentials, float]:
        """Enroll with the join token, or (``current``: this key's unexpired
        chain) Renew over mutual TLS on the watch port."""
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_name)]))
               .sign(key, hashes.SHA256()))
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        if current is not None:
            key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            creds = self._mtls(key_pem, [c.public_bytes(serialization.Encoding.DER) for c in current])
            where = self.watch_address
            with grpc.secure_channel(where, creds, options=_CHANNEL_OPTIONS) as channel:
                response = pb_grpc.ControllerStub(channel).Renew(
                    pb.RenewRequest(node_name=self.node_name, csr_der=csr_der), timeout=self.rpc_timeout)
        else:
            # a callable token is read at every enrolment: projected service-account
            # tokens rotate (about hourly), an enrolment must present the current one
            token = self._join_token() if callable(self._join_token) else self._join_token
            request = pb.EnrollRequest(node_name=self.node_name, join_token=token, csr_der=csr_der)
            creds = grpc.ssl_channel_credentials(root_certificates=self._controller_ca_pem)
            with grpc.secure_channel(self.address, creds, options=_CHANNEL_OPTIONS) as channel:
                response = pb_grpc.ControllerStub(channel).Enroll(request, timeout=self.rpc_timeout)
        try:
            chain = [x509.load_der_x509_certificate(d) for d in response.certificate_chain_der]
            cas = [x509.load_der_x509_certificate(d) for d in response.ca_certificates_der]
        except ValueError as e:
            raise EnrollmentError(f"controller {self.address} returned an unreadable certificate ({e})") from None
        if not chain or not cas:
            raise EnrollmentError(f"controller {self.address} returned no certificate or no CA")
        if chain[0].public_key() != key.public_key():
            raise EnrollmentError(f"controller {self.address} returned a certificate for another key")
        if _cert_identity(chain[0]) != ([self.node_name], [self.node_name]):
            raise EnrollmentError(f"controller {self.address} returned a certificate for another identity")
        pem = serialization.Encoding.PEM
        _write_private(self.state_dir / CERT_FILE, b"".join(c.public_bytes(pem) for c in chain), 0o644)
        _write_private(self.state_dir / CA_FILE, b"".join(c.public_bytes(pem) for c in cas), 0o644)
        self.log.info("%s as %r at %s; certificate valid until %s", "renewed" if current else "enrolled",
                      self.node_name, self.watch_address if current else self.address,
                      chain[0].not_valid_after_utc.isoformat())
        return self._credentials_from(key, chain, cas), self._renewal_time(chain[0], time.time())

    def _set_credentials(self, creds: Credentials, renew_at: float) -> Credentials:
        """Adopt credentials; report them through ``on_credentials`` if they
        replace earlier ones (every renewal path goes through here)."""
        had = self._credentials
        self._credentials, self._renew_at = creds, renew_at
        if had is not None and creds.certificate_chain != had.certificate_chain and self.on_credentials:
            try:
                self.on_credentials(creds)
            except Exception:
                self.log.exception("on_credentials failed")
        return creds

    def _retry_delay(self, attempt: int, code, details: str, what: str) -> float:
        """Backoff for a failed attempt; a controller certificate that does
        not verify is logged as a wrong CA and retried at the maximum."""
        if tls_verify_failed(details):
            self.log.error("%s at %s: the controller's TLS certificate does not verify against --controller-ca "
                           "(wrong CA file, or another controller at that address); retrying every %.0f s",
                           what, self.address, self.backoff_max)
            return self.backoff_max
        return self._backoff(attempt)

    def enroll(self, *, stop: threading.Event | None = None) -> Credentials:
        """This node's Credentials: the stored certificate if still well
        within its lifetime, else a new one from the controller.

        Retries with backoff while the controller is unreachable (logging
        each attempt). Raises :class:`EnrollmentError` for a permanent
        refusal (wrong token: UNAUTHENTICATED, unknown node: NOT_FOUND, bad
        CSR: INVALID_ARGUMENT), :class:`ControlError` for an unusable key
        file, :class:`EnrollmentAborted` if ``stop`` gets set.
        """
        key = self._load_or_create_key()
        cached = self._cached(key, time.time())
        if cached is not None:
            self.log.debug("reusing stored certificate until %s", dt.datetime.fromtimestamp(cached[1]))
            return self._set_credentials(*cached)
        stored = self._stored(key)
        renewable = stored is not None
        attempt = 0
        while True:
            # renew while the stored certificate is still valid (mTLS needs it), else enrol
            current = stored[0] if renewable and stored[0][0].not_valid_after_utc.timestamp() > time.time() else None
            try:
                return self._set_credentials(*self._enroll_once(key, current))
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else str(e)
                if current is not None and code not in _TRANSIENT:
                    # revoked / unknown certificate, or a controller without Renew: the join token decides
                    self.log.warning("renewal at %s refused (%s: %s); enrolling with the join token",
                                     self.watch_address, code.name if code else "?", details)
                    renewable = False
                    continue
                if code not in _TRANSIENT:
                    raise EnrollmentError(f"controller {self.address} refused enrolment of {self.node_name!r}: "
                                          f"{code.name if code else 'error'}: {details}", code) from None
                delay = self._retry_delay(attempt, code, details, "enrolment" if current is None else "renewal")
                attempt += 1
                self.log.warning("%s attempt %d at %s failed (%s: %s); retrying in %.1f s",
                                 "enrolment" if current is None else "renewal", attempt,
                                 self.address if current is None else self.watch_address,
                                 code.name if code else "?", details, delay)
                self._next_controller()
            if stop is not None:
                if stop.wait(delay):
                    raise EnrollmentAborted("enrolment aborted")
            else:
                time.sleep(delay)

    # ------------------------------------------------------------ watch

    def _cancel_current(self) -> None:
        with self._lock:
            if self._call is not None:
                self._call.cancel()


    def _log_no_replay(self, view: NodeView) -> None:
        """Warn once per peer whose policy turns anti-replay off (the explicit opt-in)."""
        off = set(no_replay_peers(view))
        for name in sorted(off - getattr(self, "_no_replay_logged", set())):
            self.log.warning("anti-replay is OFF for peer %s: the controller's inventory sets replay_window 0 "
                             "with allow_no_replay (RFC 4303 §3.4.3)", name)
        self._no_replay_logged = off
    def watch(self, on_view: Callable[[NodeView], None], stop: threading.Event) -> None:
        """Follow this node's view until ``stop`` is set; never raises.

        Watch over mutual TLS, apply each update (``view_from_proto``) and
        call ``on_view`` with the full NodeView after each. On disconnect or
        an unreachable controller, retry with exponential backoff (jitter,
        ``backoff_initial`` .. ``backoff_max``), resuming from the last
        version applied. Re-enrols when the certificate nears expiry.
        """
        canceller = threading.Thread(target=lambda: (stop.wait(), self._cancel_current()),
                                     name="watch-stop", daemon=True)
        canceller.start()
        attempt = 0
        while not stop.is_set():
            renewing = threading.Event()
            timer: threading.Timer | None = None
            established_at: float | None = None  # when the controller accepted this stream
            attempt_before = attempt
            try:
                creds = self.enroll(stop=stop)  # renewals are reported through on_credentials
                assert creds.private_key_pem is not None
                channel_creds = self._mtls(creds.private_key_pem, creds.certificate_chain)
                with grpc.secure_channel(self.watch_address, channel_creds, options=_CHANNEL_OPTIONS) as channel:
                    call = pb_grpc.ControllerStub(channel).Watch(
                        pb.WatchRequest(node_name=self.node_name, since_version=self._version))
                    with self._lock:
                        self._call = call
                    if stop.is_set():
                        call.cancel()
                    if self._renew_at is not None:
                        def renew_now() -> None:
                            renewing.set()
                            call.cancel()
                        timer = threading.Timer(max(0.0, self._renew_at - time.time()), renew_now)
                        timer.daemon = True
                        timer.start()
                    if ("meshsec-watch", "established") in (call.initial_metadata() or ()):
                        self.log.info("watching view of %r at %s from version %d", self.node_name,
                                      self.watch_address, self._version)
                        # a healthy stream resets the backoff even when no update follows (a
                        # resume at the current version gets none)
                        established_at, attempt = time.monotonic(), 0
                    for update in call:
                        try:
                            view = view_from_proto(update, self._view)
                        except ValueError as e:
                            self.log.error("bad view update from %s (%s); resynchronising", self.watch_address, e)
                            self._version, self._view = 0, None
                            call.cancel()
                            break
                        self._view, self._version = view, view.version
                        attempt = 0
                        self._log_no_replay(view)
                        try:
                            on_view(view)
                        except Exception:
                            self.log.exception("on_view failed for version %d", view.version)
                    else:
                        self.log.warning("controller %s ended the watch stream", self.watch_address)
            except grpc.RpcError as e:
                if stop.is_set():
                    break
                if renewing.is_set():
                    self.log.info("certificate due for renewal; re-enrolling")
                    continue
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else str(e)
                if code == grpc.StatusCode.NOT_FOUND:
                    self._removed(details, on_view)
                    stop.wait(self.backoff_max)
                    continue
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    # our certificate was revoked or expired: renew, else enrol with the join token
                    self.log.warning("watch at %s refused: %s; getting a new certificate", self.watch_address,
                                     details)
                    self._renew_at = 0.0
                elif tls_verify_failed(details):
                    self._retry_delay(attempt, code, details, "watch")
                    self._next_controller()
                    stop.wait(self.backoff_max)
                    continue
                else:
                    self.log.warning("watch at %s failed: %s: %s", self.watch_address,
                                     code.name if code else "?", details)
            except EnrollmentAborted:
                break
            except EnrollmentError as e:
                if e.code == grpc.StatusCode.NOT_FOUND:
                    self._removed(str(e), on_view)
                    stop.wait(self.backoff_max)
                    continue
                self.log.error("%s; retrying in %.0f s", e, self.backoff_max)
                stop.wait(self.backoff_max)
                continue
            except Exception as e:  # never raise out: keep the tunnels and retry
                self.log.error("watch at %s failed: %s", self.watch_address, e)
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    self._call = None
            if stop.is_set():
                break
            self._removed_logged = 0.0
            self._next_controller()
            attempt = self._attempt_after_stream(attempt, attempt_before, established_at, time.monotonic())
            delay = self._backoff(attempt)
            attempt += 1
            self.log.info("reconnecting to %s in %.1f s (attempt %d, from version %d)", self.watch_address, delay,
                          attempt, self._version)
            stop.wait(delay)

    def _attempt_after_stream(self, attempt: int, attempt_before: int, established_at: float | None,
                              now: float) -> int:
        """Reconnect attempt counter once a watch stream ended: reset (0) by the stream if it was
        established, unless it lasted less than ``backoff_max`` (a controller that accepts and
        drops at once must not be hammered at ``backoff_initial``): then it goes on from where
        it was before the stream. ``established_at`` None: never established."""
        if established_at is not None and now - established_at < self.backoff_max:
            return max(attempt, attempt_before)
        return attempt

    def _removed(self, details: str, on_view: Callable[[NodeView], None]) -> None:
        """The controller says this node is not in the inventory: clear the
        peers once (an empty view), then retry at the maximum backoff,
        logging at most once a minute."""
        now = time.monotonic()
        if not self._removed_logged or now - self._removed_logged >= REMOVED_LOG_S:
            self._removed_logged = now
            self.log.error("controller %s: %s; peers cleared, retrying every %.0f s until the node is back in the "
                           "inventory", self.watch_address, details, self.backoff_max)
        if self._view is not None and (self._view.peers or self._version):
            prev = self._view
            self._view = NodeView(name=prev.name, identity=prev.identity, subnets=(), peers=(),
                                  local_address=prev.local_address, version=0)
            self._version = 0  # a node added back gets a full snapshot
            try:
                on_view(self._view)
            except Exception:
                self.log.exception("on_view failed for the empty view")


# ---------------------------------------------------------------- status reports

REPORT_INTERVAL_S = 10.0      # periodic report (the controller may ask for another, 2..300 s)
REPORT_MIN_INTERVAL_S = 2.0   # reports on change come at most this often
REPORT_MAX_PEERS = 4096       # the controller refuses larger reports (controller.status)


def report_from_rows(node_name: str, status: dict, rows: list[dict], cert_not_after: int) -> pb.StatusReport:
    """A ``StatusReport`` from ``Runtime.status()`` and ``PeerTracker.peers()`` rows
    (agent.peerstate); at most REPORT_MAX_PEERS peers, strings cut to 200 characters."""
    def n(v) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    report = pb.StatusReport(
        node_name=node_name, view_version=n(status.get("view_version")), cert_not_after=n(cert_not_after),
        tun_mtu=min(n(status.get("tun_mtu")), 2**32 - 1), underlay_mtu=min(n(status.get("underlay_mtu")), 2**32 - 1),
        uptime_s=float(status.get("uptime_s") or 0.0), view_source=str(status.get("view_source") or "")[:32],
        local_address=str(status.get("local_address") or "")[:64])
    for k, v in (status.get("drops") or {}).items():
        if n(v):
            report.drops[str(k)[:64]] = v
    for r in rows[:REPORT_MAX_PEERS]:
        p = report.peers.add(
            name=r["name"], state=r["state"], ike_state=r["ike_state"], child_sas=n(r["child_sas"]),
            last_handshake=n(r["last_handshake"]), last_error=r["last_error"][:200],
            last_error_at=n(r["last_error_at"]), endpoint=r["endpoint"][:64], bytes_in=n(r["bytes_in"]),
            bytes_out=n(r["bytes_out"]), packets_in=n(r["packets_in"]), packets_out=n(r["packets_out"]),
            sa=r["sa"][:32], rule=r["rule"][:64], mtu=min(n(r.get("mtu")), 65535))
        for k, v in r["drops"].items():
            if n(v):
                p.drops[str(k)[:64]] = v
    return report


class StatusReporter:
    """Sends this node's state to the controller (``ReportStatus`` on the watch
    port, mutual TLS with the node certificate ``client`` holds): every
    ``interval`` seconds, and within ``min_interval`` seconds of a change the
    ``tracker`` (agent.peerstate.PeerTracker) saw. The report is built on the
    runtime's loop thread (``Runtime.call_soon``); a loop that does not answer
    within ``timeout`` seconds skips that report.

    :meth:`controller_state` says whether the controller answered the last
    report (``meshsec status`` shows it). Runs in its own thread
    (:meth:`run`); never raises out of it."""

    def __init__(self, client: ControllerClient, runtime, tracker, *, interval: float = REPORT_INTERVAL_S,
                 min_interval: float = REPORT_MIN_INTERVAL_S, timeout: float = 5.0,
                 logger: logging.Logger | None = None) -> None:
        self.client = client
        self.rt = runtime
        self.tracker = tracker
        self.interval = interval
        self.min_interval = min_interval
        self.timeout = timeout
        self.log = logger or logging.getLogger("meshsec.agent.report")
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.last_ok = 0.0          # Unix seconds of the last accepted report
        self.last_attempt = 0.0
        self.last_error = ""
        self.reachable: bool | None = None  # None: not tried yet
        self._unimplemented_logged = False
        self._channel: grpc.Channel | None = None
        self._channel_key: tuple | None = None

    def close(self) -> None:
        """Close the channel (the next report opens a new one)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def controller_state(self) -> dict:
        """JSON-ready: ``address`` (watch port), ``reachable`` (the last report
        got an answer: True / False / None before the first), ``last_ok`` (Unix
        seconds, 0 never), ``error`` (why the last report failed, "" if it did not)."""
        with self._lock:
            return {"address": self.client.shown_watch_address, "reachable": self.reachable,
                    "last_ok": int(self.last_ok), "error": self.last_error, "reports_sent": self.sent}

    def build(self) -> pb.StatusReport | None:
        """Build the report on the loop thread; None if the loop did not answer in time."""
        done = threading.Event()
        box: list = []

        def on_loop() -> None:
            try:
                st = self.rt.status()
                box.append(report_from_rows(self.client.node_name, st, self.tracker.peers(st),
                                            self.tracker.cert_not_after()))
            finally:
                done.set()

        self.rt.call_soon(on_loop)
        if not done.wait(self.timeout) or not box:
            return None
        return box[0]

    def send(self, report: pb.StatusReport) -> bool:
        """One ReportStatus call; True if the controller accepted it."""
        creds = self.client._credentials
        self.last_attempt = time.time()
        if creds is None or creds.private_key_pem is None:
            with self._lock:
                self.last_error, self.reachable = "not enrolled yet", False
            return False
        key = (self.client.watch_address, creds.certificate_chain)
        try:
            if self._channel is None or self._channel_key != key:  # one channel while it works
                self.close()
                channel_creds = self.client._mtls(creds.private_key_pem, creds.certificate_chain)
                self._channel = grpc.secure_channel(key[0], channel_creds, options=_CHANNEL_OPTIONS)
                self._channel_key = key
            resp = pb_grpc.ControllerStub(self._channel).ReportStatus(report, timeout=self.timeout)
        except grpc.RpcError as e:
            self.close()  # a fresh channel next time: no reconnect backoff inherited from a dead one
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            with self._lock:
                self.failed += 1
                # an answer, even a refusal, means the controller is reachable
                self.reachable = code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                self.last_error = f"{code.name if code else 'error'}: {details}"[:300]
            if code == grpc.StatusCode.UNIMPLEMENTED:
                if not self._unimplemented_logged:
                    self._unimplemented_logged = True
                    self.log.warning("controller %s does not take status reports (older version); the mesh "
                                     "view there will not show this node's tunnels", self.client.watch_address)
            else:
                self.log.debug("status report to %s failed: %s", self.client.watch_address, self.last_error)
            return False
        with self._lock:
            self.sent += 1
            self.last_ok = time.time()
            self.reachable, self.last_error = True, ""
            if 2.0 <= resp.report_interval_s <= 300.0:
                self.interval = resp.report_interval_s
        return True

    def run(self, stop: threading.Event) -> None:
        """Report until ``stop`` is set: periodically and on change."""
        seen = -1
        next_at = 0.0
        while not stop.is_set():
            now = time.monotonic()
            changed = self.tracker.changes != seen
            if now >= next_at or changed:
                seen = self.tracker.changes
                try:
                    report = self.build()
                    if report is not None:
                        self.send(report)
                except Exception:  # never out of the thread: the next period tries again
                    self.log.exception("status report failed")
                next_at = now + self.interval
                stop.wait(self.min_interval)
                continue
            stop.wait(min(0.5, max(0.0, next_at - now)))
        self.close()
