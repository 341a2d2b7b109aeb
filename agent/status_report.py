"""Status reports to the controller: this node's runtime and peer state as a
``meshsec.v1.StatusReport``, sent by :class:`StatusReporter` over the watch port."""
from __future__ import annotations

import logging
import threading
import time

import grpc

from agent.control import _CHANNEL_OPTIONS, ControllerClient
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc

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
