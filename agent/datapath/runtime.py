"""The agent's packet loop: one selector over TUN, UDP 500, UDP 4500, the
control socket and a wakeup pipe; drives IkeManager and the ESP SAs.

No asyncio in the packet path. Every stage is batch-shaped: a TUN read
yields a list of packets, grouped per CHILD_SA, encapsulated with one
``encapsulate_batch`` call and sent with one ``send_batch``; received ESP is
grouped per SPI, ``decapsulate_batch``-ed, policy-checked and written with
one ``write_batch``. Drops are counted (``Runtime.counters``), never logged
per packet.

Threading: only ``submit_view``, ``submit_credentials``, ``call_soon`` and
``stop`` may be called from other threads (or a signal handler); everything
else runs on the loop thread.

Robustness: every selector callback and timer runs under a guard. An
unexpected exception is logged once per (callback, exception type, message),
counted in ``counters["internal_errors"]`` and the loop keeps serving. A TUN
device that disappears (``ip link del``) is fatal: ``fatal`` says why and the
loop shuts down cleanly (IKE deletes sent, routes and rules removed).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import threading
import time
from dataclasses import dataclass, field

from agent.datapath import packets as pk
from agent.datapath.tun import TunGone
from agent.esp import Action, Sad, Spd, SpdEntry, bypass_entries, classify_udp4500
from agent.esp.packet import PROTO_FRAGMENT, parse_ip
from agent.model import NodeView

NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
NAT_KEEPALIVE = b"\xff"  # RFC 3948 §2.3
DEFAULT_NAT_KEEPALIVE_S = 20.0
_FLOW_COUNTERS = ("packets_in", "packets_out", "bytes_in", "bytes_out")
_ANY4 = ipaddress.ip_network("0.0.0.0/0")
_ANY6 = ipaddress.ip_network("::/0")

DROP_REASONS = ("no_sa", "no_policy", "discard", "unknown_spi", "policy", "malformed", "send_errors",
                "too_big", "no_raw_socket", "nesting_loop", "ah_drops", "no_endpoint", "fragment")
# IKE packets dropped in controller mode before the first view arrived: expected once or
# twice at every start (the peer retransmits), so shown apart from the drops
BEFORE_FIRST_VIEW = "no_view_yet"
_MAX_LOGGED_ERRORS = 256  # distinct internal errors logged with a traceback (then only counted)
def _is_fragment(p: bytes) -> bool:
    """An IPv4 fragment (MF or offset) or an IPv6 packet with a Fragment header."""
    if len(p) < 8:
        return False
    if p[0] >> 4 == 4:
        return bool(p[6] & 0x3F or p[7])
    if p[6] not in (PROTO_FRAGMENT, 0, 43, 60):  # no extension header that may precede it
        return False
    try:
        return parse_ip(p).fragment
    except Exception:
        return False  # malformed: the SA counts it


_MAX_NESTING = 4  # SAs applied to one packet (iterated processing, RFC 4301 §4.5)
# soft byte/packet lifetime (RFC 4301 §4.4.2.1) as a fraction of the hard one: the sending SA
# gets there first and starts the rekey; the receiving SA only if the sender did not (e.g. a
# peer without volume limits), which keeps both ends from rekeying at once
SOFT_FRACTION_OUT = 0.90
SOFT_FRACTION_IN = 0.95


def _named(name: str, fn):
    """A selector callback ``f(mask)`` calling ``fn()``, named for the error log."""
    def cb(_mask):
        return fn()
    cb.__name__ = name
    return cb


def selector_entries(peer: str, mode: str, local_sel, remote_sel) -> tuple:
    """SPD entries (outbound view: local = our side) for a CHILD_SA's narrowed traffic
    selectors (agent.ike.message.TrafficSelector, RFC 7296 §3.13.1) that restrict the IP
    protocol or ports; None when every pair is protocol 0 with ports 0-65535 (whole
    networks: the address check is enough). ICMP type/code travel in the port fields
    (type in the high octet, RFC 4301 §4.4.1.1); OPAQUE ports (start > end) cannot be
    expressed by an SPD entry and are treated as any port."""
    def ports(ts):
        if ts.start_port == 0 and ts.end_port == 65535 or ts.start_port > ts.end_port:
            return None
        return (ts.start_port, ts.end_port)

    narrowed = False
    out = []
    for ls in local_sel:
        for rs in remote_sel:
            if len(ls.start_addr) != len(rs.start_addr):
                continue
            lp, rp = ls.ip_protocol, rs.ip_protocol
            if lp and rp and lp != rp:
                continue
            proto = lp or rp or None
            lports, rports = ports(ls), ports(rs)
            if proto is not None or lports is not None or rports is not None:
                narrowed = True
            kw = {}
            if proto in (1, 58):  # ICMP: type range from the high octets, code range from the low
                rng = lports or rports
                if rng is not None:
                    t0, t1 = rng[0] >> 8, rng[1] >> 8
                    kw = {"local_ports": (t0, t1),
                          "remote_ports": (rng[0] & 0xFF, rng[1] & 0xFF) if t0 == t1 else (0, 255)}
            elif proto in (6, 17, 132, 136):
                kw = {"local_ports": lports, "remote_ports": rports}
            for ln in ls.networks():
                for rn in rs.networks():
                    out.append(SpdEntry(local=ln, remote=rn, protocol=proto, action=Action.PROTECT, peer=peer,
                                        mode=mode, name=f"child:{peer}", **kw))
    return tuple(out) if narrowed else None


@dataclass
class ChildEntry:
    """One installed CHILD_SA: both directions, its selectors and accounting."""

    peer: str
    ike_spi_i: int
    ike_spi_r: int
    inbound_spi: int
    outbound_spi: int
    in_sa: object
    out_sa: object
    local_ts: tuple
    remote_ts: tuple
    remote: tuple[str, int]
    mode: str
    udp_encap: bool
    algorithms: str
    established: float  # monotonic seconds
    established_wall: float
    drops: dict = field(default_factory=lambda: {"policy": 0})
    protocol: str = "esp"
    via: str | None = None  # peer whose SA carries our output (SA bundle, iterated processing)
    # "ah+esp" (RFC 4301 §4.5): the ESP entry needs the peer's AH SA outside it, both ways
    needs_ah: bool = False
    ah: "ChildEntry | None" = None
    # SPD entries with the negotiated protocol/ports (RFC 7296 §2.9) when they narrow the
    # addresses (None: addresses alone decide, the fast path)
    narrow: tuple | None = None
    overhead: int = 0  # bytes this SA adds (worst case)
    # rekey responder: the old SA's inbound SPI; sends only once that one is gone (ChildSaEstablished)
    send_after: int | None = None
    max_inner: int = 65535  # largest inner packet that fits the underlay MTU through the whole bundle

    @property
    def describe(self) -> str:
        encap = "udp" if self.udp_encap else "none"
        d = f"{self.protocol}/{self.mode}/{encap} {self.outbound_spi:08x}_o"
        if self.ah is not None:
            d += f" + {self.ah.describe}"
        return d

    def status(self, now: float) -> dict:
        c_in = dict(getattr(self.in_sa, "counters", {}) or {})
        c_out = dict(getattr(self.out_sa, "counters", {}) or {})
        drops = {k: v for k, v in self.drops.items() if v}
        for c in (c_in, c_out):
            for k, v in c.items():
                if k not in ("packets_in", "packets_out", "bytes_in", "bytes_out") and isinstance(v, int) and v:
                    drops[k] = drops.get(k, 0) + v
        return {
            "peer": self.peer,
            "ike_spi_i": f"{self.ike_spi_i:016x}", "ike_spi_r": f"{self.ike_spi_r:016x}",
            "spi_in": f"{self.inbound_spi:08x}", "spi_out": f"{self.outbound_spi:08x}",
            "mode": self.mode, "protocol": self.protocol, "udp_encap": self.udp_encap,
            "ah": f"{self.ah.outbound_spi:08x}" if self.ah is not None else None,
            "encapsulation": "udp" if self.udp_encap else "none", "via": self.via, "overhead": self.overhead,
            "remote": f"{self.remote[0]}:{self.remote[1]}",
            "local_ts": [str(n) for n in self.local_ts], "remote_ts": [str(n) for n in self.remote_ts],
            "algorithms": self.algorithms,
            "established": self.established_wall, "age_s": round(now - self.established, 3),
            "packets_in": c_in.get("packets_in", 0), "bytes_in": c_in.get("bytes_in", 0),
            "packets_out": c_out.get("packets_out", 0), "bytes_out": c_out.get("bytes_out", 0),
            "drops": drops,
            "lifetime": self.lifetime(),
        }

    def lifetime(self) -> dict | None:
        """Byte/packet lifetimes (RFC 4301 §4.4.2.1) of both directions: limits (0 = none),
        soft limits and use; None if the SAs do not track them."""
        li = getattr(self.in_sa, "lifetime_status", None)
        lo = getattr(self.out_sa, "lifetime_status", None)
        if li is None or lo is None:
            return None
        i, o = li(), lo()
        out = {k: {"limit": o[k]["limit"], "soft_in": i[k]["soft"], "soft_out": o[k]["soft"],
                   "used_in": i[k]["used"], "used_out": o[k]["used"]} for k in ("bytes", "packets")}
        out["expired"] = bool(i["expired"] or o["expired"])
        return out


class Runtime:
    """The agent's event loop.

    ``view``: the initial NodeView. ``ike``: an IkeManager (docs/design.md).
    ``tun``: TunDevice/FakeTun; ``udp500`` / ``udp4500``: UdpSocket/FakeUdp
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

    def __init__(self, view: NodeView, ike, *, tun, udp500, udp4500, local_address: str,
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
        self._ip_id = int.from_bytes(rng(2), "big") or 1  # IPv4 IDs we put on AH packets (never 0)
        self.underlay_mtu = underlay_mtu
        self.tun_mtu = tun_mtu if tun_mtu is not None else getattr(tun, "mtu", 1400)
        self.auto_mtu = auto_mtu
        self.mss_clamp = mss_clamp
        self.spd_hits: dict[SpdEntry, int] = {}
        self._local_ips: set[str] = {local_address}
        self._nest_in = False
        self.counters: dict[str, int] = {k: 0 for k in DROP_REASONS}
        self.counters.update({BEFORE_FIRST_VIEW: 0, "internal_errors": 0, "unknown_spi_hints": 0,
                              "credentials_updates": 0})
        self.counters.update({"keepalives": 0, "keepalives_out": 0, "ike_in": 0, "ike_out": 0, "esp_in": 0, "esp_out": 0,
                              "tun_in": 0, "tun_out": 0, "nested_out": 0, "nested_in": 0, "icmp_too_big": 0,
                              "mss_clamped": 0, "ah_in": 0, "ah_out": 0, "lifetime_rekeys": 0,
                              "lifetime_deletes": 0})
        self._fragment_logged = False
        self.nat_keepalive = nat_keepalive
        self._nat_remotes: set[tuple[str, int]] = set()  # peers' UDP 4500 while we are behind a NAT
        self._tx4500: dict[tuple[str, int], float] = {}  # remote -> when we last sent it anything on 4500
        self._ka_deadline: float | None = None
        self._nat_dirty = False
        self.sad = Sad()  # the SAs: inbound by SPI, outbound by peer
        self.spd = Spd()  # default DISCARD
        self.children: dict[int, ChildEntry] = {}  # inbound SPI -> CHILD_SA metadata
        self.current: dict[str, ChildEntry] = {}  # peer -> CHILD_SA whose outbound SA sends
        self._view_spd: list[SpdEntry] = []
        self._bypass_spd: list[SpdEntry] = bypass_entries(bypass)
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
        self._apply_view_spd(view)

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
        self._sync_routes()
        self._ensure_raw_ah()
        for p in self.view.peers:
            if p.initiate:
                self._initiate(p.name, now, "start")
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

    def _initiate(self, peer: str, now: float, why: str) -> bool:
        """``ike.initiate`` for one peer; a peer without endpoints or whose initiation fails is
        skipped (counted), never an exception out of the loop. Returns whether it was asked."""
        p = self.view.peer(peer)
        if p is not None and not p.endpoints:
            return False
        try:
            self.ike.initiate(peer, now)
            return True
        except Exception as exc:
            self.internal_error(f"initiate({peer}) on {why}", exc)
            return False

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
        now = self.clock()
        deadline = self.ike.get_timer()
        if deadline is not None and deadline <= now:
            self.ike.handle_timer(now)
        self._flush_ike(now)
        if self._ka_deadline is not None and self._ka_deadline <= now:
            self._keepalives(now)

    def _next_deadline(self) -> float | None:
        ts = [t for t in (self.ike.get_timer(), self._ka_deadline) if t is not None]
        return min(ts) if ts else None

    def _run_timers(self, now: float) -> None:
        deadline = self.ike.get_timer()
        if deadline is not None and deadline <= now:
            self.ike.handle_timer(now)
            self._flush_ike(now)
        if self._ka_deadline is not None and self._ka_deadline <= now:
            self._keepalives(now)

    # -- NAT keepalives (RFC 3948 §2.3) ----------------------------------------
    def _refresh_nat(self, now: float) -> None:
        """Which peers we must keep the NAT mapping open to: the UDP 4500 remotes of the
        established IKE_SAs whose NAT-D said our side is behind a NAT (RFC 7296 §2.23)."""
        self._nat_dirty = False
        remotes = set()
        try:
            rows = self.ike.status()
        except Exception:
            rows = []
        for st in rows:
            if st.get("state") != "ESTABLISHED" or not (st.get("nat") or {}).get("local"):
                continue
            ip, _, port = str(st.get("remote", "")).rpartition(":")
            if ip and port == "4500":
                remotes.add((ip, 4500))
        for r in remotes - self._nat_remotes:
            self._tx4500.setdefault(r, now)
        for r in self._nat_remotes - remotes:
            self._tx4500.pop(r, None)
        self._nat_remotes = remotes
        self._schedule_keepalive()

    def _schedule_keepalive(self) -> None:
        if not self.nat_keepalive or not self._nat_remotes:
            self._ka_deadline = None
            return
        self._ka_deadline = min(self._tx4500.get(r, 0.0) for r in self._nat_remotes) + self.nat_keepalive

    def _keepalives(self, now: float) -> None:
        """Send 0xFF to every NAT'd peer we sent nothing to for ``nat_keepalive`` seconds."""
        due = [r for r in self._nat_remotes if now - self._tx4500.get(r, now) >= self.nat_keepalive]
        if due:
            sent = self.udp4500.send_batch([(NAT_KEEPALIVE, r) for r in due])
            self.counters["keepalives_out"] += sent
            self.counters["send_errors"] += len(due) - sent
            for r in due:
                self._tx4500[r] = now
        self._schedule_keepalive()

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

    # -- view / SPD / routes ----------------------------------------------
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
            for ch in list(self.children.values()):
                if ch.peer == gone:
                    self._remove_child(ch)
        self._apply_view_spd(view)
        self._sync_routes()
        self._ensure_raw_ah()
        for p in view.peers:
            if p.initiate and p.name not in self.current:
                self._initiate(p.name, now, f"view {view.version}")  # idempotent in the IKE core
        self._flush_ike(now)
        self.log.info("view version %d applied: %d peers", view.version, len(view.peers))

    def _apply_view_spd(self, view: NodeView) -> None:
        pol = []
        for p in view.peers:
            for rnet in p.subnets:
                locals_ = [n for n in view.subnets if n.version == rnet.version] or \
                          [_ANY4 if rnet.version == 4 else _ANY6]
                # the controller's action for this pair (RFC 4301 §4.4.1): PROTECT through the
                # peer's SAs, BYPASS in the clear (no route into the TUN either), or DISCARD
                action = {"bypass": Action.BYPASS, "discard": Action.DISCARD}.get(p.policy.action,
                                                                                  Action.PROTECT)
                for lnet in locals_:
                    pol.append(SpdEntry(local=lnet, remote=rnet, action=action,
                                        peer=p.name if action is Action.PROTECT else None,
                                        mode=p.policy.mode, name=f"view:{p.name}"))
        self._view_spd = pol
        self._rebuild_spd()

    def _rebuild_spd(self) -> None:
        child = []
        for ch in self.current.values():
            if ch.narrow is not None:  # protocol / ports negotiated (RFC 7296 §2.9)
                child.extend(ch.narrow)
                continue
            for r in ch.remote_ts:
                for loc in ch.local_ts:
                    if loc.version == r.version:
                        child.append(SpdEntry(local=loc, remote=r, action=Action.PROTECT, peer=ch.peer,
                                              mode=ch.mode, name=f"child:{ch.peer}"))
        spd = child + self._view_spd
        # Most specific first (remote prefix, then local prefix); stable for equal lengths.
        spd.sort(key=lambda e: (-e.remote.prefixlen, -e.local.prefixlen, e.protocol is None,
                                e.local_ports is None and e.remote_ports is None))
        self.spd.replace(self._bypass_spd + spd)  # BYPASS first, whatever its prefix length
        self._compute_bundles()

    # -- SA bundles and MTU ------------------------------------------------
    def _carrier(self, dst: str, exclude: str | None) -> str | None:
        """The peer whose PROTECT entry covers our own output to ``dst`` (ESP or IKE towards
        ``exclude``, a peer reachable only through another peer's tunnel), else None.
        First match in SPD order, skipping ``exclude``'s own entries (they describe the
        traffic inside its SA, not the SA's packets)."""
        try:
            d = ipaddress.ip_address(dst)
            src = ipaddress.ip_address(self.local_address)
        except ValueError:
            return None
        for e in self.spd.entries:
            if e.peer == exclude or e.remote is None or d.version != e.remote.version or d not in e.remote:
                continue
            if e.local is not None and src not in e.local and not any(
                    ipaddress.ip_address(v) in e.local for v in self._local_ips if ":" not in v or d.version == 6):
                continue
            return e.peer if e.action is Action.PROTECT else None
        return None

    def _compute_bundles(self) -> None:
        """Link every CHILD_SA whose output another peer's PROTECT entry covers (SA bundle,
        RFC 4301 §4.5 iterated processing) and recompute overheads and the TUN MTU."""
        for ch in self.children.values():
            ch.via = self._carrier(ch.remote[0], ch.peer)
            if ch.protocol == "ah":
                ch.overhead = pk.ah_overhead(ch.algorithms, mode=ch.mode, outer_v6=":" in ch.remote[0])
            else:
                ch.overhead = pk.esp_overhead(ch.algorithms, mode=ch.mode, udp_encap=ch.udp_encap,
                                              outer_v6=":" in ch.remote[0])
        # inner packets of a tunnel may carry SAs / IKE of another peer for us: peel them here
        self._nest_in = any(ch.via is not None for ch in self.children.values()) or (
            any(p.policy.mode == "transport" for p in self.view.peers)
            and any(ch.mode == "tunnel" for ch in self.children.values()))
        worst = 0
        for ch in self.children.values():
            total, cur, seen = 0, ch, set()
            while cur is not None and cur.peer not in seen:
                seen.add(cur.peer)
                total += cur.overhead + (cur.ah.overhead if cur.ah is not None else 0)
                cur = self.current.get(cur.via) if cur.via else None
            worst = max(worst, total)
            if self.underlay_mtu:
                ch.max_inner = self.underlay_mtu - total
        if self.underlay_mtu and self.auto_mtu:
            floor = 1280 if any(n.version == 6 for c in self.children.values() for n in c.remote_ts) else 576
            want = max(floor, self.underlay_mtu - (worst or 73))
            if want != self.tun_mtu and self.routes is not None:
                try:
                    self.routes.set_mtu(want)
                    self.log.info("TUN MTU %d -> %d (underlay %d, largest bundle overhead %d)", self.tun_mtu,
                                  want, self.underlay_mtu, worst)
                    self.tun_mtu = want
                except Exception as exc:
                    self.log.error("%s", exc)

    def _sync_routes(self) -> None:
        if self.routes is None:
            return
        nets = set()
        for p in self.view.peers:
            if p.policy.action != "bypass":  # BYPASS traffic keeps the normal routes, in the clear
                nets.update(p.subnets)
        for ch in self.current.values():
            nets.update(ch.remote_ts)  # e.g. a remote host's virtual IP, routed back through its SA
        # what we exchange IKE/ESP with in the clear must never be routed into another peer's
        # tunnel: our own address and tunnel-mode peers' endpoints. Not carved out: a
        # transport-mode peer's address (captured on purpose; a host behind a gateway is
        # reached through that gateway's SA) and an endpoint inside the peer's own subnets
        # (a remote host whose tunnel protects its own address, RFC 4301 case 4)
        keep = set(self._local_ips_underlay())
        for p in self.view.peers:
            if p.policy.mode != "tunnel":
                continue
            for e in p.endpoints:
                try:
                    ip = ipaddress.ip_address(e)
                except ValueError:
                    continue
                if not any(ip.version == n.version and ip in n for n in p.subnets):
                    keep.add(e)
        self.routes.sync(nets, keep_out=keep)

    def _local_ips_underlay(self) -> tuple[str, ...]:
        return (self.local_address,)

    # -- outbound: TUN -> ESP ----------------------------------------------
    def _on_tun(self) -> None:
        pkts = self.tun.read_batch(self.batch)
        if not pkts:
            return
        c = self.counters
        c["tun_in"] += len(pkts)
        if self.mss_clamp:
            pkts = [self._clamp(p) for p in pkts]
        lookup = self.spd.lookup_outbound
        current = self.current
        no_policy, malformed = self.spd.default_entry, self.spd.malformed_entry
        protect = Action.PROTECT
        groups: dict[int, list] = {}
        acquire: dict[str, int] = {}  # peer -> packets without an SA
        for p in pkts:
            e = lookup(p)
            if e.action is protect:
                g = groups.get(id(e))
                if g is not None:
                    g[1].append(p)
                elif e.peer in current:
                    groups[id(e)] = [e, [p]]
                else:
                    acquire[e.peer] = acquire.get(e.peer, 0) + 1
            elif e is no_policy:
                c["no_policy"] += 1
            elif e is malformed:
                c["malformed"] += 1
            else:
                c["discard"] += 1  # explicit DISCARD, or BYPASS (nothing to bypass to on a TUN)
        hits = self.spd_hits
        for e, lst in groups.values():
            hits[e] = hits.get(e, 0) + len(lst)
            ch = current[e.peer]
            if ch.narrow is not None and not e.name.startswith("child:"):
                lst = self._within_child(ch, lst, inbound=False)
                if not lst:
                    continue
            if ch.max_inner < self.tun_mtu:
                lst = self._fit(ch, lst)
            self._protect(ch, lst, 0)
        if acquire:
            now = self.clock()
            for peer, n in acquire.items():
                vp = self.view.peer(peer)
                if vp is not None and not vp.endpoints:
                    # nowhere to send IKE_SA_INIT: counted, not an error (the view may add one later)
                    c["no_endpoint"] += n
                    continue
                c["no_sa"] += n
                self._initiate(peer, now, "acquire")  # RFC 4301 §5.1; idempotent while negotiating
                self._acquire_child(peer, now)
            self._flush_ike(now)

    ACQUIRE_CHILD_INTERVAL_S = 5.0

    def _acquire_child(self, peer: str, now: float) -> None:
        """Acquire with an established IKE_SA but no CHILD_SA (its CHILD_SA expired by
        lifetime, was deleted, or its rekey failed): ask for a new CHILD_SA (CREATE_CHILD_SA,
        RFC 7296 §1.3.1), at most once per ACQUIRE_CHILD_INTERVAL_S per peer."""
        create = getattr(self.ike, "create_child", None)
        if create is None:
            return
        asked = self.__dict__.setdefault("_child_acquired_at", {})
        if now - asked.get(peer, float("-inf")) < self.ACQUIRE_CHILD_INTERVAL_S:
            return
        asked[peer] = now
        try:
            if create(peer, now):
                self.counters["child_acquires"] = self.counters.get("child_acquires", 0) + 1
        except Exception as exc:
            self.internal_error(f"create_child({peer}) on acquire", exc)

    def _within_child(self, ch: ChildEntry, pkts: list[bytes], *, inbound: bool) -> list[bytes]:
        """Packets inside ``ch``'s narrowed selectors (protocol, ports: RFC 7296 §2.9); the
        rest are counted as ``policy`` drops (the SA was not negotiated for them)."""
        allows = self.spd.entry_allows
        keep = [p for p in pkts if any(allows(e, p, inbound=inbound) for e in ch.narrow)]
        bad = len(pkts) - len(keep)
        if bad:
            ch.drops["policy"] += bad
            self.counters["policy"] += bad
        return keep

    def _sa_exhausting(self, ch: ChildEntry) -> None:
        """The outbound SA nears sequence-number exhaustion (EspSa.needs_rekey, RFC 4303 §3.3.3):
        ask IKE once for a CHILD_SA rekey (RFC 7296 §1.3.3); the new SA takes over on ChildSaEstablished."""
        asked = self.__dict__.setdefault("_rekey_asked", set())
        if ch.inbound_spi in asked or not hasattr(self.ike, "rekey_child"):
            return
        asked.add(ch.inbound_spi)
        now = self.clock()
        if self.ike.rekey_child(ch.inbound_spi, now):
            self.counters["lifetime_rekeys"] += 1
        self._flush_ike(now)

    def _sa_volume_check(self, ch: ChildEntry, sa) -> None:
        """``sa`` (one direction of ``ch``) set needs_rekey: a sequence number or byte/packet
        soft limit -> one rekey; its hard byte/packet limit (``expired``) -> delete the CHILD_SA."""
        if getattr(sa, "expired", False):
            self._sa_expired(ch)
        else:
            self._sa_exhausting(ch)

    def _sa_expired(self, ch: ChildEntry) -> None:
        """Hard byte/packet lifetime reached (RFC 4301 §4.4.2.1): delete the CHILD_SA through
        IKE (INFORMATIONAL D(SPI), RFC 7296 §1.4.1) so the peer removes its side too; if the IKE
        core no longer knows it, remove it here. Once per CHILD_SA."""
        done = self.__dict__.setdefault("_expired_done", set())
        if ch.inbound_spi in done:
            return
        done.add(ch.inbound_spi)
        self.counters["lifetime_deletes"] += 1
        now = self.clock()
        delete = getattr(self.ike, "delete_child", None)
        ok = False
        if delete is not None:
            ok = delete(ch.inbound_spi, now, reason="CHILD_SA byte/packet lifetime expired")
        self.log.info("CHILD_SA with %s (spi in %08x out %08x) reached its byte/packet lifetime: %s", ch.peer,
                      ch.inbound_spi, ch.outbound_spi, "deleting it" if ok else "removed (IKE no longer had it)")
        self._flush_ike(now)
        if not ok and self.children.get(ch.inbound_spi) is ch:
            self._remove_child(ch)

    def _protect(self, ch: ChildEntry, pkts: list[bytes], depth: int) -> None:
        """Apply ``ch``'s outbound SA to ``pkts`` (whole IP packets) and send the result,
        or hand it to the next SA of the bundle when ``ch.via`` is set."""
        if ch.mode == "transport":
            whole = [p for p in pkts if not _is_fragment(p)]
            if len(whole) != len(pkts):
                # RFC 4303 §3.3.4 / RFC 4302 §3.4.1: transport mode protects whole datagrams only;
                # no reassembly here (docs/datapath.md "Fragments and transport mode")
                self.counters["fragment"] += len(pkts) - len(whole)
                if not self._fragment_logged:
                    self._fragment_logged = True
                    self.log.warning("IP fragments from the TUN for the transport-mode CHILD_SA with %s are "
                                     "dropped (counter fragment; logged once): send datagrams that fit the "
                                     "TUN MTU, or use tunnel mode", ch.peer)
                pkts = whole
                if not pkts:
                    return
        if ch.protocol == "ah":
            self._send_ah(ch, pkts)
            return
        if ch.needs_ah and ch.ah is None:
            self.counters["no_sa"] += len(pkts)  # "ah+esp": the AH SA is not up yet
            return
        out = ch.out_sa.encapsulate_batch(pkts)
        if getattr(ch.out_sa, "needs_rekey", False):  # checked per batch, not per packet
            self._sa_volume_check(ch, ch.out_sa)
        if not out:
            return
        if ch.via is not None:
            nxt = self.current.get(ch.via)
            if nxt is None:
                self.counters["no_sa"] += len(out)
                return
            if depth >= _MAX_NESTING:
                self.counters["nesting_loop"] += len(out)
                return
            src, dst = self.local_address, ch.remote[0]
            if ch.udp_encap:
                outer = [pk.udp_datagram(src, dst, pk.IKE_NATT_PORT, ch.remote[1], x) for x in out]
            else:
                outer = [pk.ip_packet(src, dst, pk.PROTO_ESP, x) for x in out]
            self.counters["nested_out"] += len(outer)
            self._protect(nxt, outer, depth + 1)
            return
        c = self.counters
        if ch.ah is not None:  # ESP then AH (RFC 4301 §4.5): whole IP packets for the AH SA
            src, dst = self.local_address, ch.remote[0]
            c["esp_out"] += len(out)
            self._send_ah(ch.ah, [pk.ip_packet(src, dst, pk.PROTO_ESP, x) for x in out])
            return
        if ch.udp_encap:
            dst = ch.remote
            sent = self.udp4500.send_batch([(x, dst) for x in out])
            if self._nat_remotes:  # only tracked while a keepalive may be needed
                self._tx4500[dst] = self.clock()
        elif self.raw_esp is not None:
            dst = (ch.remote[0], 0)
            sent = self.raw_esp.send_batch([(x, dst) for x in out])
        else:
            c["no_raw_socket"] += len(out)
            return
        c["esp_out"] += sent
        c["send_errors"] += len(out) - sent

    # -- AH (RFC 4302): raw IP protocol 51, whole packets (IP_HDRINCL) --------
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
        if self._sel is not None:
            self._sel.register(self.raw_ah.fileno(), selectors.EVENT_READ, _named("raw_ah", self._on_raw_ah))

    def _next_ip_id(self) -> int:
        self._ip_id = (self._ip_id % 0xFFFF) + 1
        return self._ip_id

    def _send_ah(self, ah: ChildEntry, pkts: list[bytes]) -> None:
        """AH-protect whole IP packets and send them. Tunnel mode is AH over a fresh IP-in-IP
        header we build (so its Identification, which the ICV covers, is ours and never 0: the
        kernel would fill in a 0 after the ICV was computed); transport mode gives IPv4 packets
        with ID 0 an ID first."""
        c = self.counters
        if self.raw_ah is None:
            c["no_raw_socket"] += len(pkts)
            return
        src, dst = self.local_address, ah.remote[0]
        ready = []
        for p in pkts:
            if not p:
                continue
            if ah.mode == "tunnel":
                nh = 4 if p[0] >> 4 == 4 else 41
                ready.append(pk.build_ip(src, dst, nh, p, ident=self._next_ip_id(), df=False))
            elif p[0] >> 4 == 4 and len(p) >= 20 and p[4:6] == b"\x00\x00":
                ready.append(pk.with_ip_id(p, self._next_ip_id()))
            else:
                ready.append(p)
        before = sum(v for k, v in ah.out_sa.counters.items() if k not in _FLOW_COUNTERS)
        out = ah.out_sa.encapsulate_batch(ready)
        c["ah_drops"] += sum(v for k, v in ah.out_sa.counters.items() if k not in _FLOW_COUNTERS) - before
        if getattr(ah.out_sa, "needs_rekey", False):
            self._sa_volume_check(ah, ah.out_sa)
        if not out:
            return
        sent = self.raw_ah.send_batch([(x, (dst, 0)) for x in out])
        c["ah_out"] += sent
        c["send_errors"] += len(out) - sent

    def _on_raw_ah(self) -> None:
        batch = self.raw_ah.recv_batch(self.batch)
        if batch:
            before = self.counters["unknown_spi"]
            self._ah_in([p for p, _a in batch])
            if self.counters["unknown_spi"] != before:
                pairs = []
                for p, a in batch:
                    off = (p[0] & 0x0F) * 4 if p and p[0] >> 4 == 4 else 40
                    pairs.append((p[off + 4:off + 8], a))
                self._hint_unknown_spi(pairs)

    def _ah_in(self, pkts: list[bytes]) -> None:
        """Inbound AH (RFC 4302 §3.4): find the SA by SPI, verify and strip AH, then the
        inner packet goes through its policy check to the TUN, or (ESP then AH bundle) to
        the ESP SA that must sit inside this AH SA."""
        c = self.counters
        c["ah_in"] += len(pkts)
        groups: dict[int, list] = {}
        for p in pkts:
            try:
                v = p[0] >> 4
                off = (p[0] & 0x0F) * 4 if v == 4 else 40
                if (p[9] if v == 4 else p[6]) != pk.PROTO_AH:
                    raise IndexError
                spi = int.from_bytes(p[off + 4:off + 8], "big")
                if len(p) < off + 12:
                    raise IndexError
            except IndexError:
                c["malformed"] += 1
                continue
            groups.setdefault(spi, []).append(p)
        out: list[bytes] = []
        volume: list[ChildEntry] = []
        for spi, lst in groups.items():
            ch = self.children.get(spi)
            if ch is None or ch.protocol != "ah":
                c["unknown_spi"] += len(lst)
                continue
            sa = ch.in_sa
            before = sum(v for k, v in sa.counters.items() if k not in _FLOW_COUNTERS)
            inner = sa.decapsulate_batch(lst)
            c["ah_drops"] += sum(v for k, v in sa.counters.items() if k not in _FLOW_COUNTERS) - before
            if getattr(sa, "needs_rekey", False):  # byte/packet soft or hard limit inbound
                volume.append(ch)
            esp = []
            for p in inner:
                v = p[0] >> 4
                proto = p[9] if v == 4 else p[6]
                if ch.mode == "transport" and proto == pk.PROTO_ESP:
                    esp.append(p[(p[0] & 0x0F) * 4 if v == 4 else 40:])
                elif self.spd.allows_inbound(ch.local_ts, ch.remote_ts, p):
                    if ch.narrow is None or self._within_child(ch, [p], inbound=True):
                        out.append(p)  # (a narrowed-selector miss is counted by _within_child)
                else:
                    ch.drops["policy"] += 1
                    c["policy"] += 1
            if esp:
                self._esp_in(esp, None, ah_peer=ch.peer)
        if out:
            c["tun_out"] += self.tun.write_batch(out)
        for ch in volume:
            self._sa_volume_check(ch, ch.in_sa)

    def _fit(self, ch: ChildEntry, pkts: list[bytes]) -> list[bytes]:
        """Packets that fit through ``ch``'s bundle; for the rest an ICMP "fragmentation needed" /
        Packet Too Big goes back into the TUN (RFC 4301 §8.2.1: the SA's PMTU is reported to the
        sender); too-big packets without DF are sent anyway (the outer packet gets fragmented)."""
        lim = ch.max_inner
        keep, icmp = [], []
        for p in pkts:
            if len(p) <= lim:
                keep.append(p)
                continue
            r = pk.too_big(p, lim)
            if r is None:
                keep.append(p)
            else:
                icmp.append(r)
        if icmp:
            self.counters["too_big"] += len(icmp)
            self.counters["icmp_too_big"] += self.tun.write_batch(icmp)
        return keep

    def _clamp(self, p: bytes) -> bytes:
        # fast reject: only TCP can carry an MSS option (IPv4 protocol byte 9, IPv6 next header 6)
        v = p[0] >> 4 if p else 0
        if (v == 4 and p[9] == 6) or (v == 6 and len(p) > 6 and p[6] == 6):
            mtu = min(self.tun_mtu, *(c.max_inner for c in self.current.values())) if self.current else self.tun_mtu
            q = pk.clamp_mss(p, mtu - (40 if v == 4 else 60))
            if q is not p:
                self.counters["mss_clamped"] += 1
            return q
        return p

    def _sync_wall(self, now: float) -> None:
        # the IKE core checks certificate validity in Unix time but runs timers on ``now``
        if hasattr(self.ike, "wall_offset"):
            self.ike.wall_offset = self.wall_clock() - now

    # -- inbound: UDP -> IKE / ESP -> TUN ------------------------------------
    def _on_udp500(self) -> None:
        batch = self.udp500.recv_batch(self.batch)
        if not batch:
            return
        if self.awaiting_view:
            self.counters["no_view_yet"] += len(batch)
            return
        now = self.clock()
        self._sync_wall(now)
        local = (self.local_address, 500)
        for data, addr in batch:
            self.counters["ike_in"] += 1
            self.ike.receive_datagram(data, local, addr, now)
        self._flush_ike(now)

    def _on_udp4500(self) -> None:
        batch = self.udp4500.recv_batch(self.batch)
        if not batch:
            return
        c = self.counters
        esp: list[bytes] = []
        esp_src: list = []
        ike = None
        for data, addr in batch:
            kind = classify_udp4500(data)
            if kind == "esp":
                esp.append(data)
                esp_src.append(addr)
            elif kind == "ike":  # RFC 3948 §2.2: IKE behind the non-ESP marker
                if ike is None:
                    ike = []
                ike.append((data[4:], addr))
            elif kind == "keepalive":  # RFC 3948 §2.3
                c["keepalives"] += 1
            else:
                c["malformed"] += 1
        if esp:
            before = c["unknown_spi"]
            self._esp_in(esp, None)
            if c["unknown_spi"] != before:
                self._hint_unknown_spi([(p[:4], a) for p, a in zip(esp, esp_src)])
        if ike:
            if self.awaiting_view:
                c["no_view_yet"] += len(ike)
                ike = []
            now = self.clock()
            self._sync_wall(now)
            local = (self.local_address, 4500)
            for data, addr in ike:
                c["ike_in"] += 1
                self.ike.receive_datagram(data, local, addr, now)
            self._flush_ike(now)

    def _on_raw_esp(self) -> None:
        batch = self.raw_esp.recv_batch(self.batch)
        if not batch:
            return
        esp = []
        for pkt, _addr in batch:
            off = (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40
            esp.append(pkt[off:])
        before = self.counters["unknown_spi"]
        self._esp_in(esp, None)
        if self.counters["unknown_spi"] != before:
            self._hint_unknown_spi([(p[:4], a) for p, a in zip(esp, (a for _p, a in batch))])

    def _hint_unknown_spi(self, spis_from: list) -> None:
        """ESP/AH with an SPI we do not know came from these (SPI bytes, address) pairs: tell
        the IKE core (``hint_unknown_spi``, docs/ike-hardening.md), once per source address per
        batch; the core rate-limits and decides (liveness check, new IKE_SA, or nothing)."""
        hint = getattr(self.ike, "hint_unknown_spi", None)
        if hint is None:
            return
        now = self.clock()
        seen: set[str] = set()
        for spi, addr in spis_from:
            ip = addr[0] if isinstance(addr, tuple) else str(addr)
            if ip in seen or len(spi) < 4 or int.from_bytes(spi, "big") in self.children:
                continue
            seen.add(ip)
            what = hint(addr, now)
            if what in ("initiated", "liveness_check"):
                self.counters["unknown_spi_hints"] += 1
                self.log.info("ESP/AH with unknown SPI %s from %s: %s", spi.hex(), ip,
                              "IKE_SA_INIT started" if what == "initiated" else "liveness check of the IKE_SA")
        if seen:
            self._flush_ike(now)

    def _esp_in(self, esp: list[bytes], via: str | None, depth: int = 0, ah_peer: str | None = None) -> None:
        """Decapsulate ESP packets (RFC 4303 §3.4), check each inner packet against its
        CHILD_SA's selectors (RFC 4301 §5.2), and write them to the TUN; an inner packet that
        is itself ESP/IKE addressed to us (a nested SA) is processed again here.
        ``via``: the peer whose SA the packets came out of (None: from the underlay);
        ``ah_peer``: the peer whose AH SA they came out of ("ah+esp" bundles)."""
        c = self.counters
        c["esp_in"] += len(esp)
        out: list[bytes] = []
        sad = self.sad
        before = sad.counters["no_sa"]
        children = self.children
        allows = self.spd.allows_inbound
        local_b = None
        volume: list[ChildEntry] = []
        for sa, lst in sad.demux_inbound(esp):
            ch = children[sa.spi]
            # "ah+esp": this ESP SA must come out of the same peer's AH SA, and only then
            bad_ah = (ah_peer != ch.peer) if ch.needs_ah else (ah_peer is not None)
            if ch.via != via or bad_ah:
                # RFC 4301 §5.2: the bundle the policy demands is not the way it came
                ch.drops["policy"] += len(lst)
                c["policy"] += len(lst)
                continue
            lts, rts = ch.local_ts, ch.remote_ts
            if ch.mode == "tunnel":
                inner = sa.decapsulate_batch(lst)
            else:
                if local_b is None:
                    local_b = ipaddress.ip_address(self.local_address).packed
                src = ipaddress.ip_address(ch.remote[0]).packed
                fix = ch.udp_encap
                inner = [pk.rebuild_transport(src, local_b, nh, pl, fix_checksum=fix)
                         for nh, pl in sa.decapsulate_batch_nh(lst)]
            if getattr(sa, "needs_rekey", False):  # byte/packet soft or hard limit inbound
                volume.append(ch)
            good = []
            for p in inner:
                if allows(lts, rts, p):
                    good.append(p)
                else:
                    ch.drops["policy"] += 1
                    c["policy"] += 1
            if ch.narrow is not None and good:
                good = self._within_child(ch, good, inbound=True)
            if good and ch.mode == "tunnel" and self._nest_in:
                good = self._peel(ch.peer, good, depth)
            out += good
        c["unknown_spi"] += sad.counters["no_sa"] - before
        if out:
            if self.mss_clamp:
                out = [self._clamp(p) for p in out]
            c["tun_out"] += self.tun.write_batch(out)
        for ch in volume:  # after the batch is delivered: this may delete the CHILD_SA
            self._sa_volume_check(ch, ch.in_sa)

    def _peel(self, peer: str, pkts: list[bytes], depth: int) -> list[bytes]:
        """Inner packets of ``peer``'s tunnel that are ESP (raw or in UDP 4500) or IKE for us go
        through the next layer here; the rest are returned for the TUN."""
        rest, esp, ike = [], [], []
        for p in pkts:
            v = p[0] >> 4
            if v == 4:
                dst, proto, off = str(ipaddress.IPv4Address(p[16:20])), p[9], (p[0] & 0x0F) * 4
                src = str(ipaddress.IPv4Address(p[12:16]))
            else:
                dst, proto, off = str(ipaddress.IPv6Address(p[24:40])), p[6], 40
                src = str(ipaddress.IPv6Address(p[8:24]))
            if dst not in self._local_ips:
                rest.append(p)
            elif proto == pk.PROTO_ESP:
                esp.append(p[off:])
            elif proto == pk.PROTO_UDP and len(p) >= off + 8 and p[off + 2:off + 4] in (b"\x11\x94", b"\x01\xf4"):
                data = p[off + 8:]
                port = p[off + 2] << 8 | p[off + 3]
                sport = p[off] << 8 | p[off + 1]
                if port == 4500 and classify_udp4500(data) == "esp":
                    esp.append(data)
                elif port == 4500 and classify_udp4500(data) == "ike":
                    ike.append((data[4:], (src, sport), port))
                elif port == 500:
                    ike.append((data, (src, sport), port))
                else:
                    self.counters["keepalives"] += 1
            else:
                rest.append(p)
        if esp:
            if depth >= _MAX_NESTING:
                self.counters["nesting_loop"] += len(esp)
            else:
                self.counters["nested_in"] += len(esp)
                self._esp_in(esp, peer, depth + 1)
        if ike:
            now = self.clock()
            for data, addr, port in ike:
                self.counters["ike_in"] += 1
                self.ike.receive_datagram(data, (self.local_address, port), addr, now)
            self._flush_ike(now)
        return rest

    # -- IKE output and events -------------------------------------------------
    def _flush_ike(self, now: float) -> None:
        out500, out4500 = [], []
        for d in self.ike.datagrams_to_send():
            via = self._carrier(d.remote[0], self._peer_at(d.remote[0])) if self._nest_in else None
            if via is not None and via in self.current:
                # IKE with a peer reachable only through another peer's tunnel (nested SAs)
                data = NON_ESP_MARKER + d.data if d.local[1] == 4500 else d.data
                pkt = pk.udp_datagram(self.local_address, d.remote[0], d.local[1], d.remote[1], data)
                self.counters["ike_out"] += 1
                self._protect(self.current[via], [pkt], 1)
                continue
            if d.local[1] == 4500:
                out4500.append((NON_ESP_MARKER + d.data, tuple(d.remote)))
            else:
                out500.append((d.data, tuple(d.remote)))
        if out500:
            self.counters["ike_out"] += self.udp500.send_batch(out500)
        if out4500:
            self.counters["ike_out"] += self.udp4500.send_batch(out4500)
            for _d, r in out4500:
                if r in self._nat_remotes:
                    self._tx4500[r] = now
        while True:
            ev = self.ike.next_event()
            if ev is None:
                break
            for obs in self.event_observers:
                try:
                    obs(ev, now)
                except Exception:
                    self.log.exception("event observer failed")
            if type(ev).__name__ in ("IkeSaEstablished", "IkeSaDeleted"):
                self._nat_dirty = True  # NAT-D results come and go with IKE_SAs
            handler = self._EVENTS.get(type(ev).__name__)
            if handler is None:
                self.log.debug("ignoring event %s", type(ev).__name__)
                continue
            try:
                handler(self, ev, now)
            except Exception:
                # One bad SA must not take the loop down; the event is logged without keys.
                self.log.exception("handling %s failed", type(ev).__name__)
        if self._nat_dirty:
            self._refresh_nat(now)

    def _peer_at(self, ip: str) -> str | None:
        for p in self.view.peers:
            if ip in p.endpoints:
                return p.name
        return None

    def _ev_ike_established(self, ev, now: float) -> None:
        self.log.info("IKE_SA %016x_i %016x_r with %s established (%s, %s)", ev.spi_i, ev.spi_r,
                      ev.peer, "initiator" if ev.initiator else "responder", ev.algorithms)

    def _ev_ike_keys(self, ev, now: float) -> None:
        if self.keylog is not None:
            self.keylog.ike_keys(ev)

    def _volume_kw(self, peer) -> tuple[dict, dict]:
        """SA constructor kwargs (inbound, outbound) for the policy's byte/packet lifetimes
        (RFC 4301 §4.4.2.1); empty without limits, so plain factories keep working. A value
        that is not a whole number >= 0 (a hand-edited stored view) is logged and ignored."""
        pol = peer.policy if peer is not None else None
        vals = []
        for key in ("child_lifetime_bytes", "child_lifetime_packets"):
            v = getattr(pol, key, 0) or 0
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                self.log.error("peer %s: policy %s %r is not a whole number >= 0; its CHILD_SAs get no such "
                               "limit (fix the policy)", peer.name, key, v)
                v = 0
            vals.append(v)
        lb, lp = vals
        if not (lb or lp):
            return {}, {}
        kw = {"lifetime_bytes": lb, "lifetime_packets": lp}
        return dict(kw, soft_fraction=SOFT_FRACTION_IN), dict(kw, soft_fraction=SOFT_FRACTION_OUT)

    def _ev_child_established(self, ev, now: float) -> None:
        peer = self.view.peer(ev.peer)
        window = peer.policy.replay_window if peer is not None else 1024
        mode = ev.mode
        is_ah = getattr(ev, "protocol", "esp") == "ah"  # Protocol ID of the chosen proposal (§3.3.1)
        kw_in, kw_out = self._volume_kw(peer)
        if is_ah:
            from agent.esp import AhSa
            # outbound tunnel mode is transport AH over our own IP-in-IP header (see _send_ah)
            in_sa = AhSa(ev.inbound, replay_window=window, mode=mode,
                         tunnel_src=ev.remote[0] if mode == "tunnel" else None,
                         tunnel_dst=self.local_address if mode == "tunnel" else None, **kw_in)
            out_sa = AhSa(ev.outbound, replay_window=window, mode="transport", **kw_out)
        else:
            in_sa = self.esp_factory(ev.inbound, rng=self.rng, replay_window=window, mode=mode, **kw_in)
            out_sa = self.esp_factory(ev.outbound, rng=self.rng, replay_window=window, mode=mode, **kw_out)
        ch = ChildEntry(peer=ev.peer, ike_spi_i=ev.ike_spi_i, ike_spi_r=ev.ike_spi_r,
                        inbound_spi=ev.inbound.spi, outbound_spi=ev.outbound.spi, in_sa=in_sa, out_sa=out_sa,
                        local_ts=tuple(ev.local_ts), remote_ts=tuple(ev.remote_ts), remote=tuple(ev.remote),
                        mode=mode, udp_encap=ev.udp_encap and not is_ah, algorithms=ev.algorithms,
                        established=now, established_wall=time.time(), protocol="ah" if is_ah else "esp",
                        needs_ah=not is_ah and peer is not None and getattr(peer.policy, "protocol", "") == "ah+esp",
                        narrow=selector_entries(ev.peer, mode, getattr(ev, "local_selectors", ()) or (),
                                                getattr(ev, "remote_selectors", ()) or ()))
        old = self.children.get(ch.inbound_spi)
        if old is not None:
            # IkeManager allocates inbound SPIs unique on this node (RFC 4301 §4.1): a clash is our
            # bug; keep the live CHILD_SA, do not install the new one
            self.counters["internal_errors"] += 1
            self.log.error("internal error: inbound SPI %08x of a new CHILD_SA with %s is already used by a "
                           "CHILD_SA with %s; the new CHILD_SA is not installed", ch.inbound_spi, ev.peer, old.peer)
            return
        if is_ah:
            self._ensure_raw_ah()
        elif not ev.udp_encap and self.raw_esp is None:
            self.log.warning("CHILD_SA with %s negotiated without UDP encapsulation but no raw ESP "
                             "socket is open: its packets are dropped (counter no_raw_socket)", ev.peer)
        vip = getattr(ev, "virtual_ip", None)
        if vip:  # case 4: the gateway gave us an inner address (CP CFG_REPLY): it is ours now
            self._local_ips.add(str(vip))
            if self.routes is not None:
                try:
                    self.routes.add_address(f"{vip}/{32 if ':' not in str(vip) else 128}")
                except Exception as exc:
                    self.log.error("cannot assign virtual IP %s: %s", vip, exc)
        if not is_ah:  # the SAD demultiplexes ESP; AH SAs are found by SPI in self.children
            self.sad.add_inbound(ch.peer, in_sa)
        if ev.rekey_of is not None and not getattr(ev, "exchange_initiator", True):
            ch.send_after = ev.rekey_of  # the peer may not have our new inbound SA yet
        self.children[ch.inbound_spi] = ch
        self._relink(ch.peer)  # newest SA sends; a rekeyed one keeps receiving until deleted
        self._rebuild_spd()
        self._sync_routes()
        if self.keylog is not None:
            self.keylog.child_sa(ev)  # ESP to esp_sa, AH to ah_sa
        self.log.info("CHILD_SA with %s established: spi in %08x out %08x, %s, %s -> %s%s", ev.peer,
                      ch.inbound_spi, ch.outbound_spi, ev.algorithms,
                      ",".join(map(str, ch.local_ts)), ",".join(map(str, ch.remote_ts)),
                      f" (rekey of {ev.rekey_of:08x})" if ev.rekey_of is not None else "")

    def _relink(self, peer: str) -> None:
        """The SAs that send to ``peer``: the newest ESP one (with the newest AH one outside it
        for "ah+esp"), or the newest AH one for an AH-only policy."""
        mine = [c for c in self.children.values() if c.peer == peer
                and (c.send_after is None or c.send_after not in self.children)]
        esp = max((c for c in mine if c.protocol == "esp"), key=lambda c: c.established, default=None)
        ah = max((c for c in mine if c.protocol == "ah"), key=lambda c: c.established, default=None)
        for c in mine:
            c.ah = None
        cur = esp or ah
        if esp is not None and esp.needs_ah:
            esp.ah = ah
        if cur is None:
            self.current.pop(peer, None)
            self.sad.remove_outbound(peer)
            return
        self.current[peer] = cur
        if cur.protocol == "esp":
            self.sad.set_outbound(peer, cur.out_sa)

    def _remove_child(self, ch: ChildEntry) -> None:
        if ch.protocol == "esp":
            self.sad.remove_inbound(ch.inbound_spi)
        self.children.pop(ch.inbound_spi, None)
        self._relink(ch.peer)
        self._rebuild_spd()
        self._sync_routes()

    def _ev_child_deleted(self, ev, now: float) -> None:
        ch = self.children.get(ev.inbound_spi)
        if ch is not None:
            self._remove_child(ch)
        self.log.info("CHILD_SA with %s deleted: spi in %08x out %08x (%s)", ev.peer,
                      ev.inbound_spi, ev.outbound_spi, ev.reason)

    def _ev_ike_deleted(self, ev, now: float) -> None:
        moved_to = getattr(ev, "rekeyed_to", None)
        for ch in [c for c in self.children.values() if (c.ike_spi_i, c.ike_spi_r) == (ev.spi_i, ev.spi_r)]:
            if moved_to is not None:  # IKE_SA rekey (RFC 7296 §1.3.2): the CHILD_SAs live on
                ch.ike_spi_i, ch.ike_spi_r = moved_to
            else:
                self._remove_child(ch)
        self.log.info("IKE_SA %016x_i %016x_r%s deleted (%s)", ev.spi_i, ev.spi_r,
                      f" with {ev.peer}" if ev.peer else "", ev.reason)

    def _ev_peer_address_changed(self, ev, now: float) -> None:
        # RFC 7296 §2.23 / RFC 3948: the peer's NAT mapping moved; its UDP-encapsulated CHILD_SAs follow
        moved = 0
        for ch in self.children.values():
            if (ch.ike_spi_i, ch.ike_spi_r) == (ev.ike_spi_i, ev.ike_spi_r) and ch.udp_encap:
                ch.remote = tuple(ev.remote)
                moved += 1
        self._nat_dirty = True
        self.log.info("peer %s (IKE_SA %016x_i %016x_r) now at %s:%d behind its NAT; %d CHILD_SA(s) follow",
                      ev.peer, ev.ike_spi_i, ev.ike_spi_r, ev.remote[0], ev.remote[1], moved)

    def _ev_peer_refused(self, ev, now: float) -> None:
        # policy data the IKE core cannot use (docs/ike-hardening.md): one warning per new problem
        self.log.warning("peer %s refused: %s (fix the policy; other peers are unaffected; "
                         "see meshsec status)", ev.peer, ev.reason)

    _EVENTS = {
        "PeerRefused": _ev_peer_refused,
        "IkeSaEstablished": _ev_ike_established,
        "IkeKeysDerived": _ev_ike_keys,
        "ChildSaEstablished": _ev_child_established,
        "ChildSaDeleted": _ev_child_deleted,
        "IkeSaDeleted": _ev_ike_deleted,
        "PeerAddressChanged": _ev_peer_address_changed,
    }

    # -- operator commands (control socket, loop thread) -------------------------
    def rekey_command(self, req: dict) -> dict:
        """``{"cmd": "rekey", "peer": NAME, "what": "child" | "ike"}``: start a CHILD_SA rekey
        (RFC 7296 §1.3.3) of every CHILD_SA that sends to ``peer`` (with "ah+esp", the ESP and
        the AH one), or an IKE_SA rekey (§1.3.2). Answers ``{"ok": true, "peer", "what",
        "spis": [inbound SPIs, hex]}`` once the CREATE_CHILD_SA request is sent (the new SA
        follows as ChildSaEstablished / IkeSaEstablished), else ``{"error": ...}`` saying why."""
        peer, what = req.get("peer"), req.get("what", "child")
        if not isinstance(peer, str) or self.view.peer(peer) is None:
            known = ", ".join(sorted(p.name for p in self.view.peers)) or "none"
            return {"error": f"rekey: unknown peer {peer!r}; known peers: {known}"}
        if what not in ("child", "ike"):
            return {"error": f"rekey: what={what!r}; use \"child\" or \"ike\""}
        now = self.clock()
        if what == "ike":
            ok = bool(self.ike.rekey_ike(peer, now))
            if not ok:
                return {"error": f"rekey: no established IKE_SA with {peer}, or one is already being rekeyed "
                                 "(see meshsec status)"}
            spis = [f"{s['spi_i']}_i" for s in self.ike.status()
                    if s.get("peer") == peer and s.get("state") == "ESTABLISHED"][:1]
        else:
            cur = self.current.get(peer)
            if cur is None:
                return {"error": f"rekey: no CHILD_SA with {peer} yet (see meshsec status)"}
            spis = []
            for ch in (cur, cur.ah):
                if ch is not None and self.ike.rekey_child(ch.inbound_spi, now):
                    spis.append(f"{ch.inbound_spi:08x}")
            if not spis:
                return {"error": f"rekey: the CHILD_SA with {peer} is already being rekeyed or its IKE_SA is "
                                 "busy; try again in a few seconds"}
        self._flush_ike(now)
        self.log.info("operator asked for a %s rekey with %s (%s)", "CHILD_SA" if what == "child" else "IKE_SA",
                      peer, ", ".join(spis))
        return {"ok": True, "peer": peer, "what": what, "spis": spis}

    # -- status ---------------------------------------------------------------
    def status(self) -> dict:
        """JSON-ready status: node, IKE_SAs, CHILD_SAs with counters, global drops. No keys."""
        now = self.clock()
        try:
            ike_sas = self.ike.status()
        except Exception as exc:
            ike_sas = [{"error": str(exc)}]
        for s in ike_sas:
            est = s.get("established")
            if isinstance(est, (int, float)) and not isinstance(est, bool):
                s["age_s"] = round(now - est, 3)  # "established" is on the runtime's monotonic clock
        children = [ch.status(now) for ch in sorted(self.children.values(), key=lambda c: (c.peer, c.established))]
        drops = {k: self.counters[k] for k in DROP_REASONS if self.counters[k]}
        for ch in children:
            for k, v in ch["drops"].items():
                if k != "policy":  # already in the global counter
                    drops[k] = drops.get(k, 0) + v
        ike_counters = dict(getattr(self.ike, "counters", {}) or {})
        spd = []
        for e in self.spd.entries:
            row = {"local": str(e.local) if e.local is not None else "any",
                   "remote": str(e.remote) if e.remote is not None else "any",
                   "action": e.action.value, "peer": e.peer, "mode": e.mode, "name": e.name,
                   "hits": self.spd_hits.get(e, 0), "bundle": []}
            vp = self.view.peer(e.peer) if e.peer else None
            row["rule"] = getattr(vp.policy, "rule", "") if vp is not None else ""  # controller policy rule
            for k in ("protocol", "local_ports", "remote_ports"):
                v = getattr(e, k, None)
                if v is not None:
                    row[k] = v if isinstance(v, (int, str)) else str(v)
            cur, seen = self.current.get(e.peer) if e.peer else None, set()
            while cur is not None and cur.peer not in seen:  # the SAs applied, innermost first
                seen.add(cur.peer)
                row["bundle"].append(f"{cur.peer}:{cur.describe}")
                cur = self.current.get(cur.via) if cur.via else None
            row["bundle"] = " -> ".join(row["bundle"]) or ("-" if e.action is not Action.PROTECT else "no SA yet")
            spd.append(row)
        return {
            "spd": spd, "tun_mtu": self.tun_mtu, "underlay_mtu": self.underlay_mtu,
            "node": self.view.name, "view_version": self.view.version, "local_address": self.local_address,
            "tun": getattr(self.tun, "name", None), "uptime_s": round(time.time() - self.started_wall, 3),
            "ike_sas": ike_sas, "child_sas": children,
            "drops": drops, "ike_drops": {k: v for k, v in ike_counters.items() if v},
            "counters": dict(self.counters),
            # controller mode: IKE requests that came before the first view (peers retransmit)
            "before_first_view": {"ike_dropped": self.counters[BEFORE_FIRST_VIEW]},
            "view_source": self.view_source,
            "policy_errors": dict(getattr(self.ike, "policy_errors", {}) or {}),
            "internal_errors": self.counters["internal_errors"],
            "route_carve_outs": sorted(getattr(self.routes, "carve_outs", ()) or ()),
        }
