"""CREATE_CHILD_SA task for the IKE_SA rekey (RFC 7296 §1.3.2, §2.8.1, §2.18), both roles.

  HDR, SK {SA, Ni, KEi} -->  <-- HDR, SK {SA, Nr, KEr}
  SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18), with additional key exchanges
  prf(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n)) (RFC 9370 §2.2.4); new SPIs from the SA
  payloads; the CHILD_SAs move to the new IKE_SA, the old one is deleted
  (IkeSaDeleted(reason "rekeyed", rekeyed_to=(SPIi, SPIr) of the new one)).

Simultaneous rekeys (§2.8.1): the IKE_SA made by the exchange holding the lowest of the four
nonces is redundant and deleted by the end that initiated that exchange. §2.25.2: while one
of our CHILD_SA exchanges is outstanding the peer's rekey gets TEMPORARY_FAILURE.

The task (:class:`_IkeTask`) holds its own nonce, KE and new SPI.

Pure module: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.iana import ExchangeType, NotifyType, PayloadType
from agent.ike import child as ch
from agent.ike.crypto import (KeyExchange, KeyExchangeError, derive_ike_keys_from_skeyseed, derive_rekey_skeyseed,
                              ike_key_lengths, nonce_ok)
from agent.ike.errors import DeleteReason, IkeSaState, notify_name
from agent.ike.message import KePayload, Message, NoncePayload, NotifyPayload
from agent.ike.natt import NatState
from agent.ike.proposals import additional_kes
from agent.ike.tasks.child_create import MAX_KE_RETRIES, first_of

NONCE_LEN = 32

__all__ = ["IkeRekey"]


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


class IkeRekey:
    """The IKE_SA rekey of one IkeSa, both roles (see the module docstring)."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.task: _IkeTask | None = None  # our rekey in progress
        self.collision: _IkeCollision | None = None  # the peer's rekey that crossed ours

    def start(self, now: float) -> bool:
        """Rekey this IKE_SA (§1.3.2): HDR, SK {SA, Ni, KEi} -->. False if not possible now."""
        sa = self.sa
        if sa.state != IkeSaState.ESTABLISHED or self.task is not None or sa._successor is not None:
            return False
        props = sa._ike_proposals()
        if sa._ike_prop is not None:  # offer the current algorithms first
            props = [sa._ike_prop] + [p for p in props if p != sa._ike_prop]
        self.task = _IkeTask(props, props[0].ke[0])
        self._send(now)
        return True

    def _send(self, now: float) -> None:
        sa = self.sa
        sa._request_lazy(ExchangeType.CREATE_CHILD_SA, self.build_request, self.process_response,
                           now)

    def build_request(self, now: float) -> list | None:
        sa = self.sa
        task = self.task
        if task is None or sa.state != IkeSaState.ESTABLISHED or sa._successor is not None:
            self.task = None
            return None
        task.spi = sa._new_ike_spi()
        task.ni = sa.rng(NONCE_LEN)
        task.ke = KeyExchange(task.group, sa.rng)
        self.collision = None
        props = [p for p in task.proposals if task.group in p.ke] + [p for p in task.proposals if task.group not in p.ke]
        return [ch.ike_sa_payload(props, spi=task.spi), NoncePayload(task.ni), KePayload(task.group, task.ke.public_bytes())]

    def _failed(self, reason: str, now: float) -> None:
        sa = self.sa
        self.task = None
        sa.child_errors.append(reason)
        sa.rekey_at = sa.lifetimes.retry_at(sa.expire_at, now)

    def process_response(self, msg: Message, inner, now: float, additional: bytes | None = None) -> None:
        """<-- HDR, SK {SA, Nr, KEr}  or  <-- HDR, SK {N(error)}."""
        sa = self.sa
        task = self.task
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
                self._send(now)
                return
            self._failed(f"IKE_SA rekey: INVALID_KE_PAYLOAD names group {group} we cannot use", now)
            return
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            self._failed(f"IKE_SA rekey refused: {notify_name(errors[0].notify_type)}", now)
            return
        sa_p, nr, ke = m.first(PayloadType.SA), m.first(PayloadType.NONCE), m.first(PayloadType.KE)
        prop = ch.accepted_ike(sa_p, task.proposals) if sa_p else None
        if (prop is None or nr is None or ke is None or len(sa_p.proposals[0].spi) != 8
                or ke.group != task.group or prop.ke[0] != ke.group or not nonce_ok(nr.data, prop.prf)):
            self._failed("IKE_SA rekey response: SA, Nr, KEr or SPI missing or not offered", now)
            return
        spi_r = int.from_bytes(sa_p.proposals[0].spi, "big")
        try:
            g_ir = task.ke.shared_secret(ke.data)
        except KeyExchangeError as e:
            self._failed(f"IKE_SA rekey response: {e}", now)
            return
        methods = additional_kes(prop.add_ke)
        if methods and additional is None:
            # RFC 9370 §2.2.4: IKE_FOLLOWUP_KE per additional key exchange, then this again with SK(1..n)
            link = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            sa.followup.run(
                methods, link.data if link is not None else b"", [],
                lambda extra, t: self.process_response(msg, inner, t, additional=extra),
                lambda reason, t: self._failed(f"IKE_SA rekey: {reason}", t), now)
            return
        self.task = None
        new = self._spawn(initiator=True, spi_i=task.spi, spi_r=spi_r, ni=task.ni, nr=nr.data, prop=prop,
                          g_ir=g_ir, now=now, additional=additional or b"")
        coll = self.collision
        if coll is not None and first_of((task.ni, nr.data), (coll.ni, coll.nr)):
            # §2.8.1: our new IKE_SA is redundant; the peer deletes the old one
            new.delete(now, "redundant IKE_SA of a simultaneous rekey", DeleteReason.SUPERSEDED)
            return
        holder = coll.sa if coll is not None else sa
        self.move_children(holder, new)
        if holder is not sa:
            sa._rekeyed_to = (new.spi_i, new.spi_r)
        sa._successor = new
        sa.delete(now, "rekeyed", DeleteReason.REKEYED)  # HDR, SK {D(IKE)} --> on the old IKE_SA

    def process_request(self, sa_p, ni: bytes, ke, now: float) -> list:
        sa = self.sa
        if sa.child_create.outstanding():
            # §2.25.2: our CHILD_SA exchange would finish on an IKE_SA about to go; the
            # initiator retries its IKE_SA rekey later (_ike_rekey_failed -> rekey_at)
            return [NotifyPayload(int(NotifyType.TEMPORARY_FAILURE))]
        if ke is None:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        res = ch.choose_ike(sa_p, sa._ike_proposals(), ke.group)
        if res is None:
            return [NotifyPayload(int(NotifyType.NO_PROPOSAL_CHOSEN))]
        choice, _kes = res
        if choice.proposal.ke[0] != ke.group:
            return [NotifyPayload(int(NotifyType.INVALID_KE_PAYLOAD), struct.pack("!H", choice.proposal.ke[0]))]
        if not nonce_ok(ni, choice.proposal.prf):  # §2.10, for the new IKE_SA's PRF
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        offered = next(p for p in sa_p.proposals if p.number == choice.number)
        if len(offered.spi) != 8 or not int.from_bytes(offered.spi, "big"):
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        try:
            kex = KeyExchange(ke.group, sa.rng)
            g_ir = kex.shared_secret(ke.data)
        except KeyExchangeError:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        nr = sa.rng(NONCE_LEN)
        spi_r = sa._new_ike_spi()

        def finish(extra: bytes, t: float) -> None:
            if sa.state != IkeSaState.ESTABLISHED or sa._successor is not None:
                return
            new = self._spawn(initiator=False, spi_i=int.from_bytes(offered.spi, "big"), spi_r=spi_r, ni=ni, nr=nr,
                              prop=choice.proposal, g_ir=g_ir, now=t, additional=extra)
            if self.task is not None and self.task.ni:
                self.collision = _IkeCollision(ni, nr, new)
            self.move_children(sa, new)
            sa._successor = new

        payloads = [ch.ike_sa_payload([choice.proposal], spi=spi_r, numbers=[choice.number]), NoncePayload(nr),
                    KePayload(ke.group, kex.public_bytes())]
        methods = additional_kes(choice.proposal.add_ke)
        if methods:  # RFC 9370 §2.2.4: the new IKE_SA exists after the last IKE_FOLLOWUP_KE
            payloads.append(sa.followup.await_(methods, finish, lambda reason, t: sa.child_errors.append(reason)))
        else:
            finish(b"", now)
        return payloads

    def _spawn(self, *, initiator: bool, spi_i: int, spi_r: int, ni: bytes, nr: bytes, prop, g_ir: bytes,
               now: float, additional: bytes = b""):
        """The new IKE_SA of a rekey: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18)."""
        sa = self.sa
        new = type(sa)(sa.cfg, sa.rng, initiator=initiator, local=sa.local, remote=sa.remote, now=now)
        new.spi_i, new.spi_r = spi_i, spi_r
        new.peer = sa.peer
        new.peer_cert_serial = sa.peer_cert_serial  # PAD revocation follows the rekey
        new._ni, new._nr = ni, nr
        ek, ak = ike_key_lengths(prop)
        # RFC 9370 §2.2.4: prf(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n))
        skeyseed = derive_rekey_skeyseed(sa._ike_prop.prf, sa._keys.sk_d, g_ir, ni, nr, additional)
        new.nat = NatState(sa.nat.local, sa.nat.remote)
        new._peer_sig_hashes = set(sa._peer_sig_hashes)
        new.virtual_ips, new.peer_virtual_ips = sa.virtual_ips, sa.peer_virtual_ips
        new.refusals.inherit(sa.refusals)
        new._install_keys(prop, derive_ike_keys_from_skeyseed(prop.prf, skeyseed, ni, nr, spi_i, spi_r, ek, ak))
        new._established(now)
        sa.spawned.append(new)
        return new

    @staticmethod
    def move_children(src, dst) -> None:
        """The CHILD_SAs of ``src`` now belong to ``dst`` (§2.18); ``src`` says so when deleted."""
        dst.children.extend(src.children)
        src.children = []
        src._rekeyed_to = (dst.spi_i, dst.spi_r)
