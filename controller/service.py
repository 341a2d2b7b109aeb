"""The gRPC side of the controller: the ``meshsec.v1.Controller`` servicer and
:class:`ControllerServer`, which wires inventory, store, CA and server.

Authentication:
- ``Enroll``: server-side TLS only; the join token authenticates (compared
  in constant time against its SHA-256).
- ``Watch``: mutual TLS; the servicer requires a client certificate whose
  identity (CN and its only dNSName SAN) equals ``node_name``.

Two ports, two servers: grpcio's ``ssl_server_credentials`` with
``require_client_auth=False`` does not even request a client certificate, so
one port cannot serve both. The *enrol port* (``--listen``) is server-side
TLS only (Watch there fails PERMISSION_DENIED: no certificate) and served by
its own ``grpc.aio`` server (controller.enrolport: a caller that never sends
its request costs no thread); the *watch port* (``--watch-listen``, default:
the same host, enrol port + 1) requires and verifies a client certificate
from the CA and runs on a pool of ``max_workers`` threads.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from controller.ca import CertificateAuthority, CsrError
from controller.enrolport import ENROLL_MAX_CONCURRENT, ENROLL_READ_TIMEOUT_S, EnrolPort, watch_port_only
from controller.inventory import InventoryError, load_inventory
from controller.limits import field_too_long
from controller.fanout import ViewCache, peer_to_proto, view_update  # noqa: F401 (re-exported)
from controller.policy import Inventory, UnknownNode
from controller.metrics import ControllerMetrics
from controller.store import StateStore, Store
from controller.watchlimit import RateLimitedLog, WatchRegistry, guard, tolerant_deserializer, watch_capacity
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

CA_FILE = "ca.pem"
# Refusals an unauthenticated caller can cause are logged once per kind in this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_KINDS = ("unknown_node", "bad_token", "token_used", "bad_csr", "token_review", "watch_capacity")
# How often the leader forgets revoked serials whose certificates expired.
REVOKED_PRUNE_S = 60.0

# A Watch stream re-checks that its RPC is alive this often even without a
# wake-up (its end wakes it at once through a gRPC callback).
WATCH_POLL_S = 5.0

# Keepalives detect dead agents / controllers behind silent middleboxes.
# Agents ping every 20 s (agent.control); the server must accept pings at
# least that often on an idle stream, or it answers GOAWAY too_many_pings.
KEEPALIVE_TIME_MS = 20_000
MIN_PING_INTERVAL_MS = 5_000


def server_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                   min_ping_interval_ms: int = MIN_PING_INTERVAL_MS) -> list[tuple[str, int]]:
    """gRPC server channel arguments (milliseconds). The option that lets
    clients ping an idle stream is ``grpc.http2.min_ping_interval_without_data_ms``
    (grpc core ignores the look-alike ``min_recv_ping_interval_without_data_ms``)."""
    return [
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]


SERVER_OPTIONS = server_options()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ControllerState:
    """The current inventory and view version; wakes watchers on change."""

    def __init__(self, store: StateStore, inventory: Inventory, *, record: bool = True,
                 revoked: tuple[tuple[int, int], ...] = ()) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._watchers: set[threading.Event] = set()
        # revocations ride in the recorded inventory: versioned, in the history, seen by HA followers
        self._revoked = tuple(sorted(revoked))
        inventory = dataclasses.replace(inventory, revoked=self._revoked)
        self._inventory = inventory
        self.changed_at = time.monotonic()  # when this replica learnt the current version
        self.read_only = not record
        if record:
            self._version, _ = store.record_inventory(inventory.view_json())
        else:  # HA follower: serve what the leader recorded
            self._version = store.current_version()
            stored = store.inventory_at(self._version)
            if stored is not None:
                self._inventory = Inventory.from_view_json(stored)
                self._revoked = self._inventory.revoked

    def snapshot(self) -> tuple[Inventory, int]:
        with self._cond:
            return self._inventory, self._version

    def update(self, inventory: Inventory | None = None,
               revoked: tuple[tuple[int, int], ...] | None = None) -> tuple[int, bool]:
        """Install a new inventory and/or a new revoked set ((serial,
        not_after) pairs); None keeps the current one. Returns (version,
        bumped). Token-only changes take effect without a version bump."""
        with self._cond:
            if self.read_only:  # HA follower: the leader records versions; we adopt them from the store
                return self._version, False
            if revoked is not None:
                self._revoked = tuple(sorted(revoked))
            inventory = dataclasses.replace(inventory or self._inventory, revoked=self._revoked)
            version, bumped = self._store.record_inventory(inventory.view_json())
            if version != self._version:
                self.changed_at = time.monotonic()
            self._version = version
            self._inventory = inventory
            self._notify()
            return self._version, bumped

    def adopt(self, version: int, inventory: Inventory) -> bool:
        """Install a version another replica recorded (HA follower); ignores
        versions not newer than the current one. True if installed."""
        with self._cond:
            if version <= self._version:
                return False
            self._version, self._inventory = version, inventory
            self._revoked = inventory.revoked  # a follower elected later keeps the leader's revocations
            self.changed_at = time.monotonic()
            self._notify()
            return True

    def _notify(self) -> None:
        # caller holds self._cond
        self._cond.notify_all()
        for event in self._watchers:
            event.set()

    def wake(self) -> None:
        """Wake every waiter (shutdown)."""
        with self._cond:
            self._notify()

    def watcher(self) -> threading.Event:
        """A wake-up event for one stream: set on every version change and by
        :meth:`wake`; the stream's own end sets it alone, so a thousand
        streams closing at once do not wake each other."""
        event = threading.Event()
        with self._cond:
            self._watchers.add(event)
        return event

    def unwatch(self, event: threading.Event) -> None:
        with self._cond:
            self._watchers.discard(event)

    def wait_newer(self, version: int, timeout: float,
                   wakeup: threading.Event | None = None) -> tuple[Inventory, int]:
        """The current (inventory, version) once it is not ``version``, or
        after ``timeout`` seconds, or when ``wakeup`` (from :meth:`watcher`)
        is set."""
        if wakeup is None:
            with self._cond:
                self._cond.wait_for(lambda: self._version != version, timeout=timeout)
                return self._inventory, self._version
        with self._cond:
            if self._version != version:
                return self._inventory, self._version
        wakeup.wait(timeout)
        wakeup.clear()  # before reading the version: a change after this sets it again
        with self._cond:
            return self._inventory, self._version

    def change_age(self) -> float:
        """Seconds since the current version reached this replica."""
        return time.monotonic() - self.changed_at


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, state: ControllerState, store: Store, ca: CertificateAuthority,
                 cert_lifetime: dt.timedelta, logger: logging.Logger,
                 clock: Callable[[], dt.datetime] = utcnow,
                 token_review: Callable[[str, str], tuple[bool, str]] | None = None,
                 metrics: ControllerMetrics | None = None,
                 is_leader: Callable[[], bool] = lambda: True,
                 watches: WatchRegistry | None = None) -> None:
        self._state = state
        # one live Watch per node, and threads left for Enroll/Renew (controller.watchlimit)
        self.watches = watches or WatchRegistry(watch_capacity(256))
        self._metrics = metrics or ControllerMetrics()
        self.malformed_log = RateLimitedLog(logger, kind="malformed", on_suppressed=self._metrics.log_line_suppressed)
        self._is_leader = is_leader  # HA: only the leader enrols (it writes)
        self._token_review = token_review  # (node, token) -> (ok, reason): e.g. controller.k8s.TokenReviewer
        self._store = store
        self._ca = ca
        self._lifetime = cert_lifetime
        self._log = logger
        # refusals anyone can cause: one line per kind every REFUSAL_LOG_INTERVAL_S, the rest counted
        self._refusal_logs = {kind: RateLimitedLog(logger, REFUSAL_LOG_INTERVAL_S, kind=f"enrol_{kind}",
                                                   on_suppressed=self._metrics.log_line_suppressed)
                              for kind in REFUSAL_KINDS}
        self._clock = clock
        self._views = ViewCache(store.inventory_at)

    def _refuse_log(self, kind: str, fmt: str, *args: object) -> None:
        self._refusal_logs[kind].warning(fmt, *args)

    def _check_lengths(self, request, context: grpc.ServicerContext) -> None:
        problem = field_too_long(request)  # before anything reads a field (controller.limits)
        if problem is not None:
            self._metrics.enrolment("invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        self._check_lengths(request, context)
        name = request.node_name
        if not name:
            self._metrics.enrolment("invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_name is empty")
        if not self._is_leader():
            self._metrics.enrolment("not_leader")
            context.abort(grpc.StatusCode.UNAVAILABLE, "this controller replica is a follower; enrol at the leader "
                          "(agents given several --controller addresses try the next)")
        inventory, _ = self._state.snapshot()
        try:
            node = inventory.node(name)
        except UnknownNode as e:
            self._metrics.enrolment("unknown_node")
            self._refuse_log("unknown_node", "enrolment refused: unknown node %r from %s", name, context.peer())
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        digest = hashlib.sha256(request.join_token.encode()).digest()
        node_token = bool(node.join_token_sha256) and hmac.compare_digest(digest, node.join_token_sha256)
        if not node_token and not self._reviewed(name, request.join_token):
            self._refuse_log("bad_token", "enrolment refused: wrong join token for node %r from %s", name,
                             context.peer())
            self._metrics.enrolment("bad_token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"join token for node {name!r} is wrong")
        now = self._clock()
        if node_token and node.shared_token:
            # the cluster-wide token enrols only a node without a current certificate (docs/kubernetes.md)
            current = self._current_certificate(name, now)
            if current is not None:
                self._metrics.enrolment("token_used")
                self._refuse_log("token_used",
                                 "enrolment refused: node %r (from %s) presented the cluster join token but "
                                 "holds a valid certificate (serial %x)", name, context.peer(), current[0])
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"node {name!r} already holds a valid certificate (serial {current[0]:x}, until "
                              f"{dt.datetime.fromtimestamp(current[1], dt.timezone.utc).isoformat()}); the "
                              "cluster join token enrols only nodes without one: the agent renews over mutual "
                              "TLS; a node that lost its key enrols again once that certificate expired, or at "
                              "once with --kube-token-review")
        cert = self._issue(request.csr_der, name, now, context)
        if node_token and not node.shared_token and not self._store.consume_token(
                name, digest, int(now.timestamp())):
            self._metrics.enrolment("token_used")
            self._refuse_log("token_used", "enrolment refused: join token of node %r was already used "
                             "(again from %s)", name, context.peer())
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"join token for node {name!r} was already used; a join token enrols once. The agent "
                          "renews its certificate over mutual TLS (Renew); to re-enrol a node that lost its key, "
                          "set a new join_token for it in the inventory")
        return self._record(cert, name, now, context, "enrolled")

    def Renew(self, request: pb.RenewRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        self._check_lengths(request, context)
        name = request.node_name
        if not name:
            self._metrics.enrolment("invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_name is empty")
        self._check_identity(name, context, "Renew")
        if not self._is_leader():
            self._metrics.enrolment("not_leader")
            context.abort(grpc.StatusCode.UNAVAILABLE, "this controller replica is a follower; renew at the leader "
                          "(agents given several --controller addresses try the next)")
        inventory, _ = self._state.snapshot()
        try:
            inventory.node(name)
        except UnknownNode as e:
            self._metrics.enrolment("unknown_node")
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        now = self._clock()
        cert = self._issue(request.csr_der, name, now, context)
        return self._record(cert, name, now, context, "renewed")

    def _current_certificate(self, name: str, now: dt.datetime) -> tuple[int, int] | None:
        """(serial, not_after) of a certificate of ``name`` that is neither
        expired nor revoked, or None."""
        t = now.timestamp()
        revoked = {serial for serial, _, _ in self._store.revoked(int(t))}
        live = [(serial, na) for serial, na, _ in self._store.certificate_ders(name)
                if na > t and serial not in revoked]
        return max(live, key=lambda c: c[1]) if live else None

    def _issue(self, csr_der: bytes, name: str, now: dt.datetime, context: grpc.ServicerContext) -> x509.Certificate:
        try:
            return self._ca.issue_for_csr(csr_der, name, self._lifetime, now)
        except CsrError as e:
            self._refuse_log("bad_csr", "enrolment refused: bad CSR for node %r: %s", name, e)
            self._metrics.enrolment("bad_csr")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _record(self, cert: x509.Certificate, name: str, now: dt.datetime, context: grpc.ServicerContext,
                how: str) -> pb.EnrollResponse:
        """Store the certificate; revoke the node's earlier ones for another
        key (a re-enrolment with a new key replaces them)."""
        der = cert.public_bytes(serialization.Encoding.DER)
        not_after = int(cert.not_valid_after_utc.timestamp())
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        replaced = []
        for serial, na, old_der in self._store.certificate_ders(name):
            if na <= now.timestamp():
                continue
            old_key = x509.load_der_x509_certificate(old_der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if old_key != spki:
                replaced.append((serial, name, na))
        self._store.add_certificate(cert.serial_number, name, int(cert.not_valid_before_utc.timestamp()),
                                    not_after, der)
        if replaced:
            self._store.revoke(replaced)
            self._revocations_changed(now)
            self._log.warning("node %r has a new key: revoked its earlier certificates %s", name,
                              ", ".join(f"{s:x}" for s, _, _ in replaced))
        self._metrics.enrolment("ok" if how == "enrolled" else "renewed")
        self._log.info("%s node %r from %s: serial %x, valid until %s", how, name, context.peer(),
                       cert.serial_number, cert.not_valid_after_utc.isoformat())
        return pb.EnrollResponse(certificate_chain_der=[der], ca_certificates_der=[self._ca.certificate_der],
                                 not_after=not_after)

    def _revocations_changed(self, now: dt.datetime) -> None:
        revoked = tuple((serial, na) for serial, _, na in self._store.revoked(int(now.timestamp())))
        self._state.update(revoked=revoked)

    def _reviewed(self, name: str, token: str) -> bool:
        if self._token_review is None:
            return False
        ok, why = self._token_review(name, token)
        if not ok:
            self._refuse_log("token_review", "token review for node %r refused: %s", name, why)
        return ok

    def _check_identity(self, name: str, context: grpc.ServicerContext, rpc: str = "Watch") -> None:
        """The client certificate is ``name``'s, unexpired and not revoked;
        else abort PERMISSION_DENIED."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{rpc} needs mutual TLS with the certificate issued by Enroll; none was presented "
                          "(use the watch port)")
        cert = x509.load_pem_x509_certificate(pems[0])
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = sans.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        if cns != [name] or dns != [name]:
            who = dns[0] if dns else (cns[0] if cns else "?")
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"client certificate is for {who!r}, not for node {name!r}")
        if cert.not_valid_after_utc <= self._clock():
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"client certificate of node {name!r} expired at {cert.not_valid_after_utc.isoformat()}")
        inventory, _ = self._state.snapshot()
        if rpc == "Watch" and name not in {n.name for n in inventory.nodes}:
            context.abort(grpc.StatusCode.NOT_FOUND, str(UnknownNode(name)))
        if cert.serial_number in inventory.revoked_serials:
            if rpc == "Renew":
                self._metrics.enrolment("revoked_cert")
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"client certificate of node {name!r} (serial {cert.serial_number:x}) was revoked: the "
                          "node enrolled again with a new key or was removed from the inventory; enrol with a "
                          "new join token")

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        problem = field_too_long(request)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        name = request.node_name
        self._check_identity(name, context)
        wakeup = self._state.watcher()
        ticket = self.watches.register(name, wakeup, context.cancel)
        if ticket is None:
            self._state.unwatch(wakeup)
            self._refuse_log("watch_capacity",
                             "Watch of node %r refused: %d Watch streams are live, the most this controller "
                             "serves with its --max-workers", name, self.watches.capacity)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the controller serves {self.watches.capacity} Watch streams already; retry later "
                          "(operators: raise --max-workers)")
        context.send_initial_metadata((("meshsec-watch", "established"),))
        context.add_callback(wakeup.set)
        self._metrics.watch_started()
        try:
            if not self.watches.started(ticket):
                self._log.info("node %r opened a newer Watch; ending this one", name)
                return
            yield from self._watch(request, context, name, wakeup, ticket)
        finally:
            self.watches.release(ticket)
            self._state.unwatch(wakeup)
            self._metrics.watch_ended()

    def _watch(self, request: pb.WatchRequest, context: grpc.ServicerContext, name: str,
               wakeup: threading.Event, ticket=None) -> Iterator[bytes]:
        # Yields serialized ViewUpdates (see add_servicer): the shared
        # per-version work lives in controller.fanout; a stream keeps only
        # the index of the version it last sent.
        inventory, version = self._state.snapshot()
        cur = self._views.current(version, inventory)
        if name not in cur:
            context.abort(grpc.StatusCode.NOT_FOUND, str(UnknownNode(name)))
        since = request.since_version
        base = self._views.at(since) if 0 < since <= version else None
        if base is not None and name not in base:
            base = None
        self._log.info("node %r watching from version %d (current %d, %s)", name, since, version,
                       "incremental" if base is not None else "snapshot")
        if base is None:
            yield cur.snapshot(name)
        else:
            update = self._views.update(base, cur, name)
            if update is not None:
                yield update
        while context.is_active():
            if ticket is not None and ticket.superseded:
                self._log.info("node %r opened a newer Watch; ending this one", name)
                return
            inventory, newer = self._state.wait_newer(version, timeout=WATCH_POLL_S, wakeup=wakeup)
            if newer == version:
                continue
            nxt = self._views.current(newer, inventory)
            if name not in nxt:
                self._log.info("node %r left the inventory; ending its watch", name)
                context.abort(grpc.StatusCode.NOT_FOUND, f"node {name!r} was removed from the inventory")
            update = self._views.update(cur, nxt, name)
            cur, version = nxt, newer
            if update is not None:
                self._log.debug("node %r: version %d, %d bytes", name, version, len(update))
                self._metrics.fanout_observed(self._state.change_age())
                yield update
        self._log.info("node %r stopped watching", name)


