"""Prometheus metrics of the controller (``meshsec-controller --metrics-listen``).

Names (docs/metrics.md):
    meshsec_controller_watch_streams              gauge, open Watch streams on this replica
    meshsec_controller_enrolments_total{result}   counter: ok, unknown_node, bad_token, bad_csr,
                                                  not_leader, invalid
    meshsec_controller_fanout_latency_seconds     histogram: view change seen by this replica ->
                                                  update handed to gRPC, per stream
    meshsec_controller_leader                     gauge 1 if this replica is the leader (always 1
                                                  with SQLite)
    meshsec_controller_leader_transitions_total   counter of elections won and lost
    meshsec_controller_view_version               gauge, the view version this replica serves
    meshsec_controller_build_info{version,python} gauge, always 1
    meshsec_controller_enrol_port_dropped_total{reason}  counter: request_timeout, no_request
    meshsec_controller_log_lines_suppressed_total{kind}  counter of rate-limited log lines left out

Each :class:`ControllerMetrics` has its own registry (several controllers
in one process, e.g. tests, do not collide). Updating is thread-safe.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ENROL_RESULTS = ("ok", "renewed", "unknown_node", "bad_token", "token_used", "revoked_cert", "bad_csr", "not_leader",
                 "invalid")
# Fan-out is sub-millisecond for a handful of streams and ~seconds for thousands.
FANOUT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def split_hostport(text: str, flag: str = "--metrics-listen") -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ValueError naming the flag."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.watch_streams = Gauge("meshsec_controller_watch_streams", "Open Watch streams on this replica",
                                   registry=r)
        self.enrolments = Counter("meshsec_controller_enrolments", "Enroll calls by result", ["result"],
                                  registry=r)
        for res in ENROL_RESULTS:
            self.enrolments.labels(res)
        self.fanout = Histogram("meshsec_controller_fanout_latency_seconds",
                                "Time from a view change reaching this replica to the update handed to "
                                "each Watch stream", buckets=FANOUT_BUCKETS, registry=r)
        self.enrol_dropped = Counter("meshsec_controller_enrol_port_dropped",
                                     "Enrol-port calls ended before any work: request_timeout (no request "
                                     "message in time), no_request (ended without one)", ["reason"], registry=r)
        for reason in ("request_timeout", "no_request"):
            self.enrol_dropped.labels(reason)
        self.log_suppressed = Counter("meshsec_controller_log_lines_suppressed",
                                      "Log lines left out by rate limiting, by kind", ["kind"], registry=r)
        self.leader = Gauge("meshsec_controller_leader", "1 if this replica is the leader", registry=r)
        self.transitions = Counter("meshsec_controller_leader_transitions",
                                   "Leadership won or lost", registry=r)
        self.version = Gauge("meshsec_controller_view_version", "View version this replica serves", registry=r)
        from meshsec.version import build_info
        info = build_info()
        Gauge("meshsec_controller_build_info", "meshsec version and Python of this controller (always 1)",
              list(info), registry=r).labels(**info).set(1)
        self._server = None
        self._is_leader = False

    # -- hooks the service calls ------------------------------------------------
    def watch_started(self) -> None:
        self.watch_streams.inc()

    def watch_ended(self) -> None:
        self.watch_streams.dec()

    def enrolment(self, result: str) -> None:
        self.enrolments.labels(result if result in ENROL_RESULTS else "invalid").inc()

    def enrol_port_dropped(self, reason: str) -> None:
        self.enrol_dropped.labels(reason).inc()

    def log_line_suppressed(self, kind: str) -> None:
        self.log_suppressed.labels(kind).inc()

    def fanout_observed(self, seconds: float) -> None:
        self.fanout.observe(max(0.0, seconds))

    def set_leader(self, leader: bool) -> None:
        if self._is_leader != leader:
            self._is_leader = leader
            self.transitions.inc()
        self.leader.set(1 if leader else 0)

    def set_version(self, version: int) -> None:
        self.version.set(version)

    # -- HTTP ---------------------------------------------------------------------
    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` on ``HOST:PORT`` (plain HTTP) from a daemon
        thread; returns the bound port. OSError if it cannot listen."""
        host, port = split_hostport(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def add_health_and_reflection(server, listen: str | None = None, log=None):
    """grpc.health.v1 (SERVING for "" and meshsec.v1.Controller) and server
    reflection on ``server``. With ``server=None`` build a separate plain-text
    server on ``listen`` holding only these two services (for probes, e.g.
    Kubernetes gRPC probes, which speak no TLS; Enroll/Watch are never served
    without TLS) and return (server, bound port); OSError if it cannot listen.
    Malformed requests: INVALID_ARGUMENT, logged through ``log``
    (a controller.watchlimit.RateLimitedLog; controller.badinput)."""
    from concurrent import futures
    import logging

    import grpc
    from grpc_health.v1 import health_pb2

    from controller.badinput import add_guarded, health_and_reflection
    from controller.watchlimit import RateLimitedLog
    from meshsec.v1 import controller_pb2 as pb

    own = server is None
    if own:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshsec-health"))
    controller_name = pb.DESCRIPTOR.services_by_name["Controller"].full_name
    servicer, services = health_and_reflection(False, [] if own else [controller_name])
    for name in ("", controller_name):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log = log or RateLimitedLog(logging.getLogger("meshsec.controller"), kind="malformed")
    for service, handlers in services.items():
        add_guarded(server, service, handlers, log)
    if not own:
        return servicer
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from None
    if not port:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port
