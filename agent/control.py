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

The control plane's other parts live beside this client: proto -> model
conversion (agent.view_proto), the key store in the state directory
(agent.keystore), the errors (agent.control_errors), status reports
(agent.status_report).
"""
from __future__ import annotations

import datetime as dt
import logging
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

from agent.control_errors import ControlError, EnrollmentAborted, EnrollmentError
from agent.keystore import KeyStore, _cert_identity
from agent.model import Credentials, NodeView
from agent.view_proto import no_replay_peers, view_from_proto
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

CONTROLLER_TLS_NAME = "meshsec-controller"
# A node removed from the inventory logs its state at most this often (seconds).
REMOVED_LOG_S = 60.0

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}

# Keepalive pings every 20 s on the idle Watch stream; the controller accepts
# pings down to every 5 s (controller.server.server_options).
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
        self.keys = KeyStore(self.state_dir, node_name, self.log)
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

    def _cached(self, key: ec.EllipticCurvePrivateKey, now: float) -> tuple[Credentials, float] | None:
        """Stored credentials if they match the key and identity and are not
        due for renewal; else None."""
        stored = self.keys.stored(key)
        if stored is None or now >= stored[2] or self._renew_at == 0.0:
            return None
        chain, cas, renew_at = stored
        return self.keys.credentials_from(key, chain, cas), renew_at

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
        self.keys.save(chain, cas)
        self.log.info("%s as %r at %s; certificate valid until %s", "renewed" if current else "enrolled",
                      self.node_name, self.watch_address if current else self.address,
                      chain[0].not_valid_after_utc.isoformat())
        return self.keys.credentials_from(key, chain, cas), self.keys.renewal_time(chain[0], time.time())

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
        key = self.keys.load_or_create_key()
        cached = self._cached(key, time.time())
        if cached is not None:
            self.log.debug("reusing stored certificate until %s", dt.datetime.fromtimestamp(cached[1]))
            return self._set_credentials(*cached)
        stored = self.keys.stored(key)
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
