"""IkeSa: one IKE_SA, sans-I/O (RFC 7296): message IDs, window, retransmission, SK seal/open,
and the exchange tasks (agent.ike.tasks) that do the protocol work.

Driven by three inputs: API calls (:meth:`IkeSa.initiate`, :meth:`IkeSa.delete`, ...),
:meth:`IkeSa.receive` (a decoded message with its raw bytes and addresses) and
:meth:`IkeSa.handle_timer`. Outputs: ``outbox`` (list of Datagram), ``events``
(agent.ike.events), :meth:`IkeSa.next_timer`.

Requests go out one at a time (window size 1, §2.3; a task's request waits in the queue
until the outstanding one is answered); a response goes to the ``on_response`` of the task
that sent the request. A request from the peer goes to the task of its exchange type
(``_RESPONDERS``), whose ``process_request`` returns the response payloads. Tasks, one per
exchange (strongSwan libcharon's split; each holds its own nonces, KE and SPIs):
IKE_SA_INIT (tasks.ike_init, with NAT detection from agent.ike.natt), IKE_INTERMEDIATE
(tasks.ike_intermediate), IKE_AUTH (tasks.ike_auth), CREATE_CHILD_SA for CHILD_SAs
(tasks.child_create) and for the IKE_SA (tasks.ike_rekey), IKE_FOLLOWUP_KE
(tasks.followup_ke), INFORMATIONAL (tasks.informational). Beside them: the PAD
(agent.ike.pad), lifetimes (agent.ike.lifetimes), CHILD_SA refusals (agent.ike.child_refusal).

Requests are retransmitted as agent.ike.retransmit schedules (§2.1, per peer policy); the
last response is cached and re-sent for a repeated request.

Pure module: no I/O, time comes in as ``now``, randomness from ``rng``.
"""
from __future__ import annotations

from typing import Callable

from cryptography.hazmat.primitives import hashes

from agent.iana import ExchangeType, NotifyType
from agent.ike import child as ch
from agent.ike import fragment as frag
from agent.ike import natt, sk
from agent.ike.auth import AuthError
from agent.ike.child_refusal import BoundedErrors, ChildRefusals
from agent.ike.crypto import Prf, SkCipher, ike_key_lengths
from agent.ike.errors import DeleteReason, Drop, IkeError, exchange_name
from agent.ike.events import Addr, ChildSaDeleted, IkeKeysDerived, IkeSaDeleted, IkeSaEstablished, PeerAddressChanged
from agent.ike.lifetimes import Lifetimes
from agent.ike.message import (EncryptedFragmentPayload, Message, MessageError, MessageLimitError, NotifyPayload,
                               check_payload_rules, decode_payloads, encode_message)
from agent.ike.natt import IKE_PORT, NAT_T_PORT
from agent.ike.pad import Pad
from agent.ike.proposals import IkeProposal, parse_ike_proposal, wireshark_ike_encr_name, wireshark_ike_integ_name
from agent.ike.retransmit import RetransmitSchedule, fragmentation_hint, schedule_of
from agent.ike.sa_config import (HALF_OPEN_TIMEOUT_S, INITIATOR_SETUP_FACTOR, Datagram, IkeSaConfig,  # noqa: F401
                                 Pending, State, new_child_spi, new_ike_spi)
from agent.ike.status import ike_sa_status
from agent.ike.tasks.child_create import ChildCreate
from agent.ike.tasks.followup_ke import FollowupKe
from agent.ike.tasks.ike_auth import IkeAuth
from agent.ike.tasks.ike_init import IkeInit
from agent.ike.tasks.ike_intermediate import IkeIntermediate
from agent.ike.tasks.ike_rekey import IkeRekey
from agent.ike.tasks.informational import Informational
from agent.model import Peer

Rng = Callable[[int], bytes]


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


# exchanges of an authenticated IKE_SA (§2.21.3)
_AFTER_AUTH = frozenset({ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, ExchangeType.IKE_FOLLOWUP_KE})

# dispatch table: exchange type of a request -> the IkeSa attribute holding its task
_RESPONDERS = {
    ExchangeType.IKE_SA_INIT: "init",
    ExchangeType.IKE_AUTH: "ike_auth",
    ExchangeType.INFORMATIONAL: "info",
    ExchangeType.CREATE_CHILD_SA: "child_create",  # IKE proposals: handed on to ike_rekey
    ExchangeType.IKE_INTERMEDIATE: "intermediate",
    ExchangeType.IKE_FOLLOWUP_KE: "followup",
}


