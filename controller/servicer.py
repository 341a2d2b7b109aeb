"""The ``meshsec.v1.Controller`` servicer: Enroll, Renew and Watch (:class:`ControllerServicer`),
and :func:`add_servicer`, which registers it on a thread-pool server.

Authentication:
- ``Enroll``: server-side TLS only; the join token authenticates (compared
  in constant time against its SHA-256).
- ``Renew``, ``Watch``: mutual TLS; the servicer requires a client certificate whose
  identity (CN and its only dNSName SAN) equals ``node_name``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import threading
from typing import Callable, Iterator

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from controller.ca import CertificateAuthority, CsrError
from controller.fanout import ViewCache
from controller.limits import field_too_long
from controller.metrics import ControllerMetrics
from controller.policy import UnknownNode
from controller.state import ControllerState, utcnow
from controller.store import Store
from controller.watchlimit import PerNodeLog, RateLimitedLog, WatchRegistry, guard, tolerant_deserializer, watch_capacity
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

# Refusals an unauthenticated caller can cause are logged once per kind in this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_KINDS = ("unknown_node", "bad_token", "token_used", "bad_csr", "token_review", "watch_capacity")
# A Watch stream re-checks that its RPC is alive this often even without a
# wake-up (its end wakes it at once through a gRPC callback).
WATCH_POLL_S = 5.0


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
        # Watch start/end lines: an enrolled node may reconnect in a loop (one line per node and kind)
        self._watch_log = PerNodeLog(logger, REFUSAL_LOG_INTERVAL_S, on_suppressed=self._metrics.log_line_suppressed)
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
                self._watch_log.info("watch_superseded", name, "node %r opened a newer Watch; ending this one", name)
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
        self._watch_log.info("watch_started", name, "node %r watching from version %d (current %d, %s)", name,
                             since, version, "incremental" if base is not None else "snapshot")
        if base is None:
            yield cur.snapshot(name)
        else:
            update = self._views.update(base, cur, name)
            if update is not None:
                yield update
        while context.is_active():
            if ticket is not None and ticket.superseded:
                self._watch_log.info("watch_superseded", name, "node %r opened a newer Watch; ending this one", name)
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
        self._watch_log.info("watch_stopped", name, "node %r stopped watching", name)


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
