"""Leader election among controller replicas on an etcd lease.

Campaign: grant a lease of ``ttl`` seconds, then one txn — if the leader
key's create_revision is 0 (nobody holds it), put our replica id bound to
the lease; otherwise stay a follower and try again every ``ttl / 3``
seconds. The leader refreshes its lease every ``ttl / 3`` seconds and
steps down (``on_lost``) when etcd says the lease expired, when the leader
key no longer holds our id, or when no keepalive succeeded for ``ttl``
seconds (etcd unreachable: etcd may already have expired the lease, so we
must stop acting as leader before another replica can start). A leader that
stops cleanly revokes its lease so a follower takes over at once.

Callbacks run on the elector's thread; they must not block for long.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from controller.store_etcd import EtcdClient, EtcdError, EtcdTls, _b64, _cmp_absent


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class LeaderElector:
    """``client``: :class:`EtcdClient`; ``key``: the leader key (bytes);
    ``replica_id``: this replica's name (stored as the key's value);
    ``ttl``: lease seconds (>= 2). ``on_elected()`` / ``on_lost()`` are
    called on transitions. ``clock`` returns monotonic seconds."""

    def __init__(self, client: EtcdClient, key: bytes, replica_id: str, *, ttl: int = 10,
                 on_elected: Callable[[], None] | None = None, on_lost: Callable[[], None] | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 2:
            raise ValueError(f"--etcd-lease-ttl {ttl}: use at least 2 seconds")
        self.client = client
        self.key = key
        self.replica_id = replica_id
        self.ttl = ttl
        self.on_elected = on_elected or (lambda: None)
        self.on_lost = on_lost or (lambda: None)
        self.log = logger or logging.getLogger("meshsec.controller.leader")
        self.clock = clock
        self.is_leader = False
        self.lease = 0
        self.transitions = 0
        self._last_ok = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LeaderElector({self.replica_id!r}, leader={self.is_leader})"

    def leader_id(self) -> str | None:
        """The current leader's replica id per etcd (None: no leader)."""
        got = self.client.get(self.key)
        return None if got is None else got[0].decode(errors="replace")

    # -- one step each; the thread calls these, tests call them directly ------
    def campaign(self) -> bool:
        """Try once to become leader; True if we are leader afterwards."""
        if self.is_leader:
            return True
        if not self.lease:
            self.lease = self.client.lease_grant(self.ttl)
        doc = self.client.txn(
            [_cmp_absent(self.key)],
            [{"request_put": {"key": _b64(self.key), "value": _b64(self.replica_id), "lease": str(self.lease)}}],
            [])
        if doc.get("succeeded"):
            self._last_ok = self.clock()
            self._set(True, "won the election")
            return True
        # keep our lease alive while waiting so a later win does not need a new one
        if self.client.lease_keepalive(self.lease) <= 0:
            self.lease = 0
        return False

    def keepalive(self) -> bool:
        """Refresh the leader's lease; steps down and returns False if lost."""
        if not self.is_leader:
            return False
        try:
            ttl = self.client.lease_keepalive(self.lease)
            holder = self.leader_id()
        except EtcdError as e:
            if self.clock() - self._last_ok >= self.ttl:
                self.lease = 0
                self._set(False, f"no keepalive for {self.ttl} s ({e})")
            else:
                self.log.warning("lease keepalive failed (%s); still leader for %.1f s", e,
                                 self.ttl - (self.clock() - self._last_ok))
            return self.is_leader
        if ttl <= 0 or holder != self.replica_id:
            self.lease = 0
            self._set(False, "lease expired" if ttl <= 0 else f"leader key now held by {holder!r}")
            return False
        self._last_ok = self.clock()
        return True

    def _set(self, leader: bool, why: str) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        self.transitions += 1
        self.log.warning("%s leadership: %s", "took" if leader else "lost", why)
        try:
            (self.on_elected if leader else self.on_lost)()
        except Exception:
            self.log.exception("leadership callback failed")

    # -- thread ----------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leader-elector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.ttl / 3
        while not self._stop.is_set():
            try:
                if self.is_leader:
                    self.keepalive()
                else:
                    self.campaign()
            except EtcdError as e:
                self.log.warning("leader election: %s", e)
                self.lease = 0 if not self.is_leader else self.lease
            except Exception:
                self.log.exception("leader election step failed")
            self._stop.wait(period)

    def stop(self) -> None:
        """Stop campaigning; a leader resigns (revokes its lease: the key goes at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lease:
            try:
                self.client.lease_revoke(self.lease)
            except EtcdError as e:
                self.log.warning("could not revoke lease on stop: %s", e)
            self.lease = 0
        self._set(False, "stopping")


class HaConfig:
    """``meshsec-controller --etcd-endpoints``: state in etcd, leader election.

    ``endpoints``: URLs (:func:`controller.store_etcd.parse_endpoints`);
    ``prefix``: key prefix; ``ttl``: lease seconds; ``replica_id``: this
    replica's name (default hostname-pid); ``tls``: :class:`EtcdTls` for
    ``https://`` endpoints (None: the system trust store, no client certificate)."""

    def __init__(self, endpoints: list[str], *, prefix: str = "/meshsec/", ttl: int = 10,
                 replica_id: str | None = None, timeout: float = 3.0, tls: EtcdTls | None = None) -> None:
        if ttl < 2:
            raise ValueError(f"--etcd-lease-ttl {ttl}: use at least 2 seconds")
        self.endpoints = endpoints
        self.prefix = prefix
        self.ttl = ttl
        self.replica_id = replica_id or default_replica_id()
        self.timeout = timeout
        self.tls = tls

    @classmethod
    def from_args(cls, args, log: logging.Logger | None = None) -> "HaConfig":
        """From ``meshsec-controller``'s flags (``--etcd-*``, ``--replica-id``); ValueError
        naming the flag. Plain ``http://`` to a non-loopback etcd needs
        ``--etcd-allow-plain-http`` (logged)."""
        from controller.store_etcd import check_plain_http, parse_endpoints

        endpoints = parse_endpoints(args.etcd_endpoints)
        https = endpoints[0].startswith("https://")
        given = [f for f in ("etcd_cacert", "etcd_cert", "etcd_key") if getattr(args, f, None)]
        if given and not https:
            raise ValueError(f"--{given[0].replace('_', '-')} needs https:// --etcd-endpoints")
        check_plain_http(endpoints, getattr(args, "etcd_allow_plain_http", False), log)
        tls = EtcdTls(args.etcd_cacert, args.etcd_cert, args.etcd_key) if https else None
        return cls(endpoints, prefix=args.etcd_prefix, ttl=args.etcd_lease_ttl, replica_id=args.replica_id, tls=tls)

    def replica(self, server) -> "Replica":
        return Replica(self, server)


