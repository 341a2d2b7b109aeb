"""Multiple key exchanges in IKEv2 (RFC 9370) over IKE_INTERMEDIATE (RFC 9242) and
IKE_FOLLOWUP_KE, e.g. the hybrid CURVE25519 + ML_KEM_768 (``aes256gcm16-prfsha384-x25519-ke1_mlkem768``).

A mixin of :class:`agent.ike.sa.IkeSa`, plus the SA payload helpers that
agent.ike.child uses. Exchanges, in RFC notation:

- IKE_SA_INIT: HDR, SA(..., ADDKE1..7), KEi, Ni, N(INTERMEDIATE_EXCHANGE_SUPPORTED) -->
  <-- HDR, SA, KEr, Nr, N(INTERMEDIATE_EXCHANGE_SUPPORTED); the responder picks one
  transform per ADDITIONAL_KEY_EXCHANGE_n type (NONE when offered) (RFC 9370 §2.2.1).
- per additional key exchange n, message IDs 1, 2, ... (RFC 9242 §3.2):
  HDR(IKE_INTERMEDIATE), SK {KEi(n)} -->  <-- HDR(IKE_INTERMEDIATE), SK {KEr(n)}
  protected by the current SK_e/SK_a; then (RFC 9370 §2.2.2)
  SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr),
  {SK_d(n) | SK_ai(n) | ... | SK_pr(n)} = prf+(SKEYSEED(n), Ni | Nr | SPIi | SPIr).
  IKE_AUTH uses the next message ID and the final keys.
- IntAuth (RFC 9242 §3.3.2): IntAuth_in = prf(SK_pi, IntAuth_i(n-1) | IntAuth_inA | IntAuth_inP),
  likewise IntAuth_rn with SK_pr over the responses; SK_p* are the keys protecting that
  exchange. A = IKE header | (unencrypted payloads: none here) | SK payload header, with the
  header Length and the SK Payload Length set as if the inner payloads were not encrypted
  (no IV, padding, Pad Length, ICV); P = the inner payloads. Fragmented messages count as
  the whole message. The AUTH signed octets get IntAuth_iN | IntAuth_rN | IKE_AUTH_MID
  (4 octets, big-endian) appended.
- CREATE_CHILD_SA with additional key exchanges (RFC 9370 §2.2.4):
  HDR, SK {SA, Ni, KEi, ...} -->  <-- HDR, SK {SA, Nr, KEr, N(ADDITIONAL_KEY_EXCHANGE)(link1), ...}
  HDR(IKE_FOLLOWUP_KE), SK {KEi(1), N(ADDITIONAL_KEY_EXCHANGE)(link1)} -->
  <-- HDR(IKE_FOLLOWUP_KE), SK {KEr(1)[, N(ADDITIONAL_KEY_EXCHANGE)(link2)]} ...
  KEYMAT = prf+(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n)); for an IKE_SA rekey
  SKEYSEED = prf(SK_d, SK(0) | Ni | Nr | SK(1) | ... | SK(n)). The new SA exists
  only after the last IKE_FOLLOWUP_KE. An unknown link is answered with N(STATE_NOT_FOUND).

Pure module: no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from agent.iana import ExchangeType, KeId, NotifyType, PayloadType, TransformType, name_of
from agent.ike.crypto import (KeyExchange, KeyExchangeError, Prf, derive_ike_keys_from_skeyseed,
                              derive_rekey_skeyseed)
from agent.ike.errors import Drop, IkeSaState
from agent.ike.events import IkeKeysDerived
from agent.ike.message import HEADER_LEN, KePayload, Message, NotifyPayload, Transform, encode_header
from agent.ike.proposals import (additional_kes, encr_key_len, integ_key_len, wireshark_ike_encr_name,
                                 wireshark_ike_integ_name)

STATE_NOT_FOUND = 47  # RFC 9370 §3.3 (error notify; not yet in agent.iana)
LINK_LEN = 8  # our ADDITIONAL_KEY_EXCHANGE link data (opaque to the peer)

ADD_KE_TYPES = frozenset(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i for i in range(7))

__all__ = ["IntermediateExchange", "ADD_KE_TYPES", "add_ke_transforms", "choose_add_ke", "int_auth_step",
           "int_auth_a", "STATE_NOT_FOUND"]


# ------------------------------------------------------------------ SA payload helpers

def add_ke_transforms(add_ke) -> list[Transform]:
    """Transforms of type ADDITIONAL_KEY_EXCHANGE_n (6..12) for ``add_ke`` (RFC 9370 §2.2.1)."""
    out = []
    for i, alts in enumerate(add_ke or ()):
        out += [Transform(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i, int(k)) for k in alts]
    return out


def choose_add_ke(ts: dict, mine) -> tuple[tuple[int, ...], ...] | None:
    """Pick one method per ADDITIONAL_KEY_EXCHANGE_n type (RFC 9370 §2.2.1).

    ``ts``: the peer proposal's transforms by type; ``mine``: our add_ke. A type absent
    on one side counts as NONE. Returns the chosen add_ke (``()`` for a type neither side
    has, ``(0,)`` for NONE the peer offered) or None when the proposals do not match.
    """
    chosen: list[tuple[int, ...]] = []
    mine = tuple(mine or ())
    for i in range(7):
        peer = [t.id for t in ts.get(int(TransformType.ADDITIONAL_KEY_EXCHANGE_1) + i, [])]
        ours = mine[i] if i < len(mine) else ()
        if not peer and not ours:
            chosen.append(())
        elif not peer:
            if KeId.NONE not in ours:
                return None  # we require it, the peer does not do it
            chosen.append(())
        elif not ours:
            if KeId.NONE not in peer:
                return None  # the peer requires one we do not do
            chosen.append((int(KeId.NONE),))
        else:
            common = [k for k in ours if k in peer]
            if not common:
                return None
            chosen.append((int(common[0]),))
    while chosen and not chosen[-1]:
        chosen.pop()
    return tuple(chosen)


# ------------------------------------------------------------------ IntAuth (RFC 9242 §3.3.2)

def int_auth_a(spi_i: int, spi_r: int, exchange: int, flags: int, message_id: int, first: int,
               plain_len: int) -> bytes:
    """IntAuth_[i/r]*A: IKE header and SK payload header with the lengths of the
    unencrypted message (28 + 4 + len(P), 4 + len(P)); no IV."""
    hdr = encode_header(spi_i, spi_r, int(PayloadType.SK), exchange, flags, message_id,
                        HEADER_LEN + 4 + plain_len)
    return hdr + struct.pack("!BBH", first, 0, 4 + plain_len)


def int_auth_step(prf: Prf, sk_p: bytes, previous: bytes, a: bytes, p: bytes) -> bytes:
    """IntAuth_[i/r]n = prf(SK_p[i/r], IntAuth_[i/r](n-1) | A | P) (empty previous for n = 1)."""
    return prf.prf(sk_p, previous + a + p)


@dataclass(eq=False)
class _Followup:
    """Responder state between IKE_FOLLOWUP_KE exchanges, keyed by the link we sent."""
    methods: list
    finish: Callable
    fail: Callable
    secrets: list = field(default_factory=list, repr=False)


class IntermediateExchange:
    """IKE_INTERMEDIATE / IKE_FOLLOWUP_KE tasks of an IkeSa (mixin; see the module docstring)."""

    def _init_intermediate(self) -> None:
        self._addke_done = 0  # additional key exchanges completed in IKE_INTERMEDIATE
        self._n_intermediate = 0
        self._int_auth_i = b""
        self._int_auth_r = b""
        self._rx_plain: tuple[int, bytes] | None = None  # (first inner type, inner payloads) last opened
        self._tx_plain: tuple[int, bytes] | None = None  # same for the last message sealed
        self._followups: dict[bytes, _Followup] = {}
        self.drops: list[str] = []  # counter names for the manager (drained by it)

    # ------------------------------------------------------------ IKE_SA_INIT hooks
    def _addke_pending(self) -> list[int]:
        if self._ike_prop is None or self.state == IkeSaState.ESTABLISHED:
            return []
        return additional_kes(self._ike_prop.add_ke)[self._addke_done:]

    @staticmethod
    def _announces_intermediate(payloads) -> bool:
        return any(isinstance(p, NotifyPayload) and p.notify_type == NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED
                   for p in payloads)

    def _intermediate_notify(self) -> list:
        """Initiator: N(INTERMEDIATE_EXCHANGE_SUPPORTED) when we offer additional key exchanges."""
        if any(p.add_ke for p in self._ike_proposals()):
            return [NotifyPayload(int(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))]
        return []

    def _intermediate_reply(self, request_payloads) -> list:
        """Responder: answer the initiator's announcement (RFC 9242 §3.1)."""
        if self._announces_intermediate(request_payloads):
            return [NotifyPayload(int(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))]
        return []

    def _after_init(self, response_payloads, now: float) -> None:
        """Initiator after IKE_SA_INIT: the IKE_INTERMEDIATE exchanges, then IKE_AUTH."""
        if self._addke_pending() and not self._announces_intermediate(response_payloads):
            self._die("IKE_SA_INIT: responder chose additional key exchanges without "
                      "N(INTERMEDIATE_EXCHANGE_SUPPORTED) (RFC 9370 §2.2.1)")
            return
        self._next_intermediate(now)

    def _addke_missing(self) -> bool:
        """Responder got IKE_AUTH before every negotiated additional key exchange: fail."""
        pending = self._addke_pending()
        if not pending:
            return False
        self.drops.append(Drop.MISSING_INTERMEDIATE)
        self._die(f"IKE_AUTH before the additional key exchange {name_of(KeId, pending[0])} "
                  f"(IKE_INTERMEDIATE, RFC 9370 §2.2.2)")
        return True

    def _int_auth(self) -> bytes:
        """IntAuth_iN | IntAuth_rN | IKE_AUTH_MID for the AUTH signed octets; b"" without IKE_INTERMEDIATE."""
        if not self._n_intermediate:
            return b""
        # IKE_SA_INIT has ID 0, the IKE_INTERMEDIATEs 1..N (RFC 9242 §3.2), so IKE_AUTH is N + 1
        return self._int_auth_i + self._int_auth_r + struct.pack("!I", self._n_intermediate + 1)

    def _step_int_auth(self, initiator_msg: bool, exchange: int, flags: int, mid: int,
                       plain: tuple[int, bytes]) -> None:
        first, p = plain
        a = int_auth_a(self.spi_i, self.spi_r, exchange, flags, mid, first, len(p))
        if initiator_msg:
            self._int_auth_i = int_auth_step(self._prf, self._keys.sk_pi, self._int_auth_i, a, p)
        else:
            self._int_auth_r = int_auth_step(self._prf, self._keys.sk_pr, self._int_auth_r, a, p)

    def _update_keys(self, sk_n: bytes) -> None:
        """SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr) and all SK_* anew (RFC 9370 §2.2.2)."""
        prop = self._ike_prop
        ek = encr_key_len(prop.encr, prop.encr_key_bits)
        ak = integ_key_len(prop.integ) if prop.integ else 0
        skeyseed = derive_rekey_skeyseed(prop.prf, self._keys.sk_d, sk_n, self._ni, self._nr)
        self._keys = derive_ike_keys_from_skeyseed(prop.prf, skeyseed, self._ni, self._nr, self.spi_i,
                                                   self.spi_r, ek, ak)
        # the key log must follow: IKE_AUTH is protected by these keys
        self.events.append(IkeKeysDerived(self.spi_i, self.spi_r, self._keys.sk_ei, self._keys.sk_er,
                                          self._keys.sk_ai, self._keys.sk_ar,
                                          wireshark_ike_encr_name(prop.encr, prop.encr_key_bits),
                                          wireshark_ike_integ_name(prop.integ)))

    # ------------------------------------------------------------ IKE_INTERMEDIATE: initiator
    def _next_intermediate(self, now: float) -> None:
        pending = self._addke_pending()
        if not pending:
            self._send_auth(now)
            return
        method = pending[0]
        try:
            kex = KeyExchange(method, self.rng)
            ke = KePayload(method, kex.public_bytes())
        except KeyExchangeError as e:
            self._die(f"IKE_INTERMEDIATE: {e}")
            return
        # HDR(IKE_INTERMEDIATE), SK {KEi(n)} -->
        self._request(ExchangeType.IKE_INTERMEDIATE, [ke],
                      lambda msg, inner, t: self._process_intermediate_response(kex, msg, inner, t), now)
        self._step_int_auth(True, int(ExchangeType.IKE_INTERMEDIATE), self._flags(False), self._next_mid - 1,
                            self._tx_plain)

    def _process_intermediate_response(self, kex, msg: Message, inner, now: float) -> None:
        """<-- HDR(IKE_INTERMEDIATE), SK {KEr(n)}: then SKEYSEED(n) and the next step."""
        self._step_int_auth(False, msg.exchange, msg.flags, msg.message_id, self._rx_plain)
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, False, True, tuple(inner))
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            self._die(f"IKE_INTERMEDIATE refused: {_nname(errors[0].notify_type)}")
            return
        ke = m.first(PayloadType.KE)
        if ke is None or ke.group != kex.ke_id:
            self.drops.append(Drop.INVALID_KE_PAYLOAD)
            self._die(f"IKE_INTERMEDIATE response: no KEr for {name_of(KeId, kex.ke_id)}")
            return
        try:
            sk_n = kex.shared_secret(ke.data)
        except KeyExchangeError as e:
            self.drops.append(Drop.INVALID_KE_DATA)
            self._die(f"IKE_INTERMEDIATE response: {e}")
            return
        self._addke_done += 1
        self._n_intermediate += 1
        self._update_keys(sk_n)
        self._next_intermediate(now)

    # ------------------------------------------------------------ IKE_INTERMEDIATE: responder
    def _process_intermediate_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR(IKE_INTERMEDIATE), SK {KEi(n)} --> ; <-- HDR(IKE_INTERMEDIATE), SK {KEr(n)}.
        Responds itself (returns None): the keys change right after the response is sealed."""
        if self.initiator or self.state != IkeSaState.AUTHENTICATING:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        self._step_int_auth(True, msg.exchange, msg.flags, msg.message_id, self._rx_plain)
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, True, False, tuple(inner))
        ke = m.first(PayloadType.KE)
        pending = self._addke_pending()
        sk_n = None
        if ke is None and not pending:
            payloads: list = []  # an IKE_INTERMEDIATE for something else: nothing to do (RFC 9242 §3.2)
        elif ke is None or not pending or ke.group != pending[0]:
            want = name_of(KeId, pending[0]) if pending else "none"
            self.drops.append(Drop.INVALID_KE_PAYLOAD)
            self._die(f"IKE_INTERMEDIATE: KEi of {name_of(KeId, ke.group) if ke else 'no method'}, "
                      f"expected {want}")
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        else:
            try:
                kex = KeyExchange(ke.group, self.rng)
                sk_n = kex.shared_secret(ke.data)
                payloads = [KePayload(ke.group, kex.public_bytes())]
            except KeyExchangeError as e:
                self.drops.append(Drop.INVALID_KE_DATA)
                self._die(f"IKE_INTERMEDIATE request: {e}")
                return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        self._respond(msg, payloads, self.local, self.remote)
        self._step_int_auth(False, msg.exchange, self._flags(True), msg.message_id, self._tx_plain)
        self._n_intermediate += 1
        if sk_n is not None:
            self._addke_done += 1
            self._update_keys(sk_n)
        return None

    # ------------------------------------------------------------ IKE_FOLLOWUP_KE (RFC 9370 §2.2.4)
    def _run_followups(self, methods: list, link: bytes, secrets: list, finish: Callable, fail: Callable,
                       now: float) -> None:
        """Initiator: one IKE_FOLLOWUP_KE per method, then ``finish(SK(1) | ... | SK(n), now)``;
        ``fail(reason, now)`` on any error."""
        if not methods:
            finish(b"".join(secrets), now)
            return
        if not link:
            fail("additional key exchanges chosen but no N(ADDITIONAL_KEY_EXCHANGE) link (RFC 9370 §2.2.4)", now)
            return
        method = methods[0]
        try:
            kex = KeyExchange(method, self.rng)
            ke = KePayload(method, kex.public_bytes())
        except KeyExchangeError as e:
            fail(f"IKE_FOLLOWUP_KE: {e}", now)
            return

        def on_response(msg: Message, inner, t: float) -> None:
            m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, True, tuple(inner))
            errors = [n for n in m.notifies() if n.is_error]
            if errors:
                fail(f"IKE_FOLLOWUP_KE refused: {_nname(errors[0].notify_type)}", t)
                return
            kr = m.first(PayloadType.KE)
            if kr is None or kr.group != method:
                self.drops.append(Drop.INVALID_KE_PAYLOAD)
                fail(f"IKE_FOLLOWUP_KE response: no KEr for {name_of(KeId, method)}", t)
                return
            try:
                ss = kex.shared_secret(kr.data)
            except KeyExchangeError as e:
                self.drops.append(Drop.INVALID_KE_DATA)
                fail(f"IKE_FOLLOWUP_KE response: {e}", t)
                return
            nxt = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
            rest = methods[1:]
            if not rest and nxt is not None:
                fail("IKE_FOLLOWUP_KE response asks for more key exchanges than negotiated", t)
                return
            self._run_followups(rest, nxt.data if nxt is not None else b"", secrets + [ss], finish, fail, t)

        # HDR(IKE_FOLLOWUP_KE), SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)(link)} -->
        self._request(ExchangeType.IKE_FOLLOWUP_KE,
                      [ke, NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link)], on_response, now)

    def _await_followups(self, methods: list, finish: Callable, fail: Callable) -> NotifyPayload:
        """Responder: remember what to do after the IKE_FOLLOWUP_KEs; returns N(ADDITIONAL_KEY_EXCHANGE)(link)."""
        link = self.rng(LINK_LEN)
        self._followups[link] = _Followup(list(methods), finish, fail)
        return NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link)

    def _process_followup_request(self, msg: Message, inner, now: float) -> list:
        """HDR(IKE_FOLLOWUP_KE), SK {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)(link)} -->
        <-- HDR(IKE_FOLLOWUP_KE), SK {KEr(n)[, N(ADDITIONAL_KEY_EXCHANGE)(next link)]}."""
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, msg.is_initiator, False, tuple(inner))
        n = m.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
        st = self._followups.pop(n.data, None) if n is not None else None
        if st is None:
            return [NotifyPayload(STATE_NOT_FOUND)]
        ke = m.first(PayloadType.KE)
        if ke is None or ke.group != st.methods[0]:
            self.drops.append(Drop.INVALID_KE_PAYLOAD)
            st.fail(f"IKE_FOLLOWUP_KE: KEi is not {name_of(KeId, st.methods[0])}", now)
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        try:
            kex = KeyExchange(ke.group, self.rng)
            st.secrets.append(kex.shared_secret(ke.data))
            payloads: list = [KePayload(ke.group, kex.public_bytes())]
        except KeyExchangeError as e:
            self.drops.append(Drop.INVALID_KE_DATA)
            st.fail(f"IKE_FOLLOWUP_KE request: {e}", now)
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        st.methods.pop(0)
        if st.methods:
            link = self.rng(LINK_LEN)
            self._followups[link] = st
            payloads.append(NotifyPayload(int(NotifyType.ADDITIONAL_KEY_EXCHANGE), link))
        else:
            st.finish(b"".join(st.secrets), now)
        return payloads


def _nname(t: int) -> str:
    if t == STATE_NOT_FOUND:
        return "STATE_NOT_FOUND"
    try:
        return NotifyType(t).name
    except ValueError:
        return f"NOTIFY({t})"


def _requires_add_ke(p) -> bool:
    return any(alts and KeId.NONE not in alts for alts in p.add_ke)


def _hybrid_hint(self, offered_sa, ours) -> str:
    """Why NO_PROPOSAL_CHOSEN, when our policy lists only hybrid (RFC 9370) proposals."""
    if not ours or not all(_requires_add_ke(p) for p in ours):
        return ""
    if offered_sa is not None:  # responder: would a classical variant of ours have matched?
        from agent.ike.child import choose_ike
        from dataclasses import replace
        if choose_ike(offered_sa, [replace(p, add_ke=()) for p in ours], None) is None:
            return ""
        return (": the peer offers no additional key exchange (e.g. ML_KEM_768) and our policy lists only "
                "hybrid proposals; add a classical one (e.g. aes256gcm16-prfsha384-x25519) to allow a fallback")
    return (": we offered only hybrid proposals (additional key exchanges, e.g. ke1_mlkem768); a peer without "
            "RFC 9370 support (e.g. strongSwan 5.x) needs a classical one in our policy as a fallback")


IntermediateExchange._hybrid_hint = _hybrid_hint
