"""IkeManager: every IKE_SA of this node, demultiplexed by SPI (sans-I/O).

docs/design.md "agent.ike.manager.IkeManager". The runtime feeds datagrams
(without the non-ESP marker) and timer ticks; it drains datagrams and events.
``receive_datagram`` never raises: every dropped datagram is counted in
``counters`` by reason. Pure module: no I/O.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from typing import Callable

from agent.iana import NotifyType
from agent.ike.admission import (HALF_OPEN_BYTES_MAX, INIT_RATE, MAX_INIT_LEN, Admission, RefusalTally, TokenBucket,
                                 new_init_header)
from agent.ike.bookkeeping import Bookkeeping
from agent.ike.cookie import CookieJar
from agent.ike.errors import DeleteReason, Drop
from agent.ike.events import Addr, Event, PeerRefused
from agent.ike.fragment import DEFAULT_FRAGMENT_SIZE
from agent.ike.joining import REPLACE_WAIT_S, Joining
from agent.ike.lost_state import LostState
from agent.ike.message import MessageError, MessageLimitError, check_outer, decode_message
from agent.ike.pad import PeerIndex
from agent.ike.policy_check import ike_proposal_problem, policy_problem
from agent.ike.predecode import route
from agent.ike.sa import HALF_OPEN_TIMEOUT_S, IKE_PORT, Datagram, IkeSa, IkeSaConfig, State
from agent.ike.timers import REINITIATE_AUTH_BASE_S, REINITIATE_BASE_S, REINITIATE_MAX_S, Timers
from agent.ike.vip import VipPools
from agent.model import DEFAULT_IKE_PROPOSALS, Credentials, NodeView, Peer

COOKIE_THRESHOLD = 50  # half-open IKE_SAs above which IKE_SA_INIT needs a COOKIE (§2.6)
HALF_OPEN_PER_SOURCE = 20  # half-open IKE_SAs one source address may hold
HALF_OPEN_MAX = 512  # half-open IKE_SAs in all; beyond, the oldest is dropped for the new one
HALF_OPEN_PRESSURE_TIMEOUT_S = 6.0  # half-open lifetime while in COOKIE mode (IKE_AUTH + 2 retransmissions)
_RATE_TABLE_MAX = 4096  # rate-limit tables are pruned beyond this many addresses


class _ViewIndex:
    """Per-view lookups of IkeManager (rebuilt when the view object changes): PROTECT peers by
    endpoint IP (view order) and by IKE identity (the PAD, agent.ike.pad.PeerIndex), and the
    responder's (proposals, force_encap) once computed."""

    def __init__(self, view: NodeView) -> None:
        self.view = view
        self.endpoints: dict[str, list[Peer]] = {}
        self.pad = PeerIndex(view.peers)
        self.responder: tuple[tuple[str, ...], bool] | None = None
        for p in view.peers:
            if p.policy.action != "protect":
                continue
            for ep in dict.fromkeys(p.endpoints):
                self.endpoints.setdefault(ep, []).append(p)


