"""Per-peer state of one agent: what `meshsec status`, the metrics endpoint and
the controller's mesh view show for each peer.

:class:`PeerTracker` hooks ``Runtime.event_observers`` (loop thread) to remember,
per peer, when the last IKE_SA or CHILD_SA was established (the last handshake),
the last failure and its reason (an IKE_SA ended by a kind not in BENIGN_KINDS, i.e.
not a rekey, shutdown, policy change, replacement or moot duplicate; a CHILD_SA deleted
other than by a rekey or a shutdown; a policy the IKE side refused), and the byte / packet
counts of CHILD_SAs already gone (so per-peer totals never go down).
:meth:`PeerTracker.peers` joins that with ``Runtime.status()`` and the view into
one row per peer of the view.

Row (all JSON-ready): ``name``, ``state`` (up | connecting | down | idle | bypass |
discard), ``ike_state`` ("" if no IKE_SA), ``child_sas``, ``last_handshake`` (Unix
seconds, 0 never), ``last_error`` / ``last_error_at`` ("" / 0 none), ``endpoint``
("IP:PORT"), ``bytes_in/out`` and ``packets_in/out`` (totals since the agent
started, inner packets), ``drops`` (reason -> count, CHILD_SAs of this peer),
``sa`` (protocol/mode/encapsulation of the newest CHILD_SA), ``rule`` (policy rule),
``mtu`` (largest inner packet to the peer: the TUN MTU, or less where the current
SA bundle's overhead needs it; 0 unknown).

Threading: every method except :meth:`cert_not_after` runs on the loop thread.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from cryptography import x509

from agent.ike.errors import DeleteReason

# IKE_SA endings that are no failure, by IkeSaDeleted.kind: our own delete or shutdown, a policy
# change (set up again), a rekey (RFC 7296 §1.3.2), a replacement (redundant rekey §2.8.1,
# INITIAL_CONTACT), a duplicate or moot IKE_SA deleted because another one with the peer is up.
BENIGN_KINDS = frozenset({DeleteReason.LOCAL, DeleteReason.RECONFIGURED, DeleteReason.REKEYED,
                          DeleteReason.SUPERSEDED, DeleteReason.DUPLICATE})
# CHILD_SA deletions carry only a text: rekeys (§1.3.3), our own shutdown or view change, a restart.
BENIGN_REASONS = ("rekeyed", "shutdown", "deleted locally", "peer removed from view", "peer sent INITIAL_CONTACT")
MAX_REASON = 200  # characters of a reason kept (reports to the controller are bounded)
_TRAFFIC = ("packets_in", "bytes_in", "packets_out", "bytes_out")
STATES = ("up", "connecting", "down", "idle", "bypass", "discard")


def _benign(reason: str) -> bool:
    return reason in BENIGN_REASONS or reason.startswith("redundant")


def _counts(ch) -> dict[str, int]:
    """Numeric counters of a runtime ChildEntry, both directions summed."""
    out: dict[str, int] = {}
    for sa in (getattr(ch, "in_sa", None), getattr(ch, "out_sa", None)):
        for k, v in (getattr(sa, "counters", None) or {}).items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


class PeerTracker:
    """Per-peer history of one Runtime (see the module docstring).

    ``wall()`` returns Unix seconds (injected for tests)."""

    def __init__(self, runtime, *, wall: Callable[[], float] = time.time,
                 logger: logging.Logger | None = None) -> None:
        self.rt = runtime
        self.wall = wall
        self.log = logger or logging.getLogger("meshsec.peers")
        self.last_handshake: dict[str, float] = {}
        self.last_error: dict[str, tuple[str, float]] = {}
        self._retired: dict[str, dict[str, int]] = {}  # peer -> counts of CHILD_SAs gone
        self._cert: tuple[bytes, int] | None = None
        self.changes = 0  # bumped on every state-changing event: the report sender reports on change
        runtime.event_observers.append(self.observe)

    # -- loop thread --------------------------------------------------------------
    def observe(self, ev, now: float) -> None:
        """Runtime.event_observers hook (loop thread, before the runtime acts on ``ev``)."""
        name = type(ev).__name__
        peer = getattr(ev, "peer", "") or ""
        if name in ("IkeSaEstablished", "ChildSaEstablished"):
            if peer:
                self.last_handshake[peer] = self.wall()
                self.changes += 1
        elif name == "ChildSaDeleted":
            ch = self.rt.children.get(ev.inbound_spi)
            if ch is not None and peer:
                gone = self._retired.setdefault(peer, {})
                for k, v in _counts(ch).items():
                    gone[k] = gone.get(k, 0) + v
            if peer and not _benign(ev.reason):
                self._error(peer, f"CHILD_SA deleted: {ev.reason}")
            self.changes += 1
        elif name == "IkeSaDeleted":
            if peer and ev.rekeyed_to is None and getattr(ev, "kind", None) not in BENIGN_KINDS:
                self._error(peer, f"IKE_SA failed: {ev.reason}" if ev.reason != "deleted by peer"
                            else "IKE_SA deleted by the peer")
            self.changes += 1
        elif name == "PeerRefused":
            if peer:
                self._error(peer, f"refused: {ev.reason}")
            self.changes += 1

    def _error(self, peer: str, reason: str) -> None:
        self.last_error[peer] = (reason[:MAX_REASON], self.wall())

    def peers(self, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One row per peer of the runtime's view (sorted by name); ``status`` is
        ``Runtime.status()`` (taken now if None). Loop thread."""
        st = status if status is not None else self.rt.status()
        view = getattr(self.rt, "view", None)
        ike_by_peer: dict[str, list[dict]] = {}
        for s in st.get("ike_sas") or []:
            if s.get("peer"):
                ike_by_peer.setdefault(s["peer"], []).append(s)
        child_by_peer: dict[str, list[dict]] = {}
        for c in st.get("child_sas") or []:
            child_by_peer.setdefault(c.get("peer", ""), []).append(c)
        live = {spi: _counts(ch) for spi, ch in (getattr(self.rt, "children", None) or {}).items()}
        live_by_peer: dict[str, dict[str, int]] = {}
        for spi, ch in (getattr(self.rt, "children", None) or {}).items():
            acc = live_by_peer.setdefault(ch.peer, {})
            for k, v in live[spi].items():
                acc[k] = acc.get(k, 0) + v
        refused = st.get("policy_errors") or {}
        rows = []
        for p in sorted(getattr(view, "peers", ()) or (), key=lambda p: p.name):
            ikes = ike_by_peer.get(p.name, [])
            children = child_by_peer.get(p.name, [])
            # the established IKE_SA if any, else the newest one being set up
            ike = max(ikes, key=lambda s: (s.get("state") == "ESTABLISHED", s.get("created") or 0), default=None)
            err, err_at = self.last_error.get(p.name, ("", 0.0))
            if p.name in refused and not err:
                err, err_at = f"refused: {refused[p.name]}"[:MAX_REASON], self.wall()
            action = getattr(p.policy, "action", "protect") or "protect"
            if action in ("bypass", "discard"):
                state = action
            elif p.name in refused:
                state = "down"
            elif children:
                state = "up"
            elif ike is not None:
                state = "connecting"
            elif err or p.name in self.last_handshake:
                state = "down"
            else:
                state = "idle"
            counts = dict(self._retired.get(p.name, {}))
            for k, v in live_by_peer.get(p.name, {}).items():
                counts[k] = counts.get(k, 0) + v
            # SA counters (cumulative, retired SAs included), then the runtime's own per-CHILD_SA drops
            drops = {k: v for k, v in counts.items() if k not in _TRAFFIC and v}
            for c in children:
                for k, v in (c.get("drops") or {}).items():
                    if isinstance(v, int) and v and k not in counts:
                        drops[k] = drops.get(k, 0) + v
            newest = max(children, key=lambda c: c.get("established") or 0, default=None)
            endpoint = (ike or {}).get("remote") or (newest or {}).get("remote") or (
                f"{p.endpoints[0]}:{p.ike_port}" if p.endpoints else "")
            sa = ""
            if newest is not None and newest.get("ah"):  # ah+esp: the ESP rides inside the AH SA
                sa = f"esp/{newest.get('mode', '?')} in ah"
            elif newest is not None:
                sa = f"{newest.get('protocol', 'esp')}/{newest.get('mode', '?')}/{newest.get('encapsulation', '?')}"
            mtu = st.get("tun_mtu") or 0
            cur = (getattr(self.rt, "current", None) or {}).get(p.name)
            inner = getattr(cur, "max_inner", 65535) if cur is not None else 65535
            if isinstance(inner, int) and 0 < inner < 65535:  # known underlay MTU: the bundle's limit
                mtu = min(mtu, inner) if mtu else inner
            rows.append({
                "name": p.name, "state": state, "ike_state": (ike or {}).get("state", "") or "",
                "child_sas": len(children), "last_handshake": int(self.last_handshake.get(p.name, 0)),
                "last_error": err, "last_error_at": int(err_at), "endpoint": endpoint,
                **{k: counts.get(k, 0) for k in _TRAFFIC}, "drops": drops, "sa": sa,
                "rule": getattr(p.policy, "rule", "") or "", "mtu": int(mtu),
            })
        return rows

    def cert_not_after(self) -> int:
        """Unix seconds when this node's certificate expires (0: none / unreadable)."""
        creds = getattr(getattr(self.rt, "ike", None), "credentials", None)
        chain = getattr(creds, "certificate_chain", None) or ()
        if not chain:
            return 0
        if self._cert is None or self._cert[0] != chain[0]:
            try:
                na = int(x509.load_der_x509_certificate(chain[0]).not_valid_after_utc.timestamp())
            except ValueError:
                na = 0
            self._cert = (chain[0], na)
        return self._cert[1]


def install_status(control, runtime, tracker: PeerTracker, reporter=None) -> None:
    """Extend the control socket's ``status`` answer (``meshsec status``) with
    ``peers`` (:meth:`PeerTracker.peers` rows), ``cert_not_after`` and
    ``controller`` (``StatusReporter.controller_state()``; None standalone).
    Call after the Runtime registered its own handler. Loop thread at run time."""
    if control is None:
        return
    base = control.handlers.get("status") or (lambda _req: runtime.status())

    def status(req: dict) -> dict:
        st = base(req)
        try:
            st["peers"] = tracker.peers(st)
            st["cert_not_after"] = tracker.cert_not_after()
        except Exception as exc:  # the rest of the status is still worth showing
            tracker.log.exception("per-peer status failed")
            st["peers_error"] = str(exc)
        st["controller"] = reporter.controller_state() if reporter is not None else None
        return st

    control.handlers["status"] = status
