"""IkeSa: one IKE_SA and its exchanges, sans-I/O (RFC 7296).

Driven by three inputs: API calls (:meth:`IkeSa.initiate`, :meth:`IkeSa.delete`),
:meth:`IkeSa.receive` (a decoded message with its raw bytes and addresses) and
:meth:`IkeSa.handle_timer`. Outputs: ``outbox`` (list of Datagram), ``events``
(agent.ike.events), :meth:`IkeSa.next_timer`. Exchanges are split as in
strongSwan: build/process for request and response, one method pair per
exchange (IKE_SA_INIT §1.2, IKE_AUTH §1.2, INFORMATIONAL §1.4).

Window size 1 (§2.3); requests are retransmitted after 1, 2, 4, 8, 16 s and the
IKE_SA fails with "peer did not respond" 32 s after the 5th retransmission
(§2.1); an initiator's IKE_SA_INIT first retransmits after 0.1, 0.2, 0.4, 0.8 s
(agent.ike.retransmit, per peer policy); the last response is cached and
re-sent for a repeated request.

Pure module: no I/O, time comes in as ``now``, randomness from ``rng``.
"""
from __future__ import annotations

import datetime
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Callable

from cryptography.hazmat.primitives import hashes

from agent.iana import (AuthMethod, CertEncoding, ExchangeType, HashAlgorithm, IdType, NotifyType,
                        PayloadType, ProtocolId, name_of)
from agent.ike import auth
from agent.ike import child as ch
from agent.ike import fragment as frag
from agent.ike import natt_ts
from agent.ike.auth import AuthError
from agent.ike import cp as cfgp
from agent.ike.child_refusal import CHILD_SA_REFUSALS, ChildRefusal
from agent.ike.create_child import CreateChildExchange
from agent.ike.intermediate import IntermediateExchange
from agent.ike.retransmit import RetransmitSchedule, schedule_of
from agent.ike.crypto import (CryptoError, IntegrityError, KeyExchange, KeyExchangeError, Prf, SkCipher,
                              derive_child_keymat, derive_ike_keys, nonce_ok)
from agent.ike.events import (Addr, ChildSaDeleted, ChildSaEstablished, IkeKeysDerived, IkeSaDeleted,
                              IkeSaEstablished, PeerAddressChanged)
from agent.ike.message import (HEADER_LEN, AuthPayload, CertPayload, CertReqPayload, DeletePayload,
                               EncryptedFragmentPayload, EncryptedPayload, IdPayload, KePayload, Message, MessageError,
                               MessageLimitError, NoncePayload, NotifyPayload, SaPayload, TsPayload,
                               check_payload_rules, decode_payloads, encode_header, encode_message, encode_payloads)
from agent.ike.proposals import (EspProposal, IkeProposal, ProposalError, encr_key_len, integ_key_len,
                                 parse_esp_proposal, parse_ike_proposal, wireshark_ike_encr_name,
                                 wireshark_ike_integ_name)
from agent.model import Credentials, Peer

Rng = Callable[[int], bytes]

