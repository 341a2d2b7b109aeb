"""IkeManager: every IKE_SA of this node, demultiplexed by SPI (sans-I/O).

docs/design.md "agent.ike.manager.IkeManager". The runtime feeds datagrams
(without the non-ESP marker) and timer ticks; it drains datagrams and events.
``receive_datagram`` never raises: every dropped datagram is counted in
``counters`` by reason. Pure module: no I/O.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike.cookie import CookieJar
from agent.ike.fragment import DEFAULT_FRAGMENT_SIZE
from agent.ike.cp import AddressPool
from agent.ike.events import Addr, Event, IkeSaDeleted, IkeSaEstablished
from agent.ike.message import (Message, MessageError, NotifyPayload, check_outer, decode_message,
                               encode_message)
from agent.ike.sa import IKE_PORT, Datagram, IkeSa, IkeSaConfig, State
from agent.model import DEFAULT_IKE_PROPOSALS, Credentials, NodeView, Peer

REINITIATE_BASE_S = 2.0
REINITIATE_MAX_S = 120.0
COOKIE_THRESHOLD = 50  # half-open IKE_SAs above which IKE_SA_INIT needs a COOKIE (§2.6)

# reasons after which we do not re-initiate
_FINAL_REASONS = ("shutdown", "peer removed from view", "deleted locally")


class IkeManager:
    """All IKE_SAs of one node.

    ``IkeManager(view, credentials, rng, *, local_address)``; see the module
    docstring and docs/design.md for the methods. Addresses are (ip, port).
    """

    def __init__(self, view: NodeView, credentials: Credentials, rng: Callable[[int], bytes], *,
                 local_address: str, wall_offset: float = 0.0, cookie_threshold: int = COOKIE_THRESHOLD,
                 cookie_rotate_s: float = 120.0):
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
        self._half_open: dict[tuple[str, int], IkeSa] = {}  # responder: (remote ip, SPIi)
        self._out: list[Datagram] = []
        self._events: deque[Event] = deque()
        self._retry: dict[str, float] = {}  # peer -> re-initiation deadline
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
        for p in self.view.peers:
            if p.identity == identity and p.policy.action == "protect":
                return p
        return None

    def _responder_config(self) -> IkeSaConfig:
        props: list[str] = []
        for p in self.view.peers:
            for s in p.policy.ike_proposals:
                if s not in props:
                    props.append(s)
        return IkeSaConfig(
            identity=self.view.identity, credentials=self.credentials, local_subnets=self.view.subnets,
            ike_proposals=tuple(props) or DEFAULT_IKE_PROPOSALS, peer=None, find_peer=self._find_peer,
            force_encap=any(p.policy.encapsulation == "udp" for p in self.view.peers),
            wall_offset=lambda: self.wall_offset, assign_vip=self._assign_vip)

    def _live(self):
        return [sa for sa in self._sas.values() if not sa.is_dead]

    def _sas_of(self, peer: str) -> list[IkeSa]:
        return [sa for sa in self._live() if sa.peer_name == peer]

    # ------------------------------------------------------------ API
    def update_view(self, view: NodeView, now: float) -> None:
        """New view: IKE_SAs of peers no longer in it are deleted."""
        names = {p.name for p in view.peers}
        self.view = view
        for sa in self._live():
            if sa.peer_name and sa.peer_name not in names:
                sa.delete(now, "peer removed from view")
                self._collect(sa, now)
        for name in list(self._retry):
            if name not in names:
                del self._retry[name]

    def initiate(self, peer_name: str, now: float) -> None:
        """Start IKE_SA_INIT with ``peer_name`` unless an IKE_SA with it exists or is being set up.

        Raises ValueError for an unknown peer or one without endpoints (a configuration error).
        """
        peer = self.view.peer(peer_name)
        if peer is None:
            raise ValueError(f"initiate: unknown peer {peer_name!r}")
        if not peer.endpoints:
            raise ValueError(f"initiate: peer {peer_name!r} has no endpoint")
        if self._sas_of(peer_name) or self._shutdown:
            self._retry.pop(peer_name, None)
            return
        self._retry.pop(peer_name, None)
        cfg = IkeSaConfig(
            identity=self.view.identity, credentials=self.credentials, local_subnets=self.view.subnets,
            ike_proposals=peer.policy.ike_proposals, peer=peer, find_peer=self._find_peer,
            force_encap=peer.policy.encapsulation == "udp", initial_contact=peer_name not in self._contacted,
            wall_offset=lambda: self.wall_offset, assign_vip=self._assign_vip,
            fragment_size=getattr(peer.policy, "fragment_size", DEFAULT_FRAGMENT_SIZE))
        sa = IkeSa.new_initiator(cfg, self.rng, (self.local_address, IKE_PORT),
                                 (peer.endpoints[0], peer.ike_port), now)
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
        try:
            msg = decode_message(data)
        except MessageError:
            self._count("malformed")
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
                if not self._cookie_ok(msg, local, remote, now):
                    return
                sa = IkeSa.new_responder(self._responder_config(), self.rng, local, remote, msg.spi_i, now)
                self._sas[sa.my_spi] = sa
                self._half_open[key] = sa
        else:
            our_spi = msg.spi_r if msg.is_initiator else msg.spi_i
            sa = self._sas.get(our_spi)
            other = msg.spi_i if msg.is_initiator else msg.spi_r
            their = sa.spi_i if sa and msg.is_initiator else (sa.spi_r if sa else 0)
            if sa is None or sa.is_dead or (their and other != their):
                self._count("unknown_spi")
                return
        reason = sa.receive(msg, data, local, remote, now)
        if reason:
            self._count(reason)
        self._collect(sa, now)

    # ------------------------------------------------------------ COOKIE (§2.6)
    def half_open(self) -> int:
        """Number of responder IKE_SAs waiting for IKE_AUTH."""
        return sum(1 for sa in self._half_open.values() if not sa.is_dead and sa.state != State.ESTABLISHED)

    def _cookie_ok(self, msg: Message, local: Addr, remote: Addr, now: float) -> bool:
        """Under load, IKE_SA_INIT must carry a valid N(COOKIE) first; else answer
        <-- HDR(SPIi, 0), N(COOKIE) and keep no state. Returns True to go on."""
        if self.half_open() < self.cookie_threshold:
            return True
        ni = msg.first(PayloadType.NONCE)
        if ni is None:
            self._count("malformed")
            return False
        first = msg.payloads[0] if msg.payloads else None
        if isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE:
            bad = self._cookies.check(first.data, ni.data, remote[0], msg.spi_i, now)
            if bad is None:
                return True
            self._count(bad)  # forged or stale: a fresh cookie, still no state
        else:
            self._count("cookie_required")
        cookie = self._cookies.make(ni.data, remote[0], msg.spi_i, now)
        reply = Message(msg.spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, False, True,
                        (NotifyPayload(int(NotifyType.COOKIE), cookie),))
        self._out.append(Datagram(encode_message(reply), local, remote))
        return False

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

    def rekey_child(self, inbound_spi: int, now: float) -> bool:
        """Rekey the CHILD_SA with this inbound SPI (e.g. its ESP sequence numbers run out).
        Returns False if no IKE_SA has it or it is already being rekeyed; never raises."""
        sa = self._sa_of_child(inbound_spi)
        if sa is None:
            return False
        ok = sa.rekey_child(inbound_spi, now)
        self._collect(sa, now)
        return ok

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
        """Run every IKE_SA deadline that has passed, and due re-initiations."""
        for sa in list(self._sas.values()):
            t = sa.next_timer()
            if t is not None and t <= now:
                sa.handle_timer(now)
                self._collect(sa, now)
        for name, deadline in list(self._retry.items()):
            if deadline <= now and self.view.peer(name) is not None:
                try:
                    self.initiate(name, now)
                except ValueError:
                    self._retry.pop(name, None)

    def get_timer(self) -> float | None:
        """Earliest deadline over all IKE_SAs and pending re-initiations."""
        ts = [t for t in (sa.next_timer() for sa in self._sas.values()) if t is not None]
        ts += list(self._retry.values())
        return min(ts) if ts else None

    def datagrams_to_send(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def delete_all(self, now: float) -> None:
        """INFORMATIONAL delete for every IKE_SA (shutdown); no re-initiation afterwards."""
        self._shutdown = True
        self._retry.clear()
        for sa in list(self._sas.values()):
            sa.delete(now, "shutdown")
            self._collect(sa, now)

    def status(self) -> list[dict]:
        """JSON-ready list of IKE_SAs (no keys); each has ``created`` / ``established``
        (seconds on the ``now`` clock, see IkeSa.status)."""
        return [sa.status() for sa in self._live()]

    # ------------------------------------------------------------ bookkeeping
    def _collect(self, sa: IkeSa, now: float) -> None:
        drops, sa.drops = sa.drops, []  # e.g. invalid_ke_data (RFC 9370 exchanges)
        for reason in drops:
            self._count(reason)
        for d in sa.outbox:  # RFC 7383: a fragmented message leaves as its SKF fragments
            frags = getattr(d.data, "fragments", None)
            self._out.extend([Datagram(f, d.local, d.remote) for f in frags] if frags else [d])
        sa.outbox.clear()
        spawned, sa.spawned = sa.spawned, []
        for new in spawned:  # IKE_SA rekey: the new IKE_SA's events come before the old one's delete
            self._sas[new.my_spi] = new
            self._collect(new, now)
        events, sa.events = sa.events, []
        for ev in events:
            self._events.append(ev)
            if isinstance(ev, IkeSaEstablished):
                self._contacted.add(ev.peer)
                self._retry.pop(ev.peer, None)
                self._backoff.pop(ev.peer, None)
                if sa.peer_initial_contact:
                    # RFC 7296 §2.4: the peer restarted; our older IKE_SAs with it are stale
                    # only SAs established before: a simultaneous initiation in flight stays
                    for old in self._sas_of(ev.peer):
                        if old is not sa and old.state == State.ESTABLISHED:
                            old._die("peer sent INITIAL_CONTACT")
                            self._collect(old, now)
            elif isinstance(ev, IkeSaDeleted):
                if "AUTHENTICATION_FAILED" in ev.reason:
                    self._count("auth_failed")
                if ev.rekeyed_to is None and ev.peer:
                    self._release_vip(ev.peer, sa)
                self._schedule_retry(sa, ev, now)
        if sa.is_dead:
            self._sas.pop(sa.my_spi, None)
            for k, v in list(self._half_open.items()):
                if v is sa:
                    del self._half_open[k]
        elif sa.state == State.ESTABLISHED:
            for k, v in list(self._half_open.items()):
                if v is sa:
                    del self._half_open[k]

    def _schedule_retry(self, sa: IkeSa, ev: IkeSaDeleted, now: float) -> None:
        name = sa.peer_name or (sa.cfg.peer.name if sa.cfg.peer else "")
        peer = self.view.peer(name) if name else None
        if (peer is None or not peer.initiate or self._shutdown or ev.reason in _FINAL_REASONS
                or ev.reason == "peer sent INITIAL_CONTACT" or ev.rekeyed_to is not None
                or ev.reason.startswith("redundant") or any(s is not sa for s in self._sas_of(name))):
            return
        last = self._backoff.get(name, 0.0)
        backoff = min(REINITIATE_MAX_S, last * 2 if last else REINITIATE_BASE_S)
        self._backoff[name] = backoff
        self._retry[name] = now + backoff


__all__ = ["IkeManager", "Datagram"]
