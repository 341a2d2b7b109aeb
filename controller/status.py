"""Mesh-wide visibility on the controller: agents' status reports, the mesh
document built from them, and the ways it is read.

- ``ReportStatus`` (mutual TLS, the node's own certificate): the latest
  :class:`~meshsec.v1.controller_pb2.StatusReport` per node, kept **in
  memory** with the time it came (a restarted controller knows nothing until
  the agents report again, within one report interval (:func:`report_interval`:
  10 s, longer in meshes of more than 100 nodes); each HA replica
  knows the reports of the agents that talk to it). Bounded: at most
  ``MAX_REPORT_PEERS`` peers and ``MAX_REPORT_BYTES`` bytes per report,
  strings cut short, peers not in the inventory ignored; rate-limited per
  node (a bucket of ``RATE_BURST`` reports refilled at ``RATE_PER_S``).
- ``GetMesh`` (mutual TLS, any enrolled node), the controller's web page
  (controller.web, ``/api/mesh``) and a local UNIX socket (``--status-socket``,
  mode 0600, for ``meshsec mesh`` on the controller host) serve
  :meth:`MeshService.document`, whose shape docs/metrics.md ("Seeing the
  mesh") describes.

A pair's state comes from both ends' reports: ``up`` (a CHILD_SA carries it
and neither fresh end lacks one), ``down`` (a fresh end has no SA: its last
error is the reason), ``connecting`` (with the last error of an earlier
attempt, if any), ``never`` (both ends idle: never tried),
``unknown`` (no fresh report from either end), or the policy's ``bypass`` /
``discard``. A report is fresh for three report intervals; a node is
``connected`` while its report is fresh.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from typing import Any, Callable

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controller.policy import Inventory, pair_policy
from meshsec.v1 import controller_pb2 as pb

REPORT_INTERVAL_S = 10.0        # what the controller asks agents for (small meshes)
MAX_ENDS_PAIRS = 1000            # larger documents leave out each pair's two rows (``ends``)


def report_interval(nodes: int) -> float:
    """Seconds between periodic reports for a mesh of ``nodes`` nodes: 10 s, longer
    from 100 nodes on (N / 10 s, at most 300 s), so the controller takes about 10
    reports a second whatever the size (a 1000-peer report is about 100 KB)."""
    return min(300.0, max(REPORT_INTERVAL_S, nodes / 10.0))
MAX_REPORT_PEERS = 4096
MAX_REPORT_BYTES = 256 * 1024
MAX_TEXT = 200                  # characters kept of any string in a report
RATE_BURST = 3
RATE_PER_S = 1.0
MAX_PAIRS = 20_000              # larger meshes list only pairs a fresh report shows as tried
DOCUMENT_CACHE_S = 1.0
ENROLLED_CACHE_S = 10.0         # who holds a certificate: asked of the store at most this often
PEER_STATES = ("up", "connecting", "down", "idle", "bypass", "discard")
PAIR_STATES = ("up", "connecting", "down", "never", "unknown", "bypass", "discard")
REPORT_RESULTS = ("ok", "too_large", "rate_limited", "unknown_node", "bad_name")


class RateLimiter:
    """Token bucket per key: ``burst`` calls at once, refilled at ``rate`` per second."""

    def __init__(self, burst: int = RATE_BURST, rate: float = RATE_PER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # keys are node names; bounded anyway
                self._buckets.clear()
            return True


def _text(s: str) -> str:
    return s[:MAX_TEXT]


def report_to_dict(r: pb.StatusReport, known: set[str]) -> dict[str, Any]:
    """A report as JSON-ready dict; peers not in ``known`` dropped, strings cut."""
    peers = {}
    for p in r.peers:
        if p.name not in known or p.name in peers:
            continue
        peers[p.name] = {
            "state": p.state if p.state in PEER_STATES else "unknown", "ike_state": _text(p.ike_state),
            "child_sas": p.child_sas, "last_handshake": p.last_handshake, "last_error": _text(p.last_error),
            "last_error_at": p.last_error_at, "endpoint": _text(p.endpoint), "bytes_in": p.bytes_in,
            "bytes_out": p.bytes_out, "packets_in": p.packets_in, "packets_out": p.packets_out,
            "drops": {_text(k): v for k, v in sorted(p.drops.items())[:64]}, "sa": _text(p.sa), "rule": _text(p.rule),
            "mtu": p.mtu,
        }
    return {
        "view_version": r.view_version, "cert_not_after": r.cert_not_after, "tun_mtu": r.tun_mtu,
        "underlay_mtu": r.underlay_mtu, "uptime_s": round(r.uptime_s, 1), "view_source": _text(r.view_source),
        "local_address": _text(r.local_address), "drops": {_text(k): v for k, v in sorted(r.drops.items())[:64]},
        "peers": peers,
    }


class MeshStatus:
    """The latest report per node (in memory), with when it came and the
    per-peer throughput derived from the previous one. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        # node -> (report dict, received at (Unix s), {peer: (bps in, bps out)})
        self._reports: dict[str, tuple[dict, float, dict[str, tuple[float, float]]]] = {}

    def ingest(self, name: str, report: dict[str, Any]) -> None:
        now = self.clock()
        with self._lock:
            prev = self._reports.get(name)
            rates: dict[str, tuple[float, float]] = {}
            if prev is not None and now > prev[1]:
                dt_s = now - prev[1]
                for peer, row in report["peers"].items():
                    old = prev[0]["peers"].get(peer)
                    if old is not None:  # counters are totals; a restarted agent starts again: no negative rate
                        rates[peer] = (max(0, row["bytes_in"] - old["bytes_in"]) * 8 / dt_s,
                                       max(0, row["bytes_out"] - old["bytes_out"]) * 8 / dt_s)
            self._reports[name] = (report, now, rates)

    def forget(self, keep: set[str]) -> None:
        """Drop reports of nodes no longer in the inventory."""
        with self._lock:
            for name in [n for n in self._reports if n not in keep]:
                del self._reports[name]

    def snapshot(self) -> dict[str, tuple[dict, float, dict[str, tuple[float, float]]]]:
        with self._lock:
            return dict(self._reports)