class Replica:
    """Wires one :class:`controller.server.ControllerServer` to etcd: the
    store (fenced by the leader key), the elector and the view follower."""

    def __init__(self, cfg: HaConfig, server) -> None:
        from controller.store_etcd import EtcdStore, ViewFollower

        self.cfg = cfg
        self.server = server
        self.log = server.log.getChild("ha")
        self.client = EtcdClient(cfg.endpoints, timeout=cfg.timeout, tls=cfg.tls, logger=self.log)
        self.store = EtcdStore(self.client, cfg.prefix)
        self.store.current_version()  # fail early (EtcdError) if etcd is unreachable
        # a replica's view writes hold only while the leader key carries its id
        self.store.set_fence(cfg.replica_id.encode())
        self.elector = LeaderElector(self.client, self.store.leader_key, cfg.replica_id, ttl=cfg.ttl,
                                     on_elected=self._elected, on_lost=self._lost, logger=self.log)
        self.follower = ViewFollower(self.store, self._follow, logger=self.log)

    def start(self) -> None:
        self.follower.start()
        self.elector.start()

    def stop(self) -> None:
        self.elector.stop()
        self.follower.stop()

    def _elected(self) -> None:
        srv = self.server
        srv.state.read_only = False
        srv.is_leader = True
        srv._stat = None  # the poll thread re-reads the inventory and records it
        srv.metrics.set_leader(True)

    def _lost(self) -> None:
        srv = self.server
        srv.is_leader = False
        srv.state.read_only = True
        srv.metrics.set_leader(False)

    def _follow(self, version: int, view_json: str) -> None:
        from controller.policy import Inventory

        srv = self.server
        if srv.state.adopt(version, Inventory.from_view_json(view_json)):
            self.log.info("view version %d from etcd", version)