IKE_PORT = 500
NAT_T_PORT = 4500
NONCE_LEN = 32
RETRANSMIT_BASE_S = 1.0
RETRANSMIT_FACTOR = 2.0
RETRANSMIT_TRIES = 5
HALF_OPEN_TIMEOUT_S = 30.0  # responder waiting for IKE_AUTH
# an initiator's own retransmissions (1+2+4+8+16+32 s) end first; this only backs them up
INITIATOR_SETUP_FACTOR = 4.0
HINT_LIVENESS_TRIES = 3  # liveness check after an unknown-SPI hint: gone 15 s after it starts
MAX_INIT_RETRIES = 3  # INVALID_KE_PAYLOAD / COOKIE round trips
DELETE_WAIT_TRIES = 2  # delete(): retransmissions of an outstanding request before giving up (1 + 2 s)


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram to send; the sender adds the non-ESP marker when local[1] == 4500."""
    data: bytes = field(repr=False)
    local: Addr
    remote: Addr


class State:
    INIT = "CONNECTING"
    AUTH = "AUTHENTICATING"
    ESTABLISHED = "ESTABLISHED"
    DELETING = "DELETING"
    DELETED = "DELETED"


@dataclass
class IkeSaConfig:
    """What an IkeSa needs to know about us and whom it may talk to.

    ``peer``: the configured peer (initiator: always; responder: None until
    IKE_AUTH, then ``find_peer(IDi)``, the PAD lookup, decides).
    ``ike_proposals``: proposal strings we offer (initiator) or accept (responder).
    ``force_encap``: fake our NAT_DETECTION_SOURCE_IP (strongSwan encap=yes).
    """
    identity: str
    credentials: Credentials
    local_subnets: tuple
    ike_proposals: tuple[str, ...]
    peer: Peer | None = None
    find_peer: Callable[[str], Peer | None] = lambda _ident: None
    force_encap: bool = False
    initial_contact: bool = False
    # seconds to add to ``now`` (monotonic) to get Unix time, for certificate
    # validity; the shell measures it, the core never reads a clock
    wall_offset: Callable[[], float] = lambda: 0.0
    # gateway side of CP (§3.15): (peer, IP versions asked for) -> addresses, or None (pool exhausted)
    assign_vip: Callable[[Peer, tuple], list | None] = lambda _peer, _versions: None
    # RFC 7383: IP packet size above which encrypted messages are fragmented (strongSwan's default)
    fragment_size: int = frag.DEFAULT_FRAGMENT_SIZE
    # seconds a responder IKE_SA may stay un-ESTABLISHED (initiator: 4x that as a backstop)
    half_open_timeout_s: float = HALF_OPEN_TIMEOUT_S
    # PAD (RFC 4301 §4.4.3): serial numbers of revoked peer certificates
    revoked: Callable[[], frozenset] = lambda: frozenset()
    # (peer, CHILD_SA policy) -> None or the reason it is unusable; checked before IKE_AUTH completes
    policy_problem: Callable[[Peer], str | None] = lambda _peer: None
    # inbound CHILD_SA SPI allocator of the node (IkeManager: unique over every IKE_SA, RFC 4301
    # §4.1); None: drawn from rng by this IKE_SA alone
    new_child_spi: Callable[[], int] | None = None
    # request retransmissions (RFC 7296 §2.1) while ``peer`` is unknown; then the peer policy's
    retransmit: RetransmitSchedule = field(default_factory=RetransmitSchedule)


def _sha1(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA1())
    h.update(data)
    return h.finalize()


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


# ------------------------------------------------------------------ IkeSa

@dataclass
class _Pending:
    message_id: int
    exchange: int
    data: bytes
    sent_at: float
    deadline: float
    tries: int
    on_response: Callable
    max_tries: int = RETRANSMIT_TRIES


# exchanges of an authenticated IKE_SA (§2.21.3)
_AFTER_AUTH = frozenset({ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, ExchangeType.IKE_FOLLOWUP_KE})


class IkeSa(IntermediateExchange, CreateChildExchange, ChildRefusal):
    """One IKE_SA (RFC 7296). Create with :meth:`new_initiator` or :meth:`new_responder`.

    CREATE_CHILD_SA, rekeys and lifetimes: agent.ike.create_child (``create_child``,
    ``rekey_child``, ``rekey_ike``)."""

    def __init__(self, config: IkeSaConfig, rng: Rng, *, initiator: bool, local: Addr, remote: Addr,
                 now: float):
        self.cfg = config
        self.rng = rng
        self.initiator = initiator
        self.local = local
        self.remote = remote
        self.peer: Peer | None = config.peer
        self.state = State.INIT
        self.spi_i = 0
        self.spi_r = 0
        self.created_at = now
        self.established_at: float | None = None
        self.last_received = now
        self.delete_reason: str | None = None
        self.outbox: list[Datagram] = []
        self.events: list = []
        self.children: list[ch.ChildSa] = []
        self.peer_initial_contact = False
        self.algorithms = ""
        # exchange state
        self._next_mid = 0  # our next request message ID
        self._peer_mid = 0  # next request ID we expect from the peer
        self._pending: _Pending | None = None
        self._queue: list[Callable[[float], None]] = []
        self._cached_response: tuple[int, bytes, frozenset] | None = None  # (mid, response, request digests)
        self._init_request = b""
        self._init_response = b""
        self._ni = b""
        self._nr = b""
        self._ke: KeyExchange | None = None
        self._ike_prop: IkeProposal | None = None
        self._prf: Prf | None = None
        self._keys = None
        self._cipher: SkCipher | None = None
        self._cookie: bytes | None = None
        self._init_retries = 0
        self._nat_local = False  # we are behind a NAT
        self._nat_remote = False  # the peer is behind a NAT (or fakes it)
        self._child_spi: int = 0
        self._esp_offered: list[EspProposal] = []
        self._peer_sig_hashes: set[int] = set()
        self._last_raw = b""
        self._rx_authentic = False  # the message being opened passed its ICV check
        self.auth_failure: str | None = None
        self._frag_peer = False  # the peer sent IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383 §2.3)
        self._ts_proposed: tuple = ((), ())  # TSi, TSr of our IKE_AUTH request (§2.9)
        self.peer_cert_serial: int | None = None  # serial of the certificate the peer authenticated with
        self._req_digests: tuple[int, set] = (-1, set())  # datagrams of the peer's current request
        # RFC 7383: the peer's requests and its responses to ours are reassembled apart (R flag)
        self._frag_rx = {False: frag.Reassembler(), True: frag.Reassembler()}
        self._closing: list[tuple[ch.ChildSa, str]] = []  # CHILD_SAs whose Delete awaits its response
        self._init_create_child()
        self._init_intermediate()  # RFC 9370 / RFC 9242: agent.ike.intermediate
        self._init_child_refusal()  # CHILD_SA refusals and retry backoff: agent.ike.child_refusal

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
        while True:
            spi = int.from_bytes(self.rng(8), "big")
            if spi:
                return spi

    @property
    def my_spi(self) -> int:
        return self.spi_i if self.initiator else self.spi_r

    @property
    def peer_name(self) -> str:
        return self.peer.name if self.peer else ""

    @property
    def is_dead(self) -> bool:
        return self.state == State.DELETED

    def __repr__(self) -> str:
        return (f"IkeSa({self.peer_name or '?'}, {self.spi_i:016x}_i {self.spi_r:016x}_r, "
                f"{'initiator' if self.initiator else 'responder'}, {self.state})")

    # ------------------------------------------------------------ API
    def initiate(self, now: float) -> None:
        """Start IKE_SA_INIT: HDR, SA, KEi, Ni, N(NAT_DETECTION_*), N(SIGNATURE_HASH_ALGORITHMS) -->."""
        assert self.initiator and self.state == State.INIT
        self._ni = self.rng(NONCE_LEN)
        offered = self._ike_proposals()
        self._send_init(offered[0].ke[0], now)

    def delete(self, now: float, reason: str = "deleted locally") -> None:
        """INFORMATIONAL HDR, SK {D(IKE)} -->; the IKE_SA and its CHILD_SAs are gone at once."""
        if self.state in (State.DELETING, State.DELETED):
            return
        if self.state != State.ESTABLISHED:
            self._die(reason)
            return
        self._queue.clear()
        if self._pending is not None:
            # window size 1 (§2.3): the Delete follows the outstanding exchange, whose outcome no
            # longer matters; a silent peer ends it after DELETE_WAIT_TRIES more retransmissions
            self._pending.on_response = lambda msg, inner, now: None
            self._pending.max_tries = min(self._pending.max_tries, self._pending.tries + DELETE_WAIT_TRIES)
        self._emit_deleted(reason)
        self.state = State.DELETING
        self._request(ExchangeType.INFORMATIONAL, [DeletePayload(int(ProtocolId.IKE))],
                      lambda msg, inner, now: self._finish_delete(), now)

    def _finish_delete(self) -> None:
        self.state = State.DELETED

    def next_timer(self) -> float | None:
        """Earliest deadline (seconds) at which handle_timer must be called, or None."""
        ts = []
        if self._pending:
            ts.append(self._pending.deadline)
        setup = self.setup_deadline
        if setup is not None:
            ts.append(setup)
        dpd = self._dpd_interval()
        if self.state == State.ESTABLISHED and not self._pending and dpd:
            ts.append(self.liveness_since + dpd)
        ts += self._lifetime_timers()
        ts += self._child_retry_timers()
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

    def _quick_init(self, p: _Pending) -> bool:
        return self.initiator and p.exchange == ExchangeType.IKE_SA_INIT

    def _dpd_interval(self) -> float:
        """Liveness check interval in seconds; 0 (or less): no periodic checks."""
        d = self.peer.policy.dpd_interval_s if self.peer else 0
        return d if d and d > 0 else 0.0

    def _fragmentation_hint(self, p: _Pending) -> str:
        """Why a peer may not have answered a big request: an IP packet above ``fragment_size``
        sent whole (RFC 7383 not negotiated, or IKE_SA_INIT, which it cannot split) travels as IP
        fragments, which many paths drop. "" when the request was small or sent as SKF fragments."""
        if getattr(p.data, "fragments", None):
            return ""
        ipv6 = ":" in self.local[0]
        packet = len(p.data) + (40 if ipv6 else 20) + 8 + (4 if self.local[1] == NAT_T_PORT else 0)
        if packet <= self.cfg.fragment_size:
            return ""
        why = ("the peer did not announce IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383)"
               if p.exchange != ExchangeType.IKE_SA_INIT else "IKE_SA_INIT cannot be fragmented by RFC 7383")
        return (f" (likely cause: lost IP fragments; our {_xname(p.exchange)} request was a {packet}-octet IP "
                f"packet, above fragment_size {self.cfg.fragment_size}, sent unfragmented because {why}; "
                "enable fragmentation on the peer, or check that the path passes IP fragments)")

    def check_liveness(self, now: float, *, hinted: bool = False) -> bool:
        """Start a liveness check now (§2.4): HDR, SK {} -->. ``hinted``: after an unauthenticated
        hint that the peer lost its state (INVALID_IKE_SPI / INVALID_SPI, §2.21.4), give up
        after HINT_LIVENESS_TRIES retransmissions instead of the full schedule.
        An outstanding request probes the peer too: after a hint it gets the short schedule.
        Returns False if not ESTABLISHED."""
        if self.state != State.ESTABLISHED:
            return False
        if self._pending is not None:
            if hinted:
                self._pending.max_tries = min(self._pending.max_tries, HINT_LIVENESS_TRIES)
            return True
        self._request(ExchangeType.INFORMATIONAL, [], lambda msg, inner, now: None, now)
        if hinted and self._pending is not None:
            self._pending.max_tries = HINT_LIVENESS_TRIES
        return True

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
                    self._die("peer did not respond" + self._fragmentation_hint(p))
                return
            p.tries += 1
            p.deadline = now + self.retransmit.wait(p.tries, init=self._quick_init(p))
            self.outbox.append(Datagram(p.data, self.local, self.remote))
            return
        setup = self.setup_deadline
        if setup is not None and now >= setup:
            self._die("half-open IKE_SA timed out" if not self.initiator else "IKE_SA setup timed out")
            return
        if self._handle_lifetimes(now):
            return
        if self._handle_child_retry(now):
            return
        dpd = self._dpd_interval()
        if (self.state == State.ESTABLISHED and not self._pending and dpd
                and now >= self.liveness_since + dpd):
            # liveness check: HDR, SK {} -->
            self._request(ExchangeType.INFORMATIONAL, [], lambda msg, inner, now: None, now)

    # ------------------------------------------------------------ receive
    def receive(self, msg: Message, raw: bytes, local: Addr, remote: Addr, now: float) -> str | None:
        """Process one decoded message addressed to this IKE_SA.

        Returns None when processed, else the drop reason (a counter name:
        "invalid_message_id", "bad_icv", "malformed", "unexpected_payload", ...).
        """
        if self.state == State.DELETED:
            return "unknown_spi"
        if msg.is_initiator == self.initiator:
            return "malformed"  # I flag says the sender has our role
        if msg.is_response:
            return self._receive_response(msg, raw, local, remote, now)
        return self._receive_request(msg, raw, local, remote, now)

    def _receive_response(self, msg, raw, local, remote, now) -> str | None:
        p = self._pending
        if p is None or msg.message_id != p.message_id or msg.exchange != p.exchange:
            return "invalid_message_id"
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
            self._die(f"{_xname(msg.exchange)} refused: INVALID_SYNTAX (fatal for the IKE_SA, RFC 7296 §2.21.3)")
            return None
        p.on_response(msg, inner, now)
        self._run_queue(now)
        return None

    def _receive_request(self, msg, raw, local, remote, now) -> str | None:
        if self._cached_response and msg.message_id == self._cached_response[0] and msg.message_id < self._peer_mid:
            # repeated request (§2.1): a retransmission is bit-for-bit identical; anything else
            # with this Message ID is not one and gets no response
            if _sha256(raw) not in self._cached_response[2]:
                return "retransmission_mismatch"
            first = msg.payloads[0] if msg.payloads else None
            if isinstance(first, EncryptedFragmentPayload) and first.number != 1:
                return None  # RFC 7383 §2.6.1: answer a retransmitted fragmented request once, on fragment 1
            self.outbox.append(Datagram(self._cached_response[1], local, remote))
            return None
        if msg.message_id != self._peer_mid:
            return "invalid_message_id"
        if msg.exchange != ExchangeType.IKE_SA_INIT and self._keys is None:
            return "invalid_message_id"
        self._rx_authentic = False
        inner, err = self._open(msg, raw)
        if err and err != frag.FRAGMENT_QUEUED:
            if self._rx_authentic:
                # §2.21.3: a request that passed the ICV and window checks but does not parse is
                # answered with INVALID_SYNTAX, which is fatal for the IKE_SA in both peers
                self._respond(msg, [NotifyPayload(int(NotifyType.INVALID_SYNTAX))], local, remote)
                self._die(f"peer sent a malformed {_xname(msg.exchange)} request ({err}); "
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
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            handler = self._process_init_request
        elif msg.exchange == ExchangeType.IKE_AUTH:
            handler = self._process_auth_request
        elif msg.exchange == ExchangeType.INFORMATIONAL:
            handler = self._process_info_request
        elif msg.exchange == ExchangeType.CREATE_CHILD_SA:
            handler = self._process_create_child_request
        elif msg.exchange == ExchangeType.IKE_INTERMEDIATE:
            handler = self._process_intermediate_request
        elif msg.exchange == ExchangeType.IKE_FOLLOWUP_KE:
            handler = self._process_followup_request
        else:
            return "unexpected_payload"
        if msg.exchange != ExchangeType.IKE_SA_INIT and self.state == State.INIT:
            return "invalid_message_id"
        if msg.exchange == ExchangeType.IKE_AUTH and (self.initiator or self.state != State.AUTH):
            return "unexpected_payload"
        if msg.exchange == ExchangeType.IKE_AUTH and self._addke_missing():
            return None
        if msg.exchange in (ExchangeType.IKE_AUTH, ExchangeType.IKE_INTERMEDIATE):
            self.remote = remote  # the initiator may have moved to 4500 (§2.23)
            self.local = local
        payloads = handler(msg, inner, now)
        if payloads is not None:
            self._respond(msg, payloads, local, remote)
            if msg.exchange != ExchangeType.IKE_SA_INIT and any(
                    isinstance(p, NotifyPayload) and p.notify_type == NotifyType.INVALID_SYNTAX for p in payloads):
                self._die(f"peer sent an invalid {_xname(msg.exchange)} request; answered INVALID_SYNTAX "
                          "(RFC 7296 §2.21.3)")
        return None

    def _follow_nat(self, remote: Addr) -> None:
        """§2.23: the peer is behind a NAT and an authenticated message came from another
        address or port: send there from now on and tell the runtime (PeerAddressChanged).
        Only the side NOT behind a NAT follows: when we are behind one (the peer's
        NAT_DETECTION_DESTINATION_IP did not match our address), ``_nat_remote`` may only say
        that the peer fakes its NAT_DETECTION_SOURCE_IP (forced UDP encapsulation, our
        default), and the address we reach the peer at is not ours to change."""
        if (not self._nat_remote or self._nat_local or self.state != State.ESTABLISHED
                or tuple(remote) == tuple(self.remote)):
            return
        if self.peer is not None:
            try:
                self._check_binding(self.peer, remote)  # PAD bind_endpoints still holds
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
                return (), "unexpected_payload"
            return msg.payloads, None
        if self._keys is None:
            return (), "invalid_message_id"
        sk = msg.payloads[0] if len(msg.payloads) == 1 else None
        sk_e, sk_a = ((self._keys.sk_er, self._keys.sk_ar) if self.initiator
                      else (self._keys.sk_ei, self._keys.sk_ai))
        if isinstance(sk, EncryptedFragmentPayload):  # RFC 7383 §2.6
            res = self._frag_rx[msg.is_response].add((msg.message_id, msg.exchange), sk, raw,
                                    lambda aad, body: self._cipher.decrypt(sk_e, sk_a, aad, body))
            if isinstance(res, str):
                return (), res
            first, plain = res
        elif isinstance(sk, EncryptedPayload):
            try:
                plain = self._cipher.decrypt(sk_e, sk_a, raw[:HEADER_LEN + 4], sk.body)
            except IntegrityError:
                return (), "bad_icv"
            except CryptoError:
                return (), "malformed"
            first = sk.first
        else:
            return (), "unexpected_payload"
        self._rx_plain = (first, plain)  # IntAuth (RFC 9242 §3.3.2)
        self._rx_authentic = True  # the ICV verified: what follows is the peer's, not noise
        try:
            inner = decode_payloads(first, plain, allow_sk=False)
        except MessageLimitError:
            return (), "payload_limit"  # the peer is not authenticated before IKE_AUTH completes
        except MessageError:
            return (), "malformed"
        try:
            check_payload_rules(msg.exchange, msg.is_response, inner)
        except MessageError:
            return (), "unexpected_payload"
        return inner, None

    # ------------------------------------------------------------ sending
    def _flags(self, response: bool) -> int:
        return (0x08 if self.initiator else 0) | (0x20 if response else 0)

    def _seal(self, exchange: int, mid: int, response: bool, payloads: list) -> bytes:
        if exchange == ExchangeType.IKE_SA_INIT:
            return encode_message(Message(self.spi_i, self.spi_r, exchange, mid, self.initiator, response,
                                          tuple(payloads)))
        first, plain = encode_payloads(payloads)
        self._tx_plain = (first, plain)  # IntAuth (RFC 9242 §3.3.2)
        body_len = self._cipher.encrypted_len(len(plain))
        hdr = encode_header(self.spi_i, self.spi_r, int(PayloadType.SK), exchange, self._flags(response),
                            mid, HEADER_LEN + 4 + body_len)
        skh = struct.pack("!BBH", first, 0, 4 + body_len)
        sk_e, sk_a = ((self._keys.sk_ei, self._keys.sk_ai) if self.initiator
                      else (self._keys.sk_er, self._keys.sk_ar))
        whole = hdr + skh + self._cipher.encrypt(sk_e, sk_a, self.rng, hdr + skh, plain)
        budget = frag.udp_budget(self.cfg.fragment_size, ipv6=":" in self.local[0], nat_t=self.local[1] == NAT_T_PORT)
        if self._frag_peer and len(whole) > budget:
            # RFC 7383 §2.5: on the wire as SKF fragments; kept whole for caches
            return frag.FragmentedMessage(whole, frag.fragment(
                spi_i=self.spi_i, spi_r=self.spi_r, exchange=exchange, flags=self._flags(response), message_id=mid,
                first=first, plaintext=plain, cipher=self._cipher, sk_e=sk_e, sk_a=sk_a, rng=self.rng,
                budget=budget))
        return whole

    def _request(self, exchange: int, payloads: list, on_response: Callable, now: float) -> None:
        if self._pending is not None:
            # window size 1: queue until the outstanding exchange completes
            self._queue.append(lambda t: self._request(exchange, payloads, on_response, t))
            return
        mid = self._next_mid
        self._next_mid += 1
        data = self._seal(exchange, mid, False, payloads)
        sched = self.retransmit
        self._pending = _Pending(mid, exchange, data, now, now + sched.wait(0), 0, on_response, sched.max_tries())
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

    # ------------------------------------------------------------ failure / deletion
    def _emit_deleted(self, reason: str) -> None:
        for c, why in self._closing:
            self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, why))
        self._closing = []
        for c in self.children:
            self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, reason))
        self.children = []
        self.events.append(IkeSaDeleted(self.peer_name, self.spi_i, self.spi_r, reason, self._rekeyed_to))

    def _die(self, reason: str) -> None:
        """The IKE_SA is gone (failure or peer delete): report it and stop."""
        if self.state == State.DELETED:
            return
        self.delete_reason = reason
        if self.state != State.DELETING:
            self._emit_deleted(reason)
        self.state = State.DELETED
        self._pending = None
        self._queue.clear()

    def _fail_with_notify(self, ntype: int, reason: str, now: float) -> None:
        """Initiator-side error after IKE_AUTH: HDR, SK {N(error)} --> then gone (§2.21.2)."""
        data = self._seal(ExchangeType.INFORMATIONAL, self._next_mid, False, [NotifyPayload(int(ntype))])
        self._next_mid += 1
        self.outbox.append(Datagram(data, self.local, self.remote))
        self._die(reason)

    # ------------------------------------------------------------ IKE_SA_INIT
    def _ike_proposals(self) -> list[IkeProposal]:
        return [parse_ike_proposal(s) for s in self.cfg.ike_proposals]

    def _nat_hashes(self, local: Addr, remote: Addr, spi_r: int) -> tuple[bytes, bytes]:
        spis = struct.pack("!QQ", self.spi_i, spi_r)

        def h(addr: Addr) -> bytes:
            return _sha1(spis + ipaddress.ip_address(addr[0]).packed + struct.pack("!H", addr[1]))
        src = h(local)
        if self.cfg.force_encap:
            src = _sha1(self.rng(20))  # cannot match: forces UDP encapsulation
        return src, h(remote)

    def _nat_notifies(self, spi_r: int) -> list:
        src, dst = self._nat_hashes(self.local, self.remote, spi_r)
        return [NotifyPayload(int(NotifyType.NAT_DETECTION_SOURCE_IP), src),
                NotifyPayload(int(NotifyType.NAT_DETECTION_DESTINATION_IP), dst)]

    def _check_nat(self, payloads, local: Addr, remote: Addr, spi_r: int) -> None:
        spis = struct.pack("!QQ", self.spi_i, spi_r)
        srcs = [p.data for p in payloads if isinstance(p, NotifyPayload)
                and p.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dsts = [p.data for p in payloads if isinstance(p, NotifyPayload)
                and p.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
        if not srcs and not dsts:
            return  # peer does not support NAT-T
        r = _sha1(spis + ipaddress.ip_address(remote[0]).packed + struct.pack("!H", remote[1]))
        l_ = _sha1(spis + ipaddress.ip_address(local[0]).packed + struct.pack("!H", local[1]))
        # a peer forcing UDP encapsulation fakes its source hash, so _nat_remote is also true for
        # a peer that is not behind a NAT at all; _nat_local is always real (destination hashes
        # are never faked). _follow_nat therefore follows only with _nat_remote and not _nat_local.
        self._nat_remote = r not in srcs
        self._nat_local = l_ not in dsts

    @property
    def nat_detected(self) -> bool:
        return self._nat_local or self._nat_remote

    def _sig_hash_notify(self) -> list:
        if not self.cfg.credentials.uses_certificates:
            return []
        # all we verify, IDENTITY included: without it a peer cannot sign with Ed25519 (RFC 8420 §2)
        data = b"".join(struct.pack("!H", h) for h in auth.SUPPORTED_HASH_ALGORITHMS)
        return [NotifyPayload(int(NotifyType.SIGNATURE_HASH_ALGORITHMS), data)]

    def _send_init(self, group: int, now: float) -> None:
        body = getattr(self, "_init_body", None)
        if body is None or self._ke is None or self._ke.ke_id != group:
            # a COOKIE retry keeps the same KEi and NAT-D (§2.6: the same payloads, cookie first);
            # only INVALID_KE_PAYLOAD (another group) makes a new key exchange
            self._ke = KeyExchange(group, self.rng)
            body = self._init_body = [
                ch.ike_sa_payload(self._ike_proposals()), KePayload(group, self._ke.public_bytes()),
                NoncePayload(self._ni), *self._nat_notifies(0), *self._sig_hash_notify(),
                NotifyPayload(int(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)), *self._intermediate_notify()]
        payloads = []
        if self._cookie is not None:
            payloads.append(NotifyPayload(int(NotifyType.COOKIE), self._cookie))
        payloads += body
        self._next_mid = 0
        self._pending = None
        msg = Message(self.spi_i, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(payloads))
        data = encode_message(msg)
        self._init_request = data
        self._next_mid = 1
        sched = self.retransmit
        self._pending = _Pending(0, int(ExchangeType.IKE_SA_INIT), data, now, now + sched.wait(0, init=True), 0,
                                 self._process_init_response, sched.max_tries(init=True))
        self.outbox.append(Datagram(data, self.local, self.remote))

    def _process_init_response(self, msg: Message, inner, now: float) -> None:
        """<-- HDR, SA, KEr, Nr, N(NAT_DETECTION_*), [CERTREQ]  (or N(error), N(COOKIE))."""
        offered = self._ike_proposals()
        ke_note = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        cookie = msg.notify(NotifyType.COOKIE)
        if ke_note is not None or cookie is not None:
            self._init_retries += 1
            if self._init_retries > MAX_INIT_RETRIES:
                self._die("IKE_SA_INIT: too many INVALID_KE_PAYLOAD/COOKIE round trips")
                return
            group = self._ke.ke_id
            if ke_note is not None:
                if len(ke_note.data) != 2:
                    self._die("INVALID_KE_PAYLOAD without a group")
                    return
                group = struct.unpack("!H", ke_note.data)[0]
                if not any(group in p.ke for p in offered) or group == self._ke.ke_id:
                    self._die(f"INVALID_KE_PAYLOAD names group {group} we did not offer")
                    return
            if cookie is not None:
                self._cookie = cookie.data
            self._send_init(group, now)  # HDR, [N(COOKIE),] SA, KEi(new group), Ni -->
            return
        errors = [n for n in msg.notifies() if n.is_error]
        if errors:
            self._die(f"IKE_SA_INIT refused: {_nname(errors[0].notify_type)}"
                      + (self._hybrid_hint(None, offered) if errors[0].notify_type == NotifyType.NO_PROPOSAL_CHOSEN
                         else ""))
            return
        sa, ke, nr = msg.first(PayloadType.SA), msg.first(PayloadType.KE), msg.first(PayloadType.NONCE)
        if sa is None or ke is None or nr is None or msg.spi_r == 0:
            self._die("IKE_SA_INIT response lacks SA, KE or Nr")
            return
        prop = ch.accepted_ike(sa, offered)
        if prop is None or prop.ke[0] != ke.group or ke.group != self._ke.ke_id:
            self._die("IKE_SA_INIT response: proposal or KE method we did not offer")
            return
        if not nonce_ok(nr.data, prop.prf):  # §2.10: 16-256 octets, at least half the PRF key size
            self._die(f"IKE_SA_INIT response: bad nonce length {len(nr.data)}")
            return
        self.spi_r = msg.spi_r
        self._nr = nr.data
        self._init_response = self._last_raw
        try:
            self._derive(prop, self._ke.shared_secret(ke.data))
        except KeyExchangeError as e:
            self._die(f"IKE_SA_INIT: {e}")
            return
        self._check_nat(msg.payloads, self.local, self.remote, self.spi_r)
        self._note_sig_hashes(msg.payloads)
        self.state = State.AUTH
        if self.nat_detected or self.cfg.force_encap:
            # §2.23: continue on port 4500
            self.local = (self.local[0], NAT_T_PORT)
            self.remote = (self.remote[0], NAT_T_PORT)
        self._after_init(msg.payloads, now)  # IKE_INTERMEDIATE per additional key exchange, then IKE_AUTH

    def _note_sig_hashes(self, payloads) -> None:
        self._frag_peer = any(isinstance(p, NotifyPayload) and p.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED
                              for p in payloads)
        n = next((p for p in payloads if isinstance(p, NotifyPayload)
                  and p.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS), None)
        if n is not None:
            self._peer_sig_hashes = {struct.unpack_from("!H", n.data, i)[0] for i in range(0, len(n.data) - 1, 2)}

    def _derive(self, prop: IkeProposal, g_ir: bytes) -> None:
        self._ike_prop = prop
        self._prf = Prf(prop.prf)
        ek = encr_key_len(prop.encr, prop.encr_key_bits)
        ak = integ_key_len(prop.integ) if prop.integ else 0
        self._keys = derive_ike_keys(prop.prf, self._ni, self._nr, g_ir, self.spi_i, self.spi_r, ek, ak)
        self._cipher = SkCipher(prop.encr, ek, prop.integ)
        self.algorithms = prop.describe()
        self.events.append(IkeKeysDerived(self.spi_i, self.spi_r, self._keys.sk_ei, self._keys.sk_er,
                                          self._keys.sk_ai, self._keys.sk_ar,
                                          wireshark_ike_encr_name(prop.encr, prop.encr_key_bits),
                                          wireshark_ike_integ_name(prop.integ)))

    def _process_init_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SA, KEi, Ni --> ; <-- HDR, SA, KEr, Nr, N(NAT_DETECTION_*), [CERTREQ]."""
        sa, ke, ni = msg.first(PayloadType.SA), msg.first(PayloadType.KE), msg.first(PayloadType.NONCE)
        if not 16 <= len(ni.data) <= 256:
            self._die("IKE_SA_INIT: bad nonce length")
            return self._stateless_error(NotifyType.INVALID_SYNTAX)
        try:
            ours = self._ike_proposals()
        except ProposalError:
            ours = []
        res = ch.choose_ike(sa, ours, ke.group, allow_add_ke=self._announces_intermediate(msg.payloads))
        if res is None:
            self._die("IKE_SA_INIT: no proposal chosen" + self._hybrid_hint(sa, ours))
            return self._stateless_error(NotifyType.NO_PROPOSAL_CHOSEN)
        choice, _kes = res
        if not nonce_ok(ni.data, choice.proposal.prf):  # §2.10: at least half the PRF key size
            self._die(f"IKE_SA_INIT: nonce of {len(ni.data)} octets is shorter than half the PRF key")
            return self._stateless_error(NotifyType.INVALID_SYNTAX)
        if choice.proposal.ke[0] != ke.group:
            self._die("IKE_SA_INIT: asked the initiator for another KE method")
            return self._stateless_error(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", choice.proposal.ke[0]))
        try:
            self._ke = KeyExchange(ke.group, self.rng)
            g_ir = self._ke.shared_secret(ke.data)
        except KeyExchangeError as e:
            self._die(f"IKE_SA_INIT: {e}")
            return self._stateless_error(NotifyType.INVALID_SYNTAX)
        self._ni = ni.data
        self._nr = self.rng(NONCE_LEN)
        self._init_request = self._last_raw
        self._derive(choice.proposal, g_ir)
        self._check_nat(msg.payloads, self.local, self.remote, 0)
        self._note_sig_hashes(msg.payloads)
        sa_out = SaPayload((_renumber(ch.ike_sa_payload([choice.proposal]).proposals[0], choice.number),))
        # responder NAT-D hashes use both SPIs (§2.23)
        payloads = [sa_out, KePayload(ke.group, self._ke.public_bytes()), NoncePayload(self._nr),
                    *self._nat_notifies(self.spi_r)]
        if self.cfg.credentials.uses_certificates:
            payloads.append(self._certreq())
        payloads += self._sig_hash_notify()
        payloads += self._intermediate_reply(msg.payloads)
        if self._frag_peer:  # RFC 7383 §2.3: only in answer to the initiator's announcement
            payloads.append(NotifyPayload(int(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)))
        self.state = State.AUTH
        data = self._seal(ExchangeType.IKE_SA_INIT, 0, True, payloads)
        self._init_response = data
        return payloads

    def _stateless_error(self, ntype: int, data: bytes = b"") -> list:
        """<-- HDR, N(error): sent with SPIr 0 (§2.6 / §1.2)."""
        self.spi_r = 0
        return [NotifyPayload(int(ntype), data)]

    def _certreq(self) -> CertReqPayload:
        return CertReqPayload(int(CertEncoding.X509_CERTIFICATE_SIGNATURE),
                              b"".join(auth.certreq_hash(c) for c in self.cfg.credentials.ca_certificates))

    # ------------------------------------------------------------ IKE_AUTH
    def _my_auth(self, id_payload: IdPayload, psk: bytes | None) -> AuthPayload:
        prf = self._ike_prop.prf
        if self.initiator:
            octets = auth.signed_octets(prf, self._init_request, self._nr, self._keys.sk_pi, id_payload.body,
                                        self._int_auth())
        else:
            octets = auth.signed_octets(prf, self._init_response, self._ni, self._keys.sk_pr, id_payload.body,
                                        self._int_auth())
        if psk is not None:
            return AuthPayload(int(AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE), auth.psk_auth(prf, psk, octets))
        hashes_ok = tuple(sorted(self._peer_sig_hashes)) or None
        return AuthPayload(int(AuthMethod.DIGITAL_SIGNATURE),
                           auth.sign_digital_signature(self.cfg.credentials.private_key_pem, octets, hashes_ok))

    def _verify_peer(self, idp: IdPayload, auth_p: AuthPayload | None, certs: list, peer: Peer, now: float) -> None:
        """Check the peer's ID, certificate and AUTH (§2.15); raises AuthError."""
        ident = auth.id_text(idp.id_type, idp.data)
        if ident is None:
            raise AuthError(f"peer identity of type {name_of(IdType, idp.id_type)} is not supported or malformed "
                            "(we take ID_FQDN, ID_RFC822_ADDR, ID_IPV4_ADDR, ID_IPV6_ADDR, ID_DER_ASN1_DN)")
        if not auth.same_identity(peer.identity, ident):
            raise AuthError(f"peer identity {ident!r} ({name_of(IdType, idp.id_type)}) is not the expected "
                            f"{peer.identity!r}")
        if auth_p is None:
            raise AuthError("no AUTH payload")
        prf = self._ike_prop.prf
        if self.initiator:
            octets = auth.signed_octets(prf, self._init_response, self._ni, self._keys.sk_pr, idp.body,
                                        self._int_auth())
        else:
            octets = auth.signed_octets(prf, self._init_request, self._nr, self._keys.sk_pi, idp.body,
                                        self._int_auth())
        if auth_p.method == AuthMethod.SHARED_KEY_MESSAGE_INTEGRITY_CODE:
            psk = self._psk_for(peer)
            if psk is None:
                raise AuthError("peer used a PSK but none is configured for it")
            auth.verify_psk_auth(prf, psk, octets, auth_p.data)
            return
        if auth_p.method == AuthMethod.DIGITAL_SIGNATURE:
            if not self.cfg.credentials.ca_certificates:
                raise AuthError("peer used a certificate but we have no CA to verify it")
            x509s = [c.data for c in certs if c.encoding == CertEncoding.X509_CERTIFICATE_SIGNATURE]
            leaf = auth.verify_certificate_chain(x509s, list(self.cfg.credentials.ca_certificates),
                                                now + self.cfg.wall_offset())
            if leaf.serial_number in self.cfg.revoked():  # PAD: revoked by the controller
                raise AuthError(f"certificate of {peer.name!r} (serial {leaf.serial_number}) is revoked")
            auth.identity_matches_certificate(idp.id_type, idp.data, leaf)
            auth.verify_digital_signature(leaf, octets, auth_p.data)
            self.peer_cert_serial = leaf.serial_number
            return
        raise AuthError(f"unsupported AUTH method {auth_p.method}")

    def _check_binding(self, peer: Peer, remote: Addr) -> None:
        """PAD endpoint binding (PeerPolicy.bind_endpoints): unless NAT-D found the peer behind a
        NAT, its IKE source address must be one of its configured endpoints; raises AuthError."""
        # NAT-D (§2.23) says nothing when the policy fakes it (encapsulation udp, strongSwan
        # encap=yes): then the binding is strict
        nat = self._nat_remote and peer.policy.encapsulation != "udp"
        if getattr(peer.policy, "bind_endpoints", False) and not nat and remote[0] not in peer.endpoints:
            raise AuthError(f"peer {peer.name!r} authenticated from {remote[0]}, not one of its endpoints "
                            f"{', '.join(peer.endpoints) or '(none)'} (bind_endpoints is on)")

    def _psk_for(self, peer: Peer) -> bytes | None:
        return peer.psk if peer.psk is not None else self.cfg.credentials.psk

    def _my_psk(self, peer: Peer) -> bytes | None:
        """PSK we authenticate with, or None for certificates."""
        if peer.psk is not None:
            return peer.psk
        return None if self.cfg.credentials.uses_certificates else self.cfg.credentials.psk

    def _id(self, ptype: int) -> IdPayload:
        """Our IDi / IDr (§3.5): ID_FQDN for a name, ID_IPV4_ADDR / ID_IPV6_ADDR for an address,
        ID_DER_ASN1_DN for a DN (our certificate's subject, byte for byte, when it is that DN)."""
        want = auth.id_for_identity(self.cfg.identity)
        if want is not None:
            return IdPayload(ptype, *want)
        return IdPayload(ptype, int(IdType.ID_DER_ASN1_DN), auth.dn_for_identity(
            self.cfg.identity, self.cfg.credentials.certificate_chain[:1]))

    def _cert_payloads(self, psk: bytes | None) -> list:
        if psk is not None:
            return []
        return [CertPayload(int(CertEncoding.X509_CERTIFICATE_SIGNATURE), c)
                for c in self.cfg.credentials.certificate_chain]

    def _send_auth(self, now: float) -> None:
        """HDR, SK {IDi, [CERT,] [CERTREQ,] [N(INITIAL_CONTACT),] IDr, AUTH, SA, TSi, TSr} -->."""
        peer = self.peer
        psk = self._my_psk(peer)
        idi = self._id(PayloadType.IDi)
        payloads: list = [idi, *self._cert_payloads(psk)]
        if self.cfg.credentials.ca_certificates:
            payloads.append(self._certreq())
        if self.cfg.initial_contact:
            payloads.append(NotifyPayload(int(NotifyType.INITIAL_CONTACT)))
        want = auth.id_for_identity(peer.identity)  # IDr is optional (§3.5): left out for a DN
        if want is not None:
            payloads.append(IdPayload(int(PayloadType.IDr), *want))
        try:
            payloads.append(self._my_auth(idi, psk))
        except (AuthError, CryptoError) as e:
            self._die(f"cannot authenticate ourselves: {e}")
            return
        self._child_spi = self._new_child_spi()
        # first kind of the policy: ESP, or AH for "ah" ("ah+esp": its AH SA follows in CREATE_CHILD_SA)
        first_kind = ch.kinds(peer.policy)[0]
        problem = self.cfg.policy_problem(peer)
        if problem is not None:  # never an ESTABLISHED IKE_SA without its CHILD_SA
            self._die(f"refused: {problem}")
            return
        try:
            self._esp_offered = ch.offers(peer.policy, first_kind)
        except ProposalError as e:
            self._die(f"refused: peer {peer.name!r}: bad esp_proposals: {e}")
            return
        vip_versions = tuple(getattr(peer.policy, "request_virtual_ip", ()) or ())
        tsi_nets = self.cfg.local_subnets
        if vip_versions:
            # CP(CFG_REQUEST) (§3.15.1); TSi any: the gateway narrows it to the address it assigns
            payloads.append(cfgp.request(4 in vip_versions, 6 in vip_versions).encode())
            tsi_nets = tuple(ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0") for v in vip_versions)
        payloads.append(ch.esp_sa_payload(self._esp_offered, self._child_spi))
        self._ts_proposed = (ch.ts_from_networks(tsi_nets), ch.ts_from_networks(peer.subnets))
        payloads.append(TsPayload(int(PayloadType.TSi), self._ts_proposed[0]))
        payloads.append(TsPayload(int(PayloadType.TSr), self._ts_proposed[1]))
        if ch.child_mode(peer.policy, first_kind) == "transport":
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        self._request(ExchangeType.IKE_AUTH, payloads, self._process_auth_response, now)

    def _new_child_spi(self) -> int:
        if self.cfg.new_child_spi is not None:
            return self.cfg.new_child_spi()
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 256:  # 1-255 reserved (RFC 4303 §2.1)
                return spi

    def _process_auth_response(self, msg: Message, inner, now: float) -> None:
        """<-- HDR, SK {IDr, [CERT,] AUTH, SA, TSi, TSr}."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, False, True, tuple(inner))
        errors = [n for n in m.notifies() if n.is_error]
        auth_err = next((n for n in errors if n.notify_type == NotifyType.AUTHENTICATION_FAILED), None)
        if auth_err is not None:
            self._die("peer refused our authentication (AUTHENTICATION_FAILED)")
            return
        idr = m.first(PayloadType.IDr)
        if idr is None or m.first(PayloadType.AUTH) is None:
            self._die(f"IKE_AUTH failed: {_nname(errors[0].notify_type) if errors else 'no IDr/AUTH'}")
            return
        try:
            self._verify_peer(idr, m.first(PayloadType.AUTH), m.get(PayloadType.CERT), self.peer, now)
            self._check_binding(self.peer, self.remote)
        except (AuthError, CryptoError) as e:
            self._fail_with_notify(NotifyType.AUTHENTICATION_FAILED, f"AUTHENTICATION_FAILED: {e}", now)
            return
        self._established(now)
        first_kind = ch.kinds(self.peer.policy)[0]
        # §1.2, §2.21.2: a refused CHILD_SA leaves the IKE_SA up; the CHILD_SA is retried with
        # CREATE_CHILD_SA after a backoff (agent.ike.child_refusal). Not with a virtual IP: that
        # comes only with IKE_AUTH, so such an IKE_SA is deleted and set up again.
        wanted = (None if getattr(self.peer.policy, "request_virtual_ip", ()) else
                  (tuple(self.cfg.local_subnets), tuple(self.peer.subnets), first_kind))
        sa, tsi, tsr = m.first(PayloadType.SA), m.first(PayloadType.TSi), m.first(PayloadType.TSr)

        def refuse(reason: str, notify: int | None = None) -> None:
            if sa is not None and notify is None:
                self._delete_unwanted(self._child_spi, now, first_kind)  # the responder installed it
            if wanted is None or (notify is not None and notify not in CHILD_SA_REFUSALS):
                self.delete(now, reason)
            else:
                self._refused_by_peer(reason, notify, now, wanted)

        if errors:
            refuse(f"CHILD_SA refused: {_nname(errors[0].notify_type)}", errors[0].notify_type)
            return
        choice = ch.accepted_esp(sa, self._esp_offered) if sa else None
        if choice is None or tsi is None or tsr is None:
            refuse("CHILD_SA refused: response SA/TS not acceptable")
            return
        tsi, tsr = natt_ts.child_ts(self, m, tsi, tsr, exchange_initiator=True,  # §2.23.1, before any check
                                    transport_wanted=ch.child_mode(self.peer.policy, first_kind) == "transport")
        if getattr(self.peer.policy, "request_virtual_ip", ()):
            try:
                cpr = cfgp.find_cp(inner)
                vips = cfgp.reply_addresses(cpr) if cpr is not None else []
            except cfgp.CpError as e:
                self.delete(now, f"CHILD_SA refused: bad CP(CFG_REPLY): {e}")
                return
            if not vips:
                self.delete(now, "CHILD_SA refused: we asked for a virtual IP and the gateway sent no CP(CFG_REPLY)")
                return
            self.virtual_ips = tuple(str(a) for a in vips)
        local_ts = ch.networks_of(tsi.selectors)
        remote_ts = ch.networks_of(tsr.selectors)
        if (not local_ts or not remote_ts
                or not ch.ts_within(tsi.selectors, ch.ts_from_networks(self._local_nets()))
                or not ch.ts_within(tsr.selectors, ch.ts_from_networks(self.peer.subnets))
                or not ch.ts_within(tsi.selectors, self._ts_proposed[0])
                or not ch.ts_within(tsr.selectors, self._ts_proposed[1])):
            refuse("CHILD_SA refused: responder widened the traffic selectors")
            return
        kind = "ah" if choice.proposal.is_ah else "esp"
        transport = (ch.child_mode(self.peer.policy, kind) == "transport"
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        self._install_child(choice, local_ts, remote_ts, "transport" if transport else "tunnel", now,
                            tuple(tsi.selectors), tuple(tsr.selectors))
        for more in ch.kinds(self.peer.policy)[1:]:
            # "ah+esp": the AH CHILD_SA of the bundle, same TS pair (CREATE_CHILD_SA, §1.3.1)
            self.create_child(now, local_ts, remote_ts, protocol=more)

    def _established(self, now: float) -> None:
        self.state = State.ESTABLISHED
        self.established_at = now
        self._set_ike_lifetimes(now)
        self.events.append(IkeSaEstablished(self.peer_name, self.spi_i, self.spi_r, self.initiator,
                                            self.local, self.remote, self.algorithms))

    def _udp_encap(self) -> bool:
        return self.nat_detected or self.cfg.force_encap or (
            self.peer is not None and self.peer.policy.encapsulation == "udp")

    def _install_child(self, choice: ch.EspChoice, local_ts, remote_ts, mode: str, now: float,
                       local_sel: tuple = (), remote_sel: tuple = ()) -> None:
        # first CHILD_SA: KEYMAT from the IKE_SA_INIT nonces (§2.17)
        self._make_child(choice, self._child_spi, self._ni, self._nr, None, local_ts, remote_ts, mode, now,
                         exchange_initiator=self.initiator, selectors=(local_sel, remote_sel))

    def _process_auth_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SA, TSi, TSr} -->
        <-- HDR, SK {IDr, [CERT,] AUTH, SA, TSi, TSr}  or  <-- HDR, SK {N(AUTHENTICATION_FAILED)}."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, True, False, tuple(inner))
        idi = m.first(PayloadType.IDi)
        ident = auth.id_text(idi.id_type, idi.data)  # FQDN, RFC822, IPv4/6 address or DN (§3.5)
        peer = self.cfg.find_peer(ident) if ident is not None else None
        try:
            if peer is None:
                raise AuthError(f"no configured peer has identity {ident!r} ({name_of(IdType, idi.id_type)})")
            idr = m.first(PayloadType.IDr)
            wanted = auth.id_text(idr.id_type, idr.data) if idr is not None else None
            if idr is not None and (wanted is None or not auth.same_identity(self.cfg.identity, wanted)):
                raise AuthError(f"peer wants to talk to {wanted or idr.data!r} ({name_of(IdType, idr.id_type)}), "
                                f"we are {self.cfg.identity!r}")
            self._verify_peer(idi, m.first(PayloadType.AUTH), m.get(PayloadType.CERT), peer, now)
            self._check_binding(peer, self.remote)
        except (AuthError, CryptoError) as e:
            self.auth_failure = str(e)
            self._die(f"AUTHENTICATION_FAILED: {e}")
            return [NotifyPayload(int(NotifyType.AUTHENTICATION_FAILED))]
        problem = self.cfg.policy_problem(peer)
        if problem is not None:
            # no IKE_SA whose CHILD_SA we could not install: refuse before AUTH (§2.21.2)
            self.peer = peer
            self._die(f"refused: {problem}")
            return [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        self.peer = peer
        # RFC 7383: the peer's own fragment size from now on (our IKE_AUTH response is the big one)
        self.cfg.fragment_size = getattr(peer.policy, "fragment_size", self.cfg.fragment_size)
        self.peer_initial_contact = m.notify(NotifyType.INITIAL_CONTACT) is not None
        psk = self._my_psk(peer)
        my_id = self._id(PayloadType.IDr)
        try:
            payloads: list = [my_id, *self._cert_payloads(psk), self._my_auth(my_id, psk)]
        except (AuthError, CryptoError) as e:  # e.g. the peer accepts none of our hash algorithms
            self._die(f"cannot authenticate ourselves: {e}")
            return [NotifyPayload(int(NotifyType.AUTHENTICATION_FAILED))]
        self._established(now)
        # first CHILD_SA
        sa, tsi, tsr = m.first(PayloadType.SA), m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        if sa is None or tsi is None or tsr is None:
            return payloads  # childless (RFC 6023)
        pool = getattr(peer.policy, "virtual_ip_pool", None)
        if pool:
            # gateway with an address pool: the remote host must ask (§3.15.4)
            try:
                cpr = cfgp.find_cp(inner)
            except cfgp.CpError:
                cpr = None
            if cpr is None or cpr.cfg_type != cfgp.CfgType.CFG_REQUEST:
                self._refused_by_us("no CP(CFG_REQUEST): this gateway assigns a virtual IP (RFC 7296 §3.15.4)",
                                    NotifyType.FAILED_CP_REQUIRED, self._offer_text(sa, tsi, tsr))
                return payloads + [NotifyPayload(int(NotifyType.FAILED_CP_REQUIRED))]
            versions = tuple(v for v, a in ((4, cfgp.INTERNAL_IP4_ADDRESS), (6, cfgp.INTERNAL_IP6_ADDRESS))
                             if cpr.get(a)) or (4,)
            vips = self.cfg.assign_vip(peer, versions)
            if not vips:
                self._refused_by_us(f"virtual IP pool {pool} has no free address", NotifyType.INTERNAL_ADDRESS_FAILURE,
                                    self._offer_text(sa, tsi, tsr))
                return payloads + [NotifyPayload(int(NotifyType.INTERNAL_ADDRESS_FAILURE))]
            self.peer_virtual_ips = tuple(str(a) for a in vips)
            payloads.append(cfgp.reply(vips).encode())
        choice = ch.choose_esp(sa, ch.acceptable(peer.policy))
        if choice is None:
            self._refused_by_us("no common CHILD_SA proposal", NotifyType.NO_PROPOSAL_CHOSEN,
                                self._offer_text(sa, tsi, tsr))
            return payloads + [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        tsi, tsr = natt_ts.child_ts(self, m, tsi, tsr, exchange_initiator=False,  # §2.23.1, before narrowing
                                    transport_wanted=natt_ts.wants_transport(peer.policy, choice))
        # TSi is the initiator's side (the peer's subnets), TSr ours (§2.9)
        # §2.9 on IP protocol, ports and addresses
        remote_sel = ch.narrow_ts(tsi.selectors, ch.ts_from_networks(self._remote_allowed()))
        local_sel = ch.narrow_ts(tsr.selectors, ch.ts_from_networks(self.cfg.local_subnets))
        remote_ts, local_ts = ch.networks_of(remote_sel), ch.networks_of(local_sel)
        if not remote_ts or not local_ts:
            self._refused_by_us(f"traffic selectors do not overlap ours ({self._ts_allowed_text()})",
                                NotifyType.TS_UNACCEPTABLE, self._offer_text(sa, tsi, tsr))
            return payloads + [NotifyPayload(int(NotifyType.TS_UNACCEPTABLE))]
        self._child_spi = self._new_child_spi()
        kind = "ah" if choice.proposal.is_ah else "esp"
        transport = (ch.child_mode(peer.policy, kind) == "transport"
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        sa_out = ch.esp_sa_payload([choice.proposal], self._child_spi, [choice.number])
        payloads += [sa_out, TsPayload(int(PayloadType.TSi), tuple(remote_sel)),
                     TsPayload(int(PayloadType.TSr), tuple(local_sel))]
        if transport:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        self._install_child(choice, local_ts, remote_ts, "transport" if transport else "tunnel", now,
                            tuple(local_sel), tuple(remote_sel))
        return payloads

    # ------------------------------------------------------------ INFORMATIONAL / CREATE_CHILD_SA
    def _process_info_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {[N,] [D,] ...} --> ; <-- HDR, SK {[D,] ...} (§1.4)."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        response: list = []
        deletes = [p for p in inner if isinstance(p, DeletePayload)]
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(msg, [], self.local, self.remote)
            self._die("deleted by peer")
            return None
        if m.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
            self._respond(msg, [], self.local, self.remote)
            self._die("peer reported AUTHENTICATION_FAILED")
            return None
        ours = []
        for d in deletes:
            if d.protocol not in (ProtocolId.ESP, ProtocolId.AH) or d.spi_size != 4:
                continue
            for spi_b in d.spis:
                spi = int.from_bytes(spi_b, "big")
                for c in list(self.children):
                    if c.outbound_spi == spi and c.protocol_id == d.protocol:
                        self.children.remove(c)
                        ours.append((c.protocol_id, c.inbound_spi.to_bytes(4, "big")))
                        self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi,
                                                          "deleted by peer"))
        for proto in (ProtocolId.ESP, ProtocolId.AH):  # one Delete payload per protocol (§3.11)
            spis = tuple(b for pid, b in ours if pid == proto)
            if spis:
                response.append(DeletePayload(int(proto), 4, spis))
        return response

    def delete_child(self, inbound_spi: int, now: float, reason: str = "deleted locally", *,
                     at_once: bool = False) -> None:
        """HDR, SK {D(ESP, SPI)} --> for one CHILD_SA (§1.4.1). Its ChildSaDeleted follows the
        peer's response (the inbound SA keeps accepting packets still in flight, e.g. after a
        rekey), or the end of the IKE_SA; ``at_once``: emit it now (an SA past its hard
        byte/packet lifetime refuses traffic both ways anyway)."""
        c = next((c for c in self.children if c.inbound_spi == inbound_spi), None)
        if c is None or self.state != State.ESTABLISHED:
            return
        # §1.4.1: the inbound SA keeps accepting until the peer's response; no new use meanwhile
        self.children.remove(c)
        if at_once:
            self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, reason))
        else:
            self._closing.append((c, reason))
        self._request(ExchangeType.INFORMATIONAL,
                      [DeletePayload(c.protocol_id, 4, (c.inbound_spi.to_bytes(4, "big"),))],
                      lambda msg, inner, now: self._closed(c), now)

    def _closed(self, c: ch.ChildSa) -> None:
        """The peer answered our D(ESP|AH, SPI): both directions of ``c`` are gone now."""
        for item in list(self._closing):
            if item[0] is c:
                self._closing.remove(item)
                self.events.append(ChildSaDeleted(self.peer_name, c.inbound_spi, c.outbound_spi, item[1]))

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        """JSON-ready summary (no keys). ``created`` (IKE_SA_INIT started or received) and
        ``established`` (IKE_AUTH done, RFC 7296 §1.2; None before) are seconds on the ``now``
        clock the caller passes in, so ``established - created`` is the handshake time."""
        return {
            "peer": self.peer_name,
            "spi_i": f"{self.spi_i:016x}",
            "spi_r": f"{self.spi_r:016x}",
            "initiator": self.initiator,
            "state": self.state,
            "local": f"{self.local[0]}:{self.local[1]}",
            "remote": f"{self.remote[0]}:{self.remote[1]}",
            "algorithms": self.algorithms,
            "key_exchanges": self._ike_prop.key_exchanges() if self._ike_prop else "",
            "nat": {"local": self._nat_local, "remote": self._nat_remote},
            "created": self.created_at,
            "established": self.established_at,
            "children": [{
                "inbound_spi": f"{c.inbound_spi:08x}", "outbound_spi": f"{c.outbound_spi:08x}",
                "mode": c.mode, "protocol": c.protocol, "udp_encap": c.udp_encap,
                "algorithms": c.proposal.describe(),
                "local_ts": [str(n) for n in c.local_ts], "remote_ts": [str(n) for n in c.remote_ts],
                "established": c.established_at,
            } for c in self.children],
        }


def _renumber(p, number: int):
    from agent.ike.message import Proposal
    return Proposal(number, p.protocol, p.spi, p.transforms)


def _xname(t: int) -> str:
    try:
        return ExchangeType(t).name
    except ValueError:
        return f"EXCHANGE({t})"


def _nname(t: int) -> str:
    try:
        return NotifyType(t).name
    except ValueError:
        return f"NOTIFY({t})"


__all__ = ["IkeSa", "IkeSaConfig", "Datagram", "State", "AuthError", "NAT_T_PORT", "IKE_PORT"]