def _site(inventory: Inventory, name: str, role: str) -> str:
    """The first inventory group naming the node (its site), else its role."""
    for group, members in inventory.groups:
        if name in members:
            return group
    return role


def build_mesh(inventory: Inventory, version: int, reports: dict, enrolled: dict[str, int], now: float, *,
               leader: bool = True, stale_after: float | None = None, max_pairs: int = MAX_PAIRS) -> dict:
    """The mesh document (docs/metrics.md "Seeing the mesh"). ``reports`` as
    :meth:`MeshStatus.snapshot`; ``enrolled``: node -> notAfter (Unix s) of its
    current certificate; ``now``: Unix seconds."""
    interval = report_interval(len(inventory.nodes))
    stale_after = 3 * interval if stale_after is None else stale_after
    fresh: dict[str, dict] = {}
    nodes = []
    for n in sorted(inventory.nodes, key=lambda n: n.name):
        rep = reports.get(n.name)
        age = now - rep[1] if rep is not None else None
        connected = age is not None and age <= stale_after
        if connected:
            fresh[n.name] = rep[0]
        r = rep[0] if rep is not None else {}
        nodes.append({
            "name": n.name, "role": n.role, "site": _site(inventory, n.name, n.role),
            "endpoints": list(n.endpoints), "subnets": list(n.subnets),
            "enrolled": n.name in enrolled, "cert_not_after": r.get("cert_not_after") or enrolled.get(n.name),
            "connected": connected, "last_report_at": int(rep[1]) if rep is not None else None,
            "report_age_s": round(age, 1) if age is not None else None,
            "view_version": r.get("view_version"), "view_source": r.get("view_source"),
            "tun_mtu": r.get("tun_mtu"), "underlay_mtu": r.get("underlay_mtu"), "uptime_s": r.get("uptime_s"),
            "drops": r.get("drops", {}),
            "peers_up": sum(1 for p in r.get("peers", {}).values() if p["state"] == "up") if connected else None,
        })
    pairs = []
    counts = dict.fromkeys(PAIR_STATES, 0)
    specs = sorted(inventory.nodes, key=lambda n: n.name)
    total = len(specs) * (len(specs) - 1) // 2
    truncated = total > max_pairs
    if not truncated:
        candidates = [(a, b) for i, a in enumerate(specs) for b in specs[i + 1:]]
    else:  # O(N^2) policies would be too slow: only pairs some fresh report shows as tried
        by_name = {n.name: n for n in specs}
        keys = {tuple(sorted((me, other))) for me, rep in fresh.items() for other, r in rep["peers"].items()
                if other in by_name and r["state"] != "idle"}
        candidates = [(by_name[a], by_name[b]) for a, b in sorted(keys)]
    for a, b in candidates:
        pol = pair_policy(inventory, a, b)
        ea = fresh.get(a.name, {}).get("peers", {}).get(b.name)
        eb = fresh.get(b.name, {}).get("peers", {}).get(a.name)
        state, reason = _pair_state(pol.action, a.name, b.name, ea, eb)
        counts[state] += 1
        rates = {}
        for me, other, end in ((a.name, b.name, ea), (b.name, a.name, eb)):
            rep = reports.get(me)
            if end is not None and rep is not None and other in rep[2]:
                rates[me] = rep[2][other]
        a_to_b = rates[a.name][1] if a.name in rates else (rates[b.name][0] if b.name in rates else None)
        b_to_a = rates[b.name][1] if b.name in rates else (rates[a.name][0] if a.name in rates else None)
        ends = {}
        for name, end in ((a.name, ea), (b.name, eb)):
            if end is not None:
                ends[name] = end
        pairs.append({
            "a": a.name, "b": b.name, "state": state, "reason": reason, "rule": pol.rule,
            "action": pol.action, "mode": pol.mode, "protocol": pol.protocol,
            "last_handshake": max([e["last_handshake"] for e in ends.values()] or [0]) or None,
            "bps_a_to_b": round(a_to_b, 1) if a_to_b is not None else None,
            "bps_b_to_a": round(b_to_a, 1) if b_to_a is not None else None,
            "ends": ends if len(candidates) <= MAX_ENDS_PAIRS else {},
        })
    return {
        "generated_at": int(now), "view_version": version, "leader": leader,
        "report_interval_s": interval, "stale_after_s": stale_after,
        "ends_omitted": len(candidates) > MAX_ENDS_PAIRS,
        "nodes": nodes, "pairs": pairs, "pairs_truncated": truncated,
        "summary": {"nodes": len(nodes), "enrolled": sum(1 for n in nodes if n["enrolled"]),
                    "connected": sum(1 for n in nodes if n["connected"]), "pairs": counts,
                    "pairs_total": total, "pairs_unlisted": total - len(pairs)},
    }


