"""Prometheus metrics of the agent (``meshsec-agent --metrics-listen HOST:PORT``).

Threading: the runtime's dicts belong to its loop thread. A scrape asks the
loop for a snapshot through ``Runtime.call_soon`` (the wakeup pipe) and
waits up to ``timeout`` seconds; if the loop does not answer in time (busy
or stuck) the previous snapshot is served and
``meshsec_agent_snapshot_timeouts_total`` counts it. IKE events reach
:meth:`AgentMetrics.observe` on the loop thread (``Runtime.event_observers``).

Names (docs/metrics.md):
    meshsec_agent_ike_sas{state}                    gauge: CONNECTING, AUTHENTICATING, ESTABLISHED, ...
    meshsec_agent_child_sas{state}                  gauge: active (sends), rekeyed (receives until deleted)
    meshsec_agent_esp_bytes_total{direction}        counter, in/out, inner bytes through CHILD_SAs
    meshsec_agent_esp_packets_total{direction}      counter, in/out
    meshsec_agent_drops_total{layer,reason}         counter; layer runtime | esp | ike
    meshsec_agent_handshake_seconds{role}           histogram: IKE_SA_INIT start -> IKE_AUTH done
    meshsec_agent_rekeys_total{kind}                counter: child, ike
    meshsec_agent_view_version                      gauge
    meshsec_agent_snapshot_timeouts_total           counter
    meshsec_agent_build_info{version,python}        gauge, always 1
    meshsec_agent_peer_up{peer}                     gauge 1 while a CHILD_SA with the peer is installed
    meshsec_agent_peer_state{peer,state}            gauge 1 for the peer's state (up, connecting, down,
                                                    idle, bypass, discard), 0 for the others
    meshsec_agent_peer_last_handshake_age_seconds{peer}  gauge, since the last IKE_SA / CHILD_SA
                                                    established with the peer (absent: never)
    meshsec_agent_peer_bytes_total{peer,direction}  counter, inner bytes in/out with the peer
    meshsec_agent_peer_packets_total{peer,direction} counter
    meshsec_agent_peer_drops_total{peer,reason}     counter, drops on the peer's CHILD_SAs
    meshsec_agent_peer_mtu_bytes{peer}              gauge, largest inner packet to the peer
    meshsec_agent_certificate_expiry_timestamp_seconds  gauge, node certificate notAfter (Unix)
    process_cpu_seconds_total, process_resident_memory_bytes, ...  the standard process collector

The ``peer`` metrics need a PeerTracker (agent.peerstate; ``AgentMetrics(rt, tracker=...)``).

CHILD_SA byte and packet counters live in each SA; when an SA goes away
(deleted, rekeyed, its peer removed) its last counts are kept, so the
totals never go down. Counts an SA gathered after the last snapshot or
event before its removal are not included.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TRAFFIC = ("packets_in", "bytes_in", "packets_out", "bytes_out")


def _sa_counts(ch) -> dict[str, int]:
    """Counters of one runtime ChildEntry (both directions), numbers only."""
    out: dict[str, int] = {}
    for sa in (ch.in_sa, ch.out_sa):
        for k, v in (getattr(sa, "counters", None) or {}).items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


class AgentMetrics:
    """Metrics of one Runtime; ``serve(listen)`` exposes them over HTTP."""

    def __init__(self, runtime, *, timeout: float = 1.0, logger: logging.Logger | None = None,
                 tracker=None) -> None:
        self.rt = runtime
        self.tracker = tracker  # agent.peerstate.PeerTracker: per-peer metrics
        self.timeout = timeout
        self.log = logger or logging.getLogger("meshsec.metrics")
        self.registry = CollectorRegistry()
        self.handshake = Histogram("meshsec_agent_handshake_seconds",
                                   "IKE_SA setup time, IKE_SA_INIT start to IKE_AUTH done (RFC 7296 §1.2)",
                                   ["role"], buckets=HANDSHAKE_BUCKETS, registry=self.registry)
        self.rekeys = Counter("meshsec_agent_rekeys", "Rekeys (RFC 7296 §1.3.2, §1.3.3)", ["kind"],
                              registry=self.registry)
        for kind in ("child", "ike"):
            self.rekeys.labels(kind)
        self.timeouts = Counter("meshsec_agent_snapshot_timeouts",
                                "Scrapes served from an old snapshot because the loop did not answer",
                                registry=self.registry)
        from meshsec.version import build_info
        info = build_info()
        Gauge("meshsec_agent_build_info", "meshsec version and Python of this agent (always 1)", list(info),
              registry=self.registry).labels(**info).set(1)
        # loop-thread state: last counts per inbound SPI, and counts of SAs gone
        self._live: dict[int, dict[str, int]] = {}
        self._retired: dict[str, int] = {}
        self._snapshot: dict[str, Any] = {}
        self._snap_lock = threading.Lock()
        self._server = None
        runtime.event_observers.append(self.observe)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes

    # -- loop thread -------------------------------------------------------------
    def observe(self, ev, now: float) -> None:
        """Runtime.event_observers hook (loop thread, before the runtime acts)."""
        name = type(ev).__name__
        rt = self.rt
        if name == "ChildSaEstablished" and getattr(ev, "rekey_of", None) is not None:
            self.rekeys.labels("child").inc()
        elif name == "ChildSaDeleted":
            ch = rt.children.get(ev.inbound_spi)
            if ch is not None:
                self._live[ch.inbound_spi] = _sa_counts(ch)  # final counts, kept when it disappears
        elif name == "IkeSaDeleted":
            if getattr(ev, "rekeyed_to", None) is not None:  # replaced by a rekey (RFC 7296 §1.3.2)
                self.rekeys.labels("ike").inc()
            for ch in rt.children.values():
                if (ch.ike_spi_i, ch.ike_spi_r) == (ev.spi_i, ev.spi_r):
                    self._live[ch.inbound_spi] = _sa_counts(ch)
        elif name == "IkeSaEstablished":
            created = self._created_at(ev)
            if created is not None:
                self.handshake.labels("initiator" if ev.initiator else "responder").observe(max(0.0, now - created))

    def _created_at(self, ev) -> float | None:
        """``created`` of the IKE_SA from IkeManager.status() (the runtime's clock), or None."""
        spi_i, spi_r = f"{ev.spi_i:016x}", f"{ev.spi_r:016x}"
        try:
            rows = self.rt.ike.status()
        except Exception:  # status must not break event handling
            return None
        for row in rows:
            if row.get("spi_i") == spi_i and row.get("spi_r") == spi_r:
                created = row.get("created")
                return created if isinstance(created, (int, float)) and not isinstance(created, bool) else None
        return None

    def take_snapshot(self) -> dict[str, Any]:
        """Numbers only, copied from the runtime (run on the loop thread)."""
        rt = self.rt
        current = {id(ch) for sending in rt.sad.sending.values() for ch in sending}  # every sending SA
        child_states = {"active": 0, "rekeyed": 0}
        present: dict[int, dict[str, int]] = {}
        for spi, ch in rt.children.items():
            child_states["active" if id(ch) in current else "rekeyed"] += 1
            present[spi] = _sa_counts(ch)
        for spi, counts in self._live.items():
            if spi not in present:
                for k, v in counts.items():
                    self._retired[k] = self._retired.get(k, 0) + v
        self._live = present
        esp: dict[str, int] = dict(self._retired)
        for counts in present.values():
            for k, v in counts.items():
                esp[k] = esp.get(k, 0) + v
        ike_states: dict[str, int] = {}
        try:
            for s in rt.ike.status():
                st = str(s.get("state", "unknown"))
                ike_states[st] = ike_states.get(st, 0) + 1
        except Exception as e:  # status must not break a scrape
            self.log.warning("IKE status for metrics failed: %s", e)
        from agent.datapath.runtime import DROP_REASONS
        return {
            "ike_sas": ike_states,
            "child_sas": child_states,
            "traffic": {k: esp.get(k, 0) for k in _TRAFFIC},
            "drops": {
                "runtime": {k: rt.counters.get(k, 0) for k in DROP_REASONS},
                "esp": {k: v for k, v in esp.items() if k not in _TRAFFIC},
                "ike": {k: v for k, v in (getattr(rt.ike, "counters", None) or {}).items() if isinstance(v, int)},
            },
            "view_version": getattr(rt.view, "version", 0) or 0,
            **self._peer_snapshot(),
        }

    def _peer_snapshot(self) -> dict[str, Any]:
        if self.tracker is None:
            return {}
        try:
            return {"peers": self.tracker.peers(), "cert_not_after": self.tracker.cert_not_after()}
        except Exception as e:  # per-peer state must not break a scrape
            self.log.warning("peer status for metrics failed: %s", e)
            return {}

    # -- any thread ----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A fresh snapshot from the loop, or the last one after ``timeout``."""
        done = threading.Event()
        box: list = []

        def on_loop() -> None:
            box.append(self.take_snapshot())
            done.set()

        self.rt.call_soon(on_loop)
        if done.wait(self.timeout) and box:
            with self._snap_lock:
                self._snapshot = box[0]
        else:
            self.timeouts.inc()
        with self._snap_lock:
            return self._snapshot

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns
        the bound port. ValueError for a bad address, OSError if it cannot listen."""
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"--metrics-listen {listen!r} is not HOST:PORT")
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self._server = server
        return server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Collector:
    """Turns one snapshot per scrape into metric families."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []  # collected lazily: registering must not scrape the loop

    def collect(self):
        snap = self.m.snapshot()
        if not snap:
            return
        g = GaugeMetricFamily("meshsec_agent_ike_sas", "IKE_SAs by state", labels=["state"])
        for st, n in sorted(snap["ike_sas"].items()):
            g.add_metric([st], n)
        yield g
        g = GaugeMetricFamily("meshsec_agent_child_sas", "CHILD_SAs by state (active sends; rekeyed receives "
                              "until deleted)", labels=["state"])
        for st, n in sorted(snap["child_sas"].items()):
            g.add_metric([st], n)
        yield g
        t = snap["traffic"]
        c = CounterMetricFamily("meshsec_agent_esp_bytes", "Inner bytes through CHILD_SAs", labels=["direction"])
        c.add_metric(["in"], t["bytes_in"])
        c.add_metric(["out"], t["bytes_out"])
        yield c
        c = CounterMetricFamily("meshsec_agent_esp_packets", "Packets through CHILD_SAs", labels=["direction"])
        c.add_metric(["in"], t["packets_in"])
        c.add_metric(["out"], t["packets_out"])
        yield c
        c = CounterMetricFamily("meshsec_agent_drops", "Dropped packets by layer and reason", labels=["layer", "reason"])
        for layer, reasons in snap["drops"].items():
            for reason, n in sorted(reasons.items()):
                c.add_metric([layer, reason], n)
        yield c
        g = GaugeMetricFamily("meshsec_agent_view_version", "Controller view version applied")
        g.add_metric([], snap["view_version"])
        yield g
        yield from _peer_families(snap)


def _peer_families(snap: dict[str, Any]):
    """Per-peer families (``peer`` label) and the certificate expiry, if tracked."""
    if "peers" not in snap:
        return
    from agent.peerstate import STATES
    now = time.time()
    rows = snap["peers"]
    up = GaugeMetricFamily("meshsec_agent_peer_up", "1 while a CHILD_SA with the peer is installed", labels=["peer"])
    state = GaugeMetricFamily("meshsec_agent_peer_state", "1 for the peer's current state", labels=["peer", "state"])
    age = GaugeMetricFamily("meshsec_agent_peer_last_handshake_age_seconds",
                            "Seconds since the last IKE_SA or CHILD_SA was established with the peer",
                            labels=["peer"])
    nbytes = CounterMetricFamily("meshsec_agent_peer_bytes", "Inner bytes with the peer", labels=["peer", "direction"])
    npkts = CounterMetricFamily("meshsec_agent_peer_packets", "Inner packets with the peer",
                                labels=["peer", "direction"])
    mtu = GaugeMetricFamily("meshsec_agent_peer_mtu_bytes", "Largest inner packet to the peer (TUN MTU or the "
                            "SA bundle's limit)", labels=["peer"])
    drops = CounterMetricFamily("meshsec_agent_peer_drops", "Dropped packets on the peer's CHILD_SAs by reason",
                                labels=["peer", "reason"])
    for r in rows:
        peer = r["name"]
        up.add_metric([peer], 1 if r["state"] == "up" else 0)
        for st in STATES:
            state.add_metric([peer, st], 1 if r["state"] == st else 0)
        if r["last_handshake"]:
            age.add_metric([peer], max(0.0, now - r["last_handshake"]))
        for d in ("in", "out"):
            nbytes.add_metric([peer, d], r[f"bytes_{d}"])
            npkts.add_metric([peer, d], r[f"packets_{d}"])
        for reason, n in sorted(r["drops"].items()):
            drops.add_metric([peer, reason], n)
        if r.get("mtu"):
            mtu.add_metric([peer], r["mtu"])
    yield from (up, state, age, nbytes, npkts, mtu, drops)
    if snap.get("cert_not_after"):
        g = GaugeMetricFamily("meshsec_agent_certificate_expiry_timestamp_seconds",
                              "notAfter of this node's certificate, Unix seconds")
        g.add_metric([], snap["cert_not_after"])
        yield g