def _serialize_update(update: bytes | pb.ViewUpdate) -> bytes:
    return update if isinstance(update, bytes) else update.SerializeToString()


def add_servicer(servicer: ControllerServicer, server: grpc.Server, extra: dict | None = None) -> None:
    """Register ``meshsec.v1.Controller`` like the generated
    ``add_ControllerServicer_to_server``, except that Watch may yield
    pre-serialized ``ViewUpdate`` bytes (shared across streams)."""
    # malformed protobuf: INVALID_ARGUMENT and one rate-limited log line (controller.watchlimit)
    bad = getattr(servicer, "malformed_log", None) or RateLimitedLog(logging.getLogger("meshsec.controller"))
    handlers = {
        "Enroll": grpc.unary_unary_rpc_method_handler(
            guard(servicer.Enroll, "Enroll", "EnrollRequest", bad),
            request_deserializer=tolerant_deserializer(pb.EnrollRequest),
            response_serializer=pb.EnrollResponse.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            guard(servicer.Watch, "Watch", "WatchRequest", bad),
            request_deserializer=tolerant_deserializer(pb.WatchRequest),
            response_serializer=_serialize_update),
        "Renew": grpc.unary_unary_rpc_method_handler(
            guard(servicer.Renew, "Renew", "RenewRequest", bad),
            request_deserializer=tolerant_deserializer(pb.RenewRequest),
            response_serializer=pb.EnrollResponse.SerializeToString),
    }
    from controller.badinput import tolerant_handler
    # ReportStatus, GetMesh (controller.status)
    handlers.update({name: tolerant_handler(h, name, bad) for name, h in (extra or {}).items()})
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("meshsec.v1.Controller", handlers),))
    server.add_registered_method_handlers("meshsec.v1.Controller", handlers)