def _pair_state(action: str, a: str, b: str, ea: dict | None, eb: dict | None) -> tuple[str, str]:
    """(state, reason) of one pair from the fresh ends' rows (None: no fresh report)."""
    if action in ("bypass", "discard"):
        return action, f"policy: {action}"
    ends = [(n, e) for n, e in ((a, ea), (b, eb)) if e is not None]
    if not ends:
        return "unknown", f"no recent report from {a} or {b}"
    for n, e in ends:
        if e["state"] == "down":
            return "down", f"{n}: {e['last_error'] or 'no SA'}"
    states = {e["state"] for _, e in ends}
    if "up" in states:
        if "connecting" in states or "idle" in states:
            n = next(n for n, e in ends if e["state"] != "up")
            return "up", f"{n}: no CHILD_SA yet"
        return "up", ""
    if "connecting" in states:
        errs = [f"{n}: last error {e['last_error']}" for n, e in ends if e["last_error"]]
        return "connecting", errs[0] if errs else ""
    missing = [n for n, e in ((a, ea), (b, eb)) if e is None]
    return "never", (f"not tried yet; no recent report from {missing[0]}" if missing else "not tried yet")


def _cert_name(context: grpc.ServicerContext) -> str:
    """The node name (CN) in the client certificate, or "" without one."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return ""
    cert = x509.load_pem_x509_certificate(pems[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


class MeshService:
    """Everything above for one ControllerServer: the two RPC handlers
    (:meth:`rpc_handlers`), the mesh document, the web page
    (``web_listen``), the UNIX status socket (``status_socket``) and the
    metrics collector. ``server`` is the controller.server.ControllerServer,
    ``servicer`` its ControllerServicer (identity checks)."""

    def __init__(self, server, servicer, *, web_listen: str | None = None, web_client_auth: bool = True,
                 web_client_ca: str | None = None, status_socket: str | None = None,
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None) -> None:
        self.server = server
        self.servicer = servicer
        self.status = MeshStatus(clock)
        self.clock = clock
        self.limiter = RateLimiter()
        self.read_limiter = RateLimiter()
        self.log = logger or logging.getLogger("meshsec.controller.mesh")
        self.web_listen = web_listen
        self.web_client_auth = web_client_auth
        self.web_client_ca = web_client_ca
        self.web_port = 0
        self.status_socket = status_socket
        self.results = dict.fromkeys(REPORT_RESULTS, 0)
        self._doc: tuple[float, dict] | None = None
        self._enrolled_cache: tuple[Inventory, float, dict[str, int]] | None = None
        self._doc_lock = threading.Lock()
        self._web = None
        self._sock: _SocketServer | None = None
        registry = getattr(getattr(server, "metrics", None), "registry", None)
        if registry is not None and not getattr(registry, "meshsec_mesh_collector", False):
            registry.meshsec_mesh_collector = True  # once per registry (a server may start again)
            registry.register(_Collector(server))
            ProcessCollector(registry=registry)

    # -- RPCs ------------------------------------------------------------------------
    def rpc_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "ReportStatus": grpc.unary_unary_rpc_method_handler(
                self.ReportStatus, request_deserializer=pb.StatusReport.FromString,
                response_serializer=pb.StatusReportResponse.SerializeToString),
            "GetMesh": grpc.unary_unary_rpc_method_handler(
                self.GetMesh, request_deserializer=pb.GetMeshRequest.FromString,
                response_serializer=pb.MeshStatus.SerializeToString),
        }

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def ReportStatus(self, request: pb.StatusReport, context: grpc.ServicerContext) -> pb.StatusReportResponse:
        name = request.node_name
        if not name:
            self._count("bad_name")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_name is empty")
        self.servicer._check_identity(name, context, "ReportStatus")
        size = request.ByteSize()
        if size > MAX_REPORT_BYTES or len(request.peers) > MAX_REPORT_PEERS:
            self._count("too_large")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"status report of {size} bytes / {len(request.peers)} peers exceeds the limit of "
                          f"{MAX_REPORT_BYTES} bytes / {MAX_REPORT_PEERS} peers")
        if not self.limiter.allow(name):
            self._count("rate_limited")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {name!r} reports too often (at most {RATE_BURST} in a row, then "
                          f"{RATE_PER_S:g} per second); report every {REPORT_INTERVAL_S:g} s or more")
        inventory, _ = self.server.state.snapshot()
        known = {n.name for n in inventory.nodes}
        if name not in known:
            self._count("unknown_node")
            context.abort(grpc.StatusCode.NOT_FOUND, f"node {name!r} is not in the inventory")
        self.status.ingest(name, report_to_dict(request, known - {name}))
        self._count("ok")
        with self._doc_lock:
            self._doc = None
        return pb.StatusReportResponse(report_interval_s=report_interval(len(known)))

    def GetMesh(self, request: pb.GetMeshRequest, context: grpc.ServicerContext) -> pb.MeshStatus:
        name = _cert_name(context)
        if not name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "GetMesh needs mutual TLS with an enrolled node's certificate (use the watch port)")
        self.servicer._check_identity(name, context, "GetMesh")
        if not self.read_limiter.allow(name):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "GetMesh: at most 3 calls in a row, then one a second")
        return pb.MeshStatus(json=json.dumps(self.document(), sort_keys=True))

    # -- the document -----------------------------------------------------------------
    def _enrolled(self, inventory: Inventory, now: float, reporting: set[str]) -> dict[str, int]:
        """node -> notAfter of its current certificate; the store is asked at most every
        ENROLLED_CACHE_S seconds (one query per node: etcd in HA), or when the inventory
        changed or a node reports (it has a certificate) that the cache does not know."""
        cached = self._enrolled_cache
        if (cached is not None and cached[0] is inventory and now - cached[1] < ENROLLED_CACHE_S
                and reporting <= cached[2].keys()):
            return {k: v for k, v in cached[2].items() if v > now}
        out = self._enrolled_now(inventory, now)
        self._enrolled_cache = (inventory, now, out)
        return out

    def _enrolled_now(self, inventory: Inventory, now: float) -> dict[str, int]:
        store = self.server.store
        if store is None:
            return {}
        revoked = inventory.revoked_serials
        out = {}
        for n in inventory.nodes:
            try:
                live = [na for serial, na, _ in store.certificate_ders(n.name) if na > now and serial not in revoked]
            except Exception:  # a store hiccup must not break the page
                continue
            if live:
                out[n.name] = max(live)
        return out

    def document(self) -> dict:
        """The mesh document, rebuilt at most every DOCUMENT_CACHE_S seconds."""
        now = self.clock()
        with self._doc_lock:
            if self._doc is not None and now - self._doc[0] < DOCUMENT_CACHE_S:
                return self._doc[1]
        inventory, version = self.server.state.snapshot()
        self.status.forget({n.name for n in inventory.nodes})
        reports = self.status.snapshot()
        stale = 3 * report_interval(len(inventory.nodes))
        reporting = {n for n, r in reports.items() if now - r[1] <= stale}
        doc = build_mesh(inventory, version, reports, self._enrolled(inventory, now, reporting), now,
                         leader=bool(getattr(self.server, "is_leader", True)))
        with self._doc_lock:
            self._doc = (now, doc)
        return doc

    # -- web page and UNIX socket ------------------------------------------------------
    def start(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
        """Start the web page (``web_listen``) and the status socket; OSError if
        the web port cannot listen (a status socket that cannot be made is logged)."""
        if self.web_listen:
            from controller.web import MeshWebServer
            client_ca = ca_pem
            if self.web_client_ca:
                with open(self.web_client_ca, "rb") as f:
                    client_ca = ca_pem + b"\n" + f.read()
            self._web = MeshWebServer(self.web_listen, key_pem, cert_pem, self.document,
                                      client_ca_pem=client_ca if self.web_client_auth else None,
                                      revoked=lambda: self.server.state.snapshot()[0].revoked_serials,
                                      logger=self.log)
            self.web_port = self._web.start()
            if not self.web_client_auth:
                self.log.warning("mesh web page on %s WITHOUT client authentication (--web-client-auth none): "
                                 "anyone who reaches it sees the whole mesh", self.web_listen)
            self.log.info("mesh web page on https://%s/", self.web_listen)
        if self.status_socket:
            try:
                self._sock = _SocketServer(self.status_socket, self.document, self.log)
            except OSError as e:
                self.log.warning("no status socket at %s (%s); `meshsec mesh` on this host needs "
                                 "--controller and a node certificate instead", self.status_socket, e)

    def stop(self) -> None:
        if self._web is not None:
            self._web.stop()
            self._web = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(64 * 1024)
        try:
            req = json.loads(line)
            cmd = req.get("cmd") if isinstance(req, dict) else None
        except ValueError:
            cmd = None
        if cmd == "mesh":
            ans = self.server.document()  # type: ignore[attr-defined]
        else:
            ans = {"error": 'unknown request; send {"cmd": "mesh"}'}
        self.wfile.write(json.dumps(ans, sort_keys=True).encode() + b"\n")


class _SocketServer:
    """``{"cmd": "mesh"}`` -> the mesh document, one JSON line (the agent control
    socket's protocol), on a UNIX socket created mode 0600."""

    def __init__(self, path: str, document: Callable[[], dict], log: logging.Logger) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                probe.close()
                raise OSError(f"{path} is in use by another controller")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            srv = socketserver.ThreadingUnixStreamServer(path, _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        srv.daemon_threads = True
        srv.document = document  # type: ignore[attr-defined]
        self._srv = srv
        self._thread = threading.Thread(target=srv.serve_forever, name="status-socket", daemon=True)
        self._thread.start()
        log.info("status socket %s (meshsec mesh --socket)", path)

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Collector:
    """Controller metrics of the mesh (docs/metrics.md)."""

    def __init__(self, server) -> None:
        self.server = server

    def describe(self):
        return []

    def collect(self):
        mesh = getattr(self.server, "mesh", None)
        if mesh is None:
            return
        yield from self._collect(mesh)

    def _collect(self, mesh: MeshService):
        c = CounterMetricFamily("meshsec_controller_status_reports", "ReportStatus calls by result",
                                labels=["result"])
        for k, v in sorted(mesh.results.items()):
            c.add_metric([k], v)
        yield c
        if getattr(self.server, "state", None) is None:
            return
        doc = mesh.document()
        g = GaugeMetricFamily("meshsec_controller_mesh_nodes", "Inventory nodes by reporting state",
                              labels=["state"])
        nodes = doc["nodes"]
        g.add_metric(["connected"], sum(1 for n in nodes if n["connected"]))
        g.add_metric(["enrolled_silent"], sum(1 for n in nodes if n["enrolled"] and not n["connected"]))
        g.add_metric(["not_enrolled"], sum(1 for n in nodes if not n["enrolled"]))
        yield g
        g = GaugeMetricFamily("meshsec_controller_mesh_pairs", "Node pairs by state", labels=["state"])
        for st, n in doc["summary"]["pairs"].items():
            g.add_metric([st], n)
        yield g
        g = GaugeMetricFamily("meshsec_controller_node_connected", "1 while the node's status report is fresh",
                              labels=["node"])
        e = GaugeMetricFamily("meshsec_controller_node_certificate_expiry_timestamp_seconds",
                              "notAfter of the node's current certificate, Unix seconds", labels=["node"])
        for n in nodes:
            g.add_metric([n["name"]], 1 if n["connected"] else 0)
            if n["cert_not_after"]:
                e.add_metric([n["name"]], n["cert_not_after"])
        yield g
        yield e


def utc(ts: float | None) -> str:
    """Unix seconds -> ISO 8601 UTC ("-" for none)."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
