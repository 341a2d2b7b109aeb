"""CREATE_CHILD_SA task for CHILD_SAs (RFC 7296 §1.3.1, §1.3.3, §2.8.1, §2.17), both roles.

- additional CHILD_SA (§1.3.1): HDR, SK {SA, Ni, [KEi], TSi, TSr} -->
  <-- HDR, SK {SA, Nr, [KEr], TSi, TSr}
- CHILD_SA rekey (§1.3.3): HDR, SK {N(REKEY_SA), SA, Ni, [KEi], TSi, TSr} -->
  (same response); KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17).
  Events: ChildSaEstablished(rekey_of=<old inbound SPI>), then ChildSaDeleted(old).
- Simultaneous rekeys (§2.8.1): when both ends rekey the same CHILD_SA, the SA made by the
  exchange holding the lowest of the four nonces is redundant and deleted by the end that
  initiated that exchange; the other initiator deletes the old SA.
- With additional key exchanges (RFC 9370 §2.2.4) the CHILD_SA exists after the last
  IKE_FOLLOWUP_KE (agent.ike.tasks.followup_ke).

A request for IKE proposals (an IKE_SA rekey) goes to agent.ike.tasks.ike_rekey. Each
:class:`_ChildTask` holds its own nonce, KE and SPI; the selectors the peer may claim are
the PAD's (agent.ike.pad).

Pure module: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.iana import ExchangeType, NotifyType, PayloadType, ProtocolId
from agent.ike import child as ch
from agent.ike import natt_ts
from agent.ike.crypto import KeyExchange, KeyExchangeError, derive_child_keymat, nonce_ok
from agent.ike.errors import IkeSaState, Mode, Protocol, notify_name
from agent.ike.events import ChildSaEstablished
from agent.ike.message import DeletePayload, KePayload, Message, NoncePayload, NotifyPayload, TsPayload
from agent.ike.proposals import additional_kes

MAX_KE_RETRIES = 2  # INVALID_KE_PAYLOAD round trips per CREATE_CHILD_SA
NONCE_LEN = 32

__all__ = ["ChildCreate", "first_of", "MAX_KE_RETRIES"]


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


def first_of(nonces: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> bool:
    """True if ``nonces`` holds the lowest of the four nonces (§2.8.1)."""
    return min(nonces) < min(other)


def _pair(task: _ChildTask) -> tuple:
    """The backoff key of a new CHILD_SA we ask for: (local nets, remote nets, kind)."""
    return (tuple(task.local_ts), tuple(task.remote_ts), task.protocol)


class ChildCreate:
    """The CREATE_CHILD_SA exchanges for CHILD_SAs of one IkeSa (see the module docstring)."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.tasks: list[_ChildTask] = []  # our CHILD_SA creations and rekeys in progress
        self.errors: list[str] = []

    def start_new(self, local_ts: tuple, remote_ts: tuple, kind: str, now: float) -> _ChildTask:
        """CREATE_CHILD_SA for a new CHILD_SA of ``kind``: the retry of a refused one (child_refusal)."""
        sa = self.sa
        task = _ChildTask(None, local_ts, remote_ts, ch.child_mode(sa.peer.policy, kind), protocol=kind)
        sa.refusals.retry_task = task
        self._start(task, now)
        return task

    def create(self, now: float, local_ts=None, remote_ts=None, protocol: str | None = None) -> bool:
        """Additional CHILD_SA (§1.3.1): HDR, SK {SA, Ni, [KEi], TSi, TSr} -->.

        ``local_ts`` / ``remote_ts``: networks to propose (default: ours and the peer's
        subnets). Returns False if the IKE_SA is not established, or, for the default selectors,
        while a refused CHILD_SA backs off (agent.ike.child_refusal). The outcome is a
        ChildSaEstablished event, or a ChildSaRefused event (the IKE_SA stays up, e.g. on
        TS_UNACCEPTABLE), after which that selector pair backs off (False until then).
        ``protocol``: "esp" or "ah" (default: the policy's first kind, see ``child.kinds``).
        """
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED or sa.peer is None or sa._successor is not None:
            return False
        if local_ts is None and remote_ts is None and protocol is None and sa.refusals.backoff_holds(now):
            return False  # an acquire while the refused CHILD_SA waits out its backoff (child_refusal)
        kind = protocol or ch.kinds(sa.peer.policy)[0]
        task = _ChildTask(None, tuple(local_ts or sa._local_nets()), tuple(remote_ts or sa.peer.subnets),
                          ch.child_mode(sa.peer.policy, kind), protocol=kind)
        if sa.refusals.pair_holds(_pair(task), now):
            return False  # this pair was refused: it waits out its backoff (child_refusal)
        if (local_ts is None and remote_ts is None and protocol is None
                and not any(c.protocol == kind for c in sa.children)):
            # the policy's missing CHILD_SA (an acquire): refused, it backs off as the IKE_AUTH one does
            sa.refusals.wanted, sa.refusals.retry_task = (task.local_ts, task.remote_ts, kind), task
        self._start(task, now)
        return True

    def rekey(self, inbound_spi: int, now: float) -> bool:
        """Rekey the CHILD_SA with this inbound SPI (§1.3.3); False if unknown or already rekeying."""
        sa = self.sa
        c = next((c for c in sa.children if c.inbound_spi == inbound_spi), None)
        if (c is None or c.rekeyed or self.task_for(c) is not None or sa.state != IkeSaState.ESTABLISHED
                or sa._successor is not None):
            return False
        self._start(_ChildTask(c, c.local_ts, c.remote_ts, c.mode, protocol=c.protocol), now)
        return True

    def _start(self, task: _ChildTask, now: float) -> None:
        sa = self.sa
        task.proposals = ch.offers(sa.peer.policy, task.protocol)
        pfs = [k for p in task.proposals for k in p.ke]
        task.group = pfs[0] if pfs else None
        self.tasks.append(task)
        self._send(task, now)

    def _send(self, task: _ChildTask, now: float) -> None:
        sa = self.sa
        sa._request_lazy(ExchangeType.CREATE_CHILD_SA, lambda t: self.build_request(task, t),
                           lambda msg, inner, t: self.process_response(task, msg, inner, t), now)

    def _drop(self, task: _ChildTask) -> None:
        if task in self.tasks:
            self.tasks.remove(task)

    def build_request(self, task: _ChildTask, now: float) -> list | None:
        sa = self.sa
        if (sa.state != IkeSaState.ESTABLISHED or sa._successor is not None
                or (task.old is not None and (task.old not in sa.children or task.old.rekeyed))):
            self._drop(task)  # the peer rekeyed or deleted it meanwhile
            succ = sa._successor
            if task.old is not None and succ is not None and task.old in succ.children and not task.old.rekeyed:
                task.old.rekey_at = now  # the CHILD_SA moved with an IKE_SA rekey: rekey it there
            return None
        task.ni = sa.rng(NONCE_LEN)
        task.spi = sa._new_child_spi()
        task.collision = None
        payloads: list = []
        if task.old is not None:
            payloads.append(NotifyPayload(int(NotifyType.REKEY_SA), b"", task.old.protocol_id,
                                          task.old.inbound_spi.to_bytes(4, "big")))
        payloads += [ch.esp_sa_payload(task.proposals, task.spi, ke=True), NoncePayload(task.ni)]
        task.ke = None
        if task.group is not None:
            task.ke = KeyExchange(task.group, sa.rng)
            payloads.append(KePayload(task.group, task.ke.public_bytes()))
        payloads += [TsPayload(int(PayloadType.TSi), ch.ts_from_networks(task.local_ts)),
                     TsPayload(int(PayloadType.TSr), ch.ts_from_networks(task.remote_ts))]
        if task.mode == Mode.TRANSPORT:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))
        return payloads

    def _failed(self, task: _ChildTask, reason: str, now: float, notify: int | None = None) -> None:
        sa = self.sa
        self._drop(task)
        sa.child_errors.append(reason)
        if task.old is not None and task.old in sa.children:
            task.old.rekey_at = sa.lifetimes.retry_at(task.old.expire_at, now)
        if task is sa.refusals.retry_task:  # our retry of a refused CHILD_SA: back off further
            sa.refusals.by_peer(reason, notify, now)
        elif task.old is None:  # any other new CHILD_SA (e.g. an acquire per selector pair): the same
            sa.refusals.by_peer_pair(_pair(task), reason, notify, now)

    def process_response(self, task: _ChildTask, msg: Message, inner, now: float,
                                additional: bytes | None = None) -> None:
        """<-- HDR, SK {SA, Nr, [KEr], TSi, TSr}  or  <-- HDR, SK {N(error)}."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, True, tuple(inner))
        ke_note = m.notify(NotifyType.INVALID_KE_PAYLOAD)
        if ke_note is not None:
            group = struct.unpack("!H", ke_note.data)[0] if len(ke_note.data) == 2 else None
            offered = {k for p in task.proposals for k in p.ke}
            if group in offered and group != task.group and task.tries < MAX_KE_RETRIES:
                task.tries += 1
                task.group = group  # HDR, SK {[N(REKEY_SA),] SA, Ni, KEi(group), TSi, TSr} -->
                self._send(task, now)
                return
            self._failed(task, f"CREATE_CHILD_SA: INVALID_KE_PAYLOAD names group {group} we cannot use", now)
            return
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            self._failed(task, f"CREATE_CHILD_SA refused: {notify_name(errors[0].notify_type)}", now,
                               errors[0].notify_type)
            return
        sa_p, nr, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        tsi, tsr = m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        choice = ch.accepted_esp(sa_p, task.proposals, pfs=True) if sa_p else None
        if (choice is None or nr is None or tsi is None or tsr is None
                or not nonce_ok(nr.data, sa._ike_prop.prf)):
            self._failed(task, "CREATE_CHILD_SA response: SA, Nr or TS missing or not offered", now)
            return
        g_ir = None
        if choice.proposal.ke:
            if ke is None or task.ke is None or ke.group != task.ke.ke_id or choice.proposal.ke[0] != ke.group:
                self._failed(task, "CREATE_CHILD_SA response: KE method does not match our KEi", now)
                self.delete_unwanted(task.spi, now, task.protocol)
                return
            try:
                g_ir = task.ke.shared_secret(ke.data)
            except KeyExchangeError as e:
                self._failed(task, f"CREATE_CHILD_SA response: {e}", now)
                self.delete_unwanted(task.spi, now, task.protocol)
                return
        tsi, tsr = natt_ts.child_ts(sa, m, tsi, tsr, exchange_initiator=True,  # §2.23.1, before any check
                                    transport_wanted=task.mode == Mode.TRANSPORT)
        local_ts, remote_ts = ch.networks_of(tsi.selectors), ch.networks_of(tsr.selectors)
        if (not local_ts or not remote_ts or not ch.ts_within(tsi.selectors, ch.ts_from_networks(task.local_ts))
                or not ch.ts_within(tsr.selectors, ch.ts_from_networks(task.remote_ts))):
            self._failed(task, "CREATE_CHILD_SA response: responder widened the traffic selectors", now)
            self.delete_unwanted(task.spi, now, task.protocol)
            return
        transport = task.mode == Mode.TRANSPORT and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        methods = additional_kes(choice.proposal.add_ke)
        if methods and additional is None:
            # RFC 9370 §2.2.4: IKE_FOLLOWUP_KE per additional key exchange, then this again with SK(1..n)
            link = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            sa.followup.run(
                methods, link.data if link is not None else b"", [],
                lambda extra, t: self.process_response(task, msg, inner, t, additional=extra),
                lambda reason, t: (self._failed(task, f"CREATE_CHILD_SA: {reason}", t),
                                   self.delete_unwanted(task.spi, t, task.protocol)), now)
            return
        self._drop(task)
        new = self.make_child(choice, task.spi, task.ni, nr.data, g_ir, local_ts, remote_ts,
                               Mode.TRANSPORT if transport else Mode.TUNNEL, now, exchange_initiator=True,
                               selectors=(tuple(tsi.selectors), tuple(tsr.selectors)),
                               rekey_of=task.old.inbound_spi if task.old is not None else None,
                               additional=additional or b"")
        if task is sa.refusals.retry_task:
            sa.refusals.retry_done()
        if task.old is None:
            sa.refusals.pair_done(_pair(task))
        if task.old is None:
            return
        task.old.rekeyed = True
        if task.collision is not None and first_of((task.ni, nr.data), task.collision):
            # §2.8.1: our exchange holds the lowest nonce, our new CHILD_SA is redundant;
            # the peer, whose exchange won, deletes the old one
            sa.delete_child(new.inbound_spi, now, reason="redundant CHILD_SA of a simultaneous rekey")
            return
        if task.old in sa.children:
            sa.delete_child(task.old.inbound_spi, now, reason="rekeyed")

    def delete_unwanted(self, our_spi: int, now: float, protocol: str = "esp") -> None:
        """The responder installed a CHILD_SA we refuse: HDR, SK {D(ESP|AH, our SPI)} -->."""
        sa = self.sa
        pid = ProtocolId.AH if protocol == "ah" else ProtocolId.ESP
        sa._request(ExchangeType.INFORMATIONAL,
                      [DeletePayload(int(pid), 4, (our_spi.to_bytes(4, "big"),))],
                      lambda msg, inner, t: None, now)

    def make_child(self, choice: ch.EspChoice, our_spi: int, ni: bytes, nr: bytes, g_ir: bytes | None,
                    local_ts, remote_ts, mode: str, now: float, *, exchange_initiator: bool,
                    rekey_of: int | None = None, additional: bytes = b"",
                    selectors: tuple = ((), ())) -> ch.ChildSa:
        """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr [| SK(1) | ... | SK(n)]) (§2.17, RFC 9370 §2.2.4),
        split by the exchange's roles."""
        sa = self.sa
        keymat = derive_child_keymat(sa._ike_prop.prf, sa._keys.sk_d, ni, nr, ch.keymat_len(choice.proposal),
                                     g_ir, additional)
        inbound, outbound = ch.split_keymat(keymat, choice.proposal, initiator=exchange_initiator,
                                            our_spi=our_spi, peer_spi=choice.peer_spi)
        vip = sa.virtual_ips[0] if sa.virtual_ips else None
        child = ch.ChildSa(our_spi, choice.peer_spi, choice.proposal, tuple(local_ts), tuple(remote_ts), mode,
                           sa._udp_encap(), now, inbound, outbound, virtual_ip=vip,
                           local_selectors=tuple(selectors[0]), remote_selectors=tuple(selectors[1]))
        sa.lifetimes.set_child(child, now)
        sa.children.append(child)
        sa.events.append(ChildSaEstablished(
            sa.peer_name, sa.spi_i, sa.spi_r, inbound, outbound, tuple(local_ts), tuple(remote_ts), mode,
            child.udp_encap, sa.local, sa.remote, choice.proposal.describe(), rekey_of, vip,
            child.protocol, child.local_selectors, child.remote_selectors, exchange_initiator))
        return child

    def process_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR, SK {[N(REKEY_SA),] SA, Ni, [KEi], [TSi, TSr]} --> ; <-- HDR, SK {SA, Nr, [KEr], [TSi, TSr]}."""
        sa = self.sa
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        if sa.state != IkeSaState.ESTABLISHED or sa._successor is not None or sa.peer is None:
            return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]  # §2.25: being rekeyed or deleted
        sa_p, ni, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        if not 16 <= len(ni.data) <= 256:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        if sa_p.proposals and all(p.protocol == ProtocolId.IKE for p in sa_p.proposals):
            return sa.ike_rekey.process_request(sa_p, ni.data, ke, now)
        if not nonce_ok(ni.data, sa._ike_prop.prf):  # §2.10: half the PRF key size at least
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        rekey = m.notify(NotifyType.REKEY_SA)
        old = None
        if rekey is not None:
            spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else None
            old = next((c for c in sa.children if c.outbound_spi == spi), None)
            if old is None:
                pid = rekey.protocol if rekey.protocol in (ProtocolId.ESP, ProtocolId.AH) else int(ProtocolId.ESP)
                if any(c.outbound_spi == spi and c.protocol_id == pid for c, _why in sa.info.closing):
                    # §2.25.1: we are deleting it; the peer learns that from our Delete
                    return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]
                return [NotifyPayload(int(NotifyType.CHILD_SA_NOT_FOUND), b"", pid, rekey.spi)]
        tsi, tsr = m.first(PayloadType.TSi), m.first(PayloadType.TSr)
        if tsi is None or tsr is None:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        ours = ch.acceptable(sa.peer.policy)
        if old is not None:  # a rekey keeps the protocol of the CHILD_SA it replaces
            ours = [p for p in ours if p.is_ah == old.proposal.is_ah]
        choice = ch.choose_esp(sa_p, ours, pfs=True, ke_hint=ke.group if ke else None)
        if choice is None:
            sa.refusals.by_us("no common CHILD_SA proposal (CREATE_CHILD_SA)", NotifyType.NO_PROPOSAL_CHOSEN,
                                sa.refusals.offer_text(sa_p, tsi, tsr))
            return [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        g_ir, kex = None, None
        if choice.proposal.ke:
            group = choice.proposal.ke[0]
            if ke is None or ke.group != group:
                return [NotifyPayload(int(NotifyType.INVALID_KE_PAYLOAD), struct.pack("!H", group))]
            try:
                kex = KeyExchange(group, sa.rng)
                g_ir = kex.shared_secret(ke.data)
            except KeyExchangeError:
                return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        tsi, tsr = natt_ts.child_ts(sa, m, tsi, tsr, exchange_initiator=False,  # §2.23.1, before narrowing
                                    transport_wanted=natt_ts.wants_transport(sa.peer.policy, choice))
        # TSi is the initiator's side: PAD rule, the peer claims only its own networks (§2.9)
        # §2.9 on IP protocol, ports and addresses
        remote_sel = ch.narrow_ts(tsi.selectors, ch.ts_from_networks(sa._remote_allowed()))
        local_sel = ch.narrow_ts(tsr.selectors, ch.ts_from_networks(sa._local_nets()))
        remote_ts, local_ts = ch.networks_of(remote_sel), ch.networks_of(local_sel)
        if not remote_ts or not local_ts:
            sa.refusals.by_us(f"traffic selectors do not overlap ours (CREATE_CHILD_SA; {sa.refusals.ts_allowed_text()})",
                                NotifyType.TS_UNACCEPTABLE, sa.refusals.offer_text(sa_p, tsi, tsr))
            return [NotifyPayload(int(NotifyType.TS_UNACCEPTABLE))]
        nr = sa.rng(NONCE_LEN)
        spi = sa._new_child_spi()
        kind = Protocol.AH if choice.proposal.is_ah else Protocol.ESP
        transport = (ch.child_mode(sa.peer.policy, kind) == Mode.TRANSPORT
                     and m.notify(NotifyType.USE_TRANSPORT_MODE) is not None)
        payloads: list = [ch.esp_sa_payload([choice.proposal], spi, [choice.number], ke=True), NoncePayload(nr)]
        if kex is not None:
            payloads.append(KePayload(kex.ke_id, kex.public_bytes()))
        payloads += [TsPayload(int(PayloadType.TSi), tuple(remote_sel)),
                     TsPayload(int(PayloadType.TSr), tuple(local_sel))]
        if transport:
            payloads.append(NotifyPayload(int(NotifyType.USE_TRANSPORT_MODE)))

        def finish(extra: bytes, t: float) -> None:
            if old is not None and old not in sa.children:
                return  # deleted meanwhile
            self.make_child(choice, spi, ni.data, nr, g_ir, local_ts, remote_ts,
                             Mode.TRANSPORT if transport else Mode.TUNNEL, t, exchange_initiator=False,
                             rekey_of=old.inbound_spi if old is not None else None, additional=extra,
                             selectors=(tuple(local_sel), tuple(remote_sel)))
            if old is not None:
                old.rekeyed = True
                task = self.task_for(old)
                if task is not None and task.ni:
                    task.collision = (ni.data, nr)  # simultaneous rekey: resolved when our response arrives

        methods = additional_kes(choice.proposal.add_ke)
        if methods:  # RFC 9370 §2.2.4: the CHILD_SA exists after the last IKE_FOLLOWUP_KE
            payloads.append(sa.followup.await_(methods, finish, lambda reason, t: sa.child_errors.append(reason)))
        else:
            finish(b"", now)
        return payloads

    def outstanding(self) -> bool:
        """A CREATE_CHILD_SA (or its IKE_FOLLOWUP_KE) for a CHILD_SA of ours has been sent and
        not finished (task.ni is drawn when the request is built)."""
        return any(t.ni for t in self.tasks)

    def task_for(self, child: ch.ChildSa) -> _ChildTask | None:
        return next((t for t in self.tasks if t.old is child), None)