def enrol_port(server: "ControllerServer", servicer: ControllerServicer,
               creds: grpc.ServerCredentials) -> EnrolPort:
    """The enrol port's server: Enroll, and the mutual-TLS methods answered as on the watch port."""
    mesh = server.mesh.rpc_handlers() if server.mesh is not None else {}
    handlers = {"Enroll": (servicer.Enroll, pb.EnrollRequest), "Renew": (servicer.Renew, pb.RenewRequest),
                "Watch": (watch_port_only(servicer._check_identity), pb.WatchRequest)}
    for name, message in (("ReportStatus", pb.StatusReport), ("GetMesh", pb.GetMeshRequest)):
        if name in mesh:
            handlers[name] = (mesh[name].unary_unary, message)
    return EnrolPort(server.listen, creds, handlers, options=server.grpc_options, logger=server.log,
                     read_timeout=server.enroll_read_timeout, max_concurrent=server.enroll_max_concurrent,
                     malformed_log=servicer.malformed_log,
                     on_dropped=server.metrics.enrol_port_dropped)


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def default_watch_listen(listen: str) -> str:
    """The watch (mTLS) address for an enrol address: same host, port + 1
    (port 0, ephemeral, stays 0)."""
    host, port = split_listen(listen)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + 1 if port else 0}"


