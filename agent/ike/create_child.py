"""CREATE_CHILD_SA (RFC 7296 §1.3): additional CHILD_SAs, CHILD_SA and IKE_SA rekeys, lifetimes.

A mixin of :class:`agent.ike.sa.IkeSa` (one task per exchange, strongSwan
style: build/process for request and response). Exchanges, in RFC notation:

- additional CHILD_SA (§1.3.1): HDR, SK {SA, Ni, [KEi], TSi, TSr} -->
  <-- HDR, SK {SA, Nr, [KEr], TSi, TSr}
- CHILD_SA rekey (§1.3.3): HDR, SK {N(REKEY_SA), SA, Ni, [KEi], TSi, TSr} -->
  (same response); KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17).
  Events: ChildSaEstablished(rekey_of=<old inbound SPI>), then ChildSaDeleted(old).
- IKE_SA rekey (§1.3.2): HDR, SK {SA, Ni, KEi} --> <-- HDR, SK {SA, Nr, KEr};
  SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18), new SPIs from the SA
  payloads; the CHILD_SAs move to the new IKE_SA, the old one is deleted
  (IkeSaDeleted(reason "rekeyed", rekeyed_to=(SPIi, SPIr) of the new one)).
- Simultaneous rekeys (§2.8.1): when both ends rekey the same SA, the SA made by
  the exchange holding the lowest of the four nonces is redundant and deleted by
  the end that initiated that exchange; the other initiator deletes the old SA.

Lifetimes (§2.8) from PeerPolicy: soft expiry (rekey) at 80-90 % of the lifetime
(jitter from ``rng`` so both ends rarely collide), hard expiry (delete) at 100 %;
a failed rekey is retried before the hard limit.

Pure module: no I/O.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from agent.iana import ExchangeType, NotifyType, PayloadType, ProtocolId
from agent.ike import child as ch
from agent.ike import natt_ts
from agent.ike.crypto import (KeyExchange, KeyExchangeError, Prf, SkCipher, derive_child_keymat,
                              derive_ike_keys_from_skeyseed, derive_rekey_skeyseed, nonce_ok)
from agent.ike.events import ChildSaEstablished, IkeKeysDerived
from agent.ike.message import (DeletePayload, KePayload, Message, NoncePayload, NotifyPayload, TsPayload)
from agent.ike.proposals import additional_kes
from agent.ike.proposals import (encr_key_len, integ_key_len, parse_esp_proposal, wireshark_ike_encr_name,
                                 wireshark_ike_integ_name)

SOFT_LIFETIME = 0.9  # fraction of the lifetime at which we rekey ...
LIFETIME_JITTER = 0.1  # ... minus up to this fraction, drawn from rng
REKEY_RETRY_MIN_S = 1.0
REKEY_RETRY_MAX_S = 30.0
MAX_KE_RETRIES = 2  # INVALID_KE_PAYLOAD round trips per CREATE_CHILD_SA
NONCE_LEN = 32


@dataclass(eq=False)
class _ChildTask:
    """One CREATE_CHILD_SA for a CHILD_SA that we initiate."""
    old: ch.ChildSa | None  # CHILD_SA being rekeyed (None: additional CHILD_SA)
    local_ts: tuple
    remote_ts: tuple
    mode: str
    proposals: list = field(default_factory=list)
    protocol: str = "esp"  # "esp" or "ah" (an AH CHILD_SA: "ah" and "ah+esp" policies)
    group: int | None = None  # KE method (PFS) of the next request
    tries: int = 0
    ni: bytes = field(default=b"", repr=False)
    spi: int = 0
    ke: KeyExchange | None = field(default=None, repr=False)
    collision: tuple[bytes, bytes] | None = field(default=None, repr=False)  # peer's (Ni, Nr)


@dataclass(eq=False)
class _IkeTask:
    """Our IKE_SA rekey."""
    proposals: list
    group: int
    tries: int = 0
    spi: int = 0
    ni: bytes = field(default=b"", repr=False)
    ke: KeyExchange | None = field(default=None, repr=False)


@dataclass(eq=False)
class _IkeCollision:
    ni: bytes = field(repr=False)
    nr: bytes = field(repr=False)
    sa: object  # the IkeSa the peer's rekey created


def _nname(t: int) -> str:
    try:
        return NotifyType(t).name
    except ValueError:
        return f"NOTIFY({t})"


def _first_of(nonces: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> bool:
    """True if ``nonces`` holds the lowest of the four nonces (§2.8.1)."""
    return min(nonces) < min(other)


class CreateChildExchange:
    """CREATE_CHILD_SA tasks and lifetimes of an IkeSa (mixin; see the module docstring)."""

    def _init_create_child(self) -> None:
        self._child_tasks: list[_ChildTask] = []
        self._ike_task: _IkeTask | None = None
        self._ike_collision: _IkeCollision | None = None
        self._successor = None  # the IkeSa our CHILD_SAs moved to
        self._rekeyed_to: tuple[int, int] | None = None
        self.spawned: list = []  # new IkeSas (rekeys) for the manager to register
        self.rekey_at: float | None = None
        self.expire_at: float | None = None
        self.child_errors: list[str] = []  # why CREATE_CHILD_SAs we initiated failed
        self.virtual_ips: tuple = ()  # ours, from CP(CFG_REPLY)
        self.peer_virtual_ips: tuple = ()  # the peer's, assigned by us

    # ------------------------------------------------------------ lifetimes
    def _jitter(self) -> float:
        return int.from_bytes(self.rng(4), "big") / 2 ** 32

    def _lifetimes(self, lifetime: float, now: float) -> tuple[float | None, float | None]:
        if not lifetime or lifetime <= 0:
            return None, None
        soft = lifetime * (SOFT_LIFETIME - LIFETIME_JITTER * self._jitter())
        return now + soft, now + lifetime

    def _set_child_lifetimes(self, child: ch.ChildSa, now: float) -> None:
        if self.peer is not None:
            child.rekey_at, child.expire_at = self._lifetimes(self.peer.policy.child_lifetime_s, now)

    def _set_ike_lifetimes(self, now: float) -> None:
        if self.peer is not None:
            self.rekey_at, self.expire_at = self._lifetimes(self.peer.policy.ike_lifetime_s, now)

    def _retry_at(self, expire_at: float | None, now: float) -> float | None:
        if expire_at is None:
            return now + REKEY_RETRY_MAX_S
        delay = max(REKEY_RETRY_MIN_S, min(REKEY_RETRY_MAX_S, (expire_at - now) / 3))
        return now + delay if now + delay < expire_at else None

    def _task_for(self, child: ch.ChildSa) -> _ChildTask | None:
        return next((t for t in self._child_tasks if t.old is child), None)

    def _lifetime_timers(self) -> list[float]:
        if self.state != "ESTABLISHED" or self._successor is not None:
            return []
        ts = []
        for c in self.children:
            if c.expire_at is not None:
                ts.append(c.expire_at)
            if c.rekey_at is not None and not c.rekeyed and self._task_for(c) is None:
                ts.append(c.rekey_at)
        if self.expire_at is not None:
            ts.append(self.expire_at)
        if self.rekey_at is not None and self._ike_task is None:
            ts.append(self.rekey_at)
        return ts

    def _handle_lifetimes(self, now: float) -> bool:
        """Soft/hard expiry of the IKE_SA and its CHILD_SAs; True if anything was due."""
        if self.state != "ESTABLISHED" or self._successor is not None:
            return False
        if self.expire_at is not None and now >= self.expire_at:
            self.delete(now, "IKE_SA lifetime expired")
            return True
        done = False
        for c in list(self.children):
            if c.expire_at is not None and now >= c.expire_at:
                self.delete_child(c.inbound_spi, now, reason="CHILD_SA lifetime expired")
                done = True
            elif (c.rekey_at is not None and now >= c.rekey_at and not c.rekeyed
                  and self._task_for(c) is None):
                c.rekey_at = None
                self.rekey_child(c.inbound_spi, now)
                done = True
        if self.rekey_at is not None and now >= self.rekey_at and self._ike_task is None:
            self.rekey_at = None
            self.rekey_ike(now)
            done = True
        return done

    # ------------------------------------------------------------ lazy requests (window size 1)
    def _request_lazy(self, exchange: int, build, on_response, now: float) -> None:
        """Like _request, but the payloads are built when the request is actually sent."""
        if self._pending is not None:
            self._queue.append(lambda t: self._request_lazy(exchange, build, on_response, t))
            return
        payloads = build(now)
        if payloads is not None:
            self._request(exchange, payloads, on_response, now)

    # ------------------------------------------------------------ CHILD_SA: initiator
    def _local_nets(self) -> tuple:
        return tuple(ipaddress.ip_network(a) for a in self.virtual_ips) or tuple(self.cfg.local_subnets)

    def _remote_allowed(self) -> tuple:
        """PAD rule: the peer may claim only its own subnets (or the virtual IP we gave it)."""
        return tuple(ipaddress.ip_network(a) for a in self.peer_virtual_ips) or tuple(self.peer.subnets)

    def create_child(self, now: float, local_ts=None, remote_ts=None, protocol: str | None = None) -> bool:
        """Additional CHILD_SA (§1.3.1): HDR, SK {SA, Ni, [KEi], TSi, TSr} -->.

        ``local_ts`` / ``remote_ts``: networks to propose (default: ours and the peer's
        subnets). Returns False if the IKE_SA is not established, or, for the default selectors,
        while a refused CHILD_SA backs off (agent.ike.child_refusal). The outcome is a
        ChildSaEstablished event, or a reason appended to ``child_errors`` (the IKE_SA
        stays up, e.g. on TS_UNACCEPTABLE). ``protocol``: "esp" or "ah" (default: the
        policy's first kind, see ``child.kinds``).
        """
        if self.state != "ESTABLISHED" or self.peer is None or self._successor is not None:
            return False
        if local_ts is None and remote_ts is None and protocol is None and self._child_backoff_holds(now):
            return False  # an acquire while the refused CHILD_SA waits out its backoff (child_refusal)
        kind = protocol or ch.kinds(self.peer.policy)[0]
        task = _ChildTask(None, tuple(local_ts or self._local_nets()), tuple(remote_ts or self.peer.subnets),
                          ch.child_mode(self.peer.policy, kind), protocol=kind)
        if (local_ts is None and remote_ts is None and protocol is None
                and not any(c.protocol == kind for c in self.children)):
            # the policy's missing CHILD_SA (an acquire): refused, it backs off as the IKE_AUTH one does
            self._child_wanted, self._child_retry_task = (task.local_ts, task.remote_ts, kind), task
        self._start_child_task(task, now)
        return True

    def rekey_child(self, inbound_spi: int, now: float) -> bool:
        """Rekey the CHILD_SA with this inbound SPI (§1.3.3); False if unknown or already rekeying."""
        c = next((c for c in self.children if c.inbound_spi == inbound_spi), None)
        if (c is None or c.rekeyed or self._task_for(c) is not None or self.state != "ESTABLISHED"
                or self._successor is not None):
            return False
        self._start_child_task(_ChildTask(c, c.local_ts, c.remote_ts, c.mode, protocol=c.protocol), now)
        return True

    def _start_child_task(self, task: _ChildTask, now: float) -> None:
        task.proposals = ch.offers(self.peer.policy, task.protocol)
        pfs = [k for p in task.proposals for k in p.ke]
        task.group = pfs[0] if pfs else None
        self._child_tasks.append(task)
        self._send_child_task(task, now)

    def _send_child_task(self, task: _ChildTask, now: float) -> None:
        self._request_lazy(ExchangeType.CREATE_CHILD_SA, lambda t: self._build_child_request(task, t),
                           lambda msg, inner, t: self._process_child_response(task, msg, inner, t), now)

    def _drop_task(self, task: _ChildTask) -> None:
        if task in self._child_tasks:
            self._child_tasks.remove(task)

    def _build_child_request(self, task: _ChildTask, now: float) -> list | None:
        if (self.state != "ESTABLISHED" or self._successor is not None
                or (task.old is not None and (task.old not in self.children or task.old.rekeyed))):
            self._drop_task(task)  # the peer rekeyed or deleted it meanwhile
            succ = self._successor
            if task.old is not None and succ is not None and task.old in succ.children and not task.old.rekeyed:
                task.old.rekey_at = now  # the CHILD_SA moved with an IKE_SA rekey: rekey it there
            return None
        task.ni = self.rng(NONCE_LEN)
        task.spi = self._new_child_spi()
        task.collision = None
        payloads: list = []
        if task.old is not None:
            payloads.append(NotifyPayload(int(NotifyType.REKEY_SA), b"", task.old.protocol_id,
                                          task.old.inbound_spi.to_bytes(4, "big")))
        payloads += [ch.esp_sa_payload(task.proposals, task.spi, ke=True), NoncePayload(task.ni)]
        task.ke = None
        if task.group is not None:
            task.ke = KeyExchange(task.group, self.rng)
            payloads.append(KePayload(task.group, task.ke.public_bytes()))
        payloads += [TsPayload(int(PayloadType.TSi), ch.ts_from_networks(task.local_ts)),
                     TsPayload(int(PayloadType.TSr), ch.ts_from_networks(task.remote_ts))]
        if task.mode == "transport":
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        return payloads

    def _child_failed(self, task: _ChildTask, reason: str, now: float, notify: int | None = None) -> None:
        self._drop_task(task)
        self.child_errors.append(reason)
        if task.old is not None and task.old in self.children:
            task.old.rekey_at = self._retry_at(task.old.expire_at, now)
        if task is self._child_retry_task:  # our retry of a refused CHILD_SA: back off further
            self._refused_by_peer(reason, notify, now)

    def _process_child_response(self, task: _ChildTask, msg: Message, inner, now: float,
                                additional: bytes | None = None) -> None:
        """<-- HDR, SK {SA, Nr, [KEr], TSi, TSr}  or  <-- HDR, SK {N(error)}."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, True, tuple(inner))
        ke_note = m.notify(NotifyType.INVALID_KE_PAYLOAD)
        if ke_note is not None:
            group = struct.unpack("!H", ke_note.data)[0] if len(ke_note.data) == 2 else None
            offered = {k for p in task.proposals for k in p.ke}
            if group in offered and group != task.group and task.tries < MAX_KE_RETRIES:
                task.tries += 1
                task.group = group  # HDR, SK {[N(REKEY_SA),] SA, Ni, KEi(group), TSi, TSr} -->
                self._send_child_task(task, now)
                return
            self._child_failed(task, f"CREATE_CHILD_SA: INVALID_KE_PAYLOAD names group {group} we cannot use", now)
            return
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            self._child_failed(task, f"CREATE_CHILD_SA refused: {_nname(errors[0].notify_type)}", now,
                               errors[0].notify_type)
            return
        sa, nr, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        tsi, tsr = m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        choice = ch.accepted_esp(sa, task.proposals, pfs=True) if sa else None
        if (choice is None or nr is None or tsi is None or tsr is None
                or not nonce_ok(nr.data, self._ike_prop.prf)):
            self._child_failed(task, "CREATE_CHILD_SA response: SA, Nr or TS missing or not offered", now)
            return
        g_ir = None
        if choice.proposal.ke:
            if ke is None or task.ke is None or ke.group != task.ke.ke_id or choice.proposal.ke[0] != ke.group:
                self._child_failed(task, "CREATE_CHILD_SA response: KE method does not match our KEi", now)
                self._delete_unwanted(task.spi, now, task.protocol)
                return
            try:
                g_ir = task.ke.shared_secret(ke.data)
            except KeyExchangeError as e:
                self._child_failed(task, f"CREATE_CHILD_SA response: {e}", now)
                self._delete_unwanted(task.spi, now, task.protocol)
                return
        tsi, tsr = natt_ts.child_ts(self, m, tsi, tsr, exchange_initiator=True,  # §2.23.1, before any check
                                    transport_wanted=task.mode == "transport")
        local_ts, remote_ts = ch.networks_of(tsi.selectors), ch.networks_of(tsr.selectors)
        if (not local_ts or not remote_ts or not ch.ts_within(tsi.selectors, ch.ts_from_networks(task.local_ts))
                or not ch.ts_within(tsr.selectors, ch.ts_from_networks(task.remote_ts))):
            self._child_failed(task, "CREATE_CHILD_SA response: responder widened the traffic selectors", now)
            self._delete_unwanted(task.spi, now, task.protocol)
            return
        transport = task.mode == "transport" and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        methods = additional_kes(choice.proposal.add_ke)
        if methods and additional is None:
            # RFC 9370 §2.2.4: IKE_FOLLOWUP_KE per additional key exchange, then this again with SK(1..n)
            link = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            self._run_followups(
                methods, link.data if link is not None else b"", [],
                lambda extra, t: self._process_child_response(task, msg, inner, t, additional=extra),
                lambda reason, t: (self._child_failed(task, f"CREATE_CHILD_SA: {reason}", t),
                                   self._delete_unwanted(task.spi, t, task.protocol)), now)
            return
        self._drop_task(task)
        new = self._make_child(choice, task.spi, task.ni, nr.data, g_ir, local_ts, remote_ts,
                               "transport" if transport else "tunnel", now, exchange_initiator=True,
                               selectors=(tuple(tsi.selectors), tuple(tsr.selectors)),
                               rekey_of=task.old.inbound_spi if task.old is not None else None,
                               additional=additional or b"")
        if task is self._child_retry_task:
            self._child_retry_done()
        if task.old is None:
            return
        task.old.rekeyed = True
        if task.collision is not None and _first_of((task.ni, nr.data), task.collision):
            # §2.8.1: our exchange holds the lowest nonce, our new CHILD_SA is redundant;
            # the peer, whose exchange won, deletes the old one
            self.delete_child(new.inbound_spi, now, reason="redundant CHILD_SA of a simultaneous rekey")
            return
        if task.old in self.children:
            self.delete_child(task.old.inbound_spi, now, reason="rekeyed")

    def _delete_unwanted(self, our_spi: int, now: float, protocol: str = "esp") -> None:
        """The responder installed a CHILD_SA we refuse: HDR, SK {D(ESP|AH, our SPI)} -->."""
        pid = ProtocolId.AH if protocol == "ah" else ProtocolId.ESP
        self._request(ExchangeType.INFORMATIONAL,
                      [DeletePayload(int(pid), 4, (our_spi.to_bytes(4, "big"),))],
                      lambda msg, inner, t: None, now)

    def _make_child(self, choice: ch.EspChoice, our_spi: int, ni: bytes, nr: bytes, g_ir: bytes | None,
                    local_ts, remote_ts, mode: str, now: float, *, exchange_initiator: bool,
                    rekey_of: int | None = None, additional: bytes = b"",
                    selectors: tuple = ((), ())) -> ch.ChildSa:
        """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr [| SK(1) | ... | SK(n)]) (§2.17, RFC 9370 §2.2.4),
        split by the exchange's roles."""
        keymat = derive_child_keymat(self._ike_prop.prf, self._keys.sk_d, ni, nr, ch.keymat_len(choice.proposal),
                                     g_ir, additional)
        inbound, outbound = ch.split_keymat(keymat, choice.proposal, initiator=exchange_initiator,
                                            our_spi=our_spi, peer_spi=choice.peer_spi)
        vip = self.virtual_ips[0] if self.virtual_ips else None
        child = ch.ChildSa(our_spi, choice.peer_spi, choice.proposal, tuple(local_ts), tuple(remote_ts), mode,
                           self._udp_encap(), now, inbound, outbound, virtual_ip=vip,
                           local_selectors=tuple(selectors[0]), remote_selectors=tuple(selectors[1]))
        self._set_child_lifetimes(child, now)
        self.children.append(child)
        self.events.append(ChildSaEstablished(
            self.peer_name, self.spi_i, self.spi_r, inbound, outbound, tuple(local_ts), tuple(remote_ts), mode,
            child.udp_encap, self.local, self.remote, choice.proposal.describe(), rekey_of, vip,
            child.protocol, child.local_selectors, child.remote_selectors, exchange_initiator))
        return child

    # ------------------------------------------------------------ CREATE_CHILD_SA: responder
    def _process_create_child_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {[N(REKEY_SA),] SA, Ni, [KEi], [TSi, TSr]} --> ; <-- HDR, SK {SA, Nr, [KEr], [TSi, TSr]}."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        if self.state != "ESTABLISHED" or self._successor is not None or self.peer is None:
            return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]  # §2.25: being rekeyed or deleted
        sa, ni, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        if not 16 <= len(ni.data) <= 256:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        if sa.proposals and all(p.protocol == ProtocolId.IKE for p in sa.proposals):
            return self._respond_ike_rekey(sa, ni.data, ke, now)
        if not nonce_ok(ni.data, self._ike_prop.prf):  # §2.10: half the PRF key size at least
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        rekey = m.notify(NotifyType.REKEY_SA)
        old = None
        if rekey is not None:
            spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else None
            old = next((c for c in self.children if c.outbound_spi == spi), None)
            if old is None:
                pid = rekey.protocol if rekey.protocol in (ProtocolId.ESP, ProtocolId.AH) else int(ProtocolId.ESP)
                if any(c.outbound_spi == spi and c.protocol_id == pid for c, _why in self._closing):
                    # §2.25.1: we are deleting it; the peer learns that from our Delete
                    return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]
                return [NotifyPayload(int(NotifyType.CHILD_SA_NOT_FOUND), b"", pid, rekey.spi)]
        tsi, tsr = m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        if tsi is None or tsr is None:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        ours = ch.acceptable(self.peer.policy)
        if old is not None:  # a rekey keeps the protocol of the CHILD_SA it replaces
            ours = [p for p in ours if p.is_ah == old.proposal.is_ah]
        choice = ch.choose_esp(sa, ours, pfs=True, ke_hint=ke.group if ke else None)
        if choice is None:
            self._refused_by_us("no common CHILD_SA proposal (CREATE_CHILD_SA)", NotifyType.NO_PROPOSAL_CHOSEN,
                                self._offer_text(sa, tsi, tsr))
            return [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        g_ir, kex = None, None
        if choice.proposal.ke:
            group = choice.proposal.ke[0]
            if ke is None or ke.group != group:
                return [NotifyPayload(int(NotifyType.INVALID_KE_PAYLOAD), struct.pack("!H", group))]
            try:
                kex = KeyExchange(group, self.rng)
                g_ir = kex.shared_secret(ke.data)
            except KeyExchangeError:
                return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        tsi, tsr = natt_ts.child_ts(self, m, tsi, tsr, exchange_initiator=False,  # §2.23.1, before narrowing
                                    transport_wanted=natt_ts.wants_transport(self.peer.policy, choice))
        # TSi is the initiator's side: PAD rule, the peer claims only its own networks (§2.9)
        # §2.9 on IP protocol, ports and addresses
        remote_sel = ch.narrow_ts(tsi.selectors, ch.ts_from_networks(self._remote_allowed()))
        local_sel = ch.narrow_ts(tsr.selectors, ch.ts_from_networks(self._local_nets()))
        remote_ts, local_ts = ch.networks_of(remote_sel), ch.networks_of(local_sel)
        if not remote_ts or not local_ts:
            self._refused_by_us(f"traffic selectors do not overlap ours (CREATE_CHILD_SA; {self._ts_allowed_text()})",
                                NotifyType.TS_UNACCEPTABLE, self._offer_text(sa, tsi, tsr))
            return [NotifyPayload(int(NotifyType.TS_UNACCEPTABLE))]
        nr = self.rng(NONCE_LEN)
        spi = self._new_child_spi()
        kind = "ah" if choice.proposal.is_ah else "esp"
        transport = (ch.child_mode(self.peer.policy, kind) == "transport"
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        payloads: list = [ch.esp_sa_payload([choice.proposal], spi, [choice.number], ke=True), NoncePayload(nr)]
        if kex is not None:
            payloads.append(KePayload(kex.ke_id, kex.public_bytes()))
        payloads += [TsPayload(int(PayloadType.TSi), tuple(remote_sel)),
                     TsPayload(int(PayloadType.TSr), tuple(local_sel))]
        if transport:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))

        def finish(extra: bytes, t: float) -> None:
            if old is not None and old not in self.children:
                return  # deleted meanwhile
            self._make_child(choice, spi, ni.data, nr, g_ir, local_ts, remote_ts,
                             "transport" if transport else "tunnel", t, exchange_initiator=False,
                             rekey_of=old.inbound_spi if old is not None else None, additional=extra,
                             selectors=(tuple(local_sel), tuple(remote_sel)))
            if old is not None:
                old.rekeyed = True
                task = self._task_for(old)
                if task is not None and task.ni:
                    task.collision = (ni.data, nr)  # simultaneous rekey: resolved when our response arrives

        methods = additional_kes(choice.proposal.add_ke)
        if methods:  # RFC 9370 §2.2.4: the CHILD_SA exists after the last IKE_FOLLOWUP_KE
            payloads.append(self._await_followups(methods, finish, lambda reason, t: self.child_errors.append(reason)))
        else:
            finish(b"", now)
        return payloads

    # ------------------------------------------------------------ IKE_SA rekey
    def rekey_ike(self, now: float) -> bool:
        """Rekey this IKE_SA (§1.3.2): HDR, SK {SA, Ni, KEi} -->. False if not possible now."""
        if self.state != "ESTABLISHED" or self._ike_task is not None or self._successor is not None:
            return False
        props = self._ike_proposals()
        if self._ike_prop is not None:  # offer the current algorithms first
            props = [self._ike_prop] + [p for p in props if p != self._ike_prop]
        self._ike_task = _IkeTask(props, props[0].ke[0])
        self._send_ike_task(now)
        return True

    def _send_ike_task(self, now: float) -> None:
        self._request_lazy(ExchangeType.CREATE_CHILD_SA, self._build_ike_request, self._process_ike_rekey_response,
                           now)

    def _build_ike_request(self, now: float) -> list | None:
        task = self._ike_task
        if task is None or self.state != "ESTABLISHED" or self._successor is not None:
            self._ike_task = None
            return None
        task.spi = self._new_ike_spi()
        task.ni = self.rng(NONCE_LEN)
        task.ke = KeyExchange(task.group, self.rng)
        self._ike_collision = None
        props = [p for p in task.proposals if task.group in p.ke] + [p for p in task.proposals if task.group not in p.ke]
        return [ch.ike_sa_payload(props, spi=task.spi), NoncePayload(task.ni), KePayload(task.group, task.ke.public_bytes())]

    def _ike_rekey_failed(self, reason: str, now: float) -> None:
        self._ike_task = None
        self.child_errors.append(reason)
        self.rekey_at = self._retry_at(self.expire_at, now)

    def _process_ike_rekey_response(self, msg: Message, inner, now: float, additional: bytes | None = None) -> None:
        """<-- HDR, SK {SA, Nr, KEr}  or  <-- HDR, SK {N(error)}."""
        task = self._ike_task
        if task is None:
            return
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, True, tuple(inner))
        ke_note = m.notify(NotifyType.INVALID_KE_PAYLOAD)
        if ke_note is not None:
            group = struct.unpack("!H", ke_note.data)[0] if len(ke_note.data) == 2 else None
            if group in {k for p in task.proposals for k in p.ke} and group != task.group \
                    and task.tries < MAX_KE_RETRIES:
                task.tries += 1
                task.group = group
                self._send_ike_task(now)
                return
            self._ike_rekey_failed(f"IKE_SA rekey: INVALID_KE_PAYLOAD names group {group} we cannot use", now)
            return
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            self._ike_rekey_failed(f"IKE_SA rekey refused: {_nname(errors[0].notify_type)}", now)
            return
        sa, nr, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        prop = ch.accepted_ike(sa, task.proposals) if sa else None
        if (prop is None or nr is None or ke is None or len(sa.proposals[0].spi) != 8
                or ke.group != task.group or prop.ke[0] != ke.group or not nonce_ok(nr.data, prop.prf)):
            self._ike_rekey_failed("IKE_SA rekey response: SA, Nr, KEr or SPI missing or not offered", now)
            return
        spi_r = int.from_bytes(sa.proposals[0].spi, "big")
        try:
            g_ir = task.ke.shared_secret(ke.data)
        except KeyExchangeError as e:
            self._ike_rekey_failed(f"IKE_SA rekey response: {e}", now)
            return
        methods = additional_kes(prop.add_ke)
        if methods and additional is None:
            # RFC 9370 §2.2.4: IKE_FOLLOWUP_KE per additional key exchange, then this again with SK(1..n)
            link = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            self._run_followups(
                methods, link.data if link is not None else b"", [],
                lambda extra, t: self._process_ike_rekey_response(msg, inner, t, additional=extra),
                lambda reason, t: self._ike_rekey_failed(f"IKE_SA rekey: {reason}", t), now)
            return
        self._ike_task = None
        new = self._spawn(initiator=True, spi_i=task.spi, spi_r=spi_r, ni=task.ni, nr=nr.data, prop=prop,
                          g_ir=g_ir, now=now, additional=additional or b"")
        coll = self._ike_collision
        if coll is not None and _first_of((task.ni, nr.data), (coll.ni, coll.nr)):
            # §2.8.1: our new IKE_SA is redundant; the peer deletes the old one
            new.delete(now, "redundant IKE_SA of a simultaneous rekey")
            return
        holder = coll.sa if coll is not None else self
        self._move_children(holder, new)
        if holder is not self:
            self._rekeyed_to = (new.spi_i, new.spi_r)
        self._successor = new
        self.delete(now, "rekeyed")  # HDR, SK {D(IKE)} --> on the old IKE_SA

    def _child_exchange_outstanding(self) -> bool:
        """A CREATE_CHILD_SA (or its IKE_FOLLOWUP_KE) for a CHILD_SA of ours has been sent and
        not finished (task.ni is drawn when the request is built)."""
        return any(t.ni for t in self._child_tasks)

    def _respond_ike_rekey(self, sa, ni: bytes, ke, now: float) -> list:
        from agent.ike.child import choose_ike  # noqa: local for clarity
        if self._child_exchange_outstanding():
            # §2.25.2: our CHILD_SA exchange would finish on an IKE_SA about to go; the
            # initiator retries its IKE_SA rekey later (_ike_rekey_failed -> rekey_at)
            return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]
        if ke is None:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        res = choose_ike(sa, self._ike_proposals(), ke.group)
        if res is None:
            return [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        choice, _kes = res
        if choice.proposal.ke[0] != ke.group:
            return [NotifyPayload(int(NotifyType.INVALID_KE_PAYLOAD), struct.pack("!H", choice.proposal.ke[0]))]
        if not nonce_ok(ni, choice.proposal.prf):  # §2.10, for the new IKE_SA's PRF
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        offered = next(p for p in sa.proposals if p.number == choice.number)
        if len(offered.spi) != 8 or not int.from_bytes(offered.spi, "big"):
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        try:
            kex = KeyExchange(ke.group, self.rng)
            g_ir = kex.shared_secret(ke.data)
        except KeyExchangeError:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        nr = self.rng(NONCE_LEN)
        spi_r = self._new_ike_spi()

        def finish(extra: bytes, t: float) -> None:
            if self.state != "ESTABLISHED" or self._successor is not None:
                return
            new = self._spawn(initiator=False, spi_i=int.from_bytes(offered.spi, "big"), spi_r=spi_r, ni=ni, nr=nr,
                              prop=choice.proposal, g_ir=g_ir, now=t, additional=extra)
            if self._ike_task is not None and self._ike_task.ni:
                self._ike_collision = _IkeCollision(ni, nr, new)
            self._move_children(self, new)
            self._successor = new

        payloads = [ch.ike_sa_payload([choice.proposal], spi=spi_r, numbers=[choice.number]), NoncePayload(nr),
                    KePayload(ke.group, kex.public_bytes())]
        methods = additional_kes(choice.proposal.add_ke)
        if methods:  # RFC 9370 §2.2.4: the new IKE_SA exists after the last IKE_FOLLOWUP_KE
            payloads.append(self._await_followups(methods, finish, lambda reason, t: self.child_errors.append(reason)))
        else:
            finish(b"", now)
        return payloads

    def _spawn(self, *, initiator: bool, spi_i: int, spi_r: int, ni: bytes, nr: bytes, prop, g_ir: bytes,
               now: float, additional: bytes = b""):
        """The new IKE_SA of a rekey: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18)."""
        new = type(self)(self.cfg, self.rng, initiator=initiator, local=self.local, remote=self.remote, now=now)
        new.spi_i, new.spi_r = spi_i, spi_r
        new.peer = self.peer
        new.peer_cert_serial = getattr(self, "peer_cert_serial", None)  # PAD revocation follows the rekey
        new._ni, new._nr = ni, nr
        ek = encr_key_len(prop.encr, prop.encr_key_bits)
        ak = integ_key_len(prop.integ) if prop.integ else 0
        # RFC 9370 §2.2.4: prf(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n))
        skeyseed = derive_rekey_skeyseed(self._ike_prop.prf, self._keys.sk_d, g_ir, ni, nr, additional)
        new._ike_prop = prop
        new._prf = Prf(prop.prf)
        new._keys = derive_ike_keys_from_skeyseed(prop.prf, skeyseed, ni, nr, spi_i, spi_r, ek, ak)
        new._cipher = SkCipher(prop.encr, ek, prop.integ)
        new.algorithms = prop.describe()
        new._nat_local, new._nat_remote = self._nat_local, self._nat_remote
        new._peer_sig_hashes = set(self._peer_sig_hashes)
        new.virtual_ips, new.peer_virtual_ips = self.virtual_ips, self.peer_virtual_ips
        new._inherit_child_retry(self)
        new.events.append(IkeKeysDerived(spi_i, spi_r, new._keys.sk_ei, new._keys.sk_er, new._keys.sk_ai,
                                         new._keys.sk_ar, wireshark_ike_encr_name(prop.encr, prop.encr_key_bits),
                                         wireshark_ike_integ_name(prop.integ)))
        new._established(now)
        self.spawned.append(new)
        return new

    @staticmethod
    def _move_children(src, dst) -> None:
        """The CHILD_SAs of ``src`` now belong to ``dst`` (§2.18); ``src`` says so when deleted."""
        dst.children.extend(src.children)
        src.children = []
        src._rekeyed_to = (dst.spi_i, dst.spi_r)


__all__ = ["CreateChildExchange", "SOFT_LIFETIME", "LIFETIME_JITTER"]