class IkeManager:
    """All IKE_SAs of one node.

    ``IkeManager(view, credentials, rng, *, local_address)``; see the module
    docstring and docs/design.md for the methods. Addresses are (ip, port).
    """

    def __init__(self, view: NodeView, credentials: Credentials, rng: Callable[[int], bytes], *,
                 local_address: str, wall_offset: float = 0.0, cookie_threshold: int = COOKIE_THRESHOLD,
                 cookie_rotate_s: float = 120.0, half_open_timeout_s: float = HALF_OPEN_TIMEOUT_S,
                 half_open_per_source: int = HALF_OPEN_PER_SOURCE, half_open_max: int = HALF_OPEN_MAX,
                 half_open_pressure_timeout_s: float = HALF_OPEN_PRESSURE_TIMEOUT_S, init_rate: float = INIT_RATE,
                 init_burst: float | None = None, half_open_bytes_max: int = HALF_OPEN_BYTES_MAX,
                 init_max_len: int = MAX_INIT_LEN):
        # ``half_open_timeout_s``: a responder IKE_SA not ESTABLISHED this long after its
        # IKE_SA_INIT is dropped (strongSwan's half_open_timeout); ``half_open_per_source``:
        # IKE_SA_INITs from one address beyond this many half-open IKE_SAs are dropped (counted);
        # ``half_open_max``: at this many half-open IKE_SAs in all, a new one replaces the oldest
        # (counted "half_open_evicted"); ``half_open_pressure_timeout_s``: the lifetime of half-open
        # IKE_SAs made while in COOKIE mode (under pressure they must finish IKE_AUTH sooner).
        # ``cookie_threshold``: with this many half-open IKE_SAs, answer IKE_SA_INIT without a
        # valid cookie statelessly with N(COOKIE) (§2.6); ``cookie_rotate_s``: secret lifetime.
        # ``init_rate`` (per second, burst ``init_burst``, default one second's worth; 0: off): new
        # IKE_SA_INITs beyond it need a COOKIE too, refused ones included (they leave no half-open
        # IKE_SA); ``half_open_bytes_max``: octets of half-open state in all (a new or growing one
        # drops the oldest beyond it; COOKIE mode from half of it); ``init_max_len``: a longer
        # IKE_SA_INIT request is refused with INVALID_SYNTAX before it is decoded.
        # ``wall_offset``: Unix time minus the ``now`` clock, for certificate validity (RFC 5280
        # times are calendar times, timers run on a monotonic clock); the shell keeps it current.
        self.wall_offset = wall_offset
        self.view = view
        self.credentials = credentials
        self.rng = rng
        self.local_address = local_address
        self.counters: dict[str, int] = {}
        self._sas: dict[int, IkeSa] = {}  # by our SPI
        self._recent_child_spis: deque = deque(maxlen=256)
        # responder: (remote ip, SPIi), oldest first (an OrderedDict: the oldest is found in O(1))
        self._half_open: OrderedDict[tuple[str, int], IkeSa] = OrderedDict()
        self._half_open_key: dict[int, tuple[str, int]] = {}  # our SPI -> its _half_open key
        self._half_open_by_ip: dict[str, int] = {}
        self._inits_done: dict[tuple[str, int], None] = {}  # (remote ip, SPIi) established as responder
        self.half_open_timeout_s = half_open_timeout_s
        self.half_open_per_source = half_open_per_source
        self.half_open_max = max(1, half_open_max)
        self.half_open_pressure_timeout_s = min(half_open_pressure_timeout_s, half_open_timeout_s)
        self._view_index: _ViewIndex | None = None
        # deadlines: a heap of (when, seq, key) with lazy deletion; key is our SPI or ("retry", peer)
        self._heap: list[tuple[float, int, object]] = []
        self._deadline: dict[int, float] = {}  # our SPI -> deadline in the heap
        self._seq = itertools.count()
        self._by_peer: dict[str, set[int]] = {}  # peer name -> our SPIs of its live IKE_SAs
        self._hold: dict[str, float] = {}  # peer -> no new initiation before (backoff after failures)
        self._revoked: frozenset[int] = frozenset(getattr(view, "revoked_serials", ()) or ())
        self.policy_errors: dict[str, str] = {}  # peer -> why we refuse to negotiate with it
        # peer -> its last IKE_SA failure or CHILD_SA refusal (until a CHILD_SA with it is up)
        self.last_errors: dict[str, str] = {}
        self._policy_cache: dict[str, tuple[object, str | None]] = {}
        self._ike_prop_ok: dict[str, str | None] = {}
        self._invalid_spi_sent: dict[str, float] = {}
        self._hinted: dict[str, float] = {}
        self._esp_invalid_spi_sent: dict[str, float] = {}
        self._out: list[Datagram] = []
        self._events: deque[Event] = deque()
        self._retry: dict[str, float] = {}  # peer -> re-initiation deadline
        self._replace_by: dict[str, float] = {}  # peer -> old IKE_SAs deleted then unless replaced before
        self._backoff: dict[str, float] = {}  # peer -> last re-initiation delay
        self._contacted: set[str] = set()
        self._shutdown = False
        self.cookie_threshold = cookie_threshold
        self._cookies = CookieJar(rng, cookie_rotate_s)
        self._init_bucket = TokenBucket(init_rate, init_burst)
        self.half_open_bytes_max = max(1, half_open_bytes_max)
        self.init_max_len = init_max_len
        self._ho_cost: dict[int, int] = {}  # our SPI -> octets charged for that half-open IKE_SA
        self._ho_bytes = 0
        self._refusals = RefusalTally()
        self._refusal_timer: float | None = None
        self._ho_drops, self._ho_drop_timer = RefusalTally(), None  # dropped half-open IKE_SAs (HalfOpenDropped)
        self._pools: dict = {}  # virtual_ip_pool string -> [AddressPool]
        # the parts, each in its module; they keep their state here (tables tests and status read)
        self._admission = Admission(self)
        self._timers = Timers(self)
        self._lost = LostState(self)
        self._joining = Joining(self)
        self._books = Bookkeeping(self)
        self._vip = VipPools(self)

    # ------------------------------------------------------------ helpers
    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def _find_peer(self, identity: str) -> Peer | None:
        """PAD lookup (RFC 4301 §4.4.3): the configured peer with this IKE identity.
        A peer whose policy is BYPASS or DISCARD has no PAD entry: it may not
        negotiate SAs with us."""
        return self._index().pad.find(identity)

    def _index(self) -> _ViewIndex:
        """Lookups by endpoint and identity, and the responder's proposals, for the current
        view: built once per view, because unauthenticated datagrams ask them (O(1) each)."""
        ix = self._view_index
        if ix is None or ix.view is not self.view:
            ix = self._view_index = _ViewIndex(self.view)
        return ix

    def _responder_config(self) -> IkeSaConfig:
        ix = self._index()
        if ix.responder is None:  # once per view, not per IKE_SA_INIT (O(peers x proposals))
            props: list[str] = []
            for p in self.view.peers:
                for s in p.policy.ike_proposals:
                    if s in props:
                        continue
                    if s not in self._ike_prop_ok:
                        self._ike_prop_ok[s] = ike_proposal_problem(s)
                    if self._ike_prop_ok[s] is None:
                        props.append(s)
                    else:  # one peer's typo must not refuse every initiator
                        self._policy_problem(p)
            ix.responder = (tuple(props) or DEFAULT_IKE_PROPOSALS,
                            any(p.policy.encapsulation == "udp" for p in self.view.peers))
        props, force_encap = ix.responder
        return IkeSaConfig(
            identity=self.view.identity, credentials=self.credentials, local_subnets=self.view.subnets,
            ike_proposals=props, peer=None, find_peer=self._find_peer,
            force_encap=force_encap,
            wall_offset=lambda: self.wall_offset, assign_vip=self._assign_vip,
            half_open_timeout_s=self.half_open_timeout_s, revoked=lambda: self._revoked,
            policy_problem=self._policy_problem, new_child_spi=self._new_child_spi)

    def _peers_at(self, ip: str) -> list[Peer]:
        """PROTECT peers with endpoint ``ip``, in view order: O(1) (an index rebuilt per view)
        because unauthenticated hints from any source address ask it."""
        return self._index().endpoints.get(ip, [])

    def _child_spis_in_use(self) -> set[int]:
        """Inbound CHILD_SA SPIs of every IKE_SA of this node, rekeyed and half-open ones included:
        installed CHILD_SAs, SPIs offered in IKE_AUTH / CREATE_CHILD_SA requests, and the last
        SPIs handed out (a responder's SPI before its IKE_FOLLOWUP_KE completes)."""
        used = set(self._recent_child_spis)
        for sa in list(self._sas.values()):
            for s in (sa, *sa.spawned, *([sa._successor] if sa._successor is not None else [])):
                used.update(c.inbound_spi for c in s.children)
                used.update(t.spi for t in s._child_tasks)
                used.add(s._child_spi)
        return used

    def _new_child_spi(self) -> int:
        """A fresh inbound SPI (ESP and AH share it: the datapath finds SAs by SPI), unique on
        this node (RFC 4301 §4.1); 1-255 are reserved (RFC 4303 §2.1)."""
        used = self._child_spis_in_use()
        for _ in range(1000):  # a working rng needs one draw; a stuck one must not hang the loop
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 256 and spi not in used:
                self._recent_child_spis.append(spi)
                return spi
        raise RuntimeError("the random source gave no free SPI in 1000 draws: it is broken")

    def _policy_problem(self, peer: Peer) -> str | None:
        """policy_check.policy_problem, cached per policy; a new problem is counted, kept in
        ``policy_errors`` and reported once as a PeerRefused event."""
        cached = self._policy_cache.get(peer.name)
        if cached is not None and cached[0] == peer.policy:
            problem = cached[1]
        else:
            problem = policy_problem(peer)
            self._policy_cache[peer.name] = (peer.policy, problem)
            if problem is not None:
                self._events.append(PeerRefused(peer.name, problem))
        if problem is None:
            self.policy_errors.pop(peer.name, None)
        else:
            self.policy_errors[peer.name] = problem
            self._count("bad_policy")
        return problem

    def _live(self):
        return [sa for sa in self._sas.values() if not sa.is_dead]

    def _sas_of(self, peer: str) -> list[IkeSa]:
        return [sa for sa in (self._sas.get(k) for k in self._by_peer.get(peer, ())) if sa is not None
                and not sa.is_dead and sa.peer_name == peer]

    @staticmethod
    def _rate_ok(table: dict[str, float], key: str, now: float, interval: float) -> bool:
        """True (and noted) if ``key`` was not let through in the last ``interval`` seconds."""
        last = table.get(key)
        if last is not None and now - last < interval:
            return False
        if len(table) >= _RATE_TABLE_MAX:
            for k in [k for k, t in table.items() if now - t >= interval]:
                del table[k]
            if len(table) >= _RATE_TABLE_MAX:
                table.clear()
        table[key] = now
        return True

    # ------------------------------------------------------------ API
    def update_view(self, view: NodeView, now: float) -> None:
        """New view: IKE_SAs of peers no longer in it are deleted; its ``revoked_serials``
        are applied as by set_revoked_serials."""
        names = {p.name for p in view.peers}
        old_policy = {p.name: p.policy for p in self.view.peers}
        new_policy = {p.name: p.policy for p in view.peers}
        brought = self._joining.brought(self.view, view)
        self.view = view
        for sa in self._live():
            if sa.peer_name and sa.peer_name not in names:
                sa.delete(now, "peer removed from view")
                self._collect(sa, now)
            elif sa.peer_name and old_policy.get(sa.peer_name) != new_policy.get(sa.peer_name):
                # the SAs were negotiated under the old policy (RFC 4301 §4.4.1: SAs must
                # match the SPD): delete them; a peer still to PROTECT is set up again
                pol = new_policy[sa.peer_name]
                why = (f"policy changed (now {pol.action}"
                       f"{'' if pol.action != 'protect' else f', {pol.protocol}/{pol.mode}'})")
                if self._joining.make_before_break(sa, view, why, now):
                    continue
                sa.delete(now, why, DeleteReason.RECONFIGURED)
                self._collect(sa, now)
        for name in list(self._retry):
            if name not in names:
                del self._retry[name]
        for d in (self._hold, self._backoff, self.policy_errors, self._policy_cache, self.last_errors):
            for name in [k for k in d if k not in names]:
                del d[name]
        for p in view.peers:  # a corrected policy clears its error (and a new one is reported)
            if p.name in self.policy_errors:
                self._policy_problem(p)
        revoked = frozenset(getattr(view, "revoked_serials", ()) or ())
        if revoked != self._revoked:  # NodeView.revoked_serials from the controller
            self.set_revoked_serials(revoked, now)
        if brought:
            self._joining.restart_pending(brought, now)
            self.join(now, brought)

    # ------------------------------------------------------------ joining (issue 9): agent.ike.joining
    def join(self, now: float, names=None) -> list[str]:
        """Open an IKE_SA to each of these peers (all by default) we may start to, also where the
        tie-break leaves it to the peer (agent start, a view that brings peers). Returns the
        peers initiated to. See Joining.join."""
        return self._joining.join(now, names)

    def _supersede_own_init(self, remote_ip: str, now: float) -> None:
        # a method of its own so that tests can switch the rule off (Joining.supersede_own_init)
        self._joining.supersede_own_init(remote_ip, now)

    def _resolve_duplicates(self, sa: IkeSa, peer: str, now: float) -> None:
        # likewise (Joining.resolve_duplicates)
        self._joining.resolve_duplicates(sa, peer, now)

    def update_credentials(self, credentials: Credentials, now: float) -> None:
        """New credentials (e.g. a renewed certificate or new trust anchors): every IKE_SA set up
        from now on uses them; established IKE_SAs stay (they were authenticated already)."""
        self.credentials = credentials

    def set_revoked_serials(self, serials: frozenset[int], now: float) -> None:
        """PAD revocation list (RFC 4301 §4.4.3): serial numbers of peer certificates issued by
        our CA that may no longer authenticate. IKE_AUTH with such a certificate fails, and
        IKE_SAs authenticated with one are deleted now (INFORMATIONAL delete, §1.4.1)."""
        self._revoked = frozenset(int(s) for s in serials)
        for sa in self._live():
            serial = getattr(sa, "peer_cert_serial", None)
            if serial is not None and serial in self._revoked:
                self._count("revoked_peer")
                sa.delete(now, f"peer certificate revoked (serial {serial})", DeleteReason.REFUSED)
                self._collect(sa, now)

    def initiate(self, peer_name: str, now: float, *, replace: bool = False) -> None:
        """Start IKE_SA_INIT with ``peer_name`` unless an IKE_SA with it exists or is being set up.
        ``replace``: an IKE_SA under a changed policy that replaces the established ones (make
        before break): started beside them, with INITIAL_CONTACT.

        Raises ValueError for an unknown peer or one without endpoints (a configuration error).
        """
        peer = self.view.peer(peer_name)
        if peer is None:
            raise ValueError(f"initiate: unknown peer {peer_name!r}")
        if not peer.endpoints:
            raise ValueError(f"initiate: peer {peer_name!r} has no endpoint")
        if self._shutdown or (self._sas_of(peer_name) if not replace else any(
                s.state != State.ESTABLISHED for s in self._sas_of(peer_name))):
            self._retry.pop(peer_name, None)
            return
        if any(ep in self._half_open_by_ip for ep in peer.endpoints):
            # the peer is initiating to us right now (its IKE_SA_INIT is answered, IKE_AUTH is
            # due): a second exchange of ours would only make a duplicate IKE_SA
            self._count("initiate_peer_negotiating")
            return
        if peer.policy.action != "protect":  # BYPASS / DISCARD: no SAs with this peer (RFC 4301 §4.4.1)
            self._retry.pop(peer_name, None)
            self._count("initiate_not_protect")
            return
        hold = self._hold.get(peer_name)
        if hold is not None and now < hold:
            # re-initiation backoff after a failure: an acquire must not start a new exchange
            self._count("initiate_backoff")
            return
        if self._policy_problem(peer) is not None:
            self._retry.pop(peer_name, None)
            return
        self._retry.pop(peer_name, None)
        cfg = IkeSaConfig(
            identity=self.view.identity, credentials=self.credentials, local_subnets=self.view.subnets,
            ike_proposals=peer.policy.ike_proposals, peer=peer, find_peer=self._find_peer,
            force_encap=peer.policy.encapsulation == "udp",
            initial_contact=replace or peer_name not in self._contacted,
            wall_offset=lambda: self.wall_offset, assign_vip=self._assign_vip,
            fragment_size=getattr(peer.policy, "fragment_size", DEFAULT_FRAGMENT_SIZE),
            half_open_timeout_s=self.half_open_timeout_s, revoked=lambda: self._revoked,
            policy_problem=self._policy_problem, new_child_spi=self._new_child_spi)
        sa = IkeSa.new_initiator(cfg, self.rng, (self.local_address, IKE_PORT),
                                 (peer.endpoints[0], peer.ike_port), now)
        if replace:
            sa._replacement = True
        self._sas[sa.my_spi] = sa
        sa.initiate(now)
        self._collect(sa, now)

    def receive_datagram(self, data: bytes, local: Addr, remote: Addr, now: float) -> None:
        """One UDP payload (non-ESP marker already removed). Never raises; drops are counted."""
        try:
            self._receive(bytes(data), local, remote, now)
        except Exception:  # last line of defence: a bug must not kill the packet loop
            self._count("internal_error")

    def _receive(self, data: bytes, local: Addr, remote: Addr, now: float) -> None:
        h = new_init_header(data)  # a new IKE_SA_INIT request: admission first (docs/ike-hardening.md)
        sa = None
        if h is not None:
            if len(data) > self.init_max_len:  # before anything is read or kept (IKE_SA_INIT is never fragmented)
                self._admission.refuse_init(h.spi_i, "too_large", NotifyType.INVALID_SYNTAX, local, remote, now)
                return
            if self._admission.needs_cookie(h, data, local, remote, now):
                return  # answered (or dropped) statelessly before decoding the rest (§2.6)
        else:  # the IKE_SA from the header (SPIs, flags, Message ID) before any payload is decoded
            hdr, sa, drop = route(self._sas, data)
            if drop:
                self._count(drop)
                if drop == Drop.UNKNOWN_SPI:
                    self._lost.answer_unknown_spi(hdr, local, remote, now)
                return
            if sa is None and not (self._sas.get(hdr.spi_i) or self._sas.get(hdr.spi_r) or self._peers_at(remote[0])):
                self._count("unsolicited_notify")  # a hint about nothing of ours: not worth decoding
                return
        try:
            msg = decode_message(data)
        except MessageLimitError as e:
            if h is None:
                self._count("payload_limit")
            else:  # §2.21.1: refused statelessly; over an SA count limit nothing could be chosen
                self._admission.refuse_init(h.spi_i, f"too_many_{e.kind}",
                                            NotifyType.INVALID_SYNTAX if e.kind == "payloads"
                                  else NotifyType.NO_PROPOSAL_CHOSEN, local, remote, now)
            return
        except MessageError:
            self._count("malformed")
            return
        if h is None and sa is None:  # route() let it through as N(...) only, unprotected
            self._lost.unprotected_notify(msg, remote, now)  # never answered: it may be spoofed
            return
        try:
            check_outer(msg)
        except MessageError:
            self._count("unexpected_payload")
            return
        if sa is None:
            sa = self._admission.init_request(msg, data, local, remote, now)
            if sa is None:
                return
        reason = sa.receive(msg, data, local, remote, now)
        if reason:
            self._count(reason)
        self._collect(sa, now)

    # ------------------------------------------------------------ admission (§2.6): agent.ike.admission
    def half_open(self) -> int:
        """Number of responder IKE_SAs not ESTABLISHED yet (each expires after
        ``half_open_timeout_s``); O(1)."""
        return len(self._half_open)

    def half_open_bytes(self) -> int:
        """Octets charged for half-open IKE_SAs (HALF_OPEN_BASE_BYTES each plus their IKE_SA_INIT
        request and response and RFC 7383 reassembly buffers); O(1)."""
        return self._ho_bytes

    # ------------------------------------------------------------ lost state (§2.21.4, §1.5): agent.ike.lost_state
    def hint_unknown_spi(self, remote_addr, now: float, spi: bytes = b"") -> str:
        """The datapath received ESP (or AH) with an SPI it does not know from ``remote_addr`` (an
        IP string or (ip, port)); ``spi``: that SPI (4 octets), for the unprotected N(INVALID_SPI)
        of §1.5. Returns "initiated", "liveness_check", "in_progress", "held", "rate_limited" or
        "unknown_address"; never raises. See LostState.hint_unknown_spi."""
        return self._lost.hint_unknown_spi(remote_addr, now, spi)

    # ------------------------------------------------------------ CP address pools (§3.15): agent.ike.vip
    def _assign_vip(self, peer: Peer, versions: tuple) -> list | None:
        return self._vip.assign_vip(peer, versions)

    def leases(self) -> dict[str, dict[str, str]]:
        """Virtual IPs handed out, per pool string: {pool: {identity: address}}."""
        return self._vip.leases()

    # ------------------------------------------------------------ rekeys (§1.3)
    def _sa_of_child(self, inbound_spi: int) -> IkeSa | None:
        for sa in self._live():
            if any(c.inbound_spi == inbound_spi for c in sa.children):
                return sa
        return None

    # ------------------------------------------------------------ liveness (§2.4)
    def note_inbound(self, peers_or_spis, now: float) -> None:
        """Authenticated ESP/AH arrived at ``now`` for these: peer names (a name, or an iterable
        of names: all their IKE_SAs) and/or IKE_SAs as (SPIi, SPIr) pairs (the IKE_SA whose
        CHILD_SA authenticated it). Those IKE_SAs start a liveness check only ``dpd_interval``
        after the last such packet or IKE message, not after the last IKE message alone (§2.4).
        Called per inbound batch; O(items) and no heap work: a deadline that moved is found when
        its old one fires. Unknown names or SPIs are ignored; never raises."""
        if isinstance(peers_or_spis, str):
            peers_or_spis = (peers_or_spis,)
        sas, by_peer = self._sas, self._by_peer
        for item in peers_or_spis:
            if isinstance(item, tuple):
                if len(item) != 2:
                    continue
                sa = sas.get(item[0]) or sas.get(item[1])
                if sa is not None and (sa.spi_i, sa.spi_r) == item:
                    sa.note_inbound(now)
                continue
            for spi in by_peer.get(item, ()):
                sa = sas.get(spi)
                if sa is not None:
                    sa.note_inbound(now)

    def rekey_child(self, inbound_spi: int, now: float) -> bool:
        """Rekey the CHILD_SA with this inbound SPI (e.g. its ESP sequence numbers run out).
        Returns False if no IKE_SA has it or it is already being rekeyed; never raises."""
        sa = self._sa_of_child(inbound_spi)
        if sa is None:
            return False
        ok = sa.rekey_child(inbound_spi, now)
        self._collect(sa, now)
        return ok

    def delete_child(self, inbound_spi: int, now: float, reason: str = "deleted locally") -> bool:
        """Delete the CHILD_SA with this inbound SPI: HDR, SK {D(ESP|AH, SPI)} --> (RFC 7296
        §1.4.1), so the peer removes its side too; ``ChildSaDeleted(reason)`` follows at once.
        Used at a hard byte/packet lifetime (RFC 4301 §4.4.2.1). Returns False if no
        established IKE_SA has it (nothing sent); never raises."""
        sa = self._sa_of_child(inbound_spi)
        if sa is None or sa.state != State.ESTABLISHED:
            return False
        sa.delete_child(inbound_spi, now, reason=reason, at_once=True)  # callers: hard lifetime, ChildSaDeleted now
        self._collect(sa, now)
        return True

    def follow_peer(self, inbound_spi: int, remote: tuple, now: float) -> bool:
        """ESP that authenticated on the CHILD_SA with this inbound SPI came from ``remote``
        (ip, port), not from the IKE_SA's peer address: its NAT mapping moved. The IKE_SA
        follows by the rule it applies to its own authenticated messages (RFC 7296 §2.23:
        only a peer behind a NAT, and never against PAD ``bind_endpoints``); when it moves,
        a PeerAddressChanged event moves the UDP-encapsulated CHILD_SAs too. Returns whether
        it moved; never raises."""
        sa = self._sa_of_child(inbound_spi)
        if sa is None or sa.state != State.ESTABLISHED:
            return False
        before = tuple(sa.remote)
        sa._follow_nat(tuple(remote))
        if tuple(sa.remote) == before:
            return False
        self._collect(sa, now)
        return True

    def rekey_ike(self, peer_name: str, now: float) -> bool:
        """Rekey the established IKE_SA with ``peer_name`` (§1.3.2). False if there is none."""
        for sa in self._sas_of(peer_name):
            if sa.state == State.ESTABLISHED and sa.rekey_ike(now):
                self._collect(sa, now)
                return True
        return False

    def create_child(self, peer_name: str, now: float, local_ts=None, remote_ts=None) -> bool:
        """An additional CHILD_SA with ``peer_name`` (§1.3.1). False without an established IKE_SA."""
        for sa in self._sas_of(peer_name):
            if sa.state == State.ESTABLISHED and sa.create_child(now, local_ts, remote_ts):
                self._collect(sa, now)
                return True
        return False

    # ------------------------------------------------------------ deadlines: agent.ike.timers
    def handle_timer(self, now: float) -> None:
        """Run every deadline that has passed: IKE_SA timers, re-initiations, make-before-break
        waits, the refused-IKE_SA_INIT summary. O(k log n) for k due deadlines."""
        self._timers.handle_timer(now)

    def get_timer(self) -> float | None:
        """Earliest deadline (amortised O(log n)), None when there is none."""
        return self._timers.get_timer()

    def timer_entries(self) -> int:
        """Entries in the deadline heap (live and stale): bounded by a constant times the
        number of IKE_SAs plus pending re-initiations."""
        return self._timers.timer_entries()

    def datagrams_to_send(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def delete_all(self, now: float) -> None:
        """INFORMATIONAL delete for every IKE_SA (shutdown); no re-initiation afterwards."""
        self._shutdown = True
        self._retry.clear()
        self._hold.clear()
        for sa in list(self._sas.values()):
            sa.delete(now, "shutdown")
            self._collect(sa, now)

    def status(self) -> list[dict]:
        """JSON-ready list of IKE_SAs (no keys); each has ``created`` / ``established``
        (seconds on the ``now`` clock, see IkeSa.status) and ``last_error``: the peer's last
        IKE_SA failure or CHILD_SA refusal (``last_errors``), None once a CHILD_SA with it is up."""
        rows = [sa.status() for sa in self._live()]
        for row in rows:
            row["last_error"] = self.last_errors.get(row.get("peer") or "")
        return rows

    # ------------------------------------------------------------ bookkeeping: agent.ike.bookkeeping
    def _collect(self, sa: IkeSa, now: float) -> None:
        """Take what ``sa`` produced (datagrams, events, drops, rekeyed IKE_SAs) and keep the
        tables and deadlines current; after every step of every IKE_SA."""
        self._books.collect(sa, now)


__all__ = ["IkeManager", "Datagram", "REPLACE_WAIT_S", "REINITIATE_BASE_S", "REINITIATE_AUTH_BASE_S",
           "REINITIATE_MAX_S"]