def default_server_names(listen_host: str) -> list[str]:
    """The listen host's IP (unless a wildcard) and this machine's hostname."""
    names = []
    if listen_host not in ("0.0.0.0", "::", ""):
        names.append(listen_host)
    hostname = socket.gethostname()
    if hostname:
        names.append(hostname.lower())
    return names


class ControllerServer:
    """Controller process core, usable in-process (tests) and by main.

    ``start()`` raises :class:`InventoryError` for a bad inventory and
    ``OSError`` if it cannot listen; it returns the bound enrol port
    (:attr:`port`; the watch port is :attr:`watch_port`).
    """

    def __init__(self, inventory_path: str | Path, state_dir: str | Path, *, listen: str = "0.0.0.0:7443",
                 watch_listen: str | None = None, server_names: list[str] | None = None, cert_lifetime: dt.timedelta = dt.timedelta(hours=24),
                 poll_interval: float = 1.0, max_workers: int = 256, ha=None,
                 metrics_listen: str | None = None, health_listen: str | None = None,
                 logger: logging.Logger | None = None, node_source=None,
                 token_review: Callable[[str, str], tuple[bool, str]] | None = None,
                 source_sync_timeout: float = 10.0, grpc_options: list[tuple[str, int]] | None = None,
                 mesh_options: dict | None = None, enroll_read_timeout: float = ENROLL_READ_TIMEOUT_S,
                 enroll_max_concurrent: int = ENROLL_MAX_CONCURRENT) -> None:
        self.enroll_read_timeout = enroll_read_timeout  # seconds an enrol-port call may take to send its request
        self.enroll_max_concurrent = enroll_max_concurrent  # calls open at once on the enrol port
        self.enrol_port: EnrolPort | None = None
        # mesh_options: keyword arguments of controller.status.MeshService (web page, status socket)
        self.mesh_options = dict(mesh_options or {})
        self.mesh = None
        # node_source: controller.nodesource.NodeSource (e.g. Kubernetes Nodes), merged with the inventory
        self.node_source = node_source
        self.grpc_options = list(grpc_options) if grpc_options is not None else SERVER_OPTIONS
        self.token_review = token_review
        self.source_sync_timeout = source_sync_timeout
        self._file_inventory: Inventory | None = None
        self._merge_lock = threading.Lock()
        self.inventory_path = Path(inventory_path)
        self.state_dir = Path(state_dir)
        self.listen = listen
        host, port = split_listen(listen)
        if watch_listen is None:
            watch_listen = default_watch_listen(listen)
        split_listen(watch_listen)
        self.watch_listen = watch_listen
        self.server_names = list(server_names) if server_names else default_server_names(host)
        self.cert_lifetime = cert_lifetime
        self.poll_interval = poll_interval
        # ha: controller.leader.HaConfig (etcd store + leader election) or None (SQLite, one replica)
        self.ha = ha
        self.metrics = ControllerMetrics()
        self.metrics_listen = metrics_listen
        self.metrics_port = 0
        self.health_listen = health_listen
        self.health_port = 0
        self.is_leader = ha is None
        self._replica = None
        self._health_server: grpc.Server | None = None
        self.max_workers = max_workers
        self.watches = WatchRegistry(watch_capacity(max_workers))
        self.log = logger or logging.getLogger("meshsec.controller")
        self.port = 0
        self.watch_port = 0
        self.store: Store | None = None
        self.ca: CertificateAuthority | None = None
        self.state: ControllerState | None = None
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._stat: tuple[int, int, int] | None = None

    @property
    def controller_addresses(self) -> list[str]:
        """This controller's own addresses (listen hosts, --server-name
        values; names and wildcards are skipped by the inventory check)."""
        return [split_listen(self.listen)[0], split_listen(self.watch_listen)[0], *self.server_names]

    @property
    def ca_path(self) -> Path:
        return self.state_dir / CA_FILE

    def _file_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.inventory_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> int:
        self._stat = self._file_stat()
        inventory = self._file_inventory = load_inventory(self.inventory_path, self.controller_addresses)
        if self.node_source is not None:
            self.node_source.start(self._on_source_change)
            if not self.node_source.wait_synced(self.source_sync_timeout):
                self.log.warning("no Node list from %s after %.0f s; serving the inventory alone until it arrives",
                                 self.node_source.name, self.source_sync_timeout)
            inventory = self._merged()
        if self.ha is not None:
            self._replica = self.ha.replica(self)
            self.store = self._replica.store
            self.state_dir.mkdir(parents=True, exist_ok=True)  # for ca.pem only
        else:
            self.store = Store(self.state_dir)
        now = utcnow()
        self.ca = CertificateAuthority.load_or_create(self.store, now)
        tmp = self.ca_path.with_suffix(".pem.tmp")
        tmp.write_bytes(self.ca.certificate_pem)
        os.replace(tmp, self.ca_path)
        revoked = ()
        if self.ha is None:
            # nodes removed from the inventory while the controller was down (not those of a node
            # source that has not listed its nodes yet)
            synced = self.node_source is None or self.node_source.wait_synced(0)
            stored = self.store.inventory_at(self.store.current_version())
            if stored is not None and synced:
                gone = {n.name for n in Inventory.from_view_json(stored).nodes} - {n.name for n in inventory.nodes}
                self._revoke_nodes(gone, now)
            revoked = self._revoked_now(now)
        self.state = ControllerState(self.store, inventory, record=self.ha is None, revoked=revoked)
        if self.node_source is not None:
            self._install()  # a Node change that came in while starting
        key_pem, cert_pem = self.ca.issue_server(self.server_names, now)
        enrol_creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        watch_creds = grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=self.ca.certificate_pem,
                                                  require_client_auth=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers,
                                                        thread_name_prefix="meshsec-rpc"),
                             options=self.grpc_options)
        servicer = ControllerServicer(self.state, self.store, self.ca, self.cert_lifetime, self.log,
                                      metrics=self.metrics, is_leader=lambda: self.is_leader,
                                      token_review=self.token_review, watches=self.watches)
        from controller.status import MeshService  # ReportStatus, GetMesh, web page, status socket
        self.mesh = MeshService(self, servicer, logger=self.log, **self.mesh_options)
        add_servicer(servicer, server, self.mesh.rpc_handlers())
        try:
            watch_port = server.add_secure_port(self.watch_listen, watch_creds)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.watch_listen}: {e}") from None
        if not watch_port:
            raise OSError(f"cannot listen on {self.watch_listen}")
        from controller.metrics import add_health_and_reflection
        add_health_and_reflection(server, log=servicer.malformed_log)
        # the unauthenticated enrol port: its own aio server, a stalled call costs no thread (controller.enrolport)
        self.enrol_port = enrol_port(self, servicer, enrol_creds)
        ports = [self.enrol_port.start(), watch_port]
        server.start()
        self._server = server
        try:
            self.mesh.start(key_pem, cert_pem, self.ca.certificate_pem)
        except OSError:
            server.stop(0)
            self._server = None
            self.enrol_port.stop(0)
            raise
        if self.health_listen:
            self._health_server, self.health_port = add_health_and_reflection(
                None, self.health_listen, log=servicer.malformed_log)
        if self.metrics_listen:
            self.metrics_port = self.metrics.serve(self.metrics_listen)
        self.metrics.set_leader(self.is_leader)
        self.metrics.version.set_function(lambda: self.state.snapshot()[1] if self.state else 0)
        if self._replica is not None:
            self._replica.start()
        self.port, self.watch_port = ports
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="inventory-poll", daemon=True)
        self._poller.start()
        _, version = self.state.snapshot()
        self.log.info("inventory %s: %d nodes, view version %d", self.inventory_path,
                      len(inventory.nodes), version)
        return self.port

    def reload_if_changed(self) -> bool:
        """Reload the inventory if the file changed; True if a new inventory
        was installed. A bad file is logged and the old inventory kept."""
        stat = self._file_stat()
        if stat == self._stat:
            return False
        self._stat = stat
        try:
            inventory = load_inventory(self.inventory_path, self.controller_addresses)
        except InventoryError as e:
            self.log.error("inventory change rejected, keeping the previous one: %s", e)
            return False
        assert self.state is not None
        self._file_inventory = inventory
        version, bumped = self._install()
        self.log.info("inventory reloaded: %d nodes, view version %d%s", len(inventory.nodes), version,
                      "" if bumped else " (views unchanged)")
        return True

    def _merged(self) -> Inventory:
        """The inventory file's nodes plus the node source's (clashes logged, see controller.nodesource)."""
        assert self._file_inventory is not None
        if self.node_source is None:
            return self._file_inventory
        from controller.nodesource import merge_nodes
        merged, problems = merge_nodes(self._file_inventory, self.node_source.nodes(), self.node_source.name)
        for problem in problems:
            self.log.error("%s", problem)
        return merged

    def _install(self) -> tuple[int, bool]:
        with self._merge_lock:
            assert self.state is not None
            merged = self._merged()
            revoked = None
            if self.is_leader and self.store is not None:
                old, _ = self.state.snapshot()
                gone = {n.name for n in old.nodes} - {n.name for n in merged.nodes}
                if gone:
                    now = utcnow()
                    self._revoke_nodes(gone, now)
                    revoked = self._revoked_now(now)
            return self.state.update(merged, revoked=revoked)

    def _revoke_nodes(self, names: set[str], now: dt.datetime) -> None:
        """Revoke every unexpired certificate of nodes removed from the inventory."""
        assert self.store is not None
        t = now.timestamp()
        for name in sorted(names):
            certs = [(serial, name, na) for serial, na, _ in self.store.certificate_ders(name) if na > t]
            if certs:
                self.store.revoke(certs)
                self.log.warning("node %r left the inventory: revoked its certificates %s", name,
                                 ", ".join(f"{s:x}" for s, _, _ in certs))

    def _revoked_now(self, now: dt.datetime) -> tuple[tuple[int, int], ...]:
        assert self.store is not None
        return tuple((serial, na) for serial, _, na in self.store.revoked(int(now.timestamp())))

    def refresh_revoked(self, now: dt.datetime | None = None) -> bool:
        """Drop revoked serials whose certificates expired (keeps the list in
        the views bounded); True if the views changed. The leader polls it."""
        if not self.is_leader or self.store is None or self.state is None:
            return False
        revoked = self._revoked_now(now or utcnow())
        if revoked == self.state.snapshot()[0].revoked:
            return False
        with self._merge_lock:
            _, bumped = self.state.update(revoked=revoked)
        return bumped

    def _on_source_change(self) -> None:
        if self.state is None:  # still starting: start() merges after the first sync
            return
        version, bumped = self._install()
        if bumped:
            self.log.info("%s nodes changed: view version %d", self.node_source.name, version)

    def _poll(self) -> None:
        next_prune = time.monotonic() + REVOKED_PRUNE_S
        while not self._stop.wait(self.poll_interval):
            if not self.is_leader:
                continue  # HA follower: the leader reads the inventory and records versions
            try:
                self.reload_if_changed()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + REVOKED_PRUNE_S
                    self.refresh_revoked()
            except Exception:  # keep serving whatever happens to the file
                self.log.exception("inventory poll failed")

    def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        if self._replica is not None:
            self._replica.stop()  # a leader resigns first: a follower takes over at once
        if self._health_server is not None:
            self._health_server.stop(grace)
            self._health_server = None
        self.metrics.close()
        if self.mesh is not None:
            self.mesh.stop()
        if self.node_source is not None:
            self.node_source.stop()
        if self.enrol_port is not None:
            self.enrol_port.stop(grace)
            self.enrol_port = None
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self.state is not None:
            self.state.wake()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None
        if self.store is not None:
            self.store.close()
            self.store = None
