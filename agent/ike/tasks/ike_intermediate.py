"""IKE_INTERMEDIATE task (RFC 9242) for the additional key exchanges of RFC 9370, e.g. the
hybrid CURVE25519 + ML_KEM_768 (``aes256gcm16-prfsha384-x25519-ke1_mlkem768``).

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

Pure module: no I/O.
"""
from __future__ import annotations

import struct

from agent.iana import ExchangeType, KeId, NotifyType, PayloadType, name_of
from agent.ike.crypto import (KeyExchange, KeyExchangeError, Prf, derive_ike_keys_from_skeyseed,
                              derive_rekey_skeyseed, ike_key_lengths)
from agent.ike.errors import Drop, IkeSaState, LocalProtocolError, RemoteProtocolError, notify_name
from agent.ike.message import HEADER_LEN, KePayload, Message, NotifyPayload, encode_header
from agent.ike.proposals import additional_kes

__all__ = ["IkeIntermediate", "announces_intermediate", "int_auth_a", "int_auth_step"]


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


def announces_intermediate(payloads) -> bool:
    """N(INTERMEDIATE_EXCHANGE_SUPPORTED) among ``payloads`` (RFC 9242 §3.1)."""
    return any(isinstance(p, NotifyPayload) and p.notify_type == NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED
               for p in payloads)