class IkeSa:
    """One IKE_SA (RFC 7296). Create with :meth:`new_initiator` or :meth:`new_responder`."""

    def __init__(self, config: IkeSaConfig, rng: Rng, *, initiator: bool, local: Addr, remote: Addr,
                 now: float):
        self.cfg = config
        self.rng = rng
        self.initiator = initiator
        self.local = local
        self.remote = remote
        self.peer: Peer | None = config.peer
        self.state = State.INIT
        self.spi_i = self.spi_r = 0
        self.created_at = now
        self.established_at: float | None = None
        self.last_received = now
        self.delete_reason: str | None = None
        self.delete_kind: DeleteReason | None = None  # with delete_reason
        self.outbox: list[Datagram] = []
        self.events: list = []
        self.drops: list[str] = []  # counter names for the manager (drained by it)
        self.children: list[ch.ChildSa] = []
        self.peer_initial_contact = False
        self.algorithms = ""
        self.auth_failure: str | None = None
        self.peer_cert_serial: int | None = None  # serial of the certificate the peer authenticated with
        self.virtual_ips: tuple = ()  # ours, from CP(CFG_REPLY)
        self.peer_virtual_ips: tuple = ()  # the peer's, assigned by us
        self.child_errors: list[str] = BoundedErrors()  # why CREATE_CHILD_SAs we initiated failed (last 16)
        self.rekey_at: float | None = None  # lifetimes (agent.ike.lifetimes)
        self.expire_at: float | None = None
        self.spawned: list = []  # new IkeSas (rekeys) for the manager to register
        self._successor = None  # the IkeSa our CHILD_SAs moved to
        self._rekeyed_to: tuple[int, int] | None = None
        # message IDs and window (§2.1-2.3)
        self._next_mid = self._peer_mid = 0  # our next request ID; the next we expect from the peer
        self._pending: Pending | None = None
        self._queue: list[Callable[[float], None]] = []
        self._cached_response: tuple[int, bytes, frozenset] | None = None  # (mid, response, request digests)
        self._req_digests: tuple[int, set] = (-1, set())  # datagrams of the peer's current request
        # keys: nonces and messages of IKE_SA_INIT (§2.15), SK_* (§2.14)
        self._init_request = self._init_response = self._ni = self._nr = self._last_raw = b""
        self._ike_prop: IkeProposal | None = None
        self._prf: Prf | None = None
        self._keys = None
        self._cipher: SkCipher | None = None
        self._rx_authentic = False  # the message being opened passed its ICV check
        # (first inner type, inner payloads) of the last message opened / sealed (IntAuth)
        self._rx_plain: tuple[int, bytes] | None = None
        self._tx_plain: tuple[int, bytes] | None = None
        # what the peer announced in IKE_SA_INIT
        self.nat = natt.NatState()
        self._frag_peer = False  # IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383 §2.3)
        self._peer_sig_hashes: set[int] = set()
        # RFC 7383: the peer's requests and its responses to ours are reassembled apart (R flag)
        self._frag_rx = {False: frag.Reassembler(), True: frag.Reassembler()}
        self.pad = Pad(config)
        # the tasks, one per exchange (agent.ike.tasks), and their helpers
        self.init = IkeInit(self)
        self.intermediate = IkeIntermediate(self)
        self.ike_auth = IkeAuth(self)
        self.child_create = ChildCreate(self)
        self.ike_rekey = IkeRekey(self)
        self.followup = FollowupKe(self)
        self.info = Informational(self)
        self.lifetimes = Lifetimes(self)
        self.refusals = ChildRefusals(self)

    # ------------------------------------------------------------ construction
    @classmethod
    def new_initiator(cls, config: IkeSaConfig, rng: Rng, local: Addr, remote: Addr, now: float) -> "IkeSa":
        sa = cls(config, rng, initiator=True, local=local, remote=remote, now=now)
        sa.spi_i = sa._new_ike_spi()
        return sa

    @classmethod
    def new_responder(cls, config: IkeSaConfig, rng: Rng, local: Addr, remote: Addr, spi_i: int,
                      now: float) -> "IkeSa":
        sa = cls(config, rng, initiator=False, local=local, remote=remote, now=now)
        sa.spi_i = spi_i
        sa.spi_r = sa._new_ike_spi()
        return sa

    def _new_ike_spi(self) -> int:
        return new_ike_spi(self.rng)

    def _new_child_spi(self) -> int:
        return self.cfg.new_child_spi() if self.cfg.new_child_spi is not None else new_child_spi(self.rng)

    @property
    def my_spi(self) -> int:
        return self.spi_i if self.initiator else self.spi_r

    @property
    def peer_name(self) -> str:
        return self.peer.name if self.peer else ""

    @property
    def is_dead(self) -> bool:
        return self.state == State.DELETED

    nat_detected = property(lambda self: self.nat.detected)
    child_refusals = property(lambda self: self.refusals.count, doc="refusals of our CHILD_SA in a row")

    # the manager's view of SPIs in flight (it allocates CHILD_SA SPIs unique over the node)
    _child_tasks = property(lambda self: self.child_create.tasks)
    _child_spi = property(lambda self: self.ike_auth.child_spi)

    def __repr__(self) -> str:
        return (f"IkeSa({self.peer_name or '?'}, {self.spi_i:016x}_i {self.spi_r:016x}_r, "
                f"{'initiator' if self.initiator else 'responder'}, {self.state})")

    # ------------------------------------------------------------ API
    def initiate(self, now: float) -> None:
        """Start IKE_SA_INIT: HDR, SA, KEi, Ni, N(NAT_DETECTION_*), N(SIGNATURE_HASH_ALGORITHMS) -->."""
        assert self.initiator and self.state == State.INIT
        self.init.start(now)

    def delete(self, now: float, reason: str = "deleted locally", kind: DeleteReason = DeleteReason.LOCAL) -> None:
        """INFORMATIONAL HDR, SK {D(IKE)} -->; the IKE_SA and its CHILD_SAs are gone at once.
        ``kind`` (agent.ike.errors.DeleteReason) goes with ``reason`` into IkeSaDeleted."""
        if self.state in (State.DELETING, State.DELETED):
            return
        if self.state != State.ESTABLISHED:
            self._die(reason, kind)
            return
        self.info.delete_ike(now, reason, kind)

    def _finish_delete(self) -> None:
        self.state = State.DELETED

    def delete_child(self, inbound_spi: int, now: float, reason: str = "deleted locally", *,
                     at_once: bool = False) -> None:
        """HDR, SK {D(ESP, SPI)} --> for one CHILD_SA (§1.4.1). Its ChildSaDeleted follows the
        peer's response (the inbound SA keeps accepting packets still in flight, e.g. after a
        rekey), or the end of the IKE_SA; ``at_once``: emit it now (an SA past its hard
        byte/packet lifetime refuses traffic both ways anyway)."""
        self.info.delete_child(inbound_spi, now, reason, at_once)

    def create_child(self, now: float, local_ts=None, remote_ts=None, protocol: str | None = None) -> bool:
        """Additional CHILD_SA (§1.3.1); see agent.ike.tasks.child_create.ChildCreate.create."""
        return self.child_create.create(now, local_ts, remote_ts, protocol)

    def rekey_child(self, inbound_spi: int, now: float) -> bool:
        """Rekey the CHILD_SA with this inbound SPI (§1.3.3); False if unknown or already rekeying."""
        return self.child_create.rekey(inbound_spi, now)

    def rekey_ike(self, now: float) -> bool:
        """Rekey this IKE_SA (§1.3.2): HDR, SK {SA, Ni, KEi} -->. False if not possible now."""
        return self.ike_rekey.start(now)

    def next_timer(self) -> float | None:
        """Earliest deadline (seconds) at which handle_timer must be called, or None."""
        ts = []
        if self._pending:
            ts.append(self._pending.deadline)
        setup = self.setup_deadline
        if setup is not None:
            ts.append(setup)
        ts += self.info.liveness_timers()
        ts += self.lifetimes.timers()
        ts += self.refusals.timers()
        return min(ts) if ts else None

    @property
    def setup_deadline(self) -> float | None:
        """When an IKE_SA that is not ESTABLISHED yet is given up (None once established)."""
        if self.state not in (State.INIT, State.AUTH):
            return None
        t = self.cfg.half_open_timeout_s
        return self.created_at + (t if not self.initiator else t * INITIATOR_SETUP_FACTOR)

    # when authenticated ESP/AH from the peer last arrived (note_inbound); -inf: never
    last_inbound: float = float("-inf")

    def note_inbound(self, now: float) -> None:
        """The datapath authenticated ESP/AH of this IKE_SA's CHILD_SAs at ``now``: the peer is
        alive, so no liveness check is due before ``now + dpd_interval`` (RFC 7296 §2.4: checks
        are for a peer from which nothing cryptographically protected came for a while)."""
        if now > self.last_inbound:
            self.last_inbound = now

    @property
    def liveness_since(self) -> float:
        """Last proof the peer is alive: an IKE message or authenticated ESP/AH (seconds)."""
        return self.last_received if self.last_received >= self.last_inbound else self.last_inbound

    @property
    def retransmit(self) -> RetransmitSchedule:
        """Retransmission schedule (agent.ike.retransmit): the peer policy's once the peer is
        known, else the configured one (a responder before IKE_AUTH)."""
        return schedule_of(self.peer.policy) if self.peer is not None else self.cfg.retransmit

    def _quick_init(self, p: Pending) -> bool:
        return self.initiator and p.exchange == ExchangeType.IKE_SA_INIT

    def check_liveness(self, now: float, *, hinted: bool = False) -> bool:
        """Start a liveness check now (§2.4); see Informational.check_liveness. False if not ESTABLISHED."""
        return self.info.check_liveness(now, hinted=hinted)

    def handle_timer(self, now: float) -> None:
        """Retransmit, give up, or start a liveness check (§2.4), as deadlines pass."""
        if self.state == State.DELETED:
            return
        p = self._pending
        if p and now >= p.deadline:
            if p.tries >= p.max_tries:
                self._pending = None
                if self.state == State.DELETING:
                    self.state = State.DELETED
                else:
                    hint = fragmentation_hint(p.exchange, p.data, self.local, self.cfg.fragment_size)
                    self._die("peer did not respond" + hint, DeleteReason.TIMEOUT)
                return
            p.tries += 1
            p.deadline = now + self.retransmit.wait(p.tries, init=self._quick_init(p))
            self.outbox.append(Datagram(p.data, self.local, self.remote))
            return
        setup = self.setup_deadline
        if setup is not None and now >= setup:
            self._die("half-open IKE_SA timed out" if not self.initiator else "IKE_SA setup timed out",
                      DeleteReason.SETUP_TIMEOUT)
            return
        if self.lifetimes.handle(now):
            return
        if self.refusals.handle(now):
            return
        self.info.handle_liveness(now)

    # ------------------------------------------------------------ receive
    def receive(self, msg: Message, raw: bytes, local: Addr, remote: Addr, now: float) -> str | None:
        """Process one decoded message addressed to this IKE_SA.

        Returns None when processed, else the drop reason (a counter name:
        "invalid_message_id", "bad_icv", "malformed", "unexpected_payload", ...).
        """
        if self.state == State.DELETED:
            return Drop.UNKNOWN_SPI
        if msg.is_initiator == self.initiator:
            return Drop.MALFORMED  # I flag says the sender has our role
        if msg.is_response:
            return self._receive_response(msg, raw, local, remote, now)
        return self._receive_request(msg, raw, local, remote, now)

    def _receive_response(self, msg, raw, local, remote, now) -> str | None:
        p = self._pending
        if p is None or msg.message_id != p.message_id or msg.exchange != p.exchange:
            return Drop.INVALID_MESSAGE_ID
        inner, err = self._open(msg, raw)
        if err:
            return None if err == frag.FRAGMENT_QUEUED else err
        self._pending = None
        self.last_received = now
        self._last_raw = raw
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            self.remote = remote
        else:
            self._follow_nat(remote)
        if msg.unsupported_critical or any(getattr(x, "critical", False) for x in inner):
            # §2.5: a response we cannot fully understand fails its exchange
            if msg.exchange == ExchangeType.IKE_SA_INIT:
                self._die("IKE_SA_INIT response with an unsupported critical payload")
                return None
            inner = (NotifyPayload(int(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)),)  # seen as an error notify
        if msg.exchange in _AFTER_AUTH and any(
                isinstance(x, NotifyPayload) and x.notify_type == NotifyType.INVALID_SYNTAX for x in inner):
            # §2.21.3: fatal in both peers; the peer has deleted the IKE_SA already (the setup
            # exchanges fail on any error notify by themselves)
            self._die(f"{exchange_name(msg.exchange)} refused: INVALID_SYNTAX (fatal for the IKE_SA, RFC 7296 §2.21.3)")
            return None
        try:
            p.on_response(msg, inner, now)
        except IkeError as e:  # the task gave up on the exchange: the IKE_SA ends (h11's model)
            self._die(e.text, e.kind)
        self._run_queue(now)
        return None

    def _receive_request(self, msg, raw, local, remote, now) -> str | None:
        if self._cached_response and msg.message_id == self._cached_response[0] and msg.message_id < self._peer_mid:
            # repeated request (§2.1): a retransmission is bit-for-bit identical; anything else
            # with this Message ID is not one and gets no response
            if _sha256(raw) not in self._cached_response[2]:
                return Drop.RETRANSMISSION_MISMATCH
            first = msg.payloads[0] if msg.payloads else None
            if isinstance(first, EncryptedFragmentPayload) and first.number != 1:
                return None  # RFC 7383 §2.6.1: answer a retransmitted fragmented request once, on fragment 1
            self.outbox.append(Datagram(self._cached_response[1], local, remote))
            return None
        if msg.message_id != self._peer_mid:
            return Drop.INVALID_MESSAGE_ID
        if msg.exchange != ExchangeType.IKE_SA_INIT and self._keys is None:
            return Drop.INVALID_MESSAGE_ID
        self._rx_authentic = False
        inner, err = self._open(msg, raw)
        if err and err != frag.FRAGMENT_QUEUED:
            if self._rx_authentic:
                # §2.21.3: a request that passed the ICV and window checks but does not parse is
                # answered with INVALID_SYNTAX, which is fatal for the IKE_SA in both peers
                self._respond(msg, [NotifyPayload(int(NotifyType.INVALID_SYNTAX))], local, remote)
                self._die(f"peer sent a malformed {exchange_name(msg.exchange)} request ({err}); "
                          "answered INVALID_SYNTAX (RFC 7296 §2.21.3)")
            return err
        # only datagrams that authenticated (a queued SKF fragment did) count as the request's
        # retransmissions (§2.1): a forgery must not make us re-send the response
        if self._req_digests[0] != msg.message_id:
            self._req_digests = (msg.message_id, set())
        if len(self._req_digests[1]) < 64:  # every fragment of the request (RFC 7383), bounded
            self._req_digests[1].add(_sha256(raw))
        if err:
            return None
        self.last_received = now
        self._last_raw = raw
        if msg.exchange not in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH, ExchangeType.IKE_INTERMEDIATE):
            self._follow_nat(remote)
        if msg.unsupported_critical or any(getattr(p, "critical", False) for p in inner):
            # §2.5: <-- HDR, [SK {] N(UNSUPPORTED_CRITICAL_PAYLOAD, type) [}]
            t = next(p.ptype for p in (*msg.payloads, *inner) if getattr(p, "critical", False))
            if msg.exchange == ExchangeType.IKE_SA_INIT:
                self._die("IKE_SA_INIT with an unsupported critical payload")
                self.spi_r = 0
            self._respond(msg, [NotifyPayload(int(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD), bytes([t]))],
                          local, remote)
            return None
        task = _RESPONDERS.get(msg.exchange)
        if task is None:
            return Drop.UNEXPECTED_PAYLOAD
        if msg.exchange != ExchangeType.IKE_SA_INIT and self.state == State.INIT:
            return Drop.INVALID_MESSAGE_ID
        if msg.exchange == ExchangeType.IKE_AUTH and (self.initiator or self.state != State.AUTH):
            return Drop.UNEXPECTED_PAYLOAD
        if msg.exchange == ExchangeType.IKE_AUTH and self.intermediate.missing():
            return None
        if msg.exchange in (ExchangeType.IKE_AUTH, ExchangeType.IKE_INTERMEDIATE):
            self.remote = remote  # the initiator may have moved to 4500 (§2.23)
            self.local = local
        # the task is looked up now: a test may stand in for one task of this IKE_SA
        try:
            payloads = getattr(self, task).process_request(msg, inner, now)
        except IkeError as e:  # the IKE_SA ends; the peer learns e.notify
            self._die(e.text, e.kind)
            if msg.exchange == ExchangeType.IKE_SA_INIT:
                self.spi_r = 0  # a stateless refusal: <-- HDR(SPIr 0), N(error) (§2.6, §1.2)
            payloads = [NotifyPayload(int(e.notify), e.data)] if e.notify is not None else None
        if payloads is not None:
            self._respond(msg, payloads, local, remote)
            if msg.exchange != ExchangeType.IKE_SA_INIT and any(
                    isinstance(p, NotifyPayload) and p.notify_type == NotifyType.INVALID_SYNTAX for p in payloads):
                self._die(f"peer sent an invalid {exchange_name(msg.exchange)} request; answered INVALID_SYNTAX "
                          "(RFC 7296 §2.21.3)")
        return None

    def _follow_nat(self, remote: Addr) -> None:
        """§2.23: the peer is behind a NAT and an authenticated message came from another
        address or port: send there from now on and tell the runtime (PeerAddressChanged).
        Only the side NOT behind a NAT follows (agent.ike.natt), and only while the PAD's
        endpoint binding still holds."""
        if not self.nat.may_follow(self.state == State.ESTABLISHED, self.remote, remote):
            return
        if self.peer is not None:
            try:
                self.pad.check_binding(self.peer, remote, self.nat.remote)
            except AuthError:
                return
        self.remote = tuple(remote)
        self.events.append(PeerAddressChanged(self.peer_name, self.spi_i, self.spi_r, self.remote))

    def _open(self, msg: Message, raw: bytes) -> tuple[tuple, str | None]:
        """Decrypt the SK payload and check the exchange table. Returns (inner payloads, drop reason)."""
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            try:
                check_payload_rules(msg.exchange, msg.is_response, msg.payloads)
            except MessageError:
                return (), Drop.UNEXPECTED_PAYLOAD
            return msg.payloads, None
        if self._keys is None:
            return (), Drop.INVALID_MESSAGE_ID
        opened, err = sk.open_sk(msg, raw, keys=self._keys, cipher=self._cipher, initiator=self.initiator,
                                 reassembler=self._frag_rx[msg.is_response])
        if err:
            return (), err
        first, plain = opened
        self._rx_plain = (first, plain)  # IntAuth (RFC 9242 §3.3.2)
        self._rx_authentic = True  # the ICV verified: what follows is the peer's, not noise
        try:
            inner = decode_payloads(first, plain, allow_sk=False)
        except MessageLimitError:
            return (), Drop.PAYLOAD_LIMIT  # the peer is not authenticated before IKE_AUTH completes
        except MessageError:
            return (), Drop.MALFORMED
        try:
            check_payload_rules(msg.exchange, msg.is_response, inner)
        except MessageError:
            return (), Drop.UNEXPECTED_PAYLOAD
        return inner, None

    # ------------------------------------------------------------ sending
    def _flags(self, response: bool) -> int:
        return sk.flags(self.initiator, response)

    def _seal(self, exchange: int, mid: int, response: bool, payloads: list) -> bytes:
        if exchange == ExchangeType.IKE_SA_INIT:
            return encode_message(Message(self.spi_i, self.spi_r, exchange, mid, self.initiator, response,
                                          tuple(payloads)))
        budget = frag.udp_budget(self.cfg.fragment_size, ipv6=":" in self.local[0], nat_t=self.local[1] == NAT_T_PORT)
        data, self._tx_plain = sk.seal(spi_i=self.spi_i, spi_r=self.spi_r, exchange=exchange, message_id=mid,
                                       initiator=self.initiator, response=response, payloads=payloads, keys=self._keys,
                                       cipher=self._cipher, rng=self.rng, budget=budget if self._frag_peer else None)
        return data  # _tx_plain: IntAuth (RFC 9242 §3.3.2)

    def _request(self, exchange: int, payloads: list, on_response: Callable, now: float) -> None:
        if self._pending is not None:
            # window size 1: queue until the outstanding exchange completes
            self._queue.append(lambda t: self._request(exchange, payloads, on_response, t))
            return
        mid = self._next_mid
        self._next_mid += 1
        data = self._seal(exchange, mid, False, payloads)
        sched = self.retransmit
        self._pending = Pending(mid, exchange, data, now, now + sched.wait(0), 0, on_response, sched.max_tries())
        self.outbox.append(Datagram(data, self.local, self.remote))

    def _run_queue(self, now: float) -> None:
        while self._queue and self._pending is None and self.state != State.DELETED:
            self._queue.pop(0)(now)

    def _respond(self, msg: Message, payloads: list, local: Addr, remote: Addr) -> None:
        data = self._seal(msg.exchange, msg.message_id, True, payloads)
        digests = frozenset(self._req_digests[1]) if self._req_digests[0] == msg.message_id else frozenset()
        self._cached_response = (msg.message_id, data, digests)
        self._peer_mid = msg.message_id + 1
        self.outbox.append(Datagram(data, local, remote))

    def _send_first(self, data: bytes, on_response: Callable, now: float) -> None:
        """The initiator's IKE_SA_INIT request (message ID 0), sent anew on a COOKIE or
        INVALID_KE_PAYLOAD answer with the quick IKE_SA_INIT schedule."""
        self._next_mid = 1
        sched = self.retransmit
        self._pending = Pending(0, int(ExchangeType.IKE_SA_INIT), data, now, now + sched.wait(0, init=True), 0,
                                 on_response, sched.max_tries(init=True))
        self.outbox.append(Datagram(data, self.local, self.remote))

    def _request_lazy(self, exchange: int, build, on_response, now: float) -> None:
        """Like _request, but the payloads are built when the request is actually sent."""
        if self._pending is not None:
            self._queue.append(lambda t: self._request_lazy(exchange, build, on_response, t))
            return
        payloads = build(now)
        if payloads is not None:
            self._request(exchange, payloads, on_response, now)

    # ------------------------------------------------------------ keys and state
    def _ike_proposals(self) -> list[IkeProposal]:
        return [parse_ike_proposal(s) for s in self.cfg.ike_proposals]

    def _install_keys(self, prop: IkeProposal, keys) -> None:
        """The IKE_SA's algorithms and SK_* (§2.14), from IKE_SA_INIT, IKE_INTERMEDIATE or a rekey;
        the key log (IkeKeysDerived) follows."""
        self._ike_prop = prop
        self._prf = Prf(prop.prf)
        self._keys = keys
        self._cipher = SkCipher(prop.encr, ike_key_lengths(prop)[0], prop.integ)
        self.algorithms = prop.describe()
        self.events.append(IkeKeysDerived(self.spi_i, self.spi_r, keys.sk_ei, keys.sk_er, keys.sk_ai, keys.sk_ar,
                                          wireshark_ike_encr_name(prop.encr, prop.encr_key_bits),
                                          wireshark_ike_integ_name(prop.integ)))

    def _established(self, now: float) -> None:
        self.state = State.ESTABLISHED
        self.established_at = now
        self.lifetimes.set_ike(now)
        self.events.append(IkeSaEstablished(self.peer_name, self.spi_i, self.spi_r, self.initiator,
                                            self.local, self.remote, self.algorithms))

    def _udp_encap(self) -> bool:
        return natt.udp_encap(self.nat, self.cfg.force_encap, self.peer)

    def _local_nets(self) -> tuple:
        return self.pad.local_selectors(self.cfg.local_subnets, self.virtual_ips)

    def _remote_allowed(self) -> tuple:
        """PAD rule: the peer may claim only its own subnets (or the virtual IP we gave it)."""
        return self.pad.remote_selectors(self.peer, self.peer_virtual_ips)

    # ------------------------------------------------------------ failure / deletion
    def _emit_deleted(self, reason: str, kind: DeleteReason) -> None:
        for c, why in self.info.closing:
            self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, why))
        self.info.closing = []
        for c in self.children:
            self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, reason))
        self.children = []
        self.events.append(IkeSaDeleted(self.peer_name, self.spi_i, self.spi_r, reason, self._rekeyed_to,
                                        DeleteReason(kind)))

    def _die(self, reason: str, kind: DeleteReason = DeleteReason.PROTOCOL_ERROR) -> None:
        """The IKE_SA is gone (failure or peer delete): report it and stop. ``kind``: what
        the manager decides re-initiation by (agent.ike.errors.DeleteReason)."""
        if self.state == State.DELETED:
            return
        self.delete_reason = reason
        self.delete_kind = kind
        if self.state != State.DELETING:
            self._emit_deleted(reason, kind)
        self.state = State.DELETED
        self._pending = None
        self._queue.clear()

    def status(self) -> dict:
        """JSON-ready summary (no keys); see agent.ike.status.ike_sa_status."""
        return ike_sa_status(self)

__all__ = ["IkeSa", "IkeSaConfig", "Datagram", "State", "AuthError", "NAT_T_PORT", "IKE_PORT"]
