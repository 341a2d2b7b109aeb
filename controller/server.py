"""The controller process core: :class:`ControllerServer` wires inventory, store, CA, the
servicer (controller.servicer) and the two gRPC servers.

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

import datetime as dt
import logging
import os
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc

from controller.ca import CertificateAuthority
from controller.fdlimit import nofile, port_caps
from controller.enrolport import (ENROLL_HANDSHAKE_TIMEOUT_S, ENROLL_MAX_CONCURRENT, ENROLL_READ_TIMEOUT_S, EnrolPort,
                                 watch_port_only)
from controller.inventory import InventoryError, load_inventory
from controller.metrics import ControllerMetrics
from controller.policy import Inventory
from controller.servicer import ControllerServicer, add_servicer
from controller.state import ControllerState, utcnow
from controller.store import Store
from controller.watchlimit import WatchRegistry, watch_capacity
from meshsec.v1 import controller_pb2 as pb

CA_FILE = "ca.pem"
# How often the leader forgets revoked serials whose certificates expired.
REVOKED_PRUNE_S = 60.0

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
                     handshake_timeout=server.enroll_handshake_timeout,
                     max_connections=server.enroll_max_connections,
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
                 enroll_max_concurrent: int = ENROLL_MAX_CONCURRENT,
                 enroll_handshake_timeout: float = ENROLL_HANDSHAKE_TIMEOUT_S,
                 enroll_max_connections: int | None = None, watch_max_connections: int | None = None) -> None:
        # connections open at once per port; None: a share of RLIMIT_NOFILE (controller.fdlimit)
        self.enroll_max_connections, self.watch_max_connections = enroll_max_connections, watch_max_connections
        # seconds a connection to the enrol port may take to finish its TLS handshake
        self.enroll_handshake_timeout = enroll_handshake_timeout
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
        enrol_cap, watch_cap = port_caps(nofile()[0])
        self.enroll_max_connections = self.enroll_max_connections or enrol_cap
        self.watch_max_connections = self.watch_max_connections or watch_cap
        watch_options = [*self.grpc_options,
                         ("grpc.server_handshake_timeout_ms", max(1, int(self.enroll_handshake_timeout * 1000))),
                         ("grpc.max_allowed_incoming_connections", self.watch_max_connections)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers,
                                                        thread_name_prefix="meshsec-rpc"),
                             options=watch_options)
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
