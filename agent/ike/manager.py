"""IkeManager: every IKE_SA of this node, demultiplexed by SPI (sans-I/O).

docs/design.md "agent.ike.manager.IkeManager". The runtime feeds datagrams
(without the non-ESP marker) and timer ticks; it drains datagrams and events.
``receive_datagram`` never raises: every dropped datagram is counted in
``counters`` by reason. Pure module: no I/O.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from typing import Callable

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike import auth
from agent.ike.cookie import CookieJar
from agent.ike.fragment import DEFAULT_FRAGMENT_SIZE
from agent.ike.cp import AddressPool
from agent.ike.errors import AUTH_BACKOFF, NO_RETRY, DeleteReason
from agent.ike.pad import PeerIndex
from agent.ike.events import (Addr, ChildSaEstablished, ChildSaRefused, Event, IkeSaDeleted, IkeSaEstablished,
                              PeerRefused)
from agent.ike.message import (HEADER_LEN, EncryptedFragmentPayload, EncryptedPayload, Message, MessageError,
                               MessageLimitError, NotifyPayload, check_outer, decode_header, decode_message,
                               encode_message, scan_payloads)
from agent.ike.policy_check import ike_proposal_problem, policy_problem
from agent.ike.sa import HALF_OPEN_TIMEOUT_S, IKE_PORT, Datagram, IkeSa, IkeSaConfig, State
from agent.model import DEFAULT_IKE_PROPOSALS, Credentials, NodeView, Peer

REINITIATE_BASE_S = 2.0
REINITIATE_AUTH_BASE_S = 8.0  # first delay after an authentication failure (a config problem)
REINITIATE_MAX_S = 120.0
COOKIE_THRESHOLD = 50  # half-open IKE_SAs above which IKE_SA_INIT needs a COOKIE (§2.6)
HALF_OPEN_PER_SOURCE = 20  # half-open IKE_SAs one source address may hold
HALF_OPEN_MAX = 512  # half-open IKE_SAs in all; beyond, the oldest is dropped for the new one
HALF_OPEN_PRESSURE_TIMEOUT_S = 6.0  # half-open lifetime while in COOKIE mode (IKE_AUTH + 2 retransmissions)
INVALID_IKE_SPI_INTERVAL_S = 1.0  # at most one unprotected INVALID_IKE_SPI per source per interval
HINT_INTERVAL_S = 5.0  # unknown-SPI hints acted on at most once per address per interval
INVALID_SPI_INTERVAL_S = 2.0  # at most one unprotected N(INVALID_SPI) per source address per interval
_RATE_TABLE_MAX = 4096  # rate-limit tables are pruned beyond this many addresses
REPLACE_WAIT_S = 10.0  # make before break: the side that does not initiate waits this long for the new IKE_SA
_INITS_DONE_MAX = 1024  # established responder IKE_SAs whose IKE_SA_INIT retransmissions are ignored

# reasons after which we do not re-initiate


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


def _cookie_of(data: bytes, first: tuple[int, int, int]) -> bytes | None:
    """The data of N(COOKIE) if it is the first payload (``first`` from scan_payloads), else None."""
    ptype, a, b = first
    if ptype != PayloadType.NOTIFY or b - a < 4:
        return None
    spi_size = data[a + 1]
    if int.from_bytes(data[a + 2:a + 4], "big") != NotifyType.COOKIE or a + 4 + spi_size > b:
        return None
    return bytes(data[a + 4 + spi_size:b])


class IkeManager:
    """All IKE_SAs of one node.

    ``IkeManager(view, credentials, rng, *, local_address)``; see the module
    docstring and docs/design.md for the methods. Addresses are (ip, port).
    """

    def __init__(self, view: NodeView, credentials: Credentials, rng: Callable[[int], bytes], *,
                 local_address: str, wall_offset: float = 0.0, cookie_threshold: int = COOKIE_THRESHOLD,
                 cookie_rotate_s: float = 120.0, half_open_timeout_s: float = HALF_OPEN_TIMEOUT_S,
                 half_open_per_source: int = HALF_OPEN_PER_SOURCE, half_open_max: int = HALF_OPEN_MAX,
                 half_open_pressure_timeout_s: float = HALF_OPEN_PRESSURE_TIMEOUT_S):
        # ``half_open_timeout_s``: a responder IKE_SA not ESTABLISHED this long after its
        # IKE_SA_INIT is dropped (strongSwan's half_open_timeout); ``half_open_per_source``:
        # IKE_SA_INITs from one address beyond this many half-open IKE_SAs are dropped (counted);
        # ``half_open_max``: at this many half-open IKE_SAs in all, a new one replaces the oldest
        # (counted "half_open_evicted"); ``half_open_pressure_timeout_s``: the lifetime of half-open
        # IKE_SAs made while in COOKIE mode (under pressure they must finish IKE_AUTH sooner).
        # ``cookie_threshold``: with this many half-open IKE_SAs, answer IKE_SA_INIT without a
        # valid cookie statelessly with N(COOKIE) (§2.6); ``cookie_rotate_s``: secret lifetime.
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
        self._pools: dict[str, list[AddressPool]] = {}  # virtual_ip_pool string -> pools

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
        brought = self._brought(self.view, view)
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
                if self._make_before_break(sa, view, why, now):
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
            self._restart_pending(brought, now)
            self.join(now, brought)

    # ------------------------------------------------------------ joining (issue 9)
    @staticmethod
    def _brought(old: NodeView, new: NodeView) -> list[str]:
        """Peers the new view adds, or whose endpoints / IKE port it changes."""
        before = {p.name: (p.endpoints, p.ike_port) for p in old.peers}
        return [p.name for p in new.peers if before.get(p.name) != (p.endpoints, p.ike_port)]

    def _may_start(self, peer: Peer) -> bool:
        """We may open an IKE_SA to ``peer`` whatever the tie-break says: it is PROTECT, has an
        endpoint, and we are not its CP gateway (a host asks its gateway for its address in
        IKE_AUTH, §3.15: only the host can initiate)."""
        return (peer.policy.action == "protect" and bool(peer.endpoints) and not peer.policy.virtual_ip_pool
                and self._policy_problem(peer) is None)

    def _restart_pending(self, names, now: float) -> None:
        """A view brought these peers (or their endpoints): our unanswered IKE_SA_INIT to them (it
        may retransmit into the void towards an old address, or at long intervals) is dropped,
        and their re-initiation backoff forgotten, so that the negotiation starts over at once."""
        for name in names:
            self._hold.pop(name, None)
            self._backoff.pop(name, None)
            self._retry.pop(name, None)
            for sa in self._sas_of(name):
                # unanswered only: an IKE_SA_INIT that got its response reached the peer, which may
                # complete it (dropping ours then could leave the two sides disagreeing)
                if self._unanswered_init(sa):
                    self._count("initiation_restarted")
                    sa._die("restarted: the view brought the peer or its endpoint", DeleteReason.DUPLICATE)
                    self._collect(sa, now)

    def join(self, now: float, names=None) -> list[str]:
        """We join (agent start, or a view that brings peers): open an IKE_SA to each of these
        peers (all by default) that we may start to (``_may_start``), also where the tie-break
        leaves initiation to the peer, so that a node is reachable as soon as it runs instead of
        when the peer's next retransmission comes. Race-free: nothing is started towards a peer
        with an IKE_SA (or one of its IKE_SA_INITs half-open here); when both IKE_SA_INITs cross,
        the side whose name sorts higher abandons its own unanswered one, an unanswered one is
        dropped once an IKE_SA with the peer is up, and two IKE_SAs that completed anyway are
        resolved (``_resolve_duplicates``). Returns the peers initiated to."""
        out = []
        for p in self.view.peers:
            if names is not None and p.name not in names:
                continue
            if self._shutdown or p.responder_only or not self._may_start(p) or self._sas_of(p.name):
                continue
            try:
                self.initiate(p.name, now)
            except ValueError:
                continue
            if self._sas_of(p.name):
                self._count("join_initiated")
                out.append(p.name)
        return out

    @staticmethod
    def _unanswered_init(sa: IkeSa) -> bool:
        """Our IKE_SA_INIT that got no response yet: the peer holds at most a half-open IKE_SA
        for it (which expires), so dropping it can never leave the two sides disagreeing."""
        return (sa.initiator and sa.state == State.INIT and sa.spi_r == 0 and sa._pending is not None
                and sa._pending.exchange == ExchangeType.IKE_SA_INIT)

    def _supersede_own_init(self, remote_ip: str, now: float) -> None:
        """The peer at ``remote_ip`` sent us its IKE_SA_INIT while ours to it is unanswered (both
        sides started at once): the side whose name sorts higher (the one the tie-break leaves
        to respond) drops its own, so that one IKE_SA results, in the roles the tie-break says.
        Both sides apply the rule, exactly one of them drops."""
        for p in self._index().endpoints.get(remote_ip, ()):  # indexed: this runs before authentication
            if not self.view.name > p.name:
                continue
            for sa in self._sas_of(p.name):
                if self._unanswered_init(sa):
                    self._count("own_init_superseded")
                    sa._die("superseded by the peer's IKE_SA_INIT", DeleteReason.DROPPED)
                    self._collect(sa, now)

    def _drop_moot_inits(self, sa: IkeSa, peer: str, now: float) -> None:
        """An IKE_SA with ``peer`` is up: our IKE_SA_INITs to it still unanswered (e.g. sent
        before the peer ran, retransmitted at long intervals) are moot; dropped before one of
        their retransmissions makes a second IKE_SA."""
        for other in self._sas_of(peer):
            if other is not sa and self._unanswered_init(other):
                self._count("own_init_moot")
                other._die("moot: an IKE_SA with the peer is up", DeleteReason.DUPLICATE)
                self._collect(other, now)
        # likewise the peer's crossed IKE_SA_INIT it dropped itself (_supersede_own_init): its
        # half-open IKE_SA here would wait for an IKE_AUTH that never comes; only when no other
        # configured peer shares the address (hosts behind one NAT)
        p = self.view.peer(peer)
        ips = set(p.endpoints) if p is not None else set()
        if any(q.name != peer and ips & set(q.endpoints) for q in self.view.peers):
            return
        for key, half in list(self._half_open.items()):
            if key[0] in ips and half is not sa and half.state in (State.INIT, State.AUTH) and not half.initiator:
                self._count("half_open_moot")
                half._die("moot: an IKE_SA with the peer is up", DeleteReason.DUPLICATE)
                self._collect(half, now)

    # ------------------------------------------------------------ make before break (issue 9)
    def _make_before_break(self, sa: IkeSa, view: NodeView, why: str, now: float) -> bool:
        """A PROTECT peer's policy changed (mode, protocol, proposals...): keep ``sa`` carrying
        traffic until an IKE_SA under the new policy is up, then delete it, instead of deleting
        first (traffic lost for the re-initiation backoff). The tie-break initiator opens the
        replacement with INITIAL_CONTACT (§2.4), so the peer drops its old IKE_SA the moment the
        new one is established, and deletes ours when it is; the other side keeps its old one
        until then, at most REPLACE_WAIT_S (then deleted as before). A replacement that fails
        deletes the old one too. False: not applicable (not ESTABLISHED, no longer PROTECT,
        being rekeyed), the caller deletes at once."""
        peer = view.peer(sa.peer_name)
        if (peer is None or peer.policy.action != "protect" or sa.state != State.ESTABLISHED
                or sa._successor is not None or self._shutdown):
            return False
        sa._replace_reason = why
        name = peer.name
        t = now + REPLACE_WAIT_S  # a backstop on both sides
        self._replace_by[name] = t
        self._push(t, ("replace", name))
        if peer.initiate and self._may_start(peer):
            if not any(getattr(s, "_replacement", False) for s in self._sas_of(name)):
                self.initiate(name, now, replace=True)
            self._count("make_before_break")
            return True
        self._count("make_before_break_wait")
        return True

    def _replaced(self, peer: str, now: float, failed: str | None = None) -> None:
        """Delete the IKE_SAs of ``peer`` waiting for a replacement (one is up, or it failed)."""
        self._replace_by.pop(peer, None)
        for old in self._sas_of(peer):
            why = getattr(old, "_replace_reason", None)
            if why is None or getattr(old, "_replacement", False) and failed is None:
                continue
            old._replace_reason = None
            old.delete(now, why + (" (replaced, make before break)" if failed is None
                                   else f"; its replacement failed: {failed}"), DeleteReason.RECONFIGURED)
            self._collect(old, now)

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
        if self._needs_cookie(data, local, remote, now):
            return  # answered (or dropped) statelessly before decoding the rest (§2.6)
        try:
            msg = decode_message(data)
        except MessageLimitError:
            self._count("payload_limit")
            return
        except MessageError:
            self._count("malformed")
            return
        if (msg.exchange == ExchangeType.INFORMATIONAL and msg.payloads
                and all(isinstance(p, NotifyPayload) for p in msg.payloads)):
            self._unprotected_notify(msg, remote, now)  # never answered: it may be spoofed
            return
        try:
            check_outer(msg)
        except MessageError:
            self._count("unexpected_payload")
            return
        if msg.exchange == ExchangeType.IKE_SA_INIT and not msg.is_response and msg.spi_r == 0:
            if not msg.is_initiator:
                self._count("malformed")
                return
            key = (remote[0], msg.spi_i)
            sa = self._half_open.get(key)
            if sa is None or sa.is_dead or sa.state != State.AUTH and sa.state != State.INIT:
                if self._shutdown:
                    self._count("shutdown")
                    return
                if key in self._inits_done:  # a late retransmission: that IKE_SA is up already
                    self._count("init_retransmit_late")
                    return
                if self._half_open_by_ip.get(remote[0], 0) >= self.half_open_per_source:
                    self._count("half_open_per_source")
                    return
                self._supersede_own_init(remote[0], now)
                sa = self._new_half_open(key, local, remote, now)
                spi = sa.my_spi
                reason = sa.receive(msg, data, local, remote, now)
                if reason:
                    self._count(reason)
                self._collect(sa, now)
                if sa.is_dead or sa.state == State.INIT:
                    # refused (INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN, ...: answered with SPIr 0) or
                    # dropped: nothing of it may stay, or refusals would lock the address out
                    self._forget_half_open(sa, spi)
                return
        else:
            our_spi = msg.spi_r if msg.is_initiator else msg.spi_i
            sa = self._sas.get(our_spi)
            other = msg.spi_i if msg.is_initiator else msg.spi_r
            their = sa.spi_i if sa and msg.is_initiator else (sa.spi_r if sa else 0)
            if sa is None or sa.is_dead or (their and other != their):
                self._count("unknown_spi")
                self._answer_unknown_spi(msg, local, remote, now)
                return
        reason = sa.receive(msg, data, local, remote, now)
        if reason:
            self._count(reason)
        self._collect(sa, now)

    # ------------------------------------------------------------ COOKIE (§2.6)
    def half_open(self) -> int:
        """Number of responder IKE_SAs not ESTABLISHED yet (each expires after
        ``half_open_timeout_s``); O(1)."""
        return len(self._half_open)

    # ------------------------------------------------------------ lost state (§2.21.4, §1.5)
    def _answer_unknown_spi(self, msg: Message, local: Addr, remote: Addr, now: float) -> None:
        """<-- HDR(same SPIs and Message ID), N(INVALID_IKE_SPI), unprotected: only for an encrypted
        request (never a response), rate-limited per source, no state kept."""
        if msg.is_response or not msg.payloads or not isinstance(
                msg.payloads[0], (EncryptedPayload, EncryptedFragmentPayload)):
            return
        if not self._rate_ok(self._invalid_spi_sent, remote[0], now, INVALID_IKE_SPI_INTERVAL_S):
            self._count("invalid_ike_spi_rate_limited")
            return
        reply = Message(msg.spi_i, msg.spi_r, int(ExchangeType.INFORMATIONAL), msg.message_id,
                        not msg.is_initiator, True, (NotifyPayload(int(NotifyType.INVALID_IKE_SPI)),))
        self._out.append(Datagram(encode_message(reply), local, remote))
        self._count("invalid_ike_spi_sent")
        self._initiate_after_lost_state(remote, now)

    def _initiate_after_lost_state(self, remote: Addr, now: float) -> None:
        """We just told a configured peer that we do not know its IKE_SA (we restarted, it still
        checks our liveness): start an IKE_SA ourselves, whatever the tie-break says, since the
        peer may ignore INVALID_IKE_SPI (strongSwan does) and keep the dead IKE_SA for a minute.
        Ours carries INITIAL_CONTACT (§2.4), so the peer drops the old one at once. Only with
        no IKE_SA to that peer at all (none being set up either: no duplicate), rate-limited
        per address as the unknown-SPI hints are."""
        peer = next((p for p in self.view.peers if remote[0] in p.endpoints and p.policy.action == "protect"),
                    None)
        if peer is None or self._shutdown or self._sas_of(peer.name) or not self._may_start(peer):
            return
        if not self._rate_ok(self._hinted, remote[0], now, HINT_INTERVAL_S):
            return
        try:
            self.initiate(peer.name, now)
        except ValueError:
            return
        if self._sas_of(peer.name):
            self._count("initiated_after_invalid_ike_spi")

    def _unprotected_notify(self, msg: Message, remote: Addr, now: float) -> None:
        """HDR, N(INVALID_IKE_SPI | INVALID_SPI) without SK: the peer may have lost its state.
        Unauthenticated, so only a hint: a liveness check of our IKE_SA with that address."""
        kinds = {p.notify_type for p in msg.payloads}
        if not kinds & {NotifyType.INVALID_IKE_SPI, NotifyType.INVALID_SPI}:
            self._count("unexpected_payload")
            return
        sa = self._sas.get(msg.spi_i) or self._sas.get(msg.spi_r)
        if (sa is not None and sa.state == State.DELETING and sa.remote[0] == remote[0]
                and NotifyType.INVALID_IKE_SPI in kinds):
            # our Delete answered "no such IKE_SA" (the peer dropped it already, e.g. on an
            # INITIAL_CONTACT): nothing left to wait for; at worst a forgery ends it early
            sa._finish_delete()
            self._collect(sa, now)
            self._count("delete_answered_invalid_ike_spi")
            return
        if sa is None or sa.is_dead or sa.remote[0] != remote[0] or sa.state != State.ESTABLISHED:
            sa = next((s for p in self._peers_at(remote[0]) for s in self._sas_of(p.name)
                       if s.remote[0] == remote[0] and s.state == State.ESTABLISHED), None)
        if sa is None:
            self._count("unsolicited_notify")
            return
        self._count("invalid_spi_hint")
        self._probe(sa, remote[0], now)

    def _probe(self, sa: IkeSa, ip: str, now: float) -> bool:
        if not self._rate_ok(self._hinted, ip, now, HINT_INTERVAL_S):
            self._count("hint_rate_limited")
            return False
        started = sa.check_liveness(now, hinted=True)
        self._collect(sa, now)
        return started

    def _tell_invalid_spi(self, remote_addr, spi: bytes, now: float, *, configured: bool) -> None:
        """§1.5: ESP/AH with an SPI we do not know and no IKE_SA to say so over: an unprotected
        HDR(random SPIi, 0, I), N(INVALID_SPI, data = the SPI) to the packet's source address, to
        its UDP port if it came in UDP 4500 (else to 500). The peer takes it as a hint only and
        starts a liveness check (``_unprotected_notify``), so a restarted node is noticed at once.

        Sent only with a view that has peers (never before the first view), at most once per
        source address per INVALID_SPI_INTERVAL_S, and only to a configured peer's endpoint
        (``configured``) or, for ESP in UDP from another address, when the view has a PROTECT peer
        without endpoints (one behind a NAT: the only peer that can come from an address we cannot
        know). The datagram is smaller than any ESP packet that causes it (no amplification)."""
        if self._shutdown or len(spi) != 4 or not self.view.peers:
            return
        ip = remote_addr[0] if isinstance(remote_addr, tuple) else str(remote_addr)
        port = remote_addr[1] if isinstance(remote_addr, tuple) and len(remote_addr) > 1 else 0
        if not configured and not (port and any(not p.endpoints and p.policy.action == "protect"
                                                for p in self.view.peers)):
            self._count("invalid_spi_not_sent")
            return
        if not self._rate_ok(self._esp_invalid_spi_sent, ip, now, INVALID_SPI_INTERVAL_S):
            self._count("invalid_spi_rate_limited")
            return
        if not configured and any(sa.remote[0] == ip and sa.state == State.ESTABLISHED for sa in self._live()):
            return  # an IKE_SA with that address is up (a late packet of a rekeyed SA): nothing lost
        spi_i = int.from_bytes(self.rng(8), "big") or 1  # zero or random: §1.5 (our decoder refuses zero)
        msg = Message(spi_i, 0, int(ExchangeType.INFORMATIONAL), 0, True, False,
                      (NotifyPayload(int(NotifyType.INVALID_SPI), data=bytes(spi)),))
        local = (self.local_address, 4500 if port else IKE_PORT)
        self._out.append(Datagram(encode_message(msg), local, (ip, port or IKE_PORT)))
        self._count("invalid_spi_sent")

    def hint_unknown_spi(self, remote_addr, now: float, spi: bytes = b"") -> str:
        """The datapath received ESP (or AH) with an SPI it does not know from ``remote_addr``
        (an IP string or (ip, port)): the peer still uses SAs we lost (§1.5), or we lost its.
        ``spi``: that SPI (4 octets); with it, and no ESTABLISHED IKE_SA with the source to
        tell the peer over, an unprotected N(INVALID_SPI) is sent (``_tell_invalid_spi``).

        Rate-limited per address (HINT_INTERVAL_S). Returns what was done: "initiated" (no
        IKE_SA with that peer: IKE_SA_INIT started, backoff and policy permitting),
        "liveness_check" (an ESTABLISHED IKE_SA is probed now, §2.4), "in_progress" (an IKE_SA
        is being set up or a request is outstanding), "held" (re-initiation backoff or bad
        policy), "rate_limited", or "unknown_address" (no configured peer has that endpoint).
        Never raises."""
        ip = remote_addr[0] if isinstance(remote_addr, tuple) else str(remote_addr)
        peers = self._peers_at(ip)  # an index: hints come from any source address
        peer = peers[0] if peers else None
        if peer is None or self._shutdown:
            self._count("hint_unknown_address")
            self._tell_invalid_spi(remote_addr, spi, now, configured=False)
            return "unknown_address"
        sas = self._sas_of(peer.name)
        est = [sa for sa in sas if sa.state == State.ESTABLISHED]
        if est:
            if not self._rate_ok(self._hinted, ip, now, HINT_INTERVAL_S):
                self._count("hint_rate_limited")
                return "rate_limited"
            started = False
            for sa in est:
                started = sa.check_liveness(now, hinted=True) or started
                self._collect(sa, now)
            return "liveness_check" if started else "in_progress"
        self._tell_invalid_spi(remote_addr, spi, now, configured=True)
        if sas:
            return "in_progress"
        if not self._rate_ok(self._hinted, ip, now, HINT_INTERVAL_S):
            self._count("hint_rate_limited")
            return "rate_limited"
        try:
            self.initiate(peer.name, now)
        except ValueError:
            return "held"
        return "initiated" if self._sas_of(peer.name) else "held"

    def _needs_cookie(self, data: bytes, local: Addr, remote: Addr, now: float) -> bool:
        """COOKIE mode (§2.6): with ``cookie_threshold`` half-open IKE_SAs, a new IKE_SA_INIT must
        carry a valid N(COOKIE) first. Checked on the raw datagram, before the rest is decoded:
        only the header and the payload headers are read (at most MAX_PAYLOADS), so a forged
        flood costs little. Returns True when the datagram was dealt with here (answered
        <-- HDR(SPIi, 0), N(COOKIE), or dropped and counted), False to go on."""
        if self.half_open() < self.cookie_threshold or len(data) < HEADER_LEN:
            return False
        try:
            h = decode_header(data)
        except MessageError:
            return False  # decode_message counts it
        if (h.exchange != ExchangeType.IKE_SA_INIT or h.spi_r or h.message_id
                or h.flags & 0x28 != 0x08):  # a new request from the original initiator only
            return False
        old = self._half_open.get((remote[0], h.spi_i))
        if old is not None and not old.is_dead:
            return False  # a retransmission to an IKE_SA we made: its cached response answers
        try:
            chain = scan_payloads(h.first, data, HEADER_LEN)
        except MessageLimitError:
            self._count("payload_limit")
            return True
        except MessageError:
            self._count("malformed")
            return True
        nonce = next(((a, b) for t, a, b in chain if t == PayloadType.NONCE), None)
        if nonce is None:
            self._count("malformed")
            return True
        ni = bytes(data[nonce[0]:nonce[1]])
        cookie = _cookie_of(data, chain[0]) if chain else None
        if cookie is not None:
            bad = self._cookies.check(cookie, ni, remote[0], h.spi_i, now)
            if bad is None:
                return False
            self._count(bad)  # forged or stale: a fresh cookie, still no state
        else:
            self._count("cookie_required")
        reply = Message(h.spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, False, True,
                        (NotifyPayload(int(NotifyType.COOKIE), self._cookies.make(ni, remote[0], h.spi_i, now)),))
        self._out.append(Datagram(encode_message(reply), local, remote))
        return True

    def _new_half_open(self, key: tuple[str, int], local: Addr, remote: Addr, now: float) -> IkeSa:
        """A responder IKE_SA for a new IKE_SA_INIT. At ``half_open_max`` the oldest half-open
        IKE_SA goes first; in COOKIE mode the new one gets the shorter pressure timeout."""
        while len(self._half_open) >= self.half_open_max:
            old_key = next(iter(self._half_open))
            old = self._half_open[old_key]
            self._count("half_open_evicted")
            old._die("half-open IKE_SA dropped: too many half-open IKE_SAs", DeleteReason.DROPPED)
            self._collect(old, now)
            self._forget_half_open(old, old.my_spi)
            if self._half_open.get(old_key) is old:  # not expected: the loop must end all the same
                del self._half_open[old_key]
        cfg = self._responder_config()
        if self.half_open() >= self.cookie_threshold:
            cfg.half_open_timeout_s = self.half_open_pressure_timeout_s
        sa = IkeSa.new_responder(cfg, self.rng, local, remote, key[1], now)
        self._sas[sa.my_spi] = sa
        self._half_open[key] = sa
        self._half_open_key[sa.my_spi] = key
        self._half_open_by_ip[key[0]] = self._half_open_by_ip.get(key[0], 0) + 1
        return sa

    # ------------------------------------------------------------ CP address pools (§3.15)
    def _assign_vip(self, peer: Peer, versions: tuple) -> list | None:
        spec = peer.policy.virtual_ip_pool
        pools = self._pools.get(spec)
        if pools is None:
            pools = self._pools[spec] = [AddressPool(c.strip()) for c in spec.split(",") if c.strip()]
        out = []
        for pool in pools:
            if pool.network.version in versions:
                addr = pool.acquire(peer.identity)
                if addr is None:
                    return None
                out.append(addr)
        return out or None

    def _release_vip(self, peer_name: str, gone: IkeSa) -> None:
        peer = self.view.peer(peer_name)
        if peer is None or any(s is not gone and s.state != State.DELETING for s in self._sas_of(peer_name)):
            return  # another IKE_SA of that peer still holds the address
        for pools in self._pools.values():
            for pool in pools:
                pool.release(peer.identity)

    def leases(self) -> dict[str, dict[str, str]]:
        """Virtual IPs handed out, per pool string: {pool: {identity: address}}."""
        return {k: {i: a for p in v for i, a in p.leased().items()} for k, v in self._pools.items()}

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

    def handle_timer(self, now: float) -> None:
        """Run every IKE_SA deadline that has passed, and due re-initiations.

        Cost: O(k log n) for k due deadlines (a heap), each IKE_SA at most once per call."""
        due: list[object] = []
        while self._heap and self._heap[0][0] <= now:
            t, _, key = heapq.heappop(self._heap)
            if self._valid(t, key):
                due.append(key)
                if isinstance(key, int):
                    del self._deadline[key]
        for key in due:
            if isinstance(key, int):
                sa = self._sas.get(key)
                if sa is None:
                    continue
                t = sa.next_timer()
                if t is not None and t <= now:
                    sa.handle_timer(now)
                self._collect(sa, now)  # reschedules
            elif key[0] == "replace":  # no replacement came in time: the old IKE_SAs go now
                if self._replace_by.get(key[1], now + 1) <= now:
                    self._replaced(key[1], now, failed="none came in time")
            else:
                name = key[1]
                if self._retry.get(name) is None or self._retry[name] > now:
                    continue
                if self.view.peer(name) is None:
                    self._retry.pop(name, None)
                    continue
                try:
                    self.initiate(name, now)
                except ValueError:
                    self._retry.pop(name, None)

    def get_timer(self) -> float | None:
        """Earliest deadline over all IKE_SAs and pending re-initiations (amortised O(log n))."""
        while self._heap:
            t, _, key = self._heap[0]
            if self._valid(t, key):
                return t
            heapq.heappop(self._heap)
        return None

    def _valid(self, t: float, key: object) -> bool:
        if isinstance(key, int):
            return self._deadline.get(key) == t and key in self._sas
        if key[0] == "replace":
            return self._replace_by.get(key[1]) == t
        return self._retry.get(key[1]) == t

    def _schedule(self, sa: IkeSa) -> None:
        """Keep the heap entry of ``sa`` equal to its next_timer() (called from _collect)."""
        key = sa.my_spi
        t = None if sa.is_dead or self._sas.get(key) is not sa else sa.next_timer()
        if t is None:
            self._deadline.pop(key, None)
            return
        if self._deadline.get(key) == t:
            return
        self._deadline[key] = t
        self._push(t, key)

    def _push(self, t: float, key: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), key))
        if len(self._heap) > 4 * (len(self._deadline) + len(self._retry) + len(self._replace_by)) + 64:
            # stale entries (deadlines that moved) outnumber live ones: rebuild
            self._heap = [e for e in self._heap if self._valid(e[0], e[2])]
            heapq.heapify(self._heap)

    def timer_entries(self) -> int:
        """Entries in the deadline heap (live and stale): bounded by a constant times the
        number of IKE_SAs plus pending re-initiations."""
        return len(self._heap)

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

    # ------------------------------------------------------------ bookkeeping
    def _collect(self, sa: IkeSa, now: float) -> None:
        if sa.peer_name and not sa.is_dead and self._sas.get(sa.my_spi) is sa:
            self._by_peer.setdefault(sa.peer_name, set()).add(sa.my_spi)
        drops, sa.drops = sa.drops, []  # e.g. invalid_ke_data (RFC 9370 exchanges)
        for reason in drops:
            self._count(reason)
        for d in sa.outbox:  # RFC 7383: a fragmented message leaves as its SKF fragments
            frags = getattr(d.data, "fragments", None)
            self._out.extend([Datagram(f, d.local, d.remote) for f in frags] if frags else [d])
        sa.outbox.clear()
        spawned, sa.spawned = sa.spawned, []
        for new in spawned:  # IKE_SA rekey: the new IKE_SA's events come before the old one's delete
            new._from_rekey = True  # the continuation of an IKE_SA, never a duplicate of it
            self._sas[new.my_spi] = new
            self._collect(new, now)
        events, sa.events = sa.events, []
        after: list = []  # (fn(peer, now), peer) run once all of this IKE_SA's events are out:
        # the old IKE_SAs' ChildSaDeleted must follow the new ChildSaEstablished (make before break)
        for ev in events:
            self._events.append(ev)
            if isinstance(ev, IkeSaEstablished):
                self._contacted.add(ev.peer)
                self._retry.pop(ev.peer, None)
                self._hold.pop(ev.peer, None)
                if ev.peer:
                    self._by_peer.setdefault(ev.peer, set()).add(sa.my_spi)
                if sa.peer_initial_contact:
                    # RFC 7296 §2.4: the peer restarted; our older IKE_SAs with it are stale
                    # only SAs established before: a simultaneous initiation in flight stays
                    # (after this IKE_SA's events: its CHILD_SA is installed before theirs go)
                    after.append((lambda p, n, s=sa: self._initial_contact(s, p, n), ev.peer))
                if ev.peer and not getattr(sa, "_from_rekey", False) and sa.peer_initial_contact:
                    after.append((self._replaced, ev.peer))  # the peer's replacement is up
                if ev.peer:
                    after.append((lambda p, n, s=sa: self._drop_moot_inits(s, p, n), ev.peer))
                    after.append((lambda p, n, s=sa: self._resolve_duplicates(s, p, n), ev.peer))
            elif isinstance(ev, ChildSaEstablished):
                # the re-initiation backoff ends when traffic can flow, not at IKE_AUTH: an IKE_SA
                # whose CHILD_SA keeps failing must not restart at the shortest delay
                self._backoff.pop(ev.peer, None)
                self.last_errors.pop(ev.peer, None)
                if getattr(sa, "_replacement", False) and ev.peer:
                    sa._replacement_up = True
                    after.append((self._replaced, ev.peer))  # our replacement carries traffic now
            elif isinstance(ev, ChildSaRefused):
                self._count("child_sa_refused_by_peer" if ev.by == "peer" else "child_sa_refused")
                if ev.peer:
                    retry = f" (retry in {ev.retry_in_s:.0f} s)" if ev.retry_in_s is not None else ""
                    self.last_errors[ev.peer] = (f"CHILD_SA refused by the peer: {ev.reason}{retry}" if ev.by == "peer"
                                                 else f"we refused its CHILD_SA: {ev.reason}; {ev.offered}")
                if (ev.peer and ev.by == "peer" and getattr(sa, "_replacement", False)
                        and not getattr(sa, "_replacement_up", False)):
                    # make before break: the new policy's CHILD_SA is refused, so the old IKE_SA must not
                    # stay for good; the replacement IKE_SA keeps retrying its CHILD_SA (backoff)
                    after.append((lambda p, n, r=ev.reason: self._replaced(p, n, failed=r), ev.peer))
            elif isinstance(ev, IkeSaDeleted):
                if ev.kind == DeleteReason.AUTH_FAILED:
                    self._count("auth_failed")
                name = ev.peer or (sa.cfg.peer.name if sa.cfg.peer else "")
                if (name and ev.rekeyed_to is None and ev.kind != DeleteReason.LOCAL
                        and not any(s is not sa for s in self._sas_of(name))):
                    self.last_errors[name] = f"IKE_SA {'deleted' if sa.established_at else 'failed'}: {ev.reason}"
                if getattr(sa, "_replacement", False) and not getattr(sa, "_replacement_up", False) and name:
                    after.append((lambda p, n, r=ev.reason: self._replaced(p, n, failed=r), name))
                if ev.kind == DeleteReason.TIMEOUT and ev.peer:
                    # the peer may have restarted: the IKE_SA we build next carries INITIAL_CONTACT
                    self._contacted.discard(ev.peer)
                if ev.rekeyed_to is None and ev.peer:
                    self._release_vip(ev.peer, sa)
                self._schedule_retry(sa, ev, now)
        for fn, peer in after:
            fn(peer, now)
        if sa.is_dead:
            if self._sas.get(sa.my_spi) is sa:
                del self._sas[sa.my_spi]
            self._forget_half_open(sa)
            peers = self._by_peer.get(sa.peer_name)
            if peers is not None:
                peers.discard(sa.my_spi)
                if not peers:
                    del self._by_peer[sa.peer_name]
        elif sa.state == State.ESTABLISHED:
            self._remember_init(sa)
            self._forget_half_open(sa)
        self._schedule(sa)

    def _initial_contact(self, sa: IkeSa, peer: str, now: float) -> None:
        for old in self._sas_of(peer):
            if old is not sa and old.state == State.ESTABLISHED:
                old._die("peer sent INITIAL_CONTACT", DeleteReason.SUPERSEDED)
                self._collect(old, now)

    # ------------------------------------------------------------ duplicate IKE_SAs
    @staticmethod
    def _lowest_nonce(sa: IkeSa) -> bytes:
        return min(sa._ni, sa._nr)

    def _resolve_duplicates(self, sa: IkeSa, peer: str, now: float) -> None:
        """Both sides initiated at once (or a late start crossed a retransmission): a second
        IKE_SA with ``peer`` is ESTABLISHED beside ``sa``. RFC 7296 has no rule; both sides keep
        the one and delete the other the same way, as for rekey collisions (§2.25.2): the
        IKE_SA holding the lowest of the nonces is deleted (INFORMATIONAL Delete, §1.4.1). Each
        side decides alone from what both know (Ni, Nr), so both delete the same IKE_SA, also a
        peer that never deletes duplicates itself (strongSwan). IKE_SAs born of a rekey, or
        being replaced by one, are a lineage, not duplicates."""
        if getattr(sa, "_from_rekey", False) or sa.state != State.ESTABLISHED:
            return
        for other in self._sas_of(peer):
            if (other is sa or other.state != State.ESTABLISHED or other._successor is not None
                    or sa._successor is not None or getattr(other, "_replace_reason", None)
                    or getattr(sa, "_replace_reason", None)):
                continue
            loser = sa if self._lowest_nonce(sa) < self._lowest_nonce(other) else other
            self._count("duplicate_ike_sa_deleted")
            loser.delete(now, "duplicate IKE_SA (both sides initiated): the other one is kept", DeleteReason.DUPLICATE)
            self._collect(loser, now)
            if loser is sa:
                return

    def _remember_init(self, sa: IkeSa) -> None:
        """Keep (remote ip, SPIi) of an IKE_SA we established as responder, so that a late
        retransmission of its IKE_SA_INIT (quick IKE_SA_INIT retransmissions, agent.ike.retransmit)
        is ignored instead of opening a second, half-open IKE_SA. Bounded (oldest forgotten)."""
        key = self._half_open_key.get(sa.my_spi)
        if key is None:
            return
        self._inits_done[key] = None
        if len(self._inits_done) > _INITS_DONE_MAX:
            del self._inits_done[next(iter(self._inits_done))]

    def _forget_half_open(self, sa: IkeSa, spi: int | None = None) -> None:
        """Drop ``sa`` from the half-open tables. ``spi``: our SPI as it was made (a stateless
        refusal resets SPIr to 0); given, ``sa`` also leaves the IKE_SAs and the timer heap."""
        if spi is None:
            spi = sa.my_spi
        elif self._sas.get(spi) is sa:
            del self._sas[spi]
            self._deadline.pop(spi, None)
        key = self._half_open_key.pop(spi, None)
        if key is None or self._half_open.get(key) is not sa:
            return
        del self._half_open[key]
        n = self._half_open_by_ip.get(key[0], 0) - 1
        if n > 0:
            self._half_open_by_ip[key[0]] = n
        else:
            self._half_open_by_ip.pop(key[0], None)

    def _schedule_retry(self, sa: IkeSa, ev: IkeSaDeleted, now: float) -> None:
        name = sa.peer_name or (sa.cfg.peer.name if sa.cfg.peer else "")
        peer = self.view.peer(name) if name else None
        # decided by the kind of the end (agent.ike.errors), never by words in the reason text
        if (peer is None or self._shutdown or ev.kind in NO_RETRY or ev.rekeyed_to is not None
                or any(s is not sa for s in self._sas_of(name))):
            return
        last = self._backoff.get(name, 0.0)
        auth = ev.kind in AUTH_BACKOFF
        base = REINITIATE_AUTH_BASE_S if auth else REINITIATE_BASE_S
        backoff = min(REINITIATE_MAX_S, max(last * 2, base) if last else base)
        self._backoff[name] = backoff
        # acquires (initiate) wait out the backoff too, whichever side initiates by default
        self._hold[name] = now + backoff
        if peer.initiate:
            self._retry[name] = now + backoff
            self._push(now + backoff, ("retry", name))


__all__ = ["IkeManager", "Datagram"]