class IkeIntermediate:
    """The IKE_INTERMEDIATE exchanges of one IkeSa and their IntAuth chain."""

    def __init__(self, sa) -> None:
        self.sa = sa
        self.done = 0  # additional key exchanges completed
        self.count = 0  # IKE_INTERMEDIATE exchanges completed
        self.int_auth_i = b""
        self.int_auth_r = b""

    # ------------------------------------------------------------ IKE_SA_INIT hooks
    def pending(self) -> list[int]:
        """Additional key exchange methods still to run before IKE_AUTH."""
        sa = self.sa
        if sa._ike_prop is None or sa.state == IkeSaState.ESTABLISHED:
            return []
        return additional_kes(sa._ike_prop.add_ke)[self.done:]

    def announce(self) -> list:
        """Initiator: N(INTERMEDIATE_EXCHANGE_SUPPORTED) when we offer additional key exchanges."""
        if any(p.add_ke for p in self.sa._ike_proposals()):
            return [NotifyPayload(int(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))]
        return []

    @staticmethod
    def reply(request_payloads) -> list:
        """Responder: answer the initiator's announcement (RFC 9242 §3.1)."""
        if announces_intermediate(request_payloads):
            return [NotifyPayload(int(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))]
        return []

    def after_init(self, response_payloads, now: float) -> None:
        """Initiator after IKE_SA_INIT: the IKE_INTERMEDIATE exchanges, then IKE_AUTH."""
        if self.pending() and not announces_intermediate(response_payloads):
            raise RemoteProtocolError("IKE_SA_INIT: responder chose additional key exchanges without "
                                      "N(INTERMEDIATE_EXCHANGE_SUPPORTED) (RFC 9370 §2.2.1)")
        self.next(now)

    def missing(self) -> bool:
        """Responder got IKE_AUTH before every negotiated additional key exchange: fail."""
        pending = self.pending()
        if not pending:
            return False
        self.sa.drops.append(Drop.MISSING_INTERMEDIATE)
        self.sa._die(f"IKE_AUTH before the additional key exchange {name_of(KeId, pending[0])} "
                     f"(IKE_INTERMEDIATE, RFC 9370 §2.2.2)")
        return True

    def int_auth(self) -> bytes:
        """IntAuth_iN | IntAuth_rN | IKE_AUTH_MID for the AUTH signed octets; b"" without IKE_INTERMEDIATE."""
        if not self.count:
            return b""
        # IKE_SA_INIT has ID 0, the IKE_INTERMEDIATEs 1..N (RFC 9242 §3.2), so IKE_AUTH is N + 1
        return self.int_auth_i + self.int_auth_r + struct.pack("!I", self.count + 1)

    def _step(self, initiator_msg: bool, exchange: int, flags: int, mid: int, plain: tuple[int, bytes]) -> None:
        sa = self.sa
        first, p = plain
        a = int_auth_a(sa.spi_i, sa.spi_r, exchange, flags, mid, first, len(p))
        if initiator_msg:
            self.int_auth_i = int_auth_step(sa._prf, sa._keys.sk_pi, self.int_auth_i, a, p)
        else:
            self.int_auth_r = int_auth_step(sa._prf, sa._keys.sk_pr, self.int_auth_r, a, p)

    def _update_keys(self, sk_n: bytes) -> None:
        """SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr) and all SK_* anew (RFC 9370 §2.2.2)."""
        sa = self.sa
        prop = sa._ike_prop
        ek, ak = ike_key_lengths(prop)
        skeyseed = derive_rekey_skeyseed(prop.prf, sa._keys.sk_d, sk_n, sa._ni, sa._nr)
        # the key log follows (IkeKeysDerived): IKE_AUTH is protected by these keys
        sa._install_keys(prop, derive_ike_keys_from_skeyseed(prop.prf, skeyseed, sa._ni, sa._nr, sa.spi_i,
                                                             sa.spi_r, ek, ak))

    # ------------------------------------------------------------ initiator
    def next(self, now: float) -> None:
        """HDR(IKE_INTERMEDIATE), SK {KEi(n)} --> for the next method, or IKE_AUTH when none is left."""
        sa = self.sa
        pending = self.pending()
        if not pending:
            sa.ike_auth.start(now)
            return
        method = pending[0]
        try:
            kex = KeyExchange(method, sa.rng)
            ke = KePayload(method, kex.public_bytes())
        except KeyExchangeError as e:
            raise LocalProtocolError(f"IKE_INTERMEDIATE: {e}") from None
        sa._request(ExchangeType.IKE_INTERMEDIATE, [ke],
                    lambda msg, inner, t: self.process_response(kex, msg, inner, t), now)
        self._step(True, int(ExchangeType.IKE_INTERMEDIATE), sa._flags(False), sa._next_mid - 1, sa._tx_plain)

    def process_response(self, kex, msg: Message, inner, now: float) -> None:
        """<-- HDR(IKE_INTERMEDIATE), SK {KEr(n)}: then SKEYSEED(n) and the next step."""
        sa = self.sa
        self._step(False, msg.exchange, msg.flags, msg.message_id, sa._rx_plain)
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, False, True, tuple(inner))
        errors = [n for n in m.notifies() if n.is_error]
        if errors:
            raise LocalProtocolError(f"IKE_INTERMEDIATE refused: {notify_name(errors[0].notify_type)}",
                                     errors[0].notify_type)
        ke = m.first(PayloadType.KE)
        if ke is None or ke.group != kex.ke_id:
            sa.drops.append(Drop.INVALID_KE_PAYLOAD)
            raise RemoteProtocolError(f"IKE_INTERMEDIATE response: no KEr for {name_of(KeId, kex.ke_id)}")
        try:
            sk_n = kex.shared_secret(ke.data)
        except KeyExchangeError as e:
            sa.drops.append(Drop.INVALID_KE_DATA)
            raise RemoteProtocolError(f"IKE_INTERMEDIATE response: {e}") from None
        self.done += 1
        self.count += 1
        self._update_keys(sk_n)
        self.next(now)

    # ------------------------------------------------------------ responder
    def process_request(self, msg: Message, inner, now: float) -> list | None:
        """HDR(IKE_INTERMEDIATE), SK {KEi(n)} --> ; <-- HDR(IKE_INTERMEDIATE), SK {KEr(n)}.
        Responds itself (returns None): the keys change right after the response is sealed."""
        sa = self.sa
        if sa.initiator or sa.state != IkeSaState.AUTHENTICATING:
            return [NotifyPayload(int(NotifyType.INVALID_SYNTAX))]
        self._step(True, msg.exchange, msg.flags, msg.message_id, sa._rx_plain)
        m = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.message_id, True, False, tuple(inner))
        ke = m.first(PayloadType.KE)
        pending = self.pending()
        sk_n = None
        if ke is None and not pending:
            payloads: list = []  # an IKE_INTERMEDIATE for something else: nothing to do (RFC 9242 §3.2)
        elif ke is None or not pending or ke.group != pending[0]:
            want = name_of(KeId, pending[0]) if pending else "none"
            sa.drops.append(Drop.INVALID_KE_PAYLOAD)
            raise RemoteProtocolError(f"IKE_INTERMEDIATE: KEi of {name_of(KeId, ke.group) if ke else 'no method'}, "
                                      f"expected {want}", NotifyType.INVALID_SYNTAX)
        else:
            try:
                kex = KeyExchange(ke.group, sa.rng)
                sk_n = kex.shared_secret(ke.data)
                payloads = [KePayload(ke.group, kex.public_bytes())]
            except KeyExchangeError as e:
                sa.drops.append(Drop.INVALID_KE_DATA)
                raise RemoteProtocolError(f"IKE_INTERMEDIATE request: {e}", NotifyType.INVALID_SYNTAX) from None
        sa._respond(msg, payloads, sa.local, sa.remote)
        self._step(False, msg.exchange, sa._flags(True), msg.message_id, sa._tx_plain)
        self.count += 1
        if sk_n is not None:
            self.done += 1
            self._update_keys(sk_n)
        return None
