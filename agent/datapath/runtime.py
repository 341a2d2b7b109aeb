"""The agent's packet loop: one selector over TUN, UDP 500, UDP 4500, raw ESP/AH,
the control socket and a wakeup pipe; drives the IKE side (``IkeCore``) and
hands packets to the two sides of the datapath.

The rooms (docs/design.md "Packet path"): inside.py (TUN -> SPD -> encapsulate),
outside.py (sockets -> SAD -> decapsulate -> policy check -> TUN), policy.py
(view -> SPD, bundles, MTU, routes), agent.esp.Sad (the one SA table),
sa_events.py (IKE events -> SAD), requests.py (batch requests -> IKE),
keepalive.py, status.py. Here: the loop (selector, timers, guard, wakeups);
after each batch it sends what the batch produced and hands its requests to IKE.

Every stage is batch-shaped (lists of packets per CHILD_SA, one ``send_batch`` per
socket per batch). No asyncio in the packet path. Drops are counted
(``Runtime.counters``), never logged per packet. Neither side calls IKE in the
middle of a batch: they return requests (acquire, rekey, expire, unknown SPI,
IKE datagrams) that ``_finish`` hands over afterwards.

Threading: only ``submit_view``, ``submit_credentials``, ``submit_stored_view``,
``call_soon`` and ``stop`` may be called from other threads (or a signal
handler); everything else runs on the loop thread.

Robustness: every selector callback and timer runs under a guard. An
unexpected exception is logged once per (callback, exception type, message),
counted in ``counters["internal_errors"]`` and the loop keeps serving. A TUN
device that disappears (``ip link del``) is fatal: ``fatal`` says why and the
loop shuts down cleanly (IKE deletes sent, TUN routes removed; the fail-closed guard stays).
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
import time

from agent.datapath import packets as pk
from agent.datapath import sa_events
from agent.datapath import status as _status
from agent.datapath.batch import Batch
from agent.datapath.hold import HoldQueue
from agent.datapath.ike_core import IkeCore
from agent.datapath.inside import Inside
from agent.datapath.keepalive import DEFAULT_NAT_KEEPALIVE_S, NAT_KEEPALIVE, NatKeepalive
from agent.datapath.outside import Outside
from agent.datapath.policy import Policy, selector_entries
from agent.datapath.requests import IkeRequests
from agent.datapath.status import BEFORE_FIRST_VIEW, DROP_REASONS
from agent.datapath.tun import TunGone
from agent.esp import Sad
from agent.esp.sad import ChildEntry
from agent.model import NodeView

__all__ = ["Runtime", "ChildEntry", "selector_entries", "DROP_REASONS", "BEFORE_FIRST_VIEW",
           "NAT_KEEPALIVE", "DEFAULT_NAT_KEEPALIVE_S"]
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
_MAX_LOGGED_ERRORS = 256  # distinct internal errors logged with a traceback (then only counted)


def _named(name: str, fn):
    """A selector callback ``f(mask)`` calling ``fn()``, named for the error log."""
    def cb(_mask):
        return fn()
    cb.__name__ = name
    return cb


class Runtime:
    """The agent's event loop.

    ``view``: the initial NodeView. ``ike``: an ``IkeCore`` (agent.ike.manager.IkeManager).
    ``tun``: TunDevice; ``udp500`` / ``udp4500``: UdpSocket (tests: tests/datapath/fake_devices.py)
    bound on ``local_address``. ``esp_factory(keys, *, rng, replay_window,
    mode)`` builds one EspSa direction (default ``agent.esp.EspSa``).
    ``clock`` returns monotonic seconds, ``rng(n)`` random bytes.
    ``routes``: a RouteManager or None; ``keylog``: a KeyLog or None;
    ``control``: a ControlServer or None (the runtime registers its handlers).
    ``raw_esp``: a RawSocket for IP protocol 50 (policies with ``encapsulation: none``) or None.
    ``underlay_mtu``: bytes, the MTU of the underlay interface (None: unknown, no MTU logic);
    ``tun_mtu``: the TUN device's MTU now; ``auto_mtu``: lower/raise it (via ``routes.set_mtu``)
    to ``underlay_mtu`` minus the largest bundle overhead whenever SAs change.
    ``mss_clamp``: clamp TCP MSS on SYN / SYN-ACK to fit the path (both directions).
    ``nat_keepalive``: seconds (0: off). While an IKE_SA says we are behind a NAT (NAT-D,
    RFC 7296 §2.23) a one-octet 0xFF NAT-keepalive (RFC 3948 §2.3) goes to the peer's UDP 4500
    whenever nothing else was sent to it for that long (counter ``keepalives_out``).
    ``bypass``: control-plane prefixes (``--bypass``, the controller): SPD BYPASS entries ahead
    of every PROTECT entry (agent.esp.bypass_entries); the ip rules that keep their traffic out
    of the TUN are the RouteManager's.
    """

    def __init__(self, view: NodeView, ike: IkeCore, *, tun, udp500, udp4500, local_address: str,
                 esp_factory=None, clock=time.monotonic, rng=os.urandom, routes=None, keylog=None,
                 control=None, logger: logging.Logger | None = None, batch: int = 64,
                 wall_clock=time.time, awaiting_view: bool = False, raw_esp=None,
                 underlay_mtu: int | None = None, tun_mtu: int | None = None, auto_mtu: bool = False,
                 mss_clamp: bool = False, raw_ah=None, nat_keepalive: float = DEFAULT_NAT_KEEPALIVE_S,
                 bypass=()) -> None:
        if esp_factory is None:
            from agent.esp import EspSa as esp_factory
        self.view = view
        self.ike = ike
        self.tun = tun
        self.udp500 = udp500
        self.udp4500 = udp4500
        self.local_address = local_address
        self.esp_factory = esp_factory
        self.clock = clock
        self.wall_clock = wall_clock  # Unix time, for certificate validity only
        # controller mode: until the first view arrives we know no peer, so IKE
        # requests are dropped (the peer retransmits) rather than refused
        self.awaiting_view = awaiting_view
        self.rng = rng
        self.routes = routes
        self.keylog = keylog
        self.control = control
        self.log = logger or logging.getLogger("meshsec.runtime")
        self.batch = batch
        self.raw_esp = raw_esp
        self.raw_ah = raw_ah  # raw IP protocol 51 with IP_HDRINCL; opened next to raw_esp when needed
        self.counters: dict[str, int] = dict.fromkeys(DROP_REASONS + (
            BEFORE_FIRST_VIEW, "internal_errors", "unknown_spi_hints", "credentials_updates", "keepalives",
            "keepalives_out", "ike_in", "ike_out", "esp_in", "esp_out", "tun_in", "tun_out", "nested_out", "nested_in",
            "icmp_too_big", "mss_clamped", "ah_in", "ah_out", "lifetime_rekeys", "lifetime_deletes"), 0)
        self.sad = Sad()  # the CHILD_SAs: inbound by SPI, the sending one per peer
        self.policy = Policy(self.sad, local_address=local_address, bypass=bypass, underlay_mtu=underlay_mtu,
                             tun_mtu=tun_mtu if tun_mtu is not None else getattr(tun, "mtu", 1400),
                             auto_mtu=auto_mtu, routes=routes, log=self.log)
        self.inside = Inside(self.sad, self.policy, self.counters, local_address=local_address, rng=rng,
                             mss_clamp=mss_clamp, log=self.log)
        self.inside.raw_esp, self.inside.raw_ah = raw_esp is not None, raw_ah is not None
        self.outside = Outside(self.sad, self.policy, self.counters, local_address=local_address,
                               mss_clamp=mss_clamp)
        self.keepalive = NatKeepalive(nat_keepalive)
        self.hold = HoldQueue(self.counters)  # packets waiting for their CHILD_SA
        self.requests = IkeRequests(ike, self.sad, self.counters, view=lambda: self.view,
                                    remove_child=lambda ch: sa_events.remove_child(self, ch),
                                    internal_error=self.internal_error, log=self.log, hold=self.hold)
        self._pending_view: NodeView | None = None
        self._calls: list = []  # call_soon() callables, run on the loop thread
        # observers(event, now), called on the loop thread before the runtime handles each IKE event
        self.event_observers: list = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self.fatal: str | None = None  # why the loop stopped on its own (dead TUN device)
        self._logged_errors: set[tuple] = set()
        self.view_source = "config" if not awaiting_view else "none"  # "controller", "stored", "config"
        self._sel: selectors.BaseSelector | None = None
        self.started_wall = time.time()
        if control is not None:
            control.handlers.setdefault("status", lambda _req: self.status())
            control.handlers.setdefault("rekey", self.rekey_command)
        self.policy.apply_view(view)

    # -- the SA table and SPD, as status, metrics and tests read them ----------
    @property
    def children(self) -> dict[int, ChildEntry]:
        """Installed CHILD_SAs by inbound SPI (read-only use)."""
        return self.sad.children

    @property
    def current(self) -> dict[str, ChildEntry]:
        """Peer -> the CHILD_SA that sends to it (read-only use)."""
        return self.sad.current

    @property
    def spd(self):
        return self.policy.spd

    @property
    def spd_hits(self) -> dict:
        return self.policy.hits

    @property
    def tun_mtu(self) -> int:
        return self.policy.tun_mtu

    # -- thread-safe entry points ----------------------------------------
    def submit_view(self, view: NodeView) -> None:
        """Hand a new NodeView to the loop (any thread). Only the latest pending one is applied."""
        with self._lock:
            self._pending_view = view
        self._wake()

    def submit_credentials(self, credentials) -> None:
        """Hand renewed Credentials to the loop (any thread, e.g. the controller watch thread):
        ``IkeManager.update_credentials(credentials, now)`` runs on the loop thread, so every
        IKE_SA set up after that presents the new certificate. Keys are never logged."""
        def apply() -> None:
            self.ike.update_credentials(credentials, self.clock())
            self.counters["credentials_updates"] += 1
            self.log.info("new credentials handed to IKE: new IKE_SAs use them")
        self.call_soon(apply)

    def submit_stored_view(self, view: NodeView) -> None:
        """Like ``submit_view`` for a view read from disk (controller unreachable): applied only
        if no view came from the controller first; status shows ``view_source: stored``."""
        def apply() -> None:
            if self.view_source in ("controller", "stored"):
                return
            self._apply_view(view)
            self.view_source = "stored"
        self.call_soon(apply)

    def call_soon(self, fn) -> None:
        """Run ``fn()`` on the loop thread at its next wakeup (any thread):
        how other threads (e.g. the metrics endpoint) read loop state safely."""
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def stop(self) -> None:
        """Ask the loop to shut down (any thread, or a signal handler)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\x01")
        except (BlockingIOError, OSError):
            pass  # pipe full: the loop is already going to wake

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        """Install routes for the initial view and initiate to peers flagged ``initiate``."""
        now = self.clock()
        self.policy.sync_routes(self.view)
        self._ensure_raw_ah()
        for p in self.view.peers:
            if p.initiate:
                self.requests.initiate(p.name, now, "start")
        self._guard("IKE join", self.ike.join, now)  # the starting node initiates too (race-free)
        self._flush_ike(now)

    def run(self) -> None:
        """Run until ``stop()``; then delete all SAs, flush, remove routes, close."""
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.tun.fileno(), selectors.EVENT_READ, _named("tun", self._on_tun))
        sel.register(self.udp500.fileno(), selectors.EVENT_READ, _named("udp500", self._on_udp500))
        sel.register(self.udp4500.fileno(), selectors.EVENT_READ, _named("udp4500", self._on_udp4500))
        sel.register(self._wake_r, selectors.EVENT_READ, _named("wakeup", self._on_wake))
        if self.raw_esp is not None:
            sel.register(self.raw_esp.fileno(), selectors.EVENT_READ, _named("raw_esp", self._on_raw_esp))
        if self.raw_ah is not None:
            sel.register(self.raw_ah.fileno(), selectors.EVENT_READ, _named("raw_ah", self._on_raw_ah))
        if self.control is not None:
            self.control.register(sel)
        guard = self._guard
        guard("start", self.start)
        clock = self.clock
        try:
            while not self._stopping:
                deadline = guard("timer deadline", self._next_deadline)
                timeout = None if deadline is None else max(0.0, deadline - clock())
                for key, mask in sel.select(timeout):
                    guard(key.data, key.data, mask)
                    if self._stopping:
                        break
                guard("timers", self._run_timers, clock())
        finally:
            self.shutdown()

    def _guard(self, where, fn, *args):
        """Run one callback; an exception is logged (once per kind, with a traceback), counted
        in ``internal_errors``, and the loop goes on. A dead TUN device stops the loop."""
        try:
            return fn(*args)
        except TunGone as exc:
            if self.fatal is None:
                self.fatal = str(exc)
                self.log.error("%s; shutting down (IKE_SAs deleted, routes and rules removed)", exc)
            self._stopping = True
        except Exception as exc:
            self.internal_error(getattr(where, "__name__", None) or str(where), exc)
        return None

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Count an unexpected exception; log it with a traceback the first time this
        (place, type, message) is seen, so a packet flood cannot flood the log."""
        self.counters["internal_errors"] += 1
        key = (where, type(exc).__name__, str(exc)[:200])
        if key in self._logged_errors:
            return
        if len(self._logged_errors) < _MAX_LOGGED_ERRORS:
            self._logged_errors.add(key)
            self.log.error("internal error in %s (counted in internal_errors, the agent keeps running; "
                           "please report it): %s: %s", where, type(exc).__name__, exc, exc_info=exc)

    def pump(self) -> None:
        """One non-blocking pass over every source and the timer (tests drive the loop with
        this), under the same guards as ``run``."""
        g = self._guard
        g("wakeup", self._on_wake)
        g("udp500", self._on_udp500)
        g("udp4500", self._on_udp4500)
        if self.raw_esp is not None:
            g("raw_esp", self._on_raw_esp)
        if self.raw_ah is not None:
            g("raw_ah", self._on_raw_ah)
        g("tun", self._on_tun)
        g("timers", self._pump_timers)

    def _pump_timers(self) -> None:
        self._run_timers(self.clock(), flush=True)

    def _next_deadline(self) -> float | None:
        ts = [t for t in (self.ike.get_timer(), self.keepalive.deadline) if t is not None]
        return min(ts) if ts else None

    def _run_timers(self, now: float, flush: bool = False) -> None:
        deadline = self.ike.get_timer()
        if deadline is not None and deadline <= now:
            self.ike.handle_timer(now)
            flush = True
        if flush:
            self._flush_ike(now)
        ka = self.keepalive.deadline
        if ka is not None and ka <= now:
            self._keepalives(now)

    def _keepalives(self, now: float) -> None:
        """Send 0xFF (RFC 3948 §2.3) to every NAT'd peer we sent nothing to for the interval."""
        due = self.keepalive.due(now)
        if due:
            sent = self.udp4500.send_batch([(NAT_KEEPALIVE, r) for r in due])
            self.counters["keepalives_out"] += sent
            self.counters["send_errors"] += len(due) - sent

    def shutdown(self) -> None:
        """Delete every IKE_SA (INFORMATIONAL), flush, remove routes, close the devices."""
        now = self.clock()
        try:
            self.ike.delete_all(now)
            self._flush_ike(now)
        except Exception:
            self.log.exception("deleting IKE_SAs at shutdown failed")
        if self.routes is not None:
            self.routes.remove_all()
            self.routes.close()
        if self.control is not None:
            self.control.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for dev in (self.tun, self.udp500, self.udp4500, self.raw_esp, self.raw_ah):
            if dev is None:
                continue
            try:
                dev.close()
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.info("stopped")

    # -- view ---------------------------------------------------------------
    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            view, self._pending_view = self._pending_view, None
            calls, self._calls = self._calls, []
        if view is not None:
            try:
                self._apply_view(view)
                self.view_source = "controller" if self.view_source != "config" else "config"
            except Exception as exc:
                self.internal_error(f"applying view version {view.version}", exc)
        for fn in calls:
            try:
                fn()
            except Exception as exc:
                self.internal_error(f"call_soon {getattr(fn, '__qualname__', fn)}", exc)

    def _apply_view(self, view: NodeView) -> None:
        """Apply a new NodeView: IKE (peers, policy, ``revoked_serials``), CHILD_SAs of removed
        peers, SPD, routes, initiations. Each step is guarded so one bad peer (e.g. a proposal
        typo, refused by the IKE core as PeerRefused) does not stop the others."""
        self.awaiting_view = False
        now = self.clock()
        old = {p.name for p in self.view.peers}
        self.view = view
        try:
            self.ike.update_view(view, now)
        except Exception as exc:
            self.internal_error(f"IKE update_view (version {view.version})", exc)
        names = {p.name for p in view.peers}
        for gone in old - names:
            self.hold.forget(gone)
            for ch in self.sad.of_peer(gone):
                sa_events.remove_child(self, ch)
        self.policy.apply_view(view)
        self.policy.sync_routes(view)
        self._ensure_raw_ah()
        for p in view.peers:
            if p.initiate and p.name not in self.sad.current:
                self.requests.initiate(p.name, now, f"view {view.version}")  # idempotent in the IKE core
        self._flush_ike(now)
        self.log.info("view version %d applied: %d peers", view.version, len(view.peers))

    def _ensure_raw_ah(self) -> None:
        """Open the raw AH socket beside the raw ESP one once any peer's policy uses AH."""
        if self.raw_ah is not None or self.raw_esp is None or not hasattr(self.raw_esp, "sibling"):
            return
        if not any(getattr(p.policy, "protocol", "esp") != "esp" for p in self.view.peers):
            return
        try:
            self.raw_ah = self.raw_esp.sibling(pk.PROTO_AH, hdrincl=True)
        except Exception as exc:
            self.log.error("%s: AH policies cannot send or receive (counter no_raw_socket)", exc)
            return
        self.inside.raw_ah = True
        if self._sel is not None:
            self._sel.register(self.raw_ah.fileno(), selectors.EVENT_READ, _named("raw_ah", self._on_raw_ah))

    # -- the two sides: read a batch, process it, finish it ---------------------
    def _on_tun(self) -> None:
        pkts = self.tun.read_batch(self.batch)
        if pkts:
            out = Batch()
            self.inside.process(pkts, out)
            self._finish(out)

    def _on_udp500(self) -> None:
        batch = self.udp500.recv_batch(self.batch)
        if not batch:
            return
        if self.awaiting_view:
            self.counters[BEFORE_FIRST_VIEW] += len(batch)
            return
        out = Batch()
        self.outside.udp500(batch, out)
        self._finish(out)

    def _on_udp4500(self) -> None:
        self._from_socket(self.udp4500, self.outside.udp4500)

    def _on_raw_esp(self) -> None:
        self._from_socket(self.raw_esp, self.outside.raw_esp)

    def _on_raw_ah(self) -> None:
        self._from_socket(self.raw_ah, self.outside.raw_ah)

    def _from_socket(self, sock, side) -> None:
        batch = sock.recv_batch(self.batch)
        if batch:
            out = Batch()
            side(batch, out)
            self._finish(out)

    def _send(self, out: Batch) -> None:
        """Write and send what a batch produced, one call per device."""
        c = self.counters
        if out.icmp:
            c["icmp_too_big"] += self.tun.write_batch(out.icmp)
        if out.tun:
            c["tun_out"] += self.tun.write_batch(out.tun)
        if out.udp4500:
            sent = self.udp4500.send_batch(out.udp4500)
            c["esp_out"] += sent
            c["send_errors"] += len(out.udp4500) - sent
            if self.keepalive.remotes:  # only tracked while a keepalive may be needed
                self.keepalive.sent(out.udp4500_to, self.clock(), only_nat=False)
        if out.raw_esp:
            sent = self.raw_esp.send_batch(out.raw_esp)
            c["esp_out"] += sent
            c["send_errors"] += len(out.raw_esp) - sent
        if out.raw_ah:
            sent = self.raw_ah.send_batch(out.raw_ah)
            c["ah_out"] += sent
            c["send_errors"] += len(out.raw_ah) - sent

    def _finish(self, out: Batch) -> None:
        """After a batch: send its packets, then hand its requests to IKE (volume rekey /
        expire, unknown-SPI hints, acquires, IKE datagrams) and flush IKE once.
        ``out.inbound_ike_sas`` (authenticated ESP/AH) keeps those IKE_SAs' liveness checks away."""
        self._send(out)
        if out.inbound_ike_sas:  # RFC 7296 §2.4: traffic from the peer proves it alive
            self._guard("IKE note_inbound", self.ike.note_inbound, out.inbound_ike_sas, self.clock())
        if not out.requests:
            return
        now = self.clock()
        req = self.requests
        for ch, sa in out.volume:
            self._request(f"volume check of CHILD_SA {ch.inbound_spi:08x}", req.volume, ch, sa, now)
        if out.unknown_spi and not self.awaiting_view:  # nothing said before the first view
            self._request("unknown-SPI hint", req.unknown_spi, out.unknown_spi, now)
        for peer, n in out.acquire.items():
            self._request(f"acquire({peer})", req.acquire, peer, n, now, out.waiting.get(peer, ()))
        for ch, remote in out.moved.values():
            self._request(f"follow({ch.peer})", req.follow, ch, remote, now)
        if out.ike:
            c = self.counters
            if self.awaiting_view:
                c[BEFORE_FIRST_VIEW] += len(out.ike)
            else:
                self.ike.wall_offset = self.wall_clock() - now  # certificate validity is Unix time
                receive = self.ike.receive_datagram
                for data, local, remote in out.ike:
                    c["ike_in"] += 1
                    receive(data, local, remote, now)
        self._flush_ike(now)

    def _request(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.internal_error(what, exc)

    # -- IKE output and events -------------------------------------------------
    def _flush_ike(self, now: float) -> None:
        """Send what IKE wants to send (through a carrier's SA when the peer is reachable only
        through another peer's tunnel), then dispatch IKE's events by type."""
        out500, out4500 = [], []
        nested: Batch | None = None
        policy, current = self.policy, self.sad.current
        for d in self.ike.datagrams_to_send():
            via = policy.carrier(d.remote[0], self._peer_at(d.remote[0])) if policy.nest_in else None
            if via is not None and via in current:
                # IKE with a peer reachable only through another peer's tunnel (nested SAs)
                data = NON_ESP_MARKER + d.data if d.local[1] == 4500 else d.data
                pkt = pk.udp_datagram(self.local_address, d.remote[0], d.local[1], d.remote[1], data)
                self.counters["ike_out"] += 1
                if nested is None:
                    nested = Batch()
                self.inside.protect(current[via], [pkt], 1, nested)
                continue
            if d.local[1] == 4500:
                out4500.append((NON_ESP_MARKER + d.data, tuple(d.remote)))
            else:
                out500.append((d.data, tuple(d.remote)))
        if out500:
            self.counters["ike_out"] += self.udp500.send_batch(out500)
        if out4500:
            self.counters["ike_out"] += self.udp4500.send_batch(out4500)
            self.keepalive.sent((r for _d, r in out4500), now)
        if nested is not None:
            self._send(nested)
        self._dispatch_events(now)
        if nested is not None and nested.volume:
            for ch, sa in nested.volume:
                self._request(f"volume check of CHILD_SA {ch.inbound_spi:08x}", self.requests.volume, ch, sa, now)
            self._flush_ike(now)  # bounded: each CHILD_SA is asked once
        if self.hold.ready and (pkts := self.hold.release(now)):  # what waited for a CHILD_SA
            out = Batch()
            self.inside.process(pkts, out, held=True)
            self._finish(out)
        if self.keepalive.dirty:
            try:
                rows = self.ike.status()
            except Exception:
                rows = []
            self.keepalive.refresh(rows, now)

    def _dispatch_events(self, now: float) -> None:
        handlers = sa_events.HANDLERS
        while True:
            ev = self.ike.next_event()
            if ev is None:
                break
            for obs in self.event_observers:
                try:
                    obs(ev, now)
                except Exception:
                    self.log.exception("event observer failed")
            if isinstance(ev, sa_events.NAT_EVENTS):
                self.keepalive.dirty = True
            handler = handlers.get(type(ev))
            if handler is None:
                self.log.debug("ignoring event %s", type(ev).__name__)
                continue
            try:
                handler(self, ev, now)
            except Exception:
                # One bad SA must not take the loop down; the event is logged without keys.
                self.log.exception("handling %s failed", type(ev).__name__)

    def _peer_at(self, ip: str) -> str | None:
        for p in self.view.peers:
            if ip in p.endpoints:
                return p.name
        return None

    # -- operator commands and status (agent.datapath.status) ----------------------
    def rekey_command(self, req: dict) -> dict:
        """The control socket's ``rekey`` command (see agent.datapath.status.rekey_command)."""
        return _status.rekey_command(self, req)

    def status(self) -> dict:
        """JSON-ready status: node, IKE_SAs, CHILD_SAs with counters, global drops. No keys."""
        return _status.status(self)
